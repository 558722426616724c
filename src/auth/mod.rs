//! API keys: creation, hashing, and the per-request check.
//!
//! A key is `sk-sy-` plus 40 random base62 characters (about 238 bits) from the operating
//! system's CSPRNG. Only its SHA-256 is stored: a fast hash is right for a secret of that
//! entropy (a slow password hash protects guessable secrets, and would put milliseconds on
//! every request). A lookup is by hash, and the stored hash is then compared in constant
//! time.
//!
//! Validated keys are cached in memory for `[auth] key_cache_ttl`, so the database is read
//! only on a key's first request after that interval. If the database is away, the last
//! good answer for a key keeps being used.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, header};
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, AuthMode};
use crate::error::GatewayError;
use crate::limits::{BudgetPeriod, KeyLimits, KeyPolicy, period};
use crate::store::{KeyRow, Store, StoreError};

/// The visible start of every Switchyard key.
pub const KEY_PREFIX: &str = "sk-sy-";
const SECRET_CHARS: usize = 40;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// What an authenticated request may do.
#[derive(Debug)]
pub struct Principal {
    pub key_id: Arc<str>,
    pub name: String,
    /// Aliases this key may use; `None` for all.
    pub models: Option<HashSet<String>>,
    pub limits: KeyLimits,
}

impl Principal {
    pub fn may_use(&self, alias: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(alias))
    }
}

/// The settings of a key to create.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Tokens (in + out) per `budget_period`.
    #[serde(default)]
    pub budget_tokens: Option<u64>,
    #[serde(default)]
    pub budget_period: Option<BudgetPeriod>,
}

/// Creates a key and returns the secret (shown once) and the stored row.
///
/// # Errors
/// 400 for an unusable setting; the store's error otherwise.
pub async fn create_key(store: &Store, new: &NewKey) -> Result<(String, KeyRow), CreateError> {
    let name = new.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(CreateError::Invalid(
            "name must be 1 to 200 characters".into(),
        ));
    }
    if new.rpm == Some(0) || new.tpm == Some(0) || new.budget_tokens == Some(0) {
        return Err(CreateError::Invalid(
            "rpm, tpm and budget_tokens must be at least 1 when set".into(),
        ));
    }
    let models = match &new.models {
        Some(list) => {
            let list: Vec<&str> = list
                .iter()
                .map(|m| m.trim())
                .filter(|m| !m.is_empty())
                .collect();
            if list.is_empty() || list.iter().any(|m| m.contains(',')) {
                return Err(CreateError::Invalid(
                    "models must list at least one alias, without commas".into(),
                ));
            }
            Some(list.join(","))
        }
        None => None,
    };
    let secret = generate_secret();
    let mut id_bytes = [0u8; 8];
    rand::rng().fill(&mut id_bytes);
    let row = KeyRow {
        id: format!("key_{}", hex(&id_bytes)),
        name: name.to_owned(),
        prefix: secret[..KEY_PREFIX.len() + 4].to_owned(),
        hash: hash_secret(&secret),
        models,
        rpm: new.rpm.map(i64::from),
        tpm: new.tpm.map(to_i64).transpose()?,
        budget_tokens: new.budget_tokens.map(to_i64).transpose()?,
        budget_period: new
            .budget_period
            .unwrap_or(BudgetPeriod::Month)
            .as_str()
            .to_owned(),
        created_at: period::now_ms() / 1000,
        revoked_at: None,
    };
    store.insert_key(&row).await?;
    Ok((secret, row))
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn to_i64(n: u64) -> Result<i64, CreateError> {
    i64::try_from(n).map_err(|_| CreateError::Invalid(format!("{n} is too large")))
}

/// A new random secret.
pub fn generate_secret() -> String {
    let mut rng = rand::rng();
    let mut secret = String::with_capacity(KEY_PREFIX.len() + SECRET_CHARS);
    secret.push_str(KEY_PREFIX);
    for _ in 0..SECRET_CHARS {
        secret.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    secret
}

/// The stored form of a secret: lowercase hex SHA-256.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Lower-case hex of `bytes` (key hashes, file checksums).
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Checks client keys for the model routes.
pub struct Authenticator {
    mode: AuthMode,
    store: Store,
    cache: moka::future::Cache<[u8; 32], Option<Arc<Principal>>>,
    /// The last successful answer per key, served while the database is away. Bounded by
    /// the number of live keys.
    last_good: Mutex<HashMap<[u8; 32], Arc<Principal>>>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig, store: Store) -> Authenticator {
        Authenticator {
            mode: config.mode,
            store,
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(config.key_cache_ttl)
                .build(),
            last_good: Mutex::new(HashMap::new()),
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The caller's key, or `None` when authentication is off.
    ///
    /// # Errors
    /// 401 for a missing, unknown or revoked key; 503 when the key is not cached and the
    /// database cannot be reached.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Principal>>, GatewayError> {
        if self.mode == AuthMode::None {
            return Ok(None);
        }
        let Some(secret) = presented_key(headers) else {
            return Err(GatewayError::Unauthorized(
                "Missing API key: send it as `Authorization: Bearer sk-sy-...`.".into(),
            ));
        };
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        if !self.store.is_healthy()
            && let Some(principal) = self
                .last_good
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&digest)
                .cloned()
        {
            // The health check says the database is away: answer from memory instead of
            // waiting out connection timeouts on every expired cache entry.
            return Ok(Some(principal));
        }
        let found = self
            .cache
            .try_get_with(digest, self.load(digest))
            .await
            .or_else(|e| {
                tracing::warn!(error = %e, "auth: key store unavailable; using last known keys");
                let last = self.last_good.lock().unwrap_or_else(|p| p.into_inner());
                match last.get(&digest) {
                    Some(principal) => Ok(Some(principal.clone())),
                    None => Err(GatewayError::DependencyUnavailable("The key store")),
                }
            })?;
        match found {
            Some(principal) => Ok(Some(principal)),
            None => Err(GatewayError::Unauthorized(
                "Incorrect API key provided.".into(),
            )),
        }
    }

    async fn load(&self, digest: [u8; 32]) -> Result<Option<Arc<Principal>>, StoreError> {
        let hash = hex(&digest);
        let row = self.store.key_by_hash(&hash).await?;
        let live = row.filter(|row| {
            row.revoked_at.is_none() && bool::from(row.hash.as_bytes().ct_eq(hash.as_bytes()))
        });
        let Some(row) = live else {
            self.last_good
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&digest);
            return Ok(None);
        };
        let principal = self.principal_of(row).await?;
        self.last_good
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest, principal.clone());
        Ok(Some(principal))
    }

    /// The principal of a live key, by id, for work done later on the key's behalf (a
    /// memory extraction); `None` when the key is unknown or revoked.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn principal_of_key(
        &self,
        key_id: &str,
    ) -> Result<Option<Arc<Principal>>, StoreError> {
        match self.store.key_by_id(key_id).await? {
            Some(row) if row.revoked_at.is_none() => Ok(Some(self.principal_of(row).await?)),
            _ => Ok(None),
        }
    }

    /// A key row's principal, with its budget seeded from the usage log.
    async fn principal_of(&self, row: KeyRow) -> Result<Arc<Principal>, StoreError> {
        let policy = policy_of(&row);
        let (budget_seed, seed_period_start) = match policy.budget {
            Some((_, period)) => {
                let since = period.bounds(period::now_ms()).0;
                let used = self.store.tokens_used_since(&row.id, since).await?.max(0) as u64;
                (used, since)
            }
            None => (0, 0),
        };
        let principal = Arc::new(Principal {
            key_id: row.id.clone().into(),
            name: row.name.clone(),
            models: row.model_list().map(|m| m.into_iter().collect()),
            limits: KeyLimits {
                key_id: row.id.into(),
                policy,
                budget_seed,
                seed_period_start,
            },
        });
        Ok(principal)
    }

    /// Forgets every cached key, so a revocation takes effect here at once.
    pub fn forget(&self, key_id: &str) {
        self.cache.invalidate_all();
        self.last_good
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, p| &*p.key_id != key_id);
    }
}

/// Sign-in attempts per client address: a fixed window of one minute per address, kept in
/// a bounded cache so that a flood of addresses cannot grow memory.
pub struct SignInThrottle {
    attempts: moka::sync::Cache<std::net::IpAddr, Arc<std::sync::atomic::AtomicU32>>,
    per_minute: u32,
}

impl SignInThrottle {
    /// Seconds a throttled address should wait: the rest of its window, at most a minute.
    pub const RETRY_AFTER_S: u64 = 60;

    pub fn new(per_minute: u32) -> SignInThrottle {
        SignInThrottle {
            attempts: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(60))
                .build(),
            per_minute,
        }
    }

    /// Counts an attempt from `addr`; `false` once the address is over its limit.
    pub fn allow(&self, addr: std::net::IpAddr) -> bool {
        let count = self
            .attempts
            .get_with(addr, || Arc::new(std::sync::atomic::AtomicU32::new(0)));
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < self.per_minute
    }
}

/// The limits stored with a key.
pub fn policy_of(row: &KeyRow) -> KeyPolicy {
    KeyPolicy {
        rpm: row
            .rpm
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0),
        tpm: row
            .tpm
            .and_then(|n| u64::try_from(n).ok())
            .filter(|n| *n > 0),
        budget: row
            .budget_tokens
            .and_then(|n| u64::try_from(n).ok())
            .filter(|n| *n > 0)
            .map(|n| {
                (
                    n,
                    BudgetPeriod::parse(&row.budget_period).unwrap_or(BudgetPeriod::Month),
                )
            }),
    }
}

/// The key from `Authorization: Bearer …` or `x-api-key` (as Anthropic clients send it).
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_hash_to_hex() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + SECRET_CHARS);
        let h = hash_secret(&a);
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&a[KEY_PREFIX.len()..]));
    }
}
