//! Background responses end to end: the real app (or the real binary, where it is killed)
//! in front of the real mock over real HTTP, every scenario on SQLite and, when
//! `SWITCHYARD_TEST_POSTGRES_URL` is set, on PostgreSQL in a fresh schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;

struct Env {
    app: TestApp,
    dir: Option<PathBuf>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn spawn(db: Db, upstream: MockConfig, tail: &str) -> Option<Env> {
    let (database, dir) = database(db, "jobs")?;
    let upstream = mock(upstream).await;
    let toml = config_for(&upstream, "", "", &format!("{database}{tail}"));
    Some(Env {
        app: TestApp::spawn_toml(upstream, &toml).await,
        dir,
    })
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = app.client.request(method, app.url(path));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn create(app: &TestApp, text: &str) -> Value {
    let (status, body) = send(
        app,
        reqwest::Method::POST,
        "/v1/responses",
        Some(json!({"model": "m", "input": text, "background": true})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn read(app: &TestApp, id: &str) -> Value {
    let (status, body) = send(
        app,
        reqwest::Method::GET,
        &format!("/v1/responses/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls a response until its status is `want`.
async fn wait_status(app: &TestApp, id: &str, want: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..400 {
        last = read(app, id).await;
        if last["status"] == want {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{id} never became {want}: {last}");
}

/// Queued at once, then run by a worker: the stored result reads back complete, with its
/// input items, and the model was called once.
async fn completes_and_reads_back(db: Db) {
    let Some(env) = spawn(db, MockConfig::default(), "").await else {
        return;
    };
    let app = &env.app;
    let queued = create(app, "Say hello in the background").await;
    let id = queued["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("resp_"), "{queued}");
    assert_eq!(queued["object"], "response");
    assert_eq!(queued["background"], true);
    assert!(
        queued["status"] == "queued" || queued["status"] == "in_progress",
        "{queued}"
    );
    assert_eq!(queued["output"], json!([]));
    let done = wait_status(app, &id, "completed").await;
    assert_eq!(done["id"], id.as_str());
    assert_eq!(done["background"], true);
    assert_eq!(done["created_at"], queued["created_at"]);
    assert_eq!(done["output"][0]["type"], "message", "{done}");
    assert!(done["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let (status, items) = send(
        app,
        reqwest::Method::GET,
        &format!("/v1/responses/{id}/input_items"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(items["data"].as_array().unwrap().len(), 1, "{items}");
    assert_eq!(app.mock_stats().chat, 1);
    // A follow-up turn chains on it like on any stored response.
    let (status, next) = send(
        app,
        reqwest::Method::POST,
        "/v1/responses",
        Some(json!({"model": "m", "input": "And again", "previous_response_id": id})),
    )
    .await;
    assert_eq!(status, 200, "{next}");
    let sent = app.upstream_last_request().await;
    assert_eq!(sent["messages"].as_array().unwrap().len(), 3, "{sent}");
    // Cancelling what finished changes nothing.
    let (status, again) = send(
        app,
        reqwest::Method::POST,
        &format!("/v1/responses/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again["status"], "completed");
    assert_eq!(app.state.jobs.figures.completed.load(Ordering::Relaxed), 1);
}

/// A running job is stopped by a cancel: the upstream call is dropped (the mock counts
/// it), the response reads `cancelled` and stays so. A queued one is cancelled before it
/// ever reaches the model.
async fn cancel_stops_the_work(db: Db) {
    let slow = MockConfig {
        latency_ms: 20_000,
        ..MockConfig::default()
    };
    let Some(env) = spawn(db, slow, "[jobs]\nworkers = 1\n").await else {
        return;
    };
    let app = &env.app;
    let first = create(app, "A long one").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_status(app, &first, "in_progress").await;
    assert!(eventually(Duration::from_secs(5), || app.mock_stats().chat == 1).await);
    // The only worker is busy: the second waits in the queue.
    let second = create(app, "Never run").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(read(app, &second).await["status"], "queued");
    let (status, cancelled) = send(
        app,
        reqwest::Method::POST,
        &format!("/v1/responses/{second}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");

    let (status, cancelled) = send(
        app,
        reqwest::Method::POST,
        &format!("/v1/responses/{first}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(
        eventually(Duration::from_secs(5), || app.mock_stats().cancelled >= 1).await,
        "the upstream call was not dropped"
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(read(app, &first).await["status"], "cancelled");
    assert_eq!(read(app, &second).await["status"], "cancelled");
    assert_eq!(app.mock_stats().chat, 1, "the queued one never ran");
}

/// Mistakes are 400s in the OpenAI shape, before anything is stored.
async fn refusals(db: Db) {
    let Some(env) = spawn(db, MockConfig::default(), "").await else {
        return;
    };
    let app = &env.app;
    for (body, param) in [
        (
            json!({"model": "m", "input": "x", "background": true, "store": false}),
            "store",
        ),
        (
            json!({"model": "m", "input": "x", "background": "yes"}),
            "background",
        ),
    ] {
        let (status, err) = send(app, reqwest::Method::POST, "/v1/responses", Some(body)).await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["param"], param, "{err}");
    }
    let (status, fg) = send(
        app,
        reqwest::Method::POST,
        "/v1/responses",
        Some(json!({"model": "m", "input": "foreground"})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, err) = send(
        app,
        reqwest::Method::POST,
        &format!("/v1/responses/{}/cancel", fg["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(app.mock_stats().chat, 1);
}

/// Another key's background response is a 404 to read, follow or cancel, and the job
/// runs under the key that created it.
async fn keys_do_not_share(db: Db) {
    let slow = MockConfig {
        latency_ms: 1_000,
        ..MockConfig::default()
    };
    let Some(env) = spawn(
        db,
        slow,
        "[admin]\nkey = \"jobs-admin\"\n[auth]\nmode = \"keys\"\n",
    )
    .await
    else {
        return;
    };
    let app = &env.app;
    let mut keys = Vec::new();
    for name in ["alice", "bob"] {
        let response = app
            .client
            .post(app.url("/admin/keys"))
            .bearer_auth("jobs-admin")
            .json(&json!({"name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let key: Value = response.json().await.unwrap();
        keys.push(key["key"].as_str().unwrap().to_owned());
    }
    let as_key = |key: &str, method: reqwest::Method, path: &str| {
        app.client
            .request(method, app.url(path))
            .bearer_auth(key.to_owned())
    };
    let queued: Value = as_key(&keys[0], reqwest::Method::POST, "/v1/responses")
        .json(&json!({"model": "m", "input": "mine", "background": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = queued["id"].as_str().unwrap().to_owned();
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/responses/{id}")),
        (
            reqwest::Method::GET,
            format!("/v1/responses/{id}?stream=true"),
        ),
        (reqwest::Method::POST, format!("/v1/responses/{id}/cancel")),
    ] {
        let status = as_key(&keys[1], method, &path)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404, "{path}");
    }
    let mut done = Value::Null;
    for _ in 0..200 {
        done = as_key(
            &keys[0],
            reqwest::Method::GET,
            &format!("/v1/responses/{id}"),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        if done["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(done["status"], "completed", "{done}");
    // The job's model call is on the creating key's usage, not on another's.
    let usage_of = |key: &str| as_key(key, reqwest::Method::GET, "/v1/usage").send();
    let mut usage = Value::Null;
    for _ in 0..100 {
        usage = usage_of(&keys[0]).await.unwrap().json().await.unwrap();
        if usage.to_string().contains("\"m\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(usage.to_string().contains("\"m\""), "{usage}");
    let other: Value = usage_of(&keys[1]).await.unwrap().json().await.unwrap();
    assert!(!other.to_string().contains("\"m\""), "{other}");
}

/// `/admin/jobs`: the operator lists a failed job, reads it, and retries it to completion.
async fn operators_steer_jobs(db: Db) {
    let failing = MockConfig {
        fail_rate: 1.0,
        ..MockConfig::default()
    };
    let Some(env) = spawn(
        db,
        failing,
        "[admin]\nkey = \"jobs-admin\"\n[jobs]\nmax_attempts = 1\n",
    )
    .await
    else {
        return;
    };
    let app = &env.app;
    let admin = |method: reqwest::Method, path: &str| {
        app.client
            .request(method, app.url(path))
            .bearer_auth("jobs-admin")
    };
    let id = create(app, "fail first").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = wait_status(app, &id, "failed").await;
    assert!(failed["error"]["message"].is_string(), "{failed}");
    let list: Value = admin(reqwest::Method::GET, "/admin/jobs?status=failed&limit=5")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["id"], id.as_str(), "{list}");
    assert_eq!(list["data"][0]["kind"], "response");
    assert!(list["data"][0]["error"].is_string(), "{list}");
    assert!(
        list["data"][0].get("payload").is_none(),
        "the request stays private"
    );
    let bad = admin(reqwest::Method::GET, "/admin/jobs?status=lost")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let missing = admin(reqwest::Method::GET, "/admin/jobs/resp_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let client_side = app.client.get(app.url("/admin/jobs")).send().await.unwrap();
    assert_eq!(client_side.status(), 401);

    app.mock.state.set_config(MockConfig::default());
    let retried: Value = admin(reqwest::Method::POST, &format!("/admin/jobs/{id}/retry"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(retried["id"], id.as_str(), "{retried}");
    let done = wait_status(app, &id, "completed").await;
    assert_eq!(done["output"][0]["type"], "message", "{done}");
    // Nothing left to retry; cancelling a finished job leaves it.
    let again = admin(reqwest::Method::POST, &format!("/admin/jobs/{id}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 400);
    let job: Value = admin(reqwest::Method::POST, &format!("/admin/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "completed", "{job}");
}

/// `kill -9` of the instance running a job: after a restart the job is claimed again once
/// its lease ran out and completes, its result stored once.
async fn killed_mid_job(db: Db) {
    let Some((database, dir)) = database(db, "jobs") else {
        return;
    };
    let upstream = mock(MockConfig {
        latency_ms: 20_000,
        ..MockConfig::default()
    })
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config_dir = std::env::temp_dir().join(unique("switchyard_jobs_crash"));
    std::fs::create_dir_all(&config_dir).unwrap();
    let path = config_dir.join("sy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[auth]\nmode = \"none\"\n{database}\
             [providers.mock]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"x\"\n\
             [models.m]\nprovider = \"mock\"\nmodel = \"mock-model\"\n\
             [jobs]\nlease = \"3s\"\n",
            upstream.base_url()
        ),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let ready = || async {
        for _ in 0..400 {
            if client
                .get(format!("{base}/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the server never became ready");
    };
    let status = |id: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let body: Value = client
                .get(format!("{base}/v1/responses/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body
        }
    };
    let mut server = serve_binary(&path);
    ready().await;
    let queued: Value = client
        .post(format!("{base}/v1/responses"))
        .json(&json!({"model": "m", "input": "survive this", "background": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = queued["id"].as_str().unwrap().to_owned();
    let mut running = false;
    for _ in 0..200 {
        if status(id.clone()).await["status"] == "in_progress" && upstream.stats().chat >= 1 {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(running, "the job never started");
    server.start_kill().unwrap();
    server.wait().await.unwrap();
    upstream.state.set_config(MockConfig::default());

    let mut server = serve_binary(&path);
    ready().await;
    let mut done = Value::Null;
    for _ in 0..400 {
        done = status(id.clone()).await;
        if done["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"].as_array().unwrap().len(), 1, "{done}");
    let items: Value = client
        .get(format!("{base}/v1/responses/{id}/input_items"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(items["data"].as_array().unwrap().len(), 1, "{items}");
    assert_eq!(
        upstream.stats().chat,
        2,
        "one cut short, one run to its end"
    );
    server.start_kill().unwrap();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&config_dir);
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Reads SSE events (their `data` as JSON) until the body ends or `limit` were read;
/// then the connection is dropped.
async fn events(response: reqwest::Response, limit: usize) -> Vec<Value> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = response.bytes_stream();
    while out.len() < limit {
        let Some(chunk) = body.next().await else {
            break;
        };
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let kind = frame.lines().find_map(|l| l.strip_prefix("event: "));
            let data = frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap();
            let data: Value = serde_json::from_str(data).unwrap();
            assert_eq!(kind, data["type"].as_str(), "event line and type agree");
            out.push(data);
            if out.len() == limit {
                break;
            }
        }
    }
    out
}

/// A streamed background response: the creating request follows the stored events; a
/// client that drops the connection resumes with `starting_after` and gets every later
/// event exactly once, in order, up to `response.completed`.
async fn stream_resumes(db: Db) {
    let paced = MockConfig {
        chunks: 12,
        chunk_interval_ms: 60,
        ..MockConfig::default()
    };
    let Some(env) = spawn(db, paced, "").await else {
        return;
    };
    let app = &env.app;
    let response = app
        .client
        .post(app.url("/v1/responses"))
        .json(
            &json!({"model": "m", "input": "one two three four five six seven eight nine ten",
            "background": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = events(response, 4).await;
    assert_eq!(first.len(), 4, "{first:?}");
    assert_eq!(first[0]["type"], "response.created");
    let id = first[0]["response"]["id"].as_str().unwrap().to_owned();
    let seen = first[3]["sequence_number"].as_u64().unwrap();
    let rest = app
        .client
        .get(app.url(&format!(
            "/v1/responses/{id}?stream=true&starting_after={seen}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 200);
    let rest = events(rest, usize::MAX).await;
    let all: Vec<&Value> = first.iter().chain(&rest).collect();
    for (n, event) in all.iter().enumerate() {
        assert_eq!(event["sequence_number"], n as u64, "{event}");
    }
    let last = all.last().unwrap();
    assert_eq!(last["type"], "response.completed", "{last}");
    let text: String = all
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "one two three four five six seven eight nine ten");
    assert_eq!(read(app, &id).await["status"], "completed");
    // Read again from the start once it ended: the same events.
    let again = app
        .client
        .get(app.url(&format!("/v1/responses/{id}?stream=true")))
        .send()
        .await
        .unwrap();
    assert_eq!(events(again, usize::MAX).await.len(), all.len());
    assert_eq!(app.mock_stats().chat, 1);
}

/// A streamed background response that fails tells its follower: the stream ends with
/// `error` and `response.failed`, and the response reads failed.
async fn failed_stream_says_so(db: Db) {
    let failing = MockConfig {
        fail_rate: 1.0,
        ..MockConfig::default()
    };
    let Some(env) = spawn(db, failing, "[jobs]\nmax_attempts = 1\n").await else {
        return;
    };
    let app = &env.app;
    let response = app
        .client
        .post(app.url("/v1/responses"))
        .json(&json!({"model": "m", "input": "doomed", "background": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = events(response, usize::MAX).await;
    let kinds: Vec<&str> = seen.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["error", "response.failed"], "{seen:?}");
    assert_eq!(seen[0]["sequence_number"], 0);
    let id = seen[1]["response"]["id"].as_str().unwrap();
    assert_eq!(read(app, id).await["status"], "failed");
}

/// Two instances on one PostgreSQL database share a queue: 5,000 jobs queued through
/// both, each run exactly once (counted at the mock).
#[tokio::test]
async fn two_instances_run_every_job_once() {
    let Some((database, _)) = database(Db::Postgres, "jobs") else {
        return;
    };
    let upstream = mock(MockConfig::default()).await;
    let toml = config_for(&upstream, "", "", &database);
    let a = TestApp::spawn_toml(mock(MockConfig::default()).await, &toml).await;
    let b = TestApp::spawn_toml(mock(MockConfig::default()).await, &toml).await;
    const JOBS: usize = 5_000;
    let mut ids = Vec::with_capacity(JOBS);
    for chunk in 0..JOBS / 50 {
        let posts = (0..50).map(|i| {
            let app = if (chunk + i) % 2 == 0 { &a } else { &b };
            create(app, "count me once")
        });
        for queued in futures_util::future::join_all(posts).await {
            ids.push(queued["id"].as_str().unwrap().to_owned());
        }
    }
    let finished = |app: &TestApp| app.state.jobs.figures.completed.load(Ordering::Relaxed);
    let mut all = false;
    for _ in 0..3_600 {
        if finished(&a) + finished(&b) >= JOBS as u64 {
            all = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(all, "completed {} + {}", finished(&a), finished(&b));
    assert_eq!(
        upstream.stats().chat,
        JOBS as u64,
        "every job called the model once"
    );
    assert!(
        finished(&a) > 0 && finished(&b) > 0,
        "both instances worked"
    );
    for id in ids.iter().step_by(97) {
        assert_eq!(read(&a, id).await["status"], "completed");
    }
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Db::Sqlite).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$name(super::Db::Postgres).await;
            }
        }
    )*};
}

scenarios! {
    completes_and_reads_back,
    cancel_stops_the_work,
    refusals,
    killed_mid_job,
    stream_resumes,
    keys_do_not_share,
    operators_steer_jobs,
    failed_stream_says_so,
}
