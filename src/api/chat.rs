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
