//! Event fan-out: what `/v1/events` subscribers see, on whichever instance they are.
//!
//! A topic (`conversation:{id}`) has a bounded broadcast channel while someone on this
//! instance subscribes to it; [`Fanout::publish`] delivers to it at once. On PostgreSQL
//! the events also go to every other instance through `NOTIFY` on a channel named after
//! the schema: a publisher task packs queued events into payloads under PostgreSQL's
//! 8,000-byte limit (an event too large for one is sent as a stub naming its type, with
//! `"truncated": true`, so the subscriber knows to read the response), and a listener
//! task delivers other instances' events here. Both queues are bounded: past them an event
//! is dropped and counted, never queued without bound. On SQLite (one instance) delivery
//! is local only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Events waiting to be sent to other instances.
const REMOTE_QUEUE: usize = 4096;
/// The most a `NOTIFY` payload carries (PostgreSQL refuses 8,000 bytes and more).
const MAX_PAYLOAD: usize = 7_800;

/// The fan-out hub.
pub struct Fanout {
    topics: Mutex<HashMap<String, broadcast::Sender<Arc<str>>>>,
    /// Per topic and subscriber: events a subscriber may fall behind by before it is
    /// cut off.
    capacity: usize,
    remote: Option<mpsc::Sender<(String, Arc<str>)>>,
    /// This instance, so its own notifications are not delivered twice.
    origin: u64,
    pub dropped: AtomicU64,
}

/// A subscription to one topic; dropping it lets the topic go when nobody else listens.
pub struct Subscription {
    pub events: broadcast::Receiver<Arc<str>>,
    topic: String,
    fanout: Arc<Fanout>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut topics = self.fanout.topics.lock().unwrap_or_else(|e| e.into_inner());
        // This receiver still counts until it is dropped after this body.
        if topics
            .get(&self.topic)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            topics.remove(&self.topic);
        }
    }
}

impl Fanout {
    /// A hub; on PostgreSQL its publisher and listener run on `tasks` until `cancel`.
    pub fn start(
        store: &crate::store::Store,
        schema: Option<&str>,
        capacity: usize,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Arc<Fanout> {
        let origin = rand::random();
        let pg = store.postgres().cloned();
        let (remote, rx) = match pg {
            Some(_) => {
                let (tx, rx) = mpsc::channel(REMOTE_QUEUE);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let fanout = Arc::new(Fanout {
            topics: Mutex::new(HashMap::new()),
            capacity,
            remote,
            origin,
            dropped: AtomicU64::new(0),
        });
        if let (Some(pool), Some(rx)) = (pg, rx) {
            let channel = channel_name(schema);
            tasks.spawn(publish_remote(
                pool.clone(),
                channel.clone(),
                origin,
                rx,
                cancel.clone(),
                fanout.clone(),
            ));
            tasks.spawn(listen(pool, channel, fanout.clone(), cancel.clone()));
        }
        fanout
    }

    /// Whether an event on `topic` can reach anyone: a subscriber here, or other
    /// instances.
    pub fn has_audience(&self, topic: &str) -> bool {
        self.remote.is_some()
            || self
                .topics
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(topic)
    }

    /// Sends `event` (a JSON object) to the topic's subscribers everywhere.
    pub fn publish(&self, topic: &str, event: Arc<str>) {
        self.deliver(topic, event.clone());
        if let Some(remote) = &self.remote
            && remote.try_send((topic.to_string(), event)).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("switchyard_events_dropped_total").increment(1);
        }
    }

    /// Delivers to this instance's subscribers.
    fn deliver(&self, topic: &str, event: Arc<str>) {
        let topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = topics.get(topic) {
            let _ = tx.send(event);
        }
    }

    /// Subscribes to `topic`.
    pub fn subscribe(self: &Arc<Self>, topic: &str) -> Subscription {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let events = topics
            .entry(topic.to_string())
            .or_insert_with(|| broadcast::channel(self.capacity).0)
            .subscribe();
        Subscription {
            events,
            topic: topic.to_string(),
            fanout: self.clone(),
        }
    }

    /// Topics with a subscriber here.
    pub fn topics(&self) -> usize {
        self.topics.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The `NOTIFY` channel of a schema: instances of other schemas never see its events.
fn channel_name(schema: Option<&str>) -> String {
    let schema: String = schema
        .unwrap_or("public")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("switchyard_events_{schema}")
}

/// An event too large for a notification: its type and ids, marked truncated.
fn stub(event: &str) -> String {
    let value: Value = serde_json::from_str(event).unwrap_or_default();
    json!({
        "type": value["type"],
        "sequence_number": value["sequence_number"],
        "response_id": value["response"]["id"],
        "truncated": true,
    })
    .to_string()
}

/// Sends queued events to other instances, packed into as few notifications as fit.
async fn publish_remote(
    pool: sqlx::PgPool,
    channel: String,
    origin: u64,
    mut rx: mpsc::Receiver<(String, Arc<str>)>,
    cancel: CancellationToken,
    fanout: Arc<Fanout>,
) {
    let mut batch: Vec<(String, Arc<str>)> = Vec::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            got = rx.recv_many(&mut batch, 256) => if got == 0 { return },
        }
        let mut payloads: Vec<String> = Vec::new();
        let mut messages: Vec<Value> = Vec::new();
        let mut size = 64;
        for (topic, event) in batch.drain(..) {
            let mut text = event.to_string();
            if text.len() + topic.len() > MAX_PAYLOAD - 64 {
                text = stub(&text);
            }
            let cost = text.len() + topic.len() + 8;
            if size + cost > MAX_PAYLOAD && !messages.is_empty() {
                payloads.push(json!({"o": origin, "m": messages}).to_string());
                messages = Vec::new();
                size = 64;
            }
            size += cost;
            messages.push(json!([topic, text]));
        }
        if !messages.is_empty() {
            payloads.push(json!({"o": origin, "m": messages}).to_string());
        }
        for payload in payloads {
            if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&channel)
                .bind(&payload)
                .execute(&pool)
                .await
            {
                fanout.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "events: a notification failed");
            }
        }
    }
}

/// Delivers other instances' events here; reconnects when the connection drops.
async fn listen(
    pool: sqlx::PgPool,
    channel: String,
    fanout: Arc<Fanout>,
    cancel: CancellationToken,
) {
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            loop {
                let note = listener.recv().await?;
                let Ok(payload) = serde_json::from_str::<Value>(note.payload()) else {
                    continue;
                };
                if payload["o"].as_u64() == Some(fanout.origin) {
                    continue;
                }
                for message in payload["m"].as_array().into_iter().flatten() {
                    if let (Some(topic), Some(event)) = (message[0].as_str(), message[1].as_str()) {
                        fanout.deliver(topic, Arc::from(event));
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            result = listener => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "events: listening for other instances failed; again in a second");
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_per_schema() {
        assert_eq!(channel_name(None), "switchyard_events_public");
        assert_eq!(
            channel_name(Some("Sy-Test.1")),
            "switchyard_events_sy_test_1"
        );
    }

    #[test]
    fn a_large_event_becomes_a_stub() {
        let event = json!({"type": "response.completed", "sequence_number": 9,
                           "response": {"id": "resp_1", "output": "x".repeat(10_000)}});
        let stub: Value = serde_json::from_str(&stub(&event.to_string())).unwrap();
        assert_eq!(
            stub,
            json!({"type": "response.completed", "sequence_number": 9,
                                "response_id": "resp_1", "truncated": true})
        );
    }
}
