//! `/v1/conversations`: OpenAI's Conversations API (create, retrieve, update, delete;
//! items create, list, retrieve, delete), plus what a chat app needs and OpenAI lacks: the
//! caller's conversations, newest activity first (`GET /v1/conversations`), and
//! archiving. Every call is scoped to the caller's key: another key's id is a 404.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;

use super::guard::Caller;
use super::page::{PageQuery, QueryPairs, item_list, list, pairs};
use crate::conversations::context::item_tokens;
use crate::conversations::now_secs;
use crate::error::GatewayError;
use crate::state::AppState;
use crate::store::conversations::{ConversationFilter, ConversationRow, NewItem, Scope};
use crate::tokens::TokenizerKind;
use crate::wire::JsonObject;
use crate::wire::responses::{Item, check_metadata, is_id, new_id, parse_items};

/// Items one call may add (OpenAI's limit).
const MAX_ITEMS_PER_CALL: usize = 20;
/// Items added directly are counted with this tokenizer (a turn's own items with its
/// alias's).
const DIRECT_TOKENIZER: TokenizerKind = TokenizerKind::O200kBase;

/// `POST /v1/conversations`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let owner = principal.as_ref().map(|p| p.key_id.to_string());
    let result = async {
        let object = read_body(&state, body)?;
        only_fields(&object, &["items", "metadata"])?;
        let metadata: BTreeMap<String, String> = object.get("metadata")?.unwrap_or_default();
        check_metadata(&metadata, "metadata")?;
        let items = read_items(&object, false)?;
        let now_ms = now_ms();
        let row = ConversationRow {
            id: new_id("conv"),
            key_id: owner.clone(),
            created_at: i64::try_from(now_secs()).unwrap_or(i64::MAX),
            updated_ms: now_ms,
            metadata: serde_json::to_string(&metadata).unwrap_or_else(|_| "{}".into()),
            user_id: metadata.get("user").cloned(),
            archived_at: None,
            item_count: i64::try_from(items.len()).unwrap_or(0),
        };
        let pairs: Vec<(String, String)> = metadata.into_iter().collect();
        state
            .conversations
            .store()
            .create_conversation(&row, &pairs, &new_items(&items))
            .await
            .map_err(super::store_failed)?;
        metrics::counter!("switchyard_conversations_created_total").increment(1);
        Ok::<_, GatewayError>(conversation_json(&row))
    }
    .await;
    respond(result)
}

/// `GET /v1/conversations`: the caller's conversations, newest activity first; filters
/// `user`, `metadata[KEY]=VALUE`, `archived=true` (include archived ones).
pub async fn list_mine(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    query: QueryPairs,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    list_conversations(&state, Scope::Key(owner), query).await
}

/// `GET /admin/conversations`: every key's conversations (operator only).
pub async fn list_all(State(state): State<Arc<AppState>>, query: QueryPairs) -> Response {
    list_conversations(&state, Scope::Any, query).await
}

async fn list_conversations(state: &AppState, scope: Scope<'_>, query: QueryPairs) -> Response {
    let result = async {
        let pairs = pairs(query)?;
        let page = PageQuery::parse(&pairs)?;
        let mut user = None;
        let mut metadata = None;
        let mut include_archived = false;
        for (key, value) in &pairs {
            match key.as_str() {
                "user" => user = Some(value.as_str()),
                "archived" => include_archived = value == "true",
                key => {
                    if let Some(name) = key
                        .strip_prefix("metadata[")
                        .and_then(|k| k.strip_suffix(']'))
                    {
                        metadata = Some((name, value.as_str()));
                    }
                }
            }
        }
        let filter = ConversationFilter {
            user,
            metadata,
            include_archived,
            after: page.after.as_deref(),
            limit: page.limit,
        };
        let (rows, has_more) = state
            .conversations
            .store()
            .list_conversations(scope, &filter)
            .await
            .map_err(super::store_failed)?;
        Ok::<_, GatewayError>(list(rows.iter().map(conversation_json).collect(), has_more))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/conversations/{id}`.
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    respond(
        find(&state, owner, &id)
            .await
            .map(|row| conversation_json(&row)),
    )
}

/// `POST /v1/conversations/{id}`: replaces the metadata.
pub async fn update(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let result = async {
        check_id(&id)?;
        let object = read_body(&state, body)?;
        only_fields(&object, &["metadata"])?;
        if object.raw("metadata").is_none() {
            return Err(GatewayError::invalid(
                "Missing required parameter: 'metadata'.",
                Some("metadata"),
            ));
        }
        let metadata: BTreeMap<String, String> = object.get("metadata")?.unwrap_or_default();
        check_metadata(&metadata, "metadata")?;
        let text = serde_json::to_string(&metadata).unwrap_or_else(|_| "{}".into());
        let pairs: Vec<(String, String)> = metadata.clone().into_iter().collect();
        let row = state
            .conversations
            .store()
            .update_conversation_metadata(
                owner,
                &id,
                &text,
                metadata.get("user").map(String::as_str),
                &pairs,
            )
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| not_found(&id))?;
        Ok(conversation_json(&row))
    }
    .await;
    respond(result)
}

/// `DELETE /v1/conversations/{id}`.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let result = async {
        check_id(&id)?;
        let deleted = state
            .conversations
            .store()
            .delete_conversation(owner, &id)
            .await
            .map_err(super::store_failed)?;
        if !deleted {
            return Err(not_found(&id));
        }
        Ok(serde_json::json!({"id": id, "object": "conversation.deleted", "deleted": true}))
    }
    .await;
    respond(result)
}

/// `POST /v1/conversations/{id}/archive`: out of the default list, still readable and
/// usable.
pub async fn archive(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    set_archived(&state, principal.as_ref().map(|p| &*p.key_id), &id, true).await
}

/// `POST /v1/conversations/{id}/unarchive`.
pub async fn unarchive(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    set_archived(&state, principal.as_ref().map(|p| &*p.key_id), &id, false).await
}

async fn set_archived(state: &AppState, owner: Option<&str>, id: &str, archived: bool) -> Response {
    let result = async {
        check_id(id)?;
        let at = archived.then(|| i64::try_from(now_secs()).unwrap_or(i64::MAX));
        let row = state
            .conversations
            .store()
            .set_conversation_archived(owner, id, at)
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| not_found(id))?;
        Ok(conversation_json(&row))
    }
    .await;
    respond(result)
}

/// `POST /v1/conversations/{id}/items`: appends up to 20 items, answered as a list.
pub async fn create_items(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let result = async {
        check_id(&id)?;
        let object = read_body(&state, body)?;
        let items = read_items(&object, true)?;
        let rows = state
            .conversations
            .store()
            .append_items(owner, &id, &new_items(&items))
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| not_found(&id))?;
        Ok::<_, GatewayError>(item_list(rows, false))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/conversations/{id}/items`.
pub async fn list_items(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
    query: QueryPairs,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let result = async {
        let pairs = pairs(query)?;
        let page = PageQuery::parse(&pairs)?;
        check_id(&id)?;
        let (rows, has_more) = state
            .conversations
            .store()
            .conversation_items(owner, &id, &page.as_page())
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| not_found(&id))?;
        Ok::<_, GatewayError>(item_list(rows, has_more))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/conversations/{id}/items/{item_id}`.
pub async fn retrieve_item(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path((id, item_id)): Path<(String, String)>,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let result = async {
        check_id(&id)?;
        let row = state
            .conversations
            .store()
            .conversation_item(owner, &id, &item_id)
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| item_not_found(&item_id))?;
        Ok(serde_json::from_str::<Value>(&row.body).unwrap_or(Value::Null))
    }
    .await;
    respond(result)
}

/// `DELETE /v1/conversations/{id}/items/{item_id}`: answered with the conversation.
pub async fn delete_item(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path((id, item_id)): Path<(String, String)>,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let result = async {
        check_id(&id)?;
        let row = state
            .conversations
            .store()
            .delete_conversation_item(owner, &id, &item_id)
            .await
            .map_err(super::store_failed)?
            .ok_or_else(|| item_not_found(&item_id))?;
        Ok(conversation_json(&row))
    }
    .await;
    respond(result)
}

pub(super) fn respond(result: Result<Value, GatewayError>) -> Response {
    result.map_or_else(IntoResponse::into_response, |v| {
        axum::Json(v).into_response()
    })
}

/// Refuses a field the call does not have, as OpenAI does: a typo or a field meant for
/// another route (`model`, `messages`) is named rather than silently ignored.
fn only_fields(object: &JsonObject, known: &[&str]) -> Result<(), GatewayError> {
    match object.fields().find(|(name, _)| !known.contains(name)) {
        Some((unknown, _)) => Err(GatewayError::InvalidRequest {
            message: format!("Unknown parameter: '{unknown}'."),
            param: None,
            code: Some("unknown_parameter"),
        }),
        None => Ok(()),
    }
}

pub(super) fn read_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<JsonObject, GatewayError> {
    let body = body
        .map_err(|r| GatewayError::from_body_rejection(r, state.settings.server.max_body_bytes))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return JsonObject::parse(Bytes::from_static(b"{}"));
    }
    JsonObject::parse(body)
}

/// `items` of a create body: at most 20, each a valid input item.
fn read_items(object: &JsonObject, required: bool) -> Result<Vec<Item>, GatewayError> {
    let items: Option<Vec<Value>> = object.get("items")?;
    let items = match items {
        Some(items) => items,
        None if required => {
            return Err(GatewayError::invalid(
                "Missing required parameter: 'items'.",
                Some("items"),
            ));
        }
        None => Vec::new(),
    };
    if items.len() > MAX_ITEMS_PER_CALL {
        return Err(GatewayError::invalid(
            format!(
                "Invalid 'items': array too long. Expected an array with maximum length \
                 {MAX_ITEMS_PER_CALL}, but got an array with length {} instead.",
                items.len()
            ),
            Some("items"),
        ));
    }
    parse_items(&items, "items")
}

fn new_items(items: &[Item]) -> Vec<NewItem> {
    items
        .iter()
        .map(|item| NewItem {
            id: item.id().to_owned(),
            kind: "input",
            item_type: item.kind().to_owned(),
            body: item.to_json(),
            tokens: item_tokens(DIRECT_TOKENIZER, item),
        })
        .collect()
}

async fn find(
    state: &AppState,
    owner: Option<&str>,
    id: &str,
) -> Result<ConversationRow, GatewayError> {
    check_id(id)?;
    state
        .conversations
        .store()
        .conversation(owner, id)
        .await
        .map_err(super::store_failed)?
        .ok_or_else(|| not_found(id))
}

/// An id of the wrong kind or shape is simply not found.
fn check_id(id: &str) -> Result<(), GatewayError> {
    if is_id(id, "conv") {
        Ok(())
    } else {
        Err(not_found(id))
    }
}

/// A conversation as OpenAI shapes it, plus when it was last active, whether it is
/// archived and how many items it holds.
pub fn conversation_json(row: &ConversationRow) -> Value {
    let metadata: Value =
        serde_json::from_str(&row.metadata).unwrap_or(Value::Object(Default::default()));
    serde_json::json!({
        "id": row.id,
        "object": "conversation",
        "created_at": row.created_at,
        "metadata": metadata,
        "updated_at": row.updated_ms / 1000,
        "archived_at": row.archived_at,
        "item_count": row.item_count,
    })
}

fn not_found(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("Conversation with id '{id}' not found."))
}

fn item_not_found(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("Item with id '{id}' not found."))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
