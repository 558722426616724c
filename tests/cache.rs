//! Response cache, coalescing and embeddings micro-batching against the real mock
//! (its `/stats` counts upstream calls) and, for sharing, a real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use switchyard_loadlab::mock::{MockConfig, MockServer};

const ADMIN: &str = "admin-test-key";

/// One provider on `mock`, alias `c` cached, alias `u` not; `extra` adds tables.
fn cached_config(mock: &MockServer, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[admin]
key = "{ADMIN}"

{extra}

[providers.mock]
kind = "openai"
base_url = "{base}"

[models.c]
provider = "mock"
model = "mock-model"
cache = true

[models.u]
provider = "mock"
model = "mock-model"
"#,
        base = mock.base_url()
    )
}

async fn spawn(config: MockConfig, extra: &str) -> TestApp {
    let m = mock(config).await;
    let toml = cached_config(&m, extra);
    TestApp::spawn_toml(m, &toml).await
}

async fn chat_with_header(app: &TestApp, body: &Value) -> (String, Value) {
    let r = app.post("/v1/chat/completions", body).await;
    assert_eq!(r.status(), 200);
    let header = r.headers()["x-switchyard-cache"]
        .to_str()
        .unwrap()
        .to_string();
    (header, r.json().await.unwrap())
}

async fn admin_cache(app: &TestApp) -> Value {
    app.client
        .get(app.url("/admin/cache"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_repeat_is_a_hit_and_costs_no_upstream_call() {
    let app = spawn(MockConfig::default(), "").await;
    let body = chat_body("c", "cache me");
    let (h1, v1) = chat_with_header(&app, &body).await;
    let (h2, v2) = chat_with_header(&app, &body).await;
    assert_eq!((h1.as_str(), h2.as_str()), ("miss", "hit"));
    assert_eq!(v1, v2);
    assert_eq!(app.mock_stats().chat, 1);

    // `user` and whitespace do not change the key; a different prompt does.
    let same = json!({"messages": [{"role": "user", "content": "cache me"}], "user": "someone", "model": "c"});
    assert_eq!(chat_with_header(&app, &same).await.0, "hit");
    assert_eq!(
        chat_with_header(&app, &chat_body("c", "other")).await.0,
        "miss"
    );

    // Not cached unless the alias or the request asks.
    let r = app
        .post("/v1/chat/completions", &chat_body("u", "cache me"))
        .await;
    assert!(r.headers().get("x-switchyard-cache").is_none());
    let opted = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-switchyard-cache", "on")
        .json(&chat_body("u", "opt in"))
        .send()
        .await
        .unwrap();
    assert_eq!(opted.headers()["x-switchyard-cache"], "miss");

    // Cache-Control: no-cache skips the lookup.
    let fresh = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("cache-control", "no-cache")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.headers()["x-switchyard-cache"], "miss");

    let stats = admin_cache(&app).await;
    assert!(stats["hits"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["entries"].as_u64().unwrap() >= 2, "{stats}");
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let app = spawn(MockConfig::default(), "[cache]\nttl = \"300ms\"").await;
    let body = chat_body("c", "short lived");
    assert_eq!(chat_with_header(&app, &body).await.0, "miss");
    assert_eq!(chat_with_header(&app, &body).await.0, "hit");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(chat_with_header(&app, &body).await.0, "miss");
    assert_eq!(app.mock_stats().chat, 2);
}

#[tokio::test]
async fn the_size_bound_evicts() {
    let app = spawn(MockConfig::default(), "[cache]\nmax_bytes = \"8KiB\"").await;
    for i in 0..60 {
        chat_with_header(
            &app,
            &chat_body("c", &format!("distinct prompt number {i}")),
        )
        .await;
    }
    let stats = admin_cache(&app).await;
    assert!(stats["evictions"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["bytes"].as_u64().unwrap() <= 8 * 1024, "{stats}");
    assert!(stats["entries"].as_u64().unwrap() < 60, "{stats}");
    let clear = app
        .client
        .post(app.url("/admin/cache/clear"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(clear.status(), 200);
    assert_eq!(admin_cache(&app).await["entries"], 0);
}

fn parse_events(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

#[tokio::test]
async fn a_cached_answer_replays_as_a_stream_of_the_same_shape() {
    let app = spawn(
        MockConfig {
            chunks: 4,
            ..MockConfig::default()
        },
        "",
    )
    .await;
    let mut body = chat_body("c", "replay this answer for me please");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = app.post("/v1/chat/completions", &body).await;
    assert_eq!(r.headers()["x-switchyard-cache"], "miss");
    let live = sse_data(r).await;
    let r = app.post("/v1/chat/completions", &body).await;
    assert_eq!(r.headers()["x-switchyard-cache"], "hit");
    let replay = sse_data(r).await;
    assert_eq!(app.mock_stats().chat, 1);

    assert_eq!(live.last().unwrap(), "[DONE]");
    assert_eq!(replay.last().unwrap(), "[DONE]");
    let (live, replay) = (parse_events(&live), parse_events(&replay));
    assert_eq!(content(&live), content(&replay));
    for chunks in [&live, &replay] {
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"])
        );
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
        let finish: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c.pointer("/choices/0/finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("stop")]);
    }
    // Same key for the non-stream form: it is a hit too, with the same text.
    body["stream"] = json!(false);
    body.as_object_mut().unwrap().remove("stream_options");
    let (header, v) = chat_with_header(&app, &body).await;
    assert_eq!(header, "hit");
    assert_eq!(v["choices"][0]["message"]["content"], content(&live));

    // Without include_usage the replay has no usage chunk.
    let mut no_usage = chat_body("c", "replay this answer for me please");
    no_usage["stream"] = json!(true);
    let events = parse_events(&app.chat_stream(&no_usage).await);
    assert!(
        events
            .iter()
            .all(|c| !c["choices"].as_array().unwrap().is_empty())
    );
}

#[tokio::test]
async fn fifty_identical_requests_make_one_upstream_call() {
    let app = spawn(
        MockConfig {
            latency_ms: 300,
            ..MockConfig::default()
        },
        "",
    )
    .await;
    let body = chat_body("c", "everyone asks this");
    let answers: Vec<(u16, Value)> =
        futures_util::future::join_all((0..50).map(|_| app.chat(&body))).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    assert!(answers.iter().all(|(_, v)| v == &answers[0].1));
    assert_eq!(
        app.mock_stats().chat,
        1,
        "50 concurrent identical requests, one upstream call"
    );
    assert!(
        admin_cache(&app).await["coalesced_requests"]
            .as_u64()
            .unwrap()
            >= 49
    );
}

#[tokio::test]
async fn fifty_identical_streams_make_one_upstream_call_and_late_joiners_get_everything() {
    let app = spawn(
        MockConfig {
            chunks: 6,
            chunk_interval_ms: 60,
            ..MockConfig::default()
        },
        "",
    )
    .await;
    let mut body = chat_body("c", "one two three four five six");
    body["stream"] = json!(true);
    let streams = futures_util::future::join_all((0..50).map(|i| {
        let app = &app;
        let body = body.clone();
        async move {
            // Stagger: later ones join a stream already under way.
            tokio::time::sleep(Duration::from_millis(i * 4)).await;
            app.chat_stream(&body).await
        }
    }))
    .await;
    assert_eq!(app.mock_stats().chat, 1);
    for events in &streams {
        assert_eq!(events.last().unwrap(), "[DONE]");
        assert_eq!(
            content(&parse_events(events)),
            "one two three four five six"
        );
    }
}

#[tokio::test]
async fn a_waiter_that_leaves_does_not_cancel_the_call_for_the_others() {
    let app = spawn(
        MockConfig {
            chunks: 6,
            chunk_interval_ms: 100,
            ..MockConfig::default()
        },
        "",
    )
    .await;
    let mut body = chat_body("c", "one two three four five six");
    body["stream"] = json!(true);
    let r = app.post("/v1/chat/completions", &body).await;
    let mut quitter = r.bytes_stream();
    quitter.next().await.unwrap().unwrap();
    // The second client has joined (its response started) before the first one leaves.
    let stayer = app.post("/v1/chat/completions", &body).await;
    drop(quitter);
    let events = sse_data(stayer).await;
    assert_eq!(
        content(&parse_events(&events)),
        "one two three four five six"
    );
    let stats = app.mock_stats();
    assert_eq!(
        (stats.chat, stats.cancelled, stats.completed),
        (1, 0, 1),
        "{stats:?}"
    );
}

#[tokio::test]
async fn concurrent_single_embeddings_are_batched_and_split_back() {
    let app = spawn(
        MockConfig {
            latency_ms: 20,
            ..MockConfig::default()
        },
        "[embeddings]\nbatch_window = \"25ms\"\nbatch_max_inputs = 64",
    )
    .await;
    let inputs: Vec<String> = (0..64).map(|i| format!("sentence number {i}")).collect();
    let answers = futures_util::future::join_all(inputs.iter().map(|text| {
        let app = &app;
        async move {
            let r = app
                .post("/v1/embeddings", &json!({"model": "u", "input": text}))
                .await;
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    }))
    .await;
    let calls = app.mock_stats().embeddings;
    assert!(
        calls <= 8,
        "64 single-input requests took {calls} upstream calls"
    );
    // Every caller got its own vector: compare with the mock asked directly.
    let direct: Value = app
        .client
        .post(format!("{}/embeddings", app.mock.base_url()))
        .json(&json!({"model": "x", "input": inputs}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (i, answer) in answers.iter().enumerate() {
        let data = answer["data"].as_array().unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data[0]["index"], 0);
        assert_eq!(
            data[0]["embedding"], direct["data"][i]["embedding"],
            "caller {i}"
        );
    }
}

#[tokio::test]
async fn two_instances_share_the_cache_through_redis() {
    let Ok(url) = std::env::var("SWITCHYARD_TEST_REDIS_URL") else {
        common::notice("SWITCHYARD_TEST_REDIS_URL is not set; the Redis cache test skipped");
        return;
    };
    let prefix = format!("switchyard-test-{}-{}:", std::process::id(), rand_suffix());
    let extra = format!(
        "[cache]\nbackend = \"redis\"\nttl = \"1m\"\n\n[redis]\nurl = \"{url}\"\nkey_prefix = \"{prefix}\""
    );
    let m = mock(MockConfig::default()).await;
    let toml = cached_config(&m, &extra);
    let first = TestApp::spawn_toml(m, &toml).await;
    // Same config, so the second instance's upstream is the first one's mock too; its own
    // mock stays idle.
    let second = TestApp::spawn_toml(mock(MockConfig::default()).await, &toml).await;
    let body = chat_body("c", "shared across instances");
    assert_eq!(chat_with_header(&first, &body).await.0, "miss");
    assert_eq!(chat_with_header(&second, &body).await.0, "hit");
    assert_eq!(
        first.mock_stats().chat,
        1,
        "the second instance did not call upstream"
    );
    let clear = first
        .client
        .post(first.url("/admin/cache/clear"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(clear.status(), 200);
    assert_eq!(chat_with_header(&second, &body).await.0, "miss");
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
