//! Routing and resilience end to end: two real mock upstreams as two deployments, faults
//! injected through the mocks, behaviour read from responses, the mocks' counters and the
//! admin API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use switchyard_loadlab::mock::{MockConfig, MockServer};

const ADMIN: &str = "admin-test-key";

/// Two providers `a` and `b` (on mocks `a` and `b`) and model aliases described by
/// `models`; `extra` holds further top-level tables.
fn two_deployments(
    a: &MockServer,
    b: &MockServer,
    provider_a: &str,
    models: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "5s"

[admin]
key = "{ADMIN}"

{extra}

[providers.a]
kind = "openai"
base_url = "{a}"
{provider_a}

[providers.b]
kind = "openai"
base_url = "{b}"

{models}
"#,
        a = a.base_url(),
        b = b.base_url(),
    )
}

const BOTH: &str = r#"
[models.chat]
deployments = [
  { provider = "a", model = "a-model" },
  { provider = "b", model = "b-model" },
]
"#;

async fn admin(app: &TestApp, path: &str) -> Value {
    let r = app
        .client
        .get(app.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn circuit_state(app: &TestApp, id: &str) -> String {
    let v = admin(app, "/admin/providers").await;
    v["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .map(|d| d["circuit"]["state"].as_str().unwrap().to_string())
        .unwrap()
}

#[tokio::test]
async fn one_of_two_deployments_failing_30_percent_is_invisible_to_clients() {
    let a = mock(MockConfig {
        fail_rate: 0.3,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    // A breaker that stays closed at 30% failures, so every fault is met by a retry.
    let breaker =
        "[circuit_breaker]\nmin_requests = 50\nfailure_rate = 0.8\nconsecutive_failures = 0\n";
    let toml = two_deployments(&a, &b, "", BOTH, breaker);
    let app = TestApp::spawn_toml(a, &toml).await;
    let statuses: Vec<u16> = futures_util::stream::iter(0..2000)
        .map(|i| {
            let app = &app;
            async move {
                app.post("/v1/chat/completions", &chat_body("chat", &format!("q{i}")))
                    .await
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok * 1000 >= 2000 * 999, "{ok} of 2000 succeeded");
    let faults = app.mock_stats().faults;
    // a takes about half of 2,000 first attempts and fails 30% of them: ~300 faults.
    assert!(faults > 200, "deployment a really failed ({faults} faults)");
    assert_eq!(b.stats().faults, 0);
}

#[tokio::test]
async fn a_hanging_deployment_is_bounded_then_cut_off_then_readmitted() {
    let a = mock(MockConfig {
        hang_rate: 1.0,
        hang_ms: 30_000,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let breaker = r#"
[circuit_breaker]
window = "30s"
min_requests = 3
failure_rate = 0.5
cooldown = "1500ms"
half_open_probes = 2
"#;
    let toml = two_deployments(&a, &b, r#"first_byte_timeout = "200ms""#, BOTH, breaker);
    let app = TestApp::spawn_toml(a, &toml).await;

    // Every request is answered by b, after a's first-byte timeout or directly. An
    // unbounded wait on a (it hangs 30 s) would run into the test client's own 30 s
    // timeout instead: the bound is what lets these succeed, with no clock read here.
    for i in 0..12 {
        let (status, v) = app.chat(&chat_body("chat", &format!("h{i}"))).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["model"], "b-model");
    }
    assert_eq!(circuit_state(&app, "a/a-model").await, "open");

    // While open, a gets no traffic at all.
    let before = app.mock_stats().chat;
    for i in 0..10 {
        let (status, _) = app.chat(&chat_body("chat", &format!("o{i}"))).await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        app.mock_stats().chat,
        before,
        "open circuit must receive nothing"
    );

    // The fault stops; after the cool-down, probes succeed and the circuit closes.
    app.mock.state.set_config(MockConfig::default());
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut closed = false;
    for i in 0..60 {
        let (status, _) = app.chat(&chat_body("chat", &format!("c{i}"))).await;
        assert_eq!(status, 200);
        if circuit_state(&app, "a/a-model").await == "closed" {
            closed = true;
            break;
        }
    }
    assert!(closed, "circuit never closed after the fault stopped");
    assert!(app.mock_stats().completed > 0, "a serves again");
}

#[tokio::test]
async fn retry_after_is_waited_out_before_retrying() {
    let a = mock(MockConfig {
        rate_limit_first: 1,
        retry_after_s: 1,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let only_a = "[models.solo]\nprovider = \"a\"\nmodel = \"a-model\"\n";
    let toml = two_deployments(&a, &b, "", only_a, "");
    let app = TestApp::spawn_toml(a, &toml).await;
    let started = Instant::now();
    let (status, v) = app.chat(&chat_body("solo", "patience")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(app.mock_stats().chat, 2, "one 429, one success");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
}

#[tokio::test]
async fn a_retry_after_too_long_to_wait_goes_back_to_the_client() {
    let a = mock(MockConfig {
        rate_limit_rate: 1.0,
        retry_after_s: 120,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let only_a = "[models.solo]\nprovider = \"a\"\n";
    let toml = two_deployments(&a, &b, "", only_a, "");
    let app = TestApp::spawn_toml(a, &toml).await;
    let r = app
        .post("/v1/chat/completions", &chat_body("solo", "x"))
        .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "120");
    assert_eq!(
        app.mock_stats().chat,
        1,
        "no retry when Retry-After exceeds routing.max_retry_after"
    );
}

#[tokio::test]
async fn a_full_provider_queue_answers_429_at_once() {
    let a = mock(MockConfig {
        latency_ms: 1_500,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let only_a = "[models.solo]\nprovider = \"a\"\n";
    let limits = "[admission]\nmax_concurrent = 64\nmax_queue = 1\nmax_queue_wait_ms = 5000\n";
    let toml = two_deployments(&a, &b, "max_concurrent = 1", only_a, limits);
    let app = TestApp::spawn_toml(a, &toml).await;

    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let client = app.client.clone();
        let url = app.url("/v1/chat/completions");
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&chat_body("solo", &format!("{i}")))
                .send()
                .await
                .unwrap();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            tx.send((r.status().as_u16(), retry_after)).await.unwrap();
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(answer) = rx.recv().await {
        order.push(answer);
    }
    let statuses: Vec<u16> = order.iter().map(|(s, _)| *s).collect();
    // The two refused requests are answered before the running one finishes.
    assert_eq!(statuses, [429, 429, 200, 200], "{order:?}");
    assert!(
        order[..2].iter().all(|(_, ra)| ra.is_some()),
        "429 carries Retry-After"
    );
    let limits = admin(&app, "/admin/limits").await;
    assert!(
        limits["providers"]["a"]["rejected_queue_full"]
            .as_u64()
            .unwrap()
            >= 2,
        "{limits}"
    );
}

#[tokio::test]
async fn a_full_global_queue_answers_503_with_retry_after() {
    let a = mock(MockConfig {
        latency_ms: 1_000,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let limits = "[admission]\nmax_concurrent = 1\nmax_queue = 0\nmax_queue_wait_ms = 100\n";
    let only_a = "[models.solo]\nprovider = \"a\"\n";
    let toml = two_deployments(&a, &b, "", only_a, limits);
    let app = TestApp::spawn_toml(a, &toml).await;
    let slow = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/chat/completions");
        async move {
            client
                .post(url)
                .json(&chat_body("solo", "slow"))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = app
        .post("/v1/chat/completions", &chat_body("solo", "rejected"))
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "service_overloaded");
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn a_fallback_model_answers_when_every_deployment_is_down() {
    let a = mock(MockConfig {
        fail_rate: 1.0,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let models = r#"
[models.chat]
provider = "a"
model = "a-model"
fallbacks = ["backup"]

[models.backup]
provider = "b"
model = "b-model"
"#;
    let toml = two_deployments(&a, &b, "", models, "");
    let app = TestApp::spawn_toml(a, &toml).await;
    let (status, v) = app.chat(&chat_body("chat", "anyone?")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "b-model");
    assert!(app.mock_stats().faults >= 1, "the primary was tried first");
}

#[tokio::test]
async fn context_window_errors_fall_back_only_where_configured() {
    let a = mock(MockConfig {
        context_window: Some(30),
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let models = r#"
[models.chat]
provider = "a"
model = "a-model"
fallbacks = ["big"]
fallback_on = ["context_window"]

[models.strict]
provider = "a"
model = "a-model"
fallbacks = ["big"]

[models.big]
provider = "b"
model = "b-model"
"#;
    let toml = two_deployments(&a, &b, "", models, "");
    let app = TestApp::spawn_toml(a, &toml).await;
    let long = "many words ".repeat(40);
    let (status, v) = app.chat(&chat_body("chat", &long)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "b-model");

    let (status, v) = app.chat(&chat_body("strict", &long)).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_frees_its_place() {
    let a = mock(MockConfig {
        latency_ms: 800,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let only_a = "[models.solo]\nprovider = \"a\"\n";
    let toml = two_deployments(&a, &b, "max_concurrent = 1", only_a, "");
    let app = TestApp::spawn_toml(a, &toml).await;
    let first = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/chat/completions");
        async move {
            client
                .post(url)
                .json(&chat_body("solo", "first"))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    assert!(
        impatient
            .post(app.url("/v1/chat/completions"))
            .json(&chat_body("solo", "gone"))
            .send()
            .await
            .is_err()
    );
    let mut queued = u64::MAX;
    for _ in 0..50 {
        queued = admin(&app, "/admin/limits").await["providers"]["a"]["queued"]
            .as_u64()
            .unwrap();
        if queued == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(queued, 0, "the departed client still holds a queue place");
    assert_eq!(first.await.unwrap(), 200);
    let (status, _) = app.chat(&chat_body("solo", "third")).await;
    assert_eq!(status, 200);
    assert_eq!(
        app.mock_stats().chat,
        2,
        "the departed request never reached the upstream"
    );
}

#[tokio::test]
async fn balancing_follows_weights_and_load() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig::default()).await;
    let models = r#"
[models.weighted]
deployments = [
  { provider = "a", model = "a-model", weight = 3 },
  { provider = "b", model = "b-model", weight = 1 },
]
"#;
    let toml = two_deployments(&a, &b, "", models, "");
    let app = TestApp::spawn_toml(a, &toml).await;
    for i in 0..400 {
        let (status, _) = app.chat(&chat_body("weighted", &format!("{i}"))).await;
        assert_eq!(status, 200);
    }
    let share_a = app.mock_stats().chat as f64 / 400.0;
    assert!(
        (0.62..=0.88).contains(&share_a),
        "3:1 weights gave a {share_a}"
    );

    // least-loaded: the slow deployment gets little traffic.
    let slow = mock(MockConfig {
        latency_ms: 40,
        ..MockConfig::default()
    })
    .await;
    let fast = mock(MockConfig::default()).await;
    let models = r#"
[models.adaptive]
balancing = "least-loaded"
deployments = [
  { provider = "a", model = "a-model" },
  { provider = "b", model = "b-model" },
]
"#;
    let toml = two_deployments(&slow, &fast, "", models, "");
    let app = TestApp::spawn_toml(slow, &toml).await;
    for i in 0..60 {
        let (status, _) = app.chat(&chat_body("adaptive", &format!("{i}"))).await;
        assert_eq!(status, 200);
    }
    let to_slow = app.mock_stats().chat;
    assert!(
        to_slow <= 10,
        "least-loaded sent {to_slow} of 60 to the slow deployment"
    );
}

#[tokio::test]
async fn admin_views_need_the_admin_key() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig::default()).await;
    let toml = two_deployments(&a, &b, "", BOTH, "");
    let app = TestApp::spawn_toml(a, &toml).await;
    for path in ["/admin/providers", "/admin/limits"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let (status, _) = app.chat(&chat_body("chat", "x")).await;
    assert_eq!(status, 200);
    let v = admin(&app, "/admin/providers").await;
    let d = &v["deployments"][0];
    for field in [
        "id",
        "circuit",
        "in_flight",
        "ewma_latency_ms",
        "error_rate",
        "pool",
    ] {
        assert!(d.get(field).is_some(), "missing {field}: {d}");
    }
    assert!(d["pool"].get("reuse_rate").is_some());
    let v = admin(&app, "/admin/limits").await;
    assert_eq!(v["global"]["max_concurrent"], 512);
}

/// One alias, one deployment whose provider runs two requests at a time, a 500 ms
/// upstream, a 2 s queue wait and 40 concurrent requests: a refused request must not
/// queue again on the same deployment after a backoff, so no request waits for admission
/// longer than one queue wait plus one backoff, and the rest are answered 429.
#[tokio::test]
async fn admission_waits_are_bounded_across_attempts() {
    let a = mock(MockConfig {
        latency_ms: 500,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let only_a = "[models.solo]\nprovider = \"a\"\n";
    let limits = "[admission]\nmax_queue_wait_ms = 2000\n\n[routing]\nbackoff_max = \"200ms\"\n";
    let mut toml = two_deployments(&a, &b, "max_concurrent = 2", only_a, limits);
    toml = toml.replace("request_timeout = \"5s\"", "request_timeout = \"60s\"");
    let app = TestApp::spawn_toml(a, &toml).await;
    let answers: Vec<(u16, bool, Duration)> = futures_util::future::join_all((0..40).map(|i| {
        let client = app.client.clone();
        let url = app.url("/v1/chat/completions");
        async move {
            let started = Instant::now();
            let r = client
                .post(url)
                .json(&chat_body("solo", &format!("bound {i}")))
                .send()
                .await
                .unwrap();
            let retry_after = r.headers().contains_key("retry-after");
            (r.status().as_u16(), retry_after, started.elapsed())
        }
    }))
    .await;
    let ok = answers.iter().filter(|(s, _, _)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s != 200).collect();
    assert!(
        refused.iter().all(|(s, ra, _)| *s == 429 && *ra),
        "refusals are 429 with Retry-After: {answers:?}"
    );
    // Two slots for 2 s of 500 ms calls: about ten requests fit in the wait, not 30.
    assert!((6..=12).contains(&ok), "{ok} answered: {answers:?}");
    assert_eq!(
        app.mock_stats().chat as usize,
        ok,
        "no hidden upstream calls"
    );
    // One queue wait (2 s) plus one backoff (0.2 s), with slack for a loaded machine.
    let longest = refused.iter().map(|(_, _, took)| *took).max().unwrap();
    assert!(
        longest < Duration::from_millis(3_500),
        "a refusal took {longest:?}"
    );
}

/// With the provider queue full, the only deployment answers 429 at once: the refused
/// requests are all answered before the first admitted one finishes.
#[tokio::test]
async fn a_full_queue_on_the_only_deployment_is_refused_at_once() {
    let a = mock(MockConfig {
        latency_ms: 1_000,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig::default()).await;
    let only_a = "[models.solo]\nprovider = \"a\"\n";
    let limits = "[admission]\nmax_queue = 3\nmax_queue_wait_ms = 5000\n";
    let toml = two_deployments(&a, &b, "max_concurrent = 2", only_a, limits);
    let app = TestApp::spawn_toml(a, &toml).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    for i in 0..20 {
        let client = app.client.clone();
        let url = app.url("/v1/chat/completions");
        let tx = tx.clone();
        tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&chat_body("solo", &format!("full {i}")))
                .send()
                .await
                .unwrap();
            let _ = tx.send(r.status().as_u16()).await;
        });
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(status) = rx.recv().await {
        order.push(status);
    }
    let ok = order.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 5, "two running and three queued: {order:?}");
    assert!(
        order[..15].iter().all(|s| *s == 429),
        "every refusal comes before the first answer: {order:?}"
    );
    assert_eq!(app.mock_stats().chat, 5);
}
