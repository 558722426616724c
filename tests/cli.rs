//! The `switchyard` binary itself: check-config, offline serve with SIGTERM, mock-upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(url: &str) {
    assert!(raw_http::blocking_get_ok(url), "{url} never answered");
}

mod raw_http {
    //! A tiny blocking HTTP GET over std, so these tests need no extra client features.
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    pub fn get(url: &str) -> Option<(u16, String)> {
        let rest = url.strip_prefix("http://")?;
        let (host, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
        let mut s = TcpStream::connect(host).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    pub fn post(url: &str, json: &str) -> Option<(u16, String)> {
        let rest = url.strip_prefix("http://")?;
        let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
        let mut s = TcpStream::connect(host).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
            json.len()
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    pub fn blocking_get_ok(url: &str) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if matches!(get(url), Some((200, _))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

#[test]
fn check_config_accepts_the_example_and_names_a_missing_variable() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/switchyard.example.toml");
    let ok = Command::new(BIN)
        .args(["check-config", "--config", example])
        .env("OPENAI_API_KEY", "sk-1")
        .env("DEEPSEEK_API_KEY", "sk-2")
        .env("ANTHROPIC_API_KEY", "sk-3")
        .env("SWITCHYARD_ADMIN_KEY", "admin")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let missing = Command::new(BIN)
        .args(["check-config", "--config", example])
        .env_remove("OPENAI_API_KEY")
        .env("DEEPSEEK_API_KEY", "sk-2")
        .env("ANTHROPIC_API_KEY", "sk-3")
        .env("SWITCHYARD_ADMIN_KEY", "admin")
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one-line reason: {stderr}"
    );
    assert!(stderr.contains("OPENAI_API_KEY"), "{stderr}");
    assert!(stderr.contains("providers.openai.api_key"), "{stderr}");
}

#[test]
fn check_config_rejects_nonsense_with_one_line() {
    let dir = std::env::temp_dir().join(format!("switchyard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[models.x]\nprovider = \"nowhere\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown provider"), "{stderr}");
}

#[test]
fn serve_runs_offline_on_the_simulated_provider_and_exits_0_on_sigterm() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // The default database is ./switchyard.db: run where it may be created.
    let dir = std::env::temp_dir().join(format!("switchyard-offline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(&dir)
        .env_remove("SWITCHYARD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&format!("{base}/ready"));
    let (status, body) = raw_http::post(
        &format!("{base}/v1/chat/completions"),
        r#"{"model":"switchyard/echo","messages":[{"role":"user","content":"offline works"}]}"#,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("offline works"), "{body}");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    let output = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&output.stdout);
    assert!(
        logs.contains("SIMULATED"),
        "the simulated provider is announced: {logs}"
    );
    assert!(
        dir.join("switchyard.db").exists(),
        "the default SQLite file was created"
    );
}

#[test]
fn mock_upstream_serves_stats() {
    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "mock-upstream",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--latency-ms",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_for(&format!("{base}/stats"));
    let (status, _) = raw_http::post(
        &format!("{base}/v1/chat/completions"),
        r#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap();
    assert_eq!(status, 200);
    let (_, stats) = raw_http::get(&format!("{base}/stats")).unwrap();
    assert!(stats.contains("\"chat\":1"), "{stats}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[test]
fn keys_are_created_listed_and_revoked_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("switchyard-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"sqlite://{}\"\n",
            dir.join("keys.db").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let migrate = run(&["migrate"]);
    assert!(migrate.status.success(), "{migrate:?}");

    let created = run(&[
        "keys",
        "create",
        "--name",
        "ci-bot",
        "--models",
        "a,b",
        "--rpm",
        "60",
        "--budget",
        "1000",
        "--budget-period",
        "day",
    ]);
    assert!(created.status.success(), "{created:?}");
    let stdout = String::from_utf8(created.stdout).unwrap();
    let secret = stdout.lines().last().unwrap();
    assert!(
        secret.starts_with("sk-sy-") && !secret.contains(' '),
        "{stdout}"
    );
    let id = stdout
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .unwrap()
        .to_owned();

    let listed = run(&["keys", "list", "--json"]);
    let listed = String::from_utf8(listed.stdout).unwrap();
    let keys: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(keys[0]["id"], id.as_str());
    assert_eq!(keys[0]["models"], "a,b");
    assert_eq!(keys[0]["rpm"], 60);
    assert_eq!(keys[0]["budget_period"], "day");
    assert!(
        !listed.contains(&secret[6..]),
        "a listing never shows the secret"
    );
    let table = String::from_utf8(run(&["keys", "list"]).stdout).unwrap();
    assert!(
        table.contains("ci-bot") && table.contains("active"),
        "{table}"
    );

    assert!(run(&["keys", "revoke", &id]).status.success());
    let table = String::from_utf8(run(&["keys", "list"]).stdout).unwrap();
    assert!(table.contains("revoked"), "{table}");
    let again = run(&["keys", "revoke", &id]);
    assert!(!again.status.success(), "revoking twice fails");
    let bad = run(&["keys", "create", "--name", "x", "--rpm", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("at least 1"));
}
