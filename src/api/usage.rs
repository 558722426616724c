//! `GET /v1/usage`: a key's own usage, per alias and day. A key sees its own rows only;
//! operators see everyone's through `/admin/usage`.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::guard::Caller;
use crate::error::GatewayError;
use crate::limits::period;
use crate::state::AppState;
use crate::store::UsageFilter;

/// `from` and `to` are inclusive UTC days (`YYYY-MM-DD`); the default is the last 30 days.
#[derive(Debug, Default, serde::Deserialize)]
pub struct UsageQuery {
    pub key: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

impl UsageQuery {
    /// The store filter for `key_id`.
    ///
    /// # Errors
    /// 400 for a malformed day.
    pub fn filter(&self, key_id: Option<String>) -> Result<UsageFilter, GatewayError> {
        const DAY_MS: i64 = 86_400_000;
        let day = |text: &Option<String>,
                   param: &'static str|
         -> Result<Option<i64>, GatewayError> {
            match text {
                None => Ok(None),
                Some(t) => period::parse_day(t).map(Some).ok_or_else(|| {
                    GatewayError::invalid(format!("`{param}` must be a day as YYYY-MM-DD"), None)
                }),
            }
        };
        let today = period::now_ms().div_euclid(DAY_MS);
        let to = day(&self.to, "to")?.unwrap_or(today);
        let from = day(&self.from, "from")?.unwrap_or(to - 29);
        Ok(UsageFilter {
            key_id,
            since_ms: from * DAY_MS,
            until_ms: (to + 1) * DAY_MS,
        })
    }
}

/// A query string we cannot read, as a 400 in OpenAI shape.
pub fn bad_query(rejection: &QueryRejection) -> GatewayError {
    GatewayError::invalid(format!("Bad query string: {}", rejection.body_text()), None)
}

pub async fn mine(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => return bad_query(&rejection).into_response(),
    };
    let principal = match principal {
        Some(principal) => principal,
        None => {
            return GatewayError::invalid(
                "Usage is per API key, and authentication is off ([auth] mode = \"none\"); \
                 operators can read /admin/usage.",
                None,
            )
            .into_response();
        }
    };
    // The key's own id, whatever `key` the query names.
    let filter = match query.filter(Some(principal.key_id.to_string())) {
        Ok(filter) => filter,
        Err(e) => return e.into_response(),
    };
    match state.store.usage_summary(&filter).await {
        Ok(rows) => axum::Json(json!({
            "object": "list",
            "key_id": &*principal.key_id,
            "data": rows,
        }))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "usage: database operation failed");
            GatewayError::DependencyUnavailable("The database").into_response()
        }
    }
}
