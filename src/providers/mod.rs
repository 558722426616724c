//! Providers: one persistent, pooled HTTP client per upstream, and the wire formats they
//! speak ([`openai`] for every OpenAI-compatible base URL, [`anthropic`] for the Messages API).
//!
//! A [`Provider`] is built once at start-up and shared by every request. It owns the pool
//! (keep-alive, TCP_NODELAY, connect timeout), applies the first-byte / total / stream-idle
//! timeouts, bounds concurrent upstream requests, and counts requests and newly opened
//! connections so the reuse rate can be read. Upstream failures are mapped to
//! [`GatewayError`]s that keep the upstream status and say whether a retry could help.

pub mod anthropic;
pub mod openai;
pub mod stream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::admission::{AdmissionQueue, Admitted};
use crate::config::{AdmissionConfig, ProviderConfig, ProviderKind};
use crate::error::GatewayError;
use crate::wire::{ChatRequest, EmbeddingsRequest, Usage};

pub use stream::UpstreamStream;

/// Upstream error bodies are read up to this size for their message; the rest is dropped.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The wire format spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    OpenAi,
    Anthropic,
}

/// Pool and traffic counters of one provider.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Upstream requests sent.
    pub requests: AtomicU64,
    /// TCP connections opened (each is a connect + TLS handshake avoided when reused).
    pub connections: AtomicU64,
    /// Upstream requests currently running.
    pub in_flight: AtomicU64,
    /// Upstream requests that failed (transport, timeout or 5xx/429).
    pub failures: AtomicU64,
}

/// A serialisable view of [`PoolStats`].
#[derive(Debug, Clone, Serialize)]
pub struct PoolSnapshot {
    pub requests: u64,
    pub connections: u64,
    pub in_flight: u64,
    pub failures: u64,
    /// Share of requests that did not need a new connection.
    pub reuse_rate: f64,
}

impl PoolStats {
    pub fn snapshot(&self) -> PoolSnapshot {
        let requests = self.requests.load(Ordering::Relaxed);
        let connections = self.connections.load(Ordering::Relaxed);
        PoolSnapshot {
            requests,
            connections,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            reuse_rate: if requests == 0 {
                0.0
            } else {
                1.0 - (connections.min(requests) as f64 / requests as f64)
            },
        }
    }
}

/// What a chat call produced.
pub enum ChatReply {
    /// A whole OpenAI `chat.completion` body.
    Complete {
        body: Bytes,
        usage: Option<Usage>,
        upstream: Duration,
    },
    /// An OpenAI-shaped SSE stream, already started upstream.
    Stream(Box<UpstreamStream>),
}

/// One configured upstream with its pooled client.
pub struct Provider {
    pub name: Arc<str>,
    pub kind: ProviderKind,
    pub wire: Wire,
    pub base_url: String,
    client: reqwest::Client,
    config: ProviderConfig,
    pub stats: Arc<PoolStats>,
    /// This provider's concurrency limit and queue.
    pub queue: AdmissionQueue,
}

/// An upstream request slot plus the in-flight gauge; released on drop.
pub struct Slot {
    _admitted: Admitted,
    stats: Arc<PoolStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Provider {
    /// Builds the provider's client. `base_url` is resolved by the caller (the simulated
    /// provider's comes from the in-process mock).
    ///
    /// # Errors
    /// When a configured header is invalid or the TLS stack cannot be built.
    pub fn build(
        name: &str,
        config: &ProviderConfig,
        base_url: &str,
        admission: &AdmissionConfig,
    ) -> Result<Provider, anyhow::Error> {
        let wire = match config.kind {
            ProviderKind::Anthropic => Wire::Anthropic,
            ProviderKind::Openai | ProviderKind::Simulated => Wire::OpenAi,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(key) = &config.api_key {
            let mut value = match wire {
                Wire::OpenAi => HeaderValue::try_from(format!("Bearer {}", key.expose()))?,
                Wire::Anthropic => HeaderValue::try_from(key.expose())?,
            };
            value.set_sensitive(true);
            let name = match wire {
                Wire::OpenAi => header::AUTHORIZATION,
                Wire::Anthropic => HeaderName::from_static("x-api-key"),
            };
            headers.insert(name, value);
        }
        if wire == Wire::Anthropic {
            headers.insert(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::try_from(config.anthropic_version.as_str())?,
            );
        }
        for (key, value) in &config.headers {
            let mut value = HeaderValue::try_from(value.expose())?;
            value.set_sensitive(true);
            headers.insert(HeaderName::try_from(key.as_str())?, value);
        }
        let stats = Arc::new(PoolStats::default());
        let connections = stats.clone();
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(config.max_connections)
            .tcp_nodelay(true)
            .tcp_keepalive(Duration::from_secs(30))
            .no_proxy()
            // Each call of the connector is one new TCP (and TLS) connection.
            .connector_layer(tower::util::MapResponseLayer::new(move |conn| {
                connections.connections.fetch_add(1, Ordering::Relaxed);
                conn
            }))
            .build()?;
        Ok(Provider {
            name: name.into(),
            kind: config.kind,
            wire,
            base_url: base_url.trim_end_matches('/').to_string(),
            client,
            config: config.clone(),
            stats,
            queue: AdmissionQueue::new(
                name,
                config.max_concurrent,
                admission.max_queue,
                Duration::from_millis(admission.max_queue_wait_ms),
            ),
        })
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.config
    }

    /// Opens `warm_connections` connections ahead of traffic by listing models
    /// concurrently. Failures are logged, never fatal: the provider may come up later.
    pub async fn warm(&self) {
        let n = self.config.warm_connections;
        if n == 0 {
            return;
        }
        let url = format!("{}/models", self.base_url);
        let calls = (0..n).map(|_| async {
            let response = self
                .client
                .get(&url)
                .timeout(self.config.connect_timeout + Duration::from_secs(5))
                .send()
                .await?;
            // Read the body so the connection goes back to the pool.
            response.bytes().await
        });
        let results = futures_util::future::join_all(calls).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            let error = results
                .into_iter()
                .find_map(Result::err)
                .map(|e| error_chain(&e))
                .unwrap_or_default();
            tracing::warn!(provider = %self.name, failed, error, "warm-up could not reach the provider");
        } else {
            tracing::info!(provider = %self.name, connections = n, "provider warmed up");
        }
    }

    /// Sends a chat completion upstream.
    ///
    /// # Errors
    /// Any upstream failure, mapped to the status the client should see.
    pub async fn chat(&self, req: &ChatRequest, model: &str) -> Result<ChatReply, GatewayError> {
        match self.wire {
            Wire::OpenAi => openai::chat(self, req, model).await,
            Wire::Anthropic => anthropic::chat(self, req, model).await,
        }
    }

    /// Sends an embeddings request upstream; returns the body and its usage.
    ///
    /// # Errors
    /// 400 for a provider without embeddings; upstream failures as for chat.
    pub async fn embeddings(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<(Bytes, Option<Usage>, Duration), GatewayError> {
        match self.wire {
            Wire::OpenAi => openai::embeddings(self, req, model).await,
            Wire::Anthropic => Err(GatewayError::invalid(
                format!(
                    "Model `{}` is served by an Anthropic provider, which has no embeddings API.",
                    req.model
                ),
                Some("model"),
            )),
        }
    }

    /// Sends an already encoded OpenAI embeddings body (the micro-batcher's).
    ///
    /// # Errors
    /// As for [`Provider::embeddings`].
    pub async fn embeddings_body(
        &self,
        body: Vec<u8>,
    ) -> Result<(Bytes, Option<Usage>, Duration), GatewayError> {
        match self.wire {
            Wire::OpenAi => openai::embeddings_body(self, body).await,
            Wire::Anthropic => Err(GatewayError::invalid(
                "Anthropic providers have no embeddings API.",
                Some("model"),
            )),
        }
    }

    /// Waits for a request slot under this provider's `max_concurrent`.
    async fn slot(&self) -> Result<Slot, GatewayError> {
        let admitted = self
            .queue
            .acquire()
            .await
            .map_err(|_| GatewayError::ProviderBusy {
                provider: self.name.to_string(),
                retry_after: self.queue.retry_after_secs(),
            })?;
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            _admitted: admitted,
            stats: self.stats.clone(),
        })
    }

    /// POSTs `body` to `path` and waits for a successful status within the first-byte
    /// timeout. Error statuses are read and mapped here.
    pub(crate) async fn post(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(reqwest::Response, Slot, Instant), GatewayError> {
        let slot = self.slot().await?;
        let started = Instant::now();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}{}", self.base_url, path);
        let send = self.client.post(url).body(body).send();
        let response = match tokio::time::timeout(self.config.first_byte_timeout, send).await {
            Err(_) => return Err(self.failed(self.timeout("the response headers"))),
            Ok(Err(e)) => return Err(self.failed(self.transport_error(&e))),
            Ok(Ok(response)) => response,
        };
        if response.status().is_success() {
            Ok((response, slot, started))
        } else {
            let err = self.status_error(response).await;
            Err(if err.is_retryable() {
                self.failed(err)
            } else {
                err
            })
        }
    }

    /// Reads a whole body within what is left of the total timeout.
    pub(crate) async fn read_body(
        &self,
        response: reqwest::Response,
        started: Instant,
    ) -> Result<Bytes, GatewayError> {
        let left = self.config.total_timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, response.bytes()).await {
            Err(_) => Err(self.failed(self.timeout("the response body"))),
            Ok(Err(e)) => Err(self.failed(self.transport_error(&e))),
            Ok(Ok(body)) => Ok(body),
        }
    }

    fn failed(&self, err: GatewayError) -> GatewayError {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        err
    }

    pub(crate) fn timeout(&self, phase: &'static str) -> GatewayError {
        GatewayError::UpstreamTimeout {
            provider: self.name.to_string(),
            phase,
        }
    }

    pub(crate) fn protocol_error(&self, message: impl Into<String>) -> GatewayError {
        self.failed(GatewayError::UpstreamProtocol {
            provider: self.name.to_string(),
            message: message.into(),
        })
    }

    pub(crate) fn transport_error(&self, e: &reqwest::Error) -> GatewayError {
        if e.is_timeout() {
            return self.timeout("a connection");
        }
        let what = if e.is_connect() {
            "could not connect"
        } else if e.is_body() || e.is_decode() {
            "connection lost while reading the response"
        } else {
            "request failed"
        };
        GatewayError::UpstreamFailed {
            provider: self.name.to_string(),
            status: None,
            message: format!("{what}: {}", error_chain(e)),
        }
    }

    /// Maps an upstream error status and body to what the client sees.
    async fn status_error(&self, response: reqwest::Response) -> GatewayError {
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = read_capped(response, MAX_ERROR_BODY).await;
        let (error_type, message, param, code) = match self.wire {
            Wire::OpenAi => openai::decode_error(&body),
            Wire::Anthropic => anthropic::decode_error(&body).map(|(t, m)| (t, m, None, None)),
        }
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)])
                .trim()
                .to_string();
            let message = if text.is_empty() {
                format!("HTTP {status}")
            } else {
                text
            };
            ("upstream_error".to_string(), message, None, None)
        });
        let provider = self.name.to_string();
        match status {
            StatusCode::TOO_MANY_REQUESTS => GatewayError::UpstreamRateLimited {
                provider,
                message,
                retry_after,
            },
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
                GatewayError::UpstreamTimeout {
                    provider,
                    phase: "its own upstream",
                }
            }
            // Our credentials or our account: nothing the client can fix.
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::PAYMENT_REQUIRED => {
                GatewayError::UpstreamFailed {
                    provider,
                    status: Some(status),
                    message: format!("the provider refused Switchyard's credentials: {message}"),
                }
            }
            s if s.is_client_error() => GatewayError::UpstreamRejected {
                provider,
                status: s,
                message,
                error_type,
                param,
                code,
            },
            s => GatewayError::UpstreamFailed {
                provider,
                status: Some(s),
                message: format!("HTTP {}: {message}", s.as_u16()),
            },
        }
    }
}

/// Reads at most `cap` bytes of a body, giving up quietly on errors or after 5 s.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = response.chunk().await {
            let room = cap.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if out.len() >= cap {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    out
}

/// An error with its sources, on one line (reqwest's top-level message hides the cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
