//! State: API keys, per-key limits and budgets, the usage log, on SQLite and on
//! PostgreSQL (`SWITCHYARD_TEST_POSTGRES_URL`), with limits in memory and in Redis
//! (`SWITCHYARD_TEST_REDIS_URL`). Every test runs against every store it can reach.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use switchyard_loadlab::mock::{MockConfig, MockServer};

const ADMIN: &str = "admin-state-test";

/// A database for one test: a fresh SQLite file, or a fresh schema in PostgreSQL.
#[derive(Clone, Debug)]
struct Db {
    kind: &'static str,
    /// The `[database]` table.
    toml: String,
}

fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand_suffix()
    )
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

fn sqlite() -> Db {
    let dir = std::env::temp_dir().join(unique("switchyard_state"));
    std::fs::create_dir_all(&dir).unwrap();
    Db {
        kind: "sqlite",
        toml: format!(
            "[database]\nurl = \"sqlite://{}\"\n",
            dir.join("sy.db").display()
        ),
    }
}

fn postgres() -> Option<Db> {
    let Ok(url) = std::env::var("SWITCHYARD_TEST_POSTGRES_URL") else {
        common::notice("SWITCHYARD_TEST_POSTGRES_URL is not set; PostgreSQL cases skipped");
        return None;
    };
    Some(Db {
        kind: "postgres",
        toml: format!(
            "[database]\nurl = \"{url}\"\nschema = \"{}\"\n",
            unique("sy_test")
        ),
    })
}

/// SQLite always; PostgreSQL when the environment provides it.
fn stores() -> Vec<Db> {
    let mut all = vec![sqlite()];
    all.extend(postgres());
    all
}

fn redis_url() -> Option<String> {
    let url = std::env::var("SWITCHYARD_TEST_REDIS_URL").ok();
    if url.is_none() {
        common::notice("SWITCHYARD_TEST_REDIS_URL is not set; Redis cases skipped");
    }
    url
}

/// The state tables: keys on, admin key set, a quick usage flush; `extra` adds tables.
fn state_tail(db: &Db, extra: &str) -> String {
    format!(
        "[auth]\nmode = \"keys\"\n[admin]\nkey = \"{ADMIN}\"\n{}\n[usage]\nflush_interval = \"50ms\"\n{extra}\n",
        db.toml
    )
}

async fn spawn_on(db: &Db, mock_config: MockConfig, extra: &str) -> TestApp {
    let m = mock(mock_config).await;
    spawn_with_mock(db, m, extra).await
}

async fn spawn_with_mock(db: &Db, m: MockServer, extra: &str) -> TestApp {
    let toml = config_for(&m, "", "", &state_tail(db, extra));
    TestApp::spawn_toml(m, &toml).await
}

/// Creates a key through the admin API and returns (secret, id).
async fn create_key(app: &TestApp, body: Value) -> (String, String) {
    let r = app
        .client
        .post(app.url("/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    )
}

async fn chat_as(app: &TestApp, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = app.client.post(app.url("/v1/chat/completions")).json(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_json(app: &TestApp, path: &str, key: &str) -> (u16, Value) {
    let r = app
        .client
        .get(app.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until the usage log holds `n` rows.
async fn wait_rows(app: &TestApp, n: i64) -> i64 {
    let mut rows = 0;
    for _ in 0..200 {
        rows = app.state.store.usage_rows().await.unwrap();
        if rows >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    rows
}

#[tokio::test]
async fn keys_authenticate_are_stored_hashed_and_revoke_at_once() {
    for db in stores() {
        let app = spawn_on(&db, MockConfig::default(), "").await;
        let body = chat_body("m", "hello");

        let (status, err) = chat_as(&app, None, &body).await;
        assert_eq!(status, 401, "{db:?}");
        assert_eq!(err["error"]["type"], "authentication_error");
        assert_eq!(err["error"]["code"], "invalid_api_key");
        let (status, _) = chat_as(&app, Some("sk-sy-not-a-real-key"), &body).await;
        assert_eq!(status, 401);
        let r = app.client.get(app.url("/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 401, "the model list needs a key too");

        let (secret, id) = create_key(&app, json!({"name": "alice"})).await;
        assert!(secret.starts_with("sk-sy-") && secret.len() >= 40);
        let (status, answer) = chat_as(&app, Some(&secret), &body).await;
        assert_eq!(status, 200, "{db:?}: {answer}");
        // Anthropic-style clients send the key as x-api-key.
        let r = app
            .client
            .post(app.url("/v1/chat/completions"))
            .header("x-api-key", &secret)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);

        // Only a hash is stored: the secret appears in no listing and no column.
        let (_, listed) = get_json(&app, "/admin/keys", ADMIN).await;
        let text = listed.to_string();
        assert!(text.contains(&id) && !text.contains(&secret[6..]), "{text}");
        let rows = app.state.store.list_keys().await.unwrap();
        let row = rows.iter().find(|k| k.id == id).unwrap();
        assert_eq!(row.hash, switchyard::auth::hash_secret(&secret));
        assert!(!format!("{row:?}").contains(&secret[6..]));
        assert!(secret.starts_with(&row.prefix));

        // A client key is not an admin key: authenticated, but not allowed.
        let (status, _) = get_json(&app, "/admin/keys", &secret).await;
        assert_eq!(status, 403);

        let r = app
            .client
            .delete(app.url(&format!("/admin/keys/{id}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let (status, _) = chat_as(&app, Some(&secret), &body).await;
        assert_eq!(status, 401, "{db:?}: a revoked key is refused at once");
        let r = app
            .client
            .delete(app.url(&format!("/admin/keys/{id}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "revoking twice");
    }
}

#[tokio::test]
async fn a_key_sees_only_its_models_and_its_own_usage() {
    for db in stores() {
        let app = spawn_on(&db, MockConfig::default(), "").await;
        let (alice, alice_id) = create_key(&app, json!({"name": "alice", "models": ["m"]})).await;
        let (bob, bob_id) = create_key(&app, json!({"name": "bob"})).await;

        let (status, err) = chat_as(&app, Some(&alice), &chat_body("claude", "hi")).await;
        assert_eq!(status, 404, "{db:?}: {err}");
        assert_eq!(err["error"]["code"], "model_not_found");
        let (_, models) = get_json(&app, "/v1/models", &alice).await;
        let ids: Vec<_> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, vec!["m"]);

        for _ in 0..3 {
            assert_eq!(
                chat_as(&app, Some(&alice), &chat_body("m", "a")).await.0,
                200
            );
        }
        for _ in 0..2 {
            assert_eq!(
                chat_as(&app, Some(&bob), &chat_body("claude", "b")).await.0,
                200
            );
        }
        // Alice's refused request is a row too (status 404).
        assert_eq!(wait_rows(&app, 6).await, 6, "{db:?}");

        let (status, mine) = get_json(&app, "/v1/usage?key=".to_owned().as_str(), &alice).await;
        assert_eq!(status, 200);
        let rows = mine["data"].as_array().unwrap();
        assert!(!rows.is_empty());
        assert!(
            rows.iter().all(|r| r["key_id"] == alice_id.as_str()),
            "{mine}"
        );
        let requests: i64 = rows.iter().map(|r| r["requests"].as_i64().unwrap()).sum();
        assert_eq!(requests, 4);
        // Asking for Bob's rows by id still returns Alice's own.
        let (_, spy) = get_json(&app, &format!("/v1/usage?key={bob_id}"), &alice).await;
        assert!(
            spy["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["key_id"] == alice_id.as_str()),
            "{spy}"
        );

        let (_, all) = get_json(&app, "/admin/usage", ADMIN).await;
        let rows = all["data"].as_array().unwrap();
        let bob_rows: Vec<_> = rows
            .iter()
            .filter(|r| r["key_id"] == bob_id.as_str())
            .collect();
        assert_eq!(bob_rows.len(), 1, "{all}");
        assert_eq!(bob_rows[0]["alias"], "claude");
        assert_eq!(bob_rows[0]["requests"], 2);
        assert!(bob_rows[0]["tokens_in"].as_i64().unwrap() > 0);
        assert_eq!(all["writer"]["dropped"], 0);
        let (_, filtered) = get_json(&app, &format!("/admin/usage?key={bob_id}"), ADMIN).await;
        assert_eq!(filtered["data"].as_array().unwrap().len(), 1);
        let (status, err) = get_json(&app, "/admin/usage?from=yesterday", ADMIN).await;
        assert_eq!(status, 400);
        assert_eq!(err["error"]["type"], "invalid_request_error");
        let (status, err) = get_json(&app, "/v1/usage?from=a&from=b", &alice).await;
        assert_eq!(status, 400, "a repeated parameter is a client error");
        assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
    }
}

/// Sends `n` identical requests at once and returns the status codes.
async fn burst(app: &TestApp, key: &str, body: &Value, n: usize) -> Vec<(u16, Value)> {
    let calls = (0..n).map(|_| chat_as(app, Some(key), body));
    futures_util::future::join_all(calls).await
}

/// The budget holds exactly ten of these requests: each reserves its body's bytes / 4
/// plus its `max_tokens`.
fn ten_request_budget(body: &Value) -> u64 {
    let len = serde_json::to_vec(body).unwrap().len() as u64;
    let per_request = len.div_ceil(4) + body["max_tokens"].as_u64().unwrap();
    10 * per_request + per_request / 2
}

async fn budget_admits_exactly_ten(db: &Db, extra: &str) {
    // Slow answers: all 100 are in flight together, so no settle frees room early.
    let app = spawn_on(
        db,
        MockConfig {
            latency_ms: 400,
            ..MockConfig::default()
        },
        extra,
    )
    .await;
    let mut body = chat_body("m", "budget");
    body["max_tokens"] = json!(50);
    let budget = ten_request_budget(&body);
    let (key, _) = create_key(
        &app,
        json!({"name": "budgeted", "budget_tokens": budget, "budget_period": "day"}),
    )
    .await;
    let results = burst(&app, &key, &body, 100).await;
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s == 429).collect();
    assert_eq!(ok, 10, "{} / {extra}: exactly ten fit the budget", db.kind);
    assert_eq!(refused.len(), 90);
    assert_eq!(refused[0].1["error"]["code"], "insufficient_quota");
    assert_eq!(
        app.mock_stats().chat,
        10,
        "refused requests never reach the upstream"
    );
}

#[tokio::test]
async fn a_budget_for_ten_admits_exactly_ten_of_a_hundred_concurrent_requests() {
    for db in stores() {
        budget_admits_exactly_ten(&db, "").await;
        if let Some(redis) = redis_url() {
            let prefix = unique("sy-budget");
            budget_admits_exactly_ten(
                &db,
                &format!("[redis]\nurl = \"{redis}\"\nkey_prefix = \"{prefix}:\"\n"),
            )
            .await;
        }
    }
}

#[tokio::test]
async fn a_budget_is_charged_real_usage_and_survives_a_restart() {
    let db = sqlite();
    let mut app = spawn_on(&db, MockConfig::default(), "").await;
    let body = chat_body("m", "count me");
    let (key, _) = create_key(
        &app,
        json!({"name": "small", "budget_tokens": 5000, "budget_period": "month"}),
    )
    .await;
    let (status, answer) = chat_as(&app, Some(&key), &body).await;
    assert_eq!(status, 200);
    let used = answer["usage"]["total_tokens"].as_i64().unwrap();
    assert!(used > 0);
    assert_eq!(wait_rows(&app, 1).await, 1);
    app.shutdown().await.unwrap();

    // A new process reads what the usage log says was spent this period.
    let m = mock(MockConfig::default()).await;
    let app = spawn_with_mock(&db, m, "").await;
    let (_, keys) = get_json(&app, "/admin/keys", ADMIN).await;
    let id = keys["data"][0]["id"].as_str().unwrap().to_owned();
    let spent = app.state.store.tokens_used_since(&id, 0).await.unwrap();
    assert_eq!(spent, used);
    // With 5000 - used left, a request reserving more than that is refused ...
    let mut big = body.clone();
    big["max_tokens"] = json!(5000 - used);
    let (status, err) = chat_as(&app, Some(&key), &big).await;
    assert_eq!(status, 429, "{err}");
    // ... and one that fits is admitted.
    let mut fits = body.clone();
    fits["max_tokens"] = json!(10);
    assert_eq!(chat_as(&app, Some(&key), &fits).await.0, 200);
}

#[tokio::test]
async fn request_and_token_rates_answer_429_with_retry_after() {
    let db = sqlite();
    let app = spawn_on(&db, MockConfig::default(), "").await;
    // 60 rpm: a burst of one, then one per second.
    let (key, _) = create_key(&app, json!({"name": "slow", "rpm": 60})).await;
    let body = chat_body("m", "rate");
    assert_eq!(chat_as(&app, Some(&key), &body).await.0, 200);
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests")
    );

    // 20 tpm: the first answer puts the key in debt for the rest of the minute.
    let (key, _) = create_key(&app, json!({"name": "tiny", "tpm": 20})).await;
    let mut results = Vec::new();
    for _ in 0..5 {
        results.push(chat_as(&app, Some(&key), &body).await);
    }
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    assert!((1..5).contains(&ok), "{results:?}");
    let refused = results.iter().find(|(s, _)| *s == 429).unwrap();
    assert!(
        refused.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens")
    );
}

/// Two instances on one Redis and one PostgreSQL: a key created on one works on the other,
/// and their combined admitted rate matches the key's one limit.
#[tokio::test]
async fn two_instances_share_one_rate_limit_through_redis() {
    let (Some(db), Some(redis)) = (postgres(), redis_url()) else {
        return;
    };
    let shared = format!(
        "[redis]\nurl = \"{redis}\"\nkey_prefix = \"{}:\"\n",
        unique("sy-shared")
    );
    let a = spawn_on(&db, MockConfig::default(), &shared).await;
    let b = spawn_on(&db, MockConfig::default(), &shared).await;
    // 3000 rpm = 50/s with a burst of 50, offered 200/s for 4 s across both instances.
    let (key, _) = create_key(&a, json!({"name": "shared", "rpm": 3000})).await;
    let body = chat_body("m", "shared");
    assert_eq!(
        chat_as(&b, Some(&key), &body).await.0,
        200,
        "B sees A's key"
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // let the burst refill

    let admitted = std::sync::Arc::new(AtomicU64::new(0));
    let offered = 800;
    let mut interval = tokio::time::interval(Duration::from_millis(5));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(offered);
    for i in 0..offered {
        interval.tick().await;
        let app = if i % 2 == 0 { &a } else { &b };
        let req = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body);
        let admitted = admitted.clone();
        handles.push(tokio::spawn(async move {
            let r = req.send().await.unwrap();
            if r.status() == 200 {
                admitted.fetch_add(1, Ordering::Relaxed);
            } else {
                assert_eq!(r.status(), 429);
            }
        }));
    }
    let elapsed = started.elapsed().as_secs_f64();
    for h in handles {
        h.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed) as f64;
    let expected = 50.0 + 50.0 * elapsed;
    let error = (admitted - expected).abs() / expected;
    eprintln!(
        "shared limit: admitted {admitted} of {offered} in {elapsed:.2}s, expected {expected:.0}"
    );
    assert!(
        error <= 0.05,
        "admitted {admitted}, expected {expected:.0} (error {:.1}%)",
        error * 100.0
    );
}

#[tokio::test]
async fn usage_rows_record_every_request_with_its_details() {
    for db in stores() {
        let app = spawn_on(&db, MockConfig::default(), "").await;
        let (key, key_id) = create_key(&app, json!({"name": "rows"})).await;
        assert_eq!(
            chat_as(&app, Some(&key), &chat_body("m", "one")).await.0,
            200
        );
        let mut stream = chat_body("m", "two");
        stream["stream"] = json!(true);
        let r = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&stream)
            .send()
            .await
            .unwrap();
        let events = sse_data(r).await;
        assert_eq!(events.last().unwrap(), "[DONE]");
        let r = app
            .client
            .post(app.url("/v1/embeddings"))
            .bearer_auth(&key)
            .json(&json!({"model": "m", "input": "three"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(wait_rows(&app, 3).await, 3, "{db:?}");
        let (_, usage) = get_json(&app, &format!("/admin/usage?key={key_id}"), ADMIN).await;
        let row = &usage["data"][0];
        assert_eq!(row["requests"], 3, "{usage}");
        assert!(
            row["tokens_out"].as_i64().unwrap() > 0,
            "streamed usage was recorded"
        );
        assert_eq!(row["errors"], 0);
        let (_, ready) = get_json(&app, "/ready", "").await;
        assert_eq!(ready["database"]["backend"], db.kind);
        assert_eq!(ready["database"]["status"], "ok");
        let metrics = app.metrics().await;
        assert!(metrics.contains("switchyard_db_query_duration_seconds"));
        assert!(metrics.contains("switchyard_usage_rows_written_total"));
    }
}

#[tokio::test]
async fn auth_none_is_refused_on_a_public_listener() {
    let err = switchyard::config::Settings::from_toml(
        "[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nmode = \"none\"\n",
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("auth.mode"), "{err}");
    assert!(
        switchyard::config::Settings::from_toml(
            "[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nmode = \"none\"\nallow_none_on_public_listener = true\n",
            &|_| None,
        )
        .is_ok()
    );
    assert!(
        switchyard::config::Settings::from_toml(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[auth]\nmode = \"none\"\n",
            &|_| None
        )
        .is_ok()
    );
}

/// SIGTERM under load: every request that got an answer has its usage row, written by the
/// shutdown flush (the writer's interval and batch are too large to have written them).
#[tokio::test]
async fn every_usage_row_is_written_after_sigterm_under_load() {
    switchyard::app::install_crypto();
    for db in stores() {
        let m = mock(MockConfig {
            latency_ms: 100,
            ..MockConfig::default()
        })
        .await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("switchyard_sigterm"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("switchyard.toml");
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"10s\"\n\
             [auth]\nmode = \"none\"\n{}\n\
             [usage]\nflush_interval = \"1h\"\nbatch_rows = 4096\n\
             [providers.mock]\nkind = \"openai\"\nbase_url = \"{}\"\n[models.m]\nprovider = \"mock\"\n",
            db.toml,
            m.base_url()
        );
        std::fs::write(&path, &toml).unwrap();
        let mut child = serve_binary(&path);
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let mut ready = false;
        for _ in 0..400 {
            if client
                .get(format!("{base}/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(ready, "{db:?}");

        let answered = std::sync::Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..16)
            .map(|_| {
                let client = client.clone();
                let url = format!("{base}/v1/chat/completions");
                let answered = answered.clone();
                tokio::spawn(async move {
                    // Bounded: at most 200 requests per worker, stopping at the first
                    // refused connection once the server has closed.
                    for _ in 0..200 {
                        match client.post(&url).json(&chat_body("m", "load")).send().await {
                            Ok(r) => {
                                let _ = r.bytes().await;
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let pid = child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{db:?}: exit {status:?}");
        for w in workers {
            w.await.unwrap();
        }
        let answered = answered.load(Ordering::Relaxed) as i64;
        assert!(answered > 16, "{db:?}: load ran ({answered} answers)");

        let settings = switchyard::config::Settings::from_toml(&toml, &|_| None).unwrap();
        let store = switchyard::store::Store::connect(&settings.database)
            .await
            .unwrap();
        let rows = store.usage_rows().await.unwrap();
        store.close().await;
        assert_eq!(rows, answered, "{db:?}: one row per answered request");
    }
}

#[tokio::test]
async fn admin_routes_tell_a_client_key_403_and_nobody_401() {
    let db = sqlite();
    let app = spawn_on(&db, MockConfig::default(), "").await;
    let (key, _) = create_key(&app, json!({"name": "client"})).await;
    let (status, err) = get_json(&app, "/admin/keys", &key).await;
    assert_eq!(status, 403, "{err}");
    assert_eq!(err["error"]["code"], "not_admin");
    let (status, err) = get_json(&app, "/admin/keys", "sk-sy-not-a-key").await;
    assert_eq!(status, 401, "{err}");
    let r = app
        .client
        .get(app.url("/admin/usage"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The dashboard's pages carry the headers that keep them out of frames and sniffing.
    let r = app.client.get(app.url("/dashboard")).send().await.unwrap();
    let headers = r.headers();
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
}

/// `kill -9` cannot flush the usage log: the rows still queued are lost. The loss is
/// bounded by one flush interval of traffic when the database keeps up: every request
/// answered more than a flush interval (plus one write) before the kill has its row.
#[tokio::test]
async fn kill_9_loses_at_most_the_last_flush_interval_of_usage_rows() {
    switchyard::app::install_crypto();
    for db in stores() {
        let m = mock(MockConfig::default()).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("switchyard_kill9"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("switchyard.toml");
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [auth]\nmode = \"none\"\n{}\n\
             [usage]\nflush_interval = \"200ms\"\n\
             [providers.mock]\nkind = \"openai\"\nbase_url = \"{}\"\n[models.m]\nprovider = \"mock\"\n",
            db.toml,
            m.base_url()
        );
        std::fs::write(&path, &toml).unwrap();
        let mut child = serve_binary(&path);
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok())
            .await
        );
        // Bounded load: one request after another for 1.5 s, each answer timed.
        let url = format!("{base}/v1/chat/completions");
        let start = std::time::Instant::now();
        let mut answered_at = Vec::new();
        while start.elapsed() < Duration::from_millis(1500) {
            let r = client
                .post(&url)
                .json(&chat_body("m", "row"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            answered_at.push(std::time::Instant::now());
        }
        let killed_at = std::time::Instant::now();
        child.start_kill().unwrap();
        child.wait().await.unwrap();

        let settings = switchyard::config::Settings::from_toml(&toml, &|_| None).unwrap();
        let store = switchyard::store::Store::connect(&settings.database)
            .await
            .unwrap();
        let rows = store.usage_rows().await.unwrap() as usize;
        store.close().await;
        let answered = answered_at.len();
        // Rows older than one flush interval plus a generous write time were due to be
        // written before the kill.
        let due = answered_at
            .iter()
            .filter(|t| killed_at.duration_since(**t) > Duration::from_millis(200 + 300))
            .count();
        assert!(
            rows >= due && rows <= answered,
            "{db:?}: {rows} rows for {answered} answers, {due} of them due before the kill"
        );
        assert!(due > 0, "{db:?}: the load ran long enough to have due rows");
        eprintln!(
            "{}: kill -9 after {answered} answers: {rows} rows written",
            db.kind
        );
    }
}

/// A conversation turn is stored before `response.completed` is sent: `kill -9` the
/// instant the client has read it, and every item of the turn is in the store.
#[tokio::test]
async fn kill_9_after_response_completed_keeps_every_item_of_the_turn() {
    switchyard::app::install_crypto();
    for db in stores() {
        let m = mock(MockConfig::default()).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("switchyard_kill9_turn"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("switchyard.toml");
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [auth]\nmode = \"none\"\n{}\n\
             [providers.mock]\nkind = \"openai\"\nbase_url = \"{}\"\n[models.m]\nprovider = \"mock\"\n",
            db.toml,
            m.base_url()
        );
        std::fs::write(&path, &toml).unwrap();
        let mut child = serve_binary(&path);
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok())
            .await
        );
        let conversation: Value = client
            .post(format!("{base}/v1/conversations"))
            .json(&json!({"items": [{"role": "user", "content": "before"}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let conversation = conversation["id"].as_str().unwrap().to_owned();
        let stream = client
            .post(format!("{base}/v1/responses"))
            .json(
                &json!({"model": "m", "input": "durable words", "stream": true,
                          "conversation": conversation}),
            )
            .send()
            .await
            .unwrap();
        // Read until response.completed, then kill at once.
        let mut body = stream.bytes_stream();
        let mut text = String::new();
        let mut completed = None;
        while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if let Some(at) = text.find("event: response.completed\ndata: ") {
                let rest = &text[at + "event: response.completed\ndata: ".len()..];
                if let Some(end) = rest.find("\n\n") {
                    completed = Some(serde_json::from_str::<Value>(&rest[..end]).unwrap());
                    break;
                }
            }
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        let completed = completed.expect("response.completed arrived");
        let response = &completed["response"];
        let id = response["id"].as_str().unwrap();
        let output_id = response["output"][0]["id"].as_str().unwrap();

        let settings = switchyard::config::Settings::from_toml(&toml, &|_| None).unwrap();
        let store = switchyard::store::Store::connect(&settings.database)
            .await
            .unwrap();
        let row = store.response(None, id).await.unwrap();
        assert_eq!(
            row.map(|r| r.status).as_deref(),
            Some("completed"),
            "{db:?}"
        );
        let page = switchyard::store::conversations::Page {
            after: None,
            limit: 100,
            order: switchyard::store::conversations::Order::Asc,
        };
        let (items, _) = store
            .conversation_items(None, &conversation, &page)
            .await
            .unwrap()
            .unwrap();
        let kinds: Vec<(&str, &str)> = items
            .iter()
            .map(|i| (i.kind.as_str(), i.item_type.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("input", "message"),
                ("input", "message"),
                ("output", "message")
            ],
            "{db:?}"
        );
        assert_eq!(items[2].id, output_id);
        assert!(items[2].body.contains("durable words"));
        store.close().await;
    }
}

#[tokio::test]
async fn dashboard_sign_in_is_throttled_per_address() {
    let db = sqlite();
    let app = spawn_on(&db, MockConfig::default(), "").await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let attempt = |key: &'static str| {
        let client = client.clone();
        let url = app.url("/dashboard/login");
        async move {
            client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("key={key}"))
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..10 {
        assert_eq!(
            attempt("wrong").await.status(),
            401,
            "a wrong key, within the limit"
        );
    }
    let refused = attempt("wrong").await;
    assert_eq!(refused.status(), 429, "the eleventh guess in a minute");
    assert_eq!(refused.headers()["retry-after"], "60");
    assert_eq!(
        attempt(ADMIN).await.status(),
        429,
        "even the right key waits out the window"
    );
}
