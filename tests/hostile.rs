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
