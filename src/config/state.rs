//! `[database]`, `[redis]`, `[auth]` and `[usage]`: where state lives and who may call.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Secret};

/// `[redis]`: shared state for several instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Secret,
    /// Prefix of every key Switchyard writes, so one Redis can serve several deployments.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
}

fn default_redis_prefix() -> String {
    "switchyard:".into()
}

impl RedisConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose();
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return Err(ConfigError::Invalid(
                "redis.url must start with redis:// or rediss://".into(),
            ));
        }
        Ok(())
    }
}

/// `[database]`: where keys and the usage log live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (created if missing), `sqlite::memory:`, or `postgres://...`.
    pub url: Secret,
    /// Pool size. SQLite writes are serialised by the database anyway; a few connections
    /// serve concurrent reads.
    pub max_connections: u32,
    /// PostgreSQL only: the schema Switchyard's tables live in (created if missing), so one
    /// database can hold several deployments.
    pub schema: Option<String>,
    /// How long an operation may wait for a pooled connection.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: Secret::new("sqlite://switchyard.db"),
            max_connections: 8,
            schema: None,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl DatabaseConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let db = self.url.expose();
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid(
                "database.url must start with sqlite:, postgres:// or postgresql://".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "database.max_connections must be at least 1".into(),
            ));
        }
        if let Some(schema) = &self.schema
            && (schema.is_empty()
                || !schema
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(ConfigError::Invalid(
                "database.schema may hold only letters, digits and _".into(),
            ));
        }
        Ok(())
    }
}

/// `[auth]`: who may call the model routes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `keys`: every model request needs a Switchyard API key (`switchyard keys create`).
    /// `none`: no authentication, for local use; refused on a non-loopback listener unless
    /// `allow_none_on_public_listener` is set.
    pub mode: AuthMode,
    pub allow_none_on_public_listener: bool,
    /// How long a validated key (and its limits) is trusted before it is read again, so a
    /// revocation made on another instance or with the CLI takes effect within this time.
    #[serde(with = "humantime_serde")]
    pub key_cache_ttl: Duration,
    /// Tokens reserved against a budget for the answer when the request sets no
    /// `max_tokens`; settled with the real usage when the request ends.
    pub default_completion_reserve: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Keys,
            allow_none_on_public_listener: false,
            key_cache_ttl: Duration::from_secs(10),
            default_completion_reserve: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Keys,
    None,
}

/// `[usage]`: the per-request usage log and its background writer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Record one row per model request.
    pub enabled: bool,
    /// Rows waiting for the writer at most; beyond it rows are dropped and counted.
    pub queue: usize,
    /// Rows per insert.
    pub batch_rows: usize,
    /// A partial batch is written after this long.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// How long shutdown keeps retrying a database that does not answer.
    #[serde(with = "humantime_serde")]
    pub shutdown_flush_timeout: Duration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            enabled: true,
            queue: 65_536,
            batch_rows: 512,
            flush_interval: Duration::from_millis(500),
            shutdown_flush_timeout: Duration::from_secs(15),
        }
    }
}

impl UsageConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        // 12 columns per row: 4096 rows stay under PostgreSQL's 65,535 parameters.
        if self.queue == 0 || !(1..=4096).contains(&self.batch_rows) {
            return Err(ConfigError::Invalid(
                "usage.queue must be at least 1 and usage.batch_rows between 1 and 4096".into(),
            ));
        }
        Ok(())
    }
}
