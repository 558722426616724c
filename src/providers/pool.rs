//! The pooled HTTP client of one upstream, whatever it speaks.
//!
//! An [`UpstreamPool`] is built once from a [`PoolConfig`], a base URL and the headers every
//! request carries. It owns a persistent client (keep-alive, TCP_NODELAY, connect timeout,
//! a bound on idle connections, no proxy), counts the requests it sends and the connections
//! it opens ([`PoolStats`]) so the reuse rate can be read, bounds concurrent requests with
//! its own [`AdmissionQueue`], applies the first-byte and total timeouts, and maps
//! transport failures and error statuses to [`GatewayError`]s that keep the upstream
//! status and say whether a retry could help.
//!
//! Nothing here knows a wire format: reading an upstream's error body is the caller's
//! (see `post`), so a model provider holds one pool, and any other HTTP API the gateway
//! calls (a search or a quote service) can hold one without being a provider.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use serde::Serialize;

use super::error_chain;
use crate::admission::{AdmissionQueue, Admitted, QueueBudget};
use crate::config::{AdmissionConfig, PoolConfig};
use crate::error::GatewayError;

/// Upstream error bodies are read up to this size for their message; the rest is dropped.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What an upstream error body says, in OpenAI's terms: `(type, message, param, code)`.
pub type ErrorDetail = (String, String, Option<String>, Option<String>);

/// Pool and traffic counters of one upstream.
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

/// One upstream's client, counters, concurrency queue and timeouts.
pub struct UpstreamPool {
    /// Who the upstream is in errors, logs and queue metrics (the provider's name).
    name: Arc<str>,
    base_url: String,
    /// Parsed URLs of the paths posted to: parsing one (host, IDNA) costs more than the
    /// rest of building the request, and an upstream is called on a handful of paths.
    urls: std::sync::RwLock<Vec<(Box<str>, reqwest::Url)>>,
    client: reqwest::Client,
    config: PoolConfig,
    stats: Arc<PoolStats>,
    queue: AdmissionQueue,
}

impl UpstreamPool {
    /// Builds the client. `headers` go on every request (content type, credentials);
    /// requests beyond `config.max_concurrent` wait under `admission`'s queue bounds.
    ///
    /// # Errors
    /// When the TLS stack cannot be built.
    pub fn build(
        name: &str,
        base_url: &str,
        config: &PoolConfig,
        headers: HeaderMap,
        admission: &AdmissionConfig,
    ) -> Result<UpstreamPool, reqwest::Error> {
        let stats = Arc::new(PoolStats::default());
        let connections = stats.clone();
        let mut client = reqwest::Client::builder();
        if config.http2_prior_knowledge {
            client = client.http2_prior_knowledge();
        }
        let client = client
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
        Ok(UpstreamPool {
            name: name.into(),
            base_url: base_url.trim_end_matches('/').to_string(),
            urls: std::sync::RwLock::default(),
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

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The base URL without a trailing slash; request paths are appended to it.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    /// This upstream's concurrency limit and queue.
    pub fn queue(&self) -> &AdmissionQueue {
        &self.queue
    }

    /// The base URL joined with `path`, parsed once per path (up to a few paths).
    fn url(&self, path: &str) -> Result<reqwest::Url, ()> {
        const KEPT: usize = 16;
        let read = self
            .urls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, url)) = read.iter().find(|(p, _)| &**p == path) {
            return Ok(url.clone());
        }
        drop(read);
        let url = reqwest::Url::parse(&format!("{}{}", self.base_url, path)).map_err(|_| ())?;
        let mut write = self
            .urls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if write.len() < KEPT && !write.iter().any(|(p, _)| &**p == path) {
            write.push((path.into(), url.clone()));
        }
        Ok(url)
    }

    /// Opens `warm_connections` connections ahead of traffic by GETting `path`
    /// concurrently. Failures are logged, never fatal: the upstream may come up later.
    pub async fn warm(&self, path: &str) {
        let n = self.config.warm_connections;
        if n == 0 {
            return;
        }
        let url = format!("{}{}", self.base_url, path);
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

    /// Waits for a request slot under this upstream's `max_concurrent`, within what is
    /// left of the request's queue budget.
    ///
    /// # Errors
    /// [`GatewayError::ProviderBusy`] when the queue is full or the wait ran out.
    pub async fn slot(&self, queue: QueueBudget) -> Result<Slot, GatewayError> {
        let admitted =
            self.queue
                .acquire_within(queue)
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
    /// timeout. An error status is mapped here; `decode_error` reads the upstream's error
    /// body in its own format (`None`: the body's text is the message).
    ///
    /// # Errors
    /// Busy, timeout, transport and status errors, as the client should see them.
    pub async fn post(
        &self,
        path: &str,
        body: Vec<u8>,
        queue: QueueBudget,
        decode_error: impl FnOnce(&[u8]) -> Option<ErrorDetail>,
    ) -> Result<(reqwest::Response, Slot, Instant), GatewayError> {
        let slot = self.slot(queue).await?;
        let started = Instant::now();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let send = match self.url(path) {
            Ok(url) => self.client.post(url),
            // An unparseable URL fails in `send` with reqwest's own words.
            Err(()) => self.client.post(format!("{}{}", self.base_url, path)),
        }
        .body(body)
        .send();
        let response = match tokio::time::timeout(self.config.first_byte_timeout, send).await {
            Err(_) => return Err(self.failed(self.timeout("the response headers"))),
            Ok(Err(e)) => return Err(self.failed(self.transport_error(&e))),
            Ok(Ok(response)) => response,
        };
        if response.status().is_success() {
            Ok((response, slot, started))
        } else {
            let err = self.status_error(response, decode_error).await;
            Err(if err.is_retryable() {
                self.failed(err)
            } else {
                err
            })
        }
    }

    /// Reads a whole body within what is left of the total timeout.
    ///
    /// # Errors
    /// A timeout or a connection lost while reading.
    pub async fn read_body(
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

    /// Counts `err` as a failed upstream request.
    fn failed(&self, err: GatewayError) -> GatewayError {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        err
    }

    fn timeout(&self, phase: &'static str) -> GatewayError {
        GatewayError::UpstreamTimeout {
            provider: self.name.to_string(),
            phase,
        }
    }

    /// An answer that could not be understood; counted as a failure.
    pub fn protocol_error(&self, message: impl Into<String>) -> GatewayError {
        self.failed(GatewayError::UpstreamProtocol {
            provider: self.name.to_string(),
            message: message.into(),
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> GatewayError {
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
    async fn status_error(
        &self,
        response: reqwest::Response,
        decode_error: impl FnOnce(&[u8]) -> Option<ErrorDetail>,
    ) -> GatewayError {
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = read_capped(response, MAX_ERROR_BODY).await;
        let (error_type, message, param, code) = decode_error(&body).unwrap_or_else(|| {
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

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::post;

    use super::*;

    fn budget() -> QueueBudget {
        QueueBudget::new(std::time::Duration::from_secs(1))
    }

    /// Serves `router` on a free loopback port; returns its base URL.
    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}/v1/")
    }

    /// A plain JSON API that is no model provider gets the pool's connection reuse and
    /// counting, its slots and its error mapping.
    #[tokio::test]
    async fn any_http_api_gets_pooling_counting_and_error_mapping() {
        crate::app::install_crypto();
        let router = Router::new()
            .route("/v1/quote", post(|body: Bytes| async move { body }))
            .route(
                "/v1/busy",
                post(|| async {
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [(header::RETRY_AFTER, "3")],
                        "slow down",
                    )
                }),
            );
        let base_url = serve(router).await;
        let pool = UpstreamPool::build(
            "quotes",
            &base_url,
            &PoolConfig::default(),
            HeaderMap::new(),
            &AdmissionConfig::default(),
        )
        .unwrap();
        assert_eq!(pool.base_url(), base_url.trim_end_matches('/'));

        for _ in 0..3 {
            let (response, slot, started) = pool
                .post("/quote", b"ACME".to_vec(), budget(), |_| None)
                .await
                .unwrap();
            assert_eq!(pool.stats().snapshot().in_flight, 1);
            let body = pool.read_body(response, started).await.unwrap();
            drop(slot);
            assert_eq!(&body[..], b"ACME");
        }
        let err = pool
            .post("/busy", Vec::new(), budget(), |_| None)
            .await
            .err();
        let Some(GatewayError::UpstreamRateLimited {
            provider,
            message,
            retry_after,
        }) = err
        else {
            panic!("{err:?}");
        };
        assert_eq!(
            (provider.as_str(), message.as_str(), retry_after),
            ("quotes", "slow down", Some(3))
        );

        let stats = pool.stats().snapshot();
        assert_eq!(stats.requests, 4);
        assert_eq!(
            stats.connections, 1,
            "one kept-alive connection serves them all"
        );
        assert_eq!(stats.failures, 1);
        assert_eq!(stats.in_flight, 0);
        assert_eq!(pool.queue().snapshot().admitted, 4);
    }

    /// With `http2_prior_knowledge`, concurrent requests to a plain-HTTP upstream are
    /// HTTP/2 streams on one connection instead of a connection each.
    #[tokio::test]
    async fn prior_knowledge_multiplexes_requests_over_http2() {
        crate::app::install_crypto();
        let router = Router::new().route(
            "/v1/version",
            post(|req: axum::extract::Request| async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                format!("{:?}", req.version())
            }),
        );
        let base_url = serve(router).await;
        let config = PoolConfig {
            http2_prior_knowledge: true,
            ..PoolConfig::default()
        };
        let pool = UpstreamPool::build(
            "h2c",
            &base_url,
            &config,
            HeaderMap::new(),
            &AdmissionConfig::default(),
        )
        .unwrap();
        let calls = (0..8).map(|_| async {
            let (response, slot, started) = pool
                .post("/version", Vec::new(), budget(), |_| None)
                .await
                .unwrap();
            let body = pool.read_body(response, started).await.unwrap();
            drop(slot);
            body
        });
        for body in futures_util::future::join_all(calls).await {
            assert_eq!(&body[..], b"HTTP/2.0");
        }
        assert_eq!(pool.stats().snapshot().connections, 1);
    }
}
