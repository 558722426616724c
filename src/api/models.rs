//! `GET /v1/models`: the configured aliases, rendered once at start-up (and per request
//! for a key limited to some of them).

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use serde_json::json;

use super::guard::Caller;
use crate::routing::ModelTable;
use crate::state::AppState;

pub async fn list(State(state): State<Arc<AppState>>, Caller(principal): Caller) -> Response {
    match principal {
        Some(principal) if principal.models.is_some() => {
            let created = state.catalog.created;
            super::render::json_response(render_for(state.inference.models(), created, |alias| {
                principal.may_use(alias)
            }))
        }
        _ => super::render::json_response(state.catalog.json.clone()),
    }
}

/// The OpenAI model list for every alias, in config order.
pub fn render(models: &ModelTable, created: u64) -> Bytes {
    render_for(models, created, |_| true)
}

/// The model list restricted to the aliases `visible` accepts.
pub fn render_for(models: &ModelTable, created: u64, visible: impl Fn(&str) -> bool) -> Bytes {
    let data: Vec<_> = models
        .iter()
        .filter(|route| visible(&route.alias))
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
