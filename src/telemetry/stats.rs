//! Live statistics for `/admin/stats` and the dashboard: latency percentiles per route
//! and model over the last 1, 5 and 15 minutes, and a timeline sampled every few seconds.
//!
//! Each finished request records its latency into a per-minute HDR histogram for its
//! (route, model) and into the current timeline interval: a short mutex hold, no
//! allocation once the series exists. Percentiles over a window merge the minute
//! histograms, so they are exact to the histogram's 2 significant digits (1 %). Each
//! minute's histogram is about 27 KB; with 3 digits it was 213 KB, and fifteen minutes of
//! them per series grew the heap by megabytes over the first quarter hour.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Minutes of per-model history kept (the longest window reported).
const MINUTES: u64 = 15;
/// Timeline points kept: one hour at the default 5 s interval.
const TIMELINE_POINTS: usize = 720;
/// Largest latency recorded, in microseconds (one hour); longer ones are clamped.
const MAX_MICROS: u64 = 3_600_000_000;

#[allow(clippy::expect_used)] // constant bounds that hdrhistogram accepts: cannot fail
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 2).expect("valid histogram bounds")
}

struct Minute {
    index: u64,
    latency: Histogram<u64>,
    requests: u64,
    errors: u64,
}

#[derive(Default)]
struct Series {
    minutes: VecDeque<Minute>,
}

struct Interval {
    started: Instant,
    latency: Histogram<u64>,
    requests: u64,
    errors: u64,
}

/// One point of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Unix time in milliseconds at the end of the interval.
    pub t: u64,
    pub rps: f64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub rss_bytes: u64,
    /// Requests waiting in the global admission queue.
    pub queue_depth: u64,
    /// Upstream calls in flight (global admission slots in use).
    pub in_flight: u64,
    pub cache_hit_rate: f64,
}

/// Percentiles of one (route, model) over one window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowStats {
    pub route: String,
    pub model: String,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The live statistics of one app.
pub struct LiveStats {
    born: Instant,
    /// When the last request finished, in milliseconds since `born` (0: none yet).
    last_finished_ms: AtomicU64,
    series: Mutex<HashMap<&'static str, HashMap<String, Series>>>,
    interval: Mutex<Interval>,
    timeline: Mutex<VecDeque<Sample>>,
}

impl std::fmt::Debug for LiveStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStats")
            .field("uptime", &self.born.elapsed())
            .finish_non_exhaustive()
    }
}

impl Default for LiveStats {
    fn default() -> Self {
        LiveStats {
            born: Instant::now(),
            last_finished_ms: AtomicU64::new(0),
            series: Mutex::new(HashMap::new()),
            interval: Mutex::new(Interval {
                started: Instant::now(),
                latency: histogram(),
                requests: 0,
                errors: 0,
            }),
            timeline: Mutex::new(VecDeque::with_capacity(TIMELINE_POINTS)),
        }
    }
}

fn ms(micros: u64) -> f64 {
    (micros as f64 / 1e3 * 1e3).round() / 1e3
}

impl LiveStats {
    /// Whether a request finished within `window` (batch work steps back while they do).
    pub fn active_within(&self, window: Duration) -> bool {
        let last = self.last_finished_ms.load(Ordering::Relaxed);
        last != 0
            && (self.born.elapsed().as_millis() as u64).saturating_sub(last)
                <= window.as_millis() as u64
    }

    /// Records one finished request.
    pub fn record(&self, route: &'static str, model: &str, latency: Duration, error: bool) {
        let now_ms = (self.born.elapsed().as_millis() as u64).max(1);
        self.last_finished_ms.store(now_ms, Ordering::Relaxed);
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        let minute = self.born.elapsed().as_secs() / 60;
        if let Ok(mut series) = self.series.lock() {
            let by_model = series.entry(route).or_default();
            if !by_model.contains_key(model) {
                by_model.insert(model.to_string(), Series::default());
            }
            if let Some(s) = by_model.get_mut(model) {
                if s.minutes.back().is_none_or(|m| m.index != minute) {
                    s.minutes.push_back(Minute {
                        index: minute,
                        latency: histogram(),
                        requests: 0,
                        errors: 0,
                    });
                    while s
                        .minutes
                        .front()
                        .is_some_and(|m| m.index + MINUTES <= minute)
                    {
                        s.minutes.pop_front();
                    }
                }
                if let Some(m) = s.minutes.back_mut() {
                    let _ = m.latency.record(micros);
                    m.requests += 1;
                    m.errors += u64::from(error);
                }
            }
        }
        if let Ok(mut interval) = self.interval.lock() {
            let _ = interval.latency.record(micros);
            interval.requests += 1;
            interval.errors += u64::from(error);
        }
    }

    /// Percentiles per (route, model) over the last `minutes` minutes.
    pub fn window(&self, minutes: u64) -> Vec<WindowStats> {
        let now = self.born.elapsed().as_secs() / 60;
        let mut out = Vec::new();
        let Ok(series) = self.series.lock() else {
            return out;
        };
        for (route, by_model) in series.iter() {
            for (model, s) in by_model {
                let mut merged = histogram();
                let (mut requests, mut errors) = (0, 0);
                for m in s.minutes.iter().filter(|m| m.index + minutes > now) {
                    let _ = merged.add(&m.latency);
                    requests += m.requests;
                    errors += m.errors;
                }
                if requests == 0 {
                    continue;
                }
                out.push(WindowStats {
                    route: route.to_string(),
                    model: model.clone(),
                    requests,
                    errors,
                    error_rate: errors as f64 / requests as f64,
                    p50_ms: ms(merged.value_at_quantile(0.50)),
                    p95_ms: ms(merged.value_at_quantile(0.95)),
                    p99_ms: ms(merged.value_at_quantile(0.99)),
                    max_ms: ms(merged.max()),
                });
            }
        }
        out.sort_by(|a, b| (&a.route, &a.model).cmp(&(&b.route, &b.model)));
        out
    }

    /// Closes the current interval into a timeline point; `gauges` fills in the rest.
    pub fn sample(&self, rss_bytes: u64, queue_depth: u64, in_flight: u64, cache_hit_rate: f64) {
        let Ok(mut interval) = self.interval.lock() else {
            return;
        };
        let secs = interval.started.elapsed().as_secs_f64().max(0.001);
        let latency = &interval.latency;
        let sample = Sample {
            t: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            rps: (interval.requests as f64 / secs * 100.0).round() / 100.0,
            error_rate: if interval.requests == 0 {
                0.0
            } else {
                interval.errors as f64 / interval.requests as f64
            },
            p50_ms: ms(latency.value_at_quantile(0.50)),
            p95_ms: ms(latency.value_at_quantile(0.95)),
            p99_ms: ms(latency.value_at_quantile(0.99)),
            rss_bytes,
            queue_depth,
            in_flight,
            cache_hit_rate,
        };
        *interval = Interval {
            started: Instant::now(),
            latency: histogram(),
            requests: 0,
            errors: 0,
        };
        drop(interval);
        if let Ok(mut timeline) = self.timeline.lock() {
            if timeline.len() == TIMELINE_POINTS {
                timeline.pop_front();
            }
            timeline.push_back(sample);
        }
    }

    pub fn timeline(&self) -> Vec<Sample> {
        self.timeline
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn uptime(&self) -> Duration {
        self.born.elapsed()
    }
}

/// Open file descriptors of this process (Linux), counted from `/proc/self/fd`.
pub fn open_fds() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| dir.count() as u64)
}

/// Starts the sampler that closes a dashboard timeline point every `interval` and drains
/// the Prometheus recorder every [`super::METRICS_UPKEEP`] (its histogram buffers keep
/// every sample until drained, and nothing else drains them unless `/metrics` is
/// scraped). Owned by `tasks`; stops when `cancel` fires.
pub fn spawn_sampler(
    stats: std::sync::Arc<LiveStats>,
    inference: std::sync::Arc<crate::inference::Inference>,
    interval: Duration,
    metrics_on: bool,
    tasks: &tokio_util::task::TaskTracker,
    cancel: tokio_util::sync::CancellationToken,
) {
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut upkeep = tokio::time::interval(super::METRICS_UPKEEP);
        upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let queue = inference.admission().snapshot();
                    let cache = inference.cache().snapshot().await;
                    stats.sample(
                        super::resident_memory_bytes().unwrap_or(0),
                        queue.queued as u64,
                        queue.in_flight as u64,
                        cache.hit_rate,
                    );
                }
                _ = upkeep.tick(), if metrics_on => super::prometheus().run_upkeep(),
                _ = cancel.cancelled() => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_report_percentiles_per_route_and_model() {
        let stats = LiveStats::default();
        for i in 1..=100u64 {
            stats.record("chat", "m", Duration::from_millis(i), i > 95);
        }
        stats.record("embeddings", "e", Duration::from_millis(3), false);
        let w = stats.window(1);
        assert_eq!(w.len(), 2);
        let chat = &w[0];
        assert_eq!((chat.route.as_str(), chat.model.as_str()), ("chat", "m"));
        assert_eq!(chat.requests, 100);
        assert_eq!(chat.errors, 5);
        // Within the histogram's 1 % precision.
        assert!((chat.p50_ms - 50.0).abs() <= 0.5, "{}", chat.p50_ms);
        assert!((chat.p95_ms - 95.0).abs() <= 0.95, "{}", chat.p95_ms);
        assert!((chat.p99_ms - 99.0).abs() <= 0.99, "{}", chat.p99_ms);
        assert!((chat.max_ms - 100.0).abs() <= 1.0);
    }

    #[test]
    fn the_timeline_samples_intervals() {
        let stats = LiveStats::default();
        stats.record("chat", "m", Duration::from_millis(10), false);
        stats.sample(1 << 20, 0, 0, 0.5);
        stats.sample(1 << 20, 0, 0, 0.5);
        let t = stats.timeline();
        assert_eq!(t.len(), 2);
        assert!(t[0].rps > 0.0);
        assert_eq!(t[1].rps, 0.0, "the interval was reset");
    }
}
