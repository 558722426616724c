//! The HTTP surface: which route goes to which handler behind which layers.
//!
//! Client handlers authenticate through the `Caller` extractor, admin routes sit behind
//! the admin layer; model routes also get the body limit and the request timeout. Health,
//! readiness, metrics and the dashboard get neither, so they answer even when upstreams
//! are stuck.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::guard::{dashboard_headers, require_admin};
use super::{
    REQUEST_ID, admin, batches, chat, conversations, dashboard, embeddings, events, files, jobs,
    memories, models, responses, responses_ws, tools, usage,
};
use crate::error::GatewayError;
use crate::state::AppState;

/// The main listener's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let server = &state.settings.server;
    let model_routes = Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/embeddings", post(embeddings::create))
        .route(
            "/v1/responses",
            post(responses::create).get(responses_ws::connect),
        )
        .route("/v1/responses/input_tokens", post(responses::input_tokens))
        .layer(DefaultBodyLimit::max(server.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            server.request_timeout,
            request_timeout,
        ));
    // Every client handler takes a `guard::Caller`, which checks the API key.
    let client_routes = Router::new()
        .merge(model_routes)
        .route("/v1/models", get(models::list))
        .route("/v1/usage", get(usage::mine))
        .route("/v1/tools", get(tools::list))
        .route(
            "/v1/tools/{name}/invoke",
            post(tools::invoke).layer(DefaultBodyLimit::max(server.max_body_bytes)),
        )
        .merge(stored_routes(server.max_body_bytes))
        .merge(file_routes(&state));
    let router = Router::new()
        .merge(client_routes)
        .merge(operator_routes(&state))
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(middleware::from_fn(request_id));
    // Outside the routes so that preflights (OPTIONS) are answered before routing. No
    // layer at all without origins: the default path pays nothing for CORS.
    let router = if server.cors_origins.is_empty() {
        router
    } else {
        router.layer(cors(&server.cors_origins))
    };
    router.with_state(state)
}

/// Stored responses and conversations: reads and writes of the store, no model call (so
/// no request timeout), under the same body limit as model routes.
fn stored_routes(max_body_bytes: usize) -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route(
            "/v1/conversations",
            post(conversations::create).get(conversations::list_mine),
        )
        .route(
            "/v1/conversations/{id}",
            get(conversations::retrieve)
                .post(conversations::update)
                .delete(conversations::delete),
        )
        .route(
            "/v1/conversations/{id}/archive",
            post(conversations::archive),
        )
        .route(
            "/v1/conversations/{id}/unarchive",
            post(conversations::unarchive),
        )
        .route(
            "/v1/conversations/{id}/items",
            post(conversations::create_items).get(conversations::list_items),
        )
        .route(
            "/v1/conversations/{id}/items/{item_id}",
            get(conversations::retrieve_item).delete(conversations::delete_item),
        )
        .route(
            "/v1/memories",
            post(memories::create)
                .get(memories::list)
                .delete(memories::delete_all),
        )
        .route("/v1/memories/search", post(memories::search))
        .route(
            "/v1/memories/{id}",
            get(memories::retrieve)
                .put(memories::update)
                .delete(memories::delete),
        )
        .route("/v1/memories/{id}/history", get(memories::history))
        .route("/v1/memories/jobs/{id}", get(memories::job))
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// Files and batches: an upload streams to disk under `[files]`' limits, not the body
/// limit.
fn file_routes(state: &AppState) -> Router<Arc<AppState>> {
    let upload_limit =
        usize::try_from(state.settings.files.max_upload_bytes()).unwrap_or(usize::MAX);
    Router::new()
        .route(
            "/v1/files",
            post(files::upload)
                .layer(DefaultBodyLimit::max(upload_limit))
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/events", get(events::connect))
        .route(
            "/v1/batches",
            post(batches::create)
                .layer(DefaultBodyLimit::max(state.settings.server.max_body_bytes))
                .get(batches::list),
        )
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
}

/// CORS for browser apps: the configured origins only, and no credentials, so a page can
/// call with a key in a header but never ride the dashboard's cookie; preflights cached
/// for ten minutes.
fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("x-switchyard-cache"),
            HeaderName::from_static(REQUEST_ID),
        ])
        .expose_headers([
            HeaderName::from_static(REQUEST_ID),
            HeaderName::from_static("x-switchyard-cache"),
            header::RETRY_AFTER,
        ])
        .max_age(Duration::from_secs(600))
}

/// The operator-only router for `server.admin_listen`.
pub fn admin_router(state: Arc<AppState>) -> Router {
    operator_routes(&state)
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Routes for operators: on the main port, and alone on `server.admin_listen` if set.
fn operator_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let admin = Router::new()
        .route("/admin/providers", get(admin::providers))
        .route("/admin/limits", get(admin::limits))
        .route("/admin/stats", get(admin::stats))
        .route("/admin/cache", get(admin::cache))
        .route("/admin/cache/clear", post(admin::clear_cache))
        .route("/admin/keys", get(admin::list_keys).post(admin::create_key))
        .route("/admin/keys/{id}", delete(admin::revoke_key))
        .route("/admin/keys/{id}/data", delete(admin::delete_key_data))
        .route("/admin/conversations", get(conversations::list_all))
        .route("/admin/usage", get(admin::usage))
        .route("/admin/jobs", get(jobs::list))
        .route("/admin/jobs/{id}", get(jobs::show))
        .route("/admin/jobs/{id}/retry", post(jobs::retry))
        .route("/admin/jobs/{id}/cancel", post(jobs::cancel))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let dashboard = Router::new()
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/login", post(dashboard::login))
        .route("/dashboard/logout", post(dashboard::logout))
        .route("/dashboard/app.js", get(dashboard::app_js))
        .route("/dashboard/style.css", get(dashboard::style))
        .route_layer(middleware::map_response(dashboard_headers));
    Router::new()
        .merge(admin)
        .merge(dashboard)
        .route("/health", get(super::health))
        .route("/ready", get(super::ready))
        .route("/metrics", get(super::metrics))
}

/// Bounds a model request until its response headers; a stream's body is then governed
/// by the provider's stream-idle timeout.
async fn request_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => GatewayError::RequestTimeout(limit.as_millis()).into_response(),
    }
}

/// Takes the client's `x-request-id` (if sane) or assigns one, and returns it.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(REQUEST_ID) {
        Some(v) if v.len() <= 128 && v.to_str().is_ok() => v.clone(),
        _ => {
            let id = new_request_id();
            let value = HeaderValue::try_from(id).unwrap_or(HeaderValue::from_static("-"));
            req.headers_mut().insert(REQUEST_ID, value.clone());
            value
        }
    };
    let mut response = next.run(req).await;
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// A unique id without a syscall: a per-process random prefix and a counter.
fn new_request_id() -> String {
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(rand::random);
    format!(
        "req_{prefix:08x}{:012x}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
