//! `[server]`, `[log]` and `[admin]`: how Switchyard listens, logs and lets operators in.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Secret};

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

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "server.max_body_bytes must be at least 1024".into(),
            ));
        }
        Ok(())
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

/// `[admin]`: the admin API (`/admin/...`) is off unless a key is set.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token for `/admin/...`; without it every admin route answers 401.
    pub key: Option<Secret>,
}
