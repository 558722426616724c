//! `POST /v1/chat/completions`: extract, call [`crate::inference`], render. A stream is
//! flushed to the client event by event.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::guard::Caller;
use super::render::{cache_header, json_response, served, sse_response, with_cache_header};
use crate::error::GatewayError;
use crate::inference::ChatReply;
use crate::state::AppState;
use crate::telemetry::RequestLog;
use crate::wire::ChatRequest;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = super::request_log(&state, "chat", &headers);
    let mut ctx = super::call_context(&state, "chat", &log, principal, &headers);
    let req = match body
        .map_err(|r| GatewayError::from_body_rejection(r, state.settings.server.max_body_bytes))
        .and_then(ChatRequest::parse)
    {
        Ok(req) => req,
        Err(err) => {
            ctx.metering.refused(None, &err);
            return fail(&mut log, err);
        }
    };
    // Fields given at creation: recording them later costs a re-encode in the JSON log layer.
    ctx.span = tracing::info_span!(
        "chat.completions",
        otel.name = "POST /v1/chat/completions",
        request_id = %log.request_id,
        model = %req.model,
        stream = req.stream,
    );
    log.stream = req.stream;
    if state.settings.log.bodies {
        log.body = Some(super::loggable_body(req.object.body()));
    }
    let model = req.model.clone();
    match state.inference.chat(&ctx, req).await {
        Err(err) => {
            // Logged under the alias when it is one (a refusal by the key's limits, say).
            log.model = state
                .inference
                .models()
                .resolve(&model)
                .ok()
                .map(|r| r.alias.clone());
            fail(&mut log, err)
        }
        Ok(ChatReply::Complete(completion)) => {
            served(&mut log, &completion.served);
            log.usage = completion.usage;
            log.first_byte();
            log.succeed();
            with_cache_header(json_response(completion.body), &completion.served)
        }
        Ok(ChatReply::Stream(stream)) => {
            served(&mut log, stream.served());
            let header = cache_header(stream.served());
            let body =
                futures_util::stream::unfold((stream, log), |(mut stream, mut log)| async move {
                    match stream.next().await {
                        Some(event) => {
                            log.first_byte();
                            Some((Ok::<_, std::convert::Infallible>(event.raw), (stream, log)))
                        }
                        None => {
                            // A coalesced stream learns who answered only at its end.
                            log.provider = stream.served().provider.clone();
                            log.usage = stream.usage();
                            match stream.failure() {
                                Some((status, kind)) => log.fail(status, kind),
                                None => log.succeed(),
                            }
                            None
                        }
                    }
                });
            let mut response = sse_response(Body::from_stream(body));
            if let Some(value) = header {
                response
                    .headers_mut()
                    .insert(super::render::CACHE_HEADER, value);
            }
            response
        }
    }
}

fn fail(log: &mut RequestLog, err: GatewayError) -> Response {
    log.fail(err.status().as_u16(), err.kind());
    err.into_response()
}
