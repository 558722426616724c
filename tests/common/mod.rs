//! Test harness: the real app on port 0 in front of the real mock upstream on port 0.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use switchyard::app::App;
use switchyard::config::Settings;
use switchyard_loadlab::mock::{MockConfig, MockServer, MockStatsSnapshot};
use tokio_util::sync::CancellationToken;

/// A running Switchyard plus the mock it talks to.
pub struct TestApp {
    pub addr: SocketAddr,
    pub mock: MockServer,
    pub client: reqwest::Client,
    pub state: std::sync::Arc<switchyard::state::AppState>,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Config for one OpenAI-style provider `mock` serving alias `m` (upstream `mock-model`)
/// and one Anthropic-style provider serving alias `claude`, both on the mock. `extra`
/// is appended to the `[providers.mock]` table.
pub fn config_for(
    mock: &MockServer,
    provider_extra: &str,
    server_extra: &str,
    tail: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "10s"
{server_extra}

[providers.mock]
kind = "openai"
base_url = "{base}"
api_key = "sk-test-provider-secret"
{provider_extra}

[providers.anthropic]
kind = "anthropic"
base_url = "{base}"
api_key = "sk-ant-test-secret"
{provider_extra}

[models.m]
provider = "mock"
model = "mock-model"

[models.claude]
provider = "anthropic"
model = "claude-test"

{tail}
"#,
        base = mock.base_url()
    )
}

/// Parses a test config. Unless it says otherwise, authentication is off and the
/// database is a private in-memory SQLite, so tests neither need keys nor share files.
pub fn test_settings(toml: &str) -> Settings {
    let mut settings = Settings::from_toml(toml, &|_| None).expect("test config");
    if !toml.contains("[auth]") {
        settings.auth.mode = switchyard::config::AuthMode::None;
    }
    if !toml.contains("[database]") {
        settings.database.url = switchyard::config::Secret::new("sqlite::memory:");
    }
    if !toml.contains("[files]") {
        settings.files.dir = std::env::temp_dir().join(unique("switchyard_files"));
    }
    settings
}

impl TestApp {
    /// Mock with `mock_config`, app with the default test config.
    pub async fn spawn(mock_config: MockConfig) -> TestApp {
        Self::spawn_with(mock_config, "", "").await
    }

    pub async fn spawn_with(
        mock_config: MockConfig,
        provider_extra: &str,
        server_extra: &str,
    ) -> TestApp {
        Self::spawn_full(mock_config, provider_extra, server_extra, "").await
    }

    /// `tail` is appended to the config: top-level tables such as `[routing]`.
    pub async fn spawn_full(
        mock_config: MockConfig,
        provider_extra: &str,
        server_extra: &str,
        tail: &str,
    ) -> TestApp {
        let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), mock_config)
            .await
            .unwrap();
        let toml = config_for(&mock, provider_extra, server_extra, tail);
        Self::spawn_toml(mock, &toml).await
    }

    /// Runs the app on a complete config; `mock` is the upstream it points at.
    pub async fn spawn_toml(mock: MockServer, toml: &str) -> TestApp {
        let settings = test_settings(toml);
        let app = App::build(settings).await.expect("app builds");
        let addr = app.local_addr();
        let state = app.state();
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        let server = tokio::spawn(app.run(async move { signal.cancelled().await }));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let test_app = TestApp {
            addr,
            mock,
            client,
            state,
            shutdown,
            server: Some(server),
        };
        test_app.wait_ready().await;
        test_app
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.client.get(self.url("/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("app never became ready");
    }

    /// POSTs a JSON value.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs raw bytes.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn chat(&self, body: &Value) -> (u16, Value) {
        let r = self.post("/v1/chat/completions", body).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// Streams a chat completion and returns every SSE `data:` payload, in order.
    pub async fn chat_stream(&self, body: &Value) -> Vec<String> {
        let r = self.post("/v1/chat/completions", body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        sse_data(r).await
    }

    /// The body the mock upstream was last sent (its `/last-request`).
    pub async fn upstream_last_request(&self) -> Value {
        self.client
            .get(format!(
                "{}/last-request",
                self.mock.base_url().trim_end_matches("/v1")
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn mock_stats(&self) -> MockStatsSnapshot {
        self.mock.stats()
    }

    /// Signals shutdown and waits for the app to exit.
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.server.take() {
            Some(handle) => handle.await.unwrap(),
            None => Ok(()),
        }
    }

    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    pub fn take_server(&mut self) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        self.server.take().unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reads a whole SSE body into its `data:` payloads.
pub async fn sse_data(r: reqwest::Response) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data: ") {
                    out.push(data.to_string());
                }
            }
        }
    }
    out
}

/// A simple user chat request.
pub fn chat_body(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// Two function tools.
pub fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_quote", "description": "Stock quote",
            "parameters": {"type": "object", "properties": {"symbol": {"type": "string"}}, "required": ["symbol"]}}}
    ])
}

/// Reassembles streamed tool calls by index: (id, name, arguments).
pub fn assemble_tool_calls(events: &[String]) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for data in events {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        let Some(deltas) = v
            .pointer("/choices/0/delta/tool_calls")
            .and_then(Value::as_array)
        else {
            continue;
        };
        for d in deltas {
            let i = d["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = d["id"].as_str() {
                calls[i].0 = id.to_string();
            }
            if let Some(name) = d.pointer("/function/name").and_then(Value::as_str) {
                calls[i].1.push_str(name);
            }
            if let Some(args) = d.pointer("/function/arguments").and_then(Value::as_str) {
                calls[i].2.push_str(args);
            }
        }
    }
    calls
}

/// Starts a mock upstream on a free loopback port.
pub async fn mock(config: MockConfig) -> MockServer {
    MockServer::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// Waits until `check` holds, polling up to `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// Says, in the test run's own output, that a test skipped part of its work and which
/// variable would enable it. Written straight to stderr: the test harness captures the
/// `eprintln!` of passing tests, and a skip must not pass silently.
pub fn notice(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "notice: {text}");
}

/// The real binary on its own port in front of `mock`, with a SQLite usage log, an admin
/// key, aliases `a` and `b` (chat) and `e` (embeddings).
pub struct Gateway {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub base: String,
}

/// The real binary serving `config`, quiet, killed when dropped.
pub fn serve_binary(config: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

pub async fn spawn_gateway(mock: &MockServer, name: &str) -> Gateway {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("switchyard_{name}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [admin]\nkey = \"memory-admin\"\n\
             [auth]\nmode = \"none\"\n\
             [database]\nurl = \"sqlite://{}\"\n\
             [providers.mock]\nkind = \"openai\"\nbase_url = \"{}\"\n\
             [models.a]\nprovider = \"mock\"\nmodel = \"mock-a\"\n\
             [models.b]\nprovider = \"mock\"\nmodel = \"mock-b\"\n\
             [models.e]\nprovider = \"mock\"\nmodel = \"mock-embed\"\n\
             [models.t]\nprovider = \"mock\"\nmodel = \"mock-t\"\nmemory = true\n\
             tools = [\"quote\"]\n\
             [tools.quote]\ndescription = \"A quote\"\nurl = \"{root}/tools/quote?symbol={{ticker}}\"\n\
             headers = {{ \"X-Api-Key\" = \"soak\" }}\n\
             parameters = {{ type = \"object\", properties = {{ ticker = {{ type = \"string\" }} }}, required = [\"ticker\"] }}\n\
             [memory]\nextraction_model = \"a\"\nsettle = \"1s\"\n\
             [files]\ndir = \"{}\"\n",
            dir.join("usage.db").display(),
            mock.base_url(),
            dir.join("files").display(),
            root = mock.base_url().trim_end_matches("/v1"),
        ),
    )
    .unwrap();
    let child = serve_binary(&config);
    let pid = child.id().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await,
        "the gateway never listened"
    );
    let base = format!("http://127.0.0.1:{port}");
    // Ready, as a load balancer would wait for: providers and tokenizers warmed up.
    let client = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..400 {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the gateway never became ready");
    Gateway { child, pid, base }
}

/// Which store a scenario runs on.
#[derive(Clone, Copy, Debug)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A name no other test of this run uses.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{tag}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The `[database]` section for `db` (a fresh SQLite file, or a fresh PostgreSQL schema)
/// and the directory to remove afterwards; `None`, with a notice, when PostgreSQL is not
/// configured.
pub fn database(db: Db, tag: &str) -> Option<(String, Option<std::path::PathBuf>)> {
    match db {
        Db::Sqlite => {
            let dir = std::env::temp_dir().join(unique(&format!("switchyard_{tag}")));
            std::fs::create_dir_all(&dir).unwrap();
            let url = format!("sqlite://{}", dir.join("sy.db").display());
            Some((format!("[database]\nurl = \"{url}\"\n"), Some(dir)))
        }
        Db::Postgres => {
            let Ok(url) = std::env::var("SWITCHYARD_TEST_POSTGRES_URL") else {
                notice("SWITCHYARD_TEST_POSTGRES_URL is not set; PostgreSQL case skipped");
                return None;
            };
            let schema = unique(&format!("sy_{tag}"));
            Some((
                format!("[database]\nurl = \"{url}\"\nschema = \"{schema}\"\n"),
                None,
            ))
        }
    }
}

/// Anonymous memory of this test process, from /proc (Linux; `None` elsewhere).
pub fn rss_anon_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
