//! Hostile and oversized input: every refusal is a 4xx in OpenAI's error shape, decided
//! as early as the request allows, and nothing reaches the upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::TestApp;
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A body declared at 100 MB, of which 1 KB is sent: refused from its `Content-Length` at
/// once, not after waiting for the rest.
#[tokio::test]
async fn a_declared_oversized_body_is_refused_from_its_header() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\ncontent-type: application/json\r\n\
         content-length: 104857600\r\n\r\n",
        app.addr
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&[b' '; 1024]).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut answer))
        .await
        .expect("answered without waiting for the declared body")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..read]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let body = text.split_once("\r\n\r\n").unwrap().1;
    let error: Value = serde_json::from_str(body).unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert_eq!(app.mock_stats().chat, 0);
}

/// More embeddings inputs than OpenAI accepts in one request: a 400 naming `input`, and
/// the upstream is never asked.
#[tokio::test]
async fn too_many_embedding_inputs_are_refused_before_the_upstream() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let inputs: Vec<&str> = vec!["a"; 1_000_000];
    let r = app
        .post("/v1/embeddings", &json!({"model": "m", "input": inputs}))
        .await;
    assert_eq!(r.status(), 400);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["param"], "input", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000000"),
        "{error}"
    );
    assert_eq!(app.mock_stats().embeddings, 0);
}

/// Reads until the peer closes the connection (or `limit` passes); `true` when it closed.
async fn closed_within(socket: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.is_ok()
}

/// Slow clients: 300 connections that send one header byte a second are all cut off by
/// the header read timeout, while a well-behaved client is served meanwhile.
#[tokio::test]
async fn slow_header_senders_are_cut_off_and_others_served() {
    let app = TestApp::spawn_with(MockConfig::default(), "", "header_read_timeout = \"1s\"").await;
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        socket.write_all(b"P").await.unwrap();
        slow.push(socket);
    }
    let drip = async {
        for byte in b"OST /v1/chat/completions HTTP/1.1\r\n" {
            tokio::time::sleep(Duration::from_millis(400)).await;
            for socket in &mut slow {
                // A closed socket refuses more bytes; that is the point.
                let _ = socket.write_all(&[*byte]).await;
            }
        }
    };
    let served = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.chat(&common::chat_body("m", "well behaved")).await.0
    };
    let ((), status) = tokio::join!(
        async {
            let _ = tokio::time::timeout(Duration::from_secs(3), drip).await;
        },
        served
    );
    assert_eq!(status, 200, "a normal client is served among slow ones");
    let mut closed = 0;
    for socket in &mut slow {
        if closed_within(socket, Duration::from_secs(3)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 300,
        "every slow connection was closed by the header read timeout"
    );
}

/// A request head over the limit is answered 431, not accepted.
#[tokio::test]
async fn an_oversized_header_is_refused_with_431() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let big = "x".repeat(100 * 1024);
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-padding", big)
        .json(&common::chat_body("m", "hi"))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 431),
        // The server may close before the client has finished writing the head.
        Err(e) => assert!(e.is_request() || e.is_body() || e.is_connect(), "{e}"),
    }
    assert_eq!(app.mock_stats().chat, 0);
}

/// Connections over `max_connections` are closed at accept; the ones within are served.
#[tokio::test]
async fn connections_over_the_cap_are_refused_at_accept() {
    let app = TestApp::spawn_with(MockConfig::default(), "", "max_connections = 4").await;
    // Four connections hold their slots (idle, within the header read timeout).
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(app.addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await,
        "the fifth connection is closed at once"
    );
    drop(held);
    // Slots come back when connections close.
    let mut status = 0;
    for _ in 0..50 {
        status = app.chat(&common::chat_body("m", "after")).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
}

/// A client that writes a whole body over the limit before it reads reads the 413, not a
/// reset connection: the server keeps reading (and dropping) the rest for a while after
/// refusing it, as nginx does, instead of closing on unread data (which resets the
/// connection and discards the answer already sent).
#[tokio::test]
async fn an_oversized_upload_gets_its_413_not_a_reset() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let size = 40 * 1024 * 1024;
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: {}\r\ncontent-type: application/json\r\n\
         content-length: {size}\r\n\r\n",
        app.addr
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    let mut sent = 0;
    while sent < size {
        if socket.write_all(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut answer))
        .await
        .expect("an answer")
        .expect("the connection was not reset under the client");
    let text = String::from_utf8_lossy(&answer[..read]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(sent, size, "the whole upload was accepted by the socket");
}

/// CORS is off unless origins are configured; then only those origins get the headers a
/// browser needs, preflights included.
#[tokio::test]
async fn cors_answers_configured_origins_only() {
    let closed = TestApp::spawn(MockConfig::default()).await;
    let r = closed
        .client
        .post(closed.url("/v1/chat/completions"))
        .header("origin", "https://chat.example")
        .json(&common::chat_body("m", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("access-control-allow-origin"));

    let app = TestApp::spawn_with(
        MockConfig::default(),
        "",
        "cors_origins = [\"https://chat.example\"]",
    )
    .await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/v1/chat/completions"))
        .header("origin", "https://chat.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"));
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("origin", "https://chat.example")
        .json(&common::chat_body("m", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    let other = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("origin", "https://evil.example")
        .json(&common::chat_body("m", "hi"))
        .send()
        .await
        .unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}
