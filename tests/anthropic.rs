//! A client speaking OpenAI format uses a Claude model: requests, responses, tool calls and
//! streams are translated both ways, against the mock's Anthropic Messages endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;

#[tokio::test]
async fn non_stream_text_and_usage_are_translated() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let body = json!({"model": "claude", "max_tokens": 50, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello claude"}
    ]});
    let (status, v) = app.chat(&body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "claude-test");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "hello claude");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(app.mock_stats().messages, 1, "served by the Messages API");
}

#[tokio::test]
async fn non_stream_tool_calls_round_trip() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let body = json!({"model": "claude", "tools": tools(),
        "messages": [{"role": "user", "content": "Oslo"}]});
    let (status, v) = app.chat(&body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["city"], "Oslo");

    // Send the tool results back: the assistant turn and tool messages become tool_use and
    // tool_result blocks, and the model answers in text.
    let follow_up = json!({"model": "claude", "tools": tools(), "messages": [
        {"role": "user", "content": "Oslo"},
        v["choices"][0]["message"].clone(),
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "42.0"}
    ]});
    let (status, v) = app.chat(&follow_up).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Oslo")
    );
}

#[tokio::test]
async fn stream_text_is_translated_to_openai_chunks() {
    let app = TestApp::spawn(MockConfig {
        chunks: 3,
        ..MockConfig::default()
    })
    .await;
    let body = json!({"model": "claude", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "streaming from claude works"}]});
    let events = app.chat_stream(&body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect();
    assert_eq!(text, "streaming from claude works");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(
        chunks
            .iter()
            .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk")
    );
    let finish: Vec<&str> = chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/finish_reason")
                .and_then(Value::as_str)
        })
        .collect();
    assert_eq!(finish, ["stop"]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Without include_usage the client sees no usage at all.
    let body = json!({"model": "claude", "stream": true,
        "messages": [{"role": "user", "content": "no usage for me"}]});
    let events = app.chat_stream(&body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(chunk.get("usage").is_none(), "{event}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1, "{event}");
    }
}

#[tokio::test]
async fn streamed_parallel_tool_calls_are_translated_intact() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let body = json!({"model": "claude", "stream": true, "tools": tools(),
        "messages": [{"role": "user", "content": "Lisbon"}]});
    let events = app.chat_stream(&body).await;
    let calls = assemble_tool_calls(&events);
    assert_eq!(calls.len(), 2, "{events:?}");
    assert_eq!(calls[0].1, "get_weather");
    assert_eq!(calls[1].1, "get_quote");
    let weather: Value = serde_json::from_str(&calls[0].2).unwrap();
    assert_eq!(weather, json!({"city": "Lisbon", "days": 1}));
    let quote: Value = serde_json::from_str(&calls[1].2).unwrap();
    assert_eq!(quote, json!({"symbol": "Lisbon"}));
    assert!(
        calls.iter().all(|c| !c.0.is_empty()),
        "every call has an id"
    );
}

#[tokio::test]
async fn anthropic_errors_keep_their_meaning() {
    let app = TestApp::spawn_full(
        MockConfig {
            rate_limit_rate: 1.0,
            retry_after_s: 3,
            ..MockConfig::default()
        },
        "",
        "",
        "[routing]\nmax_attempts = 1",
    )
    .await;
    let r = app
        .post("/v1/chat/completions", &chat_body("claude", "x"))
        .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    app.mock.state.set_config(MockConfig {
        fail_rate: 1.0,
        ..MockConfig::default()
    });
    let r = app
        .post("/v1/chat/completions", &chat_body("claude", "x"))
        .await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic"),
        "{v}"
    );
    let r = app
        .post(
            "/v1/chat/completions",
            &json!({"model": "claude", "n": 3, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(r.status(), 400, "n > 1 cannot be served by Anthropic");
}
