//! Memory that grows with every request: the real binary, under a bounded load with no
//! `/metrics` scrape, must hold its heap flat once warm. A gateway that keeps something
//! per request (a metrics sample, a log buffer, a map entry) grows by tens of bytes a
//! request, which is megabytes over this run and gigabytes a day in production.
//!
//! The figure compared is the allocator's count of live bytes (`heap.allocated_bytes` in
//! `/admin/stats`), not RSS: resident pages move by several MiB either way as the
//! allocator purges freed pages on its own schedule, which would hide a slow leak or fail
//! a sound build. `RssAnon` is printed alongside, and must stay within a loose bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use switchyard_loadlab::mock::{MockConfig, MockServer};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Requests before the first reading (allocator pools, caches and connections are warm).
const WARM: usize = 20_000;
/// Requests in all; the issue that this test guards against grew ~65 bytes a request.
const TOTAL: usize = 200_000;
/// Allowed heap growth between the two readings: a leak of 12 bytes a request exceeds it.
const HEAP_SLACK: u64 = 2 * 1024 * 1024;
/// Allowed `RssAnon` growth: page-level noise is several MiB; the leak this test was
/// written for added 11 MiB over the run.
const RSS_SLACK_KIB: u64 = 10 * 1024;

fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("RssAnon in /proc/PID/status")
}

/// Live heap bytes, from the admin statistics.
async fn heap_allocated(client: &reqwest::Client, base: &str) -> u64 {
    let stats: serde_json::Value = client
        .get(format!("{base}/admin/stats"))
        .bearer_auth("memory-admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stats["heap"]["allocated_bytes"]
        .as_u64()
        .expect("heap.allocated_bytes in /admin/stats")
}

/// Sends `n` requests, 32 at a time, each checked.
async fn load(client: &reqwest::Client, url: &str, from: usize, n: usize) {
    let bodies = (from..from + n).map(|i| {
        // A few distinct models and bodies, as real traffic has, plus a stream now and then.
        json!({
            "model": if i % 2 == 0 { "a" } else { "b" },
            "stream": i % 10 == 0,
            "messages": [{"role": "user", "content": format!("request {}", i % 1000)}],
        })
    });
    let statuses: Vec<u16> = futures_util::stream::iter(bodies)
        .map(|body| async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            r.bytes().await.unwrap();
            status
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "every request answered");
}

/// The real binary on its own port in front of `mock`, with a SQLite usage log, an admin
/// key, aliases `a` and `b` (chat) and `e` (embeddings).
struct Gateway {
    child: tokio::process::Child,
    pid: u32,
    base: String,
}

async fn spawn_gateway(mock: &MockServer, name: &str) -> Gateway {
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
             [models.e]\nprovider = \"mock\"\nmodel = \"mock-embed\"\n",
            dir.join("usage.db").display(),
            mock.base_url()
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    assert!(
        common::eventually(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await,
        "the gateway never listened"
    );
    Gateway {
        child,
        pid,
        base: format!("http://127.0.0.1:{port}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_without_a_metrics_scrape() {
    switchyard::app::install_crypto();
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), MockConfig::default())
        .await
        .unwrap();
    let Gateway {
        mut child,
        pid,
        base,
    } = spawn_gateway(&mock, "memory").await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    load(&client, &url, 0, WARM).await;
    // The recorder's buffers are drained every 5 s: read both figures just after a drain.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (warm_heap, warm_rss) = (heap_allocated(&client, &base).await, rss_anon_kib(pid));
    load(&client, &url, WARM, TOTAL - WARM).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (heap, rss) = (heap_allocated(&client, &base).await, rss_anon_kib(pid));
    child.kill().await.unwrap();
    let heap_grown = heap.saturating_sub(warm_heap);
    let rss_grown = rss.saturating_sub(warm_rss);
    eprintln!(
        "after {WARM} requests: heap {warm_heap} B, RssAnon {warm_rss} KiB; \
         after {TOTAL}: heap {heap} B (+{heap_grown}), RssAnon {rss} KiB (+{rss_grown})"
    );
    assert!(
        heap_grown <= HEAP_SLACK,
        "the heap grew by {heap_grown} bytes over {} requests ({:.1} bytes a request)",
        TOTAL - WARM,
        heap_grown as f64 / (TOTAL - WARM) as f64
    );
    assert!(
        rss_grown <= RSS_SLACK_KIB,
        "anonymous memory grew by {rss_grown} KiB over {} requests",
        TOTAL - WARM
    );
}

/// A short soak of mixed traffic (chat, streams, dropped streams, embeddings, client
/// errors) through the real binary: the samples are written as CSV and SVG, every injected
/// fault is answered as expected, nothing else fails, and memory and descriptors hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_holds_steady_and_writes_its_samples() {
    use clap::Parser as _;
    switchyard::app::install_crypto();
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), MockConfig::default())
        .await
        .unwrap();
    let mut gateway = spawn_gateway(&mock, "soak").await;
    let out = std::env::temp_dir().join(format!("switchyard_soak_out_{}", std::process::id()));
    let pid = gateway.pid.to_string();
    let out_arg = out.display().to_string();
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: switchyard_loadlab::bench::BenchArgs,
    }
    let cli = Cli::parse_from([
        "bench",
        "--target",
        &gateway.base,
        "--model",
        "a",
        "--rate",
        "100",
        "--soak",
        "40s",
        "--soak-settle",
        "15s",
        "--sample-every",
        "2s",
        "--soak-embeddings-model",
        "e",
        "--admin-key",
        "memory-admin",
        "--target-pid",
        &pid,
        "--soak-out",
        &out_arg,
    ]);
    let report = switchyard_loadlab::soak::soak(&cli.bench, Duration::from_secs(40))
        .await
        .unwrap();
    gateway.child.kill().await.unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report.unexpected, 0, "{:?}", report.unexpected_examples);
    assert!(report.requests >= 3_500, "about 4,000 requests were sent");
    assert!(
        report.injected >= report.requests / 10,
        "a dropped stream and two client errors in every twenty requests"
    );
    let csv = std::fs::read_to_string(&report.csv).unwrap();
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("t_s,rss_mib,heap_mib,fds")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(rows.len() >= 15, "a sample every 2 s for 40 s");
    // The admin figures were read: heap, live tasks and database connections.
    assert!(
        rows.iter()
            .all(|r| !r[2].is_empty() && !r[5].is_empty() && !r[6].is_empty())
    );
    let svg = std::fs::read_to_string(&report.svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() >= 5);
    assert!(report.passed, "RSS or descriptors drifted: {report:?}");
}
