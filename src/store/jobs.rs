//! Background jobs in the store (table `jobs`, migration 0005): the rows any instance's
//! workers claim, and the events of streamed background responses (`job_events`,
//! migration 0006).
//!
//! A claim sets `status = 'running'`, counts an attempt and moves `run_at` to the end of
//! the lease; the worker renews it while it runs. A job whose worker died keeps `running`
//! until its `run_at` passes, and the next claim takes it again. On PostgreSQL claims skip
//! rows another instance is claiming (`FOR UPDATE SKIP LOCKED`); on SQLite one process
//! claims. Every write that ends a job checks its attempt number (the fence): a worker
//! whose claim moved on cannot record a result.
//!
//! Times are Unix milliseconds.

use super::{Pool, Store, StoreError, retrying, timed};

/// Jobs one claim takes at most.
const CLAIM_BATCH: i64 = 32;

/// A job to queue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub owner: &'a str,
    pub payload: &'a str,
    /// A JSON object of the request's options that are not in its body (headers).
    pub options: &'a str,
}

/// A stored job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub kind: String,
    pub owner: String,
    pub payload: String,
    pub options: String,
    pub status: String,
    pub attempts: i64,
    pub run_at: i64,
    pub cancel_requested: i64,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A claimed job and whether its last claim's lease had run out (its worker died).
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: JobRow,
    /// When it became due (its queue wait ends now).
    pub due_at: i64,
    pub expired: bool,
}

/// What a cancel request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// It was queued: cancelled now.
    Cancelled,
    /// It is running: its worker stops it.
    Requested,
    /// It had finished (or there is no such job).
    Finished,
}

/// Job counts by state.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct JobCounts {
    pub queued: i64,
    pub running: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
}

macro_rules! job_columns {
    () => {
        "id, kind, owner, payload, options, status, attempts, run_at, cancel_requested, error, \
         created_at, updated_at"
    };
}

/// A job row with its status before the claim.
#[derive(sqlx::FromRow)]
struct ClaimRow {
    #[sqlx(flatten)]
    job: JobRow,
    was: String,
    due: i64,
}

impl Store {
    /// Claims up to `limit` due jobs (queued ones whose time came, running ones whose lease
    /// ran out), leasing each until `lease_until`; each claim counts an attempt.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn claim_jobs(
        &self,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> Result<Vec<Claimed>, StoreError> {
        let limit = limit.clamp(1, CLAIM_BATCH);
        // The picked rows' status and due time are read before the update rewrites them.
        let rows: Vec<ClaimRow> = retrying("claim_jobs", 3, || async {
            match &self.pool {
                // One claimer per SQLite database: the single instance's. (SQLite's
                // RETURNING cannot name the FROM clause's tables: read, then update.)
                Pool::Sqlite(p) => {
                    let mut tx = p.begin().await?;
                    // The write lock before the read (a reader cannot upgrade once another
                    // connection has written).
                    sqlx::query("UPDATE jobs SET status = status WHERE 1 = 0")
                        .execute(&mut *tx)
                        .await?;
                    let picked: Vec<(String, String, i64)> = sqlx::query_as(
                        "SELECT id, status, run_at FROM jobs \
                         WHERE status IN ('queued', 'running') AND run_at <= $1 \
                         ORDER BY run_at LIMIT $2",
                    )
                    .bind(now)
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await?;
                    let mut rows = Vec::with_capacity(picked.len());
                    for (id, was, due) in picked {
                        let job = sqlx::query_as::<_, JobRow>(concat!(
                            "UPDATE jobs SET status = 'running', run_at = $1, \
                             attempts = attempts + 1, updated_at = $2 WHERE id = $3 RETURNING ",
                            job_columns!()
                        ))
                        .bind(lease_until)
                        .bind(now)
                        .bind(&id)
                        .fetch_one(&mut *tx)
                        .await?;
                        rows.push(ClaimRow { job, was, due });
                    }
                    tx.commit().await?;
                    Ok(rows)
                }
                Pool::Postgres(p) => {
                    sqlx::query_as::<_, ClaimRow>(concat!(
                        "WITH picked AS (SELECT id, status AS was, run_at AS due FROM jobs \
                         WHERE status IN ('queued', 'running') AND run_at <= $2 \
                         ORDER BY run_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
                         UPDATE jobs SET status = 'running', run_at = $1, \
                         attempts = jobs.attempts + 1, updated_at = $2 FROM picked \
                         WHERE jobs.id = picked.id RETURNING ",
                        "jobs.id, jobs.kind, jobs.owner, jobs.payload, jobs.options, \
                         jobs.status, jobs.attempts, jobs.run_at, jobs.cancel_requested, \
                         jobs.error, jobs.created_at, jobs.updated_at, picked.was, picked.due"
                    ))
                    .bind(lease_until)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(p)
                    .await
                }
            }
        })
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Claimed {
                expired: r.was == "running",
                due_at: r.due,
                job: r.job,
            })
            .collect())
    }

    /// Renews a running job's lease (the worker's heartbeat). `None` when the claim is no
    /// longer this attempt's; else whether a cancel was requested.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn renew_job(
        &self,
        id: &str,
        attempt: i64,
        lease_until: i64,
    ) -> Result<Option<bool>, StoreError> {
        let row: Option<(i64,)> = retrying("renew_job", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(
                    "UPDATE jobs SET run_at = $1 \
                     WHERE id = $2 AND status = 'running' AND attempts = $3 \
                     RETURNING cancel_requested",
                )
                .bind(lease_until)
                .bind(id)
                .bind(attempt)
                .fetch_optional(p)
                .await
            })
        })
        .await?;
        Ok(row.map(|(c,)| c != 0))
    }

    /// Ends a running attempt of a background response and rewrites the response row in
    /// the same transaction: the job becomes `status` (`failed`, `cancelled`, or `queued`
    /// again at `run_at` for a retry), the response `response_status` with `body`. False
    /// (nothing written) when the claim is no longer this attempt's.
    ///
    /// # Errors
    /// When the database fails.
    #[allow(clippy::too_many_arguments)]
    pub async fn end_response_job(
        &self,
        id: &str,
        attempt: i64,
        status: &str,
        run_at: i64,
        error: Option<&str>,
        response_status: &str,
        body: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        timed("end_response_job", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let mine = sqlx::query(
                    "UPDATE jobs SET status = $1, run_at = $2, error = $3, updated_at = $4 \
                     WHERE id = $5 AND status = 'running' AND attempts = $6",
                )
                .bind(status)
                .bind(run_at)
                .bind(error)
                .bind(now)
                .bind(id)
                .bind(attempt)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if mine == 0 {
                    return Ok(false);
                }
                sqlx::query("UPDATE responses SET status = $1, body = $2 WHERE id = $3")
                    .bind(response_status)
                    .bind(body)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Puts a running job back in the queue at `run_at` after a failed attempt, if the
    /// claim is still attempt `attempt`.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn requeue_job(
        &self,
        id: &str,
        attempt: i64,
        run_at: i64,
        error: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        retrying("requeue_job", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query(
                    "UPDATE jobs SET status = 'queued', run_at = $1, error = $2, updated_at = $3 \
                     WHERE id = $4 AND status = 'running' AND attempts = $5",
                )
                .bind(run_at)
                .bind(error)
                .bind(now)
                .bind(id)
                .bind(attempt)
                .execute(p)
                .await
                .map(|r| r.rows_affected() == 1)
            })
        })
        .await
    }

    /// Marks a claimed background response `in_progress` (its row's status and body), if
    /// the claim is still attempt `attempt`.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn start_response_job(
        &self,
        id: &str,
        attempt: i64,
        body: &str,
    ) -> Result<bool, StoreError> {
        retrying("start_response_job", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query(
                    "UPDATE responses SET status = 'in_progress', body = $1 WHERE id = $2 \
                     AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = $2 \
                     AND jobs.status = 'running' AND jobs.attempts = $3)",
                )
                .bind(body)
                .bind(id)
                .bind(attempt)
                .execute(p)
                .await
                .map(|r| r.rows_affected() == 1)
            })
        })
        .await
    }

    /// Cancels the owner's background response `id`: a queued one at once (its row then
    /// reads `cancelled_body`), a running one by asking its worker.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn cancel_response_job(
        &self,
        owner: &str,
        id: &str,
        cancelled_body: &str,
        now: i64,
    ) -> Result<Cancel, StoreError> {
        timed("cancel_response_job", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let row: Option<(String,)> = sqlx::query_as(
                    "UPDATE jobs SET \
                     status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, \
                     cancel_requested = 1, updated_at = $1 \
                     WHERE id = $2 AND owner = $3 AND status IN ('queued', 'running') \
                     RETURNING status",
                )
                .bind(now)
                .bind(id)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
                let outcome = match row {
                    Some((status,)) if status == "cancelled" => Cancel::Cancelled,
                    Some(_) => Cancel::Requested,
                    None => Cancel::Finished,
                };
                if outcome == Cancel::Cancelled {
                    sqlx::query(
                        "UPDATE responses SET status = 'cancelled', body = $1 WHERE id = $2",
                    )
                    .bind(cancelled_body)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(outcome)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Jobs by state.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn job_counts(&self) -> Result<JobCounts, StoreError> {
        let rows: Vec<(String, i64)> = retrying("job_counts", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status")
                    .fetch_all(p)
                    .await
            })
        })
        .await?;
        let mut counts = JobCounts::default();
        for (status, n) in rows {
            match status.as_str() {
                "queued" => counts.queued = n,
                "running" => counts.running = n,
                "completed" => counts.completed = n,
                "failed" => counts.failed = n,
                "cancelled" => counts.cancelled = n,
                _ => {}
            }
        }
        Ok(counts)
    }

    /// Removes up to `limit` jobs that finished before `before`, with their events; how
    /// many.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn prune_jobs(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        timed("prune_jobs", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let ids: Vec<(String,)> = sqlx::query_as(
                    "SELECT id FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') \
                     AND updated_at < $1 ORDER BY updated_at LIMIT $2",
                )
                .bind(before)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
                for (id,) in &ids {
                    sqlx::query("DELETE FROM job_events WHERE job_id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("DELETE FROM jobs WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(ids.len() as u64)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// A job's status and options (`None` when there is no such job).
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn job_state(&self, id: &str) -> Result<Option<(String, String)>, StoreError> {
        retrying("job_state", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as("SELECT status, options FROM jobs WHERE id = $1")
                    .bind(id)
                    .fetch_optional(p)
                    .await
            })
        })
        .await
    }

    /// Appends events (`(seq, frame)`) of job `id` if its claim is still attempt
    /// `attempt` (whatever its status: a stream's last events follow its stored result);
    /// false otherwise.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn append_job_events(
        &self,
        id: &str,
        attempt: i64,
        events: &[(i64, String)],
    ) -> Result<bool, StoreError> {
        timed("append_job_events", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                // A write first: on SQLite it takes the write lock before anything is read.
                let mine = sqlx::query(
                    "UPDATE jobs SET updated_at = updated_at WHERE id = $1 AND attempts = $2",
                )
                .bind(id)
                .bind(attempt)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if mine == 0 {
                    return Ok(false);
                }
                for (seq, frame) in events {
                    sqlx::query(
                        "INSERT INTO job_events (job_id, seq, frame) VALUES ($1, $2, $3) \
                         ON CONFLICT (job_id, seq) DO NOTHING",
                    )
                    .bind(id)
                    .bind(seq)
                    .bind(frame)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Events of job `id` after sequence number `after` (from the first with `None`), in
    /// order, at most `limit`.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn job_events(
        &self,
        id: &str,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        retrying("job_events", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(
                    "SELECT seq, frame FROM job_events WHERE job_id = $1 AND seq > $2 \
                     ORDER BY seq LIMIT $3",
                )
                .bind(id)
                .bind(after.unwrap_or(-1))
                .bind(limit)
                .fetch_all(p)
                .await
            })
        })
        .await
    }

    /// The last sequence number job `id` has stored, if any.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn last_job_event(&self, id: &str) -> Result<Option<i64>, StoreError> {
        let row: (Option<i64>,) = retrying("last_job_event", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as("SELECT MAX(seq) FROM job_events WHERE job_id = $1")
                    .bind(id)
                    .fetch_one(p)
                    .await
            })
        })
        .await?;
        Ok(row.0)
    }

    /// Jobs, newest first: of one status, created before `before` (Unix ms), at most
    /// `limit` (the operator's list).
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn list_jobs(
        &self,
        status: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<JobRow>, StoreError> {
        retrying("list_jobs", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as::<_, JobRow>(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE ($1 IS NULL OR status = $1) AND created_at < $2 \
                     ORDER BY created_at DESC, id DESC LIMIT $3"
                ))
                .bind(status)
                .bind(before.unwrap_or(i64::MAX))
                .bind(limit)
                .fetch_all(p)
                .await
            })
        })
        .await
    }

    /// Job `id`, whoever owns it (the operator's read).
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn any_job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        retrying("any_job", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as::<_, JobRow>(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE id = $1"
                ))
                .bind(id)
                .fetch_optional(p)
                .await
            })
        })
        .await
    }

    /// Queues a failed or cancelled background response again, due now, its row reading
    /// `queued_body`; false when it is not failed or cancelled. Its attempts count on (the
    /// fence), so a retried job that fails again is failed at once.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn retry_response_job(
        &self,
        id: &str,
        queued_body: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        timed("retry_response_job", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let n = sqlx::query(
                    "UPDATE jobs SET status = 'queued', run_at = $1, cancel_requested = 0, \
                     error = NULL, updated_at = $1 \
                     WHERE id = $2 AND status IN ('failed', 'cancelled')",
                )
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                sqlx::query("UPDATE responses SET status = 'queued', body = $1 WHERE id = $2")
                    .bind(queued_body)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            })
        })
        .await
        .map_err(StoreError::from)
    }
}
