//! `/admin/...`: operator views, behind the admin key (`[admin] key`).
//!
//! Without a configured key every admin route answers 401, so the admin surface is never
//! open by accident. The key is compared in constant time.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::GatewayError;
use crate::state::AppState;

/// `GET /admin/stats`: percentiles per route and model over 1, 5 and 15 minutes, the
/// timeline (req/s, latency, errors, RSS, queue, cache), process figures.
pub async fn stats(State(state): State<Arc<AppState>>) -> Response {
    let stats = &state.stats;
    // Session analytics: one aggregate over the conversations; `null` if the store is away.
    let active_since = crate::limits::period::now_ms() - 3_600_000;
    let sessions = state
        .store
        .conversation_stats(active_since)
        .await
        .ok()
        .map(|s| serde_json::to_value(s).unwrap_or_default());
    let runtime = tokio::runtime::Handle::current().metrics();
    let (connections, idle) = state.store.pool_connections();
    let deployments: Vec<_> = state
        .inference
        .models()
        .deployments()
        .iter()
        .map(|d| d.snapshot())
        .collect();
    axum::Json(json!({
        "uptime_s": stats.uptime().as_secs(),
        "rss_bytes": crate::telemetry::resident_memory_bytes(),
        "heap": crate::telemetry::heap_bytes(),
        "runtime": {
            "workers": runtime.num_workers(),
            "alive_tasks": runtime.num_alive_tasks(),
        },
        "store": {"backend": state.store.backend(), "connections": connections, "idle": idle},
        "open_fds": crate::telemetry::stats::open_fds(),
        "windows": {
            "1m": stats.window(1),
            "5m": stats.window(5),
            "15m": stats.window(15),
        },
        "timeline": stats.timeline(),
        "interval_s": state.settings.server.stats_interval.as_secs_f64(),
        "deployments": deployments,
        "admission": state.inference.admission().snapshot(),
        "cache": state.inference.cache().snapshot().await,
        "sessions": sessions,
        "tools": state.tools.snapshot(),
        "memory": state.memory.snapshot().await,
        "background": state.jobs.snapshot(&state.store).await,
        "events": {
            "topics": state.fanout.topics(),
            "dropped": state.fanout.dropped.load(std::sync::atomic::Ordering::Relaxed),
        },
    }))
    .into_response()
}

/// `GET /admin/providers`: every provider's pool and every deployment's health.
pub async fn providers(State(state): State<Arc<AppState>>) -> Response {
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
        .inference
        .models()
        .deployments()
        .iter()
        .map(|d| d.snapshot())
        .collect();
    axum::Json(json!({"providers": providers, "deployments": deployments})).into_response()
}

/// `GET /admin/limits`: the global and per-provider admission queues.
pub async fn limits(State(state): State<Arc<AppState>>) -> Response {
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
    axum::Json(json!({"global": state.inference.admission().snapshot(), "providers": providers}))
        .into_response()
}

/// `GET /admin/cache`: entries, bytes, hits, misses, evictions, coalesced requests.
pub async fn cache(State(state): State<Arc<AppState>>) -> Response {
    let mut snapshot =
        serde_json::to_value(state.inference.cache().snapshot().await).unwrap_or_default();
    if let Some(obj) = snapshot.as_object_mut() {
        obj.insert(
            "flights_in_progress".into(),
            json!(state.inference.flights().len()),
        );
    }
    axum::Json(snapshot).into_response()
}

/// `POST /admin/cache/clear`: drops every cached answer.
pub async fn clear_cache(State(state): State<Arc<AppState>>) -> Response {
    state.inference.cache().clear().await;
    tracing::info!("cache cleared by the admin API");
    axum::Json(json!({"cleared": true})).into_response()
}

/// `GET /admin/keys`: every key (never a secret or its hash).
pub async fn list_keys(State(state): State<Arc<AppState>>) -> Response {
    match state.store.list_keys().await {
        Ok(keys) => axum::Json(json!({"object": "list", "data": keys})).into_response(),
        Err(e) => store_error(e),
    }
}

/// `POST /admin/keys`: creates a key; the secret is in this response and nowhere else.
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    body: Result<axum::Json<crate::auth::NewKey>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let new = match body {
        Ok(axum::Json(new)) => new,
        Err(rejection) => return super::rejected(rejection),
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
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let id = match id {
        Ok(axum::extract::Path(id)) => id,
        Err(rejection) => return super::rejected(rejection),
    };
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

/// `DELETE /admin/keys/{id}/data`: every conversation, response, item, memory, file and
/// batch of a key.
pub async fn delete_key_data(
    State(state): State<Arc<AppState>>,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let id = match id {
        Ok(axum::extract::Path(id)) => id,
        Err(rejection) => return super::rejected(rejection),
    };
    // An id that names no key (a typo, another deployment's) is a 404, not "0 deleted".
    match state.store.list_keys().await {
        Ok(keys) if keys.iter().any(|k| k.id == id) => {}
        Ok(_) => {
            return GatewayError::NotFound(format!("No API key with id `{id}`.")).into_response();
        }
        Err(e) => return store_error(e),
    }
    let deleted = async {
        let (conversations, responses, items) = state.store.delete_key_data(&id).await?;
        let memories = state.memory.delete_owner(&id).await?;
        let (files, batches) = state.store.delete_owner_files(&id).await?;
        for file in &files {
            state.files.remove(file).await;
        }
        Ok::<_, crate::store::StoreError>((
            conversations,
            responses,
            items,
            memories,
            files.len(),
            batches,
        ))
    };
    match deleted.await {
        Ok((conversations, responses, items, memories, files, batches)) => {
            tracing::info!(key_id = %id, conversations, responses, items, memories, files, batches, "key data deleted by the admin API");
            axum::Json(json!({
                "key_id": id,
                "deleted": {"conversations": conversations, "responses": responses, "items": items, "memories": memories, "files": files, "batches": batches},
            }))
            .into_response()
        }
        Err(e) => store_error(e),
    }
}

/// `GET /admin/usage?key=&from=YYYY-MM-DD&to=YYYY-MM-DD`: the usage log per key, alias
/// and day, with the writer's counters.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    query: Result<
        axum::extract::Query<super::usage::UsageQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Response {
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
    let writer = state.inference.usage_sink().map(|sink| {
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
