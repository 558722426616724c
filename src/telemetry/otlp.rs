//! Optional OpenTelemetry trace export over OTLP/HTTP (JSON), switched on by
//! `[log] otlp_endpoint`.
//!
//! The SDK's batch processor exports from a thread of its own, outside the async runtime;
//! the HTTP client below hands each export to the runtime (where the pooled reqwest client
//! lives) and waits for it, so no second HTTP stack or blocking client is needed.

use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Sends OTLP requests on the tokio runtime that was current when tracing started.
#[derive(Debug)]
struct RuntimeHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait]
impl HttpClient for RuntimeHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let answer = self
            .runtime
            .spawn(async move {
                let response = client.execute(request).await?;
                let status = response.status();
                let headers = response.headers().clone();
                let body = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, body))
            })
            .await??;
        let (status, headers, body) = answer;
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// Builds the tracer provider exporting to `endpoint` (the collector's base URL, e.g.
/// `http://127.0.0.1:4318`) and returns a tracer for the tracing layer.
///
/// # Errors
/// When there is no async runtime or the exporter cannot be built.
pub fn tracer(
    endpoint: &str,
    service_name: &str,
) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracer> {
    crate::providers::install_crypto();
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("OTLP export needs the async runtime"))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(RuntimeHttp { client, runtime })
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("switchyard");
    let _ = PROVIDER.set(provider);
    Ok(tracer)
}

/// Flushes and stops the exporter (at shutdown), off the async worker threads because
/// the flush waits for exports that run on them.
pub async fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let provider = provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}
