//! `[providers.NAME]`: one upstream each: its kind, that kind's own settings, and the pool.
//!
//! The TOML table is flat (`kind = "openai"`, `base_url = ...` and `max_connections = ...`
//! side by side), but in memory each kind holds only the settings it uses plus a shared
//! [`PoolConfig`], so no code reads an Anthropic version off an OpenAI provider.
//!
//! serde's `flatten` cannot be combined with `deny_unknown_fields`, and a tagged enum would
//! reject another kind's key only as "unknown field". So the table is read into a flat
//! `RawProvider` that rejects unknown keys as before, then converted per kind; a key that
//! belongs to another kind is refused with a message naming the key and the kinds that
//! have it (the TOML reader appends the `providers.NAME` it was found in).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Secret};
// The only place the config names the mock's settings, so moving the mock elsewhere
// changes this line alone.
use switchyard_loadlab::mock::MockConfig;

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

impl ProviderKind {
    /// The name written in `kind = "..."`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Simulated => "simulated",
        }
    }
}

/// `[providers.NAME]`: one upstream, by kind. Read from the flat TOML table through
/// `RawProvider`; use the accessors ([`ProviderConfig::pool`], [`ProviderConfig::base_url`]
/// ...) for settings several kinds share.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawProvider")]
pub enum ProviderConfig {
    Openai(OpenAiProvider),
    Anthropic(AnthropicProvider),
    Simulated(SimulatedProvider),
}

/// `kind = "openai"`: any OpenAI-compatible base URL.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiProvider {
    /// Base URL including the version prefix, e.g. `https://api.openai.com/v1`. Optional in
    /// the type so a missing one is reported by validation, in its usual words.
    pub base_url: Option<String>,
    /// Sent as `Authorization: Bearer ...`.
    pub api_key: Option<Secret>,
    /// Extra headers sent on every upstream request (e.g. `OpenAI-Organization`).
    pub headers: BTreeMap<String, Secret>,
    /// Ask for a usage chunk on every stream (stripped again when the client did not ask
    /// for it). Turn off for servers that reject `stream_options`.
    pub stream_usage: bool,
    pub pool: PoolConfig,
}

/// `kind = "anthropic"`: Anthropic's Messages API.
#[derive(Debug, Clone, PartialEq)]
pub struct AnthropicProvider {
    /// Base URL including the version prefix, e.g. `https://api.anthropic.com/v1`.
    pub base_url: Option<String>,
    /// Sent as `x-api-key`.
    pub api_key: Option<Secret>,
    /// Extra headers sent on every upstream request.
    pub headers: BTreeMap<String, Secret>,
    /// The `anthropic-version` header.
    pub anthropic_version: String,
    /// `max_tokens` sent when the client gave none (the Messages API requires it).
    pub default_max_tokens: u32,
    pub pool: PoolConfig,
}

/// `kind = "simulated"`: the mock upstream, run inside this process.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedProvider {
    /// How the built-in mock behaves.
    pub simulation: MockConfig,
    pub pool: PoolConfig,
}

/// The pooled HTTP client of one upstream: connections, concurrency and timeouts. Every
/// kind has one, written as flat keys of its `[providers.NAME]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Idle connections kept open for reuse.
    pub max_connections: usize,
    /// This upstream's own concurrency limit (requests beyond it queue under `[admission]`).
    pub max_concurrent: usize,
    /// Idle connections older than this are closed; below typical upstream keep-alive (~60-120 s).
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Until response headers arrive. Non-stream completions only answer when done, so
    /// this must cover a long generation.
    pub first_byte_timeout: Duration,
    /// The whole upstream exchange, body included, for non-stream requests.
    pub total_timeout: Duration,
    /// The longest silence tolerated between two stream chunks.
    pub stream_idle_timeout: Duration,
    /// Connections opened at start-up so the first requests skip TCP and TLS set-up.
    pub warm_connections: usize,
    /// Speak HTTP/2 without TLS from the first byte (h2c, "prior knowledge") to an
    /// `http://` upstream that supports it: every request to it becomes a stream on a few
    /// connections instead of a connection each. (Over `https://`, HTTP/2 is negotiated
    /// anyway when the upstream offers it.)
    pub http2_prior_knowledge: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_connections: 1024,
            max_concurrent: 1024,
            idle_timeout: Duration::from_secs(55),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(120),
            total_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(60),
            warm_connections: 1,
            http2_prior_knowledge: false,
        }
    }
}

impl PoolConfig {
    pub(super) fn validate(&self, name: &str) -> Result<(), ConfigError> {
        if self.max_connections == 0 || self.max_concurrent == 0 {
            return Err(ConfigError::Invalid(format!(
                "providers.{name}: max_connections and max_concurrent must be at least 1"
            )));
        }
        Ok(())
    }
}

/// Defaults of the kind-specific settings.
const STREAM_USAGE: bool = true;
const ANTHROPIC_VERSION: &str = "2023-06-01";
const ANTHROPIC_MAX_TOKENS: u32 = 4096;

/// No headers, for kinds that cannot have any.
static NO_HEADERS: BTreeMap<String, Secret> = BTreeMap::new();

impl ProviderConfig {
    /// A simulated provider with the given behaviour and default pool settings.
    pub fn simulated(simulation: MockConfig) -> Self {
        ProviderConfig::Simulated(SimulatedProvider {
            simulation,
            pool: PoolConfig::default(),
        })
    }

    /// The built-in simulated provider of the offline default: pacing that feels like a
    /// hosted model.
    pub fn offline_default() -> Self {
        ProviderConfig::simulated(MockConfig::realistic())
    }

    pub fn kind(&self) -> ProviderKind {
        match self {
            ProviderConfig::Openai(_) => ProviderKind::Openai,
            ProviderConfig::Anthropic(_) => ProviderKind::Anthropic,
            ProviderConfig::Simulated(_) => ProviderKind::Simulated,
        }
    }

    /// Connections, concurrency and timeouts: the same for every kind.
    pub fn pool(&self) -> &PoolConfig {
        match self {
            ProviderConfig::Openai(p) => &p.pool,
            ProviderConfig::Anthropic(p) => &p.pool,
            ProviderConfig::Simulated(p) => &p.pool,
        }
    }

    /// The configured base URL; `None` for the simulated provider, whose URL is the
    /// in-process mock's.
    pub fn base_url(&self) -> Option<&str> {
        match self {
            ProviderConfig::Openai(p) => p.base_url.as_deref(),
            ProviderConfig::Anthropic(p) => p.base_url.as_deref(),
            ProviderConfig::Simulated(_) => None,
        }
    }

    pub fn api_key(&self) -> Option<&Secret> {
        match self {
            ProviderConfig::Openai(p) => p.api_key.as_ref(),
            ProviderConfig::Anthropic(p) => p.api_key.as_ref(),
            ProviderConfig::Simulated(_) => None,
        }
    }

    /// Extra headers for every upstream request.
    pub fn headers(&self) -> &BTreeMap<String, Secret> {
        match self {
            ProviderConfig::Openai(p) => &p.headers,
            ProviderConfig::Anthropic(p) => &p.headers,
            ProviderConfig::Simulated(_) => &NO_HEADERS,
        }
    }

    /// Whether streams ask the upstream for usage. Only OpenAI-compatible providers can
    /// turn it off; the simulated one speaks the same wire and always answers it.
    pub fn stream_usage(&self) -> bool {
        match self {
            ProviderConfig::Openai(p) => p.stream_usage,
            ProviderConfig::Anthropic(_) | ProviderConfig::Simulated(_) => STREAM_USAGE,
        }
    }

    /// `max_tokens` for requests that set none: the Anthropic setting, or its default for
    /// kinds whose API does not require one.
    pub fn default_max_tokens(&self) -> u32 {
        match self {
            ProviderConfig::Anthropic(p) => p.default_max_tokens,
            ProviderConfig::Openai(_) | ProviderConfig::Simulated(_) => ANTHROPIC_MAX_TOKENS,
        }
    }

    /// This provider's own rules: a usable base URL for real upstreams, a pool that can
    /// hold a connection, header names HTTP accepts.
    pub(super) fn validate(&self, name: &str) -> Result<(), ConfigError> {
        match (self.kind(), self.base_url()) {
            (ProviderKind::Simulated, _) => {}
            (kind, None) => {
                return Err(ConfigError::Invalid(format!(
                    "providers.{name}: base_url is required for kind {kind:?}"
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
        self.pool().validate(name)?;
        for header in self.headers().keys() {
            http::HeaderName::try_from(header.as_str()).map_err(|_| {
                ConfigError::Invalid(format!("providers.{name}.headers: bad name {header:?}"))
            })?;
        }
        Ok(())
    }
}

/// A `[providers.NAME]` table as written: every key of every kind, each `None` when not
/// written, so that a key of another kind can be named in the error. The field order is
/// the order "expected one of ..." lists them in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: ProviderKind,
    base_url: Option<String>,
    api_key: Option<Secret>,
    headers: Option<BTreeMap<String, Secret>>,
    max_connections: Option<usize>,
    max_concurrent: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    first_byte_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    total_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    stream_idle_timeout: Option<Duration>,
    warm_connections: Option<usize>,
    http2_prior_knowledge: Option<bool>,
    stream_usage: Option<bool>,
    anthropic_version: Option<String>,
    default_max_tokens: Option<u32>,
    simulation: Option<MockConfig>,
}

impl RawProvider {
    /// The kind-specific keys that were written, with the kinds that have them. Pool keys
    /// are not here: every kind has them.
    fn kind_keys(&self) -> [(&'static str, bool, &'static [ProviderKind]); 7] {
        use ProviderKind::{Anthropic, Openai, Simulated};
        [
            ("base_url", self.base_url.is_some(), &[Openai, Anthropic]),
            ("api_key", self.api_key.is_some(), &[Openai, Anthropic]),
            ("headers", self.headers.is_some(), &[Openai, Anthropic]),
            ("stream_usage", self.stream_usage.is_some(), &[Openai]),
            (
                "anthropic_version",
                self.anthropic_version.is_some(),
                &[Anthropic],
            ),
            (
                "default_max_tokens",
                self.default_max_tokens.is_some(),
                &[Anthropic],
            ),
            ("simulation", self.simulation.is_some(), &[Simulated]),
        ]
    }
}

impl TryFrom<RawProvider> for ProviderConfig {
    type Error = String;

    fn try_from(raw: RawProvider) -> Result<Self, String> {
        let kind = raw.kind;
        for (key, written, kinds) in raw.kind_keys() {
            if written && !kinds.contains(&kind) {
                let owners: Vec<String> =
                    kinds.iter().map(|k| format!("{:?}", k.as_str())).collect();
                return Err(format!(
                    "`{key}` is not a setting of kind {:?} (only of kind {})",
                    kind.as_str(),
                    owners.join(" or ")
                ));
            }
        }
        let d = PoolConfig::default();
        let pool = PoolConfig {
            max_connections: raw.max_connections.unwrap_or(d.max_connections),
            max_concurrent: raw.max_concurrent.unwrap_or(d.max_concurrent),
            idle_timeout: raw.idle_timeout.unwrap_or(d.idle_timeout),
            connect_timeout: raw.connect_timeout.unwrap_or(d.connect_timeout),
            first_byte_timeout: raw.first_byte_timeout.unwrap_or(d.first_byte_timeout),
            total_timeout: raw.total_timeout.unwrap_or(d.total_timeout),
            stream_idle_timeout: raw.stream_idle_timeout.unwrap_or(d.stream_idle_timeout),
            warm_connections: raw.warm_connections.unwrap_or(d.warm_connections),
            http2_prior_knowledge: raw.http2_prior_knowledge.unwrap_or(d.http2_prior_knowledge),
        };
        Ok(match kind {
            ProviderKind::Openai => ProviderConfig::Openai(OpenAiProvider {
                base_url: raw.base_url,
                api_key: raw.api_key,
                headers: raw.headers.unwrap_or_default(),
                stream_usage: raw.stream_usage.unwrap_or(STREAM_USAGE),
                pool,
            }),
            ProviderKind::Anthropic => ProviderConfig::Anthropic(AnthropicProvider {
                base_url: raw.base_url,
                api_key: raw.api_key,
                headers: raw.headers.unwrap_or_default(),
                anthropic_version: raw
                    .anthropic_version
                    .unwrap_or_else(|| ANTHROPIC_VERSION.into()),
                default_max_tokens: raw.default_max_tokens.unwrap_or(ANTHROPIC_MAX_TOKENS),
                pool,
            }),
            ProviderKind::Simulated => ProviderConfig::Simulated(SimulatedProvider {
                simulation: raw.simulation.unwrap_or_default(),
                pool,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SIMULATED_PROVIDER, Settings};

    fn load(providers: &str) -> Result<Settings, ConfigError> {
        let text = format!("{providers}\n[models.m]\nprovider = \"p\"\n");
        Settings::from_toml(&text, &|_| None)
    }

    fn provider(table: &str) -> ProviderConfig {
        let settings = load(&format!("[providers.p]\n{table}")).unwrap();
        settings.providers["p"].clone()
    }

    fn refusal(table: &str) -> String {
        load(&format!("[providers.p]\n{table}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn each_kind_loads_with_its_own_settings_and_the_shared_pool() {
        let openai = provider(
            "kind = \"openai\"\nbase_url = \"http://x/v1\"\napi_key = \"sk\"\n\
             headers = { OpenAI-Organization = \"org\" }\nstream_usage = false\n\
             max_concurrent = 7\nfirst_byte_timeout = \"2s\"",
        );
        let ProviderConfig::Openai(p) = &openai else {
            panic!("{openai:?}")
        };
        assert_eq!(p.base_url.as_deref(), Some("http://x/v1"));
        assert_eq!(p.api_key.as_ref().map(Secret::expose), Some("sk"));
        assert_eq!(p.headers["OpenAI-Organization"].expose(), "org");
        assert!(!openai.stream_usage());
        assert_eq!(openai.pool().max_concurrent, 7);
        assert_eq!(openai.pool().first_byte_timeout, Duration::from_secs(2));
        assert_eq!(openai.kind(), ProviderKind::Openai);

        let anthropic = provider(
            "kind = \"anthropic\"\nbase_url = \"http://x/v1\"\nanthropic_version = \"2024-01-01\"\n\
             default_max_tokens = 100\nwarm_connections = 0",
        );
        let ProviderConfig::Anthropic(p) = &anthropic else {
            panic!("{anthropic:?}")
        };
        assert_eq!(p.anthropic_version, "2024-01-01");
        assert_eq!(anthropic.default_max_tokens(), 100);
        assert_eq!(anthropic.pool().warm_connections, 0);
        assert_eq!(anthropic.base_url(), Some("http://x/v1"));

        let simulated = provider(
            "kind = \"simulated\"\nmax_connections = 3\n[providers.p.simulation]\nchunks = 2",
        );
        let ProviderConfig::Simulated(p) = &simulated else {
            panic!("{simulated:?}")
        };
        assert_eq!(p.simulation.chunks, 2);
        assert_eq!(simulated.pool().max_connections, 3);
        assert_eq!(simulated.base_url(), None);
        assert!(simulated.headers().is_empty());
    }

    #[test]
    fn defaults_are_unchanged() {
        let pool = PoolConfig {
            max_connections: 1024,
            max_concurrent: 1024,
            idle_timeout: Duration::from_secs(55),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(120),
            total_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(60),
            warm_connections: 1,
            http2_prior_knowledge: false,
        };
        assert_eq!(PoolConfig::default(), pool);
        assert_eq!(
            provider("kind = \"openai\"\nbase_url = \"http://x/v1\""),
            ProviderConfig::Openai(OpenAiProvider {
                base_url: Some("http://x/v1".into()),
                api_key: None,
                headers: BTreeMap::new(),
                stream_usage: true,
                pool: pool.clone(),
            })
        );
        assert_eq!(
            provider("kind = \"anthropic\"\nbase_url = \"http://x/v1\""),
            ProviderConfig::Anthropic(AnthropicProvider {
                base_url: Some("http://x/v1".into()),
                api_key: None,
                headers: BTreeMap::new(),
                anthropic_version: "2023-06-01".into(),
                default_max_tokens: 4096,
                pool: pool.clone(),
            })
        );
        assert_eq!(
            provider("kind = \"simulated\""),
            ProviderConfig::Simulated(SimulatedProvider {
                simulation: MockConfig::default(),
                pool: pool.clone(),
            })
        );
        let offline = Settings::offline_default();
        assert_eq!(
            offline.providers[SIMULATED_PROVIDER],
            ProviderConfig::Simulated(SimulatedProvider {
                simulation: MockConfig::realistic(),
                pool,
            })
        );
    }

    #[test]
    fn a_key_of_another_kind_is_refused_by_name() {
        for (table, key) in [
            (
                "kind = \"openai\"\nbase_url = \"http://x/v1\"\nanthropic_version = \"2023-06-01\"",
                "anthropic_version",
            ),
            (
                "kind = \"openai\"\nbase_url = \"http://x/v1\"\ndefault_max_tokens = 5",
                "default_max_tokens",
            ),
            (
                "kind = \"anthropic\"\nbase_url = \"http://x/v1\"\n[providers.p.simulation]\nchunks = 2",
                "simulation",
            ),
            (
                "kind = \"anthropic\"\nbase_url = \"http://x/v1\"\nstream_usage = false",
                "stream_usage",
            ),
            (
                "kind = \"simulated\"\nbase_url = \"http://x/v1\"",
                "base_url",
            ),
            ("kind = \"simulated\"\napi_key = \"sk\"", "api_key"),
        ] {
            let err = refusal(table);
            assert!(err.contains(&format!("`{key}`")), "{err}");
            assert!(err.contains("providers.p"), "{err}");
            assert!(err.contains("is not a setting of kind"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = refusal("kind = \"openai\"\nbase_url = \"http://x/v1\"\nsimulation = {}");
        assert!(err.contains("(only of kind \"simulated\")"), "{err}");
        let err = refusal("kind = \"simulated\"\nheaders = {}");
        assert!(
            err.contains("(only of kind \"openai\" or \"anthropic\")"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_a_missing_kind_are_still_refused() {
        let err = refusal("kind = \"openai\"\nbase_url = \"http://x/v1\"\nbase_uri = \"x\"");
        assert!(err.contains("unknown field `base_uri`"), "{err}");
        assert!(err.contains("providers.p"), "{err}");
        let err = refusal("kind = \"simulated\"\n[providers.p.simulation]\nchunkz = 2");
        assert!(err.contains("unknown field `chunkz`"), "{err}");
        let err = refusal("base_url = \"http://x/v1\"");
        assert!(err.contains("missing field `kind`"), "{err}");
        let err = refusal("kind = \"grpc\"\nbase_url = \"http://x/v1\"");
        assert!(err.contains("grpc"), "{err}");
    }

    #[test]
    fn per_kind_rules_keep_their_messages() {
        assert_eq!(
            refusal("kind = \"anthropic\""),
            "providers.p: base_url is required for kind Anthropic"
        );
        assert_eq!(
            refusal("kind = \"openai\"\nbase_url = \"ftp://x\""),
            "providers.p.base_url: scheme must be http or https"
        );
        assert_eq!(
            refusal("kind = \"simulated\"\nmax_concurrent = 0"),
            "providers.p: max_connections and max_concurrent must be at least 1"
        );
        assert_eq!(
            refusal("kind = \"openai\"\nbase_url = \"http://x/v1\"\nheaders = { \"a b\" = \"c\" }"),
            "providers.p.headers: bad name \"a b\""
        );
    }
}
