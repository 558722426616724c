//! `/admin/jobs`: the operator's view of background jobs, whoever owns them: list
//! (`status`, `before`, `limit`), inspect, retry a failed or cancelled one, cancel one.
//! A job's request body is not shown (it is the client's), only its size.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::page::{QueryPairs, pairs};
use crate::conversations::background::ended;
use crate::error::GatewayError;
use crate::memory::now_ms;
use crate::state::AppState;
use crate::store::jobs::JobRow;

fn render(job: &JobRow) -> Value {
    json!({
        "id": job.id,
        "object": "job",
        "kind": job.kind,
        "owner": if job.owner.is_empty() { Value::Null } else { Value::from(job.owner.clone()) },
        "status": job.status,
        "attempts": job.attempts,
        "run_at": job.run_at,
        "cancel_requested": job.cancel_requested != 0,
        "error": job.error,
        "request_bytes": job.payload.len(),
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    })
}

fn not_found(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("Job with id '{id}' not found."))
}

/// `GET /admin/jobs?status=&before=&limit=`: newest first; `before` is the `created_at`
/// of the last job of the previous page.
pub async fn list(State(state): State<Arc<AppState>>, query: QueryPairs) -> Response {
    let pairs = match pairs(query) {
        Ok(pairs) => pairs,
        Err(err) => return err.into_response(),
    };
    let mut status = None;
    let mut before = None;
    let mut limit = 20i64;
    for (key, value) in &pairs {
        match key.as_str() {
            "status" => match value.as_str() {
                "queued" | "running" | "completed" | "failed" | "cancelled" => {
                    status = Some(value.clone());
                }
                _ => {
                    return GatewayError::invalid(
                        format!(
                            "Invalid 'status': '{value}'. Expected queued, running, completed, \
                             failed or cancelled."
                        ),
                        Some("status"),
                    )
                    .into_response();
                }
            },
            "before" | "limit" => {
                let Ok(n) = value.parse::<i64>() else {
                    let param = if key == "before" { "before" } else { "limit" };
                    return GatewayError::invalid(
                        format!("Invalid '{key}': '{value}'. Expected an integer."),
                        Some(param),
                    )
                    .into_response();
                };
                if key == "before" {
                    before = Some(n);
                } else if (1..=100).contains(&n) {
                    limit = n;
                } else {
                    return GatewayError::invalid(
                        "Invalid 'limit': expected 1-100.",
                        Some("limit"),
                    )
                    .into_response();
                }
            }
            _ => {}
        }
    }
    match state
        .store
        .list_jobs(status.as_deref(), before, limit + 1)
        .await
    {
        Ok(mut rows) => {
            let has_more = rows.len() > usize::try_from(limit).unwrap_or(20);
            rows.truncate(usize::try_from(limit).unwrap_or(20));
            axum::Json(json!({
                "object": "list",
                "data": rows.iter().map(render).collect::<Vec<_>>(),
                "has_more": has_more,
            }))
            .into_response()
        }
        Err(e) => super::store_failed(e).into_response(),
    }
}

/// `GET /admin/jobs/{id}`.
pub async fn show(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.store.any_job(&id).await {
        Ok(Some(job)) => axum::Json(render(&job)).into_response(),
        Ok(None) => not_found(&id).into_response(),
        Err(e) => super::store_failed(e).into_response(),
    }
}

/// The job and its response row's body.
async fn job_and_body(state: &AppState, id: &str) -> Result<(JobRow, String), GatewayError> {
    let job = state
        .store
        .any_job(id)
        .await
        .map_err(super::store_failed)?
        .ok_or_else(|| not_found(id))?;
    let owner = (!job.owner.is_empty()).then_some(job.owner.as_str());
    let body = state
        .conversations
        .store()
        .response(owner, id)
        .await
        .map_err(super::store_failed)?
        .map(|row| row.body)
        .unwrap_or_default();
    Ok((job, body))
}

/// `POST /admin/jobs/{id}/retry`: a failed or cancelled job queued again (400 for one in
/// any other state).
pub async fn retry(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let (_, body) = match job_and_body(&state, &id).await {
        Ok(found) => found,
        Err(err) => return err.into_response(),
    };
    match state
        .store
        .retry_response_job(&id, &ended(&body, "queued", None), now_ms())
        .await
    {
        Ok(true) => {
            state.jobs.wake();
            show(State(state), Path(id)).await
        }
        Ok(false) => GatewayError::invalid("Only a failed or cancelled job can be retried.", None)
            .into_response(),
        Err(e) => super::store_failed(e).into_response(),
    }
}

/// `POST /admin/jobs/{id}/cancel`: as the owner's cancel; a finished job is returned as is.
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let (job, body) = match job_and_body(&state, &id).await {
        Ok(found) => found,
        Err(err) => return err.into_response(),
    };
    let cancelled = ended(&body, "cancelled", None);
    if let Err(e) = state
        .store
        .cancel_response_job(&job.owner, &id, &cancelled, now_ms())
        .await
    {
        return super::store_failed(e).into_response();
    }
    state.jobs.cancel_local(&id);
    show(State(state), Path(id)).await
}
