//! Telemetry: logging set-up, the Prometheus recorder, and the per-request record that
//! becomes one access-log line and one set of metric samples when the request ends.
//!
//! A [`RequestLog`] travels with the request and, for streams, inside the response body,
//! so a stream is logged when its last byte was sent (or its client went away). It only
//! logs and counts: charging the key and the usage row are the inference layer's meter.

pub mod json_line;
pub mod otlp;
pub mod stats;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};
use crate::wire::Usage;
use stats::LiveStats;

/// Latency buckets in seconds: fine steps below 10 ms where gateway overhead lives, coarse
/// steps up to the ten minutes a slow completion may take.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0,
];

/// How often the Prometheus recorder's histogram buffers are drained into their buckets
/// when nobody scrapes `/metrics` (a scrape drains them too).
pub const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Installs the global tracing subscriber (and, with `otlp_endpoint`, the OpenTelemetry
/// layer). Safe to call more than once (later calls no-op).
///
/// # Errors
/// When the OTLP exporter cannot be built.
pub fn init_logging(config: &LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let otel = match &config.otlp_endpoint {
        Some(endpoint) => Some(
            tracing_opentelemetry::layer()
                .with_tracer(otlp::tracer(endpoint, &config.otlp_service_name)?),
        ),
        None => None,
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(json_line::JsonLine)
                    // The JSON lines show no span, yet the layer would format every
                    // span's fields when it opens (a sixth of a request's instructions):
                    // spans stay for OpenTelemetry, events only for this layer.
                    .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                        meta.is_event()
                    })),
            )
            .try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer()).try_init()
    };
    Ok(())
}

/// The process-wide Prometheus recorder, installed on first use. Several apps in one
/// process (as in tests) share it; metric names are global anyway.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// How a request ended, for logs and the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still running; if dropped in this state the client went away.
    Pending,
    Ok,
    Error(&'static str),
}

/// One request's record; logged and counted exactly once, when dropped.
#[derive(Debug)]
pub struct RequestLog {
    pub request_id: Arc<str>,
    pub route: &'static str,
    pub model: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    pub stream: bool,
    pub status: u16,
    pub usage: Option<Usage>,
    pub outcome: Outcome,
    /// The request body, when `[log] bodies` is on (truncated).
    pub body: Option<String>,
    started: Instant,
    first_byte: Option<Duration>,
    upstream: Option<Duration>,
    stats: Option<Arc<LiveStats>>,
}

/// Longest request body logged with `[log] bodies = true`.
pub const MAX_LOGGED_BODY: usize = 4096;

impl RequestLog {
    pub fn start(route: &'static str, request_id: Arc<str>) -> Self {
        Self::with_stats(route, request_id, None)
    }

    /// A record that also feeds the app's live statistics.
    pub fn with_stats(
        route: &'static str,
        request_id: Arc<str>,
        stats: Option<Arc<LiveStats>>,
    ) -> Self {
        RequestLog {
            body: None,
            stats,
            request_id,
            route,
            model: None,
            provider: None,
            stream: false,
            status: 200,
            usage: None,
            outcome: Outcome::Pending,
            started: Instant::now(),
            first_byte: None,
            upstream: None,
        }
    }

    /// Marks the moment the first response byte was handed to the client.
    pub fn first_byte(&mut self) {
        if self.first_byte.is_none() {
            self.first_byte = Some(self.started.elapsed());
        }
    }

    /// Records how long the upstream took (headers for streams, whole body otherwise).
    pub fn upstream_time(&mut self, took: Duration) {
        self.upstream = Some(took);
    }

    pub fn fail(&mut self, status: u16, kind: &'static str) {
        self.status = status;
        self.outcome = Outcome::Error(kind);
    }

    pub fn succeed(&mut self) {
        if self.outcome == Outcome::Pending {
            self.outcome = Outcome::Ok;
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let outcome = match self.outcome {
            Outcome::Pending => "client_disconnected",
            Outcome::Ok => "ok",
            Outcome::Error(kind) => kind,
        };
        // Label values share the alias's allocation.
        let model: Arc<str> = self.model.clone().unwrap_or_else(|| Arc::from("none"));
        metrics::counter!("switchyard_requests_total",
            "route" => self.route, "model" => model.clone(), "status" => self.status.to_string())
        .increment(1);
        metrics::histogram!(
            "switchyard_request_duration_seconds",
            "route" => self.route, "model" => model.clone()
        )
        .record(elapsed.as_secs_f64());
        if let Some(ttfb) = self.first_byte.filter(|_| self.stream) {
            metrics::histogram!("switchyard_time_to_first_byte_seconds", "model" => model.clone())
                .record(ttfb.as_secs_f64());
        }
        if let Some(upstream) = self.upstream {
            let overhead = self.first_byte.unwrap_or(elapsed).saturating_sub(upstream);
            metrics::histogram!("switchyard_gateway_overhead_seconds", "route" => self.route)
                .record(overhead.as_secs_f64());
        }
        if let Some(usage) = self.usage {
            metrics::counter!("switchyard_tokens_total", "model" => model.clone(), "direction" => "in")
                .increment(usage.prompt_tokens);
            metrics::counter!("switchyard_tokens_total", "model" => model.clone(), "direction" => "out")
                .increment(usage.completion_tokens);
        }
        if let (Some(stats), Some(model)) = (&self.stats, &self.model) {
            let failed = matches!(self.outcome, Outcome::Error(_)) && self.status >= 500;
            stats.record(self.route, model, elapsed, failed);
        }
        let ms = elapsed.as_secs_f64() * 1e3;
        let ttfb_ms = self.first_byte.map(|d| d.as_secs_f64() * 1e3);
        let (tokens_in, tokens_out) = self.usage.map_or((None, None), |u| {
            (Some(u.prompt_tokens), Some(u.completion_tokens))
        });
        let provider = self.provider.as_deref().unwrap_or("");
        if matches!(self.outcome, Outcome::Error(_)) && self.status >= 500 {
            tracing::warn!(
                request_id = %self.request_id, route = self.route, model = %model, provider,
                stream = self.stream, status = self.status, outcome, ms, ttfb_ms,
                "request failed"
            );
        } else {
            tracing::info!(
                request_id = %self.request_id, route = self.route, model = %model, provider,
                stream = self.stream, status = self.status, outcome, ms, ttfb_ms,
                tokens_in, tokens_out, body = self.body.as_deref(), "request"
            );
        }
    }
}

/// This process's resident set size, from `/proc/self/status` (Linux only).
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The allocator's own account of the heap: the binary allocates with jemalloc.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HeapBytes {
    /// Bytes the program holds in live allocations: the figure a leak moves, free of the
    /// page-level noise of RSS (freed pages not yet purged, arenas per thread).
    pub allocated_bytes: u64,
    /// Bytes in physically resident pages the allocator has mapped.
    pub resident_bytes: u64,
}

/// Reads jemalloc's statistics after refreshing them. `None` if the allocator does not
/// answer (a build whose global allocator is not jemalloc reports jemalloc's idle heap).
pub fn heap_bytes() -> Option<HeapBytes> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    Some(HeapBytes {
        allocated_bytes: stats::allocated::read().ok()? as u64,
        resident_bytes: stats::resident::read().ok()? as u64,
    })
}
