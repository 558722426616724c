//! `[admission]`, `[cache]` and `[embeddings]`: how requests are admitted, shared and
//! batched on their way upstream.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// `[admission]`: how much upstream work may run at once, and how long the rest may wait.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// In-flight upstream calls, all providers together.
    pub max_concurrent: usize,
    /// Requests waiting for a slot; beyond this a request is refused at once.
    pub max_queue: usize,
    /// The longest a request waits for a slot before it is refused.
    pub max_queue_wait_ms: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_concurrent: 512,
            max_queue: 1024,
            max_queue_wait_ms: 2000,
        }
    }
}

impl AdmissionConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent == 0 {
            return Err(ConfigError::Invalid(
                "admission.max_concurrent must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// `[cache]`: the exact-match response cache and request coalescing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `memory` (per instance) or `redis` (shared by every instance; needs `[redis] url`).
    pub backend: CacheBackend,
    /// Memory bound of the in-process cache, e.g. "256MiB". With Redis the server's
    /// `maxmemory` bounds the whole; this still caps each entry at 1/16 of it.
    #[serde(deserialize_with = "de_bytes")]
    pub max_bytes: u64,
    /// How long an answer stays valid.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Identical cacheable requests in flight at the same time share one upstream call.
    pub coalesce: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            backend: CacheBackend::Memory,
            max_bytes: 256 * 1024 * 1024,
            ttl: Duration::from_secs(600),
            coalesce: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    Memory,
    Redis,
}

/// `[embeddings]`: micro-batching of concurrent small embedding requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingsConfig {
    /// How long a small request waits for others to share its upstream call ("0s": off).
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// Inputs per upstream call at most; larger requests are sent on their own.
    pub batch_max_inputs: usize,
}

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        EmbeddingsConfig {
            batch_window: Duration::ZERO,
            batch_max_inputs: 64,
        }
    }
}

/// Reads a size as a number of bytes or a string such as "256MiB", "1GB", "512k".
/// A size as a `usize` (see `de_bytes`).
pub(super) fn de_bytes_usize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let bytes = de_bytes(d)?;
    usize::try_from(bytes).map_err(|_| serde::de::Error::custom("size too large"))
}

pub(super) fn de_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(n),
        Size::Text(t) => parse_bytes(&t).ok_or_else(|| {
            serde::de::Error::custom(format!("invalid size {t:?} (try \"256MiB\")"))
        }),
    }
}

/// Parses "256MiB", "64 KB", "1g", "1024".
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    Some((num * mult as f64) as u64)
}
