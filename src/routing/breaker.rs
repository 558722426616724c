//! A circuit breaker per deployment: failure rate over a sliding window opens it, a
//! cool-down keeps traffic away, a few half-open probes decide whether it closes.
//!
//! Written here rather than taken from a tower middleware because routing needs to ask
//! "may this deployment take a request?" *before* choosing it (an open deployment is simply
//! not a candidate), and the admin view needs its state and window figures.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::BreakerConfig;

/// Buckets in the sliding window: old outcomes age out in steps of window / BUCKETS.
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    /// The gauge value exported for this state.
    pub fn as_gauge(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which window slot (time / bucket width) these counts belong to.
    epoch: u64,
    ok: u32,
    failed: u32,
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    buckets: [Bucket; BUCKETS],
    opened_at: Option<Instant>,
    probes_in_flight: u32,
    probe_successes: u32,
    /// Failures since the last success.
    consecutive: u32,
}

/// The breaker of one deployment.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    born: Instant,
    inner: Mutex<Inner>,
}

/// Permission to send one request; `probe` is set when it is a half-open probe.
#[derive(Debug)]
#[must_use]
pub struct Ticket {
    pub probe: bool,
}

/// Figures for the admin view.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    pub state: CircuitState,
    pub requests_in_window: u32,
    pub failures_in_window: u32,
    pub failure_rate: f64,
    /// Milliseconds until an open circuit starts probing.
    pub reopens_in_ms: Option<u64>,
}

impl CircuitBreaker {
    pub fn new(name: &str, config: BreakerConfig) -> Self {
        CircuitBreaker {
            name: name.to_string(),
            config,
            born: Instant::now(),
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                buckets: [Bucket::default(); BUCKETS],
                opened_at: None,
                probes_in_flight: 0,
                probe_successes: 0,
                consecutive: 0,
            }),
        }
    }

    fn bucket_width(&self) -> Duration {
        (self.config.window / BUCKETS as u32).max(Duration::from_millis(1))
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.duration_since(self.born).as_nanos() / self.bucket_width().as_nanos()) as u64
    }

    /// Asks to send a request. `None` while open, or half-open with all probes out.
    pub fn try_acquire(&self) -> Option<Ticket> {
        let mut inner = self.inner.lock().ok()?;
        match inner.state {
            CircuitState::Closed => Some(Ticket { probe: false }),
            CircuitState::Open => {
                let cooled = inner
                    .opened_at
                    .is_none_or(|at| at.elapsed() >= self.config.cooldown);
                if !cooled {
                    return None;
                }
                self.transition(&mut inner, CircuitState::HalfOpen);
                inner.probes_in_flight = 1;
                Some(Ticket { probe: true })
            }
            CircuitState::HalfOpen => {
                if inner.probes_in_flight + inner.probe_successes < self.config.half_open_probes {
                    inner.probes_in_flight += 1;
                    Some(Ticket { probe: true })
                } else {
                    None
                }
            }
        }
    }

    /// Whether a request could be sent now (without taking a probe).
    pub fn is_available(&self) -> bool {
        let Ok(inner) = self.inner.lock() else {
            return false;
        };
        match inner.state {
            CircuitState::Closed => true,
            CircuitState::Open => inner
                .opened_at
                .is_none_or(|at| at.elapsed() >= self.config.cooldown),
            CircuitState::HalfOpen => {
                inner.probes_in_flight + inner.probe_successes < self.config.half_open_probes
            }
        }
    }

    /// Records the outcome of a request sent with `ticket`.
    pub fn record(&self, ticket: Ticket, success: bool) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if ticket.probe {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
            if inner.state == CircuitState::HalfOpen {
                if !success {
                    self.open(&mut inner);
                } else {
                    inner.probe_successes += 1;
                    if inner.probe_successes >= self.config.half_open_probes {
                        inner.buckets = [Bucket::default(); BUCKETS];
                        self.transition(&mut inner, CircuitState::Closed);
                    }
                }
                return;
            }
        }
        if inner.state != CircuitState::Closed {
            // A late answer to a request sent before the circuit opened.
            return;
        }
        let epoch = self.epoch(Instant::now());
        let slot = &mut inner.buckets[(epoch % BUCKETS as u64) as usize];
        if slot.epoch != epoch {
            *slot = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        if success {
            slot.ok += 1;
            inner.consecutive = 0;
        } else {
            slot.failed += 1;
            inner.consecutive += 1;
            let (total, failed) = window_counts(&inner.buckets, epoch);
            let streak = self.config.consecutive_failures > 0
                && inner.consecutive >= self.config.consecutive_failures;
            if streak
                || (total >= self.config.min_requests
                    && f64::from(failed) / f64::from(total) >= self.config.failure_rate)
            {
                self.open(&mut inner);
            }
        }
    }

    /// Gives back a ticket whose request ended without an outcome (e.g. cancelled).
    pub fn release(&self, ticket: Ticket) {
        if ticket.probe
            && let Ok(mut inner) = self.inner.lock()
        {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let epoch = self.epoch(now);
        let Ok(inner) = self.inner.lock() else {
            return BreakerSnapshot {
                state: CircuitState::Open,
                requests_in_window: 0,
                failures_in_window: 0,
                failure_rate: 0.0,
                reopens_in_ms: None,
            };
        };
        let (total, failed) = window_counts(&inner.buckets, epoch);
        BreakerSnapshot {
            state: inner.state,
            requests_in_window: total,
            failures_in_window: failed,
            failure_rate: if total == 0 {
                0.0
            } else {
                f64::from(failed) / f64::from(total)
            },
            reopens_in_ms: (inner.state == CircuitState::Open)
                .then(|| inner.opened_at)
                .flatten()
                .map(|at| {
                    self.config
                        .cooldown
                        .saturating_sub(at.elapsed())
                        .as_millis() as u64
                }),
        }
    }

    pub fn state(&self) -> CircuitState {
        self.inner
            .lock()
            .map(|i| i.state)
            .unwrap_or(CircuitState::Open)
    }

    fn open(&self, inner: &mut Inner) {
        inner.opened_at = Some(Instant::now());
        inner.consecutive = 0;
        inner.probes_in_flight = 0;
        inner.probe_successes = 0;
        self.transition(inner, CircuitState::Open);
    }

    fn transition(&self, inner: &mut Inner, to: CircuitState) {
        if inner.state == to {
            return;
        }
        let from = inner.state;
        inner.state = to;
        if to == CircuitState::HalfOpen {
            inner.probe_successes = 0;
        }
        let log_to = match to {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        };
        if to == CircuitState::Open {
            tracing::warn!(deployment = %self.name, ?from, to = log_to, "circuit breaker opened");
        } else {
            tracing::info!(deployment = %self.name, ?from, to = log_to, "circuit breaker state change");
        }
        metrics::gauge!("switchyard_circuit_state", "deployment" => self.name.clone())
            .set(to.as_gauge());
        metrics::counter!("switchyard_circuit_transitions_total",
            "deployment" => self.name.clone(), "to" => log_to)
        .increment(1);
    }
}

/// (requests, failures) in the buckets still inside the window.
fn window_counts(buckets: &[Bucket; BUCKETS], epoch: u64) -> (u32, u32) {
    buckets
        .iter()
        .filter(|b| epoch.saturating_sub(b.epoch) < BUCKETS as u64 && b.ok + b.failed > 0)
        .fold((0, 0), |(t, f), b| (t + b.ok + b.failed, f + b.failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(cooldown_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(
            "t",
            BreakerConfig {
                window: Duration::from_secs(10),
                min_requests: 4,
                failure_rate: 0.5,
                consecutive_failures: 0,
                cooldown: Duration::from_millis(cooldown_ms),
                half_open_probes: 2,
            },
        )
    }

    fn call(b: &CircuitBreaker, ok: bool) -> bool {
        match b.try_acquire() {
            Some(t) => {
                b.record(t, ok);
                true
            }
            None => false,
        }
    }

    #[test]
    fn opens_on_failure_rate_only_after_min_requests() {
        let b = breaker(60_000);
        assert!(call(&b, false));
        assert!(call(&b, false));
        assert!(call(&b, false));
        assert_eq!(b.state(), CircuitState::Closed, "3 calls < min_requests");
        assert!(call(&b, false));
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!call(&b, true), "open circuit takes no traffic");
    }

    #[test]
    fn a_low_failure_rate_keeps_it_closed() {
        let b = breaker(60_000);
        for i in 0..100 {
            call(&b, i % 3 != 2);
        }
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn half_open_probes_close_it_or_reopen_it() {
        let b = breaker(0);
        for _ in 0..4 {
            call(&b, false);
        }
        assert_eq!(b.state(), CircuitState::Open);
        // Cool-down of zero: the next request is a probe.
        let p1 = b.try_acquire().unwrap();
        assert!(p1.probe);
        let p2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none(), "only two probes at once");
        b.record(p1, true);
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.record(p2, true);
        assert_eq!(b.state(), CircuitState::Closed);

        for _ in 0..4 {
            call(&b, false);
        }
        let probe = b.try_acquire().unwrap();
        b.record(probe, false);
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn a_streak_of_failures_opens_it_despite_a_good_window() {
        let b = CircuitBreaker::new(
            "t",
            BreakerConfig {
                consecutive_failures: 3,
                ..BreakerConfig::default()
            },
        );
        for _ in 0..100 {
            call(&b, true);
        }
        call(&b, false);
        call(&b, false);
        call(&b, true);
        call(&b, false);
        call(&b, false);
        assert_eq!(
            b.state(),
            CircuitState::Closed,
            "a success breaks the streak"
        );
        call(&b, false);
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn a_released_probe_frees_its_slot() {
        let b = breaker(0);
        for _ in 0..4 {
            call(&b, false);
        }
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        b.release(p1);
        assert!(b.try_acquire().is_some());
        b.release(p2);
    }
}
