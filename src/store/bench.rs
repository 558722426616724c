//! `switchyard bench-writer`: how many usage rows per second the batched writer sustains
//! into the configured database, measured end to end (queue, batching, inserts, commits).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::store::Store;
use crate::store::usage::{self, UsageRecord};

/// Pushes `rows` synthetic rows through the writer as fast as its queue takes them.
///
/// # Errors
/// When the database cannot be opened.
pub async fn run(settings: &Settings, rows: u64) -> anyhow::Result<()> {
    let store = Store::connect(&settings.database).await?;
    let before = store.usage_rows().await?;
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    let sink = usage::start(store.clone(), &settings.usage, &tasks, cancel.clone());
    let key: Arc<str> = "key_bench".into();
    let deployment: Arc<str> = "bench/model".into();
    let request_id: Arc<str> = "bench".into();
    let started = Instant::now();
    for i in 0..rows {
        // Never drop: wait for room instead, so the figure is the writer's own pace.
        while sink.depth() + 1 >= settings.usage.queue {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        sink.record(UsageRecord {
            ts_ms: crate::limits::period::now_ms(),
            key_id: Some(key.clone()),
            route: "chat",
            alias: Some("bench".into()),
            deployment: Some(deployment.clone()),
            tokens_in: 12 + (i % 100) as i64,
            tokens_out: 40,
            latency_us: 1_500,
            ttfb_us: Some(900),
            status: 200,
            cache_hit: i % 3 == 0,
            request_id: request_id.clone(),
        });
    }
    while sink.counters.written.load(Ordering::Relaxed) < rows {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    cancel.cancel();
    tasks.close();
    tasks.wait().await;
    let after = store.usage_rows().await?;
    store.close().await;
    println!(
        "{} rows into {} in {:.2} s: {:.0} rows/s (batch {} rows, queue {}); table grew by {}, dropped {}",
        rows,
        store.backend(),
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64(),
        settings.usage.batch_rows,
        settings.usage.queue,
        after - before,
        sink.counters.dropped.load(Ordering::Relaxed),
    );
    Ok(())
}
