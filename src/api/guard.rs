//! Authentication as route layers: every client route sits behind [`require_key`] and every
//! admin route behind [`require_admin`], so a route added to either router is guarded by
//! construction rather than by remembering a check in its handler.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::Principal;
use crate::state::AppState;

/// The authenticated caller of a client route: its key, or `None` when authentication is
/// off. Inserted by [`require_key`]; handlers take it as `Extension<Caller>`.
#[derive(Clone)]
pub struct Caller(pub Option<Arc<Principal>>);

/// Authenticates the API key before the handler runs. A refused request writes no usage
/// row (anyone can send those, and the usage log is for the keys' own traffic), but model
/// routes still log and count it.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    match state.auth.authenticate(req.headers()).await {
        Ok(principal) => {
            req.extensions_mut().insert(Caller(principal));
            next.run(req).await
        }
        Err(err) => {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .and_then(|p| super::router::model_route(p.as_str()));
            if let Some(route) = route {
                let mut log = super::request_log(&state, route, req.headers());
                log.fail(err.status().as_u16(), err.kind());
            }
            err.into_response()
        }
    }
}

/// Lets only the operator through: `Authorization: Bearer <admin key>` or the dashboard's
/// session cookie ([`super::admin::authorize`]).
pub async fn require_admin(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    match super::admin::authorize(&state, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(err) => err.into_response(),
    }
}
