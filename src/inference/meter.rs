//! Metering: what one model call costs its key, settled explicitly when the call ends.
//!
//! A [`Meter`] is opened for every call [`super::Inference`] makes. It holds the call's
//! budget and token-rate reservation and, when the call ends, settles the reservation with
//! the real usage and queues one usage row. "Ends" is explicit: a completion settles before
//! it is returned, a stream settles when its last event has been read, and a stream whose
//! reader went away (a client disconnect drops it) settles from its `Drop` with what is
//! known so far. A multi-call operation (a tool loop) opens one meter per call under the
//! same [`Metering`], so every call is charged to one key under one request id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::Principal;
use crate::error::GatewayError;
use crate::limits::Reservation;
use crate::store::usage::{UsageRecord, UsageSink};
use crate::wire::Usage;

/// Who pays for the calls of one operation and where their rows go; carried by the
/// call context.
#[derive(Clone, Debug)]
pub struct Metering(Arc<Payer>);

/// What every call of one operation shares (behind one `Arc`: opening a meter per call is
/// one reference count, not a clone of the usage queue's sender).
#[derive(Debug)]
struct Payer {
    /// The usage log's queue; `None` writes no rows (`[usage] enabled = false`).
    sink: Option<UsageSink>,
    /// The usage row's `route`: what kind of operation made the call.
    route: &'static str,
    key_id: Option<Arc<str>>,
    request_id: Arc<str>,
}

impl Metering {
    pub fn new(
        sink: Option<UsageSink>,
        route: &'static str,
        principal: Option<&Principal>,
        request_id: Arc<str>,
    ) -> Metering {
        Metering(Arc::new(Payer {
            sink,
            route,
            key_id: principal.map(|p| p.key_id.clone()),
            request_id,
        }))
    }

    /// Records one tool call of this operation: a usage row with route `tool`, the tool's
    /// name as its alias, no tokens, and `status` (200, or 502/504 for a failure or a
    /// timeout the model was told about).
    pub fn tool_call(&self, tool: &str, duration: std::time::Duration, status: u16, cached: bool) {
        let payer = &self.0;
        let Some(sink) = &payer.sink else {
            return;
        };
        let micros = i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
        let now = crate::limits::period::now_ms();
        sink.record(UsageRecord {
            ts_ms: now - micros / 1000,
            key_id: payer.key_id.clone(),
            route: "tool",
            alias: Some(Arc::from(tool)),
            deployment: None,
            tokens_in: 0,
            tokens_out: 0,
            latency_us: micros,
            ttfb_us: None,
            status: i32::from(status),
            cache_hit: cached,
            request_id: payer.request_id.clone(),
        });
    }

    /// Opens the meter of one call.
    pub fn open(&self) -> Meter {
        Meter {
            metering: self.clone(),
            started: Instant::now(),
            started_at_ms: crate::limits::period::now_ms(),
            alias: None,
            deployment: None,
            reservation: None,
            usage: None,
            delivered: None,
            cache_hit: false,
            status: None,
        }
    }

    /// Records a request refused before any call was made (a malformed body, say): a
    /// usage row with its status, nothing charged.
    pub fn refused(&self, alias: Option<&str>, err: &GatewayError) {
        let mut meter = self.open();
        meter.alias = alias.map(Arc::from);
        meter.fail(err);
    }
}

/// One call's charge; settled exactly once (by [`Meter::finish`], [`Meter::fail`], or on
/// drop as a call whose reader went away).
#[derive(Debug)]
pub struct Meter {
    metering: Metering,
    started: Instant,
    started_at_ms: i64,
    pub(super) alias: Option<Arc<str>>,
    pub(super) deployment: Option<Arc<str>>,
    pub(super) reservation: Option<Reservation>,
    usage: Option<Usage>,
    /// When the first output was handed to the caller.
    delivered: Option<Duration>,
    pub(super) cache_hit: bool,
    /// Set when settled: the row's status.
    status: Option<u16>,
}

impl Meter {
    /// Marks the moment the first output reached the caller.
    pub fn delivered(&mut self) {
        if self.delivered.is_none() {
            self.delivered = Some(self.started.elapsed());
        }
    }

    /// Notes usage as soon as it is known (a stream's usage chunk), so a reader that goes
    /// away after it is still charged the real figure.
    pub fn observe(&mut self, usage: Option<Usage>) {
        if usage.is_some() {
            self.usage = usage;
        }
    }

    /// Settles a call that produced its answer (a stream may still have ended in an error
    /// event: pass its status then).
    pub fn finish(&mut self, usage: Option<Usage>, status: u16) {
        self.observe(usage);
        self.delivered();
        self.settle(status);
    }

    /// Settles a call that failed before producing anything.
    pub fn fail(&mut self, err: &GatewayError) {
        self.settle(err.status().as_u16());
    }

    /// The usage this call was charged (once settled) or has seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn settle(&mut self, status: u16) {
        if self.status.is_some() {
            return;
        }
        self.status = Some(status);
        let tokens = self.usage.map(|u| {
            u.total_tokens
                .max(u.prompt_tokens.saturating_add(u.completion_tokens))
        });
        if let Some(reservation) = self.reservation.take() {
            // Unknown usage after the upstream answered (a reader that left mid-stream):
            // charge what was reserved rather than nothing.
            let charged = match tokens {
                Some(t) => Some(t),
                None if self.delivered.is_some() && !self.cache_hit => Some(reservation.reserved()),
                None => None,
            };
            reservation.settle(charged);
        }
        let payer = &self.metering.0;
        let Some(sink) = &payer.sink else {
            return;
        };
        sink.record(UsageRecord {
            ts_ms: self.started_at_ms,
            key_id: payer.key_id.clone(),
            route: payer.route,
            alias: self.alias.clone(),
            deployment: self.deployment.clone(),
            tokens_in: self.usage.map_or(0, |u| saturating_i64(u.prompt_tokens)),
            tokens_out: self
                .usage
                .map_or(0, |u| saturating_i64(u.completion_tokens)),
            latency_us: self.started.elapsed().as_micros() as i64,
            ttfb_us: self.delivered.map(|d| d.as_micros() as i64),
            status: i32::from(status),
            cache_hit: self.cache_hit,
            request_id: payer.request_id.clone(),
        });
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // The reader went away before the call ended: 499, as nginx logs it.
        self.settle(499);
    }
}

/// A token count from an upstream, for a signed column: figures beyond `i64::MAX` (only an
/// upstream that lies sends them) are clamped rather than turned negative.
fn saturating_i64(tokens: u64) -> i64 {
    i64::try_from(tokens).unwrap_or(i64::MAX)
}
