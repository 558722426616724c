//! `/dashboard`: the live operations page, served from assets compiled into the binary
//! (nothing to build, no CDN: it works offline).
//!
//! The page itself asks for the admin key once; signing in sets an HttpOnly, SameSite
//! cookie holding a digest of the key (never the key), which the admin API accepts.

use std::sync::Arc;

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::guard::{ADMIN_COOKIE, authorize, session_token};
use crate::state::AppState;

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const LOGIN: &str = include_str!("../../assets/dashboard/login.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE: &str = include_str!("../../assets/dashboard/style.css");

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// `GET /dashboard`: the page when signed in, the sign-in form otherwise.
pub async fn page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if authorize(&state, &headers).is_ok() {
        html(StatusCode::OK, INDEX.to_string())
    } else {
        let note = if state.settings.admin.key.is_none() {
            "<div class=\"error\">The admin API is disabled: set [admin] key first.</div>"
        } else {
            ""
        };
        html(StatusCode::OK, LOGIN.replace("<!--ERROR-->", note))
    }
}

#[derive(Deserialize)]
pub struct Login {
    key: String,
}

/// `POST /dashboard/login`: checks the key and sets the session cookie.
pub async fn login(
    State(state): State<Arc<AppState>>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    form: Result<Form<Login>, axum::extract::rejection::FormRejection>,
) -> Response {
    // The page's own form always sends `key`; anything else is not a browser signing in.
    let form = match form {
        Ok(Form(form)) => form,
        Err(rejection) => return super::rejected(rejection),
    };
    if let Some(axum::Extension(axum::extract::ConnectInfo(peer))) = peer
        && !state.sign_in.allow(peer.ip())
    {
        tracing::warn!(%peer, "dashboard sign-in throttled");
        let mut response = html(
            StatusCode::TOO_MANY_REQUESTS,
            LOGIN.replace(
                "<!--ERROR-->",
                "<div class=\"error\" id=\"error\">Too many attempts; wait a minute.</div>",
            ),
        );
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(crate::auth::SignInThrottle::RETRY_AFTER_S),
        );
        return response;
    }
    let valid = state
        .settings
        .admin
        .key
        .as_ref()
        .is_some_and(|k| bool::from(form.key.as_bytes().ct_eq(k.expose().as_bytes())));
    if !valid {
        tracing::warn!("dashboard sign-in with a wrong admin key");
        return html(
            StatusCode::UNAUTHORIZED,
            LOGIN.replace(
                "<!--ERROR-->",
                "<div class=\"error\" id=\"error\">That is not the admin key.</div>",
            ),
        );
    }
    let cookie = format!(
        "{ADMIN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        session_token(&form.key)
    );
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
    if let Ok(value) = HeaderValue::try_from(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /dashboard/logout`: forgets the session.
pub async fn logout() -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("switchyard_admin=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

pub async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

pub async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}
