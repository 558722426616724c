//! `POST /v1/chat/completions`: extract, call [`crate::inference`], render. A stream is
//! flushed to the client event by event.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::guard::Caller;
use super::render::{cache_header, served, sse_response};
use crate::inference::ChatReply;
use crate::state::AppState;
use crate::tokens::Preflight;
use crate::wire::ChatRequest;

/// Set when the pre-flight dropped old messages to fit the context window: how many.
pub const TRUNCATED_HEADER: &str = "x-switchyard-truncated";

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = super::request_log(&state, "chat", &headers);
    let mut ctx = super::call_context(&state, "chat", &log, principal, &headers);
    let mut req = match super::parse_body(&state, body, ChatRequest::parse, &ctx, &mut log) {
        Ok(req) => req,
        Err(refused) => return refused.into_response(),
    };
    // The token pre-flight, for aliases that ask for one: one map lookup for the others.
    let mut truncated = None;
    let budget = *state.budgets.get(&req.model);
    if budget.preflight != Preflight::Off {
        let alias = req.model.clone();
        match crate::tokens::preflight::run(budget, req).await {
            Ok((checked, dropped)) => {
                req = checked;
                truncated = dropped;
            }
            Err(err) => {
                ctx.metering.refused(Some(&alias), &err);
                return super::call_failed(&state, &mut log, &alias, err);
            }
        }
    }
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
    // The alias's server-side tools, for a client that opts in: the loop's last answer,
    // whole or replayed as a stream.
    let opted_in = headers
        .get(crate::conversations::chat_tools::HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"auto"));
    if opted_in && state.conversations.offers_tools(&model) {
        let stream = req.stream;
        let include_usage = req
            .object
            .raw("stream_options")
            .and_then(|o| serde_json::from_str::<serde_json::Value>(o).ok())
            .and_then(|o| o.get("include_usage").and_then(serde_json::Value::as_bool))
            .unwrap_or(false);
        let mut response = match state.conversations.chat_with_tools(&ctx, req).await {
            Err(err) => super::call_failed(&state, &mut log, &model, err),
            Ok(completion) if !stream => super::render::completion(&mut log, completion),
            Ok(completion) => {
                match crate::cache::replay::completion_to_events(&completion.body, include_usage) {
                    Ok(events) => {
                        served(&mut log, &completion.served);
                        log.usage = completion.usage;
                        log.first_byte();
                        log.succeed();
                        let body = futures_util::stream::iter(
                            events.into_iter().map(Ok::<_, std::convert::Infallible>),
                        );
                        sse_response(Body::from_stream(body))
                    }
                    Err(e) => super::call_failed(
                        &state,
                        &mut log,
                        &model,
                        crate::error::GatewayError::Internal(format!("the answer: {e}")),
                    ),
                }
            }
        };
        if let Some(dropped) = truncated {
            response
                .headers_mut()
                .insert(TRUNCATED_HEADER, HeaderValue::from(dropped));
        }
        return response;
    }
    let mut response = match state.inference.chat(&ctx, req).await {
        Err(err) => super::call_failed(&state, &mut log, &model, err),
        Ok(ChatReply::Complete(completion)) => super::render::completion(&mut log, completion),
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
    };
    if let Some(dropped) = truncated {
        response
            .headers_mut()
            .insert(TRUNCATED_HEADER, HeaderValue::from(dropped));
    }
    response
}
