//! `/v1/memories`: a key's long-term memories of its users, in mem0's shape adapted to
//! OpenAI conventions (`object`, `list` pages, the OpenAI error shape). Every call is scoped
//! to the caller's key: another key's memory id is a 404, and a `user` names a user of the
//! caller's key only.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::conversations::{read_body, respond};
use super::guard::Caller;
use super::page::{PageQuery, QueryPairs, pairs};
use crate::error::GatewayError;
use crate::memory::{Found, MAX_SUBJECT_CHARS, Subject};
use crate::state::AppState;
use crate::store::memories::{HistoryRow, MemoryRow, NewMemory};
use crate::wire::JsonObject;
use crate::wire::responses::new_id;

/// Longest memory text accepted, in characters.
const MAX_MEMORY_CHARS: usize = 16_384;
/// Messages one call may send.
const MAX_MESSAGES: usize = 1_000;
/// Largest metadata object, serialised.
const MAX_METADATA_BYTES: usize = 16_384;
/// Results one search returns at most.
const MAX_SEARCH_LIMIT: usize = 100;

/// `POST /v1/memories`: with `infer: false`, each message's content becomes one memory at
/// once; with `infer: true` (the default) the messages are queued for extraction and the
/// job's id is returned with 202.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let result = async {
        let object = read_body(&state, body)?;
        let subject = Subject::new(owner, &read_user(&object)?);
        let metadata = read_metadata(&object)?;
        let messages: Vec<Value> = object.get("messages")?.ok_or_else(|| {
            GatewayError::invalid("Missing required parameter: 'messages'.", Some("messages"))
        })?;
        if messages.is_empty() || messages.len() > MAX_MESSAGES {
            return Err(GatewayError::invalid(
                format!("'messages' must hold 1 to {MAX_MESSAGES} messages."),
                Some("messages"),
            ));
        }
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| read_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        let infer: bool = object.get("infer")?.unwrap_or(true);
        if infer {
            let job = state
                .memory
                .queue(crate::memory::extract::ToQueue {
                    subject: &subject,
                    conversation: None,
                    messages: &messages,
                    metadata: &metadata,
                    alias: None,
                })
                .await
                .map_err(super::store_failed)?
                .ok_or(GatewayError::ServiceOverloaded { retry_after: 5 })?;
            return Ok((
                StatusCode::ACCEPTED,
                json!({
                    "object": "memory.job",
                    "id": job.id,
                    "status": job.status,
                    "user": subject.user,
                }),
            ));
        }
        let new: Vec<NewMemory> = messages
            .iter()
            .map(|(_, content)| NewMemory {
                id: new_id("mem"),
                memory: content.clone(),
                metadata: metadata.clone(),
            })
            .collect();
        let rows = state
            .memory
            .add(&subject, &new)
            .await
            .map_err(super::store_failed)?;
        let data: Vec<Value> = rows.iter().map(memory_json).collect();
        Ok((StatusCode::OK, json!({"object": "list", "data": data})))
    }
    .await;
    match result {
        Ok((status, body)) => (status, axum::Json(body)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/memories?user=…&limit=…&after=…`: newest first; without `user`, every user's.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    query: QueryPairs,
) -> Response {
    let owner = principal.as_ref().map_or("", |p| &*p.key_id);
    let result = async {
        let pairs = pairs(query)?;
        // `after` and `limit` as every list reads them; the order is always newest first.
        let page = PageQuery::parse(&pairs)?;
        let user = pairs
            .iter()
            .find(|(k, _)| k == "user")
            .map(|(_, v)| check_user(v))
            .transpose()?;
        let (after, limit) = (page.after.as_deref(), page.limit);
        let (rows, has_more) = state
            .memory
            .store()
            .list_memories(owner, user.as_deref(), after, limit)
            .await
            .map_err(super::store_failed)?;
        Ok(json!({
            "object": "list",
            "data": rows.iter().map(memory_json).collect::<Vec<_>>(),
            "first_id": rows.first().map(|r| r.id.clone()),
            "last_id": rows.last().map(|r| r.id.clone()),
            "has_more": has_more,
        }))
    }
    .await;
    respond(result)
}

/// `GET /v1/memories/{id}`.
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = principal.as_ref().map_or("", |p| &*p.key_id);
    let result = async {
        let row = state
            .memory
            .store()
            .memory(owner, &id)
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| not_found(&id))?;
        Ok(memory_json(&row))
    }
    .await;
    respond(result)
}

/// `PUT /v1/memories/{id}` `{"memory": "…"}`.
pub async fn update(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let owner = principal.as_ref().map_or("", |p| &*p.key_id);
    let result = async {
        let object = read_body(&state, body)?;
        let text: String = object.get("memory")?.ok_or_else(|| {
            GatewayError::invalid("Missing required parameter: 'memory'.", Some("memory"))
        })?;
        let text = check_memory(&text, "memory")?;
        let row = state
            .memory
            .update(owner, &id, &text)
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| not_found(&id))?;
        Ok(memory_json(&row))
    }
    .await;
    respond(result)
}

/// `DELETE /v1/memories/{id}`.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = principal.as_ref().map_or("", |p| &*p.key_id);
    let result = async {
        if !state
            .memory
            .delete(owner, &id)
            .await
            .map_err(super::store_failed)?
        {
            return Err(not_found(&id));
        }
        Ok(json!({"id": id, "object": "memory.deleted", "deleted": true}))
    }
    .await;
    respond(result)
}

/// `DELETE /v1/memories?user=…`: every memory of one user.
pub async fn delete_all(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    query: QueryPairs,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let result = async {
        let pairs = pairs(query)?;
        let user = pairs
            .iter()
            .find(|(k, _)| k == "user")
            .map(|(_, v)| check_user(v))
            .transpose()?
            .ok_or_else(|| {
                GatewayError::invalid(
                    "Missing required query parameter: 'user' (whose memories to delete).",
                    Some("user"),
                )
            })?;
        let subject = Subject::new(owner, &user);
        let deleted = state
            .memory
            .delete_subject(&subject)
            .await
            .map_err(super::store_failed)?;
        Ok(json!({"object": "memory.deleted", "user": user, "deleted": deleted}))
    }
    .await;
    respond(result)
}

/// `GET /v1/memories/{id}/history`: every change, oldest first (kept after a delete).
pub async fn history(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = principal.as_ref().map_or("", |p| &*p.key_id);
    let result = async {
        let rows = state
            .memory
            .history(owner, &id)
            .await
            .map_err(super::store_failed)?;
        if rows.is_empty() {
            return Err(not_found(&id));
        }
        Ok(json!({
            "object": "list",
            "data": rows.iter().map(history_json).collect::<Vec<_>>(),
        }))
    }
    .await;
    respond(result)
}

/// `GET /v1/memories/jobs/{id}`: an extraction job's state (`queued`, `running`,
/// `completed` or `failed`, with its attempts, last error and result).
pub async fn job(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = principal.as_ref().map_or("", |p| &*p.key_id);
    let result = async {
        let job = state
            .memory
            .store()
            .memory_job(owner, &id)
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| {
                GatewayError::NotFound(format!("Memory job with id '{id}' not found."))
            })?;
        Ok(json!({
            "id": job.id,
            "object": "memory.job",
            "status": job.status,
            "user": job.subject,
            "conversation_id": job.conversation_id,
            "attempts": job.attempts,
            "error": job.error,
            "result": job.result.as_deref().map(metadata_value),
            "created_at": job.created_at,
            "updated_at": job.updated_at,
        }))
    }
    .await;
    respond(result)
}

/// `POST /v1/memories/search` `{"user", "query", "limit"}`: best first.
pub async fn search(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let result = async {
        let object = read_body(&state, body)?;
        let subject = Subject::new(owner, &read_user(&object)?);
        let query: String = object.get("query")?.ok_or_else(|| {
            GatewayError::invalid("Missing required parameter: 'query'.", Some("query"))
        })?;
        if query.chars().count() > MAX_MEMORY_CHARS {
            return Err(GatewayError::invalid(
                format!("'query' is longer than {MAX_MEMORY_CHARS} characters."),
                Some("query"),
            ));
        }
        let limit: i64 = object.get("limit")?.unwrap_or(10);
        let limit = usize::try_from(limit)
            .ok()
            .filter(|n| (1..=MAX_SEARCH_LIMIT).contains(n))
            .ok_or_else(|| {
                GatewayError::invalid(
                    format!("Invalid 'limit': {limit}. It can range between 1 and 100."),
                    Some("limit"),
                )
            })?;
        let found = state
            .memory
            .search(&subject, &query, limit, principal.as_ref())
            .await
            .map_err(super::store_failed)?;
        Ok(json!({
            "object": "list",
            "data": found.iter().map(|f| found_json(f, &subject.user)).collect::<Vec<_>>(),
        }))
    }
    .await;
    respond(result)
}

pub fn memory_json(row: &MemoryRow) -> Value {
    json!({
        "id": row.id,
        "object": "memory",
        "memory": row.memory,
        "user": row.subject,
        "metadata": metadata_value(&row.metadata),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    })
}

fn found_json(found: &Found, user: &str) -> Value {
    json!({
        "id": found.id,
        "object": "memory",
        "memory": found.memory,
        "user": user,
        "score": found.score,
        "metadata": metadata_value(&found.metadata),
        "created_at": found.created_at,
        "updated_at": found.updated_at,
    })
}

fn history_json(row: &HistoryRow) -> Value {
    json!({
        "id": format!("memhist_{}", row.seq),
        "object": "memory.history",
        "memory_id": row.memory_id,
        "event": row.event,
        "old_memory": row.old_memory,
        "new_memory": row.new_memory,
        "job_id": row.job_id,
        "created_at": row.created_at,
    })
}

fn metadata_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::Object(Map::new()))
}

/// The required `user` of a body.
fn read_user(object: &JsonObject) -> Result<String, GatewayError> {
    let user: String = object.get("user")?.ok_or_else(|| {
        GatewayError::invalid(
            "Missing required parameter: 'user' (whose memories these are).",
            Some("user"),
        )
    })?;
    check_user(&user)
}

fn check_user(user: &str) -> Result<String, GatewayError> {
    if user.is_empty() || user.chars().count() > MAX_SUBJECT_CHARS {
        return Err(GatewayError::invalid(
            format!("'user' must be 1 to {MAX_SUBJECT_CHARS} characters."),
            Some("user"),
        ));
    }
    Ok(user.to_owned())
}

/// The optional `metadata` object, as JSON text.
fn read_metadata(object: &JsonObject) -> Result<String, GatewayError> {
    let metadata: Option<Map<String, Value>> = object.get("metadata")?;
    let text =
        serde_json::to_string(&metadata.unwrap_or_default()).unwrap_or_else(|_| "{}".to_owned());
    if text.len() > MAX_METADATA_BYTES {
        return Err(GatewayError::invalid(
            format!("'metadata' is larger than {MAX_METADATA_BYTES} bytes."),
            Some("metadata"),
        ));
    }
    Ok(text)
}

/// One `{role, content}` message: its role and its text (a string, or the text of its
/// parts).
fn read_message(index: usize, message: &Value) -> Result<(String, String), GatewayError> {
    let bad = |what: &str| {
        GatewayError::invalid(
            format!("Invalid 'messages[{index}]': {what}."),
            Some("messages"),
        )
    };
    let role = message
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or("user");
    if !matches!(role, "user" | "assistant" | "system" | "developer") {
        return Err(bad("'role' must be user, assistant, system or developer"));
    }
    let content = match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => return Err(bad("'content' must be a string or a list of text parts")),
    };
    let content = check_memory(&content, "messages").map_err(|_| {
        bad(&format!(
            "'content' must hold 1 to {MAX_MEMORY_CHARS} characters of text"
        ))
    })?;
    Ok((role.to_owned(), content))
}

fn check_memory(text: &str, param: &'static str) -> Result<String, GatewayError> {
    let text = text.trim();
    if text.is_empty() || text.chars().count() > MAX_MEMORY_CHARS {
        return Err(GatewayError::invalid(
            format!("A memory must hold 1 to {MAX_MEMORY_CHARS} characters."),
            Some(param),
        ));
    }
    Ok(text.to_owned())
}

fn not_found(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("Memory with id '{id}' not found."))
}
