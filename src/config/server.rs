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
    /// Open connections per listener; more are closed at accept. Far above what one
    /// instance serves, far below the file descriptors it may open.
    pub max_connections: usize,
    /// The whole request head must arrive within this (a client sending a header byte a
    /// second is cut off). On HTTP/1.1 it is also how long an idle keep-alive connection
    /// is kept: the clock starts when the server waits for the next request.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// The longest a request body may pause between two reads (nginx's
    /// `client_body_timeout`): a client that declares a body and stops sending it is
    /// answered 408 instead of holding its connection until the request timeout.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// The largest request head (request line and headers) accepted; larger is answered
    /// 431. 64 KiB, like Envoy's default (nginx: 8 KiB per line).
    pub max_header_bytes: usize,
    /// Concurrent streams one HTTP/2 connection may open.
    pub http2_max_concurrent_streams: u32,
    /// Origins whose pages may call the client API (`/v1/*`) from a browser, e.g.
    /// `https://chat.example.com`. Empty (the default): no CORS headers, so browsers refuse
    /// cross-origin calls.
    pub cors_origins: Vec<String>,
    /// WebSockets (`/v1/responses` in WebSocket mode, `/v1/events`): a ping this often;
    /// a socket that has sent nothing (not even a pong) for `websocket_idle_timeout` while
    /// no response runs on it is closed.
    #[serde(with = "humantime_serde")]
    pub websocket_ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub websocket_idle_timeout: Duration,
    /// Messages waiting to be written to one socket; a client that lets more pile up is
    /// disconnected with close code 1008 rather than allowed to grow memory.
    pub websocket_send_buffer: usize,
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
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            http2_max_concurrent_streams: 256,
            cors_origins: Vec::new(),
            websocket_ping_interval: Duration::from_secs(30),
            websocket_idle_timeout: Duration::from_secs(300),
            websocket_send_buffer: 1024,
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
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "server.max_connections must be at least 1".into(),
            ));
        }
        // hyper's read buffer cannot be smaller than 8 KiB.
        if self.max_header_bytes < 8192 {
            return Err(ConfigError::Invalid(
                "server.max_header_bytes must be at least 8192".into(),
            ));
        }
        if self.header_read_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "server.header_read_timeout must be above zero".into(),
            ));
        }
        if self.body_read_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "server.body_read_timeout must be above zero".into(),
            ));
        }
        if self.websocket_ping_interval < Duration::from_millis(100)
            || self.websocket_idle_timeout < self.websocket_ping_interval
        {
            return Err(ConfigError::Invalid(
                "server.websocket_ping_interval must be at least 100ms and \
                 websocket_idle_timeout at least as long"
                    .into(),
            ));
        }
        if !(16..=1_000_000).contains(&self.websocket_send_buffer) {
            return Err(ConfigError::Invalid(
                "server.websocket_send_buffer must be 16-1000000".into(),
            ));
        }
        for origin in &self.cors_origins {
            let (scheme, rest) = origin.split_once("://").unwrap_or(("", ""));
            let valid = matches!(scheme, "http" | "https")
                && !rest.is_empty()
                && !rest.contains('/')
                && axum::http::HeaderValue::from_str(origin).is_ok();
            if !valid {
                return Err(ConfigError::Invalid(format!(
                    "server.cors_origins: `{origin}` is not an origin (scheme://host[:port], no path)"
                )));
            }
        }
        if self.http2_max_concurrent_streams == 0 {
            return Err(ConfigError::Invalid(
                "server.http2_max_concurrent_streams must be at least 1".into(),
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
