//! Providers: the upstreams that serve models, and the wire formats they speak ([`openai`]
//! for every OpenAI-compatible base URL, [`anthropic`] for the Messages API).
//!
//! A [`Provider`] is built once at start-up and shared by every request. It is a name, a
//! kind and a wire format around an [`UpstreamPool`] ([`pool`]), which owns the persistent
//! client, the connection and request counters, the per-upstream concurrency queue and the
//! timeouts. What is the provider's own: the headers its wire needs (credentials, the
//! Anthropic version), translating requests and answers, and reading its upstream's error
//! bodies, so that failures keep the upstream's message and status.

pub mod anthropic;
pub mod openai;
pub mod pool;
pub mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::admission::QueueBudget;
use crate::config::{AdmissionConfig, ProviderConfig, ProviderKind};
use crate::error::GatewayError;
use crate::wire::{ChatRequest, EmbeddingsRequest, Usage};

pub use pool::{ErrorDetail, PoolSnapshot, PoolStats, Slot, UpstreamPool};
pub use stream::UpstreamStream;

/// The wire format spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    OpenAi,
    Anthropic,
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

/// One configured model upstream: its wire format around a pooled client.
pub struct Provider {
    pub name: Arc<str>,
    pub kind: ProviderKind,
    pub wire: Wire,
    config: ProviderConfig,
    pool: UpstreamPool,
}

impl Provider {
    /// Builds the provider: the headers its wire needs on every request, then its pool.
    /// `base_url` is resolved by the caller (the simulated provider's comes from the
    /// in-process mock).
    ///
    /// # Errors
    /// When a configured header is invalid or the TLS stack cannot be built.
    pub fn build(
        name: &str,
        config: &ProviderConfig,
        base_url: &str,
        admission: &AdmissionConfig,
    ) -> Result<Provider, anyhow::Error> {
        let wire = match config.kind() {
            ProviderKind::Anthropic => Wire::Anthropic,
            ProviderKind::Openai | ProviderKind::Simulated => Wire::OpenAi,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(key) = config.api_key() {
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
        if let ProviderConfig::Anthropic(anthropic) = config {
            headers.insert(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::try_from(anthropic.anthropic_version.as_str())?,
            );
        }
        for (key, value) in config.headers() {
            let mut value = HeaderValue::try_from(value.expose())?;
            value.set_sensitive(true);
            headers.insert(HeaderName::try_from(key.as_str())?, value);
        }
        let pool = UpstreamPool::build(name, base_url, config.pool(), headers, admission)?;
        Ok(Provider {
            name: pool.name().clone(),
            kind: config.kind(),
            wire,
            config: config.clone(),
            pool,
        })
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.config
    }

    /// The pooled client: counters, concurrency queue, timeouts, base URL.
    pub fn pool(&self) -> &UpstreamPool {
        &self.pool
    }

    /// Opens `warm_connections` connections ahead of traffic by listing models (both
    /// wires have `GET /models`). Failures are logged, never fatal: the provider may come
    /// up later.
    pub async fn warm(&self) {
        self.pool.warm("/models").await;
    }

    /// Sends a chat completion upstream; `queue` is what the request may still wait for
    /// admission, across its attempts.
    ///
    /// # Errors
    /// Any upstream failure, mapped to the status the client should see.
    pub async fn chat(
        &self,
        req: &ChatRequest,
        model: &str,
        queue: QueueBudget,
    ) -> Result<ChatReply, GatewayError> {
        match self.wire {
            Wire::OpenAi => openai::chat(self, req, model, queue).await,
            Wire::Anthropic => anthropic::chat(self, req, model, queue).await,
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
        queue: QueueBudget,
    ) -> Result<(Bytes, Option<Usage>, Duration), GatewayError> {
        match self.wire {
            Wire::OpenAi => openai::embeddings(self, req, model, queue).await,
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
        queue: QueueBudget,
    ) -> Result<(Bytes, Option<Usage>, Duration), GatewayError> {
        match self.wire {
            Wire::OpenAi => openai::embeddings_body(self, body, queue).await,
            Wire::Anthropic => Err(GatewayError::invalid(
                "Anthropic providers have no embeddings API.",
                Some("model"),
            )),
        }
    }

    /// POSTs `body` to `path` through the pool; an error status is read in this
    /// provider's wire format.
    pub(crate) async fn post(
        &self,
        path: &str,
        body: Vec<u8>,
        queue: QueueBudget,
    ) -> Result<(reqwest::Response, Slot, Instant), GatewayError> {
        self.pool
            .post(path, body, queue, |error| self.decode_error(error))
            .await
    }

    /// Reads a whole body within what is left of the total timeout.
    pub(crate) async fn read_body(
        &self,
        response: reqwest::Response,
        started: Instant,
    ) -> Result<Bytes, GatewayError> {
        self.pool.read_body(response, started).await
    }

    pub(crate) fn protocol_error(&self, message: impl Into<String>) -> GatewayError {
        self.pool.protocol_error(message)
    }

    /// An upstream error body in OpenAI's terms; `None` when it is not in the wire's shape.
    fn decode_error(&self, body: &[u8]) -> Option<ErrorDetail> {
        match self.wire {
            Wire::OpenAi => openai::decode_error(body),
            Wire::Anthropic => anthropic::decode_error(body).map(|(t, m)| (t, m, None, None)),
        }
    }
}

/// rustls needs one process-wide crypto provider; ring builds without cmake or NASM.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
