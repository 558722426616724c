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
                "base_url": p.pool().base_url(),
                "pool": p.pool().stats().snapshot(),
                "queue": p.pool().queue().snapshot(),
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
                serde_json::to_value(p.pool().queue().snapshot()).unwrap_or_default(),
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

/// `GET /admin/keys`: every key (never a secret or its hash).
pub async fn list_keys(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    match state.store.list_keys().await {
        Ok(keys) => axum::Json(json!({"object": "list", "data": keys})).into_response(),
        Err(e) => store_error(e),
    }
}

/// `POST /admin/keys`: creates a key; the secret is in this response and nowhere else.
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<axum::Json<crate::auth::NewKey>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let new = match body {
        Ok(axum::Json(new)) => new,
        Err(rejection) => {
            return GatewayError::invalid(rejection.body_text(), None).into_response();
        }
    };
    match crate::auth::create_key(&state.store, &new).await {
        Ok((secret, row)) => {
            tracing::info!(key_id = %row.id, name = %row.name, "API key created by the admin API");
            let mut value = serde_json::to_value(&row).unwrap_or_default();
            if let Some(obj) = value.as_object_mut() {
                obj.insert("key".into(), json!(secret));
            }
            (axum::http::StatusCode::CREATED, axum::Json(value)).into_response()
        }
        Err(crate::auth::CreateError::Invalid(message)) => {
            GatewayError::invalid(message, None).into_response()
        }
        Err(crate::auth::CreateError::Store(e)) => store_error(e),
    }
}

/// `DELETE /admin/keys/{id}`: revokes a key, here at once and on other instances within
/// `[auth] key_cache_ttl`.
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    match state
        .store
        .revoke_key(&id, crate::limits::period::now_ms() / 1000)
        .await
    {
        Ok(true) => {
            state.auth.forget(&id);
            tracing::info!(key_id = %id, "API key revoked by the admin API");
            axum::Json(json!({"id": id, "revoked": true})).into_response()
        }
        Ok(false) => {
            let mut response = GatewayError::InvalidRequest {
                message: format!("No live API key with id `{id}`."),
                param: Some("id"),
                code: Some("key_not_found"),
            }
            .into_response();
            *response.status_mut() = axum::http::StatusCode::NOT_FOUND;
            response
        }
        Err(e) => store_error(e),
    }
}

/// `GET /admin/usage?key=&from=YYYY-MM-DD&to=YYYY-MM-DD`: the usage log per key, alias
/// and day, with the writer's counters.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<
        axum::extract::Query<super::usage::UsageQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let query = match query {
        Ok(axum::extract::Query(query)) => query,
        Err(rejection) => return super::usage::bad_query(&rejection).into_response(),
    };
    let filter = match query.filter(query.key.clone()) {
        Ok(filter) => filter,
        Err(e) => return e.into_response(),
    };
    let rows = match state.store.usage_summary(&filter).await {
        Ok(rows) => rows,
        Err(e) => return store_error(e),
    };
    let writer = state.usage.as_ref().map(|sink| {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &sink.counters;
        json!({
            "queued": c.queued.load(Relaxed),
            "written": c.written.load(Relaxed),
            "dropped": c.dropped.load(Relaxed),
            "lost": c.lost.load(Relaxed),
            "write_errors": c.write_errors.load(Relaxed),
            "queue_depth": sink.depth(),
        })
    });
    axum::Json(json!({"object": "list", "data": rows, "writer": writer})).into_response()
}

/// A store failure as a 503 the operator can act on (the detail goes to the log only).
fn store_error(e: crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "admin: database operation failed");
    GatewayError::DependencyUnavailable("The database").into_response()
}
