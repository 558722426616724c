//! Settings: one `switchyard.toml`, loaded once at start-up and validated before serving.
//!
//! `${VAR}` anywhere in a string value is replaced from the environment (a missing variable is
//! a start-up error naming the variable and where it was used). Unknown keys are rejected so a
//! typo never silently falls back to a default. With no providers and no models configured,
//! the built-in simulated provider is added so `switchyard serve` works offline.
//!
//! Each section type lives with its neighbours in a submodule and checks its own rules
//! (`validate`); `Settings::validate` runs those and the checks that span sections (a
//! model's provider exists, a Redis cache has a Redis, no open listener without keys).
//! Everything is re-exported here, so users name `crate::config::X` whatever file holds it.

mod files;
mod jobs;
mod mcp;
mod memory;
mod models;
mod providers;
mod server;
mod state;
mod tools;
mod traffic;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

pub use files::{BatchesConfig, FilesConfig, S3Config};
pub use jobs::JobsConfig;
pub use mcp::{ApprovalMode, McpConfig, McpServerConfig};
pub use memory::MemoryConfig;
pub use models::{
    Balancing, BreakerConfig, DeploymentConfig, FallbackOn, ModelConfig, RoutingConfig,
};
pub use providers::{
    AnthropicProvider, OpenAiProvider, PoolConfig, ProviderConfig, ProviderKind, SimulatedProvider,
};
pub use server::{AdminConfig, LogConfig, LogFormat, ServerConfig};
pub use state::{AuthConfig, AuthMode, DatabaseConfig, RedisConfig, UsageConfig};
pub use tools::{
    BatchConfig, FetchUrlConfig, OAuth2Config, SearchBackend, ToolConfig, ToolLoopConfig,
    ToolMethod, WebSearchConfig, placeholders,
};
pub use traffic::{AdmissionConfig, CacheBackend, CacheConfig, EmbeddingsConfig, parse_bytes};

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
    /// HTTP APIs offered as tools, by name.
    pub tools: BTreeMap<String, ToolConfig>,
    /// The built-in `fetch_url` tool, when present.
    pub fetch_url: Option<FetchUrlConfig>,
    /// The built-in `web_search` tool, when present.
    pub web_search: Option<WebSearchConfig>,
    /// MCP servers whose tools are offered, by label.
    pub mcp_servers: BTreeMap<String, McpServerConfig>,
    /// What a request's own MCP servers may reach.
    pub mcp: McpConfig,
    /// Bounds on the server's tool calls.
    pub tool_loop: ToolLoopConfig,
    /// Long-term memory (used by aliases with `memory = true`).
    pub memory: MemoryConfig,
    /// Background work.
    pub jobs: JobsConfig,
    /// Uploaded files.
    pub files: FilesConfig,
    /// The Batch API.
    pub batches: BatchesConfig,
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
            .all(|p| p.kind() == ProviderKind::Simulated)
    }

    fn add_simulated_default(&mut self) {
        if self.providers.is_empty() && self.models.is_empty() {
            self.providers
                .insert(SIMULATED_PROVIDER.into(), ProviderConfig::offline_default());
            self.models.insert(
                SIMULATED_MODEL.into(),
                ModelConfig {
                    provider: Some(SIMULATED_PROVIDER.into()),
                    ..ModelConfig::default()
                },
            );
        }
    }

    /// Runs every section's own checks, then the ones that span sections.
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, provider) in &self.providers {
            provider.validate(name)?;
        }
        for (alias, model) in &self.models {
            model.validate(alias)?;
            self.check_model_references(alias, model)?;
        }
        for (name, tool) in &self.tools {
            tool.validate(name)?;
        }
        if let Some(search) = &self.web_search {
            search.validate()?;
            if self.tools.contains_key("web_search") {
                return Err(ConfigError::Invalid(
                    "tools.web_search: the name is the built-in tool's ([web_search])".into(),
                ));
            }
        }
        if let Some(fetch) = &self.fetch_url {
            fetch.validate()?;
            if self.tools.contains_key("fetch_url") {
                return Err(ConfigError::Invalid(
                    "tools.fetch_url: the name is the built-in tool's ([fetch_url])".into(),
                ));
            }
        }
        for (label, server) in &self.mcp_servers {
            server.validate(label)?;
            if self.tools.contains_key(label) || label == "web_search" || label == "fetch_url" {
                return Err(ConfigError::Invalid(format!(
                    "mcp_servers.{label}: the label is already a tool's name"
                )));
            }
        }
        self.mcp.validate()?;
        self.tool_loop.validate()?;
        self.memory.validate()?;
        self.jobs.validate()?;
        self.files.validate()?;
        self.batches.validate()?;
        if let Some(alias) = &self.memory.extraction_model
            && !self.models.contains_key(alias)
        {
            return Err(ConfigError::Invalid(format!(
                "memory.extraction_model: unknown model {alias:?}"
            )));
        }
        if let Some(alias) = &self.memory.embeddings
            && !self.models.contains_key(alias)
        {
            return Err(ConfigError::Invalid(format!(
                "memory.embeddings: unknown model {alias:?}"
            )));
        }
        self.admission.validate()?;
        self.circuit_breaker.validate()?;
        if self.cache.backend == CacheBackend::Redis && self.redis.is_none() {
            return Err(ConfigError::Invalid(
                "cache.backend = \"redis\" needs [redis] url".into(),
            ));
        }
        if let Some(redis) = &self.redis {
            redis.validate()?;
        }
        self.database.validate()?;
        self.usage.validate()?;
        if !self.unauthenticated_listener_allowed() {
            return Err(ConfigError::Invalid(format!(
                "auth.mode = \"none\" on the non-loopback listener {}: anyone who can reach it \
                 could spend your provider credit; set auth.allow_none_on_public_listener = true \
                 if that is really meant",
                self.server.listen
            )));
        }
        self.routing.validate()?;
        self.server.validate()?;
        Ok(())
    }

    /// A model's deployments name configured providers and its fallbacks name other
    /// configured models.
    fn check_model_references(&self, alias: &str, model: &ModelConfig) -> Result<(), ConfigError> {
        let at = format!("models.{alias:?}");
        for (provider, _, _) in model.deployments(alias) {
            if !self.providers.contains_key(&provider) {
                return Err(ConfigError::Invalid(format!(
                    "{at}: unknown provider {provider:?}"
                )));
            }
        }
        for tool in &model.tools {
            let builtin = (tool == "fetch_url" && self.fetch_url.is_some())
                || (tool == "web_search" && self.web_search.is_some());
            if !builtin && !self.tools.contains_key(tool) && !self.mcp_servers.contains_key(tool) {
                return Err(ConfigError::Invalid(format!(
                    "{at}.tools: {tool:?} is not a configured [tools.{tool}] or [mcp_servers.{tool}]"
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
        Ok(())
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
    use std::time::Duration;

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
        assert_eq!(p.api_key().unwrap().expose(), "sk-local");
        assert_eq!(format!("{:?}", p.api_key()), "Some(Secret(***))");
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
        assert_eq!(s.providers["primary"].pool().max_concurrent, 100);
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
        assert_eq!(
            s.providers["a"].pool().connect_timeout,
            Duration::from_millis(250)
        );
    }

    /// The shipped example loads as written, every provider kind in it included.
    #[test]
    fn the_example_config_loads() {
        let text = include_str!("../../switchyard.example.toml");
        let s = Settings::from_toml(text, &|var| Some(format!("value-of-{var}"))).unwrap();
        assert_eq!(s.providers["openai"].pool().max_connections, 256);
        assert_eq!(s.providers["openai"].pool().warm_connections, 2);
        assert_eq!(s.providers["anthropic"].kind(), ProviderKind::Anthropic);
        assert_eq!(s.providers["anthropic"].default_max_tokens(), 4096);
        assert!(s.providers["local"].stream_usage());
        assert_eq!(s.providers["local"].pool().warm_connections, 0);
        assert_eq!(s.tools["stock_quote"].cache_ttl, Duration::from_secs(30));
        assert_eq!(s.tools["food_search"].pointer.as_deref(), Some("/foods"));
        assert_eq!(s.fetch_url.as_ref().unwrap().max_bytes, 2 << 20);
        assert_eq!(s.web_search.as_ref().unwrap().max_results, 5);
    }
}
