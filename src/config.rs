//! Settings: one `switchyard.toml`, loaded once at start-up and validated before serving.
//!
//! `${VAR}` anywhere in a string value is replaced from the environment (a missing variable is
//! a start-up error naming the variable and where it was used). Unknown keys are rejected so a
//! typo never silently falls back to a default. With no providers and no models configured,
//! the built-in simulated provider is added so `switchyard serve` works offline.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The alias served by the built-in simulated provider.
pub const SIMULATED_MODEL: &str = switchyard_loadlab::ECHO_MODEL;
/// The provider name of the built-in simulated provider.
pub const SIMULATED_PROVIDER: &str = "simulated";

/// Why a configuration could not be used. The message is one line, fit for `check-config`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid TOML: {0}")]
    Toml(String),
    #[error("environment variable {var} is not set (used in {at})")]
    MissingEnv { var: String, at: String },
    #[error("{0}")]
    Invalid(String),
}

/// A secret from the config: never printed by `Debug` or `Display`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub admission: AdmissionConfig,
    pub routing: RoutingConfig,
    pub circuit_breaker: BreakerConfig,
    pub cache: CacheConfig,
    pub redis: Option<RedisConfig>,
    pub embeddings: EmbeddingsConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub usage: UsageConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub models: BTreeMap<String, ModelConfig>,
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

/// `[redis]`: shared state for several instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Secret,
    /// Prefix of every key Switchyard writes, so one Redis can serve several deployments.
    #[serde(default = "defaults::redis_prefix")]
    pub key_prefix: String,
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
fn de_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
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

/// `[admin]`: the admin API (`/admin/...`) is off unless a key is set.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token for `/admin/...`; without it every admin route answers 401.
    pub key: Option<Secret>,
}

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

/// `[routing]`: retries across deployments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Upstream attempts per alias (first try included), bounded by the request deadline.
    pub max_attempts: u32,
    /// First retry backoff; doubles per attempt, with full jitter.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A `Retry-After` longer than this is not waited out; another deployment or the
    /// client gets the 429 instead.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            max_attempts: 3,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(10),
        }
    }
}

/// `[circuit_breaker]`: per deployment, on the failure rate over a sliding window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Fewer calls than this in the window never open the circuit (one failure in two
    /// calls is noise, not an outage).
    pub min_requests: u32,
    /// Failure share in the window (0-1) that opens the circuit.
    pub failure_rate: f64,
    /// This many failures in a row open the circuit at once, whatever the window says:
    /// a deployment that just died should not need half a window of failures to be cut
    /// off (0 turns this off).
    pub consecutive_failures: u32,
    /// How long an open circuit sends no traffic before probing.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Probe requests let through half-open; all must succeed to close.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 10,
            failure_rate: 0.5,
            consecutive_failures: 5,
            cooldown: Duration::from_secs(10),
            half_open_probes: 2,
        }
    }
}

/// `[server]`: the listening socket and the limits every request is held to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Loopback by default: exposing a gateway holding provider keys must be a decision.
    pub listen: SocketAddr,
    /// 32 MiB: room for several base64 images in one chat request (OpenAI accepts 20 MB
    /// images), while a runaway client still cannot make us buffer without bound.
    pub max_body_bytes: usize,
    /// Upper bound on one model request until its response headers are sent. Ten minutes
    /// covers slow non-stream completions; provider timeouts usually fire first.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests and streams before exiting anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A second listener for operators only: `/metrics`, `/health`, `/ready`, `/admin/...`
    /// and `/dashboard` (they stay on the main port too).
    pub admin_listen: Option<SocketAddr>,
    /// Prometheus metrics (`/metrics`). Off only to measure what they cost.
    pub metrics: bool,
    /// How often the dashboard timeline takes a point.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 32 * 1024 * 1024,
            request_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            admin_listen: None,
            metrics: true,
            stats_interval: Duration::from_secs(5),
        }
    }
}

/// `[log]`: output format and verbosity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// An `EnvFilter` directive; `RUST_LOG` overrides it.
    pub level: String,
    /// `auto` (pretty on a terminal, JSON otherwise), `json` or `pretty`.
    pub format: LogFormat,
    /// Log request bodies (prompts) with each request, truncated. Off by default: prompts
    /// are user data.
    pub bodies: bool,
    /// Export traces over OTLP/HTTP to this collector base URL (e.g.
    /// `http://127.0.0.1:4318`); off when unset.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported traces.
    pub otlp_service_name: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Auto,
            bodies: false,
            otlp_endpoint: None,
            otlp_service_name: "switchyard".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible base URL: OpenAI, DeepSeek, Groq, Mistral, vLLM, Ollama...
    Openai,
    /// Anthropic's Messages API, translated to and from OpenAI's shape.
    Anthropic,
    /// The built-in simulated provider: the mock upstream, run inside this process.
    Simulated,
}

/// `[providers.NAME]`: one upstream and its pooled client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Base URL including the version prefix, e.g. `https://api.openai.com/v1`. Not needed
    /// for `simulated`.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Extra headers sent on every upstream request (e.g. `OpenAI-Organization`).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Idle connections kept open for reuse.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// This provider's own concurrency limit (requests beyond it queue under `[admission]`).
    #[serde(default = "defaults::max_connections")]
    pub max_concurrent: usize,
    /// Idle connections older than this are closed; below typical upstream keep-alive (~60-120 s).
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Until response headers arrive. Non-stream completions only answer when done, so
    /// this must cover a long generation.
    #[serde(default = "defaults::first_byte_timeout", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// The whole upstream exchange, body included, for non-stream requests.
    #[serde(default = "defaults::total_timeout", with = "humantime_serde")]
    pub total_timeout: Duration,
    /// The longest silence tolerated between two stream chunks.
    #[serde(default = "defaults::stream_idle_timeout", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Connections opened at start-up so the first requests skip TCP and TLS set-up.
    #[serde(default = "defaults::warm_connections")]
    pub warm_connections: usize,
    /// Ask OpenAI-compatible upstreams for a usage chunk on every stream (stripped again
    /// when the client did not ask for it). Turn off for servers that reject `stream_options`.
    #[serde(default = "defaults::yes")]
    pub stream_usage: bool,
    /// Anthropic API version header.
    #[serde(default = "defaults::anthropic_version")]
    pub anthropic_version: String,
    /// `max_tokens` sent to Anthropic when the client gave none (the Messages API requires it).
    #[serde(default = "defaults::anthropic_max_tokens")]
    pub default_max_tokens: u32,
    /// Only for `simulated`: how the built-in mock behaves.
    #[serde(default)]
    pub simulation: switchyard_loadlab::mock::MockConfig,
}

mod defaults {
    use std::time::Duration;
    pub fn max_connections() -> usize {
        1024
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(55)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn first_byte_timeout() -> Duration {
        Duration::from_secs(120)
    }
    pub fn total_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub fn stream_idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn warm_connections() -> usize {
        1
    }
    pub fn yes() -> bool {
        true
    }
    pub fn anthropic_version() -> String {
        "2023-06-01".into()
    }
    pub fn anthropic_max_tokens() -> u32 {
        4096
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn redis_prefix() -> String {
        "switchyard:".into()
    }
}

/// `[models."ALIAS"]`: what a client-facing model name routes to: either one
/// `provider` (+ `model`), or several weighted `deployments`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub provider: Option<String>,
    /// The upstream model name; defaults to the alias itself.
    pub model: Option<String>,
    pub deployments: Vec<DeploymentConfig>,
    /// Other aliases tried in order when every deployment of this one failed.
    pub fallbacks: Vec<String>,
    pub balancing: Balancing,
    /// Client errors that also move to the fallbacks (a bigger window, another policy).
    pub fallback_on: Vec<FallbackOn>,
    /// Cache answers for this alias (a request header can also opt in or out).
    pub cache: bool,
}

/// One deployment of an alias.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub provider: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
}

/// How a deployment is picked among the healthy ones.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Balancing {
    /// Random, proportional to `weight`.
    #[default]
    Weighted,
    /// Power of two choices on in-flight requests × EWMA latency.
    LeastLoaded,
}

/// Upstream client errors that trigger the fallback chain when configured.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FallbackOn {
    ContextWindow,
    ContentPolicy,
}

impl ModelConfig {
    /// `(provider, upstream model, weight)` for every deployment, whichever shape was used.
    pub fn deployments(&self, alias: &str) -> Vec<(String, String, u32)> {
        let mut out: Vec<(String, String, u32)> = self
            .deployments
            .iter()
            .map(|d| {
                let model = d.model.clone().unwrap_or_else(|| alias.to_string());
                (d.provider.clone(), model, d.weight)
            })
            .collect();
        if let Some(provider) = &self.provider {
            let model = self.model.clone().unwrap_or_else(|| alias.to_string());
            out.push((provider.clone(), model, 1));
        }
        out
    }
}

impl Settings {
    /// Reads, expands and validates a config file.
    ///
    /// # Errors
    /// A one-line [`ConfigError`] for an unreadable file, bad TOML, a missing `${VAR}` or an
    /// inconsistent setting.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Settings::from_toml(&text, &|var| std::env::var(var).ok())
    }

    /// Parses TOML text, expanding `${VAR}` with `env`, then validates.
    ///
    /// # Errors
    /// See [`Settings::load`].
    pub fn from_toml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| ConfigError::Toml(one_line(&e.to_string())))?;
        expand_env(&mut value, "", env)?;
        let mut settings: Settings = value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Toml(one_line(&e.to_string())))?;
        settings.add_simulated_default();
        settings.validate()?;
        Ok(settings)
    }

    /// The settings used with no config file: defaults plus the simulated provider, with
    /// authentication off (the default listener is loopback).
    pub fn offline_default() -> Settings {
        let mut settings = Settings::default();
        settings.add_simulated_default();
        settings.auth.mode = AuthMode::None;
        settings
    }

    /// Whether `[auth] mode = "none"` may run on this listener.
    pub fn unauthenticated_listener_allowed(&self) -> bool {
        self.auth.mode == AuthMode::Keys
            || self.auth.allow_none_on_public_listener
            || self.server.listen.ip().is_loopback()
    }

    /// True when the only thing configured is the built-in simulated provider.
    pub fn is_simulated_only(&self) -> bool {
        self.providers
            .values()
            .all(|p| p.kind == ProviderKind::Simulated)
    }

    fn add_simulated_default(&mut self) {
        if self.providers.is_empty() && self.models.is_empty() {
            self.providers.insert(
                SIMULATED_PROVIDER.into(),
                ProviderConfig::simulated(switchyard_loadlab::mock::MockConfig::realistic()),
            );
            self.models.insert(
                SIMULATED_MODEL.into(),
                ModelConfig {
                    provider: Some(SIMULATED_PROVIDER.into()),
                    ..ModelConfig::default()
                },
            );
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, provider) in &self.providers {
            match (provider.kind, &provider.base_url) {
                (ProviderKind::Simulated, _) => {}
                (_, None) => {
                    return Err(ConfigError::Invalid(format!(
                        "providers.{name}: base_url is required for kind {:?}",
                        provider.kind
                    )));
                }
                (_, Some(url)) => {
                    let parsed = reqwest::Url::parse(url).map_err(|e| {
                        ConfigError::Invalid(format!("providers.{name}.base_url: {e}"))
                    })?;
                    if !matches!(parsed.scheme(), "http" | "https") {
                        return Err(ConfigError::Invalid(format!(
                            "providers.{name}.base_url: scheme must be http or https"
                        )));
                    }
                }
            }
            if provider.max_connections == 0 || provider.max_concurrent == 0 {
                return Err(ConfigError::Invalid(format!(
                    "providers.{name}: max_connections and max_concurrent must be at least 1"
                )));
            }
            for header in provider.headers.keys() {
                http::HeaderName::try_from(header.as_str()).map_err(|_| {
                    ConfigError::Invalid(format!("providers.{name}.headers: bad name {header:?}"))
                })?;
            }
        }
        for (alias, model) in &self.models {
            let at = format!("models.{alias:?}");
            match (&model.provider, model.deployments.is_empty()) {
                (None, true) => {
                    return Err(ConfigError::Invalid(format!(
                        "{at}: set either provider or deployments"
                    )));
                }
                (Some(_), false) => {
                    return Err(ConfigError::Invalid(format!(
                        "{at}: set provider or deployments, not both"
                    )));
                }
                _ => {}
            }
            for (provider, _, weight) in model.deployments(alias) {
                if !self.providers.contains_key(&provider) {
                    return Err(ConfigError::Invalid(format!(
                        "{at}: unknown provider {provider:?}"
                    )));
                }
                if weight == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "{at}: deployment weight must be at least 1"
                    )));
                }
            }
            for fallback in &model.fallbacks {
                if fallback == alias || !self.models.contains_key(fallback) {
                    return Err(ConfigError::Invalid(format!(
                        "{at}.fallbacks: {fallback:?} is not another configured model"
                    )));
                }
            }
        }
        if self.admission.max_concurrent == 0 {
            return Err(ConfigError::Invalid(
                "admission.max_concurrent must be at least 1".into(),
            ));
        }
        let b = &self.circuit_breaker;
        if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) || b.half_open_probes == 0 {
            return Err(ConfigError::Invalid(
                "circuit_breaker: failure_rate must be in (0, 1] and half_open_probes at least 1"
                    .into(),
            ));
        }
        if self.cache.backend == CacheBackend::Redis && self.redis.is_none() {
            return Err(ConfigError::Invalid(
                "cache.backend = \"redis\" needs [redis] url".into(),
            ));
        }
        if let Some(redis) = &self.redis
            && !redis.url.expose().starts_with("redis://")
            && !redis.url.expose().starts_with("rediss://")
        {
            return Err(ConfigError::Invalid(
                "redis.url must start with redis:// or rediss://".into(),
            ));
        }
        let db = self.database.url.expose();
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid(
                "database.url must start with sqlite:, postgres:// or postgresql://".into(),
            ));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "database.max_connections must be at least 1".into(),
            ));
        }
        if let Some(schema) = &self.database.schema
            && (schema.is_empty()
                || !schema
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(ConfigError::Invalid(
                "database.schema may hold only letters, digits and _".into(),
            ));
        }
        // 12 columns per row: 4096 rows stay under PostgreSQL's 65,535 parameters.
        if self.usage.queue == 0 || !(1..=4096).contains(&self.usage.batch_rows) {
            return Err(ConfigError::Invalid(
                "usage.queue must be at least 1 and usage.batch_rows between 1 and 4096".into(),
            ));
        }
        if !self.unauthenticated_listener_allowed() {
            return Err(ConfigError::Invalid(format!(
                "auth.mode = \"none\" on the non-loopback listener {}: anyone who can reach it \
                 could spend your provider credit; set auth.allow_none_on_public_listener = true \
                 if that is really meant",
                self.server.listen
            )));
        }
        if self.routing.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "routing.max_attempts must be at least 1".into(),
            ));
        }
        if self.server.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "server.max_body_bytes must be at least 1024".into(),
            ));
        }
        Ok(())
    }
}

impl ProviderConfig {
    /// A simulated provider with the given behaviour and default pool settings.
    pub fn simulated(simulation: switchyard_loadlab::mock::MockConfig) -> Self {
        ProviderConfig {
            kind: ProviderKind::Simulated,
            base_url: None,
            api_key: None,
            headers: BTreeMap::new(),
            max_connections: defaults::max_connections(),
            max_concurrent: defaults::max_connections(),
            idle_timeout: defaults::idle_timeout(),
            connect_timeout: defaults::connect_timeout(),
            first_byte_timeout: defaults::first_byte_timeout(),
            total_timeout: defaults::total_timeout(),
            stream_idle_timeout: defaults::stream_idle_timeout(),
            warm_connections: defaults::warm_connections(),
            stream_usage: true,
            anthropic_version: defaults::anthropic_version(),
            default_max_tokens: defaults::anthropic_max_tokens(),
            simulation,
        }
    }
}

/// Replaces `${VAR}` in every string of the TOML tree; `at` tracks the key path for errors.
fn expand_env(
    value: &mut toml::Value,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after.find('}').ok_or_else(|| {
                    ConfigError::Invalid(format!("{at}: unterminated ${{ in {s:?}"))
                })?;
                let var = &after[..end];
                let resolved = env(var).ok_or_else(|| ConfigError::MissingEnv {
                    var: var.to_string(),
                    at: at.to_string(),
                })?;
                out.push_str(&resolved);
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        toml::Value::Table(table) => {
            for (key, v) in table.iter_mut() {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                expand_env(v, &path, env)?;
            }
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                expand_env(v, &format!("{at}[{i}]"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(var: &str) -> Option<String> {
        (var == "LOCAL_API_KEY").then(|| "sk-local".to_string())
    }

    const EXAMPLE: &str = r#"
        [server]
        listen = "127.0.0.1:9999"

        [providers.local]
        kind = "openai"
        base_url = "http://127.0.0.1:9000/v1"
        api_key = "${LOCAL_API_KEY}"

        [models."gpt-4o-mini"]
        provider = "local"
        model = "gpt-4o-mini"
    "#;

    #[test]
    fn issue_example_loads_and_expands_env() {
        let s = Settings::from_toml(EXAMPLE, &env).unwrap();
        assert_eq!(s.server.listen.port(), 9999);
        let p = &s.providers["local"];
        assert_eq!(p.api_key.as_ref().unwrap().expose(), "sk-local");
        assert_eq!(format!("{:?}", p.api_key), "Some(Secret(***))");
        assert!(!s.models.contains_key(SIMULATED_MODEL));
    }

    #[test]
    fn missing_env_names_the_variable_and_place() {
        let err = Settings::from_toml(EXAMPLE, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("LOCAL_API_KEY"), "{err}");
        assert!(err.contains("providers.local.api_key"), "{err}");
    }

    #[test]
    fn empty_config_gets_the_simulated_provider() {
        let s = Settings::from_toml("", &env).unwrap();
        assert!(s.models.contains_key(SIMULATED_MODEL));
        assert!(s.is_simulated_only());
    }

    #[test]
    fn unknown_keys_and_providers_are_rejected() {
        let typo = "[server]\nlisten_addr = \"127.0.0.1:1\"";
        assert!(Settings::from_toml(typo, &env).is_err());
        let dangling =
            "[providers.a]\nkind=\"openai\"\nbase_url=\"http://x/v1\"\n[models.m]\nprovider=\"b\"";
        let err = Settings::from_toml(dangling, &env).unwrap_err().to_string();
        assert!(err.contains("unknown provider"), "{err}");
    }

    #[test]
    fn deployments_fallbacks_and_admission_shapes_load() {
        let text = r#"
            [admission]
            max_concurrent = 512
            max_queue = 1024
            max_queue_wait_ms = 2000
            [providers.primary]
            kind = "openai"
            base_url = "http://127.0.0.1:1/v1"
            max_concurrent = 100
            [providers.backup]
            kind = "openai"
            base_url = "http://127.0.0.1:2/v1"
            [models."chat"]
            deployments = [
              { provider = "primary", model = "gpt-4o-mini", weight = 3 },
              { provider = "backup",  model = "deepseek-chat", weight = 1 },
            ]
            fallbacks = ["chat-cheap"]
            balancing = "least-loaded"
            fallback_on = ["context_window"]
            [models."chat-cheap"]
            provider = "backup"
        "#;
        let s = Settings::from_toml(text, &env).unwrap();
        let chat = &s.models["chat"];
        assert_eq!(chat.balancing, Balancing::LeastLoaded);
        assert_eq!(
            chat.deployments("chat")[0],
            ("primary".into(), "gpt-4o-mini".into(), 3)
        );
        assert_eq!(s.providers["primary"].max_concurrent, 100);
        assert_eq!(s.admission.max_queue_wait_ms, 2000);
        let bad = text.replace("fallbacks = [\"chat-cheap\"]", "fallbacks = [\"nowhere\"]");
        assert!(Settings::from_toml(&bad, &env).is_err());
    }

    #[test]
    fn sizes_parse_in_common_units() {
        assert_eq!(parse_bytes("256MiB"), Some(256 << 20));
        assert_eq!(parse_bytes("1 GB"), Some(1_000_000_000));
        assert_eq!(parse_bytes("512k"), Some(512_000));
        assert_eq!(parse_bytes("42"), Some(42));
        assert_eq!(parse_bytes("lots"), None);
        let s = Settings::from_toml("[cache]\nmax_bytes = \"1MiB\"\nttl = \"10m\"", &env).unwrap();
        assert_eq!(s.cache.max_bytes, 1 << 20);
        assert!(Settings::from_toml("[cache]\nbackend = \"redis\"", &env).is_err());
    }

    #[test]
    fn durations_parse_humanly() {
        let s = Settings::from_toml(
            "[providers.a]\nkind=\"openai\"\nbase_url=\"http://x/v1\"\nconnect_timeout=\"250ms\"\n[models.m]\nprovider=\"a\"",
            &env,
        )
        .unwrap();
        assert_eq!(s.providers["a"].connect_timeout, Duration::from_millis(250));
    }
}
