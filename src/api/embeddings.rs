//! `POST /v1/embeddings`: extract, call [`crate::inference`], render. The call is a
//! pass-through with the alias swapped for the upstream model, cached and coalesced when
//! the alias asks for it, and micro-batched per deployment when `[embeddings]
//! batch_window` is set.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::guard::Caller;
use crate::state::AppState;
use crate::wire::EmbeddingsRequest;

pub async fn create(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = super::request_log(&state, "embeddings", &headers);
    let mut ctx = super::call_context(&state, "embeddings", &log, principal, &headers);
    let req = match super::parse_body(&state, body, EmbeddingsRequest::parse, &ctx, &mut log) {
        Ok(req) => req,
        Err(refused) => return refused.into_response(),
    };
    if state.settings.log.bodies {
        log.body = Some(super::loggable_body(req.object.body()));
    }
    ctx.span = tracing::info_span!(
        "embeddings",
        otel.name = "POST /v1/embeddings",
        request_id = %log.request_id,
        model = %req.model,
    );
    let model = req.model.clone();
    match state.inference.embed(&ctx, req).await {
        Err(err) => super::call_failed(&state, &mut log, &model, err),
        Ok(answer) => super::render::completion(&mut log, answer),
    }
}
