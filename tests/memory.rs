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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_without_a_metrics_scrape() {
    switchyard::app::install_crypto();
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), MockConfig::default())
        .await
        .unwrap();
    let common::Gateway {
        mut child,
        pid,
        base,
    } = common::spawn_gateway(&mock, "memory").await;
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
