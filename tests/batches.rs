//! The Batch API end to end: input files uploaded over real HTTP, batches run by the job
//! engine against the real mock, output and error files read back, on SQLite and (when
//! `SWITCHYARD_TEST_POSTGRES_URL` is set) PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;

const BOUNDARY: &str = "----switchyard-batch-boundary";

struct Env {
    app: TestApp,
    files: PathBuf,
    dir: Option<PathBuf>,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.files);
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn spawn(db: Db, upstream: MockConfig, tail: &str) -> Option<Env> {
    let (database, dir) = database(db, "batches")?;
    let files = std::env::temp_dir().join(unique("switchyard_batch_files"));
    let upstream = mock(upstream).await;
    let toml = config_for(
        &upstream,
        "",
        "",
        &format!(
            "{database}[files]\ndir = \"{}\"\n\
             [models.e]\nprovider = \"mock\"\nmodel = \"mock-embed\"\n{tail}",
            files.display()
        ),
    );
    Some(Env {
        app: TestApp::spawn_toml(upstream, &toml).await,
        files,
        dir,
    })
}

async fn upload(app: &TestApp, purpose: &str, text: &str) -> String {
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{text}\r\n--{BOUNDARY}--\r\n"
    );
    let response = app
        .client
        .post(app.url("/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let file: Value = response.json().await.unwrap();
    file["id"].as_str().unwrap().to_string()
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

async fn content(app: &TestApp, id: &str) -> Vec<Value> {
    let response = app
        .client
        .get(app.url(&format!("/v1/files/{id}/content")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn create(app: &TestApp, file: &str, endpoint: &str) -> Value {
    let (status, batch) = send(
        app,
        reqwest::Method::POST,
        "/v1/batches",
        Some(json!({
            "input_file_id": file,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": {"job": "nightly"},
        })),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    batch
}

/// Polls a batch until it has ended.
async fn wait_ended(app: &TestApp, id: &str, limit: Duration) -> Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (status, batch) = send(
            app,
            reqwest::Method::GET,
            &format!("/v1/batches/{id}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{batch}");
        if ["completed", "failed", "expired", "cancelled"]
            .contains(&batch["status"].as_str().unwrap())
        {
            return batch;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "batch never ended: {batch}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn chat_line(n: usize) -> String {
    json!({
        "custom_id": format!("req-{n}"),
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": format!("question {n}")}]},
    })
    .to_string()
}

/// 1,000 lines of which 10 are bad: 990 outputs in line order, 10 errors naming their
/// line, every good line sent upstream exactly once.
async fn a_thousand_lines_with_ten_bad(db: Db) {
    let Some(env) = spawn(db, MockConfig::default(), "").await else {
        return;
    };
    let app = &env.app;
    let mut lines = Vec::new();
    for n in 0..1000 {
        lines.push(match n % 100 {
            7 => match n / 100 % 5 {
                0 => "{not json".to_string(),
                1 => json!({"custom_id": format!("req-{n}"), "method": "GET", "url": "/v1/chat/completions", "body": {"model": "m"}}).to_string(),
                2 => json!({"custom_id": format!("req-{n}"), "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}).to_string(),
                3 => json!({"custom_id": format!("req-{n}"), "method": "POST", "url": "/v1/chat/completions"}).to_string(),
                _ => json!({"custom_id": "req-0", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}).to_string(),
            },
            _ => chat_line(n),
        });
    }
    let file = upload(app, "batch", &lines.join("\n")).await;
    let batch = create(app, &file, "/v1/chat/completions").await;
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["metadata"]["job"], "nightly");
    let id = batch["id"].as_str().unwrap();
    assert!(id.starts_with("batch_"), "{id}");
    let batch = wait_ended(app, id, Duration::from_secs(120)).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 1000, "completed": 990, "failed": 10})
    );
    for stamp in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(batch[stamp].is_i64(), "{stamp}: {batch}");
    }
    assert!(
        batch["usage"]["input_tokens"].as_i64().unwrap() > 0,
        "{batch}"
    );
    let output = content(app, batch["output_file_id"].as_str().unwrap()).await;
    assert_eq!(output.len(), 990);
    let mut expected = (0..1000)
        .filter(|n| n % 100 != 7)
        .map(|n| format!("req-{n}"));
    for line in &output {
        assert_eq!(
            line["custom_id"],
            expected.next().unwrap().as_str(),
            "line order"
        );
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(line["response"]["body"]["object"], "chat.completion");
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert!(line["error"].is_null());
    }
    let errors = content(app, batch["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errors.len(), 10);
    for (line, n) in errors.iter().zip((0..1000).filter(|n| n % 100 == 7)) {
        let message = line["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("Line {}:", n + 1)),
            "{message}"
        );
        assert!(line["response"].is_null());
    }
    assert_eq!(app.mock_stats().chat, 990, "every good line ran once");
    // The output file is the caller's, listed with purpose batch_output.
    let (_, outputs) = send(
        app,
        reqwest::Method::GET,
        "/v1/files?purpose=batch_output",
        None,
    )
    .await;
    assert_eq!(outputs["data"].as_array().unwrap().len(), 2);
    let (_, list) = send(app, reqwest::Method::GET, "/v1/batches?limit=5", None).await;
    assert_eq!(list["data"][0]["id"], id);
}

#[tokio::test]
async fn a_thousand_lines_with_ten_bad_sqlite() {
    a_thousand_lines_with_ten_bad(Db::Sqlite).await;
}

#[tokio::test]
async fn a_thousand_lines_with_ten_bad_postgres() {
    a_thousand_lines_with_ten_bad(Db::Postgres).await;
}

#[tokio::test]
async fn embeddings_and_responses_batches() {
    let env = spawn(Db::Sqlite, MockConfig::default(), "").await.unwrap();
    let app = &env.app;
    let lines: Vec<String> = (0..5)
        .map(|n| {
            json!({"custom_id": format!("e{n}"), "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": "e", "input": format!("text {n}")}})
            .to_string()
        })
        .collect();
    let file = upload(app, "batch", &lines.join("\n")).await;
    let batch = create(app, &file, "/v1/embeddings").await;
    let batch = wait_ended(app, batch["id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    let output = content(app, batch["output_file_id"].as_str().unwrap()).await;
    assert_eq!(output.len(), 5);
    assert_eq!(output[0]["response"]["body"]["object"], "list");
    assert!(batch["error_file_id"].is_null(), "no errors, no error file");

    let lines: Vec<String> = (0..3)
        .map(|n| {
            json!({"custom_id": format!("r{n}"), "method": "POST", "url": "/v1/responses",
                   "body": {"model": if n == 2 { "nope" } else { "m" }, "input": format!("hello {n}")}})
            .to_string()
        })
        .collect();
    let file = upload(app, "batch", &lines.join("\n")).await;
    let batch = create(app, &file, "/v1/responses").await;
    let batch = wait_ended(app, batch["id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(
        batch["request_counts"],
        json!({"total": 3, "completed": 2, "failed": 1}),
        "{batch}"
    );
    let output = content(app, batch["output_file_id"].as_str().unwrap()).await;
    assert_eq!(output[0]["response"]["body"]["object"], "response");
    assert_eq!(output[0]["response"]["body"]["status"], "completed");
    let errors = content(app, batch["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errors[0]["custom_id"], "r2");
    assert_eq!(errors[0]["response"]["status_code"], 404, "{}", errors[0]);
    assert!(errors[0]["response"]["body"]["error"]["message"].is_string());
}

#[tokio::test]
async fn cancel_writes_out_what_is_done() {
    let upstream = MockConfig {
        latency_ms: 200,
        ..MockConfig::default()
    };
    let env = spawn(Db::Sqlite, upstream, "[batches]\nconcurrency = 2\n")
        .await
        .unwrap();
    let app = &env.app;
    let lines: Vec<String> = (0..200).map(chat_line).collect();
    let file = upload(app, "batch", &lines.join("\n")).await;
    let batch = create(app, &file, "/v1/chat/completions").await;
    let id = batch["id"].as_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(30), || app.mock_stats().chat >= 4).await,
        "the batch never started"
    );
    let (status, cancelling) = send(
        app,
        reqwest::Method::POST,
        &format!("/v1/batches/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{cancelling}");
    assert!(
        ["cancelling", "cancelled"].contains(&cancelling["status"].as_str().unwrap()),
        "{cancelling}"
    );
    let batch = wait_ended(app, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "cancelled", "{batch}");
    assert!(batch["cancelled_at"].is_i64());
    let done = batch["request_counts"]["completed"].as_i64().unwrap();
    assert!(done > 0 && done < 200, "{batch}");
    let output = content(app, batch["output_file_id"].as_str().unwrap()).await;
    assert_eq!(output.len() as i64, done);
    let calls = app.mock_stats().chat;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        app.mock_stats().chat,
        calls,
        "nothing more is sent after the cancel"
    );
}

#[tokio::test]
async fn refusals_name_the_problem() {
    let env = spawn(Db::Sqlite, MockConfig::default(), "").await.unwrap();
    let app = &env.app;
    let data = upload(app, "user_data", &chat_line(1)).await;
    let good = upload(app, "batch", &chat_line(1)).await;
    for (body, param) in [
        (
            json!({"endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            "input_file_id",
        ),
        (
            json!({"input_file_id": good, "endpoint": "/v1/completions", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": good, "endpoint": "/v1/chat/completions", "completion_window": "1h"}),
            "completion_window",
        ),
        (
            json!({"input_file_id": data, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            "input_file_id",
        ),
        (
            json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            "input_file_id",
        ),
        (
            json!({"input_file_id": "../etc", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            "input_file_id",
        ),
    ] {
        let (status, error) = send(
            app,
            reqwest::Method::POST,
            "/v1/batches",
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
    }
    let (status, _) = send(app, reqwest::Method::POST, "/v1/batches", Some(json!([1]))).await;
    assert_eq!(status, 400);
    for path in [
        "/v1/batches/batch_nope",
        "/v1/batches/resp_abc",
        "/v1/batches/..%2Fx",
    ] {
        let (status, _) = send(app, reqwest::Method::GET, path, None).await;
        assert_eq!(status, 404, "{path}");
    }
    let (status, _) = send(
        app,
        reqwest::Method::POST,
        "/v1/batches/batch_nope/cancel",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (_, list) = send(app, reqwest::Method::GET, "/v1/batches", None).await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        0,
        "nothing stored for a refusal"
    );
}
