//! `POST /v1/embeddings`: a pass-through with the alias swapped for the upstream model.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::app::AppState;
use crate::error::GatewayError;
use crate::telemetry::RequestLog;
use crate::wire::EmbeddingsRequest;

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = RequestLog::start("embeddings", super::request_id(&headers));
    let result = async {
        let body = body.map_err(|r| {
            GatewayError::from_body_rejection(r, state.settings.server.max_body_bytes)
        })?;
        let req = EmbeddingsRequest::parse(body)?;
        let route = state.models.resolve(&req.model)?;
        log.model = Some(route.alias.clone());
        let _admitted = super::admit(&state).await?;
        let req = &req;
        let dispatched = state
            .models
            .dispatch(route, super::deadline(&state), |d| async move {
                d.provider.embeddings(req, &d.model).await
            })
            .await?;
        log.provider = Some(dispatched.deployment.provider.name.clone());
        Ok::<_, GatewayError>(dispatched.value)
    }
    .await;
    match result {
        Err(err) => {
            log.fail(err.status().as_u16(), err.kind());
            err.into_response()
        }
        Ok((body, usage, upstream)) => {
            log.usage = usage;
            log.upstream_time(upstream);
            log.first_byte();
            log.succeed();
            super::chat::json_response(body)
        }
    }
}
