//! The store: API keys and the usage log, in SQLite (the default, one file beside the
//! binary) or PostgreSQL (when several instances share state).
//!
//! One [`Store`] type fronts both. Every query is written once in SQL that both engines
//! accept (`$1` placeholders, `BIGINT` columns); the `on_pool!` macro instantiates it for
//! the pool at hand. Nothing here is awaited on a request's critical path except a key
//! lookup that missed the in-memory key cache (see [`crate::auth`]); usage rows go through
//! the batched writer in [`usage`]; [`bench`](mod@bench) measures that writer's pace.
//!
//! Every operation is timed into `switchyard_db_query_duration_seconds{op}` and retried when
//! the failure is transient (SQLITE_BUSY, a dropped or restarting PostgreSQL connection).

pub mod bench;
pub mod usage;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::DatabaseConfig;
use usage::UsageRecord;

/// The pool of one engine.
#[derive(Clone, Debug)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs one expression against whichever pool the store holds; the same SQL text is
/// compiled for each engine.
/// Rows per usage-log insert statement; a batch is written as statements of these sizes.
const USAGE_CHUNKS: [usize; 3] = [32, 8, 1];

macro_rules! on_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// Queues a job (`jobs::NewJob`) due at `$now` inside a transaction: with the row it
/// belongs to (a background response, a batch), in the same commit.
macro_rules! insert_job {
    ($tx:expr, $job:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO jobs (id, kind, owner, payload, options, status, run_at, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'queued', $6, $6, $6)",
        )
        .bind($job.id)
        .bind($job.kind)
        .bind($job.owner)
        .bind($job.payload)
        .bind($job.options)
        .bind($now)
        .execute(&mut *$tx)
        .await?
    };
}

// Declared after `on_pool!` and `insert_job!`, which they use.
pub mod conversations;
pub mod files;
pub mod jobs;
pub mod memories;

/// Errors from the store, already retried where retrying could help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database configuration: {0}")]
    Config(String),
}

/// A stored API key (never the secret: only its hash).
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    /// The first characters of the secret, to recognise it in lists.
    pub prefix: String,
    #[serde(skip)]
    pub hash: String,
    /// Comma-separated aliases this key may use; `None` for all.
    pub models: Option<String>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub budget_tokens: Option<i64>,
    pub budget_period: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// One row of the usage log, as read back for a request id.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UsageRow {
    pub route: String,
    pub alias: Option<String>,
    pub key_id: Option<String>,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub status: i32,
    pub cache_hit: bool,
}

/// One aggregate of the usage log: a key's use of one alias on one UTC day.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UsageBucket {
    pub key_id: Option<String>,
    pub alias: Option<String>,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub requests: i64,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub cache_hits: i64,
    pub errors: i64,
    pub avg_latency_ms: f64,
}

/// Which rows [`Store::usage_summary`] aggregates.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub key_id: Option<String>,
    pub since_ms: i64,
    pub until_ms: i64,
}

/// The columns of [`KeyRow`], for `concat!` into static queries.
macro_rules! key_columns {
    () => {
        "id, name, prefix, hash, models, rpm, tpm, budget_tokens, budget_period, created_at, \
         revoked_at"
    };
}

/// SQLite: the write-ahead log's size, in pages, past which a writer checkpoints inside its
/// own commit. The background checkpointer keeps the log far below it; this is the fallback
/// for when it cannot (a CLI command, or a checkpointer that fell behind).
const WRITER_CHECKPOINT_PAGES: u32 = 16_384;
/// SQLite: how often the background checkpointer copies the log into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// SQLite: the log file is cut back to this size after it wraps, so a burst does not keep
/// its disk space.
const WAL_SIZE_LIMIT: u64 = 64 << 20;

/// PostgreSQL: a pooled connection idle for longer than this is pinged before use.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(10);

/// Keys and usage, in SQLite or PostgreSQL.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    /// How to open the background checkpointer's own connection: file-backed SQLite only.
    checkpoint: Option<SqliteConnectOptions>,
    /// Last health-check result, for `/ready`.
    healthy: Arc<AtomicBool>,
}

impl Store {
    /// Connects (creating a SQLite file or a PostgreSQL schema if missing) and runs the
    /// embedded migrations.
    ///
    /// # Errors
    /// When the URL is unusable, the database cannot be reached, or a migration fails.
    pub async fn connect(config: &DatabaseConfig) -> Result<Store, StoreError> {
        let url = config.url.expose();
        let mut checkpoint = None;
        let pool = if url.starts_with("sqlite:") {
            let memory = url.contains(":memory:") || url.contains("mode=memory");
            let mut options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            if !memory {
                // WAL lets readers (admin queries, key lookups) run while the usage writer
                // writes; NORMAL sync is durable across a process crash in WAL mode.
                options = options
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string());
                // A checkpoint syncs the log and the database file (several ms): left to
                // SQLite, every ~1000 pages of log one unlucky commit (a conversation turn
                // writes ~40) would wait for it. The background checkpointer does it instead.
                checkpoint = Some(options.clone());
                options = options.pragma("wal_autocheckpoint", WRITER_CHECKPOINT_PAGES.to_string());
            }
            // A file on this machine does not go away under an open connection: no ping
            // before each use (a hand-off to the connection's thread, on every query).
            let mut pool = SqlitePoolOptions::new()
                .max_connections(config.max_connections)
                .acquire_timeout(config.acquire_timeout)
                .test_before_acquire(false);
            if memory {
                // One connection that never closes: an in-memory database lives and dies
                // with its connection.
                pool = pool
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None);
            }
            let pool = pool.connect_with(options).await?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            Pool::Sqlite(pool)
        } else {
            let mut options = PgConnectOptions::from_str(url)?;
            if let Some(schema) = &config.schema {
                if !schema
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(StoreError::Config(format!("bad schema name {schema:?}")));
                }
                let bootstrap = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(config.acquire_timeout)
                    .connect_with(options.clone())
                    .await?;
                // The name was checked above to be a plain identifier.
                let ddl = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
                sqlx::query(sqlx::AssertSqlSafe(ddl))
                    .execute(&bootstrap)
                    .await?;
                bootstrap.close().await;
                options = options.options([("search_path", schema.as_str())]);
            }
            // A ping before every use is a round trip on every query; only a connection
            // that sat idle long enough for the server to have restarted is checked.
            let pool = PgPoolOptions::new()
                .max_connections(config.max_connections)
                .acquire_timeout(config.acquire_timeout)
                .test_before_acquire(false)
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for > IDLE_BEFORE_PING {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                })
                .connect_with(options)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        };
        Ok(Store {
            pool,
            checkpoint,
            healthy: Arc::new(AtomicBool::new(true)),
        })
    }

    /// `sqlite` or `postgres`.
    /// The PostgreSQL pool, for what only PostgreSQL offers (`LISTEN`/`NOTIFY`).
    pub fn postgres(&self) -> Option<&sqlx::PgPool> {
        match &self.pool {
            Pool::Postgres(p) => Some(p),
            Pool::Sqlite(_) => None,
        }
    }

    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// The pool's open connections and, of them, the idle ones.
    pub fn pool_connections(&self) -> (u32, usize) {
        on_pool!(&self.pool, |p| (p.size(), p.num_idle()))
    }

    /// The last health-check result.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Checks the database every 2 s for `/ready` and the key cache's fallback, logging
    /// each change, until `cancel` fires. Owned by `tasks`.
    pub fn spawn_health_check(
        &self,
        tasks: &tokio_util::task::TaskTracker,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let store = self.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut was_healthy = true;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let healthy = store.check_health().await;
                        if healthy != was_healthy {
                            if healthy {
                                tracing::info!("database reachable again");
                            } else {
                                tracing::error!("database unreachable");
                            }
                            was_healthy = healthy;
                        }
                    }
                    _ = cancel.cancelled() => return,
                }
            }
        });
    }

    /// File-backed SQLite: copies the write-ahead log into the database every 100 ms on a
    /// connection of its own, so that no commit waits for a checkpoint's syncs, until
    /// `cancel` fires. Owned by `tasks`. A passive checkpoint never blocks a writer or a
    /// reader. The log file wraps to its start only when a checkpoint catches up with no
    /// commit in between, which steady writes rarely allow: it then grows to
    /// `WRITER_CHECKPOINT_PAGES`, where a writer's own checkpoint (with at most 100 ms of
    /// log left to copy) lets it wrap. `switchyard_db_wal_pages` shows its length.
    pub fn spawn_checkpointer(
        &self,
        tasks: &tokio_util::task::TaskTracker,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        use sqlx::{ConnectOptions, Connection};
        let Some(options) = self.checkpoint.clone() else {
            return;
        };
        tasks.spawn(async move {
            let mut conn = match options.connect().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::error!(error = %e, "the SQLite checkpointer could not connect; writers checkpoint themselves");
                    return;
                }
            };
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let pass = timed(
                            "checkpoint",
                            sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
                                .fetch_one(&mut conn),
                        )
                        .await;
                        match pass {
                            #[allow(clippy::cast_precision_loss)] // pages: far below 2^52
                            Ok((_, log, _)) => metrics::gauge!("switchyard_db_wal_pages").set(log as f64),
                            Err(e) => tracing::warn!(error = %e, "SQLite checkpoint failed"),
                        }
                    }
                    _ = cancel.cancelled() => break,
                }
            }
            let _ = conn.close().await;
        });
    }

    /// Runs `SELECT 1` once and records the result for `/ready`.
    pub async fn check_health(&self) -> bool {
        let ping = timed("ping", async {
            on_pool!(&self.pool, |p| sqlx::query("SELECT 1")
                .execute(p)
                .await
                .map(|_| ()))
        });
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), ping).await,
            Ok(Ok(_))
        );
        self.healthy.store(ok, Ordering::Relaxed);
        ok
    }

    /// Stops handing out connections and closes them.
    pub async fn close(&self) {
        on_pool!(&self.pool, |p| p.close().await);
    }

    /// Adds a key.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError> {
        retrying("insert_key", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query(
                "INSERT INTO api_keys (id, name, prefix, hash, models, rpm, tpm, budget_tokens, \
                 budget_period, created_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(&key.hash)
            .bind(&key.models)
            .bind(key.rpm)
            .bind(key.tpm)
            .bind(key.budget_tokens)
            .bind(&key.budget_period)
            .bind(key.created_at)
            .bind(key.revoked_at)
            .execute(p)
            .await
            .map(|_| ()))
        })
        .await
    }

    /// The key whose secret hashes to `hash`, revoked or not.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRow>, StoreError> {
        const SQL: &str = concat!("SELECT ", key_columns!(), " FROM api_keys WHERE hash = $1");
        retrying("key_by_hash", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, KeyRow>(SQL)
                .bind(hash)
                .fetch_optional(p)
                .await)
        })
        .await
    }

    /// The key `id`, revoked or not.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn key_by_id(&self, id: &str) -> Result<Option<KeyRow>, StoreError> {
        const SQL: &str = concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1");
        retrying("key_by_id", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, KeyRow>(SQL)
                .bind(id)
                .fetch_optional(p)
                .await)
        })
        .await
    }

    /// Every key, newest first.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn list_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys ORDER BY created_at DESC, id"
        );
        retrying("list_keys", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, KeyRow>(SQL)
                .fetch_all(p)
                .await)
        })
        .await
    }

    /// Marks a key revoked; false when there is no such live key.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn revoke_key(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        retrying("revoke_key", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL"
            )
            .bind(at)
            .bind(id)
            .execute(p)
            .await
            .map(|r| r.rows_affected() == 1))
        })
        .await
    }

    /// Tokens (in + out) a key has used since `since_ms`, from the usage log.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn tokens_used_since(&self, key_id: &str, since_ms: i64) -> Result<i64, StoreError> {
        retrying("tokens_used", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_scalar::<_, Option<i64>>(
                "SELECT CAST(SUM(tokens_in + tokens_out) AS BIGINT) FROM usage_log \
                 WHERE key_id = $1 AND ts_ms >= $2"
            )
            .bind(key_id)
            .bind(since_ms)
            .fetch_one(p)
            .await
            .map(|n| n.unwrap_or(0)))
        })
        .await
    }

    /// Writes a batch of usage rows in one transaction, as multi-row inserts of
    /// `USAGE_CHUNKS` rows (largest first): each size is one statement text, prepared once
    /// per connection and cached, where a statement sized to the batch would be parsed
    /// afresh every time (about 6,500 instructions a row of SQL parsing).
    ///
    /// # Errors
    /// When the database fails; the caller keeps the batch and tries again.
    pub async fn insert_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        timed("insert_usage", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let mut rest = rows;
                while !rest.is_empty() {
                    let size = USAGE_CHUNKS
                        .iter()
                        .copied()
                        .find(|&n| n <= rest.len())
                        .unwrap_or(1);
                    let (chunk, after) = rest.split_at(size);
                    let mut builder = sqlx::QueryBuilder::new(
                        "INSERT INTO usage_log (ts_ms, key_id, route, alias, deployment, \
                         tokens_in, tokens_out, latency_us, ttfb_us, status, cache_hit, \
                         request_id) ",
                    );
                    builder.push_values(chunk, |mut b, r| {
                        b.push_bind(r.ts_ms)
                            .push_bind(r.key_id.as_deref().map(str::to_owned))
                            .push_bind(r.route)
                            .push_bind(r.alias.as_deref())
                            .push_bind(r.deployment.as_deref().map(str::to_owned))
                            .push_bind(r.tokens_in)
                            .push_bind(r.tokens_out)
                            .push_bind(r.latency_us)
                            .push_bind(r.ttfb_us)
                            .push_bind(r.status)
                            .push_bind(r.cache_hit)
                            .push_bind(r.request_id.to_string());
                    });
                    builder.build().execute(&mut *tx).await?;
                    rest = after;
                }
                tx.commit().await
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Rows in the usage log (all keys).
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn usage_rows(&self) -> Result<i64, StoreError> {
        retrying("usage_rows", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM usage_log"
            )
            .fetch_one(p)
            .await)
        })
        .await
    }

    /// The usage rows of one request id, oldest first: every model call an operation
    /// made under that id.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn usage_of_request(&self, request_id: &str) -> Result<Vec<UsageRow>, StoreError> {
        type Row = (String, Option<String>, Option<String>, i64, i64, i32, bool);
        let rows: Vec<Row> = retrying("usage_of_request", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, Row>(
                "SELECT route, alias, key_id, tokens_in, tokens_out, status, cache_hit \
                 FROM usage_log WHERE request_id = $1 ORDER BY id"
            )
            .bind(request_id)
            .fetch_all(p)
            .await)
        })
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(route, alias, key_id, tokens_in, tokens_out, status, cache_hit)| UsageRow {
                    route,
                    alias,
                    key_id,
                    tokens_in,
                    tokens_out,
                    status,
                    cache_hit,
                },
            )
            .collect())
    }

    /// The usage log aggregated per key, alias and UTC day.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn usage_summary(
        &self,
        filter: &UsageFilter,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        type Row = (
            Option<String>,
            Option<String>,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        );
        let rows: Vec<Row> = retrying("usage_summary", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, Row>(
                "SELECT key_id, alias, ts_ms / 86400000 AS day, COUNT(*), \
                 CAST(COALESCE(SUM(tokens_in), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(tokens_out), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(latency_us), 0) AS BIGINT) \
                 FROM usage_log \
                 WHERE ts_ms >= $1 AND ts_ms < $2 AND ($3 = '' OR key_id = $3) \
                 GROUP BY key_id, alias, ts_ms / 86400000 \
                 ORDER BY day, key_id, alias"
            )
            .bind(filter.since_ms)
            .bind(filter.until_ms)
            .bind(filter.key_id.clone().unwrap_or_default())
            .fetch_all(p)
            .await)
        })
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(key_id, alias, day, requests, tokens_in, tokens_out, cache_hits, errors, us)| {
                    UsageBucket {
                        key_id,
                        alias,
                        day: crate::limits::period::format_day(day),
                        requests,
                        tokens_in,
                        tokens_out,
                        cache_hits,
                        errors,
                        avg_latency_ms: if requests > 0 {
                            us as f64 / requests as f64 / 1e3
                        } else {
                            0.0
                        },
                    }
                },
            )
            .collect())
    }
}

/// Times one database operation into the query-latency histogram.
async fn timed<T>(
    op: &'static str,
    work: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    let started = Instant::now();
    let result = work.await;
    metrics::histogram!("switchyard_db_query_duration_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!("switchyard_db_errors_total", "op" => op).increment(1);
    }
    result
}

/// Runs `work` up to `attempts` times while it fails transiently, with a short backoff.
async fn retrying<T, F, Fut>(op: &'static str, attempts: u32, mut work: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 1;
    loop {
        match timed(op, work()).await {
            Ok(value) => return Ok(value),
            Err(e) if attempt < attempts && is_transient(&e) => {
                metrics::counter!("switchyard_db_retries_total", "op" => op).increment(1);
                tracing::debug!(op, attempt, error = %e, "database: transient error, retrying");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether a failure is worth retrying: the database was busy or the connection went away.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if let Ok(n) = code.parse::<i32>() {
                // SQLite primary codes (extended codes keep them in the low byte):
                // 5 SQLITE_BUSY, 6 SQLITE_LOCKED.
                matches!(n & 0xff, 5 | 6)
            } else {
                // PostgreSQL: connection exceptions, shutdown, serialization, deadlock.
                code.starts_with("08")
                    || code.starts_with("57P")
                    || code == "40001"
                    || code == "40P01"
            }
        }
        _ => false,
    }
}

impl KeyRow {
    /// The aliases this key may use; `None` for all.
    pub fn model_list(&self) -> Option<Vec<String>> {
        self.models.as_ref().map(|m| {
            m.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
    }
}
