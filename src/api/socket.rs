//! What every WebSocket of the API shares: authentication happens at the upgrade (the
//! handler takes a `Caller` like any other); then one loop per socket reads the client's
//! text messages into a bounded inbox for the socket's handler task, writes the handler's
//! messages from a bounded outbox, pings every `websocket_ping_interval`, and closes the
//! socket when the client has been silent for `websocket_idle_timeout` with nothing
//! running, when the client lets the outbox fill (close code 1008: a slow reader is cut
//! off instead of growing memory), or when the server shuts down (1001). The handler task
//! ends with the socket, which drops whatever it was running (an upstream call included).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use crate::error::GatewayError;
use crate::state::AppState;

/// Client messages waiting for the handler.
const INBOX: usize = 64;
/// The socket's own read and write buffers. The library's defaults (128 KiB each) would
/// cost a quarter of a megabyte per idle subscriber; events are small and every message is
/// written at once, so a few KiB suffice (a larger message still grows the read buffer).
pub const SOCKET_BUFFER: usize = 4 * 1024;

/// Where a socket's handler puts messages for the client.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Utf8Bytes>,
    overflow: CancellationToken,
    busy: Arc<AtomicUsize>,
}

impl Outbox {
    /// Queues a text message; false when the client fell behind (the socket is being
    /// closed) or is gone.
    pub fn send(&self, text: impl Into<Utf8Bytes>) -> bool {
        match self.tx.try_send(text.into()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.overflow.cancel();
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// The client fell behind elsewhere (a subscription it did not keep up with): the
    /// socket is closed as for a full outbox.
    pub fn overflowed(&self) {
        self.overflow.cancel();
    }

    /// Marks work in progress (a socket is not idle while it runs) until the guard drops.
    pub fn busy(&self) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.busy.clone())
    }
}

/// Work in progress on a socket.
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An error as a WebSocket event: OpenAI's `error` event with the HTTP status it would
/// have had.
pub fn error_event(err: &GatewayError, stream_id: Option<&str>) -> String {
    let mut event: Value = serde_json::from_slice(&err.to_json()).unwrap_or_default();
    event["type"] = "error".into();
    event["status"] = err.status().as_u16().into();
    if let Some(id) = stream_id {
        event["stream_id"] = id.into();
    }
    event.to_string()
}

/// A request to a WebSocket route that is not a WebSocket upgrade.
pub fn not_upgraded(
    rejection: &axum::extract::ws::rejection::WebSocketUpgradeRejection,
) -> GatewayError {
    GatewayError::invalid(
        format!(
            "This route takes a WebSocket upgrade (GET with 'Upgrade: websocket'): {}",
            rejection.body_text()
        ),
        None,
    )
}

/// Runs a socket until it ends; `handler` gets the client's text messages and the outbox.
pub async fn serve<F, Fut>(
    state: Arc<AppState>,
    mut socket: WebSocket,
    kind: &'static str,
    handler: F,
) where
    F: FnOnce(mpsc::Receiver<String>, Outbox) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let server = &state.settings.server;
    let (in_tx, in_rx) = mpsc::channel(INBOX);
    let (out_tx, mut out_rx) = mpsc::channel(server.websocket_send_buffer);
    let overflow = CancellationToken::new();
    let busy = Arc::new(AtomicUsize::new(0));
    let outbox = Outbox {
        tx: out_tx,
        overflow: overflow.clone(),
        busy: busy.clone(),
    };
    let work = AbortOnDrop(tokio::spawn(handler(in_rx, outbox)));
    let gauge = metrics::gauge!("switchyard_websockets_open", "kind" => kind);
    gauge.increment(1.0);
    let mut ping = tokio::time::interval(server.websocket_ping_interval);
    ping.tick().await;
    let mut heard = Instant::now();
    let closing = state.lifecycle.closing.clone();
    let close = loop {
        tokio::select! {
            received = socket.recv() => {
                heard = Instant::now();
                match received {
                    Some(Ok(Message::Text(text))) => {
                        if in_tx.try_send(text.to_string()).is_err() {
                            break Some((close_code::POLICY, "too many requests queued on this socket"));
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        break Some((close_code::UNSUPPORTED, "send JSON events as text messages"));
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break None,
                }
            }
            Some(text) = out_rx.recv() => {
                // A client that stops reading fills the kernel's buffer and the send waits:
                // the cut-off and shutdown must not wait behind it.
                tokio::select! {
                    sent = socket.send(Message::Text(text)) => if sent.is_err() { break None },
                    () = overflow.cancelled() => {
                        break Some((close_code::POLICY, "the client did not read fast enough"));
                    }
                    () = closing.cancelled() => break Some((close_code::AWAY, "server shutting down")),
                }
            }
            _ = ping.tick() => {
                if busy.load(Ordering::Relaxed) == 0
                    && heard.elapsed() >= server.websocket_idle_timeout
                {
                    break Some((close_code::NORMAL, "idle timeout"));
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
            () = overflow.cancelled() => {
                break Some((close_code::POLICY, "the client did not read fast enough"));
            }
            () = closing.cancelled() => break Some((close_code::AWAY, "server shutting down")),
        }
    };
    drop(work);
    if let Some((code, reason)) = close {
        metrics::counter!("switchyard_websockets_closed_total", "kind" => kind, "reason" => reason)
            .increment(1);
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // The closing handshake: our close frame, then the client's, within a second (a
        // client that stopped reading may never take ours).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            if socket.send(Message::Close(Some(frame))).await.is_ok() {
                while let Some(Ok(message)) = socket.recv().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            }
        })
        .await;
    }
    gauge.decrement(1.0);
}

/// The handler task, ended with its socket.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
