//! `[memory]`: long-term memory of the facts users state, extracted in the background and
//! retrieved into later turns' context. Aliases opt in with `memory = true`.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// `[memory]` settings; every field has a default, so an empty section (or none) works.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// The alias that extracts facts and decides how they change the stored memories (a
    /// cheap model; it is asked for JSON-schema output). `None`: the turn's own alias.
    pub extraction_model: Option<String>,
    /// An extraction runs once a conversation has this many new user messages…
    pub every: u32,
    /// …or once it has been quiet this long with fewer.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// Tokens of a turn's context reserved for memories (taken from the history's share).
    pub slot_tokens: u32,
    /// Memories put into a turn's context at most.
    pub max_recalled: usize,
    /// Extraction workers per instance.
    pub workers: usize,
    /// Extraction jobs queued or running at most, across instances; past it new
    /// extractions are dropped and counted (a conversation's queued job still takes its
    /// new messages).
    pub queue_bound: usize,
    /// Messages one job holds at most (the oldest go first).
    pub max_job_messages: usize,
    /// Attempts of a failing job before it is parked as failed.
    pub max_attempts: u32,
    /// A claimed job is another instance's to take again when its worker has not
    /// renewed the claim for this long.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long finished jobs are kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Memory held by the search indexes, across subjects ("64MiB" or a number).
    #[serde(deserialize_with = "super::traffic::de_bytes")]
    pub index_cache_bytes: u64,
    /// Half-life of the recency bonus a memory's last update gives it.
    #[serde(with = "humantime_serde")]
    pub recency_half_life: Duration,
    /// An embeddings alias: memories get vectors (computed by a background worker) and
    /// searches add a similarity ranking to the full-text one. `None`: full text only.
    pub embeddings: Option<String>,
    /// `dimensions` asked of the embeddings model (for models that shorten vectors).
    pub embedding_dimensions: Option<u32>,
    /// How long a search waits for its query's vector before ranking by full text alone.
    #[serde(with = "humantime_serde")]
    pub query_embedding_timeout: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            extraction_model: None,
            every: 3,
            settle: Duration::from_secs(600),
            slot_tokens: 512,
            max_recalled: 20,
            workers: 2,
            queue_bound: 10_000,
            max_job_messages: 64,
            max_attempts: 5,
            lease: Duration::from_secs(120),
            retention: Duration::from_secs(7 * 86_400),
            index_cache_bytes: 64 << 20,
            recency_half_life: Duration::from_secs(30 * 86_400),
            embeddings: None,
            embedding_dimensions: None,
            query_embedding_timeout: Duration::from_secs(1),
        }
    }
}

impl MemoryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError::Invalid(format!("memory: {what}")));
        if !(1..=1000).contains(&self.every) {
            return bad("every must be 1-1000");
        }
        if self.workers == 0 || self.workers > 256 {
            return bad("workers must be 1-256");
        }
        if self.queue_bound == 0 || self.max_job_messages == 0 || self.max_attempts == 0 {
            return bad("queue_bound, max_job_messages and max_attempts must be above zero");
        }
        if self.lease < Duration::from_secs(5) {
            return bad("lease must be at least 5s");
        }
        if self.recency_half_life.is_zero() {
            return bad("recency_half_life must be above zero");
        }
        if self
            .embedding_dimensions
            .is_some_and(|d| d == 0 || d > 16_384)
        {
            return bad("embedding_dimensions must be 1-16384");
        }
        if self.query_embedding_timeout.is_zero() {
            return bad("query_embedding_timeout must be above zero");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    fn settings(memory: &str) -> Result<Settings, crate::config::ConfigError> {
        Settings::from_toml(
            &format!(
                "[providers.p]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
                 [models.m]\nprovider = \"p\"\nmemory = true\n[memory]\n{memory}"
            ),
            &|_| None,
        )
    }

    #[test]
    fn sizes_and_durations_read_as_elsewhere() {
        let s = settings("index_cache_bytes = \"8MiB\"\nsettle = \"30s\"\nevery = 5\n").unwrap();
        assert_eq!(s.memory.index_cache_bytes, 8 << 20);
        assert_eq!(s.memory.settle.as_secs(), 30);
        assert_eq!(s.memory.every, 5);
        assert!(s.models["m"].memory);
    }

    #[test]
    fn nonsense_is_refused_with_its_name() {
        for (bad, says) in [
            ("every = 0", "every"),
            ("workers = 0", "workers"),
            ("lease = \"1s\"", "lease"),
            ("queue_bound = 0", "queue_bound"),
            ("extraction_model = \"nope\"", "extraction_model"),
            ("embeddings = \"nope\"", "embeddings"),
            ("embedding_dimensions = 0", "embedding_dimensions"),
        ] {
            let err = settings(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
