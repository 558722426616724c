//! `GET /v1/events`: a WebSocket that follows conversations and background responses as
//! they happen, so a second tab or device sees a reply while it is written.
//!
//! The client sends `{"type": "subscribe", "conversation": "conv_…"}` (or `"response":
//! "resp_…"`) and `{"type": "unsubscribe", …}`; the server answers `subscribed` /
//! `unsubscribed`, then sends `{"type": "conversation.event", "conversation", "event"}`
//! for every event of the conversation's turns (a streamed turn's events as its own
//! client gets them; a whole answer's ending event) through [`crate::fanout`], across
//! instances, and `{"type": "response.event", "response", "event"}` for a background
//! response: its stored events when it streams, else its status changes. Only the
//! caller's own conversations and responses can be followed (another key's id is a 404
//! `error` event). A socket follows at most [`MAX_SUBSCRIPTIONS`] at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{AbortHandle, JoinSet};

use super::guard::Caller;
use super::socket::{Outbox, error_event, serve};
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::state::AppState;
use crate::wire::responses::is_id;

/// Subscriptions one socket may hold.
pub const MAX_SUBSCRIPTIONS: usize = 64;
/// How often a background response that does not stream is read for a status change.
const STATUS_POLL: Duration = Duration::from_millis(250);

/// `GET /v1/events` with `Upgrade: websocket`.
pub async fn connect(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return super::socket::not_upgraded(&rejection).into_response(),
    };
    upgrade
        .max_message_size(64 * 1024)
        .read_buffer_size(super::socket::SOCKET_BUFFER)
        .write_buffer_size(super::socket::SOCKET_BUFFER)
        .on_upgrade(move |socket| {
            let handler_state = state.clone();
            serve(state, socket, "events", move |inbox, outbox| {
                run(handler_state, principal, inbox, outbox)
            })
        })
}

/// What a subscription follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    Conversation(String),
    Response(String),
}

impl Target {
    fn key(&self) -> (&'static str, &str) {
        match self {
            Target::Conversation(id) => ("conversation", id),
            Target::Response(id) => ("response", id),
        }
    }
}

async fn run(
    state: Arc<AppState>,
    principal: Option<Arc<Principal>>,
    mut inbox: mpsc::Receiver<String>,
    outbox: Outbox,
) {
    let owner = principal.as_ref().map(|p| p.key_id.to_string());
    let mut running: JoinSet<Target> = JoinSet::new();
    let mut subscriptions: HashMap<Target, AbortHandle> = HashMap::new();
    loop {
        tokio::select! {
            message = inbox.recv() => {
                let Some(text) = message else { return };
                let reply = handle(&state, owner.as_deref(), &text, &mut running, &mut subscriptions, &outbox).await;
                if let Some(reply) = reply
                    && !outbox.send(reply)
                {
                    return;
                }
            }
            Some(ended) = running.join_next(), if !running.is_empty() => {
                if let Ok(target) = ended {
                    subscriptions.remove(&target);
                }
            }
        }
    }
}

/// One client message; the reply to send, if any.
async fn handle(
    state: &Arc<AppState>,
    owner: Option<&str>,
    text: &str,
    running: &mut JoinSet<Target>,
    subscriptions: &mut HashMap<Target, AbortHandle>,
    outbox: &Outbox,
) -> Option<String> {
    let (kind, target) = match read(text) {
        Ok(read) => read,
        Err(err) => return Some(error_event(&err, None)),
    };
    let (name, id) = target.key();
    let answer = |kind: &str| json!({"type": kind, name: id}).to_string();
    if kind == "unsubscribe" {
        if let Some(handle) = subscriptions.remove(&target) {
            handle.abort();
        }
        return Some(answer("unsubscribed"));
    }
    if subscriptions.contains_key(&target) {
        return Some(answer("subscribed"));
    }
    if subscriptions.len() >= MAX_SUBSCRIPTIONS {
        return Some(error_event(
            &GatewayError::invalid(
                format!(
                    "A socket follows at most {MAX_SUBSCRIPTIONS} conversations and responses."
                ),
                None,
            ),
            None,
        ));
    }
    let store = state.conversations.store();
    let found = match &target {
        Target::Conversation(id) => store.conversation(owner, id).await.map(|c| c.is_some()),
        Target::Response(id) => store.response(owner, id).await.map(|r| r.is_some()),
    };
    match found {
        Ok(true) => {}
        Ok(false) => {
            return Some(error_event(
                &GatewayError::NotFound(format!("No {name} with id '{id}' was found.")),
                None,
            ));
        }
        Err(e) => return Some(error_event(&super::store_failed(e), None)),
    }
    // Subscribed before the acknowledgement is sent, so no event after it is missed.
    let handle = match &target {
        Target::Conversation(id) => {
            let subscription = state.fanout.subscribe(&format!("conversation:{id}"));
            running.spawn(follow_conversation(
                target.clone(),
                subscription,
                outbox.clone(),
            ))
        }
        Target::Response(_) => running.spawn(follow_response(
            state.clone(),
            owner.map(str::to_string),
            target.clone(),
            outbox.clone(),
        )),
    };
    let reply = answer("subscribed");
    subscriptions.insert(target.clone(), handle);
    Some(reply)
}

/// `{"type": "subscribe" | "unsubscribe", "conversation" | "response": id}`.
fn read(text: &str) -> Result<(String, Target), GatewayError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| GatewayError::invalid(format!("The message is not valid JSON: {e}"), None))?;
    let kind = match value["type"].as_str() {
        Some(kind @ ("subscribe" | "unsubscribe")) => kind.to_string(),
        Some(other) => {
            return Err(GatewayError::invalid(
                format!(
                    "Unsupported message type '{other}': expected 'subscribe' or 'unsubscribe'."
                ),
                Some("type"),
            ));
        }
        None => {
            return Err(GatewayError::invalid(
                "Missing required parameter: 'type'.",
                Some("type"),
            ));
        }
    };
    let target = match (value["conversation"].as_str(), value["response"].as_str()) {
        (Some(id), None) if is_id(id, "conv") => Target::Conversation(id.to_string()),
        (None, Some(id)) if is_id(id, "resp") => Target::Response(id.to_string()),
        (Some(id), None) | (None, Some(id)) => {
            return Err(GatewayError::NotFound(format!(
                "No object with id '{id}' was found."
            )));
        }
        _ => {
            return Err(GatewayError::invalid(
                "Name exactly one of 'conversation' or 'response'.",
                None,
            ));
        }
    };
    Ok((kind, target))
}

fn wrap(target: &Target, event: &str) -> String {
    let (name, id) = target.key();
    format!(r#"{{"type":"{name}.event","{name}":"{id}","event":{event}}}"#)
}

/// Forwards a conversation's events until the socket ends or the client unsubscribes.
async fn follow_conversation(
    target: Target,
    mut subscription: crate::fanout::Subscription,
    outbox: Outbox,
) -> Target {
    loop {
        match subscription.events.recv().await {
            Ok(event) => {
                if !outbox.send(wrap(&target, &event)) {
                    break;
                }
            }
            // Fell behind by more than the topic keeps: a slow reader, cut off.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                outbox.overflowed();
                break;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    target
}

/// Forwards a background response's events: its stored stream when it streams, else each
/// status change with the response, until it ends.
async fn follow_response(
    state: Arc<AppState>,
    owner: Option<String>,
    target: Target,
    outbox: Outbox,
) -> Target {
    let Target::Response(id) = &target else {
        return target;
    };
    let conversations = &state.conversations;
    let streamed = matches!(
        state.store.job_state(id).await,
        Ok(Some((_, options))) if crate::conversations::background::streamed(&options)
    );
    if streamed {
        let mut frames = std::pin::pin!(conversations.follow(id.clone(), None));
        while let Some(Ok(frame)) = frames.next().await {
            let Some(event) = crate::wire::sse::parse_event(&frame) else {
                continue;
            };
            if !outbox.send(wrap(&target, &event.data)) {
                break;
            }
        }
        return target;
    }
    let mut last = String::new();
    loop {
        let row = match conversations.store().response(owner.as_deref(), id).await {
            Ok(Some(row)) => row,
            _ => break,
        };
        if row.status != last {
            let event = format!(
                r#"{{"type":"response.{}","response":{}}}"#,
                row.status, row.body
            );
            if !outbox.send(wrap(&target, &event)) {
                break;
            }
            last = row.status;
        }
        if matches!(
            last.as_str(),
            "completed" | "failed" | "cancelled" | "incomplete"
        ) {
            break;
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read() {
        let (kind, target) = read(r#"{"type": "subscribe", "conversation": "conv_ab12"}"#).unwrap();
        assert_eq!(
            (kind.as_str(), target),
            ("subscribe", Target::Conversation("conv_ab12".into()))
        );
        let (kind, target) = read(r#"{"type": "unsubscribe", "response": "resp_ab12"}"#).unwrap();
        assert_eq!(
            (kind.as_str(), target),
            ("unsubscribe", Target::Response("resp_ab12".into()))
        );
        for bad in [
            "nope",
            r#"{"type": "listen", "conversation": "conv_a"}"#,
            r#"{"type": "subscribe"}"#,
            r#"{"type": "subscribe", "conversation": "conv_a", "response": "resp_a"}"#,
            r#"{"type": "subscribe", "conversation": "../etc"}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        assert_eq!(
            wrap(&Target::Conversation("conv_1".into()), r#"{"type":"x"}"#),
            r#"{"type":"conversation.event","conversation":"conv_1","event":{"type":"x"}}"#
        );
    }
}
