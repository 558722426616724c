//! `/admin/...`: operator views, behind the admin key (`[admin] key`).
//!
//! Without a configured key every admin route answers 401, so the admin surface is never
//! open by accident. The key is compared in constant time.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::error::GatewayError;

/// Checks `Authorization: Bearer <admin key>`.
///
/// # Errors
/// 401 in OpenAI shape when the key is missing, wrong, or not configured.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(expected) = &state.settings.admin.key else {
        return Err(GatewayError::Unauthorized(
            "The admin API is disabled: set [admin] key to enable it.".into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes())) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized(
            "Missing or invalid admin key.".into(),
        ))
    }
}

/// `GET /admin/providers`: every provider's pool and every deployment's health.
pub async fn providers(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let providers: Vec<_> = state
        .providers
        .values()
        .map(|p| {
            json!({
                "name": &*p.name,
                "kind": format!("{:?}", p.kind).to_lowercase(),
                "base_url": p.base_url,
                "pool": p.stats.snapshot(),
                "queue": p.queue.snapshot(),
            })
        })
        .collect();
    let deployments: Vec<_> = state
        .models
        .deployments()
        .iter()
        .map(|d| d.snapshot())
        .collect();
    axum::Json(json!({"providers": providers, "deployments": deployments})).into_response()
}

/// `GET /admin/limits`: the global and per-provider admission queues.
pub async fn limits(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let providers: serde_json::Map<String, serde_json::Value> = state
        .providers
        .values()
        .map(|p| {
            (
                p.name.to_string(),
                serde_json::to_value(p.queue.snapshot()).unwrap_or_default(),
            )
        })
        .collect();
    axum::Json(json!({"global": state.admission.snapshot(), "providers": providers}))
        .into_response()
}

/// `GET /admin/cache`: entries, bytes, hits, misses, evictions, coalesced requests.
pub async fn cache(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let mut snapshot = serde_json::to_value(state.cache.snapshot().await).unwrap_or_default();
    if let Some(obj) = snapshot.as_object_mut() {
        obj.insert("flights_in_progress".into(), json!(state.flights.len()));
    }
    axum::Json(snapshot).into_response()
}

/// `POST /admin/cache/clear`: drops every cached answer.
pub async fn clear_cache(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    state.cache.clear().await;
    tracing::info!("cache cleared by the admin API");
    axum::Json(json!({"cleared": true})).into_response()
}
