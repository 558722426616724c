//! `[providers.NAME]`: one upstream each, with its wire format, credentials and pool.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Secret};

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
    pub simulation: crate::loadlab::mock::MockConfig,
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
}

impl ProviderConfig {
    /// A simulated provider with the given behaviour and default pool settings.
    pub fn simulated(simulation: crate::loadlab::mock::MockConfig) -> Self {
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

    /// This provider's own rules: a usable base URL for real upstreams, a pool that can
    /// hold a connection, header names HTTP accepts.
    pub(super) fn validate(&self, name: &str) -> Result<(), ConfigError> {
        match (self.kind, &self.base_url) {
            (ProviderKind::Simulated, _) => {}
            (_, None) => {
                return Err(ConfigError::Invalid(format!(
                    "providers.{name}: base_url is required for kind {:?}",
                    self.kind
                )));
            }
            (_, Some(url)) => {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| ConfigError::Invalid(format!("providers.{name}.base_url: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(ConfigError::Invalid(format!(
                        "providers.{name}.base_url: scheme must be http or https"
                    )));
                }
            }
        }
        if self.max_connections == 0 || self.max_concurrent == 0 {
            return Err(ConfigError::Invalid(format!(
                "providers.{name}: max_connections and max_concurrent must be at least 1"
            )));
        }
        for header in self.headers.keys() {
            http::HeaderName::try_from(header.as_str()).map_err(|_| {
                ConfigError::Invalid(format!("providers.{name}.headers: bad name {header:?}"))
            })?;
        }
        Ok(())
    }
}
