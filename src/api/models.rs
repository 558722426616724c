//! `GET /v1/models`: the configured aliases, rendered once at start-up.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use serde_json::json;

use crate::app::AppState;
use crate::routing::ModelTable;

pub async fn list(State(state): State<Arc<AppState>>) -> Response {
    super::chat::json_response(state.models_json.clone())
}

/// The OpenAI model list for every alias, in config order.
pub fn render(models: &ModelTable, created: u64) -> Bytes {
    let data: Vec<_> = models
        .iter()
        .map(|route| {
            json!({
                "id": route.alias,
                "object": "model",
                "created": created,
                "owned_by": route
                    .deployments
                    .first()
                    .map_or("switchyard", |w| &*w.deployment.provider.name),
            })
        })
        .collect();
    Bytes::from(json!({"object": "list", "data": data}).to_string())
}
