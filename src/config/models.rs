//! `[models]`, `[routing]` and `[circuit_breaker]`: how a client-facing alias reaches a
//! deployment, and what happens when one fails.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::tokens::{Preflight, TokenBudget, TokenizerKind};

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
    /// Input and output tokens together. Defaults to the upstream model's published
    /// window for known families (GPT, o-series, Claude, DeepSeek); none otherwise.
    pub context_window: Option<u64>,
    /// Tokens kept free for the answer when a request does not set `max_tokens` /
    /// `max_completion_tokens`. Defaults to the model family's output limit (4096 for an
    /// unknown model), at most a quarter of a `context_window` set here.
    pub max_output_tokens: Option<u64>,
    /// `o200k_base`, `cl100k_base` or `approx`. Defaults by family: o200k for GPT-4o and
    /// later, cl100k for GPT-4 and GPT-3.5, the estimate for everything else.
    pub tokenizer: Option<TokenizerKind>,
    /// What chat completions does with a prompt over `context_window − max output`
    /// before any upstream call: `off` (default: pass-through stays pass-through),
    /// `reject` (400 `context_length_exceeded`) or `truncate` (oldest messages dropped).
    pub preflight: Preflight,
    /// Configured `[tools.NAME]` offered to the model on every Responses turn of this
    /// alias; the server runs the calls and gives the model their outputs.
    pub tools: Vec<String>,
    /// Long-term memory on this alias's Responses turns: facts the user states are
    /// extracted in the background and the relevant ones put into later turns' context
    /// (`[memory]`). A request turns it off with `"memory": "off"` in its metadata or the
    /// `x-switchyard-memory: off` header.
    pub memory: bool,
}

/// One deployment of an alias.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub provider: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_weight")]
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

    /// The alias's own shape: one `provider` or some `deployments`, and no weight of 0.
    /// Whether the providers and fallbacks it names exist is checked by
    /// [`super::Settings`], which sees every section.
    pub(super) fn validate(&self, alias: &str) -> Result<(), ConfigError> {
        let at = format!("models.{alias:?}");
        match (&self.provider, self.deployments.is_empty()) {
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
        if self
            .deployments(alias)
            .iter()
            .any(|(_, _, weight)| *weight == 0)
        {
            return Err(ConfigError::Invalid(format!(
                "{at}: deployment weight must be at least 1"
            )));
        }
        self.validate_tokens(alias, &at)
    }

    /// The token budget holds together: room left for input, and a window to check
    /// against when a pre-flight is asked for.
    fn validate_tokens(&self, alias: &str, at: &str) -> Result<(), ConfigError> {
        if self.context_window == Some(0) {
            return Err(ConfigError::Invalid(format!(
                "{at}.context_window must be at least 1"
            )));
        }
        let budget = TokenBudget::for_alias(alias, self);
        if let Some(window) = budget.context_window
            && budget.max_output_tokens >= window
        {
            return Err(ConfigError::Invalid(format!(
                "{at}: max_output_tokens ({}) must be less than context_window ({window})",
                budget.max_output_tokens
            )));
        }
        if self.preflight != Preflight::Off {
            if budget.context_window.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "{at}: preflight needs a context_window (none is known for this model)"
                )));
            }
            if self.fallback_on.contains(&FallbackOn::ContextWindow) {
                return Err(ConfigError::Invalid(format!(
                    "{at}: preflight and fallback_on = [\"context_window\"] contradict each \
                     other: the pre-flight refuses or cuts a long prompt before any upstream \
                     call, so the fallback would never run"
                )));
            }
        }
        Ok(())
    }
}

fn default_weight() -> u32 {
    1
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

impl RoutingConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "routing.max_attempts must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl BreakerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) || self.half_open_probes == 0 {
            return Err(ConfigError::Invalid(
                "circuit_breaker: failure_rate must be in (0, 1] and half_open_probes at least 1"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use crate::tokens::{Preflight, TokenizerKind};

    fn load(model: &str) -> Result<Settings, String> {
        let text = format!(
            "[providers.p]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
             [models.other]\nprovider = \"p\"\n\
             [models.m]\nprovider = \"p\"\n{model}"
        );
        Settings::from_toml(&text, &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn token_fields_load() {
        let s = load(
            "model = \"mystery\"\ncontext_window = 32000\nmax_output_tokens = 2000\n\
             tokenizer = \"cl100k_base\"\npreflight = \"reject\"",
        )
        .unwrap();
        let m = &s.models["m"];
        assert_eq!(m.context_window, Some(32_000));
        assert_eq!(m.max_output_tokens, Some(2_000));
        assert_eq!(m.tokenizer, Some(TokenizerKind::Cl100kBase));
        assert_eq!(m.preflight, Preflight::Reject);
        assert_eq!(s.models["other"].preflight, Preflight::Off);
        let truncate = load("model = \"gpt-4o\"\npreflight = \"truncate\"").unwrap();
        assert_eq!(truncate.models["m"].preflight, Preflight::Truncate);
    }

    #[test]
    fn token_fields_are_validated() {
        for (model, expected) in [
            (
                "context_window = 1000\nmax_output_tokens = 1000",
                "must be less than context_window",
            ),
            // The model's default window counts: gpt-4's is 8192.
            (
                "model = \"gpt-4\"\nmax_output_tokens = 9000",
                "must be less than context_window (8192)",
            ),
            ("context_window = 0", "at least 1"),
            (
                "model = \"mystery\"\npreflight = \"reject\"",
                "preflight needs a context_window",
            ),
            (
                "model = \"gpt-4o\"\npreflight = \"truncate\"\nfallbacks = [\"other\"]\n\
                 fallback_on = [\"context_window\"]",
                "contradict",
            ),
            ("preflight = \"sometimes\"", "unknown variant"),
            ("tokenizer = \"p50k_base\"", "unknown variant"),
        ] {
            let err = load(model).unwrap_err();
            assert!(err.contains(expected), "{model}: {err}");
        }
        // A window from the model's name is enough for a pre-flight.
        assert!(load("model = \"claude-sonnet-4-5\"\npreflight = \"reject\"").is_ok());
        let local = load("model = \"mystery\"\ncontext_window = 4096\npreflight = \"reject\"");
        assert_eq!(
            crate::tokens::TokenBudget::for_alias("m", &local.unwrap().models["m"]).input_limit(),
            Some(3072)
        );
    }
}
