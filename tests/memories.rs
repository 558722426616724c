//! Long-term memory end to end: the real app in front of the real mock over real HTTP,
//! every scenario on SQLite and, when `SWITCHYARD_TEST_POSTGRES_URL` is set, on
//! PostgreSQL in a fresh schema. Extraction runs on a second mock (the simulated
//! extractor), so the turn mock's `/last-request` is always the turn's own call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use switchyard_loadlab::mock::{MockConfig, MockServer};

const ADMIN: &str = "admin-memories-test";

struct Env {
    app: TestApp,
    extractor: MockServer,
    dir: Option<PathBuf>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Alias `mem`: memory on, a 520-token window (100 kept for the answer); alias `m` has
/// memory off. Extraction on alias `extract`, served by its own mock.
async fn spawn(db: Db, memory: &str, auth: &str, extractor: MockConfig) -> Option<Env> {
    let (database, dir) = database(db, "memories")?;
    let extractor = mock(extractor).await;
    let upstream = mock(MockConfig::default()).await;
    let tail = format!(
        "[admin]\nkey = \"{ADMIN}\"\n{database}{auth}\
         [providers.extractor]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"x\"\n\
         [models.extract]\nprovider = \"extractor\"\nmodel = \"extractor-model\"\n\
         [models.mem]\nprovider = \"mock\"\nmodel = \"mock-model\"\nmemory = true\n\
         context_window = 520\nmax_output_tokens = 100\ntokenizer = \"approx\"\n\
         [memory]\nextraction_model = \"extract\"\n{memory}\n",
        extractor.base_url()
    );
    let toml = config_for(&upstream, "", "", &tail);
    let app = TestApp::spawn_toml(upstream, &toml).await;
    Some(Env {
        app,
        extractor,
        dir,
    })
}

async fn call(
    app: &TestApp,
    key: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = app.client.request(method.clone(), app.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{method} {path} answered {status}, not JSON: {text}"));
    (status, value)
}

async fn post(app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    call(app, None, Method::POST, path, Some(body)).await
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    call(app, None, Method::GET, path, None).await
}

/// The user's memories' texts, newest first.
async fn memories_of(app: &TestApp, key: Option<&str>, user: &str) -> Vec<String> {
    let (status, list) = call(
        app,
        key,
        Method::GET,
        &format!("/v1/memories?user={user}&limit=100"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["memory"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the user's memories satisfy `check`.
async fn wait_for_memories(app: &TestApp, user: &str, check: impl Fn(&[String]) -> bool) {
    for _ in 0..200 {
        if check(&memories_of(app, None, user).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the memories of {user} never got there: {:?}",
        memories_of(app, None, user).await
    );
}

/// The system messages the turn's model call carried.
async fn upstream_system_text(app: &TestApp) -> String {
    let sent = app.upstream_last_request().await;
    sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "system")
        .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// `/v1/memories`: store without inference, read, search best first, rewrite with a
/// history row, delete one, delete a user's, and errors in the OpenAI shape.
async fn api_round_trip(db: Db) {
    let Some(env) = spawn(db, "", "", MockConfig::default()).await else {
        return;
    };
    let app = &env.app;
    let (status, added) = post(
        app,
        "/v1/memories",
        &json!({"user": "ada", "infer": false, "metadata": {"source": "import"},
        "messages": [
            {"role": "user", "content": "Ada loves hiking in the Alps"},
            {"role": "user", "content": "Ada is allergic to peanuts"},
            {"role": "user", "content": [{"type": "input_text", "text": "Ada works as a nurse"}]}
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    let data = added["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[0]["object"], "memory");
    assert_eq!(data[0]["metadata"]["source"], "import");
    let allergy = data[1]["id"].as_str().unwrap().to_owned();

    let (status, found) = post(
        app,
        "/v1/memories/search",
        &json!({"user": "ada", "query": "Is she allergic to anything?", "limit": 2}),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["data"][0]["id"], allergy.as_str(), "{found}");
    assert!(found["data"][0]["score"].as_f64().unwrap() > 0.0);
    assert!(found["data"].as_array().unwrap().len() <= 2);

    let (status, one) = get(app, &format!("/v1/memories/{allergy}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["memory"], "Ada is allergic to peanuts");

    let (status, updated) = call(
        app,
        None,
        Method::PUT,
        &format!("/v1/memories/{allergy}"),
        Some(&json!({"memory": "Ada is allergic to peanuts and shellfish"})),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        updated["memory"],
        "Ada is allergic to peanuts and shellfish"
    );
    // The search sees the rewrite at once.
    let (_, found) = post(
        app,
        "/v1/memories/search",
        &json!({"user": "ada", "query": "shellfish"}),
    )
    .await;
    assert_eq!(found["data"][0]["id"], allergy.as_str(), "{found}");

    let (status, history) = get(app, &format!("/v1/memories/{allergy}/history")).await;
    assert_eq!(status, 200);
    let events: Vec<&str> = history["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, vec!["ADD", "UPDATE"]);
    assert_eq!(
        history["data"][1]["old_memory"],
        "Ada is allergic to peanuts"
    );

    // Pages, newest first.
    let (_, page) = get(app, "/v1/memories?user=ada&limit=2").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["data"][0]["memory"], "Ada works as a nurse");
    let last = page["last_id"].as_str().unwrap();
    let (_, rest) = get(app, &format!("/v1/memories?user=ada&limit=2&after={last}")).await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["has_more"], false);

    let (status, deleted) = call(
        app,
        None,
        Method::DELETE,
        &format!("/v1/memories/{allergy}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(deleted["deleted"], true);
    let (status, gone) = get(app, &format!("/v1/memories/{allergy}")).await;
    assert_eq!(status, 404);
    assert_eq!(gone["error"]["type"], "invalid_request_error", "{gone}");
    let (_, history) = get(app, &format!("/v1/memories/{allergy}/history")).await;
    assert_eq!(
        history["data"].as_array().unwrap().len(),
        3,
        "kept after delete"
    );

    let (status, cleared) = call(app, None, Method::DELETE, "/v1/memories?user=ada", None).await;
    assert_eq!(status, 200);
    assert_eq!(cleared["deleted"], 2);
    assert!(memories_of(app, None, "ada").await.is_empty());

    // Client mistakes: 400 in the OpenAI shape, nothing stored.
    for (body, param) in [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "user",
        ),
        (json!({"user": "ada", "infer": false}), "messages"),
        (
            json!({"user": "ada", "infer": false, "messages": []}),
            "messages",
        ),
        (
            json!({"user": "ada", "infer": false, "messages": [{"role": "robot", "content": "x"}]}),
            "messages",
        ),
        (
            json!({"user": "ada", "infer": false, "messages": [{"role": "user", "content": 5}]}),
            "messages",
        ),
        (
            json!({"user": "", "infer": false, "messages": [{"role": "user", "content": "x"}]}),
            "user",
        ),
        (
            json!({"user": "ada", "infer": "yes", "messages": [{"role": "user", "content": "x"}]}),
            "infer",
        ),
    ] {
        let (status, error) = post(app, "/v1/memories", &body).await;
        assert_eq!(status, 400, "{body} → {error}");
        assert_eq!(error["error"]["param"], param, "{body} → {error}");
    }
    let (status, error) = post(
        app,
        "/v1/memories/search",
        &json!({"user": "ada", "query": "x", "limit": 0}),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    let (status, _) = call(app, None, Method::DELETE, "/v1/memories", None).await;
    assert_eq!(status, 400);
    assert!(memories_of(app, None, "ada").await.is_empty());
}

/// A fact stated in turn 1 reaches the model at turn 40, after truncation dropped turn 1;
/// a later move replaces it (with a history row); another user sees none of it.
async fn turns_remember(db: Db) {
    let Some(env) = spawn(db, "every = 1\n", "", MockConfig::default()).await else {
        return;
    };
    let app = &env.app;
    let (status, conversation) = post(
        app,
        "/v1/conversations",
        &json!({"metadata": {"user": "ada"}}),
    )
    .await;
    assert_eq!(status, 200, "{conversation}");
    let conv = conversation["id"].as_str().unwrap().to_owned();
    let turn = |input: &str| json!({"model": "mem", "conversation": conv, "input": input, "truncation": "auto"});
    let (status, first) = post(
        app,
        "/v1/responses",
        &turn("Hi! My name is Ada and I live in Paris."),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert!(first["metadata"].get("memory").is_none(), "{first}");
    wait_for_memories(app, "ada", |m| m.iter().any(|t| t == "Lives in Paris")).await;

    let filler = "Tell me something about the history of tea trading routes across the \
                  old world and how the ships and caravans carried it between the ports.";
    for _ in 2..40 {
        let (status, response) = post(app, "/v1/responses", &turn(filler)).await;
        assert_eq!(status, 200, "{response}");
    }
    let (status, _) = post(app, "/v1/responses", &turn("Remind me: where do I live?")).await;
    assert_eq!(status, 200);
    let sent = app.upstream_last_request().await;
    let all = sent["messages"].to_string();
    assert!(
        !all.contains("My name is Ada"),
        "turn 1 was truncated away: {all}"
    );
    let system = upstream_system_text(app).await;
    assert!(system.contains("Lives in Paris"), "{system}");
    assert!(system.contains("Name is Ada"), "{system}");

    let (status, _) = post(app, "/v1/responses", &turn("Big news: I moved to Lyon.")).await;
    assert_eq!(status, 200);
    wait_for_memories(app, "ada", |m| {
        m.iter().any(|t| t == "Lives in Lyon") && !m.iter().any(|t| t == "Lives in Paris")
    })
    .await;
    let (_, found) = post(
        app,
        "/v1/memories/search",
        &json!({"user": "ada", "query": "lives"}),
    )
    .await;
    let id = found["data"][0]["id"].as_str().unwrap();
    let (_, history) = get(app, &format!("/v1/memories/{id}/history")).await;
    let events: Vec<(&str, &str)> = history["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["event"].as_str().unwrap(),
                h["new_memory"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        events,
        vec![("ADD", "Lives in Paris"), ("UPDATE", "Lives in Lyon")]
    );

    // Another user of the same key: no memories, none in its context.
    let (status, _) = post(
        app,
        "/v1/responses",
        &json!({"model": "mem", "user": "bob", "input": "Where do I live?"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!upstream_system_text(app).await.contains("Lyon"));
    let (_, found) = post(
        app,
        "/v1/memories/search",
        &json!({"user": "bob", "query": "lives Lyon"}),
    )
    .await;
    assert_eq!(found["data"], json!([]));

    // No subject: no memory, and the response says so.
    let (status, response) = post(
        app,
        "/v1/responses",
        &json!({"model": "mem", "input": "Where do I live?"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(response["metadata"]["memory"], "no_subject", "{response}");
    // Off wins: the header turns the alias's memory off.
    let response = app
        .client
        .post(app.url("/v1/responses"))
        .header("x-switchyard-memory", "off")
        .json(&json!({"model": "mem", "user": "ada", "input": "Where do I live?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!upstream_system_text(app).await.contains("Lyon"));
    // And on, for an alias without memory.
    let response = app
        .client
        .post(app.url("/v1/responses"))
        .header("x-switchyard-memory", "on")
        .json(&json!({"model": "m", "user": "ada", "input": "Where do I live?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(upstream_system_text(app).await.contains("Lives in Lyon"));
    let response = app
        .client
        .post(app.url("/v1/responses"))
        .header("x-switchyard-memory", "maybe")
        .json(&json!({"model": "m", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

/// Memories are the key's: another key's id is a 404 and its searches find nothing.
async fn keys_do_not_share(db: Db) {
    let Some(env) = spawn(db, "", "[auth]\nmode = \"keys\"\n", MockConfig::default()).await else {
        return;
    };
    let app = &env.app;
    let mut keys = Vec::new();
    for name in ["alice", "bob"] {
        let response = app
            .client
            .post(app.url("/admin/keys"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let key: Value = response.json().await.unwrap();
        keys.push(key["key"].as_str().unwrap().to_owned());
    }
    let (a, b) = (Some(keys[0].as_str()), Some(keys[1].as_str()));
    let (status, added) = call(
        app,
        a,
        Method::POST,
        "/v1/memories",
        Some(&json!({"user": "u", "infer": false, "messages": [{"role": "user", "content": "Likes green tea"}]})),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    let id = added["data"][0]["id"].as_str().unwrap();
    for (method, path) in [
        (Method::GET, format!("/v1/memories/{id}")),
        (Method::GET, format!("/v1/memories/{id}/history")),
        (Method::DELETE, format!("/v1/memories/{id}")),
    ] {
        let (status, _) = call(app, b, method, &path, None).await;
        assert_eq!(status, 404, "{path}");
    }
    let (status, _) = call(
        app,
        b,
        Method::PUT,
        &format!("/v1/memories/{id}"),
        Some(&json!({"memory": "stolen"})),
    )
    .await;
    assert_eq!(status, 404);
    let (_, found) = call(
        app,
        b,
        Method::POST,
        "/v1/memories/search",
        Some(&json!({"user": "u", "query": "green tea"})),
    )
    .await;
    assert_eq!(found["data"], json!([]));
    assert!(memories_of(app, b, "u").await.is_empty());
    assert_eq!(memories_of(app, a, "u").await, vec!["Likes green tea"]);
    let (status, _) = call(app, None, Method::GET, "/v1/memories?user=u", None).await;
    assert_eq!(status, 401);
    // The admin deletes a key's data: its memories go too, the other key's stay.
    let (status, keys_list) = call(app, Some(ADMIN), Method::GET, "/admin/keys", None).await;
    assert_eq!(status, 200, "{keys_list}");
    let alice = keys_list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "alice")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    call(
        app,
        b,
        Method::POST,
        "/v1/memories",
        Some(&json!({"user": "u", "infer": false, "messages": [{"role": "user", "content": "Likes coffee"}]})),
    )
    .await;
    let (status, deleted) = call(
        app,
        Some(ADMIN),
        Method::DELETE,
        &format!("/admin/keys/{alice}/data"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["deleted"]["memories"], 1, "{deleted}");
    assert!(memories_of(app, a, "u").await.is_empty());
    let (status, _) = call(
        app,
        a,
        Method::GET,
        &format!("/v1/memories/{id}/history"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(memories_of(app, b, "u").await, vec!["Likes coffee"]);
}

/// `infer: true` queues a job; its extraction calls are in the usage log as `memory`;
/// a failing extractor retries, then parks the job as failed and visible.
async fn jobs_run_and_fail_visibly(db: Db) {
    let Some(env) = spawn(db, "max_attempts = 2\n", "", MockConfig::default()).await else {
        return;
    };
    let app = &env.app;
    let (status, job) = post(
        app,
        "/v1/memories",
        &json!({"user": "cy", "messages": [{"role": "user", "content": "I work as a pilot. I hate olives."}]}),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["status"], "queued");
    let id = job["id"].as_str().unwrap().to_owned();
    wait_for_memories(app, "cy", |m| m.len() == 2).await;
    let (status, done) = get(app, &format!("/v1/memories/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["attempts"], 1);
    // Facts and decisions: two calls of the extractor, logged under route "memory".
    let usage = app.state.store.clone();
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = usage.usage_of_request(&id).await.unwrap();
        if rows.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.route == "memory" && r.status == 200));

    // An extractor that always fails: retried, then failed with its error.
    env.extractor.state.set_config(MockConfig {
        fail_rate: 1.0,
        ..MockConfig::default()
    });
    let (_, job) = post(
        app,
        "/v1/memories",
        &json!({"user": "cy", "messages": [{"role": "user", "content": "I love jazz."}]}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let mut last = Value::Null;
    for _ in 0..400 {
        let (_, state) = get(app, &format!("/v1/memories/jobs/{id}")).await;
        if state["status"] == "failed" {
            last = state;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["status"], "failed", "{last}");
    assert_eq!(last["attempts"], 2, "{last}");
    assert!(
        last["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{last}"
    );
    assert_eq!(memories_of(app, None, "cy").await.len(), 2);
    // The operator's figures.
    let (status, stats) = call(app, Some(ADMIN), Method::GET, "/admin/stats", None).await;
    assert_eq!(status, 200);
    let memory = &stats["memory"];
    assert_eq!(memory["completed"], 1, "{memory}");
    assert!(memory["mean_job_ms"].as_f64().unwrap() > 0.0, "{memory}");
    assert_eq!(memory["jobs"]["failed"], 1, "{memory}");
    assert_eq!(memory["decisions"]["add"], 2, "{memory}");
}

/// Past the queue bound new extractions are refused and counted; the jobs queued or
/// running never exceed it.
async fn queue_bound_holds(db: Db) {
    let Some(env) = spawn(
        db,
        "queue_bound = 3\nworkers = 1\n",
        "",
        MockConfig {
            latency_ms: 300,
            ..MockConfig::default()
        },
    )
    .await
    else {
        return;
    };
    let app = &env.app;
    let mut accepted = 0;
    let mut refused = 0;
    let bodies: Vec<Value> = (0..30)
        .map(|i| json!({"user": "flood", "messages": [{"role": "user", "content": format!("I like item {i}")}]}))
        .collect();
    let sends = bodies.iter().map(|body| post(app, "/v1/memories", body));
    for (status, body) in futures_util::future::join_all(sends).await {
        match status {
            202 => accepted += 1,
            503 => {
                assert_eq!(body["error"]["type"], "server_error", "{body}");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
        let depth = app.state.store.memory_job_depth().await.unwrap();
        assert!(depth <= 3, "depth {depth}");
    }
    assert!(accepted >= 3, "{accepted}");
    assert!(refused > 0);
    assert_eq!(
        app.state
            .memory
            .figures
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        refused
    );
}

/// `kill -9` while a job's model call is in flight: after a restart the job runs again
/// once its lease has run out, and completes exactly once (each memory added once).
async fn killed_mid_extraction(db: Db) {
    let Some((database, dir)) = database(db, "memories") else {
        return;
    };
    let extractor = mock(MockConfig {
        latency_ms: 3_000,
        ..MockConfig::default()
    })
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config_dir = std::env::temp_dir().join(unique("switchyard_memory_crash"));
    std::fs::create_dir_all(&config_dir).unwrap();
    let path = config_dir.join("sy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[auth]\nmode = \"none\"\n{database}\
             [providers.extractor]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"x\"\n\
             [models.extract]\nprovider = \"extractor\"\n\
             [memory]\nextraction_model = \"extract\"\nlease = \"5s\"\nworkers = 1\n",
            extractor.base_url()
        ),
    )
    .unwrap();
    let start = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let ready = |client: reqwest::Client, base: String| async move {
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
    let job_state = |client: reqwest::Client, base: String, id: String| async move {
        let state: Value = client
            .get(format!("{base}/v1/memories/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        state
    };
    let mut server = start();
    ready(client.clone(), base.clone()).await;
    let job: Value = client
        .post(format!("{base}/v1/memories"))
        .json(&json!({"user": "dee", "messages": [{"role": "user", "content": "My name is Dee. I live in Oslo."}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    // Running, its facts call waiting on the slow extractor: kill it there.
    let mut running = false;
    for _ in 0..200 {
        if job_state(client.clone(), base.clone(), id.clone()).await["status"] == "running"
            && extractor.stats().chat >= 1
        {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(running, "the job never started");
    server.start_kill().unwrap();
    server.wait().await.unwrap();
    extractor.state.set_config(MockConfig::default());

    let mut server = start();
    ready(client.clone(), base.clone()).await;
    let mut last = Value::Null;
    for _ in 0..600 {
        last = job_state(client.clone(), base.clone(), id.clone()).await;
        if last["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(last["attempts"], 2, "{last}");
    let list: Value = client
        .get(format!("{base}/v1/memories?user=dee"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut texts: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["memory"].as_str().unwrap())
        .collect();
    texts.sort_unstable();
    assert_eq!(texts, vec!["Lives in Oslo", "Name is Dee"]);
    for memory in list["data"].as_array().unwrap() {
        let history: Value = client
            .get(format!(
                "{base}/v1/memories/{}/history",
                memory["id"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(history["data"].as_array().unwrap().len(), 1, "{history}");
    }
    server.start_kill().unwrap();
    let _ = server.wait().await;
    let _ = std::fs::remove_dir_all(&config_dir);
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Two instances on one PostgreSQL share the queue: every job runs once (two extractor
/// calls each, one attempt), whichever instance claimed it.
#[tokio::test]
async fn two_instances_never_run_a_job_twice() {
    let Some((database, _)) = database(Db::Postgres, "memories") else {
        return;
    };
    let extractor = mock(MockConfig {
        latency_ms: 50,
        ..MockConfig::default()
    })
    .await;
    let mut apps = Vec::new();
    for _ in 0..2 {
        let upstream = mock(MockConfig::default()).await;
        let tail = format!(
            "{database}[providers.extractor]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"x\"\n\
             [models.extract]\nprovider = \"extractor\"\n\
             [memory]\nextraction_model = \"extract\"\nworkers = 4\n",
            extractor.base_url()
        );
        let toml = config_for(&upstream, "", "", &tail);
        apps.push(TestApp::spawn_toml(upstream, &toml).await);
    }
    let jobs = 40;
    let mut ids = Vec::new();
    for i in 0..jobs {
        let (status, job) = post(
            &apps[i % 2],
            "/v1/memories",
            &json!({"user": "shared", "messages": [{"role": "user", "content": format!("I like pastime{i}")}]}),
        )
        .await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        let mut state = Value::Null;
        for _ in 0..400 {
            (_, state) = get(&apps[0], &format!("/v1/memories/jobs/{id}")).await;
            if state["status"] == "completed" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(state["status"], "completed", "{state}");
        assert_eq!(state["attempts"], 1, "{state}");
    }
    assert_eq!(extractor.stats().chat, 2 * jobs as u64);
    let texts = memories_of(&apps[1], None, "shared").await;
    assert_eq!(texts.len(), jobs, "{texts:?}");
    let worked: Vec<u64> = apps
        .iter()
        .map(|a| a.state.memory.figures.completed.load(Ordering::Relaxed))
        .collect();
    assert_eq!(worked.iter().sum::<u64>(), jobs as u64, "{worked:?}");
}

/// `bench memory` end to end on a small conversation in LoCoMo's shape: it stores every
/// turn, searches every answerable question and scores the evidence found.
async fn locomo_driver(db: Db) {
    let Some(env) = spawn(db, "", "", MockConfig::default()).await else {
        return;
    };
    let conversation = json!({
        "speaker_a": "Ana", "speaker_b": "Ben",
        "conversation": {
            "session_1_date_time": "1:00 pm on 1 May, 2023",
            "session_1": [
                {"speaker": "Ana", "dia_id": "D1:1", "text": "I adopted a puppy called Biscuit."},
                {"speaker": "Ben", "dia_id": "D1:2", "text": "Lovely! What breed is he?"},
                {"speaker": "Ana", "dia_id": "D1:3", "text": "A beagle, he loves the beach."},
                {"speaker": "Ben", "dia_id": "D1:4", "text": "I started pottery classes.",
                 "blip_caption": "a photo of a clay vase"}
            ]
        },
        "qa": [
            {"question": "What is the name of Ana's puppy?", "answer": "Biscuit", "evidence": ["D1:1"], "category": 1},
            {"question": "What did Ben make in pottery class?", "answer": "a vase", "evidence": ["D1:4"], "category": 4},
            {"question": "Who is Carl?", "answer": "", "evidence": [], "category": 5}
        ]
    });
    let path = std::env::temp_dir().join(format!("{}.json", unique("locomo")));
    std::fs::write(&path, conversation.to_string()).unwrap();
    let report =
        switchyard_loadlab::locomo::measure(&switchyard_loadlab::locomo::MemoryBenchArgs {
            locomo: vec![path.clone()],
            target: env.app.url(""),
            api_key: None,
            json: false,
        })
        .await
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(report.memories, 4);
    assert_eq!(report.questions, 2, "category 5 is left out");
    assert_eq!(report.recall_any[2], 100.0, "{report:?}");
    assert_eq!(report.recall_all[0], 100.0, "{report:?}");
    // The driver leaves nothing behind.
    let (_, list) = get(&env.app, "/v1/memories?limit=100").await;
    assert_eq!(list["data"], json!([]), "{list}");
}

/// `[memory] embeddings`: the worker gives memories vectors in the background, and a
/// search finds what shares no word with the query (only word parts: "allergies" and
/// "allergic" stem apart); a rewritten memory gets a new vector.
async fn vectors_find_what_words_miss(db: Db) {
    let Some(env) = spawn(
        db,
        "embeddings = \"vec\"\nembedding_dimensions = 256\n\
         [models.vec]\nprovider = \"extractor\"\nmodel = \"embedder\"\n",
        "",
        MockConfig::default(),
    )
    .await
    else {
        return;
    };
    let app = &env.app;
    let (status, added) = post(
        app,
        "/v1/memories",
        &json!({"user": "ada", "infer": false, "messages": [
            {"role": "user", "content": "Ada is allergic to peanuts"},
            {"role": "user", "content": "Ada lives in Lyon"},
            {"role": "user", "content": "Ada plays the cello"}
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    let allergy = added["data"][0]["id"].as_str().unwrap().to_owned();
    let search = |query: &'static str| async move {
        post(
            app,
            "/v1/memories/search",
            &json!({"user": "ada", "query": query, "limit": 1}),
        )
        .await
    };
    let top = |found: &Value| found["data"][0]["memory"].as_str().map(str::to_owned);
    // Full text alone finds nothing for this query.
    let mut found = Value::Null;
    for _ in 0..200 {
        found = search("any allergies?").await.1;
        if top(&found).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        top(&found).as_deref(),
        Some("Ada is allergic to peanuts"),
        "{found}"
    );
    assert!(
        env.extractor.stats().embeddings >= 2,
        "memories and query embedded"
    );

    // A rewrite drops the old vector; the worker computes the new text's.
    let (status, _) = call(
        app,
        None,
        Method::PUT,
        &format!("/v1/memories/{allergy}"),
        Some(&json!({"memory": "Ada has been vegetarian since 2019"})),
    )
    .await;
    assert_eq!(status, 200);
    for _ in 0..200 {
        found = search("vegetables").await.1;
        if top(&found).as_deref() == Some("Ada has been vegetarian since 2019") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the rewritten memory never ranked by its new vector: {found}");
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
    api_round_trip,
    vectors_find_what_words_miss,
    turns_remember,
    keys_do_not_share,
    jobs_run_and_fail_visibly,
    queue_bound_holds,
    killed_mid_extraction,
    locomo_driver,
}
