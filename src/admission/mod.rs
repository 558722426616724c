//! Admission: what may enter the upstream path, and how long the rest may wait.
//!
//! An [`AdmissionQueue`] is a concurrency limit with a FIFO queue of bounded depth and
//! bounded wait (tokio's semaphore is fair, so waiters are served in arrival order). There
//! is one for the whole service (`[admission] max_concurrent`) and one per provider
//! (`max_concurrent` in its table). Past either bound a request is refused at once with
//! `Retry-After` instead of piling up: overload is answered quickly and honestly. A waiter
//! whose client goes away is dropped from the queue with its future.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The queue was already at `max_queue`.
    QueueFull,
    /// The request waited `max_queue_wait` without getting a slot.
    WaitedTooLong,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::WaitedTooLong => "queue_timeout",
        }
    }
}

/// A concurrency limit with a bounded FIFO queue.
#[derive(Debug)]
pub struct AdmissionQueue {
    name: Arc<str>,
    semaphore: Arc<Semaphore>,
    max_concurrent: usize,
    max_queue: usize,
    max_wait: Duration,
    waiting: AtomicUsize,
    admitted: AtomicU64,
    rejected_full: AtomicU64,
    rejected_wait: AtomicU64,
    /// Total queueing time of admitted requests that had to wait, in microseconds.
    waited_us: AtomicU64,
    queued_admits: AtomicU64,
}

/// How long one request may still wait in admission queues, across all of its attempts
/// (the global queue, then each provider queue it is sent to): a request never waits
/// longer than one `max_queue_wait` in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBudget {
    until: Instant,
}

impl QueueBudget {
    /// A budget of `wait` from now.
    pub fn new(wait: Duration) -> QueueBudget {
        QueueBudget {
            until: Instant::now() + wait,
        }
    }

    /// Time left, zero once spent.
    pub fn left(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }
}

/// A held slot; released on drop.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
}

/// Decrements the waiting count however the wait ends (admitted, timed out, cancelled).
struct Waiting<'a>(&'a AdmissionQueue);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let depth = self.0.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("switchyard_admission_queue_depth", "queue" => self.0.name.to_string())
            .set(depth as f64);
    }
}

/// A serialisable view of a queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueSnapshot {
    pub name: String,
    pub max_concurrent: usize,
    pub in_flight: usize,
    pub queued: usize,
    pub max_queue: usize,
    pub max_queue_wait_ms: u64,
    pub admitted: u64,
    pub rejected_queue_full: u64,
    pub rejected_queue_timeout: u64,
    /// Mean wait of the requests that queued at all.
    pub mean_queue_wait_ms: f64,
}

impl AdmissionQueue {
    pub fn new(name: &str, max_concurrent: usize, max_queue: usize, max_wait: Duration) -> Self {
        AdmissionQueue {
            name: name.into(),
            semaphore: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            max_queue,
            max_wait,
            waiting: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
            rejected_full: AtomicU64::new(0),
            rejected_wait: AtomicU64::new(0),
            waited_us: AtomicU64::new(0),
            queued_admits: AtomicU64::new(0),
        }
    }

    /// Takes a slot, waiting in line if needed.
    ///
    /// # Errors
    /// [`Rejection`] when the queue is full or the wait ran out.
    pub async fn acquire(&self) -> Result<Admitted, Rejection> {
        self.acquire_within(QueueBudget::new(self.max_wait)).await
    }

    /// Takes a slot, waiting in line no longer than this queue's `max_wait` nor what is
    /// left of the request's `budget`.
    ///
    /// # Errors
    /// [`Rejection`] when the queue is full or the wait ran out.
    pub async fn acquire_within(&self, budget: QueueBudget) -> Result<Admitted, Rejection> {
        // No waiters can be skipped here: a fair semaphore hands released permits to
        // waiters first, so a free permit means nobody is queued.
        if let Ok(permit) = self.semaphore.clone().try_acquire_owned() {
            self.admitted.fetch_add(1, Ordering::Relaxed);
            return Ok(Admitted { _permit: permit });
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(self.reject(Rejection::QueueFull));
        }
        let guard = Waiting(self);
        metrics::gauge!("switchyard_admission_queue_depth", "queue" => self.name.to_string())
            .set(self.waiting.load(Ordering::Relaxed) as f64);
        let started = Instant::now();
        let wait = self.max_wait.min(budget.left());
        let acquired = tokio::time::timeout(wait, self.semaphore.clone().acquire_owned()).await;
        drop(guard);
        match acquired {
            Ok(Ok(permit)) => {
                let waited = started.elapsed();
                self.admitted.fetch_add(1, Ordering::Relaxed);
                self.queued_admits.fetch_add(1, Ordering::Relaxed);
                self.waited_us
                    .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
                metrics::histogram!("switchyard_admission_wait_seconds", "queue" => self.name.to_string())
                    .record(waited.as_secs_f64());
                Ok(Admitted { _permit: permit })
            }
            // The semaphore is never closed; treat it like a timeout if it ever is.
            Ok(Err(_)) | Err(_) => Err(self.reject(Rejection::WaitedTooLong)),
        }
    }

    fn reject(&self, why: Rejection) -> Rejection {
        match why {
            Rejection::QueueFull => self.rejected_full.fetch_add(1, Ordering::Relaxed),
            Rejection::WaitedTooLong => self.rejected_wait.fetch_add(1, Ordering::Relaxed),
        };
        metrics::counter!("switchyard_admission_rejected_total",
            "queue" => self.name.to_string(), "reason" => why.as_str())
        .increment(1);
        why
    }

    /// Whether nobody waits and at most `share` of the slots are taken: when work that
    /// may wait (a batch line) should start, so it only takes what others leave.
    pub fn has_headroom(&self, share: f64) -> bool {
        let in_flight = self
            .max_concurrent
            .saturating_sub(self.semaphore.available_permits());
        self.waiting.load(Ordering::Relaxed) == 0
            && (in_flight as f64) < (self.max_concurrent as f64 * share).max(1.0)
    }

    /// The longest a request waits in this queue.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Seconds a refused client should wait: about one queue wait, at least a second.
    pub fn retry_after_secs(&self) -> u64 {
        self.max_wait.as_secs().max(1)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        let queued_admits = self.queued_admits.load(Ordering::Relaxed);
        QueueSnapshot {
            name: self.name.to_string(),
            max_concurrent: self.max_concurrent,
            in_flight: self.max_concurrent - self.semaphore.available_permits(),
            queued: self.waiting.load(Ordering::Relaxed),
            max_queue: self.max_queue,
            max_queue_wait_ms: self.max_wait.as_millis() as u64,
            admitted: self.admitted.load(Ordering::Relaxed),
            rejected_queue_full: self.rejected_full.load(Ordering::Relaxed),
            rejected_queue_timeout: self.rejected_wait.load(Ordering::Relaxed),
            mean_queue_wait_ms: if queued_admits == 0 {
                0.0
            } else {
                self.waited_us.load(Ordering::Relaxed) as f64 / queued_admits as f64 / 1e3
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_rejects_at_once_and_waiters_are_fifo() {
        let q = Arc::new(AdmissionQueue::new("t", 1, 2, Duration::from_secs(5)));
        let held = q.acquire().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let mut waiters = Vec::new();
        for i in 0..2 {
            let (queue, tx) = (q.clone(), tx.clone());
            waiters.push(tokio::spawn(async move {
                let slot = queue.acquire().await.unwrap();
                tx.send(i).await.unwrap();
                drop(slot);
            }));
            // Let waiter i enqueue before i+1.
            while q.snapshot().queued < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(q.acquire().await.unwrap_err(), Rejection::QueueFull);
        drop(held);
        assert_eq!(rx.recv().await, Some(0));
        assert_eq!(rx.recv().await, Some(1));
        for w in waiters {
            w.await.unwrap();
        }
        let s = q.snapshot();
        assert_eq!(
            (s.admitted, s.rejected_queue_full, s.queued, s.in_flight),
            (3, 1, 0, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_wait_is_refused_and_a_cancelled_waiter_leaves_the_queue() {
        let q = Arc::new(AdmissionQueue::new("t", 1, 8, Duration::from_millis(100)));
        let _held = q.acquire().await.unwrap();
        assert_eq!(q.acquire().await.unwrap_err(), Rejection::WaitedTooLong);
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.acquire().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(q.snapshot().queued, 0);
    }
}
