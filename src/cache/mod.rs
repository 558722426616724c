//! The response cache: exact-match answers for repeated requests, and request coalescing
//! so identical requests in flight at the same time cost one upstream call.
//!
//! Sits between routing's `resolve` and the upstream call. The key is a SHA-256 of the
//! alias and the canonical request (every field but `user`, `stream` and
//! `stream_options`, with object keys sorted), so a streamed and a non-stream request for
//! the same thing share one entry: the stored value is always a `chat.completion` (or
//! embeddings) body, and streams are assembled into it on the way in and replayed from it
//! on the way out ([`replay`]). Memory is bounded by construction: moka evicts by size and
//! expires by TTL; with Redis, entries carry a TTL and the server's `maxmemory` bounds the
//! rest. A cache failure is a miss, never an error for the client.

pub mod flight;
pub mod replay;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use moka::notification::RemovalCause;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{CacheBackend, CacheConfig, RedisConfig};
use crate::wire::JsonObject;

/// Fields that do not change the answer and so stay out of the key.
const UNKEYED: &[&str] = &["user", "stream", "stream_options"];

/// A cache key: SHA-256 of alias + canonical request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Keys `object` under `alias` for route `kind` ("chat" or "embeddings").
    pub fn of(kind: &str, alias: &str, object: &JsonObject) -> CacheKey {
        let mut fields: Vec<(&str, &str)> = object
            .fields()
            .filter(|(k, _)| *k != "model" && !UNKEYED.contains(k))
            .collect();
        fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut hasher = Sha256::new();
        hasher.update(kind.as_bytes());
        hasher.update([0]);
        hasher.update(alias.as_bytes());
        for (key, raw) in fields {
            hasher.update([0]);
            hasher.update(key.as_bytes());
            hasher.update([0]);
            // Canonical form: `{"a": 1}` and `{"a":1}` must be the same request. A raw
            // value that does not re-parse cannot occur (the body was validated).
            match serde_json::from_str::<serde_json::Value>(raw) {
                Ok(value) => {
                    let mut canonical = String::with_capacity(raw.len());
                    write_canonical(&value, &mut canonical);
                    hasher.update(canonical.as_bytes());
                }
                Err(_) => hasher.update(raw.as_bytes()),
            }
        }
        CacheKey(hasher.finalize().into())
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Writes `value` as compact JSON with object keys sorted, whatever order the map keeps
/// (serde_json preserves insertion order when any crate in the build asks it to).
fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// What a request may do with the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CachePolicy {
    pub lookup: bool,
    pub store: bool,
}

/// What a caller says about the cache for one request, before the alias's setting is
/// known: `x-switchyard-cache: on|off` and `Cache-Control` for HTTP clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheDirective {
    /// `Some(true)` / `Some(false)` overrides the alias's setting.
    pub force: Option<bool>,
    /// Fetch fresh, then store (`Cache-Control: no-cache`).
    pub no_lookup: bool,
    /// Leave the cache alone (`Cache-Control: no-store`).
    pub no_store: bool,
}

impl CacheDirective {
    /// Reads `x-switchyard-cache: on|off` and `Cache-Control` (`no-cache`: fetch fresh and
    /// store it; `no-store`: leave the cache alone).
    pub fn from_headers(headers: &HeaderMap) -> CacheDirective {
        let force = match headers
            .get("x-switchyard-cache")
            .and_then(|v| v.to_str().ok())
        {
            Some(v) if v.eq_ignore_ascii_case("on") => Some(true),
            Some(v) if v.eq_ignore_ascii_case("off") => Some(false),
            _ => None,
        };
        let control = headers
            .get(axum::http::header::CACHE_CONTROL)
            .map_or(&b""[..], |v| v.as_bytes());
        let has = |directive: &[u8]| {
            control
                .windows(directive.len())
                .any(|w| w.eq_ignore_ascii_case(directive))
        };
        let no_store = has(b"no-store");
        let no_lookup = no_store || has(b"no-cache");
        CacheDirective {
            force,
            no_lookup,
            no_store,
        }
    }

    /// The policy for an alias whose own setting is `alias_cached`.
    pub fn policy(&self, alias_cached: bool) -> CachePolicy {
        if !self.force.unwrap_or(alias_cached) {
            return CachePolicy::default();
        }
        CachePolicy {
            lookup: !self.no_lookup,
            store: !self.no_store,
        }
    }
}

impl CachePolicy {
    pub fn active(&self) -> bool {
        self.lookup || self.store
    }
}

enum Backend {
    Memory(moka::future::Cache<CacheKey, Bytes>),
    Redis {
        conn: redis::aio::ConnectionManager,
        prefix: String,
    },
}

/// Counters for `/admin/cache` and `/metrics`.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stores: AtomicU64,
    pub evictions: AtomicU64,
    pub coalesced: AtomicU64,
    pub errors: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheSnapshot {
    pub backend: &'static str,
    /// Entries and bytes held (memory backend; approximate between maintenance runs).
    pub entries: Option<u64>,
    pub bytes: Option<u64>,
    pub max_bytes: u64,
    pub ttl_s: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub stores: u64,
    pub evictions: u64,
    pub coalesced_requests: u64,
    pub errors: u64,
}

/// The response cache.
pub struct ResponseCache {
    backend: Backend,
    config: CacheConfig,
    /// Entries larger than this are not stored.
    max_entry_bytes: usize,
    pub stats: Arc<CacheStats>,
}

impl ResponseCache {
    /// Builds the configured backend.
    ///
    /// # Errors
    /// When Redis is configured but its URL is invalid or unreachable at start-up.
    pub async fn build(
        config: &CacheConfig,
        redis: Option<&RedisConfig>,
    ) -> anyhow::Result<ResponseCache> {
        let stats = Arc::new(CacheStats::default());
        let max_entry_bytes = (config.max_bytes / 16).clamp(1024, 64 << 20) as usize;
        let backend = match config.backend {
            CacheBackend::Memory => {
                let evictions = stats.clone();
                Backend::Memory(
                    moka::future::Cache::builder()
                        .max_capacity(config.max_bytes)
                        .weigher(|key: &CacheKey, value: &Bytes| {
                            let size = value.len() + std::mem::size_of_val(key) + 64;
                            u32::try_from(size).unwrap_or(u32::MAX)
                        })
                        .time_to_live(config.ttl)
                        .eviction_listener(move |_, _, cause| {
                            if cause == RemovalCause::Size {
                                evictions.evictions.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                        .build(),
                )
            }
            CacheBackend::Redis => {
                let redis =
                    redis.ok_or_else(|| anyhow::anyhow!("cache backend redis needs [redis]"))?;
                let client = redis::Client::open(redis.url.expose())?;
                let conn = tokio::time::timeout(
                    Duration::from_secs(5),
                    redis::aio::ConnectionManager::new(client),
                )
                .await
                .map_err(|_| anyhow::anyhow!("timed out connecting to Redis"))??;
                Backend::Redis {
                    conn,
                    prefix: format!("{}cache:", redis.key_prefix),
                }
            }
        };
        Ok(ResponseCache {
            backend,
            config: config.clone(),
            max_entry_bytes,
            stats,
        })
    }

    /// Looks `key` up; counts a hit or a miss.
    pub async fn get(&self, key: &CacheKey) -> Option<Bytes> {
        let found = match &self.backend {
            Backend::Memory(cache) => cache.get(key).await,
            Backend::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let result: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("GET")
                    .arg(format!("{prefix}{}", key.hex()))
                    .query_async(&mut conn)
                    .await;
                match result {
                    Ok(value) => value.map(Bytes::from),
                    Err(e) => {
                        self.redis_error("get", &e);
                        None
                    }
                }
            }
        };
        let (counter, label) = if found.is_some() {
            (&self.stats.hits, "hit")
        } else {
            (&self.stats.misses, "miss")
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("switchyard_cache_lookups_total", "result" => label).increment(1);
        found
    }

    /// Stores an answer (skipped when larger than the per-entry bound).
    pub async fn put(&self, key: CacheKey, value: Bytes) {
        if value.len() > self.max_entry_bytes {
            return;
        }
        match &self.backend {
            Backend::Memory(cache) => cache.insert(key, value).await,
            Backend::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let result: redis::RedisResult<()> = redis::cmd("SET")
                    .arg(format!("{prefix}{}", key.hex()))
                    .arg(value.as_ref())
                    .arg("PX")
                    .arg(self.config.ttl.as_millis() as u64)
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = result {
                    self.redis_error("set", &e);
                    return;
                }
            }
        }
        self.stats.stores.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops every entry (for Redis: every key under this instance's prefix).
    pub async fn clear(&self) {
        match &self.backend {
            Backend::Memory(cache) => {
                cache.invalidate_all();
                cache.run_pending_tasks().await;
            }
            Backend::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let mut cursor: u64 = 0;
                loop {
                    let page: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{prefix}*"))
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut conn)
                        .await;
                    let Ok((next, keys)) = page else {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    if !keys.is_empty() {
                        let _: redis::RedisResult<u64> =
                            redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
    }

    pub async fn snapshot(&self) -> CacheSnapshot {
        let (backend, entries, bytes) = match &self.backend {
            Backend::Memory(cache) => {
                cache.run_pending_tasks().await;
                (
                    "memory",
                    Some(cache.entry_count()),
                    Some(cache.weighted_size()),
                )
            }
            Backend::Redis { .. } => ("redis", None, None),
        };
        let hits = self.stats.hits.load(Ordering::Relaxed);
        let misses = self.stats.misses.load(Ordering::Relaxed);
        CacheSnapshot {
            backend,
            entries,
            bytes,
            max_bytes: self.config.max_bytes,
            ttl_s: self.config.ttl.as_secs(),
            hits,
            misses,
            hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            stores: self.stats.stores.load(Ordering::Relaxed),
            evictions: self.stats.evictions.load(Ordering::Relaxed),
            coalesced_requests: self.stats.coalesced.load(Ordering::Relaxed),
            errors: self.stats.errors.load(Ordering::Relaxed),
        }
    }

    pub fn coalescing(&self) -> bool {
        self.config.coalesce
    }

    fn redis_error(&self, op: &str, e: &redis::RedisError) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(op, error = %e, "cache: Redis call failed; treating as a miss");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> JsonObject {
        JsonObject::parse(Bytes::copy_from_slice(s.as_bytes())).unwrap()
    }

    #[test]
    fn key_ignores_user_stream_whitespace_and_order() {
        let a = CacheKey::of(
            "chat",
            "m",
            &obj(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#),
        );
        let b = CacheKey::of(
            "chat",
            "m",
            &obj(
                r#"{"temperature": 0, "stream": true, "user": "u1", "messages": [ {"content":"hi", "role":"user"} ], "model":"m"}"#,
            ),
        );
        assert_eq!(a, b);
        let c = CacheKey::of(
            "chat",
            "m",
            &obj(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1}"#),
        );
        assert_ne!(a, c);
        let d = CacheKey::of(
            "chat",
            "other",
            &obj(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#),
        );
        assert_ne!(a, d, "the alias is part of the key");
    }

    #[test]
    fn headers_adjust_the_policy() {
        let mut h = HeaderMap::new();
        assert!(CacheDirective::from_headers(&h).policy(true).lookup);
        assert!(!CacheDirective::from_headers(&h).policy(false).active());
        h.insert("x-switchyard-cache", "on".parse().unwrap());
        assert!(CacheDirective::from_headers(&h).policy(false).lookup);
        h.insert("cache-control", "no-cache".parse().unwrap());
        let p = CacheDirective::from_headers(&h).policy(true);
        assert!(!p.lookup && p.store);
        h.insert("x-switchyard-cache", "off".parse().unwrap());
        assert!(!CacheDirective::from_headers(&h).policy(true).active());
    }
}
