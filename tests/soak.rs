//! `switchyard bench --soak` against the real binary: mixed traffic with injected faults,
//! the gateway sampled to CSV and SVG, and the verdict on drift.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use switchyard_loadlab::mock::{MockConfig, MockServer};

/// A short soak of mixed traffic (chat, streams, dropped streams, embeddings, client
/// errors, conversation turns with memory and a tool, uploads) through the real binary: the samples are written as CSV and SVG, every injected
/// fault is answered as expected, nothing else fails, and memory and descriptors hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_holds_steady_and_writes_its_samples() {
    use clap::Parser as _;
    switchyard::app::install_crypto();
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), MockConfig::default())
        .await
        .unwrap();
    let mut gateway = common::spawn_gateway(&mock, "soak").await;
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
        "--soak-turn-model",
        "t",
        "--soak-uploads",
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
    // The turns ran the tool loop and fed the memory pipeline: a user's memories say
    // where they live (turns go to users 7, 8, 9, 17, 18, 19, … of the fifty).
    let tool_calls = mock.stats().tools;
    let memories: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/memories?user=soak-17", gateway.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stats: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/admin/stats", gateway.base))
        .bearer_auth("memory-admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    gateway.child.kill().await.unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert!(
        tool_calls >= 200,
        "the turns called the quote tool: {tool_calls}"
    );
    let recalled = memories["data"].as_array().cloned().unwrap_or_default();
    assert!(
        recalled.iter().any(|m| m["memory"]
            .as_str()
            .unwrap_or_default()
            .contains("Soaktown")),
        "the turns' facts were extracted: {memories}\n{}",
        stats["memory"]
    );
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
