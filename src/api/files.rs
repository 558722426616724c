//! `/v1/files`: upload (multipart, streamed to disk), list, retrieve, content, delete, in
//! OpenAI's shapes. Every file belongs to the key that uploaded it: another key's file id
//! is a 404.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::conversations::respond;
use super::guard::Caller;
use super::page::{QueryPairs, pairs};
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::files::{WriteError, Written, is_file_id};
use crate::memory::now_ms;
use crate::state::AppState;
use crate::store::conversations::Order;
use crate::store::files::FileRow;

/// The purposes a client may upload.
const PURPOSES: &str = "'batch', 'vision' or 'user_data'";
/// Shortest and longest `expires_after[seconds]` (an hour, thirty days), as OpenAI.
const EXPIRY_SECONDS: std::ops::RangeInclusive<i64> = 3_600..=2_592_000;

/// The owner a principal's rows carry (`''` with auth off).
pub(super) fn owner_of(principal: Option<&Arc<Principal>>) -> String {
    principal.map(|p| p.key_id.to_string()).unwrap_or_default()
}

/// A file as OpenAI shapes it, with its SHA-256.
pub fn file_json(row: &FileRow) -> Value {
    json!({
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at / 1000,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "expires_at": row.expires_at.map(|t| t / 1000),
        "status_details": null,
        "sha256": row.sha256,
    })
}

pub(super) fn not_found(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("No such File object: {id}"))
}

/// `POST /v1/files`: `purpose`, `file` and optionally `expires_after[anchor]` /
/// `expires_after[seconds]` as multipart fields. The file streams to disk under the
/// purpose's size limit (the largest of all while `purpose` has not been read yet).
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let owner = owner_of(principal.as_ref());
    let result = async {
        let mut multipart = multipart.map_err(|r| {
            GatewayError::invalid(
                format!("Expected a multipart/form-data body: {}", r.body_text()),
                None,
            )
        })?;
        let files = &state.files;
        let mut purpose: Option<String> = None;
        let mut seconds: Option<i64> = None;
        let mut written: Option<(Written, String)> = None;
        let outcome = async {
            while let Some(field) = multipart.next_field().await.map_err(multipart_failed)? {
                match field.name().unwrap_or_default() {
                    "purpose" => {
                        let value = text(field).await?;
                        if files.config.limit_of(&value).is_none() {
                            return Err(GatewayError::invalid(
                                format!("Invalid 'purpose': '{value}'. Expected {PURPOSES}."),
                                Some("purpose"),
                            ));
                        }
                        purpose = Some(value);
                    }
                    "expires_after[anchor]" => {
                        let value = text(field).await?;
                        if value != "created_at" {
                            return Err(GatewayError::invalid(
                                format!(
                                    "Invalid 'expires_after[anchor]': '{value}'. Expected \
                                     'created_at'."
                                ),
                                Some("expires_after"),
                            ));
                        }
                    }
                    "expires_after[seconds]" => {
                        let value = text(field).await?;
                        seconds = Some(
                            value
                                .parse()
                                .ok()
                                .filter(|s| EXPIRY_SECONDS.contains(s))
                                .ok_or_else(|| {
                                    GatewayError::invalid(
                                        format!(
                                            "Invalid 'expires_after[seconds]': '{value}'. \
                                             Expected 3600 to 2592000."
                                        ),
                                        Some("expires_after"),
                                    )
                                })?,
                        );
                    }
                    "file" => {
                        if written.is_some() {
                            return Err(GatewayError::invalid(
                                "Only one 'file' may be uploaded at a time.",
                                Some("file"),
                            ));
                        }
                        let name = field
                            .file_name()
                            .map(clean_name)
                            .filter(|n| !n.is_empty())
                            .unwrap_or_else(|| "upload".into());
                        let limit = purpose
                            .as_deref()
                            .and_then(|p| files.config.limit_of(p))
                            .unwrap_or_else(|| files.config.max_upload_bytes());
                        let file = files.write(field, limit).await.map_err(write_failed)?;
                        written = Some((file, name));
                    }
                    // Unknown fields are read past, as form fields usually are.
                    _ => drop(text(field).await),
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            if let Some((file, _)) = written {
                files.discard(file).await;
            }
            return Err(e);
        }
        let Some((file, filename)) = written else {
            return Err(GatewayError::invalid(
                "Missing required parameter: 'file'.",
                Some("file"),
            ));
        };
        let Some(purpose) = purpose else {
            files.discard(file).await;
            return Err(GatewayError::invalid(
                format!("Missing required parameter: 'purpose'. Expected {PURPOSES}."),
                Some("purpose"),
            ));
        };
        let limit = files.config.limit_of(&purpose).unwrap_or(0);
        if file.bytes > limit {
            files.discard(file).await;
            return Err(GatewayError::PayloadTooLarge {
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            });
        }
        let created_at = now_ms();
        let row = FileRow {
            id: file.id.clone(),
            owner,
            filename,
            purpose,
            bytes: i64::try_from(file.bytes).unwrap_or(i64::MAX),
            sha256: file.sha256.clone(),
            created_at,
            expires_at: seconds.map(|s| created_at + s * 1000),
        };
        files.keep(file).await.map_err(|e| {
            tracing::error!(error = %e, "files: keeping an upload failed");
            GatewayError::DependencyUnavailable("The file store")
        })?;
        if let Err(e) = state.store.insert_file(&row).await {
            files.remove(&row.id).await;
            return Err(super::store_failed(e));
        }
        metrics::counter!("switchyard_file_uploads_total", "purpose" => row.purpose.clone())
            .increment(1);
        metrics::counter!("switchyard_file_upload_bytes_total").increment(file_bytes(&row));
        Ok(file_json(&row))
    }
    .await;
    respond(result)
}

fn file_bytes(row: &FileRow) -> u64 {
    u64::try_from(row.bytes).unwrap_or(0)
}

/// A short text field's value (at most 1 KiB).
async fn text(mut field: Field<'_>) -> Result<String, GatewayError> {
    let name = field.name().unwrap_or_default().to_string();
    let mut value = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_failed)? {
        value.extend_from_slice(&chunk);
        if value.len() > 1024 {
            return Err(GatewayError::invalid(
                format!("The form field '{name}' is longer than 1024 bytes."),
                None,
            ));
        }
    }
    String::from_utf8(value)
        .map_err(|_| GatewayError::invalid(format!("The form field '{name}' is not UTF-8."), None))
}

/// A file name as kept: its last path segment, no control characters, at most 255 bytes.
fn clean_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut clean: String = base.chars().filter(|c| !c.is_control()).collect();
    while clean.len() > 255 {
        clean.pop();
    }
    clean
}

fn multipart_failed(e: MultipartError) -> GatewayError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return GatewayError::PayloadTooLarge { limit: 0 };
    }
    GatewayError::invalid(
        format!("Could not read the multipart body: {}", e.body_text()),
        None,
    )
}

fn write_failed(e: WriteError) -> GatewayError {
    match e {
        WriteError::TooLarge(limit) => GatewayError::PayloadTooLarge {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
        },
        WriteError::Body(message) => {
            GatewayError::invalid(format!("Could not read the uploaded file: {message}"), None)
        }
        WriteError::Io(e) => {
            tracing::error!(error = %e, "files: writing an upload failed");
            GatewayError::DependencyUnavailable("The file store")
        }
    }
}

/// `GET /v1/files?purpose=&after=&limit=&order=`: the caller's files (limit 1–10,000,
/// default 10,000, newest first).
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    query: QueryPairs,
) -> Response {
    let owner = owner_of(principal.as_ref());
    let result = async {
        let mut purpose = None;
        let mut after = None;
        let mut limit = 10_000i64;
        let mut order = Order::Desc;
        for (key, value) in pairs(query)? {
            match key.as_str() {
                "purpose" if !value.is_empty() => purpose = Some(value),
                "after" if !value.is_empty() => {
                    if !is_file_id(&value) {
                        return Err(GatewayError::invalid(
                            format!("Invalid 'after': '{value}' is not a file id."),
                            Some("after"),
                        ));
                    }
                    after = Some(value);
                }
                "limit" => {
                    limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=10_000).contains(n))
                        .ok_or_else(|| {
                            GatewayError::invalid(
                                format!(
                                    "Invalid 'limit': '{value}'. Limit can range between 1 and \
                                     10000."
                                ),
                                Some("limit"),
                            )
                        })?;
                }
                "order" => {
                    order = match value.as_str() {
                        "asc" => Order::Asc,
                        "desc" => Order::Desc,
                        _ => {
                            return Err(GatewayError::invalid(
                                format!(
                                    "Invalid 'order': '{value}'. Supported values are: 'asc' \
                                     and 'desc'."
                                ),
                                Some("order"),
                            ));
                        }
                    };
                }
                _ => {}
            }
        }
        let mut rows = state
            .store
            .list_files(
                &owner,
                purpose.as_deref(),
                after.as_deref(),
                limit + 1,
                order,
            )
            .await
            .map_err(super::store_failed)?;
        let has_more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(json!({
            "object": "list",
            "data": rows.iter().map(file_json).collect::<Vec<_>>(),
            "first_id": rows.first().map(|r| r.id.clone()),
            "last_id": rows.last().map(|r| r.id.clone()),
            "has_more": has_more,
        }))
    }
    .await;
    respond(result)
}

/// The caller's file `id`, or a 404.
pub(super) async fn find(state: &AppState, owner: &str, id: &str) -> Result<FileRow, GatewayError> {
    if !is_file_id(id) {
        return Err(not_found(id));
    }
    state
        .store
        .file(owner, id)
        .await
        .map_err(super::store_failed)?
        .ok_or_else(|| not_found(id))
}

/// `GET /v1/files/{id}`.
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = owner_of(principal.as_ref());
    respond(find(&state, &owner, &id).await.map(|row| file_json(&row)))
}

/// `GET /v1/files/{id}/content`: the bytes, streamed from disk.
pub async fn content(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = owner_of(principal.as_ref());
    let result = async {
        let row = find(&state, &owner, &id).await?;
        let file = state.files.open_file(&row.id).await.map_err(|e| {
            tracing::error!(file = %row.id, error = %e, "files: a stored file cannot be read");
            GatewayError::DependencyUnavailable("The file store")
        })?;
        let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024));
        let disposition = format!(
            "attachment; filename=\"{}\"",
            row.filename.replace(['"', '\\'], "_")
        );
        Ok((
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_LENGTH, row.bytes.to_string()),
                (header::CONTENT_DISPOSITION, disposition),
            ],
            body,
        )
            .into_response())
    }
    .await;
    result.unwrap_or_else(|e: GatewayError| e.into_response())
}

/// `DELETE /v1/files/{id}`: the row, then the bytes.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = owner_of(principal.as_ref());
    let result = async {
        if !is_file_id(&id) {
            return Err(not_found(&id));
        }
        let row = state
            .store
            .delete_file(&owner, &id)
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| not_found(&id))?;
        state.files.remove(&row.id).await;
        Ok(json!({"id": row.id, "object": "file", "deleted": true}))
    }
    .await;
    respond(result)
}

#[cfg(test)]
mod tests {
    use super::clean_name;

    #[test]
    fn names_lose_paths_and_controls() {
        assert_eq!(clean_name("../../etc/passwd"), "passwd");
        assert_eq!(clean_name("C:\\x\\y.png"), "y.png");
        assert_eq!(clean_name("a\u{0}b\nc.txt"), "abc.txt");
        assert_eq!(clean_name(&"é".repeat(200)).len(), 254);
    }
}
