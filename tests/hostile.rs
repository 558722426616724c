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

/// Slow-header connections opened at once by the slowloris test.
const SLOWLORIS: usize = 2000;

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

/// Slow clients: 2,000 connections that send one header byte every 400 ms are all cut off
/// by the header read timeout, while a well-behaved client is served meanwhile.
#[tokio::test]
async fn slow_header_senders_are_cut_off_and_others_served() {
    let app = TestApp::spawn_with(MockConfig::default(), "", "header_read_timeout = \"1s\"").await;
    let mut slow = Vec::new();
    for _ in 0..SLOWLORIS {
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
        closed, SLOWLORIS,
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

/// A body that stops arriving is answered 408 after `body_read_timeout`, in OpenAI's
/// shape, instead of holding the connection until the request timeout.
#[tokio::test]
async fn a_stalled_body_is_answered_408() {
    let app = TestApp::spawn_with(MockConfig::default(), "", "body_read_timeout = \"1s\"").await;
    for head in [
        "content-length: 100\r\n",
        // A chunked body that never ends.
        "transfer-encoding: chunked\r\n",
    ] {
        let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
             {head}\r\n"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let start = std::time::Instant::now();
        if head.starts_with("transfer") {
            socket.write_all(b"a\r\n{\"model\":1\r\n").await.unwrap();
        } else {
            socket.write_all(b"{\"model\":").await.unwrap();
        }
        let answers = read_answers(&mut socket, Duration::from_secs(10)).await;
        assert!(start.elapsed() >= Duration::from_millis(900));
        assert_eq!(answers.len(), 1, "{head}");
        let (status, body) = &answers[0];
        assert_eq!(*status, 408, "{head}: {body}");
        assert_openai_error(body, "stalled");
    }
    assert_eq!(app.mock_stats().chat, 0);
}

/// A chunked upload over the limit, which no header announces, still gets its 413 while
/// the client is writing: the rest is drained, not reset.
#[tokio::test]
async fn an_oversized_chunked_upload_gets_its_413() {
    let app = TestApp::spawn_with(
        MockConfig::default(),
        "",
        "max_body_bytes = 65536\nheader_read_timeout = \"1s\"",
    )
    .await;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    socket
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    const CHUNKS: usize = 2560;
    let chunk = format!("4000\r\n{}\r\n", " ".repeat(0x4000));
    let mut sent = 0;
    // Far more than the socket buffers hold, so the server must read while refusing.
    for _ in 0..CHUNKS {
        if socket.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += 0x4000;
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
    assert_eq!(
        sent,
        CHUNKS * 0x4000,
        "the upload was not cut off under the client"
    );
    let answers = read_answers(&mut socket, Duration::from_secs(10)).await;
    let (status, body) = answers.first().expect("an answer, not a reset");
    assert_eq!(*status, 413, "{body}");
    assert_openai_error(body, "too large");
    assert_eq!(app.mock_stats().chat, 0);
}

/// Reads whole HTTP/1.1 answers (status and body, by `content-length`) until the server
/// closes the connection or `limit` passes.
async fn read_answers(socket: &mut tokio::net::TcpStream, limit: Duration) -> Vec<(u16, String)> {
    let mut raw = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
    parse_answers(&raw)
}

fn parse_answers(mut raw: &[u8]) -> Vec<(u16, String)> {
    let mut answers = Vec::new();
    while let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let body_end = (end + 4 + length).min(raw.len());
        answers.push((
            status,
            String::from_utf8_lossy(&raw[end + 4..body_end]).into_owned(),
        ));
        raw = &raw[body_end..];
    }
    answers
}

/// An error body in OpenAI's shape whose message mentions `needle` (case-insensitive).
fn assert_openai_error(body: &str, needle: &str) {
    let error: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let message = error["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message: {body}"));
    assert!(error["error"]["type"].is_string(), "{body}");
    assert!(
        message.to_lowercase().contains(&needle.to_lowercase()),
        "`{message}` should mention `{needle}`"
    );
}

/// Bodies from `tests/hostile/bodies.txt`, decoded: `(name, bytes)` with `{model}` left in.
fn corpus_bodies() -> Vec<(String, Vec<u8>)> {
    let text = include_str!("hostile/bodies.txt");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (name, body) = line.split_once('\t').expect("name<TAB>body");
            (name.to_owned(), unescape(body))
        })
        .collect()
}

/// `\xNN` is a byte, `\\` a backslash; everything else is itself.
fn unescape(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1)) {
            (b'\\', Some(b'x')) => {
                let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 4;
            }
            (b'\\', Some(b'\\')) => {
                out.push(b'\\');
                i += 2;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn replace_model(body: &[u8], model: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.windows(7).position(|w| w == b"{model}") {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(model.as_bytes());
        rest = &rest[at + 7..];
    }
    out.extend_from_slice(rest);
    out
}

const HOSTILE_ADMIN: &str = "admin-hostile-corpus";

/// The whole hostile corpus, on every route: malformed and mistyped bodies, deep nesting,
/// huge numbers, invalid UTF-8 and NUL bytes, oversized bodies, hostile paths, ids and
/// queries, unknown methods, and malformed or ambiguous HTTP (request smuggling shapes).
/// Every answer is a 4xx; every answer the application gives is in OpenAI's error shape
/// with a message; the process keeps serving; nothing is stored for a refused request.
#[tokio::test]
async fn the_hostile_corpus_gets_4xx_and_never_a_5xx() {
    let app = TestApp::spawn_full(
        MockConfig::default(),
        "",
        "body_read_timeout = \"1s\"\nmax_body_bytes = 1048576",
        &format!(
            "[auth]\nmode = \"keys\"\n[admin]\nkey = \"{HOSTILE_ADMIN}\"\n\
             [tools.quote]\ndescription = \"q\"\nurl = \"http://127.0.0.1:9/q?s={{s}}\"\n\
             parameters = {{ type = \"object\", properties = {{ s = {{}} }}, required = [\"s\"] }}\n\
             [memory]\nextraction_model = \"m\"\n"
        ),
    )
    .await;
    let created = app
        .client
        .post(app.url("/admin/keys"))
        .bearer_auth(HOSTILE_ADMIN)
        .json(&json!({"name": "hostile"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let key = created.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut failures = Vec::new();
    let mut cases = 0;
    // One real conversation, so bodies sent to its items and its update reach the code
    // that reads them rather than a 404; it must still be empty at the end.
    let conversation = app
        .client
        .post(app.url("/v1/conversations"))
        .bearer_auth(&key)
        .json(&json!({"metadata": {"user": "hostile"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(conversation.status(), 200);
    let conversation = conversation.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let items_path = format!("/v1/conversations/{conversation}/items");
    let conversation_path = format!("/v1/conversations/{conversation}");

    // Bodies on every route that reads JSON, as the route's caller.
    let json_routes = [
        ("/v1/conversations", "m", key.as_str()),
        (conversation_path.as_str(), "m", key.as_str()),
        (items_path.as_str(), "m", key.as_str()),
        ("/v1/memories", "m", key.as_str()),
        ("/v1/memories/search", "m", key.as_str()),
        ("/v1/batches", "m", key.as_str()),
        ("/v1/chat/completions", "m", key.as_str()),
        ("/v1/chat/completions", "claude", key.as_str()),
        ("/v1/embeddings", "m", key.as_str()),
        ("/v1/responses", "m", key.as_str()),
        ("/v1/responses", "claude", key.as_str()),
        ("/v1/responses/input_tokens", "m", key.as_str()),
        ("/v1/tools/quote/invoke", "m", key.as_str()),
        ("/admin/keys", "m", HOSTILE_ADMIN),
    ];
    let mut bodies = corpus_bodies();
    let deep = 10_000;
    bodies.push((
        "10,000 nested arrays".into(),
        format!(
            "{{\"model\":\"{{model}}\",\"messages\":{}{}}}",
            "[".repeat(deep),
            "]".repeat(deep)
        )
        .into_bytes(),
    ));
    bodies.push((
        "10,000 nested objects".into(),
        format!(
            "{{\"model\":\"{{model}}\",\"input\":{}1{}}}",
            "{\"a\":".repeat(deep),
            "}".repeat(deep)
        )
        .into_bytes(),
    ));
    let many_keys: String = (0..100_000).map(|i| format!("\"k{i}\":0,")).collect();
    bodies.push((
        "100,000 top-level fields".into(),
        format!("{{{many_keys}\"model\":\"{{model}}\"}}").into_bytes(),
    ));
    bodies.push(("a body over the limit".into(), vec![b' '; 2 * 1024 * 1024]));
    for (path, model, bearer) in json_routes {
        for (name, body) in &bodies {
            // An empty body is a valid conversation create (every field is optional).
            if path == "/v1/conversations" && matches!(name.as_str(), "empty" | "whitespace") {
                continue;
            }
            cases += 1;
            let r = app
                .client
                .post(app.url(path))
                .bearer_auth(bearer)
                .header("content-type", "application/json")
                .body(replace_model(body, model))
                .send()
                .await;
            check_answer(&mut failures, &format!("POST {path} ({model}): {name}"), r).await;
        }
    }

    // Paths, ids, queries and methods.
    let requests: &[(&str, &str, &str)] = &[
        (
            "DELETE",
            "/admin/keys/..%2F..%2Fetc%2Fpasswd",
            HOSTILE_ADMIN,
        ),
        ("DELETE", "/admin/keys/%2e%2e", HOSTILE_ADMIN),
        ("DELETE", "/admin/keys/%00", HOSTILE_ADMIN),
        ("DELETE", "/admin/keys/%ff%fe", HOSTILE_ADMIN),
        ("DELETE", "/admin/keys/resp_0123456789", HOSTILE_ADMIN),
        ("DELETE", "/admin/keys/", HOSTILE_ADMIN),
        ("GET", "/admin/keys/x", HOSTILE_ADMIN),
        ("GET", "/admin/usage?from=yesterday", HOSTILE_ADMIN),
        ("GET", "/admin/usage?from=2026-13-45&to=%00", HOSTILE_ADMIN),
        ("GET", "/admin/usage?key=..%2F..&from=%ff", HOSTILE_ADMIN),
        ("GET", "/v1/usage?from=-1", &key),
        ("GET", "/v1/usage?to=99999-01-01", &key),
        ("GET", "/v1/chat/completions", &key),
        ("PUT", "/v1/embeddings", &key),
        ("PATCH", "/v1/models", &key),
        ("FOO", "/v1/models", &key),
        ("GET", "/v1/models/..%2F..%2Fadmin", &key),
        ("GET", "/v1/%2e%2e/admin/stats", &key),
        ("GET", "/admin/stats", &key),
        ("GET", "/admin/stats", "not-a-key"),
        ("POST", "/admin/cache/clear", ""),
        ("GET", "/v1/models", "sk-\"quoted\" and spaced"),
        ("GET", "/nowhere", &key),
        ("GET", "/v1/responses/..%2F..%2Fetc%2Fpasswd", &key),
        ("GET", "/v1/responses/resp_%00", &key),
        ("GET", "/v1/responses/conv_0123456789", &key),
        ("DELETE", "/v1/responses/%2e%2e", &key),
        (
            "GET",
            "/v1/responses/resp_0123456789/input_items?limit=1000",
            &key,
        ),
        (
            "GET",
            "/v1/responses/resp_0123456789/input_items?order=sideways",
            &key,
        ),
        (
            "GET",
            "/v1/responses/resp_0123456789?stream=true&starting_after=-1",
            &key,
        ),
        ("POST", "/v1/responses/resp_0123456789/cancel", &key),
        ("GET", "/v1/conversations?limit=0", &key),
        ("GET", "/v1/conversations?after=%ff%fe&limit=abc", &key),
        ("GET", "/v1/conversations/..%2F..%2Fadmin", &key),
        ("DELETE", "/v1/conversations/conv_%00", &key),
        ("POST", "/v1/conversations/resp_0123456789", &key),
        (
            "GET",
            "/v1/conversations/conv_0123456789/items/..%2F..",
            &key,
        ),
        (
            "DELETE",
            "/v1/conversations/conv_0123456789/items/msg_x",
            &key,
        ),
        ("POST", "/v1/conversations/conv_0123456789/archive", &key),
        ("GET", "/admin/conversations?limit=-5", HOSTILE_ADMIN),
        ("POST", "/v1/tools/..%2F..%2Fadmin/invoke", &key),
        ("POST", "/v1/tools/quote%00/invoke", &key),
        ("GET", "/v1/tools/quote/invoke", &key),
        ("POST", "/v1/tools/quote/invoke", "not-a-key"),
        ("DELETE", "/v1/tools", &key),
        ("DELETE", "/admin/keys/..%2F/data", HOSTILE_ADMIN),
        ("GET", "/v1/files/..%2F..%2Fetc%2Fpasswd", &key),
        ("GET", "/v1/files/file_%00/content", &key),
        ("GET", "/v1/files/%2e%2e/content", &key),
        ("DELETE", "/v1/files/batch_0123456789", &key),
        ("GET", "/v1/files?limit=0", &key),
        ("GET", "/v1/files?purpose=%ff%fe&order=sideways", &key),
        ("GET", "/v1/files?after=..%2F..", &key),
        ("PUT", "/v1/files", &key),
        ("GET", "/v1/batches/..%2F..%2Fadmin", &key),
        ("GET", "/v1/batches/batch_%00", &key),
        ("POST", "/v1/batches/file_0123456789/cancel", &key),
        ("GET", "/v1/batches?limit=100000", &key),
        ("GET", "/v1/batches?limit=abc&after=%ff", &key),
        ("GET", "/v1/events", &key),
        ("GET", "/v1/events?conversation=..%2F..", &key),
        ("GET", "/v1/events", "not-a-key"),
        ("POST", "/v1/events", &key),
        ("GET", "/v1/memories?user=%00&limit=-1", &key),
        ("GET", "/v1/memories?user=u&limit=abc&after=%ff", &key),
        ("GET", "/v1/memories/..%2F..%2Fetc%2Fpasswd", &key),
        ("GET", "/v1/memories/mem_%00/history", &key),
        ("PUT", "/v1/memories/conv_0123456789", &key),
        ("DELETE", "/v1/memories/%2e%2e", &key),
        ("DELETE", "/v1/memories", &key),
        ("GET", "/v1/memories/jobs/..%2F..", &key),
        ("GET", "/v1/memories", "not-a-key"),
        ("GET", "/admin/jobs?status=sideways", HOSTILE_ADMIN),
        ("GET", "/admin/jobs?limit=-1&before=%00", HOSTILE_ADMIN),
        ("GET", "/admin/jobs/job_%00", HOSTILE_ADMIN),
        ("POST", "/admin/jobs/..%2F..%2Fkeys/retry", HOSTILE_ADMIN),
        ("POST", "/admin/jobs/resp_0123456789/cancel", HOSTILE_ADMIN),
        ("GET", "/admin/jobs", &key),
    ];
    for (method, path, bearer) in requests {
        cases += 1;
        let mut request = app.client.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            app.url(path),
        );
        if !bearer.is_empty() {
            request = request.header("authorization", format!("Bearer {bearer}"));
        }
        let r = request.send().await;
        check_answer(&mut failures, &format!("{method} {path}"), r).await;
    }

    // Uploads: multipart bodies that are wrong, incomplete or never finish their part.
    let boundary = "hostileboundary";
    let part = |name: &str, filename: Option<&str>, value: &str| {
        let filename = filename.map_or(String::new(), |f| format!("; filename=\"{f}\""));
        format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"{name}\"{filename}\r\n\r\n{value}\r\n"
        )
    };
    let end = format!("--{boundary}--\r\n");
    let multipart = format!("multipart/form-data; boundary={boundary}");
    let uploads: Vec<(&str, String, Vec<u8>)> = vec![
        ("JSON instead of multipart", "application/json".into(), b"{}".to_vec()),
        ("no content type", String::new(), b"purpose=batch".to_vec()),
        ("multipart without a boundary", "multipart/form-data".into(), part("purpose", None, "batch").into_bytes()),
        ("no parts", multipart.clone(), end.clone().into_bytes()),
        ("garbage", multipart.clone(), b"\x00\xff not multipart at all".to_vec()),
        ("no file part", multipart.clone(), format!("{}{end}", part("purpose", None, "batch")).into_bytes()),
        ("no purpose", multipart.clone(), format!("{}{end}", part("file", Some("a.jsonl"), "{}")).into_bytes()),
        (
            "an unknown purpose",
            multipart.clone(),
            format!("{}{}{end}", part("purpose", None, "../../etc"), part("file", Some("a.jsonl"), "{}")).into_bytes(),
        ),
        (
            "a purpose of invalid UTF-8",
            multipart.clone(),
            [part("purpose", None, "").as_bytes(), b"\xff\xfe", part("file", Some("a.jsonl"), "{}").as_bytes(), end.as_bytes()].concat(),
        ),
        (
            "a file part that never ends",
            multipart.clone(),
            format!("{}--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n{{}}", part("purpose", None, "batch")).into_bytes(),
        ),
        (
            "a part without headers",
            multipart.clone(),
            format!("{}--{boundary}\r\n\r\nbody\r\n{end}", part("purpose", None, "batch")).into_bytes(),
        ),
    ];
    for (name, content_type, body) in uploads {
        cases += 1;
        let mut request = app
            .client
            .post(app.url("/v1/files"))
            .bearer_auth(&key)
            .body(body);
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        check_answer(
            &mut failures,
            &format!("POST /v1/files: {name}"),
            request.send().await,
        )
        .await;
    }

    // The dashboard's sign-in form, mistyped.
    for (content_type, body) in [
        ("application/x-www-form-urlencoded", &b""[..]),
        ("application/x-www-form-urlencoded", b"nokey=1"),
        ("application/x-www-form-urlencoded", b"key=%ff%fe"),
        ("application/x-www-form-urlencoded", b"key=a&key=b&key"),
        ("application/json", b"{\"key\": 5}"),
        ("text/plain", b"\x00\xff"),
    ] {
        cases += 1;
        let r = app
            .client
            .post(app.url("/dashboard/login"))
            .header("content-type", content_type)
            .body(body.to_vec())
            .send()
            .await;
        let case = format!("POST /dashboard/login ({content_type}) {body:?}");
        match r {
            // A well-formed sign-in with a wrong key is a person at the page: it gets the
            // page again with the error on it.
            Ok(r) if r.status() == 401 => {
                let page = r.text().await.unwrap_or_default();
                if !page.contains("not the admin key") {
                    failures.push(format!("{case}: 401 without the sign-in error: {page}"));
                }
            }
            r => check_answer(&mut failures, &case, r).await,
        }
    }

    // Malformed and ambiguous HTTP, on a raw socket. hyper refuses what it cannot parse
    // with a bare 4xx before any route sees it; no answer at all is also acceptable here
    // (the connection is closed), but never a 5xx.
    let auth = format!("authorization: Bearer {key}\r\n");
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let raw: Vec<(&str, String)> = vec![
        (
            "Content-Length with Transfer-Encoding",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}content-type: application/json\r\n\
                 content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /admin/stats HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
        ),
        (
            "two different Content-Lengths",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}content-length: 5\r\ncontent-length: 50\r\n\r\n{chat}"
            ),
        ),
        (
            "negative Content-Length",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}content-length: -1\r\n\r\n"
            ),
        ),
        (
            "Content-Length not a number",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}content-length: 1e3\r\n\r\n"
            ),
        ),
        (
            "a body longer than its Content-Length",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}content-type: application/json\r\n\
                 content-length: 10\r\n\r\n{chat}{chat}"
            ),
        ),
        (
            "obsolete transfer coding",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}transfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "transfer-encoding with a space before the colon",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}transfer-encoding : chunked\r\ncontent-length: 3\r\n\r\nabc"
            ),
        ),
        (
            "garbage request line",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n".to_string(),
        ),
        (
            "request line with no version",
            "GET /v1/models\r\n\r\n".to_string(),
        ),
        (
            "header with a NUL byte",
            format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}x-a: a\x00b\r\n\r\n"),
        ),
        (
            "obs-fold header",
            format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}x-a: a\r\n b\r\n\r\n"),
        ),
        (
            "header name with a space",
            format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}x a: b\r\n\r\n"),
        ),
        (
            "a thousand headers",
            format!(
                "GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}{}\r\n",
                (0..1000)
                    .map(|i| format!("x-h{i}: v\r\n"))
                    .collect::<String>()
            ),
        ),
        (
            "a 100 KB path",
            format!(
                "GET /v1/{} HTTP/1.1\r\nHost: x\r\n\r\n",
                "a".repeat(100 * 1024)
            ),
        ),
        (
            "dot segments in the path",
            format!("GET /v1/../admin/stats HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
        ),
        (
            "absolute-form target",
            format!(
                "GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
            ),
        ),
        ("HTTP/0.9", "GET /\r\n".to_string()),
        (
            "HTTP/2 preface then garbage",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x00".to_string(),
        ),
    ];
    for (name, request) in raw {
        cases += 1;
        let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let _ = socket.write_all(request.as_bytes()).await;
        let answers = read_answers(&mut socket, Duration::from_secs(3)).await;
        for (status, body) in &answers {
            let refused_by_the_app = body.starts_with('{');
            if *status >= 500 || (*status < 400 && !name.starts_with("a body longer")) {
                failures.push(format!("raw {name}: {status} {body}"));
            } else if refused_by_the_app
                && *status >= 400
                && let Err(e) = openai_error(body)
            {
                failures.push(format!("raw {name}: {e}"));
            }
        }
    }

    assert!(
        failures.is_empty(),
        "{} of {cases} hostile requests were not answered as they should be:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Still serving, and nothing refused was stored: the one key is the one created above.
    let (status, _) = app.chat(&common::chat_body("m", "still here")).await;
    assert_eq!(status, 401, "keys are required");
    let listed: Value = app
        .client
        .get(app.url("/admin/keys"))
        .bearer_auth(HOSTILE_ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    for (path, what) in [
        ("/v1/files", "files"),
        ("/v1/batches", "batches"),
        ("/v1/memories?user=hostile", "memories"),
        (items_path.as_str(), "conversation items"),
    ] {
        let page: Value = app
            .client
            .get(app.url(path))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            page["data"].as_array().map(Vec::len),
            Some(0),
            "{what}: {page}"
        );
    }
    let conversations: Value = app
        .client
        .get(app.url("/v1/conversations"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        conversations["data"].as_array().map(Vec::len),
        Some(1),
        "only the conversation made above: {conversations}"
    );
    let ok = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&common::chat_body("m", "still here"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

/// Records why `answer` is not a 4xx in OpenAI's error shape with a message, if it isn't.
async fn check_answer(
    failures: &mut Vec<String>,
    case: &str,
    answer: Result<reqwest::Response, reqwest::Error>,
) {
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            failures.push(format!("{case}: no answer: {e}"));
            return;
        }
    };
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    if !status.is_client_error() {
        failures.push(format!("{case}: {status} {body}"));
    } else if let Err(e) = openai_error(&body) {
        failures.push(format!("{case}: {status}: {e}"));
    }
}

/// `Ok` when `body` is `{"error": {"message": <non-empty>, "type": <string>, ...}}`.
fn openai_error(body: &str) -> Result<(), String> {
    let error: Value = serde_json::from_str(body).map_err(|e| format!("not JSON ({e}): {body}"))?;
    let message = error["error"]["message"].as_str().unwrap_or_default();
    if message.trim().is_empty() || !error["error"]["type"].is_string() {
        return Err(format!("not OpenAI's error shape: {body}"));
    }
    Ok(())
}
