//! PostgreSQL restarting under load: requests keep being served (keys are cached, usage
//! rows wait in the writer's queue) and every row is written once the database is back.
//!
//! It restarts the server it tests against, so it lives alone in this test binary
//! (`cargo test` runs test binaries one after another). Needs
//! `SWITCHYARD_TEST_POSTGRES_URL` and `SWITCHYARD_TEST_PG_RESTART` (the shell command that
//! restarts PostgreSQL; `.ci/run` sets both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;

#[tokio::test]
async fn the_gateway_keeps_serving_and_writes_every_row_across_a_postgres_restart() {
    let (Ok(url), Ok(restart)) = (
        std::env::var("SWITCHYARD_TEST_POSTGRES_URL"),
        std::env::var("SWITCHYARD_TEST_PG_RESTART"),
    ) else {
        common::notice(
            "SWITCHYARD_TEST_POSTGRES_URL or SWITCHYARD_TEST_PG_RESTART is not set; the PostgreSQL restart test skipped",
        );
        return;
    };
    let schema = format!("sy_restart_{}", std::process::id());
    let m = mock(MockConfig::default()).await;
    let tail = format!(
        "[auth]\nmode = \"keys\"\n[admin]\nkey = \"admin\"\n\
         [database]\nurl = \"{url}\"\nschema = \"{schema}\"\nacquire_timeout = \"1s\"\n\
         [usage]\nflush_interval = \"100ms\"\n"
    );
    let toml = config_for(&m, "", "", &tail);
    let app = TestApp::spawn_toml(m, &toml).await;
    let created: Value = app
        .client
        .post(app.url("/admin/keys"))
        .bearer_auth("admin")
        .json(&json!({"name": "restart", "rpm": 100000}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (client, url, key) = (
                app.client.clone(),
                app.url("/v1/chat/completions"),
                key.clone(),
            );
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                // Bounded: stops when told, and after 20,000 requests in any case.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let r = client
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&chat_body("m", "through a restart"))
                        .send()
                        .await
                        .unwrap();
                    if r.status() == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = r.bytes().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    let status = tokio::process::Command::new("sh")
        .args(["-c", &restart])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "restart command failed: {restart}");
    let during = ok.load(Ordering::Relaxed) - before;
    // Keep the load on while the pool reconnects and the writer catches up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let ok = ok.load(Ordering::Relaxed) as i64;
    let failed = failed.load(Ordering::Relaxed);
    eprintln!("restart: {ok} ok ({during} while PostgreSQL restarted), {failed} failed");
    assert_eq!(failed, 0, "every request was served through the restart");
    assert!(during > 0, "requests were served while PostgreSQL was down");

    // Every answered request has its row once the writer has caught up.
    let mut rows = 0;
    for _ in 0..200 {
        rows = app.state.store.usage_rows().await.unwrap_or(0);
        if rows >= ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        rows, ok,
        "one row per answered request after PostgreSQL came back"
    );
    let usage = app.state.inference.usage_sink().unwrap();
    assert_eq!(usage.counters.dropped.load(Ordering::Relaxed), 0);
    let write_errors = usage.counters.write_errors.load(Ordering::Relaxed);
    eprintln!("restart: the writer saw {write_errors} failed writes and retried them");
    assert!(
        write_errors > 0,
        "the outage reached the writer (the restart command must keep PostgreSQL down a while)"
    );
    assert!(
        app.state.store.check_health().await,
        "the store reports healthy again"
    );
}
