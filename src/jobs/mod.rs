//! Background jobs: the workers that run the store's job rows, on every instance.
//!
//! The engine is a table of our own ([`crate::store::jobs`]) rather than a job crate: it
//! needs what the memory pipeline already proved on both stores (a claim with a lease,
//! `FOR UPDATE SKIP LOCKED` on PostgreSQL, a fence on the attempt number that makes a
//! result land once) plus a cancel flag and a result written in the same transaction as
//! the response it belongs to, which a generic queue's own tables cannot share.
//!
//! A loop claims due jobs up to the free worker slots (woken at once by a job queued here,
//! else every [`POLL`]); each runs in a `JoinSet` with a heartbeat every second that renews
//! its lease and reads its cancel flag, so a cancel made on any instance stops it within a
//! second (one made here, at once). A job that fails for a reason that may pass is queued
//! again with backoff until `max_attempts`; one whose worker dies is claimed again when its
//! lease runs out. At shutdown the loop stops claiming, lets running jobs finish within the
//! grace period, and leaves the rest to be claimed again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batches::BATCH_JOB;
use crate::config::JobsConfig;
use crate::conversations::background::{RESPONSE_JOB, SUPERSEDED, ended};
use crate::error::GatewayError;
use crate::memory::now_ms;
use crate::state::AppState;
use crate::store::jobs::{Claimed, JobRow};
use crate::wire::responses::new_id;

/// How often the loop looks for due jobs when nothing woke it.
pub const POLL: Duration = Duration::from_millis(500);
/// How often a running job renews its lease and reads its cancel flag.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Finished jobs removed per pass.
const PRUNE_BATCH: i64 = 1_000;

/// The job engine's handle: wakes the claim loop, cancels local jobs, keeps the figures.
pub struct Jobs {
    config: JobsConfig,
    wake: Notify,
    /// Jobs running here, by id: a cancel made here stops them without waiting for the
    /// heartbeat.
    running: Mutex<HashMap<String, CancellationToken>>,
    pub figures: Figures,
}

/// Counts since start, for `/admin/stats`.
#[derive(Debug, Default)]
pub struct Figures {
    pub claimed: AtomicU64,
    /// Time from due to claimed, summed (microseconds; with `claimed`, the mean).
    pub claim_wait_us: AtomicU64,
    /// Time from due to claimed, for its percentiles.
    pub claim_wait: ClaimWaits,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    pub retried: AtomicU64,
    /// Claims of jobs whose worker stopped renewing its lease.
    pub expired: AtomicU64,
}

/// Claim waits since start in milliseconds (1 ms to a day, 2 significant digits: a
/// fixed 10 KB whatever the count).
#[derive(Debug)]
pub struct ClaimWaits(Mutex<hdrhistogram::Histogram<u64>>);

impl Default for ClaimWaits {
    #[allow(clippy::expect_used)] // constant bounds that hdrhistogram accepts: cannot fail
    fn default() -> Self {
        ClaimWaits(Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 86_400_000, 2)
                .expect("valid histogram bounds"),
        ))
    }
}

impl ClaimWaits {
    fn record(&self, ms: i64) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(u64::try_from(ms).unwrap_or(0));
    }

    /// P50, P99 and the largest, in milliseconds.
    fn percentiles(&self) -> serde_json::Value {
        let h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "p50": h.value_at_quantile(0.5),
            "p99": h.value_at_quantile(0.99),
            "max": h.max(),
        })
    }
}

/// How an attempt ended.
enum Outcome {
    Completed,
    Cancelled,
    /// Another worker's claim took the job: nothing to record.
    Superseded,
    Failed(GatewayError),
}

impl Jobs {
    pub fn new(config: JobsConfig) -> Arc<Jobs> {
        Arc::new(Jobs {
            config,
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            figures: Figures::default(),
        })
    }

    /// A job was queued here: claim it without waiting for the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Stops job `id` if it runs here; whether it did.
    pub fn cancel_local(&self, id: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.get(id).map(CancellationToken::cancel).is_some()
    }

    /// Figures for `/admin/stats` and the dashboard: jobs by state (`null` while the store
    /// is away) and outcomes since start.
    pub async fn snapshot(&self, store: &crate::store::Store) -> serde_json::Value {
        let f = &self.figures;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let claimed = get(&f.claimed);
        serde_json::json!({
            "jobs": store.job_counts().await.ok(),
            "workers": self.config.workers,
            "claimed": claimed,
            "mean_claim_wait_ms": if claimed == 0 {
                0.0
            } else {
                get(&f.claim_wait_us) as f64 / claimed as f64 / 1000.0
            },
            "claim_wait_ms": f.claim_wait.percentiles(),
            "completed": get(&f.completed),
            "failed": get(&f.failed),
            "cancelled": get(&f.cancelled),
            "retried": get(&f.retried),
            "lease_expired": get(&f.expired),
        })
    }
}

/// Starts the claim loop; it ends with `cancel` (see the module's shutdown notes).
pub fn start(state: Arc<AppState>, cancel: CancellationToken) {
    state.lifecycle.tasks.clone().spawn(run(state, cancel));
}

async fn run(state: Arc<AppState>, cancel: CancellationToken) {
    let jobs = state.jobs.clone();
    let config = jobs.config.clone();
    let mut running: JoinSet<()> = JoinSet::new();
    let mut last_prune = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = jobs.wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
        while running.try_join_next().is_some() {}
        let free = config.workers.saturating_sub(running.len());
        if free > 0 {
            let now = now_ms();
            let lease = i64::try_from(config.lease.as_millis()).unwrap_or(30_000);
            match state
                .store
                .claim_jobs(now, now + lease, i64::try_from(free).unwrap_or(1))
                .await
            {
                Ok(claimed) => {
                    for job in claimed {
                        running.spawn(run_job(state.clone(), job));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "jobs: claiming failed"),
            }
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            last_prune = Instant::now();
            let before = now_ms() - i64::try_from(config.retention.as_millis()).unwrap_or(0);
            if let Err(e) = state.store.prune_jobs(before, PRUNE_BATCH).await {
                tracing::warn!(error = %e, "jobs: pruning failed");
            }
            // Files uploaded with `expires_after` whose time ran out: rows, then bytes.
            match state
                .store
                .delete_expired_files(now_ms(), PRUNE_BATCH)
                .await
            {
                Ok(ids) => {
                    for id in ids {
                        state.files.remove(&id).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "jobs: removing expired files failed"),
            }
        }
    }
    // Running jobs may finish within the grace period; the rest keep their claim until
    // the lease runs out, and then any instance runs them again.
    let grace = state.settings.server.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = running.len(),
            "jobs: shutdown grace over; the rest run again elsewhere"
        );
        running.shutdown().await;
    }
}

/// Runs one claimed job with its heartbeat, then records how it ended.
async fn run_job(state: Arc<AppState>, claimed: Claimed) {
    let jobs = state.jobs.clone();
    let job = claimed.job;
    let waited = (now_ms() - claimed.due_at).max(0);
    jobs.figures.claimed.fetch_add(1, Ordering::Relaxed);
    jobs.figures
        .claim_wait_us
        .fetch_add(u64::try_from(waited).unwrap_or(0) * 1000, Ordering::Relaxed);
    jobs.figures.claim_wait.record(waited);
    metrics::histogram!("switchyard_job_claim_wait_seconds", "kind" => job.kind.clone())
        .record(waited as f64 / 1000.0);
    if claimed.expired {
        jobs.figures.expired.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("switchyard_job_lease_expiries_total", "kind" => job.kind.clone())
            .increment(1);
    }
    if claimed.expired && job.attempts > i64::from(jobs.config.max_attempts) {
        // Its workers keep dying with it: do not take the instance down again.
        let error = GatewayError::Internal(format!(
            "the job's worker stopped {} times without finishing it",
            job.attempts - 1
        ));
        record(&state, &job, Outcome::Failed(error)).await;
        return;
    }
    let token = CancellationToken::new();
    if job.cancel_requested != 0 {
        token.cancel();
    }
    jobs.running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(job.id.clone(), token.clone());
    let started = Instant::now();
    let outcome = attempt(&state, &job, &token).await;
    jobs.running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&job.id);
    metrics::histogram!("switchyard_job_run_seconds", "kind" => job.kind.clone())
        .record(started.elapsed().as_secs_f64());
    record(&state, &job, outcome).await;
}

/// The job's work raced against its heartbeat and its cancel token.
///
/// The heartbeat is a future of its own, polled alongside the work: a renewal waiting for
/// the database must never stop the work from being polled, or work holding a write
/// transaction (SQLite has one writer) and the renewal waiting for it would wait on each
/// other until the busy timeout.
async fn attempt(state: &Arc<AppState>, job: &JobRow, token: &CancellationToken) -> Outcome {
    let lease = i64::try_from(state.jobs.config.lease.as_millis()).unwrap_or(30_000);
    let heartbeat = async {
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.tick().await;
        loop {
            beat.tick().await;
            match state
                .store
                .renew_job(&job.id, job.attempts, now_ms() + lease)
                .await
            {
                Ok(Some(false)) => {}
                Ok(Some(true)) => return Outcome::Cancelled,
                Ok(None) => return Outcome::Superseded,
                Err(e) => tracing::debug!(error = %e, "jobs: lease renewal failed"),
            }
        }
    };
    tokio::select! {
        result = work(state, job) => match result {
            Ok(()) => Outcome::Completed,
            Err(GatewayError::Internal(m)) if m == SUPERSEDED => Outcome::Superseded,
            Err(e) => Outcome::Failed(e),
        },
        outcome = heartbeat => outcome,
        // Dropping the work cancels its upstream call.
        () = token.cancelled() => Outcome::Cancelled,
    }
}

/// What a job of each kind does, under its owner's key.
async fn work(state: &Arc<AppState>, job: &JobRow) -> Result<(), GatewayError> {
    let principal = if job.owner.is_empty() {
        None
    } else {
        match state.auth.principal_of_key(&job.owner).await {
            Ok(Some(p)) => Some(p),
            Ok(None) => {
                return Err(GatewayError::Unauthorized(
                    "The API key that created this job was revoked.".into(),
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "jobs: reading the owner's key failed");
                return Err(GatewayError::DependencyUnavailable("The key store"));
            }
        }
    };
    let route = if job.kind == BATCH_JOB {
        "batch"
    } else {
        "responses"
    };
    let ctx = state.inference.context(
        route,
        std::sync::Arc::from(new_id("req").as_str()),
        principal,
    );
    match job.kind.as_str() {
        RESPONSE_JOB => state.conversations.run_background(&ctx, job).await,
        BATCH_JOB => crate::batches::run(state, &ctx, job).await,
        other => Err(GatewayError::Internal(format!(
            "unknown job kind {other:?}"
        ))),
    }
}

/// Records how a batch's attempt ended: a batch that stopped is written out and ended
/// (cancelled, or failed for good); one that may succeed later is queued again.
async fn record_batch(state: &Arc<AppState>, job: &JobRow, outcome: Outcome) {
    let figures = &state.jobs.figures;
    let (counter, label) = match outcome {
        Outcome::Completed => (&figures.completed, "completed"),
        Outcome::Superseded => return,
        Outcome::Cancelled => {
            crate::batches::end_early(state, job, "cancelled", None).await;
            (&figures.cancelled, "cancelled")
        }
        Outcome::Failed(e) => {
            let message = e.to_string();
            if retryable(&e) && job.attempts < i64::from(state.jobs.config.max_attempts) {
                let wait = backoff_secs(job.attempts);
                tracing::warn!(job = %job.id, attempt = job.attempts, error = %message,
                    "jobs: batch attempt failed; retrying");
                let now = now_ms();
                if let Err(e) = state
                    .store
                    .requeue_job(&job.id, job.attempts, now + wait * 1000, &message, now)
                    .await
                {
                    tracing::warn!(error = %e, "jobs: queueing a batch again failed");
                }
                (&figures.retried, "retried")
            } else {
                tracing::warn!(job = %job.id, error = %message, "jobs: batch failed");
                crate::batches::end_early(state, job, "failed", Some(&message)).await;
                (&figures.failed, "failed")
            }
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("switchyard_jobs_total", "kind" => job.kind.clone(), "outcome" => label)
        .increment(1);
}

/// Records an attempt's end: the response row and the job in one transaction (a completed
/// one was recorded with its result).
async fn record(state: &Arc<AppState>, job: &JobRow, outcome: Outcome) {
    if job.kind == BATCH_JOB {
        return record_batch(state, job, outcome).await;
    }
    let figures = &state.jobs.figures;
    let now = now_ms();
    let (status, run_at, error, response_status) = match &outcome {
        Outcome::Completed => {
            figures.completed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("switchyard_jobs_total", "kind" => job.kind.clone(), "outcome" => "completed").increment(1);
            return;
        }
        Outcome::Superseded => return,
        Outcome::Cancelled => ("cancelled", now, None, "cancelled"),
        Outcome::Failed(e) => {
            let retry = retryable(e) && job.attempts < i64::from(state.jobs.config.max_attempts);
            let message = e.to_string();
            if retry {
                let wait = backoff_secs(job.attempts);
                tracing::warn!(job = %job.id, attempt = job.attempts, error = %message,
                    "jobs: attempt failed; retrying");
                ("queued", now + wait * 1000, Some(message), "queued")
            } else {
                tracing::warn!(job = %job.id, attempt = job.attempts, error = %message,
                    "jobs: failed");
                ("failed", now, Some(message), "failed")
            }
        }
    };
    let stored = match state
        .conversations
        .store()
        .response(owner_of(job), &job.id)
        .await
    {
        Ok(Some(row)) => row.body,
        Ok(None) => String::new(),
        Err(e) => {
            tracing::warn!(error = %e, "jobs: reading the response to record failed");
            return;
        }
    };
    let body = ended(&stored, response_status, error.as_deref());
    match state
        .store
        .end_response_job(
            &job.id,
            job.attempts,
            status,
            run_at,
            error.as_deref(),
            response_status,
            &body,
            now,
        )
        .await
    {
        Ok(true) => {
            if status == "failed" {
                state
                    .conversations
                    .close_failed_stream(job, &body, error.as_deref().unwrap_or("failed"))
                    .await;
            }
            let (counter, label) = match status {
                "queued" => (&figures.retried, "retried"),
                "cancelled" => (&figures.cancelled, "cancelled"),
                _ => (&figures.failed, "failed"),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("switchyard_jobs_total", "kind" => job.kind.clone(), "outcome" => label).increment(1);
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "jobs: recording an attempt failed"),
    }
}

fn owner_of(job: &JobRow) -> Option<&str> {
    (!job.owner.is_empty()).then_some(job.owner.as_str())
}

/// Seconds before attempt `attempts + 1` of a job that failed: 2, 4, 8… at most a minute.
fn backoff_secs(attempts: i64) -> i64 {
    2i64.saturating_pow(u32::try_from(attempts).unwrap_or(6))
        .min(60)
}

/// Whether another attempt could succeed.
fn retryable(e: &GatewayError) -> bool {
    e.is_retryable()
        || matches!(
            e,
            GatewayError::KeyRateLimited { .. }
                | GatewayError::ServiceOverloaded { .. }
                | GatewayError::DependencyUnavailable(_)
                | GatewayError::RequestTimeout(_)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_wait_percentiles() {
        let waits = ClaimWaits::default();
        for ms in 1..=100 {
            waits.record(ms);
        }
        waits.record(-5); // a clock step back counts as no wait
        let p = waits.percentiles();
        assert_eq!(p["p50"], 50);
        assert_eq!(p["p99"], 99);
        assert_eq!(p["max"], 100);
    }
}
