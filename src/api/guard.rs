//! Authentication by construction. Client routes authenticate through the [`Caller`]
//! extractor: a handler cannot name its caller, and so cannot call a model on anyone's
//! behalf, without the key having been checked. Admin routes sit behind the
//! [`require_admin`] route layer, so a route added to that router is guarded too.

use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::Principal;
use crate::error::GatewayError;
use crate::state::AppState;

/// The authenticated caller of a client route: its key, or `None` when authentication is
/// off. Extracting it checks the API key; a refused request never reaches the handler.
#[derive(Clone)]
pub struct Caller(pub Option<Arc<Principal>>);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = Response;

    /// A refused request writes no usage row (anyone can send those, and the usage log is
    /// for the keys' own traffic), but model routes still log and count it.
    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        match state.auth.authenticate(&parts.headers).await {
            Ok(principal) => Ok(Caller(principal)),
            Err(err) => {
                let route = parts
                    .extensions
                    .get::<MatchedPath>()
                    .and_then(|p| model_route(p.as_str()));
                if let Some(route) = route {
                    let mut log = super::request_log(state, route, &parts.headers);
                    log.fail(err.status().as_u16(), err.kind());
                }
                Err(err.into_response())
            }
        }
    }
}

/// Lets only the operator through: `Authorization: Bearer <admin key>` or the dashboard's
/// session cookie ([`authorize`]). A valid client key is told it is not allowed (403);
/// anything else is not authenticated (401).
pub async fn require_admin(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    match authorize(&state, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(err) => {
            let client_key = crate::auth::presented_key(req.headers()).is_some()
                && matches!(state.auth.authenticate(req.headers()).await, Ok(Some(_)));
            if client_key {
                return GatewayError::Forbidden(
                    "This API key is a client key; the admin API needs the admin key.".into(),
                )
                .into_response();
            }
            err.into_response()
        }
    }
}

/// Security headers for the dashboard's pages and assets: no framing, no sniffing, no
/// referrer, and scripts only from the dashboard itself (inline style attributes are
/// allowed; inline scripts are not).
pub async fn dashboard_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
             base-uri 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The `route` label of a model route's logs and metrics, by its path.
pub fn model_route(path: &str) -> Option<&'static str> {
    match path {
        "/v1/chat/completions" => Some("chat"),
        "/v1/embeddings" => Some("embeddings"),
        _ => None,
    }
}

/// The dashboard's session cookie: a digest of the admin key, never the key itself.
pub const ADMIN_COOKIE: &str = "switchyard_admin";

/// The cookie value for an admin key.
pub fn session_token(key: &str) -> String {
    let digest = Sha256::digest(format!("switchyard-dashboard-session:{key}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks `Authorization: Bearer <admin key>` or the dashboard session cookie (the admin
/// routes' layer, [`super::guard::require_admin`], and the dashboard page ask this).
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
