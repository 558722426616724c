//! HTTP surface: one module per endpoint family, plus the small routes every deployment
//! needs (health, readiness, metrics) and the fallbacks that keep even a wrong URL in
//! OpenAI error shape.

pub mod admin;
pub mod batches;
pub mod chat;
pub mod conversations;
pub mod dashboard;
pub mod embeddings;
pub mod events;
pub mod files;
pub mod guard;
pub mod jobs;
pub mod memories;
pub mod models;
pub mod page;
pub mod render;
pub mod responses;
pub mod responses_ws;
pub mod router;
pub mod socket;
pub mod tools;
pub mod usage;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::cache::CacheDirective;
use crate::error::GatewayError;
use crate::inference::CallContext;
use crate::state::AppState;

/// The request id header, read from the client or assigned, and echoed on the response.
pub const REQUEST_ID: &str = "x-request-id";

/// Liveness: the process is up and serving. No auth, no timeout wrapper, no I/O.
pub async fn health() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
}

/// Readiness: start-up (provider warm-up) is done and the instance is not draining. The
/// database's last health check is reported too; an unreachable database leaves the
/// instance ready (keys are cached and usage rows wait in the writer's queue), so a
/// database restart does not take every instance out of the load balancer at once.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let (status, phase) = if state.lifecycle.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !state.lifecycle.is_warmed() {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    } else {
        (StatusCode::OK, "ready")
    };
    let database = if state.store.is_healthy() {
        "ok"
    } else {
        "unavailable"
    };
    let body = serde_json::json!({
        "status": phase,
        "database": {"backend": state.store.backend(), "status": database},
    })
    .to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A request record that feeds the access log, metrics and live statistics.
fn request_log(
    state: &AppState,
    route: &'static str,
    headers: &axum::http::HeaderMap,
) -> crate::telemetry::RequestLog {
    crate::telemetry::RequestLog::with_stats(route, request_id(headers), Some(state.stats.clone()))
}

/// The inference context of an HTTP request: its id, its caller, and the cache directive
/// of its headers.
fn call_context(
    state: &AppState,
    route: &'static str,
    log: &crate::telemetry::RequestLog,
    principal: Option<Arc<crate::auth::Principal>>,
    headers: &axum::http::HeaderMap,
) -> CallContext {
    let mut ctx = state
        .inference
        .context(route, log.request_id.clone(), principal);
    ctx.cache = CacheDirective::from_headers(headers);
    ctx
}

/// The request body read and parsed by `parse`; a refusal (too large, malformed) is
/// logged and metered under the caller's key, for the handler to answer.
fn parse_body<T>(
    state: &AppState,
    body: Result<bytes::Bytes, axum::extract::rejection::BytesRejection>,
    parse: impl FnOnce(bytes::Bytes) -> Result<T, GatewayError>,
    ctx: &CallContext,
    log: &mut crate::telemetry::RequestLog,
) -> Result<T, GatewayError> {
    body.map_err(|r| GatewayError::from_body_rejection(r, state.settings.server.max_body_bytes))
        .and_then(parse)
        .inspect_err(|err| {
            ctx.metering.refused(None, err);
            log.fail(err.status().as_u16(), err.kind());
        })
}

/// A call that failed: logged under the alias when `model` is one (a refusal by the key's
/// limits, say), answered in OpenAI shape.
fn call_failed(
    state: &AppState,
    log: &mut crate::telemetry::RequestLog,
    model: &str,
    err: GatewayError,
) -> Response {
    log.model = state
        .inference
        .models()
        .resolve(model)
        .ok()
        .map(|r| r.alias.clone());
    fail(log, err)
}

/// A store failure as the client sees it: the store is briefly unavailable (503, retry).
fn store_failed(e: crate::store::StoreError) -> GatewayError {
    tracing::error!(error = %e, "conversation store");
    GatewayError::DependencyUnavailable("The conversation store")
}

/// Logs a failure and answers it.
fn fail(log: &mut crate::telemetry::RequestLog, err: GatewayError) -> Response {
    log.fail(err.status().as_u16(), err.kind());
    err.into_response()
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<Arc<AppState>>, req: Request) -> Response {
    if !state.settings.server.metrics {
        return not_found(req).await.into_response();
    }
    for provider in state.providers.values() {
        let stats = provider.pool().stats().snapshot();
        let name = provider.name.to_string();
        metrics::gauge!("switchyard_upstream_requests", "provider" => name.clone())
            .set(stats.requests as f64);
        metrics::gauge!("switchyard_upstream_connections_opened", "provider" => name.clone())
            .set(stats.connections as f64);
        metrics::gauge!("switchyard_upstream_in_flight", "provider" => name.clone())
            .set(stats.in_flight as f64);
        metrics::gauge!("switchyard_upstream_connection_reuse_ratio", "provider" => name)
            .set(stats.reuse_rate);
    }
    if let Some(rss) = crate::telemetry::resident_memory_bytes() {
        metrics::gauge!("process_resident_memory_bytes").set(rss as f64);
    }
    if let Some(heap) = crate::telemetry::heap_bytes() {
        metrics::gauge!("switchyard_heap_allocated_bytes").set(heap.allocated_bytes as f64);
        metrics::gauge!("switchyard_heap_resident_bytes").set(heap.resident_bytes as f64);
    }
    if let Some(fds) = crate::telemetry::stats::open_fds() {
        metrics::gauge!("process_open_fds").set(fds as f64);
    }
    let inference = &state.inference;
    metrics::gauge!("switchyard_cache_flights_in_progress").set(inference.flights().len() as f64);
    let cache = inference.cache().snapshot().await;
    if let (Some(entries), Some(bytes)) = (cache.entries, cache.bytes) {
        metrics::gauge!("switchyard_cache_entries").set(entries as f64);
        metrics::gauge!("switchyard_cache_bytes").set(bytes as f64);
    }
    metrics::gauge!("switchyard_cache_evictions").set(cache.evictions as f64);
    let body = crate::telemetry::prometheus().render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

/// Unknown URL: 404 in OpenAI shape.
/// An extractor's refusal (malformed JSON, form or path segment; wrong content type) in
/// OpenAI's error shape, keeping the status axum chose for it (400, 413, 415, 422).
fn rejected(rejection: impl IntoResponse + std::fmt::Display) -> Response {
    let message = rejection.to_string();
    let status = rejection.into_response().status();
    let mut response = GatewayError::invalid(message, None).into_response();
    *response.status_mut() = status;
    response
}

pub async fn not_found(req: Request) -> GatewayError {
    GatewayError::RouteNotFound {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
    }
}

/// Known URL, wrong method: 405 in OpenAI shape.
pub async fn method_not_allowed(req: Request) -> GatewayError {
    GatewayError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
    }
}

/// A request body cut to what the access log may hold (`[log] bodies = true`).
fn loggable_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let max = crate::telemetry::MAX_LOGGED_BODY;
    if text.len() <= max {
        return text.into_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The request id assigned by the request-id middleware.
pub fn request_id(req_headers: &axum::http::HeaderMap) -> Arc<str> {
    req_headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .into()
}
