//! `/admin/...`: operator views, behind the admin key (`[admin] key`).
//!
//! Without a configured key every admin route answers 401, so the admin surface is never
//! open by accident. The key is compared in constant time.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::error::GatewayError;

/// The dashboard's session cookie: a digest of the admin key, never the key itself.
pub const ADMIN_COOKIE: &str = "switchyard_admin";

/// The cookie value for an admin key.
pub fn session_token(key: &str) -> String {
    let digest = Sha256::digest(format!("switchyard-dashboard-session:{key}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks `Authorization: Bearer <admin key>` or the dashboard session cookie.
///
/// # Errors
/// 401 in OpenAI shape when the key is missing, wrong, or not configured.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(expected) = &state.settings.admin.key else {
        return Err(GatewayError::Unauthorized(
            "The admin API is disabled: set [admin] key to enable it.".into(),
        ));
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(given) = bearer
        && bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes()))
    {
        return Ok(());
    }
    let token = session_token(expected.expose());
    let has_session = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(ADMIN_COOKIE)?.strip_prefix('='))
        .any(|value| bool::from(value.as_bytes().ct_eq(token.as_bytes())));
    if has_session {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized(
            "Missing or invalid admin key.".into(),
        ))
    }
}

/// `GET /admin/stats`: percentiles per route and model over 1, 5 and 15 minutes, the
/// timeline (req/s, latency, errors, RSS, queue, cache), process figures.
pub async fn stats(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let stats = &state.stats;
    let deployments: Vec<_> = state
        .models
        .deployments()
        .iter()
        .map(|d| d.snapshot())
        .collect();
    axum::Json(json!({
        "uptime_s": stats.uptime().as_secs(),
        "rss_bytes": crate::telemetry::resident_memory_bytes(),
        "open_fds": crate::telemetry::stats::open_fds(),
        "windows": {
            "1m": stats.window(1),
            "5m": stats.window(5),
            "15m": stats.window(15),
        },
        "timeline": stats.timeline(),
        "interval_s": state.settings.server.stats_interval.as_secs_f64(),
        "deployments": deployments,
        "admission": state.admission.snapshot(),
        "cache": state.cache.snapshot().await,
        // Conversations arrive with the application layer; until then there are none.
        "sessions": {"conversations": 0, "mean_duration_s": null},
    }))
    .into_response()
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
