//! `POST /v1/chat/completions`: parse once, resolve the alias, call the provider, and
//! answer with the upstream's body or its stream, flushed event by event.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::app::AppState;
use crate::error::GatewayError;
use crate::providers::ChatReply;
use crate::telemetry::RequestLog;
use crate::wire::ChatRequest;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = RequestLog::start("chat", super::request_id(&headers));
    let result = async {
        let body = body.map_err(|r| {
            GatewayError::from_body_rejection(r, state.settings.server.max_body_bytes)
        })?;
        let req = ChatRequest::parse(body)?;
        log.stream = req.stream;
        let route = state.models.resolve(&req.model)?;
        log.model = Some(route.alias.clone());
        let admitted = super::admit(&state).await?;
        let req = &req;
        let dispatched = state
            .models
            .dispatch(route, super::deadline(&state), |d| async move {
                d.provider.chat(req, &d.model).await
            })
            .await?;
        log.provider = Some(dispatched.deployment.provider.name.clone());
        Ok::<_, GatewayError>((dispatched, admitted))
    }
    .await;
    match result {
        Err(err) => {
            log.fail(err.status().as_u16(), err.kind());
            err.into_response()
        }
        Ok((dispatched, admitted)) => match dispatched.value {
            ChatReply::Complete {
                body,
                usage,
                upstream,
            } => {
                log.usage = usage;
                log.upstream_time(upstream);
                log.first_byte();
                log.succeed();
                json_response(body)
            }
            ChatReply::Stream(mut stream) => {
                log.upstream_time(stream.upstream_headers);
                stream.attach_log(log);
                // The slots are held until the stream ends, not just until its headers.
                stream.hold(admitted);
                stream.hold(dispatched.in_flight);
                sse_response(Body::from_stream(stream.into_body()))
            }
        },
    }
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
