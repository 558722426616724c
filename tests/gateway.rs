//! The gateway spine end to end: routes, streaming, errors, timeouts, cancellation,
//! shutdown and pooling, against the real mock upstream over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;

fn fast() -> MockConfig {
    MockConfig::default()
}

#[tokio::test]
async fn models_health_ready_and_metrics_answer() {
    let app = TestApp::spawn(fast()).await;
    let models: Value = app
        .client
        .get(app.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(models["object"], "list");
    assert_eq!(ids, ["claude", "m"]);

    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let (status, _) = app.chat(&chat_body("m", "count me")).await;
    assert_eq!(status, 200);
    let metrics = app.metrics().await;
    assert!(metrics.contains("switchyard_requests_total{"), "{metrics}");
    assert!(
        metrics.contains("switchyard_upstream_connections_opened{provider=\"mock\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn chat_non_stream_passes_fields_through_and_swaps_the_model() {
    let app = TestApp::spawn(fast()).await;
    let body = json!({
        "model": "m",
        "n": 2,
        "response_format": {"type": "json_object"},
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        ]}]
    });
    let (status, v) = app.chat(&body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    // The mock echoes the upstream model name it received: the alias was swapped.
    assert_eq!(v["model"], "mock-model");
    assert_eq!(
        v["choices"].as_array().unwrap().len(),
        2,
        "n passed through"
    );
    assert_eq!(v["choices"][0]["message"]["content"], "describe");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn request_id_is_echoed_or_assigned() {
    let app = TestApp::spawn(fast()).await;
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-request-id", "abc-123")
        .json(&chat_body("m", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = app
        .post("/v1/chat/completions", &chat_body("m", "hi"))
        .await;
    assert!(
        r.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
}

#[tokio::test]
async fn stream_delivers_every_chunk_in_order_with_usage_only_when_asked() {
    let app = TestApp::spawn(MockConfig {
        chunks: 5,
        ..fast()
    })
    .await;
    let text = "one two three four five six seven eight nine ten";
    let mut body = chat_body("m", text);
    body["stream"] = json!(true);
    let events = app.chat_stream(&body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut content = String::new();
    for data in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        assert!(
            !v["choices"].as_array().unwrap().is_empty(),
            "no usage chunk unless asked: {data}"
        );
        if let Some(c) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            content.push_str(c);
        }
    }
    assert_eq!(content, text);

    body["stream_options"] = json!({"include_usage": true});
    let events = app.chat_stream(&body).await;
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn stream_chunks_are_flushed_before_the_upstream_sends_the_next() {
    // 400 ms between upstream chunks: if the gateway buffered, the client would see chunk k
    // only after the upstream had produced chunk k+1.
    let app = TestApp::spawn(MockConfig {
        chunks: 4,
        chunk_interval_ms: 400,
        ..fast()
    })
    .await;
    let mut body = chat_body("m", "alpha beta gamma delta");
    body["stream"] = json!(true);
    // Ask for usage so no upstream event is withheld and the counts line up one to one.
    body["stream_options"] = json!({"include_usage": true});
    let r = app.post("/v1/chat/completions", &body).await;
    assert_eq!(r.headers()["x-accel-buffering"], "no");
    let mut stream = r.bytes_stream();
    let mut seen = 0u64;
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            buf.drain(..end + 2);
            seen += 1;
            let sent = app.mock_stats().events;
            assert_eq!(
                sent, seen,
                "client saw event {seen} while upstream had sent {sent}"
            );
        }
    }
    assert!(seen >= 6);
}

#[tokio::test]
async fn streamed_parallel_tool_calls_arrive_intact() {
    let app = TestApp::spawn(fast()).await;
    let body = json!({"model": "m", "stream": true, "tools": tools(),
        "messages": [{"role": "user", "content": "Paris and ACME"}]});
    let events = app.chat_stream(&body).await;
    let calls = assemble_tool_calls(&events);
    assert_eq!(calls.len(), 2, "{events:?}");
    assert_eq!(calls[0].1, "get_weather");
    assert_eq!(calls[1].1, "get_quote");
    for (id, _, args) in &calls {
        assert!(id.starts_with("call_"));
        let parsed: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: {e}"));
        assert!(parsed.is_object());
    }
    let weather: Value = serde_json::from_str(&calls[0].2).unwrap();
    assert_eq!(weather["city"], "Paris and ACME");
    assert_eq!(weather["days"], 1);
    let finish: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn embeddings_pass_through() {
    let app = TestApp::spawn(fast()).await;
    let r = app
        .post(
            "/v1/embeddings",
            &json!({"model": "m", "input": ["a", "b", "c"], "dimensions": 4}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["embedding"].as_array().unwrap().len(), 4);
    }
    let r = app.post("/v1/embeddings", &json!({"model": "m"})).await;
    assert_eq!(r.status(), 400);
    let r = app
        .post("/v1/embeddings", &json!({"model": "claude", "input": "x"}))
        .await;
    assert_eq!(r.status(), 400, "Anthropic has no embeddings");
}

async fn assert_error(r: reqwest::Response, status: u16, code_or_type: &str) -> Value {
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    let e = &v["error"];
    for field in ["message", "type", "param", "code"] {
        assert!(e.get(field).is_some(), "missing {field}: {v}");
    }
    assert!(
        e["code"] == code_or_type || e["type"] == code_or_type,
        "expected {code_or_type}: {v}"
    );
    v
}

#[tokio::test]
async fn client_errors_have_the_openai_shape_and_status() {
    let app = TestApp::spawn_with(fast(), "", "max_body_bytes = 4096").await;
    assert_error(
        app.post_raw("/v1/chat/completions", "{not json").await,
        400,
        "invalid_request_error",
    )
    .await;
    assert_error(
        app.post_raw("/v1/chat/completions", "").await,
        400,
        "invalid_request_error",
    )
    .await;
    let v = assert_error(
        app.post("/v1/chat/completions", &json!({"model": "m"}))
            .await,
        400,
        "invalid_request_error",
    )
    .await;
    assert_eq!(v["error"]["param"], "messages");
    let v = assert_error(
        app.post("/v1/chat/completions", &json!({"messages": []}))
            .await,
        400,
        "invalid_request_error",
    )
    .await;
    assert_eq!(v["error"]["param"], "model");
    assert_error(
        app.post("/v1/chat/completions", &chat_body("gpt-nope", "x"))
            .await,
        404,
        "model_not_found",
    )
    .await;
    let big = chat_body("m", &"x".repeat(10_000));
    assert_error(
        app.post("/v1/chat/completions", &big).await,
        413,
        "request_too_large",
    )
    .await;
    assert_error(
        app.client.get(app.url("/v1/nothing")).send().await.unwrap(),
        404,
        "unknown_url",
    )
    .await;
    assert_error(
        app.client
            .get(app.url("/v1/chat/completions"))
            .send()
            .await
            .unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    // Nothing was sent upstream for any of these.
    assert_eq!(app.mock_stats().chat, 0);
}

#[tokio::test]
async fn upstream_failures_map_to_502_429_and_504() {
    // One attempt: this test is about how each failure is reported, not retried.
    let app = TestApp::spawn_full(
        MockConfig {
            fail_rate: 1.0,
            ..fast()
        },
        r#"first_byte_timeout = "300ms""#,
        "",
        "[routing]\nmax_attempts = 1",
    )
    .await;
    assert_error(
        app.post("/v1/chat/completions", &chat_body("m", "x")).await,
        502,
        "upstream_error",
    )
    .await;

    app.mock.state.set_config(MockConfig {
        rate_limit_rate: 1.0,
        retry_after_s: 7,
        ..fast()
    });
    let r = app.post("/v1/chat/completions", &chat_body("m", "x")).await;
    assert_eq!(r.headers()["retry-after"], "7");
    assert_error(r, 429, "rate_limit_error").await;

    app.mock.state.set_config(MockConfig {
        malformed_rate: 1.0,
        ..fast()
    });
    assert_error(
        app.post("/v1/chat/completions", &chat_body("m", "x")).await,
        502,
        "upstream_error",
    )
    .await;

    app.mock.state.set_config(MockConfig {
        drop_rate: 1.0,
        ..fast()
    });
    assert_error(
        app.post("/v1/chat/completions", &chat_body("m", "x")).await,
        502,
        "upstream_error",
    )
    .await;

    // First-byte timeout: the mock hangs, the provider gives up after 300 ms.
    app.mock.state.set_config(MockConfig {
        hang_rate: 1.0,
        hang_ms: 5_000,
        ..fast()
    });
    let started = std::time::Instant::now();
    let v = assert_error(
        app.post("/v1/chat/completions", &chat_body("m", "x")).await,
        504,
        "timeout_error",
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the first-byte timeout, not the hang"
    );
}

#[tokio::test]
async fn unreachable_upstream_is_a_502() {
    let app = TestApp::spawn(fast()).await;
    // Point a second app at a port nobody listens on.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let toml = format!(
        "[server]\nlisten=\"127.0.0.1:0\"\n[providers.dead]\nkind=\"openai\"\nbase_url=\"http://127.0.0.1:{port}/v1\"\nwarm_connections=0\n[models.d]\nprovider=\"dead\""
    );
    let settings = common::test_settings(&toml);
    let dead_app = switchyard::app::App::build(settings).await.unwrap();
    let addr = dead_app.local_addr();
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(dead_app.run(async move { t.cancelled().await }));
    let r = app
        .client
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&chat_body("d", "x"))
        .send()
        .await
        .unwrap();
    assert_error(r, 502, "upstream_error").await;
    token.cancel();
}

#[tokio::test]
async fn stream_idle_timeout_and_mid_stream_drop_end_with_an_error_event() {
    let app = TestApp::spawn_with(
        MockConfig {
            chunks: 6,
            chunk_interval_ms: 1_500,
            ..fast()
        },
        r#"stream_idle_timeout = "300ms""#,
        "",
    )
    .await;
    let mut body = chat_body("m", "a b c d e f");
    body["stream"] = json!(true);
    let events = app.chat_stream(&body).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "timeout_error", "{events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"));

    // Paced, so the response headers are out before the upstream drops the connection.
    app.mock.state.set_config(MockConfig {
        chunks: 6,
        chunk_interval_ms: 50,
        drop_rate: 1.0,
        ..fast()
    });
    let events = app.chat_stream(&body).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error", "{events:?}");
    assert!(
        events.len() > 1,
        "the chunks before the drop were delivered"
    );
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let app = TestApp::spawn(MockConfig {
        chunks: 0,
        chunk_interval_ms: 100,
        ..fast()
    })
    .await;
    let mut body = chat_body("m", &"word ".repeat(50));
    body["stream"] = json!(true);
    let r = app.post("/v1/chat/completions", &body).await;
    let mut stream = r.bytes_stream();
    let _first = stream.next().await.unwrap().unwrap();
    drop(stream);
    let cancelled = eventually(Duration::from_secs(5), || app.mock_stats().cancelled == 1).await;
    let stats = app.mock_stats();
    assert!(cancelled, "upstream stream was not cancelled: {stats:?}");
    assert_eq!(stats.completed, 0);
    assert!(stats.events < 50, "upstream stopped early: {stats:?}");
}

#[tokio::test]
async fn graceful_shutdown_finishes_an_open_stream() {
    let mut app = TestApp::spawn(MockConfig {
        chunks: 8,
        chunk_interval_ms: 150,
        ..fast()
    })
    .await;
    let mut body = chat_body("m", "one two three four five six seven eight");
    body["stream"] = json!(true);
    let r = app.post("/v1/chat/completions", &body).await;
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    app.begin_shutdown();
    let server = app.take_server();
    // New connections are refused once draining started.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = reqwest::Client::new().get(app.url("/health")).send().await;
    assert!(refused.is_err(), "listener still accepting during shutdown");
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let app = TestApp::spawn(fast()).await;
    for i in 0..100 {
        let (status, _) = app.chat(&chat_body("m", &format!("request {i}"))).await;
        assert_eq!(status, 200);
    }
    let stats = app.mock_stats();
    assert_eq!(stats.chat, 100);
    // Seen from the gateway: provider `mock` opened one connection, at warm-up.
    let pool = app.state.providers["mock"].pool().stats().snapshot();
    assert_eq!(
        pool.connections, 1,
        "100 sequential requests must share the warmed connection: {pool:?}"
    );
    assert_eq!(pool.requests, 100);
    // Seen from the upstream: one connection per provider (the Anthropic one only warmed).
    assert_eq!(stats.connections, 2, "{stats:?}");
}

#[tokio::test]
async fn provider_secrets_are_sent_upstream_but_never_echoed() {
    let app = TestApp::spawn(MockConfig {
        fail_rate: 1.0,
        ..fast()
    })
    .await;
    let r = app.post("/v1/chat/completions", &chat_body("m", "x")).await;
    let text = r.text().await.unwrap();
    assert!(!text.contains("sk-test-provider-secret"), "{text}");
}

#[tokio::test]
async fn client_disconnect_cancels_a_non_stream_upstream_call() {
    let app = TestApp::spawn(MockConfig {
        latency_ms: 3_000,
        ..fast()
    })
    .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = client
        .post(app.url("/v1/chat/completions"))
        .json(&chat_body("m", "slow"))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up first");
    let pool = app.state.providers["mock"].pool().stats();
    let freed = eventually(Duration::from_millis(1_500), || {
        pool.snapshot().in_flight == 0
    })
    .await;
    assert!(
        freed,
        "the upstream call outlived its client: {:?}",
        pool.snapshot()
    );
}
