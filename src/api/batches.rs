//! `/v1/batches`: create, retrieve, list and cancel Batch API batches, in OpenAI's shapes.
//! A batch belongs to the key that created it (another key's batch id is a 404) and runs
//! as a job ([`crate::batches`]) on whichever instance claims it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use serde_json::json;

use super::conversations::{read_body, respond};
use super::files::owner_of;
use super::guard::Caller;
use super::page::{PageQuery, QueryPairs, pairs};
use crate::batches::{BATCH_JOB, ENDPOINTS, WINDOW, batch_json};
use crate::error::GatewayError;
use crate::files::is_file_id;
use crate::memory::now_ms;
use crate::state::AppState;
use crate::store::files::BatchRow;
use crate::store::jobs::NewJob;
use crate::wire::responses::{check_metadata, is_id, new_id};

fn not_found(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("No batch found with id '{id}'."))
}

/// `POST /v1/batches`: `input_file_id` (a `batch` file of the caller's), `endpoint`,
/// `completion_window` (`"24h"`), `metadata`. Answers the batch, `validating`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let owner = owner_of(principal.as_ref());
    let result = async {
        let object = read_body(&state, body)?;
        let required = |name: &'static str| {
            GatewayError::invalid(format!("Missing required parameter: '{name}'."), Some(name))
        };
        let input_file_id: String = object
            .get("input_file_id")?
            .ok_or_else(|| required("input_file_id"))?;
        let endpoint: String = object
            .get("endpoint")?
            .ok_or_else(|| required("endpoint"))?;
        if !ENDPOINTS.contains(&endpoint.as_str()) {
            return Err(GatewayError::invalid(
                format!(
                    "Invalid 'endpoint': '{endpoint}'. Supported values are: {}.",
                    ENDPOINTS.map(|e| format!("'{e}'")).join(", ")
                ),
                Some("endpoint"),
            ));
        }
        let window: String = object
            .get("completion_window")?
            .ok_or_else(|| required("completion_window"))?;
        if window != "24h" {
            return Err(GatewayError::invalid(
                format!("Invalid 'completion_window': '{window}'. Supported values are: '24h'."),
                Some("completion_window"),
            ));
        }
        let metadata: Option<BTreeMap<String, String>> = object.get("metadata")?;
        if let Some(metadata) = &metadata {
            check_metadata(metadata, "metadata")?;
        }
        let file = if is_file_id(&input_file_id) {
            state
                .store
                .file(&owner, &input_file_id)
                .await
                .map_err(super::store_failed)?
        } else {
            None
        };
        let Some(file) = file else {
            return Err(GatewayError::invalid(
                format!("Invalid 'input_file_id': no file '{input_file_id}' was found."),
                Some("input_file_id"),
            ));
        };
        if file.purpose != "batch" {
            return Err(GatewayError::invalid(
                format!(
                    "Invalid 'input_file_id': file '{input_file_id}' has purpose '{}', not \
                     'batch'.",
                    file.purpose
                ),
                Some("input_file_id"),
            ));
        }
        let now = now_ms();
        let row = BatchRow {
            id: new_id("batch"),
            owner: owner.clone(),
            endpoint,
            input_file_id,
            completion_window: window,
            status: "validating".into(),
            metadata: metadata.map(|m| serde_json::to_string(&m).unwrap_or_default()),
            total: 0,
            completed: 0,
            failed: 0,
            input_tokens: 0,
            output_tokens: 0,
            output_file_id: None,
            error_file_id: None,
            errors: None,
            created_at: now,
            expires_at: now + i64::try_from(WINDOW.as_millis()).unwrap_or(0),
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
        };
        let job = NewJob {
            id: &row.id,
            kind: BATCH_JOB,
            owner: &owner,
            payload: "",
            options: "{}",
        };
        state
            .store
            .create_batch(&row, &job)
            .await
            .map_err(super::store_failed)?;
        state.jobs.wake();
        Ok(batch_json(&row))
    }
    .await;
    respond(result)
}

/// `GET /v1/batches/{id}`.
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = owner_of(principal.as_ref());
    let result = async {
        if !is_id(&id, "batch") {
            return Err(not_found(&id));
        }
        let row = state
            .store
            .batch(Some(&owner), &id)
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| not_found(&id))?;
        Ok(batch_json(&row))
    }
    .await;
    respond(result)
}

/// `GET /v1/batches?after=&limit=`: the caller's batches, newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    query: QueryPairs,
) -> Response {
    let owner = owner_of(principal.as_ref());
    let result = async {
        let page = PageQuery::parse(&pairs(query)?)?;
        let limit = usize::try_from(page.limit).unwrap_or(20);
        let mut rows = state
            .store
            .list_batches(&owner, page.after.as_deref(), i64::from(page.limit) + 1)
            .await
            .map_err(super::store_failed)?;
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        Ok(json!({
            "object": "list",
            "data": rows.iter().map(batch_json).collect::<Vec<_>>(),
            "first_id": rows.first().map(|r| r.id.clone()),
            "last_id": rows.last().map(|r| r.id.clone()),
            "has_more": has_more,
        }))
    }
    .await;
    respond(result)
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` until its worker has written out what is
/// done; a batch that had ended is answered as it is.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = owner_of(principal.as_ref());
    let result = async {
        if !is_id(&id, "batch") {
            return Err(not_found(&id));
        }
        let row = state
            .store
            .cancel_batch(&owner, &id, now_ms())
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| not_found(&id))?;
        // Running here: stopped at once; elsewhere, its heartbeat reads the flag; queued,
        // it is claimed now and ends the batch.
        state.jobs.cancel_local(&id);
        state.jobs.wake();
        Ok(batch_json(&row))
    }
    .await;
    respond(result)
}
