//! `[models]`, `[routing]` and `[circuit_breaker]`: how a client-facing alias reaches a
//! deployment, and what happens when one fails.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

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
