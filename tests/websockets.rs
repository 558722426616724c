//! WebSockets end to end over real sockets: `/v1/responses` in WebSocket mode (several
//! responses in sequence on one socket, errors as events, authentication at the upgrade),
//! and what every socket is held to: idle sockets closed, slow readers cut off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(app: &TestApp, path: &str, key: Option<&str>) -> Result<Socket, String> {
    let mut request = format!("ws://{}{path}", app.addr)
        .into_client_request()
        .unwrap();
    if let Some(key) = key {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
        .map_err(|e| e.to_string())
}

/// A socket with a small receive buffer (which turns off the kernel's autotuning, up to
/// 32 MiB on some machines): what the server sends to a client that does not read piles
/// up on the server's side instead of in this client's kernel.
async fn open_with_small_buffer(app: &TestApp, path: &str) -> Socket {
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = tcp.connect(app.addr).await.unwrap();
    let request = format!("ws://{}{path}", app.addr)
        .into_client_request()
        .unwrap();
    tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
        .unwrap()
        .0
}

/// The next JSON event (pings are answered by the client library).
async fn next_event(socket: &mut Socket) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(_) => return None,
            Err(_) => panic!("no event within 20 s"),
        }
    }
}

/// Events until the response ends (`response.completed`, `.failed`, `.incomplete`).
async fn until_done(socket: &mut Socket) -> Vec<Value> {
    let mut events = Vec::new();
    while let Some(event) = next_event(socket).await {
        let done = matches!(
            event["type"].as_str(),
            Some("response.completed" | "response.failed" | "response.incomplete")
        );
        events.push(event);
        if done {
            break;
        }
    }
    events
}

#[tokio::test]
async fn responses_in_sequence_on_one_socket() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let mut socket = open(&app, "/v1/responses", None).await.unwrap();
    let first = json!({"type": "response.create", "model": "m", "input": "first answer"});
    socket.send(Message::text(first.to_string())).await.unwrap();
    let events = until_done(&mut socket).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types[..2],
        ["response.created", "response.in_progress"],
        "{types:?}"
    );
    assert!(types.contains(&"response.output_text.delta"), "{types:?}");
    assert_eq!(*types.last().unwrap(), "response.completed");
    let numbers: Vec<i64> = events
        .iter()
        .map(|e| e["sequence_number"].as_i64().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    let done = &events.last().unwrap()["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], "first answer");
    let id = done["id"].as_str().unwrap();

    // A second response on the same socket continues the first; its events carry the
    // stream_id it was sent with. Two queued at once run in order.
    let second = json!({"type": "response.create", "model": "claude", "input": "second",
                        "previous_response_id": id, "stream_id": "lane-a"});
    let third = json!({"type": "response.create", "model": "m", "input": "third"});
    socket
        .send(Message::text(second.to_string()))
        .await
        .unwrap();
    socket.send(Message::text(third.to_string())).await.unwrap();
    let events = until_done(&mut socket).await;
    assert!(
        events.iter().all(|e| e["stream_id"] == "lane-a"),
        "{events:?}"
    );
    let done = &events.last().unwrap()["response"];
    assert_eq!(done["previous_response_id"], id);
    assert_eq!(done["output"][0]["content"][0]["text"], "second");
    let events = until_done(&mut socket).await;
    assert_eq!(
        events.last().unwrap()["response"]["output"][0]["content"][0]["text"],
        "third"
    );
    // Stored like any other response.
    let stored: Value = app
        .client
        .get(app.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["status"], "completed");

    // Errors are events, and the socket goes on.
    for (event, status) in [
        (
            json!({"type": "response.create", "model": "nope", "input": "x"}),
            404,
        ),
        (
            json!({"type": "response.create", "model": "m", "input": "x", "background": true}),
            400,
        ),
        (json!({"type": "session.update"}), 400),
    ] {
        socket.send(Message::text(event.to_string())).await.unwrap();
        let error = next_event(&mut socket).await.unwrap();
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["status"], status, "{error}");
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    socket.send(Message::text("{not json")).await.unwrap();
    assert_eq!(next_event(&mut socket).await.unwrap()["status"], 400);
    socket
        .send(Message::text(
            json!({"type": "response.create", "model": "m", "input": "still here"}).to_string(),
        ))
        .await
        .unwrap();
    let events = until_done(&mut socket).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    socket.close(None).await.unwrap();

    // A plain GET is told what the route wants.
    let response = app
        .client
        .get(app.url("/v1/responses"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("WebSocket"),
        "{body}"
    );
}

#[tokio::test]
async fn the_upgrade_needs_a_key() {
    let app = TestApp::spawn_full(
        MockConfig::default(),
        "",
        "",
        "[auth]\nmode = \"keys\"\n[admin]\nkey = \"ws-admin\"\n",
    )
    .await;
    let error = open(&app, "/v1/responses", None).await.unwrap_err();
    assert!(error.contains("401"), "{error}");
    let error = open(&app, "/v1/responses", Some("sk-sy-wrong"))
        .await
        .unwrap_err();
    assert!(error.contains("401"), "{error}");
    let response = app
        .client
        .post(app.url("/admin/keys"))
        .bearer_auth("ws-admin")
        .json(&json!({"name": "ws"}))
        .send()
        .await
        .unwrap();
    let key: Value = response.json().await.unwrap();
    let mut socket = open(&app, "/v1/responses", key["key"].as_str())
        .await
        .unwrap();
    socket
        .send(Message::text(
            json!({"type": "response.create", "model": "m", "input": "hi"}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        until_done(&mut socket).await.last().unwrap()["type"],
        "response.completed"
    );
}

/// The close frame at the end of what a socket sends, skipping everything else.
async fn close_reason(socket: &mut Socket) -> Option<(u16, String)> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return None,
            Err(_) => panic!("the socket was not closed within 30 s"),
        }
    }
}

#[tokio::test]
async fn an_idle_socket_is_closed() {
    let app = TestApp::spawn_with(
        MockConfig::default(),
        "",
        "websocket_ping_interval = \"100ms\"\nwebsocket_idle_timeout = \"300ms\"\n",
    )
    .await;
    let mut socket = open(&app, "/v1/responses", None).await.unwrap();
    // Not reading means not answering pings: silence.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (code, reason) = close_reason(&mut socket).await.expect("a close frame");
    assert_eq!(code, 1000);
    assert_eq!(reason, "idle timeout");
}

/// A client that stops reading while a long answer streams is cut off with 1008, and
/// memory stays flat: the server never queues more than the send buffer for it.
#[tokio::test]
async fn a_slow_reader_is_cut_off() {
    // The answer is three times what the server's kernel may buffer for one socket
    // (each delta is about 230 bytes on the wire), so a reader that does not read makes
    // the server's outbox fill.
    let send_buffer_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    let chunks = (send_buffer_max * 3 / 230).max(40_000);
    let upstream = MockConfig {
        reply: Some("word ".repeat(chunks * 10)),
        chunks,
        ..MockConfig::default()
    };
    let app = TestApp::spawn_with(upstream, "", "websocket_send_buffer = 16\n").await;
    let before = rss_anon_kib();
    let mut socket = open_with_small_buffer(&app, "/v1/responses").await;
    socket
        .send(Message::text(
            json!({"type": "response.create", "model": "m", "input": "long"}).to_string(),
        ))
        .await
        .unwrap();
    // Read nothing until the server has cut this reader off: its outbox overflowed once
    // the kernel's buffers were full.
    let mut cut_off = false;
    for _ in 0..600 {
        let metrics = app.metrics().await;
        cut_off = metrics.lines().any(|l| {
            l.starts_with("switchyard_websockets_closed_total")
                && l.contains("reason=\"the client did not read fast enough\"")
        });
        if cut_off {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cut_off, "a reader that did not read was never cut off");
    let mut deltas = 0usize;
    let mut closed = None;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(30), socket.next()).await
    {
        match message {
            Ok(Message::Text(text)) => {
                if text.contains("\"response.output_text.delta\"") {
                    deltas += 1;
                }
            }
            Ok(Message::Close(frame)) => {
                closed = Some(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(
        deltas < chunks,
        "the whole answer was queued for a reader that did not read"
    );
    if let Some(Some((code, reason))) = &closed {
        assert_eq!(*code, 1008);
        assert_eq!(reason, "the client did not read fast enough");
    }
    if let (Some(before), Some(after)) = (before, rss_anon_kib()) {
        let grown_mib = after.saturating_sub(before) / 1024;
        eprintln!("slow reader: grew {grown_mib} MiB; {deltas} deltas read; {closed:?}");
        assert!(
            grown_mib < 64,
            "a slow reader grew memory by {grown_mib} MiB"
        );
    }
    // The server is fine.
    let mut socket = open(&app, "/v1/responses", None).await.unwrap();
    socket
        .send(Message::text(
            json!({"type": "response.create", "model": "m", "input": "after"}).to_string(),
        ))
        .await
        .unwrap();
    let _ = next_event(&mut socket).await.unwrap();
}

/// Reads until an event of `kind` (skipping others), returning everything read.
async fn read_until(socket: &mut Socket, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    while let Some(event) = next_event(socket).await {
        let done = pred(&event);
        seen.push(event);
        if done {
            return seen;
        }
    }
    panic!("the socket ended first: {seen:?}");
}

async fn new_conversation(app: &TestApp) -> String {
    let response = app
        .client
        .post(app.url("/v1/conversations"))
        .json(&json!({"metadata": {"user": "ada"}}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

async fn subscribe(socket: &mut Socket, name: &str, id: &str) {
    socket
        .send(Message::text(
            json!({"type": "subscribe", name: id}).to_string(),
        ))
        .await
        .unwrap();
    let ack = next_event(socket).await.unwrap();
    assert_eq!(ack, json!({"type": "subscribed", name: id}));
}

fn is_end(event: &Value) -> bool {
    event["event"]["type"] == "response.completed"
}

/// A second connection sees a conversation's reply as it is written, then a whole answer's
/// ending; a background response's status changes too.
#[tokio::test]
async fn events_follow_a_conversation_and_a_background_response() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let conversation = new_conversation(&app).await;
    let mut events = open(&app, "/v1/events", None).await.unwrap();
    subscribe(&mut events, "conversation", &conversation).await;

    let streamed = app
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "seen from afar", "conversation": conversation, "stream": true}),
        )
        .await;
    let frames = sse_data(streamed).await;
    let seen = read_until(&mut events, is_end).await;
    assert!(
        seen.iter().all(
            |e| e["type"] == "conversation.event" && e["conversation"] == conversation.as_str()
        )
    );
    let kinds: Vec<&str> = seen
        .iter()
        .map(|e| e["event"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[0], "response.created", "{kinds:?}");
    assert!(kinds.contains(&"response.output_text.delta"), "{kinds:?}");
    assert_eq!(
        seen.len(),
        frames.len(),
        "every event the client got, the subscriber got"
    );
    assert_eq!(
        seen.last().unwrap()["event"]["response"]["output"][0]["content"][0]["text"],
        "seen from afar"
    );

    let whole = app
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "all at once", "conversation": conversation}),
        )
        .await;
    assert_eq!(whole.status(), 200);
    let seen = read_until(&mut events, is_end).await;
    assert_eq!(seen.len(), 1, "a whole answer is one event: {seen:?}");
    assert_eq!(
        seen[0]["event"]["response"]["output"][0]["content"][0]["text"],
        "all at once"
    );

    // Unsubscribed: nothing more arrives for it.
    events
        .send(Message::text(
            json!({"type": "unsubscribe", "conversation": conversation}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut events).await.unwrap()["type"],
        "unsubscribed"
    );

    // A background response: its status changes until it ends.
    let queued: Value = app
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "later", "background": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = queued["id"].as_str().unwrap();
    subscribe(&mut events, "response", id).await;
    let seen = read_until(&mut events, is_end).await;
    assert!(
        seen.iter()
            .all(|e| e["type"] == "response.event" && e["response"] == id),
        "{seen:?}"
    );
    assert_eq!(
        seen.last().unwrap()["event"]["response"]["output"][0]["content"][0]["text"],
        "later"
    );

    // Mistakes are error events; the socket goes on.
    for (message, status) in [
        (json!({"type": "subscribe", "conversation": "conv_00"}), 404),
        (json!({"type": "subscribe", "conversation": "../x"}), 404),
        (json!({"type": "subscribe"}), 400),
        (json!({"type": "shout"}), 400),
    ] {
        events
            .send(Message::text(message.to_string()))
            .await
            .unwrap();
        let error = next_event(&mut events).await.unwrap();
        assert_eq!(
            (error["type"].as_str(), error["status"].as_u64()),
            (Some("error"), Some(status)),
            "{message}: {error}"
        );
    }
    subscribe(&mut events, "conversation", &conversation).await;
}

/// Another key's conversation cannot be followed.
#[tokio::test]
async fn events_are_the_keys_own() {
    let app = TestApp::spawn_full(
        MockConfig::default(),
        "",
        "",
        "[auth]\nmode = \"keys\"\n[admin]\nkey = \"ev-admin\"\n",
    )
    .await;
    let mut keys = Vec::new();
    for name in ["one", "two"] {
        let response = app
            .client
            .post(app.url("/admin/keys"))
            .bearer_auth("ev-admin")
            .json(&json!({"name": name}))
            .send()
            .await
            .unwrap();
        let key: Value = response.json().await.unwrap();
        keys.push(key["key"].as_str().unwrap().to_string());
    }
    let response = app
        .client
        .post(app.url("/v1/conversations"))
        .bearer_auth(&keys[0])
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let conversation: Value = response.json().await.unwrap();
    let id = conversation["id"].as_str().unwrap();
    assert!(
        open(&app, "/v1/events", None)
            .await
            .unwrap_err()
            .contains("401")
    );
    let mut other = open(&app, "/v1/events", Some(&keys[1])).await.unwrap();
    other
        .send(Message::text(
            json!({"type": "subscribe", "conversation": id}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(next_event(&mut other).await.unwrap()["status"], 404);
    let mut own = open(&app, "/v1/events", Some(&keys[0])).await.unwrap();
    subscribe(&mut own, "conversation", id).await;
}

/// On PostgreSQL a subscriber on one instance sees a turn that runs on another.
#[tokio::test]
async fn events_cross_instances_on_postgres() {
    let Some((database, _)) = database(Db::Postgres, "events") else {
        return;
    };
    events_cross_instances(&database).await;
}

/// With `[redis]` the events cross through Redis pub/sub: both instances subscribe to
/// the deployment's channel there, and a turn on one reaches a subscriber on the other.
#[tokio::test]
async fn events_cross_instances_through_redis() {
    let Some((database, _)) = database(Db::Postgres, "events_redis") else {
        return;
    };
    let Ok(redis_url) = std::env::var("SWITCHYARD_TEST_REDIS_URL") else {
        notice("SWITCHYARD_TEST_REDIS_URL is not set; the Redis events case skipped");
        return;
    };
    let prefix = format!("{}:", unique("sy_events"));
    let tail = format!("{database}[redis]\nurl = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\n");
    let (_first, _second) = events_cross_instances(&tail).await;
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(channels.len(), 1, "{channels:?}");
    let (_, subscribers): (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channels[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(subscribers, 2, "both instances listen on Redis");
}

/// Two instances on `tail`'s store; a subscriber on the second sees a turn run on the
/// first, every event of it.
async fn events_cross_instances(tail: &str) -> (TestApp, TestApp) {
    let upstream = mock(MockConfig::default()).await;
    let toml = config_for(&upstream, "", "", tail);
    let first = TestApp::spawn_toml(upstream, &toml).await;
    let upstream = mock(MockConfig::default()).await;
    let toml = config_for(&upstream, "", "", tail);
    let second = TestApp::spawn_toml(upstream, &toml).await;
    let conversation = new_conversation(&first).await;
    let mut events = open(&second, "/v1/events", None).await.unwrap();
    subscribe(&mut events, "conversation", &conversation).await;
    let streamed = first
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "across instances", "conversation": conversation, "stream": true}),
        )
        .await;
    let frames = sse_data(streamed).await;
    let seen = read_until(&mut events, is_end).await;
    assert_eq!(seen.len(), frames.len(), "{seen:?}");
    let last = &seen.last().unwrap()["event"];
    // The ending event carries the whole response, or a stub when it was too large to
    // notify; this one is small.
    assert_eq!(
        last["response"]["output"][0]["content"][0]["text"], "across instances",
        "{last}"
    );
    (first, second)
}
