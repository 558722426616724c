//! Event fan-out: what `/v1/events` subscribers see, on whichever instance they are.
//!
//! A topic (`conversation:{id}`) has a bounded broadcast channel while someone on this
//! instance subscribes to it; [`Fanout::publish`] delivers to it at once. The events also
//! go to every other instance: through Redis pub/sub when `[redis]` is configured (it
//! keeps the traffic off the database: PostgreSQL serialises every `NOTIFY` at commit),
//! otherwise on PostgreSQL through `NOTIFY`, on a channel named after the schema. A
//! publisher task packs queued events into payloads (under PostgreSQL's 8,000-byte limit
//! there, where an event too large for one is sent as a stub naming its type, with
//! `"truncated": true`, so the subscriber knows to read the response), and a listener
//! task delivers other instances' events here. Both queues are bounded: past them an event
//! is dropped and counted, never queued without bound. On SQLite without Redis (one
//! instance) delivery is local only.

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
const MAX_NOTIFY_PAYLOAD: usize = 7_800;
/// The most one Redis message carries (a bound of ours; Redis allows far more).
const MAX_REDIS_PAYLOAD: usize = 256 * 1024;

/// How events reach the other instances.
#[derive(Clone)]
enum Transport {
    Postgres {
        pool: sqlx::PgPool,
        channel: String,
    },
    Redis {
        client: redis::Client,
        channel: String,
    },
}

impl Transport {
    fn max_payload(&self) -> usize {
        match self {
            Transport::Postgres { .. } => MAX_NOTIFY_PAYLOAD,
            Transport::Redis { .. } => MAX_REDIS_PAYLOAD,
        }
    }
}

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
    /// A hub; with Redis or on PostgreSQL its publisher and listener run on `tasks` until
    /// `cancel`.
    ///
    /// # Errors
    /// When the Redis URL is unusable.
    pub fn start(
        store: &crate::store::Store,
        schema: Option<&str>,
        redis: Option<&crate::config::RedisConfig>,
        capacity: usize,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Arc<Fanout>> {
        let origin = rand::random();
        let transport = match (redis, store.postgres()) {
            (Some(redis), _) => Some(Transport::Redis {
                client: redis::Client::open(redis.url.expose())?,
                channel: format!("{}{}", redis.key_prefix, channel_name(schema)),
            }),
            (None, Some(pool)) => Some(Transport::Postgres {
                pool: pool.clone(),
                channel: channel_name(schema),
            }),
            (None, None) => None,
        };
        let (remote, rx) = match transport {
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
        if let (Some(transport), Some(rx)) = (transport, rx) {
            tasks.spawn(publish_remote(
                transport.clone(),
                origin,
                rx,
                cancel.clone(),
                fanout.clone(),
            ));
            tasks.spawn(listen(transport, fanout.clone(), cancel.clone()));
        }
        Ok(fanout)
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

    /// Delivers another instance's payload (`{"o": origin, "m": [[topic, event]…]}`) here.
    fn deliver_remote(&self, payload: &str) {
        let Ok(payload) = serde_json::from_str::<Value>(payload) else {
            return;
        };
        if payload["o"].as_u64() == Some(self.origin) {
            return;
        }
        for message in payload["m"].as_array().into_iter().flatten() {
            if let (Some(topic), Some(event)) = (message[0].as_str(), message[1].as_str()) {
                self.deliver(topic, Arc::from(event));
            }
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

/// Sends queued events to other instances, packed into as few messages as fit.
async fn publish_remote(
    transport: Transport,
    origin: u64,
    mut rx: mpsc::Receiver<(String, Arc<str>)>,
    cancel: CancellationToken,
    fanout: Arc<Fanout>,
) {
    let max_payload = transport.max_payload();
    // Redis: one connection, made on first use and remade by the manager when it drops.
    let mut redis: Option<redis::aio::ConnectionManager> = None;
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
            if text.len() + topic.len() > max_payload - 64 {
                text = stub(&text);
            }
            let cost = text.len() + topic.len() + 8;
            if size + cost > max_payload && !messages.is_empty() {
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
            let sent = match &transport {
                Transport::Postgres { pool, channel } => sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(channel)
                    .bind(&payload)
                    .execute(pool)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Transport::Redis { client, channel } => {
                    redis_publish(&mut redis, client, channel, &payload).await
                }
            };
            if let Err(e) = sent {
                fanout.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("switchyard_events_dropped_total").increment(1);
                tracing::debug!(error = %e, "events: a message to other instances failed");
            }
        }
    }
}

/// Publishes one payload on Redis, connecting first if need be (within five seconds).
async fn redis_publish(
    conn: &mut Option<redis::aio::ConnectionManager>,
    client: &redis::Client,
    channel: &str,
    payload: &str,
) -> Result<(), String> {
    if conn.is_none() {
        let made = tokio::time::timeout(
            Duration::from_secs(5),
            redis::aio::ConnectionManager::new(client.clone()),
        )
        .await
        .map_err(|_| "timed out connecting to Redis".to_string())?
        .map_err(|e| e.to_string())?;
        *conn = Some(made);
    }
    let Some(conn) = conn.as_mut() else {
        return Err("no Redis connection".into());
    };
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async::<()>(conn)
        .await
        .map_err(|e| e.to_string())
}

/// Delivers other instances' events here; reconnects when the connection drops.
async fn listen(transport: Transport, fanout: Arc<Fanout>, cancel: CancellationToken) {
    loop {
        let listener = async {
            match &transport {
                Transport::Postgres { pool, channel } => {
                    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    listener.listen(channel).await.map_err(|e| e.to_string())?;
                    loop {
                        let note = listener.recv().await.map_err(|e| e.to_string())?;
                        fanout.deliver_remote(note.payload());
                    }
                }
                Transport::Redis { client, channel } => {
                    let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
                    pubsub.subscribe(channel).await.map_err(|e| e.to_string())?;
                    let mut messages = pubsub.on_message();
                    while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                        if let Ok(payload) = message.get_payload::<String>() {
                            fanout.deliver_remote(&payload);
                        }
                    }
                    Err::<(), String>("the subscription ended".into())
                }
            }
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
