//! Long-term memory in the store (tables from migration 0003): a subject's memories, the
//! history of every change, and the extraction jobs that produce them.
//!
//! Every write to a subject's memories first bumps its `memory_subjects` row in the same
//! transaction: the row lock serialises the subject's writers on PostgreSQL, and its
//! version tells the in-memory search index (`crate::memory::index`) whether it is current.
//!
//! Jobs are rows. A claim sets `status = 'running'` and moves `run_at` to the end of the
//! lease; a worker that dies leaves a running job whose `run_at` passes, and the next claim
//! takes it again. On PostgreSQL claims skip rows another instance has locked (`FOR UPDATE
//! SKIP LOCKED`); on SQLite one process claims. A job's changes and its completion commit in
//! one transaction that also checks the claim is still the worker's (its attempt number):
//! a job is applied once even when its lease ran out under a slow worker.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{Pool, Store, StoreError, retrying, timed};

/// Jobs one claim takes at most.
const CLAIM_BATCH: i64 = 16;

/// A stored memory.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemoryRow {
    pub seq: i64,
    pub id: String,
    pub subject: String,
    pub memory: String,
    /// A JSON object.
    pub metadata: String,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// The memory's vector (little-endian `f32`s), read only for the search index; empty
    /// when the embeddings model could not embed it.
    #[sqlx(default)]
    pub embedding: Option<Vec<u8>>,
}

/// A memory waiting for its vector.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unembedded {
    pub seq: i64,
    pub id: String,
    pub owner: String,
    pub subject: String,
    pub memory: String,
}

/// A memory to add.
#[derive(Debug, Clone)]
pub struct NewMemory {
    pub id: String,
    pub memory: String,
    pub metadata: String,
}

/// One change of an extraction job's result.
#[derive(Debug, Clone)]
pub enum Change {
    Add(NewMemory),
    Update { id: String, memory: String },
    Delete { id: String },
}

/// One row of a memory's history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HistoryRow {
    pub seq: i64,
    pub memory_id: String,
    pub event: String,
    pub old_memory: Option<String>,
    pub new_memory: Option<String>,
    pub job_id: Option<String>,
    pub created_at: i64,
}

/// An extraction job to queue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub subject: &'a str,
    /// Jobs of one conversation are debounced: new messages join its queued job.
    pub conversation_id: Option<&'a str>,
    /// The messages, each a JSON `{role, content}` object.
    pub messages: &'a [String],
    pub user_messages: i64,
    pub metadata: &'a str,
    /// The alias whose turn produced the messages (for the usage log).
    pub alias: Option<&'a str>,
}

/// A stored extraction job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub owner: String,
    pub subject: String,
    pub conversation_id: Option<String>,
    /// A JSON array of `{role, content}` objects.
    pub messages: String,
    pub user_messages: i64,
    pub metadata: String,
    pub alias: Option<String>,
    pub status: String,
    pub attempts: i64,
    pub run_at: i64,
    pub error: Option<String>,
    pub result: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What queueing did with a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    /// A new job row.
    New(String),
    /// Merged into the conversation's queued job, whose id this is.
    Joined(String),
    /// Refused: the queue is at its bound.
    Full,
}

/// Counts of jobs by state, for metrics and the dashboard.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct JobCounts {
    pub queued: i64,
    pub running: i64,
    pub failed: i64,
    pub completed: i64,
}

macro_rules! memory_columns {
    () => {
        "seq, id, subject, memory, metadata, created_at, updated_at"
    };
}

macro_rules! job_columns {
    () => {
        "id, owner, subject, conversation_id, messages, user_messages, metadata, alias, status, \
         attempts, run_at, error, result, created_at, updated_at"
    };
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Bumps a subject's version (creating its row), taking its row lock.
macro_rules! bump_subject {
    ($tx:expr, $owner:expr, $subject:expr) => {
        sqlx::query(
            "INSERT INTO memory_subjects (owner, subject, version) VALUES ($1, $2, 1) \
             ON CONFLICT (owner, subject) DO UPDATE SET version = memory_subjects.version + 1",
        )
        .bind($owner)
        .bind($subject)
        .execute(&mut *$tx)
        .await?
    };
}

/// Inserts one history row.
macro_rules! history {
    ($tx:expr, $owner:expr, $id:expr, $event:expr, $old:expr, $new:expr, $job:expr, $at:expr) => {
        sqlx::query(
            "INSERT INTO memory_history (memory_id, owner, event, old_memory, new_memory, \
             job_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind($id)
        .bind($owner)
        .bind($event)
        .bind($old)
        .bind($new)
        .bind($job)
        .bind($at)
        .execute(&mut *$tx)
        .await?
    };
}

impl Store {
    /// Adds memories to a subject, each with an `ADD` history row, in one transaction.
    ///
    /// # Errors
    /// When the database fails, or an id is already taken.
    pub async fn add_memories(
        &self,
        owner: &str,
        subject: &str,
        memories: &[NewMemory],
    ) -> Result<Vec<MemoryRow>, StoreError> {
        let changes: Vec<Change> = memories.iter().cloned().map(Change::Add).collect();
        let (rows, _) = self
            .apply_memory_changes(owner, subject, &changes, None)
            .await?;
        Ok(rows)
    }

    /// Applies changes to a subject's memories in one transaction, a history row each. An
    /// update or delete of an id that is not the subject's is skipped. With `job` = (id,
    /// attempt), the job is completed in the same transaction, and nothing is applied
    /// unless the job is still running under that attempt (its claim is this caller's).
    /// Returns the added or updated rows and whether the changes were applied.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn apply_memory_changes(
        &self,
        owner: &str,
        subject: &str,
        changes: &[Change],
        job: Option<(&str, i64, &str)>,
    ) -> Result<(Vec<MemoryRow>, bool), StoreError> {
        let now = now_secs();
        timed("apply_memory_changes", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                if let Some((job_id, attempt, result)) = job {
                    let done = sqlx::query(
                        "UPDATE memory_jobs SET status = 'completed', result = $1, \
                         updated_at = $2, error = NULL \
                         WHERE id = $3 AND status = 'running' AND attempts = $4",
                    )
                    .bind(result)
                    .bind(now)
                    .bind(job_id)
                    .bind(attempt)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if done == 0 {
                        return Ok((Vec::new(), false));
                    }
                }
                let job_id = job.map(|(id, _, _)| id);
                // A job that changed nothing leaves the subject's version (and so every
                // instance's index of it) alone.
                if !changes.is_empty() {
                    bump_subject!(tx, owner, subject);
                }
                let mut rows = Vec::new();
                for change in changes {
                    match change {
                        Change::Add(m) => {
                            let row = sqlx::query_as::<_, MemoryRow>(concat!(
                                "INSERT INTO memories (id, owner, subject, memory, metadata, \
                                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) \
                                 RETURNING ",
                                memory_columns!()
                            ))
                            .bind(&m.id)
                            .bind(owner)
                            .bind(subject)
                            .bind(&m.memory)
                            .bind(&m.metadata)
                            .bind(now)
                            .fetch_one(&mut *tx)
                            .await?;
                            history!(
                                tx,
                                owner,
                                &m.id,
                                "ADD",
                                None::<&str>,
                                Some(&m.memory),
                                job_id,
                                now
                            );
                            rows.push(row);
                        }
                        Change::Update { id, memory } => {
                            let old: Option<(String,)> = sqlx::query_as(
                                "SELECT memory FROM memories \
                                 WHERE id = $1 AND owner = $2 AND subject = $3",
                            )
                            .bind(id)
                            .bind(owner)
                            .bind(subject)
                            .fetch_optional(&mut *tx)
                            .await?;
                            let Some((old,)) = old else { continue };
                            let row = sqlx::query_as::<_, MemoryRow>(concat!(
                                "UPDATE memories SET memory = $1, updated_at = $2, \
                                 embedding = NULL, embedding_model = NULL \
                                 WHERE id = $3 RETURNING ",
                                memory_columns!()
                            ))
                            .bind(memory)
                            .bind(now)
                            .bind(id)
                            .fetch_one(&mut *tx)
                            .await?;
                            history!(
                                tx,
                                owner,
                                id,
                                "UPDATE",
                                Some(&old),
                                Some(memory),
                                job_id,
                                now
                            );
                            rows.push(row);
                        }
                        Change::Delete { id } => {
                            let old: Option<(String,)> = sqlx::query_as(
                                "DELETE FROM memories \
                                 WHERE id = $1 AND owner = $2 AND subject = $3 RETURNING memory",
                            )
                            .bind(id)
                            .bind(owner)
                            .bind(subject)
                            .fetch_optional(&mut *tx)
                            .await?;
                            if let Some((old,)) = old {
                                history!(
                                    tx,
                                    owner,
                                    id,
                                    "DELETE",
                                    Some(&old),
                                    None::<&str>,
                                    job_id,
                                    now
                                );
                            }
                        }
                    }
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>((rows, true))
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// The owner's memory `id`.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn memory(&self, owner: &str, id: &str) -> Result<Option<MemoryRow>, StoreError> {
        retrying("memory", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as::<_, MemoryRow>(concat!(
                    "SELECT ",
                    memory_columns!(),
                    " FROM memories WHERE id = $1 AND owner = $2"
                ))
                .bind(id)
                .bind(owner)
                .fetch_optional(p)
                .await
            })
        })
        .await
    }

    /// Rewrites one memory's text (an `UPDATE` history row). `None` when the owner has no
    /// such memory.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn update_memory(
        &self,
        owner: &str,
        id: &str,
        memory: &str,
    ) -> Result<Option<MemoryRow>, StoreError> {
        let Some(row) = self.memory(owner, id).await? else {
            return Ok(None);
        };
        let change = Change::Update {
            id: id.to_owned(),
            memory: memory.to_owned(),
        };
        let (rows, _) = self
            .apply_memory_changes(owner, &row.subject, &[change], None)
            .await?;
        Ok(rows.into_iter().next())
    }

    /// Deletes one memory (a `DELETE` history row); the subject it belonged to, or
    /// `None` when the owner had no such memory.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn delete_memory(&self, owner: &str, id: &str) -> Result<Option<String>, StoreError> {
        let Some(row) = self.memory(owner, id).await? else {
            return Ok(None);
        };
        let change = Change::Delete { id: id.to_owned() };
        self.apply_memory_changes(owner, &row.subject, &[change], None)
            .await?;
        Ok(Some(row.subject))
    }

    /// Deletes every memory of a subject (a history row each); how many there were.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn delete_subject_memories(
        &self,
        owner: &str,
        subject: &str,
    ) -> Result<u64, StoreError> {
        let now = now_secs();
        timed("delete_subject_memories", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                bump_subject!(tx, owner, subject);
                sqlx::query(
                    "INSERT INTO memory_history (memory_id, owner, event, old_memory, \
                     new_memory, job_id, created_at) \
                     SELECT id, owner, 'DELETE', memory, NULL, NULL, $1 FROM memories \
                     WHERE owner = $2 AND subject = $3",
                )
                .bind(now)
                .bind(owner)
                .bind(subject)
                .execute(&mut *tx)
                .await?;
                let deleted = sqlx::query("DELETE FROM memories WHERE owner = $1 AND subject = $2")
                    .bind(owner)
                    .bind(subject)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok::<_, sqlx::Error>(deleted)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Deletes an owner's memories, their history, subjects and jobs, in one transaction;
    /// how many memories there were.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn delete_owner_memories(&self, owner: &str) -> Result<u64, StoreError> {
        timed("delete_owner_memories", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let n = sqlx::query("DELETE FROM memories WHERE owner = $1")
                    .bind(owner)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                for sql in [
                    "DELETE FROM memory_history WHERE owner = $1",
                    "DELETE FROM memory_subjects WHERE owner = $1",
                    "DELETE FROM memory_jobs WHERE owner = $1",
                ] {
                    sqlx::query(sql).bind(owner).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(n)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// A page of a subject's memories (or all the owner's with `subject` = `None`), newest
    /// first; `after` is a memory id of the previous page. Also returns whether more follow.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn list_memories(
        &self,
        owner: &str,
        subject: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<MemoryRow>, bool), StoreError> {
        let after_seq = match after {
            Some(id) => match self.memory(owner, id).await? {
                Some(row) => row.seq,
                None => return Ok((Vec::new(), false)),
            },
            None => i64::MAX,
        };
        let fetch = i64::from(limit) + 1;
        let mut rows = retrying("list_memories", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as::<_, MemoryRow>(concat!(
                    "SELECT ",
                    memory_columns!(),
                    " FROM memories WHERE owner = $1 AND ($2 IS NULL OR subject = $2) \
                     AND seq < $3 ORDER BY seq DESC LIMIT $4"
                ))
                .bind(owner)
                .bind(subject)
                .bind(after_seq)
                .bind(fetch)
                .fetch_all(p)
                .await
            })
        })
        .await?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((rows, more))
    }

    /// Every memory of a subject in the order written, with the subject's version read in
    /// the same transaction (what the search index is built from).
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn subject_memories(
        &self,
        owner: &str,
        subject: &str,
        with_vectors: bool,
    ) -> Result<(i64, Vec<MemoryRow>), StoreError> {
        retrying("subject_memories", 3, || async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let version: Option<(i64,)> = sqlx::query_as(
                    "SELECT version FROM memory_subjects WHERE owner = $1 AND subject = $2",
                )
                .bind(owner)
                .bind(subject)
                .fetch_optional(&mut *tx)
                .await?;
                let rows = sqlx::query_as::<_, MemoryRow>(if with_vectors {
                    concat!(
                        "SELECT ",
                        memory_columns!(),
                        ", embedding FROM memories WHERE owner = $1 AND subject = $2 \
                         ORDER BY seq"
                    )
                } else {
                    concat!(
                        "SELECT ",
                        memory_columns!(),
                        " FROM memories WHERE owner = $1 AND subject = $2 ORDER BY seq"
                    )
                })
                .bind(owner)
                .bind(subject)
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok((version.map_or(0, |v| v.0), rows))
            })
        })
        .await
    }

    /// A subject's version (0 when it never had a memory): one primary-key read.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn subject_version(&self, owner: &str, subject: &str) -> Result<i64, StoreError> {
        let row: Option<(i64,)> = retrying("subject_version", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(
                    "SELECT version FROM memory_subjects WHERE owner = $1 AND subject = $2",
                )
                .bind(owner)
                .bind(subject)
                .persistent(true)
                .fetch_optional(p)
                .await
            })
        })
        .await?;
        Ok(row.map_or(0, |v| v.0))
    }

    /// Memories without a vector written after `after` (a `seq`), oldest first: the
    /// embedding worker's queue.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn unembedded_memories(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Unembedded>, StoreError> {
        retrying("unembedded_memories", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as::<_, Unembedded>(
                    "SELECT seq, id, owner, subject, memory FROM memories \
                     WHERE embedding IS NULL AND seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(p)
                .await
            })
        })
        .await
    }

    /// Stores vectors computed by `model`, each only if its memory still has the text it
    /// was computed from and no vector; bumps the subjects whose memories changed (first,
    /// in a fixed order, as every writer takes the subject's row lock before its memories).
    /// How many memories took a vector.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn set_memory_embeddings(
        &self,
        model: &str,
        vectors: &[(Unembedded, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        let mut subjects: Vec<(&str, &str)> = vectors
            .iter()
            .map(|(m, _)| (m.owner.as_str(), m.subject.as_str()))
            .collect();
        subjects.sort_unstable();
        subjects.dedup();
        timed("set_memory_embeddings", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                for (owner, subject) in &subjects {
                    bump_subject!(tx, owner, subject);
                }
                let mut set = 0;
                for (memory, vector) in vectors {
                    set += sqlx::query(
                        "UPDATE memories SET embedding = $1, embedding_model = $2 \
                         WHERE id = $3 AND memory = $4 AND embedding IS NULL",
                    )
                    .bind(vector.as_slice())
                    .bind(model)
                    .bind(&memory.id)
                    .bind(&memory.memory)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(set)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Forgets the vectors another model computed (after `[memory] embeddings` changed), so
    /// the worker computes them again; how many there were.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn reset_memory_embeddings(&self, model: &str) -> Result<u64, StoreError> {
        timed("reset_memory_embeddings", async {
            on_pool!(&self.pool, |p| {
                sqlx::query(
                    "UPDATE memories SET embedding = NULL, embedding_model = NULL \
                     WHERE embedding IS NOT NULL \
                     AND (embedding_model IS NULL OR embedding_model <> $1)",
                )
                .bind(model)
                .execute(p)
                .await
                .map(|r| r.rows_affected())
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// A memory's history, oldest first (kept after the memory is deleted); empty when the
    /// owner never had it.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn memory_history(
        &self,
        owner: &str,
        id: &str,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        retrying("memory_history", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as::<_, HistoryRow>(
                    "SELECT seq, memory_id, event, old_memory, new_memory, job_id, created_at \
                     FROM memory_history WHERE memory_id = $1 AND owner = $2 ORDER BY seq",
                )
                .bind(id)
                .bind(owner)
                .fetch_all(p)
                .await
            })
        })
        .await
    }

    /// Queues extraction jobs, all in one transaction (the enqueuer hands over every turn
    /// that arrived while it wrote the last batch): a job of a conversation that has one
    /// queued joins it (its messages appended, the oldest beyond `max_messages` dropped,
    /// its due time moved by `due` of the new message count: the debounce; `due` also
    /// gets whether the job has a conversation); another is
    /// inserted unless `bound` jobs are queued or running already. The count is taken in
    /// the transaction, serialised on PostgreSQL by an advisory lock, so the bound is
    /// exact. One outcome per job, in order.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn queue_memory_jobs(
        &self,
        jobs: &[NewJob<'_>],
        max_messages: usize,
        due: impl Fn(bool, i64) -> i64,
        bound: i64,
    ) -> Result<Vec<Queued>, StoreError> {
        const INSERT: &str = "INSERT INTO memory_jobs (id, owner, subject, conversation_id, \
             messages, user_messages, metadata, alias, status, attempts, run_at, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', 0, $9, $10, $10) \
             ON CONFLICT (conversation_id) \
             WHERE status = 'queued' AND conversation_id IS NOT NULL DO NOTHING";
        let now = now_secs();
        timed("queue_memory_jobs", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                // One queuer at a time, so the count below stays true until commit: on
                // PostgreSQL an advisory lock; on SQLite the write lock, taken before the
                // count (a transaction that read first could not upgrade if another wrote).
                let lock = match self.pool {
                    Pool::Postgres(_) => "SELECT pg_advisory_xact_lock(7306310301)",
                    Pool::Sqlite(_) => "UPDATE memory_jobs SET status = status WHERE 1 = 0",
                };
                sqlx::query(lock).execute(&mut *tx).await?;
                let (mut depth,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM memory_jobs WHERE status IN ('queued', 'running')",
                )
                .fetch_one(&mut *tx)
                .await?;
                let mut outcomes = Vec::with_capacity(jobs.len());
                for job in jobs {
                    if let Some(conversation) = job.conversation_id {
                        // The UPDATE takes the row lock before the messages are read.
                        let queued: Option<(String, String, i64)> = sqlx::query_as(
                            "UPDATE memory_jobs SET updated_at = $1 \
                             WHERE conversation_id = $2 AND status = 'queued' \
                             RETURNING id, messages, user_messages",
                        )
                        .bind(now)
                        .bind(conversation)
                        .fetch_optional(&mut *tx)
                        .await?;
                        if let Some((id, messages, count)) = queued {
                            let mut all: Vec<String> = serde_json::from_str::<
                                Vec<Box<serde_json::value::RawValue>>,
                            >(&messages)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|m| m.get().to_owned())
                            .collect();
                            all.extend(job.messages.iter().cloned());
                            let keep = all.len().saturating_sub(max_messages);
                            let count = count + job.user_messages;
                            sqlx::query(
                                "UPDATE memory_jobs SET messages = $1, user_messages = $2, \
                                 run_at = $3 WHERE id = $4",
                            )
                            .bind(format!("[{}]", all[keep..].join(",")))
                            .bind(count)
                            .bind(due(true, count))
                            .bind(&id)
                            .execute(&mut *tx)
                            .await?;
                            outcomes.push(Queued::Joined(id));
                            continue;
                        }
                    }
                    if depth >= bound {
                        outcomes.push(Queued::Full);
                        continue;
                    }
                    let keep = job.messages.len().saturating_sub(max_messages);
                    let inserted = sqlx::query(INSERT)
                        .bind(job.id)
                        .bind(job.owner)
                        .bind(job.subject)
                        .bind(job.conversation_id)
                        .bind(format!("[{}]", job.messages[keep..].join(",")))
                        .bind(job.user_messages)
                        .bind(job.metadata)
                        .bind(job.alias)
                        .bind(due(job.conversation_id.is_some(), job.user_messages))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if inserted == 0 {
                        // Not reached while every queuer holds the lock; refused if it is.
                        outcomes.push(Queued::Full);
                        continue;
                    }
                    depth += 1;
                    outcomes.push(Queued::New(job.id.to_owned()));
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(outcomes)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Jobs queued or running: what the queue bound counts.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn memory_job_depth(&self) -> Result<i64, StoreError> {
        let row: (i64,) = retrying("memory_job_depth", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as(
                    "SELECT COUNT(*) FROM memory_jobs WHERE status IN ('queued', 'running')",
                )
                .fetch_one(p)
                .await
            })
        })
        .await?;
        Ok(row.0)
    }

    /// Claims due jobs (queued ones whose time came, and running ones whose lease ran out),
    /// leasing each until `lease_until`. Each claim counts an attempt.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn claim_memory_jobs(
        &self,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> Result<Vec<JobRow>, StoreError> {
        let limit = limit.clamp(1, CLAIM_BATCH);
        retrying("claim_memory_jobs", 3, || async {
            match &self.pool {
                // One claimer per SQLite database: the single instance's.
                Pool::Sqlite(p) => {
                    sqlx::query_as::<_, JobRow>(concat!(
                        "UPDATE memory_jobs SET status = 'running', run_at = $1, \
                         attempts = attempts + 1, updated_at = $2 WHERE id IN (\
                         SELECT id FROM memory_jobs WHERE status IN ('queued', 'running') \
                         AND run_at <= $2 ORDER BY run_at LIMIT $3) RETURNING ",
                        job_columns!()
                    ))
                    .bind(lease_until)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(p)
                    .await
                }
                Pool::Postgres(p) => {
                    sqlx::query_as::<_, JobRow>(concat!(
                        "UPDATE memory_jobs SET status = 'running', run_at = $1, \
                         attempts = attempts + 1, updated_at = $2 WHERE id IN (\
                         SELECT id FROM memory_jobs WHERE status IN ('queued', 'running') \
                         AND run_at <= $2 ORDER BY run_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
                         RETURNING ",
                        job_columns!()
                    ))
                    .bind(lease_until)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(p)
                    .await
                }
            }
        })
        .await
    }

    /// Extends a running job's lease (the worker's heartbeat); false when the claim is no
    /// longer this attempt's.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn extend_memory_job(
        &self,
        id: &str,
        attempt: i64,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        retrying("extend_memory_job", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query(
                    "UPDATE memory_jobs SET run_at = $1 \
                     WHERE id = $2 AND status = 'running' AND attempts = $3",
                )
                .bind(lease_until)
                .bind(id)
                .bind(attempt)
                .execute(p)
                .await
                .map(|r| r.rows_affected() == 1)
            })
        })
        .await
    }

    /// Records a failed attempt: the job runs again at `retry_at`, or, with `None`, is
    /// parked as failed.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn fail_memory_job(
        &self,
        id: &str,
        attempt: i64,
        error: &str,
        retry_at: Option<i64>,
    ) -> Result<(), StoreError> {
        let now = now_secs();
        retrying("fail_memory_job", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query(
                    "UPDATE memory_jobs SET status = CASE WHEN $1 IS NULL THEN 'failed' \
                     ELSE 'running' END, run_at = COALESCE($1, run_at), error = $2, \
                     updated_at = $3 WHERE id = $4 AND status = 'running' AND attempts = $5",
                )
                .bind(retry_at)
                .bind(error)
                .bind(now)
                .bind(id)
                .bind(attempt)
                .execute(p)
                .await
                .map(|_| ())
            })
        })
        .await
    }

    /// The owner's job `id`.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn memory_job(&self, owner: &str, id: &str) -> Result<Option<JobRow>, StoreError> {
        retrying("memory_job", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as::<_, JobRow>(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM memory_jobs WHERE id = $1 AND owner = $2"
                ))
                .bind(id)
                .bind(owner)
                .fetch_optional(p)
                .await
            })
        })
        .await
    }

    /// Jobs by state.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn memory_job_counts(&self) -> Result<JobCounts, StoreError> {
        let rows: Vec<(String, i64)> = retrying("memory_job_counts", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query_as("SELECT status, COUNT(*) FROM memory_jobs GROUP BY status")
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
                "failed" => counts.failed = n,
                "completed" => counts.completed = n,
                _ => {}
            }
        }
        Ok(counts)
    }

    /// Deletes finished jobs last changed before `before` (unix seconds), at most `limit`
    /// per call so a large backlog is removed in short transactions; how many went.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn prune_memory_jobs(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        retrying("prune_memory_jobs", 3, || async {
            on_pool!(&self.pool, |p| {
                sqlx::query(
                    "DELETE FROM memory_jobs WHERE id IN (SELECT id FROM memory_jobs \
                     WHERE status IN ('completed', 'failed') AND updated_at < $1 LIMIT $2)",
                )
                .bind(before)
                .bind(limit)
                .execute(p)
                .await
                .map(|r| r.rows_affected())
            })
        })
        .await
    }
}
