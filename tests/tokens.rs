//! The token pre-flight end to end: the real binary, in front of the real mock upstream,
//! with aliases whose context window is small.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchyard_loadlab::mock::{MockConfig, MockServer};

/// The binary serving three aliases over the same mock model with a 400-token window
/// and 50 tokens of answer room: `strict` refuses, `trim` truncates, `open` (no
/// pre-flight) passes everything through.
struct Gateway {
    _child: tokio::process::Child,
    base: String,
    client: reqwest::Client,
}

async fn start(mock: &MockServer, name: &str) -> Gateway {
    switchyard::app::install_crypto();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("switchyard_tokens_{name}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    let alias = |alias: &str, preflight: &str| {
        format!(
            "[models.{alias}]\nprovider = \"mock\"\nmodel = \"mock-a\"\ncontext_window = 400\n\
             max_output_tokens = 50\ntokenizer = \"o200k_base\"\n{preflight}\n"
        )
    };
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [auth]\nmode = \"none\"\n\
             [database]\nurl = \"sqlite://{}\"\n\
             [providers.mock]\nkind = \"openai\"\nbase_url = \"{}\"\n{}{}{}",
            dir.join("usage.db").display(),
            mock.base_url(),
            alias("strict", "preflight = \"reject\""),
            alias("trim", "preflight = \"truncate\""),
            alias("open", ""),
        ),
    )
    .unwrap();
    let child = serve_binary(&config);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let ready = {
        let client = client.clone();
        let url = format!("{base}/ready");
        let mut ready = false;
        for _ in 0..800 {
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ready
    };
    assert!(ready, "the gateway never became ready");
    Gateway {
        _child: child,
        base,
        client,
    }
}

impl Gateway {
    async fn chat(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/chat/completions", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }
}

/// A system message, then `turns` user/assistant pairs of about 30 tokens each with a
/// tool call and its output in the middle, then a last user question: far over 350
/// tokens for a dozen turns.
fn conversation(model: &str, turns: usize) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You answer in one line."})];
    for turn in 0..turns {
        messages.push(json!({"role": "user", "content": format!(
            "Question {turn}: what can you tell me about the number {turn} and its neighbours?"
        )}));
        if turn == turns / 2 {
            messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "lookup", "arguments": "{\"n\": 1}"}}]}));
            messages.push(json!({"role": "tool", "tool_call_id": "call_1", "content": "odd"}));
        }
        messages.push(json!({"role": "assistant", "content": format!(
            "The number {turn} comes right before {} and right after the one before it.", turn + 1
        )}));
    }
    messages.push(json!({"role": "user", "content": "last question please"}));
    json!({"model": model, "messages": messages})
}

#[tokio::test]
async fn reject_answers_400_before_any_upstream_call() {
    let mock = mock(MockConfig::default()).await;
    let gateway = start(&mock, "reject").await;

    let r = gateway.chat(&conversation("strict", 12)).await;
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("x-switchyard-truncated").is_none());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    assert_eq!(body["error"]["param"], "messages", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "This model's maximum context length is 400 tokens. However, you requested"
        ),
        "{message}"
    );
    assert!(message.contains("50 in the completion"), "{message}");
    assert_eq!(mock.stats().chat, 0, "nothing was sent upstream");

    // A request's own max_tokens counts instead of the alias's room.
    let mut short = conversation("strict", 1);
    let r = gateway.chat(&short).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    short["max_tokens"] = json!(390);
    let r = gateway.chat(&short).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("390 in the completion"),
        "{body}"
    );
    assert_eq!(
        mock.stats().chat,
        1,
        "only the request that fit went upstream"
    );

    // Without a pre-flight the same long prompt goes upstream untouched.
    let r = gateway.chat(&conversation("open", 12)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(mock.stats().chat, 2);
}

#[tokio::test]
async fn truncate_drops_the_oldest_messages_and_says_how_many() {
    let mock = mock(MockConfig::default()).await;
    let gateway = start(&mock, "truncate").await;

    let whole = conversation("open", 12);
    let sent = whole["messages"].as_array().unwrap().len();
    let r = gateway.chat(&whole).await;
    assert_eq!(r.status(), 200);
    let untouched: Value = r.json().await.unwrap();

    let r = gateway.chat(&conversation("trim", 12)).await;
    assert_eq!(r.status(), 200);
    let dropped: usize = r.headers()["x-switchyard-truncated"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped > 0 && dropped < sent - 2, "{dropped} of {sent}");
    let cut: Value = r.json().await.unwrap();
    // The newest message survived (the mock echoes the last user message) and the
    // upstream read a shorter prompt (the mock counts its body's bytes / 4).
    assert_eq!(
        cut["choices"][0]["message"]["content"],
        "last question please"
    );
    let prompt = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt(&cut) < prompt(&untouched) * 3 / 4,
        "{cut} vs {untouched}"
    );
    assert_eq!(mock.stats().chat, 2);

    // A stream is cut the same way, and says so in its headers.
    let mut streamed = conversation("trim", 12);
    streamed["stream"] = json!(true);
    let r = gateway.chat(&streamed).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-switchyard-truncated"].to_str().unwrap(),
        dropped.to_string()
    );
    let events = sse_data(r).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    // A prompt that fits is not touched and carries no header.
    let r = gateway.chat(&conversation("trim", 1)).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-switchyard-truncated").is_none());

    // When even the newest message cannot fit, nothing is cut: 400, nothing upstream.
    let before = mock.stats().chat;
    let huge = json!({"model": "trim", "messages": [
        {"role": "user", "content": "word ".repeat(600)}
    ]});
    let r = gateway.chat(&huge).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    assert_eq!(mock.stats().chat, before);
}
