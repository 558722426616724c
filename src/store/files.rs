//! Uploaded files and Batch API batches in the store (migration 0007).
//!
//! A file row is written only after its bytes are synced under [`crate::files`]'s
//! directory, so a row always has its bytes. A batch is one job (kind `batch`, same id)
//! plus a row per input line: a line's result and the batch's counts change in one
//! transaction, and a batch whose worker died goes on from the lines still `pending`.
//! The batch's end (its status, its output and error files' rows, its job) is one
//! transaction fenced on the job's attempt. Every read is scoped to the owner (the key id,
//! `''` with auth off). Times are Unix milliseconds.

use super::conversations::Order;
use super::jobs::NewJob;
use super::{Pool, Store, StoreError, retrying, timed};

/// A stored file.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FileRow {
    pub id: String,
    pub owner: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// A stored batch.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchRow {
    pub id: String,
    pub owner: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: String,
    pub metadata: Option<String>,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub errors: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
}

/// One input line as read from the file.
#[derive(Debug, Clone)]
pub struct NewLine {
    pub line: i64,
    pub custom_id: Option<String>,
    /// The request body (valid lines) or the line as sent (refused ones).
    pub request: String,
    /// `None` for a line to run; the error line for one refused at validation.
    pub refused: Option<String>,
}

/// How a batch ends.
#[derive(Debug, Clone)]
pub struct BatchEnd<'a> {
    /// `completed`, `failed`, `expired` or `cancelled`.
    pub status: &'a str,
    pub output: Option<&'a FileRow>,
    pub errors_file: Option<&'a FileRow>,
    /// The batch's `errors.data` (JSON), for a batch that failed as a whole.
    pub errors: Option<&'a str>,
    /// The job's error text, when it did not complete.
    pub job_error: Option<&'a str>,
}

macro_rules! file_columns {
    () => {
        "id, owner, filename, purpose, bytes, sha256, created_at, expires_at"
    };
}

macro_rules! batch_columns {
    () => {
        "id, owner, endpoint, input_file_id, completion_window, status, metadata, total, \
         completed, failed, input_tokens, output_tokens, output_file_id, error_file_id, errors, \
         created_at, expires_at, in_progress_at, finalizing_at, completed_at, failed_at, \
         expired_at, cancelling_at, cancelled_at"
    };
}

/// Inserts a file row inside a transaction.
macro_rules! insert_file {
    ($tx:expr, $row:expr) => {
        sqlx::query(concat!(
            "INSERT INTO files (",
            file_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&$row.id)
        .bind(&$row.owner)
        .bind(&$row.filename)
        .bind(&$row.purpose)
        .bind($row.bytes)
        .bind(&$row.sha256)
        .bind($row.created_at)
        .bind($row.expires_at)
        .execute(&mut *$tx)
        .await?
    };
}

/// The timestamp column a batch status sets (fixed names, never from input).
fn stamp_of(status: &str) -> &'static str {
    match status {
        "in_progress" => "in_progress_at",
        "finalizing" => "finalizing_at",
        "completed" => "completed_at",
        "failed" => "failed_at",
        "expired" => "expired_at",
        "cancelling" => "cancelling_at",
        _ => "cancelled_at",
    }
}

impl Store {
    /// Records an uploaded file whose bytes are in place.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn insert_file(&self, row: &FileRow) -> Result<(), StoreError> {
        retrying("insert_file", 3, || async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                insert_file!(tx, row);
                tx.commit().await
            })
        })
        .await
    }

    /// The owner's file `id`.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn file(&self, owner: &str, id: &str) -> Result<Option<FileRow>, StoreError> {
        retrying("file", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(concat!(
                    "SELECT ",
                    file_columns!(),
                    " FROM files WHERE id = $1 AND owner = $2"
                ))
                .bind(id)
                .bind(owner)
                .fetch_optional(p)
                .await
            })
        })
        .await
    }

    /// The owner's files by creation time, after the file `after` (none when it is not the
    /// owner's), at most `limit`, of `purpose` if given.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn list_files(
        &self,
        owner: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: i64,
        order: Order,
    ) -> Result<Vec<FileRow>, StoreError> {
        let (cmp, dir) = match order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        let sql = format!(
            "SELECT {} FROM files WHERE owner = $1 AND ($2 IS NULL OR purpose = $2) \
             AND ($3 IS NULL OR (created_at, id) {cmp} \
             (SELECT created_at, id FROM files WHERE id = $3 AND owner = $1)) \
             ORDER BY created_at {dir}, id {dir} LIMIT $4",
            file_columns!()
        );
        retrying("list_files", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                    .bind(owner)
                    .bind(purpose)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(p)
                    .await
            })
        })
        .await
    }

    /// Deletes the owner's file row `id`; the deleted row, if there was one.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn delete_file(&self, owner: &str, id: &str) -> Result<Option<FileRow>, StoreError> {
        retrying("delete_file", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(concat!(
                    "DELETE FROM files WHERE id = $1 AND owner = $2 RETURNING ",
                    file_columns!()
                ))
                .bind(id)
                .bind(owner)
                .fetch_optional(p)
                .await
            })
        })
        .await
    }

    /// Deletes up to `limit` file rows whose time ran out by `now`; their ids.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn delete_expired_files(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = retrying("delete_expired_files", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(
                    "DELETE FROM files WHERE id IN (SELECT id FROM files \
                     WHERE expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2) RETURNING id",
                )
                .bind(now)
                .bind(limit)
                .fetch_all(p)
                .await
            })
        })
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Queues a batch: its row (status `validating`) and its job, in one transaction.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn create_batch(&self, row: &BatchRow, job: &NewJob<'_>) -> Result<(), StoreError> {
        timed("create_batch", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                sqlx::query(concat!(
                    "INSERT INTO batches (",
                    batch_columns!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                     $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)"
                ))
                .bind(&row.id)
                .bind(&row.owner)
                .bind(&row.endpoint)
                .bind(&row.input_file_id)
                .bind(&row.completion_window)
                .bind(&row.status)
                .bind(&row.metadata)
                .bind(row.total)
                .bind(row.completed)
                .bind(row.failed)
                .bind(row.input_tokens)
                .bind(row.output_tokens)
                .bind(&row.output_file_id)
                .bind(&row.error_file_id)
                .bind(&row.errors)
                .bind(row.created_at)
                .bind(row.expires_at)
                .bind(row.in_progress_at)
                .bind(row.finalizing_at)
                .bind(row.completed_at)
                .bind(row.failed_at)
                .bind(row.expired_at)
                .bind(row.cancelling_at)
                .bind(row.cancelled_at)
                .execute(&mut *tx)
                .await?;
                insert_job!(tx, job, row.created_at);
                tx.commit().await
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// The owner's batch `id` (any owner's with `None`).
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn batch(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Option<BatchRow>, StoreError> {
        retrying("batch", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(concat!(
                    "SELECT ",
                    batch_columns!(),
                    " FROM batches WHERE id = $1 AND ($2 IS NULL OR owner = $2)"
                ))
                .bind(id)
                .bind(owner)
                .fetch_optional(p)
                .await
            })
        })
        .await
    }

    /// The owner's batches, newest first, after the batch `after`, at most `limit`.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn list_batches(
        &self,
        owner: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<BatchRow>, StoreError> {
        retrying("list_batches", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(concat!(
                    "SELECT ",
                    batch_columns!(),
                    " FROM batches WHERE owner = $1 AND ($2 IS NULL OR (created_at, id) < \
                     (SELECT created_at, id FROM batches WHERE id = $2 AND owner = $1)) \
                     ORDER BY created_at DESC, id DESC LIMIT $3"
                ))
                .bind(owner)
                .bind(after)
                .bind(limit)
                .fetch_all(p)
                .await
            })
        })
        .await
    }

    /// Stores a run of validated lines (again after a restart: lines already stored are
    /// kept as they are).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn insert_batch_lines(
        &self,
        batch_id: &str,
        lines: &[NewLine],
    ) -> Result<(), StoreError> {
        timed("insert_batch_lines", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                for line in lines {
                    let (status, result) = match &line.refused {
                        Some(error) => ("error", Some(error.as_str())),
                        None => ("pending", None),
                    };
                    sqlx::query(
                        "INSERT INTO batch_lines (batch_id, line, custom_id, request, status, \
                         result) VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (batch_id, line) DO NOTHING",
                    )
                    .bind(batch_id)
                    .bind(line.line)
                    .bind(&line.custom_id)
                    .bind(&line.request)
                    .bind(status)
                    .bind(result)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Ends validation: the batch is `in_progress` with `total` lines of which `refused`
    /// have failed already, if its job is still attempt `attempt` and it was not
    /// cancelled meanwhile. Whether it was written.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn start_batch(
        &self,
        id: &str,
        attempt: i64,
        total: i64,
        refused: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        retrying("start_batch", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query(
                    "UPDATE batches SET status = 'in_progress', in_progress_at = $1, total = $2, \
                     failed = $3 WHERE id = $4 AND status = 'validating' \
                     AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = $4 \
                     AND jobs.status = 'running' AND jobs.attempts = $5)",
                )
                .bind(now)
                .bind(total)
                .bind(refused)
                .bind(id)
                .bind(attempt)
                .execute(p)
                .await
                .map(|r| r.rows_affected() == 1)
            })
        })
        .await
    }

    /// Sets a batch's status (and its time) unless it has ended.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn set_batch_status(
        &self,
        id: &str,
        status: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE batches SET status = $1, {} = $2 WHERE id = $3 \
             AND status NOT IN ('completed', 'failed', 'expired', 'cancelled')",
            stamp_of(status)
        );
        retrying("set_batch_status", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                    .bind(status)
                    .bind(now)
                    .bind(id)
                    .execute(p)
                    .await
                    .map(|_| ())
            })
        })
        .await
    }

    /// Up to `limit` lines still to run, after line `after`, in order.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn pending_batch_lines(
        &self,
        batch_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Option<String>, String)>, StoreError> {
        retrying("pending_batch_lines", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(
                    "SELECT line, custom_id, request FROM batch_lines \
                     WHERE batch_id = $1 AND line > $2 AND status = 'pending' \
                     ORDER BY line LIMIT $3",
                )
                .bind(batch_id)
                .bind(after)
                .bind(limit)
                .fetch_all(p)
                .await
            })
        })
        .await
    }

    /// Records a line's result and counts it in its batch, once (a line already done is
    /// left alone).
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn finish_batch_line(
        &self,
        batch_id: &str,
        line: i64,
        ok: bool,
        result: &str,
        tokens: (i64, i64),
    ) -> Result<(), StoreError> {
        let count = if ok { "completed" } else { "failed" };
        let sql = format!(
            "UPDATE batches SET {count} = {count} + 1, input_tokens = input_tokens + $1, \
             output_tokens = output_tokens + $2 WHERE id = $3"
        );
        retrying("finish_batch_line", 3, || async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let done = sqlx::query(
                    "UPDATE batch_lines SET status = $1, result = $2 \
                     WHERE batch_id = $3 AND line = $4 AND status = 'pending'",
                )
                .bind(if ok { "ok" } else { "error" })
                .bind(result)
                .bind(batch_id)
                .bind(line)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if done == 1 {
                    sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                        .bind(tokens.0)
                        .bind(tokens.1)
                        .bind(batch_id)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await
            })
        })
        .await
    }

    /// Up to `limit` results of lines with `status` (`ok` or `error`), after line
    /// `after`, in order: what the output and error files are written from.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn batch_results(
        &self,
        batch_id: &str,
        status: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        retrying("batch_results", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(
                    "SELECT line, COALESCE(result, '') FROM batch_lines \
                     WHERE batch_id = $1 AND line > $2 AND status = $3 ORDER BY line LIMIT $4",
                )
                .bind(batch_id)
                .bind(after)
                .bind(status)
                .bind(limit)
                .fetch_all(p)
                .await
            })
        })
        .await
    }

    /// Ends a batch and its job (attempt `attempt`) in one transaction: the status, the
    /// output and error files' rows, the job's end. False (nothing written) when the
    /// claim is no longer this attempt's.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn end_batch(
        &self,
        id: &str,
        attempt: i64,
        end: &BatchEnd<'_>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let job_status = match end.status {
            "completed" | "expired" => "completed",
            "cancelled" => "cancelled",
            _ => "failed",
        };
        let sql = format!(
            "UPDATE batches SET status = $1, {} = $2, output_file_id = $3, error_file_id = $4, \
             errors = COALESCE($5, errors) WHERE id = $6",
            stamp_of(end.status)
        );
        timed("end_batch", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let mine = sqlx::query(
                    "UPDATE jobs SET status = $1, error = $2, updated_at = $3 \
                     WHERE id = $4 AND status = 'running' AND attempts = $5",
                )
                .bind(job_status)
                .bind(end.job_error)
                .bind(now)
                .bind(id)
                .bind(attempt)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if mine == 0 {
                    return Ok(false);
                }
                for file in [end.output, end.errors_file].into_iter().flatten() {
                    insert_file!(tx, file);
                }
                sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                    .bind(end.status)
                    .bind(now)
                    .bind(end.output.map(|f| f.id.as_str()))
                    .bind(end.errors_file.map(|f| f.id.as_str()))
                    .bind(end.errors)
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

    /// Asks the owner's batch `id` to stop: `cancelling` (its worker writes what is done
    /// and ends it `cancelled`). The batch as it now reads; `None` when there is none.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn cancel_batch(
        &self,
        owner: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<BatchRow>, StoreError> {
        timed("cancel_batch", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let moved = sqlx::query(
                    "UPDATE batches SET status = 'cancelling', cancelling_at = $1 \
                     WHERE id = $2 AND owner = $3 AND status IN ('validating', 'in_progress')",
                )
                .bind(now)
                .bind(id)
                .bind(owner)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if moved == 1 {
                    // A queued job is claimed at once and ends the batch; a running one is
                    // stopped by its heartbeat.
                    sqlx::query(
                        "UPDATE jobs SET cancel_requested = 1, updated_at = $1, \
                         run_at = CASE WHEN status = 'queued' THEN $1 ELSE run_at END \
                         WHERE id = $2 AND status IN ('queued', 'running')",
                    )
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                let row = sqlx::query_as(concat!(
                    "SELECT ",
                    batch_columns!(),
                    " FROM batches WHERE id = $1 AND owner = $2"
                ))
                .bind(id)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(row)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Deletes every file row and batch (with its lines) of an owner; the files' ids (their
    /// bytes are the caller's to remove) and how many batches went.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn delete_owner_files(&self, owner: &str) -> Result<(Vec<String>, u64), StoreError> {
        timed("delete_owner_files", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                sqlx::query(
                    "DELETE FROM batch_lines WHERE batch_id IN \
                     (SELECT id FROM batches WHERE owner = $1)",
                )
                .bind(owner)
                .execute(&mut *tx)
                .await?;
                let batches = sqlx::query("DELETE FROM batches WHERE owner = $1")
                    .bind(owner)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                let files: Vec<(String,)> =
                    sqlx::query_as("DELETE FROM files WHERE owner = $1 RETURNING id")
                        .bind(owner)
                        .fetch_all(&mut *tx)
                        .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>((files.into_iter().map(|(id,)| id).collect(), batches))
            })
        })
        .await
        .map_err(StoreError::from)
    }
}
