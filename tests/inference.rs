//! The inference layer called directly, as the application features call it: no HTTP
//! between the caller and the model call. Each call must produce exactly one usage row
//! and one settlement of its key's budget, and several calls under one context are each
//! metered under the same key and request id.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{TestApp, config_for, mock};
use serde_json::{Value, json};
use switchyard::auth::{NewKey, Principal};
use switchyard::cache::CacheDirective;
use switchyard::inference::{CallContext, ChatReply};
use switchyard::store::UsageRow;
use switchyard::wire::event::EventKind;
use switchyard::wire::{ChatRequest, EmbeddingsRequest};
use switchyard_loadlab::mock::MockConfig;

/// The app with keys on, a fast usage flush, a cached alias `c` and embeddings batching.
async fn spawn() -> TestApp {
    let m = mock(MockConfig::default()).await;
    let dir = std::env::temp_dir().join(format!(
        "switchyard_inference_{}_{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let tail = format!(
        "[models.c]\nprovider = \"mock\"\nmodel = \"mock-model\"\ncache = true\n\n\
         [auth]\nmode = \"keys\"\n[database]\nurl = \"sqlite://{}\"\n\
         [usage]\nflush_interval = \"20ms\"\n\
         [embeddings]\nbatch_window = \"30ms\"\nbatch_max_inputs = 64\n",
        dir.join("sy.db").display()
    );
    let toml = config_for(&m, "", "", &tail);
    TestApp::spawn_toml(m, &toml).await
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A key with a budget (so every call reserves and settles), as its principal.
async fn principal(app: &TestApp, name: &str) -> Arc<Principal> {
    let new = NewKey {
        name: name.into(),
        budget_tokens: Some(1_000_000),
        budget_period: Some(switchyard::limits::period::BudgetPeriod::Month),
        ..NewKey::default()
    };
    let (secret, _) = switchyard::auth::create_key(&app.state.store, &new)
        .await
        .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {secret}").parse().unwrap(),
    );
    app.state
        .auth
        .authenticate(&headers)
        .await
        .unwrap()
        .expect("keys are on")
}

fn context(app: &TestApp, request_id: &str, who: &Arc<Principal>) -> CallContext {
    app.state
        .inference
        .context("chat", request_id.into(), Some(who.clone()))
}

fn chat(body: Value) -> ChatRequest {
    ChatRequest::parse(Bytes::from(body.to_string())).unwrap()
}

/// The usage rows of `request_id` once `n` have been written.
async fn rows(app: &TestApp, request_id: &str, n: usize) -> Vec<UsageRow> {
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = app.state.store.usage_of_request(request_id).await.unwrap();
        if rows.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rows
}

fn settlements(app: &TestApp) -> u64 {
    app.state.inference.limits().settlements()
}

/// (tokens used this period, tokens still reserved) of a key's budget.
fn budget(app: &TestApp, who: &Principal) -> (u64, u64) {
    app.state.inference.limits().budget_of(&who.key_id).unwrap()
}

#[tokio::test]
async fn a_completion_is_metered_once() {
    let app = spawn().await;
    let who = principal(&app, "direct").await;
    let before = settlements(&app);
    let ctx = context(&app, "req-complete", &who);
    let reply = app
        .state
        .inference
        .chat(
            &ctx,
            chat(json!({"model": "m", "messages": [{"role": "user", "content": "one two three"}]})),
        )
        .await
        .unwrap();
    let ChatReply::Complete(completion) = reply else {
        panic!("a non-stream request answers with a completion");
    };
    let typed = completion.chat().unwrap();
    assert_eq!(typed.object, "chat.completion");
    assert!(typed.text().is_some_and(|t| !t.is_empty()));
    let usage = completion.usage.unwrap();
    assert!(usage.total_tokens > 0);
    assert_eq!(
        completion.served.deployment.as_deref(),
        Some("mock/mock-model")
    );
    assert_eq!(settlements(&app) - before, 1);
    assert_eq!(budget(&app, &who), (usage.total_tokens, 0));
    let rows = rows(&app, "req-complete", 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].status, 200);
    assert_eq!(rows[0].tokens_out, usage.completion_tokens as i64);
    assert_eq!(rows[0].key_id.as_deref(), Some(&*who.key_id));
}

#[tokio::test]
async fn a_stream_is_metered_once_when_read_to_its_end() {
    let app = spawn().await;
    let who = principal(&app, "stream").await;
    let before = settlements(&app);
    let ctx = context(&app, "req-stream", &who);
    let reply = app
        .state
        .inference
        .chat(
            &ctx,
            chat(json!({"model": "m", "stream": true,
                "messages": [{"role": "user", "content": "stream these words"}]})),
        )
        .await
        .unwrap();
    let ChatReply::Stream(mut stream) = reply else {
        panic!("a stream request answers with a stream");
    };
    let mut text = String::new();
    let mut kinds = Vec::new();
    while let Some(event) = stream.next().await {
        kinds.push(event.kind);
        if event.kind == EventKind::Chunk {
            let chunk: Value = event.parse().unwrap();
            text.push_str(
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or(""),
            );
        }
    }
    assert!(!text.is_empty());
    assert_eq!(kinds.last(), Some(&EventKind::Done));
    assert!(
        !kinds.contains(&EventKind::UsageOnly),
        "the usage chunk is read but not shown to a caller that did not ask for it"
    );
    let usage = stream.usage().expect("usage was read from the stream");
    assert_eq!(settlements(&app) - before, 1);
    assert_eq!(budget(&app, &who), (usage.total_tokens, 0));
    drop(stream);
    assert_eq!(
        settlements(&app) - before,
        1,
        "dropping an ended stream settles nothing"
    );
    let rows = rows(&app, "req-stream", 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].tokens_in, usage.prompt_tokens as i64);
}

#[tokio::test]
async fn a_dropped_stream_is_charged_its_reservation_once() {
    let app = spawn().await;
    let who = principal(&app, "gone").await;
    let before = settlements(&app);
    let ctx = context(&app, "req-gone", &who);
    let reply = app
        .state
        .inference
        .chat(
            &ctx,
            chat(json!({"model": "m", "stream": true, "max_tokens": 100,
                "messages": [{"role": "user", "content": "a b c d e f g h"}]})),
        )
        .await
        .unwrap();
    let ChatReply::Stream(mut stream) = reply else {
        panic!("a stream");
    };
    assert!(stream.next().await.is_some());
    drop(stream);
    assert_eq!(settlements(&app) - before, 1);
    let (used, reserved) = budget(&app, &who);
    assert_eq!(reserved, 0);
    assert!(used > 0, "a reader that left after output is charged");
    let rows = rows(&app, "req-gone", 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, 499);
}

#[tokio::test]
async fn a_cached_answer_is_metered_once_and_charged_nothing() {
    let app = spawn().await;
    let who = principal(&app, "cache").await;
    let body = json!({"model": "c", "messages": [{"role": "user", "content": "cache me"}]});
    let mut ctx = context(&app, "req-miss", &who);
    ctx.cache = CacheDirective::default();
    let first = app
        .state
        .inference
        .chat(&ctx, chat(body.clone()))
        .await
        .unwrap();
    let ChatReply::Complete(first) = first else {
        panic!("a completion");
    };
    assert!(!first.served.cache_hit);
    let (used_after_miss, _) = budget(&app, &who);
    let before = settlements(&app);
    let ctx = context(&app, "req-hit", &who);
    let ChatReply::Complete(hit) = app.state.inference.chat(&ctx, chat(body)).await.unwrap() else {
        panic!("a completion");
    };
    assert!(hit.served.cache_hit);
    assert_eq!(hit.body, first.body);
    assert_eq!(settlements(&app) - before, 1);
    assert_eq!(
        budget(&app, &who),
        (used_after_miss, 0),
        "a hit costs no tokens"
    );
    let rows = rows(&app, "req-hit", 1).await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].cache_hit);
    assert_eq!(
        app.mock_stats().chat,
        1,
        "the hit never reached the upstream"
    );
}

#[tokio::test]
async fn batched_embeddings_are_metered_once_each() {
    let app = spawn().await;
    let who = principal(&app, "embed").await;
    let before = settlements(&app);
    let calls = (0..3).map(|i| {
        let app = &app;
        let who = &who;
        async move {
            let ctx = app.state.inference.context(
                "embeddings",
                format!("req-embed-{i}").into(),
                Some(who.clone()),
            );
            let req = EmbeddingsRequest::parse(Bytes::from(
                json!({"model": "m", "input": format!("text {i}")}).to_string(),
            ))
            .unwrap();
            app.state.inference.embed(&ctx, req).await.unwrap()
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    for answer in &answers {
        let body: Value = answer.parse().unwrap();
        assert_eq!(body["data"].as_array().unwrap().len(), 1);
    }
    assert_eq!(
        app.mock_stats().embeddings,
        1,
        "three calls, one batched upstream call"
    );
    assert_eq!(settlements(&app) - before, 3);
    for i in 0..3 {
        let rows = rows(&app, &format!("req-embed-{i}"), 1).await;
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].route, "embeddings");
    }
    assert_eq!(budget(&app, &who).1, 0);
}

#[tokio::test]
async fn two_calls_under_one_context_settle_twice_under_one_key_and_request_id() {
    let app = spawn().await;
    let who = principal(&app, "loop").await;
    let before = settlements(&app);
    let ctx = context(&app, "req-loop", &who);
    let mut total = 0;
    for text in ["first call", "second call"] {
        let reply = app
            .state
            .inference
            .chat(
                &ctx,
                chat(json!({"model": "m", "messages": [{"role": "user", "content": text}]})),
            )
            .await
            .unwrap();
        let ChatReply::Complete(completion) = reply else {
            panic!("a completion");
        };
        total += completion.usage.unwrap().total_tokens;
    }
    assert_eq!(settlements(&app) - before, 2);
    assert_eq!(budget(&app, &who), (total, 0));
    let rows = rows(&app, "req-loop", 2).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r.key_id.as_deref() == Some(&*who.key_id))
    );
    assert_eq!(app.mock_stats().chat, 2);
}

/// An upstream that writes JSON with a space after each colon, as some servers do.
async fn spaced_upstream() -> String {
    use axum::routing::post;
    let events = concat!(
        "data: {\"id\": \"c1\", \"object\": \"chat.completion.chunk\", \"created\": 1, \"model\": \"spaced\", ",
        "\"choices\": [{\"index\": 0, \"delta\": {\"role\": \"assistant\", \"content\": \"hello\"}, \"finish_reason\": null}]}\n\n",
        "data: {\"id\": \"c1\", \"object\": \"chat.completion.chunk\", \"created\": 1, \"model\": \"spaced\", ",
        "\"choices\": [{\"index\": 0, \"delta\": {}, \"finish_reason\": \"stop\"}]}\n\n",
        "data: {\"id\": \"c1\", \"object\": \"chat.completion.chunk\", \"created\": 1, \"model\": \"spaced\", ",
        "\"choices\": [], \"usage\": {\"prompt_tokens\": 11, \"completion_tokens\": 7, \"total_tokens\": 18}}\n\n",
        "data: [DONE]\n\n",
    );
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move || async move { ([("content-type", "text/event-stream")], events) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

/// Usage written as `"usage": {` is read on every path: a stream called directly, a
/// coalesced (cached) stream, and the meter's row.
#[tokio::test]
async fn usage_with_a_space_after_the_colon_is_counted_on_every_path() {
    let m = mock(MockConfig::default()).await;
    let spaced = spaced_upstream().await;
    let tail = format!(
        "[providers.spaced]\nkind = \"openai\"\nbase_url = \"{spaced}\"\n\n\
         [models.s]\nprovider = \"spaced\"\nmodel = \"spaced\"\n\n\
         [models.sc]\nprovider = \"spaced\"\nmodel = \"spaced\"\ncache = true\n\n\
         [usage]\nflush_interval = \"20ms\"\n"
    );
    let toml = config_for(&m, "", "", &tail);
    let app = TestApp::spawn_toml(m, &toml).await;
    for (alias, request_id) in [("s", "req-spaced-direct"), ("sc", "req-spaced-flight")] {
        let ctx = app.state.inference.context("chat", request_id.into(), None);
        let body = json!({"model": alias, "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]});
        let ChatReply::Stream(mut stream) =
            app.state.inference.chat(&ctx, chat(body)).await.unwrap()
        else {
            panic!("a stream");
        };
        let mut usage_events = 0;
        while let Some(event) = stream.next().await {
            if event.kind == EventKind::UsageOnly {
                usage_events += 1;
            }
        }
        assert_eq!(
            usage_events, 1,
            "{alias}: the caller asked for the usage chunk"
        );
        assert_eq!(stream.usage().map(|u| u.total_tokens), Some(18), "{alias}");
        drop(stream);
        let rows = rows(&app, request_id, 1).await;
        assert_eq!(rows.len(), 1, "{alias}");
        assert_eq!((rows[0].tokens_in, rows[0].tokens_out), (11, 7), "{alias}");
    }
}
