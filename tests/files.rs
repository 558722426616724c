//! The Files API end to end: multipart uploads over real HTTP streamed to a real
//! directory, read back, listed, scoped to their key and deleted, on SQLite and (when
//! `SWITCHYARD_TEST_POSTGRES_URL` is set) PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use bytes::Bytes;
use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use switchyard_loadlab::mock::MockConfig;

const BOUNDARY: &str = "----switchyard-test-boundary";

/// A multipart body: text fields, then a file of `size` bytes made by `byte(i)`, sent in
/// 64 KiB chunks as they are made (never whole in memory).
fn multipart(
    fields: &[(&str, &str)],
    filename: &str,
    size: usize,
    byte: fn(usize) -> u8,
) -> reqwest::Body {
    let mut head = String::new();
    for (name, value) in fields {
        head.push_str(&format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    head.push_str(&format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; \
         filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    ));
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let chunk = 64 * 1024;
    let chunks = (0..size.div_ceil(chunk)).map(move |n| {
        let range = n * chunk..((n + 1) * chunk).min(size);
        Ok::<_, std::io::Error>(Bytes::from(range.map(byte).collect::<Vec<u8>>()))
    });
    let stream = futures_util::stream::iter(
        std::iter::once(Ok(Bytes::from(head)))
            .chain(chunks)
            .chain(std::iter::once(Ok(Bytes::from(tail)))),
    );
    reqwest::Body::wrap_stream(stream)
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

async fn upload(
    app: &TestApp,
    key: Option<&str>,
    fields: &[(&str, &str)],
    filename: &str,
    size: usize,
) -> (u16, Value) {
    let mut request = app
        .client
        .post(app.url("/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(multipart(fields, filename, size, pattern));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(app: &TestApp, key: Option<&str>, path: &str) -> (u16, Value) {
    let mut request = app.client.get(app.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A file's bytes, read back through `/content`.
async fn content(app: &TestApp, id: &str) -> Bytes {
    let response = app
        .client
        .get(app.url(&format!("/v1/files/{id}/content")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap()
}

/// Deletes a file, expecting it was there.
async fn delete(app: &TestApp, id: &str) -> reqwest::Response {
    let response = app
        .client
        .delete(app.url(&format!("/v1/files/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
}

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

async fn spawn(db: Db, tail: &str) -> Option<Env> {
    let (database, dir) = database(db, "files")?;
    let files = std::env::temp_dir().join(unique("switchyard_files"));
    let upstream = mock(MockConfig::default()).await;
    let toml = config_for(
        &upstream,
        "",
        "",
        &format!(
            "{database}[files]\ndir = \"{}\"\nmax_vision_bytes = 4096\n{tail}",
            files.display()
        ),
    );
    Some(Env {
        app: TestApp::spawn_toml(upstream, &toml).await,
        files,
        dir,
    })
}

async fn upload_read_list_delete(db: Db) {
    let Some(env) = spawn(db, "").await else {
        return;
    };
    let app = &env.app;
    let size = 300_000;
    let (status, file) = upload(app, None, &[("purpose", "user_data")], "../notes.txt", size).await;
    assert_eq!(status, 200, "{file}");
    let id = file["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("file-"), "{id}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], size);
    assert_eq!(file["filename"], "notes.txt", "the path is not kept");
    assert_eq!(file["purpose"], "user_data");
    let expected: Vec<u8> = (0..size).map(pattern).collect();
    assert_eq!(file["sha256"], hex(&Sha256::digest(&expected)));
    // On disk under its id, nothing else left behind.
    assert_eq!(std::fs::read(env.files.join(&id)).unwrap(), expected);
    assert_eq!(std::fs::read_dir(&env.files).unwrap().count(), 1);

    let (status, read) = get(app, None, &format!("/v1/files/{id}")).await;
    assert_eq!((status, &read), (200, &file));
    assert_eq!(content(app, &id).await.as_ref(), expected.as_slice());

    let (status, second) = upload(app, None, &[("purpose", "batch")], "b.jsonl", 10).await;
    assert_eq!(status, 200, "{second}");
    let (status, list) = get(app, None, "/v1/files").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [second["id"].as_str().unwrap(), id.as_str()],
        "newest first"
    );
    let (_, batch_only) = get(app, None, "/v1/files?purpose=batch").await;
    assert_eq!(batch_only["data"].as_array().unwrap().len(), 1);
    let (_, page) = get(app, None, "/v1/files?limit=1&order=asc").await;
    assert_eq!(page["data"][0]["id"], id.as_str());
    assert_eq!(page["has_more"], true);
    let (_, next) = get(
        app,
        None,
        &format!("/v1/files?limit=1&order=asc&after={id}"),
    )
    .await;
    assert_eq!(next["data"][0]["id"], second["id"]);
    assert_eq!(next["has_more"], false);

    let deleted = delete(app, &id).await;
    let deleted: Value = deleted.json().await.unwrap();
    assert_eq!(deleted["deleted"], true);
    assert!(!env.files.join(&id).exists(), "the bytes go with the row");
    let (status, gone) = get(app, None, &format!("/v1/files/{id}")).await;
    assert_eq!(status, 404, "{gone}");
    assert_eq!(gone["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn upload_read_list_delete_sqlite() {
    upload_read_list_delete(Db::Sqlite).await;
}

#[tokio::test]
async fn upload_read_list_delete_postgres() {
    upload_read_list_delete(Db::Postgres).await;
}

#[tokio::test]
async fn refusals_name_the_problem_and_keep_nothing() {
    let env = spawn(Db::Sqlite, "").await.unwrap();
    let app = &env.app;
    // Over the purpose's limit (vision: 4096 bytes here): 413, nothing kept.
    let (status, body) = upload(app, None, &[("purpose", "vision")], "big.png", 5000).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    let (status, body) = upload(app, None, &[("purpose", "fine-tune")], "x.jsonl", 10).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "purpose");
    let (status, body) = upload(app, None, &[], "x.jsonl", 10).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("purpose"),
        "{body}"
    );
    let (status, body) = upload(
        app,
        None,
        &[("purpose", "batch"), ("expires_after[seconds]", "10")],
        "x.jsonl",
        10,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // Not multipart at all.
    let response = app
        .client
        .post(app.url("/v1/files"))
        .json(&serde_json::json!({"purpose": "batch"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("multipart"),
        "{body}"
    );
    // No file field.
    let response = app
        .client
        .post(app.url("/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{BOUNDARY}--\r\n"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // Ids of the wrong shape or a traversal are plain 404s.
    for id in [
        "file-..%2F..%2Fetc",
        "resp_abc",
        "file-abc%00",
        "..%2Ffile-a",
    ] {
        let (status, body) = get(app, None, &format!("/v1/files/{id}/content")).await;
        assert_eq!(status, 404, "{id}: {body}");
    }
    let (status, _) = get(app, None, "/v1/files?limit=0").await;
    assert_eq!(status, 400);
    assert_eq!(
        std::fs::read_dir(&env.files).unwrap().count(),
        0,
        "no refused upload left bytes behind"
    );
    let (_, list) = get(app, None, "/v1/files").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "nor a row");
}

#[tokio::test]
async fn another_keys_file_is_not_found() {
    let env = spawn(
        Db::Sqlite,
        "[auth]\nmode = \"keys\"\n[admin]\nkey = \"admin-files\"\n",
    )
    .await
    .unwrap();
    let app = &env.app;
    let mut keys = Vec::new();
    for name in ["one", "two"] {
        let response = app
            .client
            .post(app.url("/admin/keys"))
            .bearer_auth("admin-files")
            .json(&serde_json::json!({"name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        keys.push(body["key"].as_str().unwrap().to_string());
    }
    let (status, _) = upload(app, None, &[("purpose", "batch")], "x.jsonl", 10).await;
    assert_eq!(status, 401, "no key, no upload");
    let (status, file) = upload(app, Some(&keys[0]), &[("purpose", "batch")], "x.jsonl", 10).await;
    assert_eq!(status, 200, "{file}");
    let id = file["id"].as_str().unwrap();
    for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
        let (status, _) = get(app, Some(&keys[1]), &path).await;
        assert_eq!(status, 404, "{path}");
        let (status, _) = get(app, Some(&keys[0]), &path).await;
        assert_eq!(status, 200, "{path}");
    }
    let (_, list) = get(app, Some(&keys[1]), "/v1/files").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let response = app
        .client
        .delete(app.url(&format!("/v1/files/{id}")))
        .bearer_auth(&keys[1])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

/// A 200 MB upload streams to disk: the process (client and server both) grows by far
/// less than the file.
#[tokio::test]
async fn a_200_mb_upload_streams_with_flat_memory() {
    let env = spawn(Db::Sqlite, "").await.unwrap();
    let app = &env.app;
    let size = 200 * 1000 * 1000;
    let before = rss_anon_kib();
    let (status, file) = upload(app, None, &[("purpose", "batch")], "big.jsonl", size).await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["bytes"], size);
    let id = file["id"].as_str().unwrap();
    assert_eq!(
        std::fs::metadata(env.files.join(id)).unwrap().len(),
        size as u64
    );
    if let (Some(before), Some(after)) = (before, rss_anon_kib()) {
        let grown_mib = after.saturating_sub(before) / 1024;
        assert!(
            grown_mib < 64,
            "a 200 MB upload grew anonymous memory by {grown_mib} MiB"
        );
    }
    // Read back in a stream too, and compare the checksum.
    let mut response = app
        .client
        .get(app.url(&format!("/v1/files/{id}/content")))
        .send()
        .await
        .unwrap();
    let mut hasher = Sha256::new();
    let mut read = 0usize;
    while let Some(chunk) = response.chunk().await.unwrap() {
        read += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(read, size);
    assert_eq!(file["sha256"], hex(&hasher.finalize()));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parts that name an uploaded file by id are sent upstream with its bytes inline: an
/// image as a data URL, a file as `file_data`; a file that is not there is a 400.
#[tokio::test]
async fn file_ids_in_input_are_sent_inline() {
    let env = spawn(Db::Sqlite, "").await.unwrap();
    let app = &env.app;
    let (status, image) = upload(app, None, &[("purpose", "vision")], "dot.png", 100).await;
    assert_eq!(status, 200, "{image}");
    let (status, doc) = upload(app, None, &[("purpose", "user_data")], "notes.pdf", 300).await;
    assert_eq!(status, 200, "{doc}");
    let body = serde_json::json!({
        "model": "m",
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "what is in these?"},
            {"type": "input_image", "file_id": image["id"], "detail": "low"},
            {"type": "input_file", "file_id": doc["id"]},
        ]}],
    });
    let response = app.post("/v1/responses", &body).await;
    assert_eq!(response.status(), 200);
    let sent = app.upstream_last_request().await;
    let parts = &sent["messages"][0]["content"];
    use base64::Engine as _;
    let encode = |size: usize| {
        base64::engine::general_purpose::STANDARD
            .encode((0..size).map(pattern).collect::<Vec<u8>>())
    };
    assert_eq!(
        parts[1]["image_url"]["url"],
        format!("data:image/png;base64,{}", encode(100)),
        "{sent}"
    );
    assert_eq!(parts[1]["image_url"]["detail"], "low");
    assert_eq!(
        parts[2]["file"]["file_data"],
        format!("data:application/pdf;base64,{}", encode(300)),
        "{sent}"
    );
    assert_eq!(parts[2]["file"]["filename"], "notes.pdf");
    assert!(parts[2]["file"].get("file_id").is_none(), "{sent}");
    // Stored as sent: the item keeps the id, not the bytes.
    let stored: Value = response.json().await.unwrap();
    let (_, items) = get(
        app,
        None,
        &format!(
            "/v1/responses/{}/input_items",
            stored["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(
        items["data"][0]["content"][1]["file_id"], image["id"],
        "{items}"
    );

    let calls = app.mock_stats().chat;
    let missing = serde_json::json!({
        "model": "m",
        "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-00ff"}]}],
    });
    let response = app.post("/v1/responses", &missing).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("file-00ff"),
        "{error}"
    );
    assert_eq!(app.mock_stats().chat, calls, "nothing sent upstream");
}

/// A real S3-compatible server (moto's, from PyPI) on a free loopback port with one empty
/// bucket; killed when dropped.
struct S3Server {
    _child: tokio::process::Child,
    endpoint: String,
    client: reqwest::Client,
}

impl S3Server {
    async fn start(python: &str, bucket: &str) -> S3Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("moto's server starts (pip install 'moto[server]')");
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let mut created = false;
        for _ in 0..300 {
            if let Ok(r) = client.put(format!("{endpoint}/{bucket}")).send().await {
                assert!(r.status().is_success(), "creating the bucket: {r:?}");
                created = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(created, "moto's server did not come up on {endpoint}");
        S3Server {
            _child: child,
            endpoint,
            client,
        }
    }

    /// A bucket listing (ListObjectsV2 or ListMultipartUploads) as XML text.
    async fn list(&self, bucket: &str, query: &str) -> String {
        let r = self
            .client
            .get(format!("{}/{bucket}?{query}", self.endpoint))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{r:?}");
        r.text().await.unwrap()
    }
}

/// With `[files.s3]`, uploads go to a real S3-compatible bucket as multipart uploads
/// (three parts here), are read back streamed, feed a batch whose output goes there too,
/// and are deleted with their row; a refused upload leaves no object and no open upload.
#[tokio::test]
async fn files_live_in_an_s3_bucket() {
    let Ok(python) = std::env::var("SWITCHYARD_TEST_PYTHON") else {
        notice(
            "SWITCHYARD_TEST_PYTHON is not set (a python with moto[server]); the S3 test skipped",
        );
        return;
    };
    let s3 = S3Server::start(&python, "uploads").await;
    let upstream = mock(MockConfig::default()).await;
    let toml = config_for(
        &upstream,
        "",
        "",
        &format!(
            "[files]\nmax_vision_bytes = 4096\n[files.s3]\nbucket = \"uploads\"\n\
             endpoint = \"{}\"\nprefix = \"switchyard/\"\naccess_key_id = \"test\"\n\
             secret_access_key = \"test\"\n",
            s3.endpoint
        ),
    );
    let app = TestApp::spawn_toml(upstream, &toml).await;

    let size = 12 * 1024 * 1024 + 7;
    let (status, file) = upload(&app, None, &[("purpose", "user_data")], "big.bin", size).await;
    assert_eq!(status, 200, "{file}");
    let id = file["id"].as_str().unwrap().to_string();
    let expected: Vec<u8> = (0..size).map(pattern).collect();
    assert_eq!(file["sha256"], hex(&Sha256::digest(&expected)));
    let listing = s3.list("uploads", "list-type=2").await;
    assert!(
        listing.contains(&format!("<Key>switchyard/{id}</Key>")),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("<Size>{size}</Size>")),
        "{listing}"
    );
    assert_eq!(content(&app, &id).await.as_ref(), expected.as_slice());

    // Past the purpose's limit: refused, and nothing left in the bucket.
    let (status, refused) = upload(&app, None, &[("purpose", "vision")], "x.png", 8192).await;
    assert_eq!(status, 413, "{refused}");
    assert_eq!(
        s3.list("uploads", "list-type=2")
            .await
            .matches("<Key>")
            .count(),
        1
    );
    let open = s3.list("uploads", "uploads").await;
    assert!(
        !open.contains("<Upload>"),
        "an aborted upload is gone: {open}"
    );

    // A batch reads its input from the bucket and writes its output there.
    let lines: Vec<String> = (0..3)
        .map(|i| {
            serde_json::json!({
                "custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": format!("line {i}")}]},
            })
            .to_string()
        })
        .collect();
    let input = lines.join("\n");
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n\
         {input}\r\n--{BOUNDARY}--\r\n"
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
    let input: Value = response.json().await.unwrap();
    let batch: Value = app
        .post(
            "/v1/batches",
            &serde_json::json!({
                "input_file_id": input["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            }),
        )
        .await
        .json()
        .await
        .unwrap();
    let batch_id = batch["id"].as_str().expect("a batch").to_string();
    let mut ended = Value::Null;
    for _ in 0..600 {
        let (_, b) = get(&app, None, &format!("/v1/batches/{batch_id}")).await;
        if b["status"] == "completed" || b["status"] == "failed" {
            ended = b;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(ended["status"], "completed", "{ended}");
    let output_id = ended["output_file_id"].as_str().unwrap();
    let output = content(&app, output_id).await;
    assert_eq!(
        output
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        3
    );
    assert!(
        s3.list("uploads", "list-type=2")
            .await
            .contains(&format!("<Key>switchyard/{output_id}</Key>"))
    );

    delete(&app, &id).await;
    assert!(
        !s3.list("uploads", "list-type=2")
            .await
            .contains(&format!("switchyard/{id}")),
        "the object goes with the row"
    );
}
