//! `[jobs]`: the workers that run background work (responses created with
//! `background: true`) from the store's job table, on any instance.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// `[jobs]` settings; every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs an instance runs at once.
    pub workers: usize,
    /// A claimed job is another instance's to take again when its worker has not renewed
    /// the claim for this long.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Attempts of a job that fails for a reason that may pass (an upstream timeout, a
    /// rate limit) before it is failed for good.
    pub max_attempts: u32,
    /// How long finished jobs are kept (their responses stay until deleted).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            workers: 16,
            lease: Duration::from_secs(30),
            max_attempts: 3,
            retention: Duration::from_secs(7 * 86_400),
        }
    }
}

impl JobsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError::Invalid(format!("jobs: {what}")));
        if self.workers == 0 || self.workers > 4096 {
            return bad("workers must be 1-4096");
        }
        if self.lease < Duration::from_secs(3) {
            return bad("lease must be at least 3s");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be above zero");
        }
        Ok(())
    }
}
