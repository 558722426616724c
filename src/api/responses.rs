//! `/v1/responses`: OpenAI's Responses API on every configured model. Handlers extract,
//! hand the turn to [`crate::conversations`], render; stored responses are read back
//! from the store, scoped to the caller's key.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::guard::Caller;
use super::page::{PageQuery, QueryPairs, item_list, pairs};
use super::render::{json_response, sse_response};
use crate::conversations::events::replay;
use crate::error::GatewayError;
use crate::state::AppState;
use crate::wire::responses::{ResponseObject, is_id};

/// Set on a response whose history was cut to fit the context window.
pub const TRUNCATED_HEADER: &str = "x-switchyard-context-truncated";

/// `POST /v1/responses`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = super::request_log(&state, "responses", &headers);
    let ctx = super::call_context(&state, "responses", &log, principal.clone(), &headers);
    let body = match super::parse_body(&state, body, Ok, &ctx, &mut log) {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
    };
    let switch = match crate::conversations::recall::MemorySwitch::from_headers(&headers) {
        Ok(switch) => switch,
        Err(err) => {
            ctx.metering.refused(None, &err);
            return super::fail(&mut log, err);
        }
    };
    let turn = match state
        .conversations
        .prepare(principal.as_ref(), body.clone(), switch)
        .await
    {
        Ok(turn) => turn,
        Err(err) => {
            ctx.metering.refused(None, &err);
            return super::fail(&mut log, err);
        }
    };
    if turn.response.background {
        // Checked and stored as a job; a worker runs it (see `conversations::background`).
        return match state
            .conversations
            .queue_background(&turn, &body, switch)
            .await
        {
            Ok(json) => {
                state.jobs.wake();
                log.model = Some(turn.response.model.as_str().into());
                log.first_byte();
                log.succeed();
                if turn.stream {
                    // The events as the worker stores them, wherever it runs.
                    let events = state.conversations.follow(turn.response.id.clone(), None);
                    sse_response(Body::from_stream(events))
                } else {
                    json_response(Bytes::from(json))
                }
            }
            Err(err) => super::fail(&mut log, err),
        };
    }
    let model = turn.response.model.clone();
    log.stream = turn.stream;
    let truncated = turn.truncated;
    let mut response = if turn.stream {
        match state.conversations.stream(&ctx, turn).await {
            Err(err) => return super::call_failed(&state, &mut log, &model, err),
            Ok(turn) => {
                log.model = Some(model.as_str().into());
                let state = (turn.frames, turn.usage, log);
                let body =
                    futures_util::stream::unfold(state, |(mut rx, usage, mut log)| async move {
                        match rx.recv().await {
                            Some(frame) => {
                                log.first_byte();
                                Some((Ok::<_, std::convert::Infallible>(frame), (rx, usage, log)))
                            }
                            None => {
                                log.usage = usage.get().copied();
                                log.succeed();
                                None
                            }
                        }
                    });
                sse_response(Body::from_stream(body))
            }
        }
    } else {
        match state.conversations.complete(&ctx, turn).await {
            Err(err) => return super::call_failed(&state, &mut log, &model, err),
            Ok((response, body)) => {
                log.model = Some(model.as_str().into());
                log.usage = response.usage.map(|u| crate::wire::Usage {
                    prompt_tokens: u.input_tokens,
                    completion_tokens: u.output_tokens,
                    total_tokens: u.total_tokens,
                });
                log.first_byte();
                log.succeed();
                json_response(Bytes::from(body))
            }
        }
    };
    if truncated {
        response
            .headers_mut()
            .insert(TRUNCATED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

/// `POST /v1/responses/input_tokens`: the input tokens a create request would send.
pub async fn input_tokens(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(r) => {
            return GatewayError::from_body_rejection(r, state.settings.server.max_body_bytes)
                .into_response();
        }
    };
    match state
        .conversations
        .count_input_tokens(principal.as_ref(), body)
        .await
    {
        Ok(tokens) => axum::Json(serde_json::json!({
            "object": "response.input_tokens",
            "input_tokens": tokens,
        }))
        .into_response(),
        Err(err) => err.into_response(),
    }
}

/// `GET /v1/responses/{id}`; with `stream=true`, its events replayed (after
/// `starting_after`, a sequence number), as the SDK's `responses.stream(response_id=…)`
/// reads them.
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
    query: QueryPairs,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let pairs = match pairs(query) {
        Ok(pairs) => pairs,
        Err(err) => return err.into_response(),
    };
    let mut stream = false;
    let mut starting_after: Option<u64> = None;
    for (key, value) in &pairs {
        match key.as_str() {
            "stream" => stream = value == "true",
            "starting_after" => match value.parse() {
                Ok(n) => starting_after = Some(n),
                Err(_) => {
                    return GatewayError::invalid(
                        format!("Invalid 'starting_after': '{value}'. Expected an integer."),
                        Some("starting_after"),
                    )
                    .into_response();
                }
            },
            _ => {}
        }
    }
    let row = match find(&state, owner, &id).await {
        Ok(row) => row,
        Err(err) => return err.into_response(),
    };
    if !stream {
        return json_response(Bytes::from(row.body));
    }
    let response: ResponseObject = match serde_json::from_str(&row.body) {
        Ok(response) => response,
        Err(e) => {
            return GatewayError::Internal(format!("stored response unreadable: {e}"))
                .into_response();
        }
    };
    // A background response's events are the job's (stored when it was streamed).
    if response.background {
        match state.store.job_state(&id).await {
            Ok(Some((status, options))) => {
                if crate::conversations::background::streamed(&options) {
                    let after = starting_after.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
                    let events = state.conversations.follow(id, after);
                    return sse_response(Body::from_stream(events));
                }
                if status == "queued" || status == "running" {
                    return GatewayError::invalid(
                        "This background response was created without 'stream': its events are \
                         not kept. Poll GET /v1/responses/{id} until it ends.",
                        Some("stream"),
                    )
                    .into_response();
                }
            }
            Ok(None) => {}
            Err(e) => return super::store_failed(e).into_response(),
        }
    }
    // Frame n carries sequence number n.
    let skip = starting_after.map_or(0, |n| {
        usize::try_from(n).unwrap_or(usize::MAX).saturating_add(1)
    });
    let frames: Vec<Result<Bytes, std::convert::Infallible>> =
        replay(&response).into_iter().skip(skip).map(Ok).collect();
    sse_response(Body::from_stream(futures_util::stream::iter(frames)))
}

/// `DELETE /v1/responses/{id}`: the response and its items (items that are also a
/// conversation's stay in the conversation).
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    if !is_id(&id, "resp") {
        return not_found(&id).into_response();
    }
    match state
        .conversations
        .store()
        .delete_response(owner, &id)
        .await
    {
        Ok(true) => axum::Json(serde_json::json!({
            "id": id,
            "object": "response.deleted",
            "deleted": true,
        }))
        .into_response(),
        Ok(false) => not_found(&id).into_response(),
        Err(e) => super::store_failed(e).into_response(),
    }
}

/// `POST /v1/responses/{id}/cancel`: stops a background response (a queued one at once,
/// a running one through its worker, on whichever instance runs it) and answers with the
/// response as it then stands; cancelling a finished one changes nothing.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Response {
    use crate::store::jobs::Cancel;
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let row = match find(&state, owner, &id).await {
        Ok(row) => row,
        Err(err) => return err.into_response(),
    };
    let background =
        serde_json::from_str::<serde_json::Value>(&row.body).is_ok_and(|v| v["background"] == true);
    if !background {
        return GatewayError::invalid(
            "Only responses created with 'background' set to true can be cancelled.",
            None,
        )
        .into_response();
    }
    let cancelled = crate::conversations::background::ended(&row.body, "cancelled", None);
    let outcome = match state
        .store
        .cancel_response_job(
            owner.unwrap_or(""),
            &id,
            &cancelled,
            crate::memory::now_ms(),
        )
        .await
    {
        Ok(outcome) => outcome,
        Err(e) => return super::store_failed(e).into_response(),
    };
    match outcome {
        Cancel::Cancelled => return json_response(Bytes::from(cancelled)),
        Cancel::Finished => return json_response(Bytes::from(row.body)),
        Cancel::Requested => {}
    }
    // Running: here it stops at once, elsewhere at its worker's next heartbeat (a
    // second). Answer with the row once it says how it ended.
    state.jobs.cancel_local(&id);
    let mut last = row.body;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        match find(&state, owner, &id).await {
            Ok(row) if row.status != "in_progress" && row.status != "queued" => {
                return json_response(Bytes::from(row.body));
            }
            Ok(row) => last = row.body,
            Err(err) => return err.into_response(),
        }
    }
    json_response(Bytes::from(last))
}

/// `GET /v1/responses/{id}/input_items`.
pub async fn input_items(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
    query: QueryPairs,
) -> Response {
    let owner = principal.as_ref().map(|p| &*p.key_id);
    let page = match pairs(query).and_then(|pairs| PageQuery::parse(&pairs)) {
        Ok(page) => page,
        Err(err) => return err.into_response(),
    };
    if !is_id(&id, "resp") {
        return not_found(&id).into_response();
    }
    match state
        .conversations
        .store()
        .response_input_items(owner, &id, &page.as_page())
        .await
    {
        Ok(Some((rows, has_more))) => item_list(rows, has_more),
        Ok(None) => not_found(&id).into_response(),
        Err(e) => super::store_failed(e).into_response(),
    }
}

async fn find(
    state: &AppState,
    owner: Option<&str>,
    id: &str,
) -> Result<crate::store::conversations::ResponseRow, GatewayError> {
    if !is_id(id, "resp") {
        return Err(not_found(id));
    }
    state
        .conversations
        .store()
        .response(owner, id)
        .await
        .map_err(super::store_failed)?
        .ok_or_else(|| not_found(id))
}

fn not_found(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("Response with id '{id}' not found."))
}
