//! Long-term memory: facts about a user, kept across conversations.
//!
//! A memory belongs to a subject: the caller's key and a user of that key (a request's
//! `user` or `safety_identifier`, or a conversation's `user` metadata); nothing is shared
//! across keys. Memories are rows in the store ([`crate::store::memories`]); searching them
//! goes through a per-subject index held in memory ([`index`]) and refreshed when the
//! subject's version in the store moves.
//!
//! Two readers: the `/v1/memories` API, which sees its own writes at once (each search
//! compares the subject's version with the store), and context assembly on a turn, which
//! never waits for the database once a subject is indexed: an index older than
//! [`TURN_STALENESS`] is refreshed by a background task while the turn uses it as it is.

pub mod embed;
pub mod extract;
pub mod index;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use moka::sync::Cache;
use tokio::sync::{Notify, mpsc};
use tokio_util::task::TaskTracker;

use crate::auth::Principal;
use crate::config::MemoryConfig;
use crate::inference::Inference;
use crate::store::memories::{HistoryRow, MemoryRow, NewMemory};
use crate::store::{Store, StoreError};
use embed::{Embedder, Vector};
use index::SubjectIndex;

/// How long a turn trusts a subject's index without asking the store whether it moved.
/// Memories written by this instance mark it stale at once; another instance's writes are
/// seen within this time.
pub const TURN_STALENESS_MS: i64 = 1_000;

/// Longest subject (a user id) accepted.
pub const MAX_SUBJECT_CHARS: usize = 256;

/// Who a memory belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    /// The key id, or `""` with authentication off.
    pub owner: String,
    /// The user of that key.
    pub user: String,
}

impl Subject {
    pub fn new(owner: Option<&str>, user: &str) -> Subject {
        Subject {
            owner: owner.unwrap_or("").to_owned(),
            user: user.to_owned(),
        }
    }
}

/// One memory found by a search, with its score (higher is better).
#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    pub memory: String,
    pub metadata: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub score: f32,
}

/// A stored turn's messages, handed to extraction.
#[derive(Debug)]
pub struct Observed {
    pub subject: Subject,
    /// Extraction is debounced per conversation.
    pub conversation: Option<String>,
    /// `(role, text)` pairs.
    pub messages: Vec<(String, String)>,
    /// The turn's alias (extracts when `[memory] extraction_model` is not set).
    pub alias: String,
}

/// Vector components a search scans (memories × dimensions) above which it runs on the
/// blocking pool.
const BLOCKING_VECTOR_WORK: usize = 4 << 20;

/// Turns waiting to be queued as extraction jobs; past it they are dropped and counted.
const OBSERVED_BUFFER: usize = 1_024;

impl Found {
    fn of(doc: &index::Doc, score: f32) -> Found {
        Found {
            id: doc.id.clone(),
            memory: doc.memory.clone(),
            metadata: doc.metadata.clone(),
            created_at: doc.created_at,
            updated_at: doc.updated_at,
            score,
        }
    }
}

/// A subject's index in the cache, with when it was last compared with the store.
struct Cached {
    index: Arc<SubjectIndex>,
    checked_ms: AtomicI64,
    refreshing: AtomicBool,
}

/// The memory service: the store's memories, their search indexes and the extraction
/// queue.
pub struct Memory {
    config: MemoryConfig,
    /// The aliases memory is on for (`memory = true`).
    aliases: HashSet<String>,
    store: Store,
    indexes: Cache<Subject, Arc<Cached>>,
    /// One lock per subject being indexed (see [`Memory::load`]).
    loading: Cache<Subject, Arc<tokio::sync::Mutex<()>>>,
    tasks: TaskTracker,
    /// Jobs queued or running, as last counted (the queue bound's gauge).
    depth: AtomicI64,
    /// Wakes the claim loop when a job is queued here.
    wake: Notify,
    /// Computes vectors when `[memory] embeddings` is set.
    embedder: Option<Embedder>,
    /// Wakes the embedding worker when memories were written here.
    embed_wake: Notify,
    /// Stored turns on their way to the queue (written by the enqueuer task).
    observed: mpsc::Sender<Observed>,
    observed_rx: std::sync::Mutex<Option<mpsc::Receiver<Observed>>>,
    pub figures: Figures,
}

/// Counts since start, for `/admin/stats` and the dashboard.
#[derive(Debug, Default)]
pub struct Figures {
    pub completed: AtomicU64,
    /// Time spent by completed jobs, microseconds (with `completed`, the mean).
    pub completed_us: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub added: AtomicU64,
    pub updated: AtomicU64,
    pub deleted: AtomicU64,
    pub unchanged: AtomicU64,
}

impl Figures {
    fn decided(&self, event: &str, n: u64) {
        let counter = match event {
            "add" => &self.added,
            "update" => &self.updated,
            "delete" => &self.deleted,
            "none" => &self.unchanged,
            _ => return,
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Memory {
    pub fn new(
        config: MemoryConfig,
        aliases: HashSet<String>,
        store: Store,
        tasks: TaskTracker,
        inference: Arc<Inference>,
    ) -> Arc<Memory> {
        let embedder = config.embeddings.clone().map(|alias| {
            Embedder::new(
                alias,
                config.embedding_dimensions,
                config.query_embedding_timeout,
                inference,
            )
        });
        let (observed, observed_rx) = mpsc::channel(OBSERVED_BUFFER);
        let indexes = Cache::builder()
            .max_capacity(config.index_cache_bytes)
            .weigher(|_: &Subject, cached: &Arc<Cached>| {
                // An empty index still costs its entry.
                u32::try_from(cached.index.bytes() + 256).unwrap_or(u32::MAX)
            })
            .build();
        Arc::new(Memory {
            config,
            aliases,
            store,
            indexes,
            loading: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(std::time::Duration::from_secs(60))
                .build(),
            tasks,
            depth: AtomicI64::new(0),
            wake: Notify::new(),
            embedder,
            embed_wake: Notify::new(),
            observed,
            observed_rx: std::sync::Mutex::new(Some(observed_rx)),
            figures: Figures::default(),
        })
    }

    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// Whether `alias` has memory on by default.
    pub fn is_on_for(&self, alias: &str) -> bool {
        self.aliases.contains(alias)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn embedder(&self) -> Option<&Embedder> {
        self.embedder.as_ref()
    }

    /// Stores memories at once (no extraction), an `ADD` history row each.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn add(
        &self,
        subject: &Subject,
        memories: &[NewMemory],
    ) -> Result<Vec<MemoryRow>, StoreError> {
        let rows = self
            .store
            .add_memories(&subject.owner, &subject.user, memories)
            .await?;
        self.written(subject);
        Ok(rows)
    }

    /// Rewrites a memory of `owner`; `None` when it has none with that id.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn update(
        &self,
        owner: &str,
        id: &str,
        memory: &str,
    ) -> Result<Option<MemoryRow>, StoreError> {
        let row = self.store.update_memory(owner, id, memory).await?;
        if let Some(row) = &row {
            self.written(&Subject {
                owner: owner.to_owned(),
                user: row.subject.clone(),
            });
        }
        Ok(row)
    }

    /// Deletes a memory of `owner`; whether it had one with that id.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn delete(&self, owner: &str, id: &str) -> Result<bool, StoreError> {
        let Some(user) = self.store.delete_memory(owner, id).await? else {
            return Ok(false);
        };
        self.written(&Subject {
            owner: owner.to_owned(),
            user,
        });
        Ok(true)
    }

    /// Deletes every memory of a subject; how many there were.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn delete_subject(&self, subject: &Subject) -> Result<u64, StoreError> {
        let n = self
            .store
            .delete_subject_memories(&subject.owner, &subject.user)
            .await?;
        self.indexes.invalidate(subject);
        Ok(n)
    }

    /// Deletes everything an owner (a key) has here: memories, their history and its
    /// extraction jobs; how many memories there were.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn delete_owner(&self, owner: &str) -> Result<u64, StoreError> {
        let n = self.store.delete_owner_memories(owner).await?;
        self.indexes.invalidate_all();
        Ok(n)
    }

    /// A memory's history, oldest first.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn history(&self, owner: &str, id: &str) -> Result<Vec<HistoryRow>, StoreError> {
        self.store.memory_history(owner, id).await
    }

    /// The subject's best memories for `query`, with what the store holds now (the API's
    /// read: it sees every write that was acknowledged before it).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn search(
        &self,
        subject: &Subject,
        query: &str,
        limit: usize,
        principal: Option<&Arc<Principal>>,
    ) -> Result<Vec<Found>, StoreError> {
        let version = self
            .store
            .subject_version(&subject.owner, &subject.user)
            .await?;
        let index = match self.indexes.get(subject) {
            Some(cached) if cached.index.version == version => {
                cached.checked_ms.store(now_ms(), Ordering::Relaxed);
                cached.index.clone()
            }
            _ => self.load(subject, Some(version)).await?,
        };
        Ok(self.found(&index, query, limit, principal).await)
    }

    /// The subject's best memories for a turn's newest user message, then, while fewer
    /// than `limit` matched, the newest others (a name or a home town is worth knowing
    /// whatever was asked). From the cached index without waiting for the store (an index
    /// older than [`TURN_STALENESS_MS`] is refreshed in the background); only a subject
    /// never indexed here is read inline.
    ///
    /// # Errors
    /// When the store fails on that first read.
    pub async fn recall(
        self: &Arc<Self>,
        subject: &Subject,
        query: &str,
        limit: usize,
        principal: Option<&Arc<Principal>>,
    ) -> Result<Vec<Found>, StoreError> {
        let index = match self.indexes.get(subject) {
            Some(cached) => {
                let now = now_ms();
                if now - cached.checked_ms.load(Ordering::Relaxed) > TURN_STALENESS_MS
                    && !cached.refreshing.swap(true, Ordering::AcqRel)
                {
                    self.refresh_later(subject.clone(), cached.clone());
                }
                cached.index.clone()
            }
            None => self.load(subject, None).await?,
        };
        let mut found = self.found(&index, query, limit, principal).await;
        if found.len() < limit {
            let newest: Vec<usize> = index
                .newest(limit)
                .filter(|&p| !found.iter().any(|f| f.id == index.doc(p).id))
                .take(limit - found.len())
                .collect();
            found.extend(newest.into_iter().map(|p| Found::of(index.doc(p), 0.0)));
        }
        Ok(found)
    }

    /// Ranks the index for `query`: full text, and similarity too when the subject's
    /// memories have vectors and the query's arrives in time.
    async fn found(
        &self,
        index: &Arc<SubjectIndex>,
        query: &str,
        limit: usize,
        principal: Option<&Arc<Principal>>,
    ) -> Vec<Found> {
        let vector: Option<Arc<Vector>> = match &self.embedder {
            Some(embedder) if index.vector_work() > 0 => embedder.query(principal, query).await,
            _ => None,
        };
        let half_life = self.config.recency_half_life.as_secs_f64();
        let now = now_ms() / 1000;
        let hits = if vector.is_some() && index.vector_work() > BLOCKING_VECTOR_WORK {
            // A large scan leaves the runtime's threads to other requests.
            let (index, query) = (index.clone(), query.to_owned());
            tokio::task::spawn_blocking(move || {
                index.search(&query, vector.as_deref(), limit, now, half_life)
            })
            .await
            .unwrap_or_default()
        } else {
            index.search(query, vector.as_deref(), limit, now, half_life)
        };
        hits.into_iter()
            .map(|hit| Found::of(index.doc(hit.position), hit.score))
            .collect()
    }

    /// Reads a subject's memories and indexes them (the cache holds the result), unless
    /// the cached index is already at `at_least` (any version, with `None`). One load per
    /// subject at a time: the turns that find a subject unindexed wait for the first one's
    /// read instead of each reading every memory.
    async fn load(
        &self,
        subject: &Subject,
        at_least: Option<i64>,
    ) -> Result<Arc<SubjectIndex>, StoreError> {
        let lock = self
            .loading
            .get_with_by_ref(subject, || Arc::new(tokio::sync::Mutex::new(())));
        let _one_at_a_time = lock.lock().await;
        if let Some(cached) = self.indexes.get(subject)
            && at_least.is_none_or(|v| cached.index.version >= v)
        {
            return Ok(cached.index.clone());
        }
        let (version, rows) = self
            .store
            .subject_memories(&subject.owner, &subject.user, self.embedder.is_some())
            .await?;
        let index = build(version, rows).await;
        self.indexes.insert(
            subject.clone(),
            Arc::new(Cached {
                index: index.clone(),
                checked_ms: AtomicI64::new(now_ms()),
                refreshing: AtomicBool::new(false),
            }),
        );
        Ok(index)
    }

    /// Compares a cached index with the store and rebuilds it if the subject moved, off
    /// the turn's path.
    fn refresh_later(self: &Arc<Self>, subject: Subject, cached: Arc<Cached>) {
        let memory = self.clone();
        self.tasks.spawn(async move {
            let moved = match memory
                .store
                .subject_version(&subject.owner, &subject.user)
                .await
            {
                Ok(version) => version != cached.index.version,
                Err(e) => {
                    tracing::debug!(error = %e, "memory: version check failed");
                    false
                }
            };
            if moved {
                if let Err(e) = memory.load(&subject, Some(cached.index.version + 1)).await {
                    tracing::debug!(error = %e, "memory: index refresh failed");
                }
            } else {
                cached.checked_ms.store(now_ms(), Ordering::Relaxed);
            }
            cached.refreshing.store(false, Ordering::Release);
        });
    }

    /// Figures for `/admin/stats` and the dashboard: jobs by state (`null` while the store
    /// is away), outcomes and decisions since start, and the search indexes held.
    pub async fn snapshot(&self) -> serde_json::Value {
        let jobs = self.store.memory_job_counts().await.ok();
        let f = &self.figures;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.indexes.run_pending_tasks();
        serde_json::json!({
            "jobs": jobs,
            "queue_bound": self.config.queue_bound,
            "completed": get(&f.completed),
            "mean_job_ms": if get(&f.completed) == 0 {
                0.0
            } else {
                get(&f.completed_us) as f64 / get(&f.completed) as f64 / 1000.0
            },
            "failed": get(&f.failed),
            "dropped": get(&f.dropped),
            "decisions": {
                "add": get(&f.added),
                "update": get(&f.updated),
                "delete": get(&f.deleted),
                "none": get(&f.unchanged),
            },
            "indexed_subjects": self.indexes.entry_count(),
            "index_bytes": self.indexes.weighted_size(),
        })
    }

    /// Hands a stored turn's messages to the enqueuer without waiting; a full buffer drops
    /// them (counted).
    pub fn observe(&self, observed: Observed) {
        if self.observed.try_send(observed).is_err() {
            self.dropped();
        }
    }

    /// A write here: the next turn of the subject refreshes its index, and the new
    /// memories get vectors.
    fn written(&self, subject: &Subject) {
        self.mark_stale(subject);
        if self.embedder.is_some() {
            self.embed_wake.notify_one();
        }
    }

    /// The subject's next turn compares its index with the store.
    fn mark_stale(&self, subject: &Subject) {
        if let Some(cached) = self.indexes.get(subject) {
            cached.checked_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// Builds an index on the blocking pool when it is large enough to hold a worker thread
/// for more than a moment.
async fn build(version: i64, rows: Vec<MemoryRow>) -> Arc<SubjectIndex> {
    if rows.len() < 512 {
        return Arc::new(SubjectIndex::build(version, rows));
    }
    tokio::task::spawn_blocking(move || Arc::new(SubjectIndex::build(version, rows)))
        .await
        .unwrap_or_default()
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
