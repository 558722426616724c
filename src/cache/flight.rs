//! Request coalescing (single flight): identical cacheable requests in flight at the same
//! time share one upstream call.
//!
//! The first request starts a [`Flight`], whose upstream work runs in a task of its own;
//! every identical request that arrives meanwhile subscribes to it. Non-stream subscribers
//! wait for the body; stream subscribers replay the events already produced, then follow
//! live, in order. A subscriber whose client disconnects only unsubscribes; when the last
//! one leaves, the flight is cancelled, which drops the upstream call. A finished flight is
//! retired only after its answer is in the cache, so a request arriving in between finds
//! one or the other.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{CacheKey, CacheStats};
use crate::error::GatewayError;
use crate::wire::Usage;

/// Flights are separate for stream and non-stream requests with the same cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlightKey {
    pub key: CacheKey,
    pub stream: bool,
}

#[derive(Default)]
struct State {
    events: Vec<Bytes>,
    body: Option<Bytes>,
    error: Option<GatewayError>,
    done: bool,
    usage: Option<Usage>,
    provider: Option<Arc<str>>,
    deployment: Option<Arc<str>>,
    subscribers: usize,
}

/// One upstream call and everyone waiting for it.
pub struct Flight {
    state: Mutex<State>,
    version: watch::Sender<u64>,
    /// Fired when the last subscriber leaves: the upstream work stops.
    pub cancel: CancellationToken,
}

/// What a subscriber sees at one position of the stream.
pub enum Next {
    Event(Bytes),
    Wait,
    End,
}

impl Flight {
    fn new() -> Arc<Flight> {
        Arc::new(Flight {
            state: Mutex::new(State::default()),
            version: watch::channel(0).0,
            cancel: CancellationToken::new(),
        })
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        if let Ok(mut state) = self.state.lock() {
            f(&mut state);
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Appends a stream event for every subscriber.
    pub fn publish(&self, event: Bytes) {
        self.update(|s| s.events.push(event));
    }

    /// Ends a stream flight.
    pub fn end_stream(&self, usage: Option<Usage>) {
        self.update(|s| {
            s.done = true;
            s.usage = usage;
        });
    }

    /// Ends a non-stream flight with its body.
    pub fn complete(&self, body: Bytes, usage: Option<Usage>) {
        self.update(|s| {
            s.body = Some(body);
            s.usage = usage;
            s.done = true;
        });
    }

    /// Ends the flight with an error before any output.
    pub fn fail(&self, error: GatewayError) {
        self.update(|s| {
            s.error = Some(error);
            s.done = true;
        });
    }

    /// Names the provider and deployment that answered, for the subscribers' logs.
    pub fn set_provider(&self, provider: Arc<str>, deployment: Option<Arc<str>>) {
        if let Ok(mut s) = self.state.lock() {
            s.provider = Some(provider);
            s.deployment = deployment;
        }
    }

    pub fn deployment(&self) -> Option<Arc<str>> {
        self.state.lock().ok().and_then(|s| s.deployment.clone())
    }

    pub fn provider(&self) -> Option<Arc<str>> {
        self.state.lock().ok().and_then(|s| s.provider.clone())
    }

    pub fn usage(&self) -> Option<Usage> {
        self.state.lock().ok().and_then(|s| s.usage)
    }

    /// Waits until a non-stream flight ends.
    ///
    /// # Errors
    /// The flight's error (shared by every subscriber).
    pub async fn wait_body(&self) -> Result<Bytes, GatewayError> {
        let mut rx = self.version.subscribe();
        loop {
            if let Ok(s) = self.state.lock()
                && s.done
            {
                return match (&s.body, &s.error) {
                    (Some(body), _) => Ok(body.clone()),
                    (None, Some(e)) => Err(e.clone()),
                    (None, None) => Err(GatewayError::Internal("flight ended empty".into())),
                };
            }
            if rx.changed().await.is_err() {
                return Err(GatewayError::Internal("flight abandoned".into()));
            }
        }
    }

    /// Waits until a stream flight produced its first event (or failed first).
    ///
    /// # Errors
    /// The flight's error when it failed before producing anything.
    pub async fn wait_start(&self) -> Result<(), GatewayError> {
        let mut rx = self.version.subscribe();
        loop {
            if let Ok(s) = self.state.lock() {
                if !s.events.is_empty() {
                    return Ok(());
                }
                if s.done {
                    return Err(s.error.clone().unwrap_or_else(|| {
                        GatewayError::Internal("stream ended before it started".into())
                    }));
                }
            }
            if rx.changed().await.is_err() {
                return Err(GatewayError::Internal("flight abandoned".into()));
            }
        }
    }

    /// The event at `index`, if produced yet.
    pub fn event_at(&self, index: usize) -> Next {
        match self.state.lock() {
            Ok(s) => match s.events.get(index) {
                Some(event) => Next::Event(event.clone()),
                None if s.done => Next::End,
                None => Next::Wait,
            },
            Err(_) => Next::End,
        }
    }

    /// A receiver that wakes when the flight changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

/// Every flight in progress.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<FlightKey, Arc<Flight>>>,
}

/// A subscriber's hold on a flight; leaving is dropping it.
pub struct Subscription {
    flights: Arc<Flights>,
    key: FlightKey,
    pub flight: Arc<Flight>,
    /// This subscriber started the flight and must run its upstream work.
    pub leader: bool,
}

impl Flights {
    /// Joins the flight for `key`, or starts one (then `leader` is set). With `share`
    /// off the flight is private: caching without coalescing.
    pub fn join(self: &Arc<Self>, key: FlightKey, share: bool, stats: &CacheStats) -> Subscription {
        let Ok(mut map) = self.map.lock() else {
            return self.private(key);
        };
        if share
            && let Some(flight) = map.get(&key)
            && !flight.cancel.is_cancelled()
        {
            if let Ok(mut s) = flight.state.lock() {
                s.subscribers += 1;
            }
            stats.coalesced.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("switchyard_cache_coalesced_total").increment(1);
            return Subscription {
                flights: self.clone(),
                key,
                flight: flight.clone(),
                leader: false,
            };
        }
        let flight = Flight::new();
        if let Ok(mut s) = flight.state.lock() {
            s.subscribers = 1;
        }
        if share {
            map.insert(key, flight.clone());
        }
        Subscription {
            flights: self.clone(),
            key,
            flight,
            leader: true,
        }
    }

    fn private(self: &Arc<Self>, key: FlightKey) -> Subscription {
        let flight = Flight::new();
        if let Ok(mut s) = flight.state.lock() {
            s.subscribers = 1;
        }
        Subscription {
            flights: self.clone(),
            key,
            flight,
            leader: true,
        }
    }

    /// Removes a finished flight so later requests go to the cache.
    pub fn retire(&self, key: &FlightKey, flight: &Arc<Flight>) {
        if let Ok(mut map) = self.map.lock()
            && map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            map.remove(key);
        }
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Under the map lock, so no one joins a flight that is being abandoned.
        let Ok(mut map) = self.flights.map.lock() else {
            return;
        };
        let last = match self.flight.state.lock() {
            Ok(mut s) => {
                s.subscribers = s.subscribers.saturating_sub(1);
                s.subscribers == 0
            }
            Err(_) => true,
        };
        if last {
            self.flight.cancel.cancel();
            if map
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> FlightKey {
        FlightKey {
            key: CacheKey([n; 32]),
            stream: true,
        }
    }

    #[tokio::test]
    async fn followers_share_a_flight_and_replay_from_the_start() {
        let flights = Arc::new(Flights::default());
        let stats = CacheStats::default();
        let leader = flights.join(key(1), true, &stats);
        assert!(leader.leader);
        leader.flight.publish(Bytes::from_static(b"a"));
        let follower = flights.join(key(1), true, &stats);
        assert!(!follower.leader);
        assert_eq!(stats.coalesced.load(Ordering::Relaxed), 1);
        follower.flight.wait_start().await.unwrap();
        assert!(matches!(follower.flight.event_at(0), Next::Event(e) if &e[..] == b"a"));
        assert!(matches!(follower.flight.event_at(1), Next::Wait));
        leader.flight.end_stream(None);
        assert!(matches!(follower.flight.event_at(1), Next::End));
    }

    #[tokio::test]
    async fn the_flight_is_cancelled_only_when_the_last_subscriber_leaves() {
        let flights = Arc::new(Flights::default());
        let stats = CacheStats::default();
        let a = flights.join(key(2), true, &stats);
        let b = flights.join(key(2), true, &stats);
        let flight = a.flight.clone();
        drop(a);
        assert!(!flight.cancel.is_cancelled());
        drop(b);
        assert!(flight.cancel.is_cancelled());
        assert!(flights.is_empty());
        assert!(
            flights.join(key(2), true, &stats).leader,
            "a new flight starts"
        );
    }

    #[tokio::test]
    async fn errors_reach_every_waiter() {
        let flights = Arc::new(Flights::default());
        let stats = CacheStats::default();
        let a = flights.join(
            FlightKey {
                key: CacheKey([3; 32]),
                stream: false,
            },
            true,
            &stats,
        );
        let b = flights.join(
            FlightKey {
                key: CacheKey([3; 32]),
                stream: false,
            },
            true,
            &stats,
        );
        a.flight.fail(GatewayError::ShuttingDown);
        assert!(matches!(
            b.flight.wait_body().await,
            Err(GatewayError::ShuttingDown)
        ));
    }
}
