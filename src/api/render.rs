//! Rendering call results as HTTP responses: JSON bodies as the upstream sent them, SSE
//! streams no proxy buffers, the cache outcome header, and who answered for the log.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::inference::Served;
use crate::telemetry::RequestLog;

/// The response header naming the cache outcome.
pub const CACHE_HEADER: &str = "x-switchyard-cache";

/// Copies who answered into the request's log.
pub fn served(log: &mut RequestLog, served: &Served) {
    log.model = Some(served.alias.clone());
    log.provider = served.provider.clone();
    if let Some(upstream) = served.upstream {
        log.upstream_time(upstream);
    }
}

pub fn cache_header(served: &Served) -> Option<HeaderValue> {
    served
        .cache_used
        .then(|| HeaderValue::from_static(if served.cache_hit { "hit" } else { "miss" }))
}

/// Names the cache outcome on a response that went through the cache.
fn with_cache_header(mut response: Response, served: &Served) -> Response {
    if let Some(value) = cache_header(served) {
        response.headers_mut().insert(CACHE_HEADER, value);
    }
    response
}

/// A JSON body as the upstream sent it.
pub fn json_response(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// An SSE response that no proxy or client buffers.
pub fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and compatible proxies buffer responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A whole answer (chat completion or embeddings) as the upstream sent it, logged.
pub fn completion(log: &mut RequestLog, completion: crate::inference::Completion) -> Response {
    served(log, &completion.served);
    log.usage = completion.usage;
    log.first_byte();
    log.succeed();
    with_cache_header(json_response(completion.body), &completion.served)
}
