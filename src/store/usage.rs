//! The usage log's writer: requests hand their row to a bounded queue and move on; one
//! background task writes rows in batches (when a batch fills or the flush interval
//! passes), keeps retrying while the database is away, and flushes everything on shutdown.
//!
//! Nothing blocks a request: when the queue is full the row is dropped, counted in
//! `switchyard_usage_rows_dropped_total` and `/admin/usage`, and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Store;
use crate::config::UsageConfig;

/// One model request, as the usage log stores it.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    /// When the request started, Unix milliseconds.
    pub ts_ms: i64,
    pub key_id: Option<Arc<str>>,
    pub route: &'static str,
    pub alias: Option<Arc<str>>,
    pub deployment: Option<Arc<str>>,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub latency_us: i64,
    pub ttfb_us: Option<i64>,
    pub status: i32,
    pub cache_hit: bool,
    pub request_id: Arc<str>,
}

/// Counters shared by the sink and the writer.
#[derive(Debug, Default)]
pub struct UsageCounters {
    pub queued: AtomicU64,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    /// Rows lost because the database never came back before shutdown ended.
    pub lost: AtomicU64,
    pub write_errors: AtomicU64,
}

/// The requests' end of the queue. Cheap to clone.
#[derive(Clone, Debug)]
pub struct UsageSink {
    tx: mpsc::Sender<UsageRecord>,
    pub counters: Arc<UsageCounters>,
    capacity: usize,
}

impl UsageSink {
    /// Queues a row without waiting; a full queue drops it, counted.
    pub fn record(&self, row: UsageRecord) {
        match self.tx.try_send(row) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                metrics::counter!("switchyard_usage_rows_dropped_total").increment(1);
                // One line per thousand drops: loud enough to notice, not a log flood.
                if dropped == 1 || dropped.is_multiple_of(1000) {
                    tracing::error!(
                        dropped,
                        "usage log: the writer's queue is full (database too slow or away); \
                         rows are being dropped"
                    );
                }
            }
        }
    }

    /// Rows waiting in the queue.
    pub fn depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }
}

/// Starts the writer on `tasks`; it stops when `cancel` fires, after writing what is queued.
pub fn start(
    store: Store,
    config: &UsageConfig,
    tasks: &TaskTracker,
    cancel: CancellationToken,
) -> UsageSink {
    let (tx, rx) = mpsc::channel(config.queue);
    let counters = Arc::new(UsageCounters::default());
    let writer = Writer {
        store,
        rx,
        counters: counters.clone(),
        batch_rows: config.batch_rows,
        flush_interval: config.flush_interval,
        shutdown_timeout: config.shutdown_flush_timeout,
    };
    tasks.spawn(writer.run(cancel));
    UsageSink {
        tx,
        counters,
        capacity: config.queue,
    }
}

struct Writer {
    store: Store,
    rx: mpsc::Receiver<UsageRecord>,
    counters: Arc<UsageCounters>,
    batch_rows: usize,
    flush_interval: Duration,
    shutdown_timeout: Duration,
}

impl Writer {
    async fn run(mut self, cancel: CancellationToken) {
        let mut batch: Vec<UsageRecord> = Vec::with_capacity(self.batch_rows);
        let mut tick = tokio::time::interval(self.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // recv_many's limit counts rows added, so ask only for the room left.
            let room = self.batch_rows - batch.len();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                received = self.rx.recv_many(&mut batch, room) => {
                    if received == 0 {
                        break;
                    }
                    if batch.len() >= self.batch_rows {
                        self.flush(&mut batch, &cancel, None).await;
                    }
                }
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        self.flush(&mut batch, &cancel, None).await;
                    }
                }
            }
        }
        // Shutdown: the server has stopped, so no more rows arrive once the queue is empty.
        let deadline = Instant::now() + self.shutdown_timeout;
        loop {
            while batch.len() < self.batch_rows {
                match self.rx.try_recv() {
                    Ok(row) => batch.push(row),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            if !self.flush(&mut batch, &cancel, Some(deadline)).await {
                let lost = batch.len() as u64 + self.rx.len() as u64;
                self.counters.lost.fetch_add(lost, Ordering::Relaxed);
                tracing::error!(
                    lost,
                    "usage log: the database did not come back before shutdown; rows lost"
                );
                return;
            }
        }
        tracing::debug!(
            written = self.counters.written.load(Ordering::Relaxed),
            "usage log: flushed"
        );
    }

    /// Writes `batch`, retrying with backoff while the database fails. Before shutdown it
    /// retries until it succeeds (the queue bounds what piles up meanwhile); after, until
    /// `deadline`. Returns whether the batch was written.
    async fn flush(
        &self,
        batch: &mut Vec<UsageRecord>,
        cancel: &CancellationToken,
        deadline: Option<Instant>,
    ) -> bool {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.store.insert_usage(batch).await {
                Ok(()) => {
                    let n = batch.len() as u64;
                    self.counters.written.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!("switchyard_usage_rows_written_total").increment(n);
                    metrics::gauge!("switchyard_usage_queue_depth").set(self.rx.len() as f64);
                    batch.clear();
                    return true;
                }
                Err(e) => {
                    self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = %e, rows = batch.len(), retry_ms = backoff.as_millis() as u64,
                        "usage log: write failed; retrying"
                    );
                    if deadline.is_some_and(|d| Instant::now() + backoff > d) {
                        return false;
                    }
                    if deadline.is_none() {
                        // Before shutdown, a cancel ends the wait so shutdown can take over
                        // with its own deadline.
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = cancel.cancelled() => return false,
                        }
                    } else {
                        tokio::time::sleep(backoff).await;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
