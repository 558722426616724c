//! `/v1/responses` in WebSocket mode (`client.responses.connect()`): the client sends
//! `{"type": "response.create", …}` events with the fields of `POST /v1/responses` and
//! receives the same events as the SSE stream, one response after another on one socket
//! (in the order they were sent). `stream` is implied; `background` is refused, as
//! OpenAI does; a `stream_id` is echoed on every event of its response. A failure before
//! the stream starts is an `error` event with the status it would have had over HTTP.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use super::guard::Caller;
use super::socket::{Outbox, error_event, serve};
use crate::auth::Principal;
use crate::conversations::recall::MemorySwitch;
use crate::error::GatewayError;
use crate::state::AppState;
use crate::wire::responses::new_id;

/// `GET /v1/responses` with `Upgrade: websocket`.
pub async fn connect(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return super::socket::not_upgraded(&rejection).into_response(),
    };
    let switch = match MemorySwitch::from_headers(&headers) {
        Ok(switch) => switch,
        Err(err) => return err.into_response(),
    };
    let max = state.settings.server.max_body_bytes;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(super::socket::SOCKET_BUFFER)
        .write_buffer_size(super::socket::SOCKET_BUFFER)
        .on_upgrade(move |socket| {
            let handler_state = state.clone();
            serve(state, socket, "responses", move |inbox, outbox| {
                run(handler_state, principal, switch, inbox, outbox)
            })
        })
}

/// Runs the socket's `response.create` events one after another.
async fn run(
    state: Arc<AppState>,
    principal: Option<Arc<Principal>>,
    switch: MemorySwitch,
    mut inbox: mpsc::Receiver<String>,
    outbox: Outbox,
) {
    while let Some(text) = inbox.recv().await {
        let _busy = outbox.busy();
        if !respond(&state, principal.as_ref(), switch, &text, &outbox).await {
            return;
        }
    }
}

/// One client event; false when the client can no longer be written to.
async fn respond(
    state: &Arc<AppState>,
    principal: Option<&Arc<Principal>>,
    switch: MemorySwitch,
    text: &str,
    outbox: &Outbox,
) -> bool {
    let (body, stream_id) = match read_event(text) {
        Ok(read) => read,
        Err(event) => return outbox.send(event),
    };
    let stream_id = stream_id.as_deref();
    let ctx = state.inference.context(
        "responses",
        Arc::from(new_id("req").as_str()),
        principal.cloned(),
    );
    let turn = match state.conversations.prepare(principal, body, switch).await {
        Ok(turn) => turn,
        Err(err) => {
            ctx.metering.refused(None, &err);
            return outbox.send(error_event(&err, stream_id));
        }
    };
    let mut frames = match state.conversations.stream(&ctx, turn).await {
        Ok(turn) => turn.frames,
        Err(err) => return outbox.send(error_event(&err, stream_id)),
    };
    while let Some(frame) = frames.recv().await {
        let Some(event) = crate::wire::sse::parse_event(&frame) else {
            continue;
        };
        let message = match stream_id {
            None => event.data.into_owned(),
            Some(id) => match serde_json::from_str::<Value>(&event.data) {
                Ok(mut value) => {
                    value["stream_id"] = id.into();
                    value.to_string()
                }
                Err(_) => event.data.into_owned(),
            },
        };
        if !outbox.send(message) {
            // Dropping the frames stops the turn (and its upstream call).
            return false;
        }
    }
    true
}

/// A `response.create` event as a create request's body (streamed), and its `stream_id`.
/// A refusal is the `error` event to send.
fn read_event(text: &str) -> Result<(Bytes, Option<String>), String> {
    let mut value: Value = serde_json::from_str(text).map_err(|e| {
        error_event(
            &GatewayError::invalid(format!("The event is not valid JSON: {e}"), None),
            None,
        )
    })?;
    let Some(object) = value.as_object_mut() else {
        return Err(error_event(
            &GatewayError::invalid("An event must be a JSON object.", None),
            None,
        ));
    };
    let stream_id = match object.remove("stream_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if id.len() <= 128 => Some(id),
        Some(_) => {
            return Err(error_event(
                &GatewayError::invalid(
                    "'stream_id' must be a string of at most 128 characters.",
                    Some("stream_id"),
                ),
                None,
            ));
        }
    };
    let refuse = |message: String, param| {
        Err(error_event(
            &GatewayError::invalid(message, param),
            stream_id.as_deref(),
        ))
    };
    match object.remove("type") {
        Some(Value::String(kind)) if kind == "response.create" => {}
        Some(Value::String(kind)) => {
            return refuse(
                format!("Unsupported event type '{kind}': this socket takes 'response.create'."),
                Some("type"),
            );
        }
        _ => return refuse("Missing required parameter: 'type'.".into(), Some("type")),
    }
    if object.get("background").and_then(Value::as_bool) == Some(true) {
        return refuse(
            "'background' is not supported in WebSocket mode: create it over HTTP and follow it with GET /v1/responses/{id}?stream=true.".into(),
            Some("background"),
        );
    }
    if object.remove("generate").and_then(|g| g.as_bool()) == Some(false) {
        return refuse(
            "'generate': false is not supported.".into(),
            Some("generate"),
        );
    }
    object.insert("stream".into(), Value::Bool(true));
    Ok((Bytes::from(value.to_string()), stream_id))
}

#[cfg(test)]
mod tests {
    use super::read_event;

    #[test]
    fn events_become_streamed_create_bodies() {
        let (body, id) = read_event(
            r#"{"type": "response.create", "model": "m", "input": "hi", "stream_id": "lane-1"}"#,
        )
        .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["model"], "m");
        assert!(body.get("type").is_none() && body.get("stream_id").is_none());
        assert_eq!(id.as_deref(), Some("lane-1"));
        for (event, needle) in [
            ("nope", "JSON"),
            ("[1]", "object"),
            (r#"{"model": "m"}"#, "type"),
            (r#"{"type": "response.steer"}"#, "response.steer"),
            (
                r#"{"type": "response.create", "background": true}"#,
                "background",
            ),
        ] {
            let err = read_event(event).unwrap_err();
            assert!(err.contains(needle), "{event}: {err}");
            assert!(err.contains("\"type\":\"error\""), "{err}");
        }
    }
}
