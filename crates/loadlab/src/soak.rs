//! `switchyard bench --soak 1h`: mixed traffic at a steady rate for a long time, with the
//! target process sampled at a fixed interval, to show that it does not grow.
//!
//! Every slot of the timetable sends one request from a fixed cycle of twenty: chat
//! (nine), an upload with `--soak-uploads` (a small file sent, read back and deleted;
//! chat otherwise), streamed chat read to `[DONE]` (three), a stream the client drops
//! after its first bytes, embeddings (or chat when no embeddings model is given), a
//! malformed body (expected 400), an unknown model (expected 4xx), and three conversation
//! turns (a conversation of one of fifty users created with two items, then a
//! `/v1/responses` turn on it on `--soak-turn-model`, one of the three streamed to
//! `response.completed`; each turn says where its user lives, which changes over the run,
//! so an alias with memory on extracts, updates and recalls facts, and one with a tool
//! runs the tool loop). The drops and the 4xx are the injected faults; any other failure
//! is unexpected and fails the run.
//!
//! Every `--sample-every` the target's RSS, open descriptors and threads are read from
//! `/proc`, and, with `--admin-key`, its heap, live tasks, database pool and queue from
//! `/admin/stats`. The samples go to `soak.csv` and `soak.svg` (one small chart per series)
//! in `--soak-out`. Verdict: after `--soak-settle`, the median of the last third of the
//! samples within ±10 % of the first third's for RSS and ±5 % (at least ±2) for open
//! descriptors, and no unexpected error.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::bench::{self, BenchArgs};

/// Requests in flight at most; a slot that finds this many is counted as an overload.
const MAX_IN_FLIGHT: u64 = 2_000;
/// RSS may drift this far between the early and late settled samples.
const RSS_BAND: f64 = 0.10;
/// Open descriptors may drift this far (and at least `FD_MIN_BAND`): a few sockets are
/// always opening or closing at a sample when the load drops connections on purpose (a
/// short run at 100 requests/s moved between 30 and 35 with no trend), while a leak adds
/// one per request or per connection.
const FD_BAND: f64 = 0.05;
const FD_MIN_BAND: f64 = 4.0;

/// One reading of the target.
#[derive(Debug, Clone)]
pub struct Sample {
    pub t_s: f64,
    pub rss_mib: f64,
    pub heap_mib: Option<f64>,
    pub fds: u64,
    pub threads: u64,
    pub tasks: Option<u64>,
    pub db_connections: Option<u64>,
    pub db_idle: Option<u64>,
    pub queued: Option<u64>,
    pub in_flight: Option<u64>,
    /// Requests finished so far, and of them the unexpected failures.
    pub requests: u64,
    pub unexpected: u64,
}

/// What a soak run found.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub duration_s: f64,
    pub settle_s: f64,
    pub rate: f64,
    pub requests: u64,
    /// Client errors and dropped streams sent on purpose, answered as expected.
    pub injected: u64,
    pub unexpected: u64,
    /// A few of the unexpected failures, for the reader.
    pub unexpected_examples: Vec<String>,
    pub rss_median_mib: f64,
    pub rss_min_mib: f64,
    pub rss_max_mib: f64,
    pub fds_median: f64,
    pub fds_min: u64,
    pub fds_max: u64,
    pub passed: bool,
    pub csv: PathBuf,
    pub svg: PathBuf,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    injected: AtomicU64,
    unexpected: AtomicU64,
    in_flight: AtomicU64,
    examples: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, what: String) {
        self.unexpected.fetch_add(1, Ordering::Relaxed);
        let mut examples = self
            .examples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if examples.len() < 5 {
            examples.push(what);
        }
    }
}

/// The request kinds of the cycle.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat,
    Stream,
    DroppedStream,
    Embeddings,
    Malformed,
    UnknownModel,
    /// A conversation created with two items, then a Responses turn on it.
    Turn,
    /// The same, the turn streamed to its `response.completed`.
    StreamedTurn,
    /// A small file uploaded, read back and deleted.
    Upload,
}

fn kind_of(slot: u64, uploads: bool) -> Kind {
    match slot % 20 {
        0 if uploads => Kind::Upload,
        0..=9 => Kind::Chat,
        10..=12 => Kind::Stream,
        13 => Kind::DroppedStream,
        14 => Kind::Embeddings,
        15 => Kind::Malformed,
        16 => Kind::UnknownModel,
        17 | 18 => Kind::Turn,
        _ => Kind::StreamedTurn,
    }
}

/// Runs a soak as `args` describe; prints the report and fails when the verdict does.
pub async fn run(args: &BenchArgs, duration: Duration) -> anyhow::Result<()> {
    let report = soak(args, duration).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "soak {:.0}s at {} req/s: {} requests, {} injected faults, {} unexpected\n\
             RSS after {:.0}s: median {:.1} MiB, {:.1}–{:.1} MiB (drift band ±{:.0} %)\n\
             fds after settling: median {}, {}–{} (drift band ±{:.0} %)\n\
             samples: {}\nplot: {}\nverdict: {}",
            report.duration_s,
            report.rate,
            report.requests,
            report.injected,
            report.unexpected,
            report.settle_s,
            report.rss_median_mib,
            report.rss_min_mib,
            report.rss_max_mib,
            RSS_BAND * 100.0,
            report.fds_median,
            report.fds_min,
            report.fds_max,
            FD_BAND * 100.0,
            report.csv.display(),
            report.svg.display(),
            if report.passed { "PASS" } else { "FAIL" },
        );
        for example in &report.unexpected_examples {
            println!("  unexpected: {example}");
        }
    }
    ensure!(report.passed, "the soak failed its verdict");
    Ok(())
}

/// Runs the soak and returns its report (tests call this).
pub async fn soak(args: &BenchArgs, duration: Duration) -> anyhow::Result<SoakReport> {
    let pid = args
        .target_pid
        .context("--soak needs --target-pid: the process whose memory is sampled")?;
    bench::ensure_crypto_provider();
    let rate = args.rate.unwrap_or(100.0);
    ensure!(rate.is_finite() && rate > 0.0, "--rate must be positive");
    ensure!(
        args.soak_settle < duration,
        "--soak-settle must be shorter than the soak"
    );
    std::fs::create_dir_all(&args.soak_out)
        .with_context(|| format!("creating {}", args.soak_out.display()))?;
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .pool_max_idle_per_host(256)
        .build()?;
    let target = args.target.trim_end_matches('/').to_owned();
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let end = start + duration;

    let sampler = {
        let (client, target, counters) = (client.clone(), target.clone(), Arc::clone(&counters));
        let (admin_key, every) = (args.admin_key.clone(), args.sample_every);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if Instant::now() > end {
                    return samples;
                }
                let admin = match &admin_key {
                    Some(key) => admin_stats(&client, &target, key).await,
                    None => None,
                };
                if let Some(sample) = read_sample(pid, start, admin.as_ref(), &counters) {
                    samples.push(sample);
                }
            }
        })
    };

    let mut requests = JoinSet::new();
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut slot: u64 = 0;
    loop {
        let due = start + period.mul_f64(slot as f64);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        while requests.try_join_next().is_some() {}
        if counters.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            counters.fail("the target fell behind: too many requests in flight".into());
        } else {
            counters.in_flight.fetch_add(1, Ordering::Relaxed);
            let request = Request {
                client: client.clone(),
                target: target.clone(),
                model: args.model.clone(),
                turn_model: args
                    .soak_turn_model
                    .clone()
                    .unwrap_or_else(|| args.model.clone()),
                embeddings_model: args.soak_embeddings_model.clone(),
                api_key: args.api_key.clone(),
                counters: Arc::clone(&counters),
            };
            requests.spawn(request.send(kind_of(slot, args.soak_uploads), slot));
        }
        slot += 1;
    }
    let deadline = Instant::now() + args.timeout.saturating_add(bench::DRAIN_GRACE);
    bench::drain(&mut requests, deadline).await;
    let samples = sampler.await.context("the sampler stopped")?;
    ensure!(!samples.is_empty(), "no sample of process {pid} was taken");

    let csv = args.soak_out.join("soak.csv");
    let svg = args.soak_out.join("soak.svg");
    std::fs::write(&csv, to_csv(&samples)).with_context(|| format!("writing {}", csv.display()))?;
    std::fs::write(&svg, to_svg(&samples)).with_context(|| format!("writing {}", svg.display()))?;

    let settled: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t_s >= args.soak_settle.as_secs_f64())
        .collect();
    ensure!(
        !settled.is_empty(),
        "no sample after --soak-settle: lengthen the soak or sample more often"
    );
    let rss: Vec<f64> = settled.iter().map(|s| s.rss_mib).collect();
    let fds: Vec<f64> = settled.iter().map(|s| s.fds as f64).collect();
    let (rss_median, fds_median) = (median(&rss), median(&fds));
    // Drift, not spikes: the median of the last third of the settled samples against the
    // median of the first third. A burst of slow answers opens connections for a moment;
    // a leak moves the whole later window.
    let drift = |values: &[f64]| {
        let third = (values.len() / 3).max(1);
        let (early, late) = (
            median(&values[..third]),
            median(&values[values.len() - third..]),
        );
        (late - early, early)
    };
    let (rss_drift, rss_early) = drift(&rss);
    let (fds_drift, fds_early) = drift(&fds);
    let rss_ok = rss_drift.abs() <= rss_early * RSS_BAND;
    let fds_ok = fds_drift.abs() <= (fds_early * FD_BAND).max(FD_MIN_BAND);
    let unexpected = counters.unexpected.load(Ordering::Relaxed);
    let examples = counters
        .examples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok(SoakReport {
        duration_s: duration.as_secs_f64(),
        settle_s: args.soak_settle.as_secs_f64(),
        rate,
        requests: counters.requests.load(Ordering::Relaxed),
        injected: counters.injected.load(Ordering::Relaxed),
        unexpected,
        unexpected_examples: examples,
        rss_median_mib: round2(rss_median),
        rss_min_mib: round2(rss.iter().copied().fold(f64::INFINITY, f64::min)),
        rss_max_mib: round2(rss.iter().copied().fold(0.0, f64::max)),
        fds_median,
        fds_min: settled.iter().map(|s| s.fds).min().unwrap_or(0),
        fds_max: settled.iter().map(|s| s.fds).max().unwrap_or(0),
        passed: rss_ok && fds_ok && unexpected == 0,
        csv,
        svg,
    })
}

struct Request {
    client: reqwest::Client,
    target: String,
    model: String,
    turn_model: String,
    embeddings_model: Option<String>,
    api_key: Option<String>,
    counters: Arc<Counters>,
}

impl Request {
    async fn send(self, kind: Kind, slot: u64) {
        let outcome = self.exchange(kind, slot).await;
        let counters = &self.counters;
        counters.requests.fetch_add(1, Ordering::Relaxed);
        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(true) => {
                counters.injected.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => counters.fail(format!("{kind:?}: {e:#}")),
        }
    }

    /// A conversation of two items, then one turn on it (streamed or not), checked.
    async fn turn(&self, slot: u64, stream: bool) -> anyhow::Result<bool> {
        let created = self
            .post(&format!("{}/v1/conversations", self.target))
            .json(
                &json!({"metadata": {"user": format!("soak-{}", slot % 50)}, "items": [
                    {"role": "user", "content": "remember the soak"},
                    {"role": "assistant", "content": "remembered"},
                ]}),
            )
            .send()
            .await?;
        ensure!(
            created.status().is_success(),
            "conversation: {}",
            created.status()
        );
        let conversation: Value = created.json().await?;
        let id = conversation["id"].as_str().unwrap_or_default().to_owned();
        let response = self
            .post(&format!("{}/v1/responses", self.target))
            .json(
                &json!({"model": self.turn_model, "conversation": id, "stream": stream,
                          "input": format!("I live in Soaktown {}. What is the quote for SOAK{}?",
                                           (slot / 1_000) % 7, slot % 500)}),
            )
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "turn: {}",
            response.status()
        );
        if stream {
            let text = response.text().await?;
            ensure!(
                text.contains("event: response.completed"),
                "a turn stream that did not complete"
            );
        } else {
            let body: Value = response.json().await?;
            ensure!(
                body["status"] == "completed",
                "a turn that did not complete: {body}"
            );
        }
        Ok(false)
    }

    /// Uploads a small file as multipart form data, reads it back and deletes it.
    async fn upload(&self, slot: u64) -> anyhow::Result<bool> {
        const BOUNDARY: &str = "switchyard-soak-boundary";
        let content = format!("{{\"soak\": {slot}}}\n");
        let body = format!(
            "--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nuser_data\r\n\
             --{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"soak.jsonl\"\r\n\
             content-type: application/jsonl\r\n\r\n{content}\r\n--{BOUNDARY}--\r\n"
        );
        let files = format!("{}/v1/files", self.target);
        let uploaded = self
            .post(&files)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body)
            .send()
            .await?;
        ensure!(
            uploaded.status().is_success(),
            "upload: {}",
            uploaded.status()
        );
        let file: Value = uploaded.json().await?;
        let id = file["id"].as_str().unwrap_or_default();
        ensure!(id.starts_with("file"), "an upload without an id: {file}");
        let url = format!("{files}/{id}");
        let read = self
            .with_key(self.client.get(format!("{url}/content")))
            .send()
            .await?;
        ensure!(read.status().is_success(), "content: {}", read.status());
        ensure!(read.text().await? == content, "the file came back changed");
        let deleted = self.with_key(self.client.delete(&url)).send().await?;
        ensure!(
            deleted.status().is_success(),
            "delete: {}",
            deleted.status()
        );
        deleted.bytes().await?;
        Ok(false)
    }

    /// Sends one request of `kind`; `Ok(true)` for an injected fault answered as expected.
    async fn exchange(&self, kind: Kind, slot: u64) -> anyhow::Result<bool> {
        let chat = format!("{}/v1/chat/completions", self.target);
        let message = json!([{"role": "user", "content": format!("soak message {}", slot % 500)}]);
        let (url, body) = match kind {
            Kind::Turn => return self.turn(slot, false).await,
            Kind::StreamedTurn => return self.turn(slot, true).await,
            Kind::Upload => return self.upload(slot).await,
            Kind::Chat => (chat, json!({"model": self.model, "messages": message})),
            Kind::Stream | Kind::DroppedStream => (
                chat,
                json!({"model": self.model, "messages": message, "stream": true}),
            ),
            Kind::Embeddings => match &self.embeddings_model {
                Some(model) => (
                    format!("{}/v1/embeddings", self.target),
                    json!({"model": model, "input": format!("soak {}", slot % 500)}),
                ),
                None => (chat, json!({"model": self.model, "messages": message})),
            },
            Kind::UnknownModel => (
                chat,
                json!({"model": "soak-no-such-model", "messages": message}),
            ),
            Kind::Malformed => {
                let response = self
                    .post(&chat)
                    .header("content-type", "application/json")
                    .body("{\"model\": \"x\", \"messages\": [")
                    .send()
                    .await?;
                ensure!(
                    response.status() == 400,
                    "malformed body: {}",
                    response.status()
                );
                response.bytes().await?;
                return Ok(true);
            }
        };
        let response = self.post(&url).json(&body).send().await?;
        let status = response.status();
        if let Kind::UnknownModel = kind {
            ensure!(status.is_client_error(), "unknown model: {status}");
            response.bytes().await?;
            return Ok(true);
        }
        ensure!(status.is_success(), "{status}");
        match kind {
            Kind::DroppedStream => {
                let mut body = response.bytes_stream();
                body.next().await.transpose()?;
                // Dropping the body here closes the stream mid-way, as a client that goes away.
                Ok(true)
            }
            Kind::Stream => {
                let text = response.text().await?;
                ensure!(
                    text.trim_end().ends_with("data: [DONE]"),
                    "a stream that did not end with [DONE]"
                );
                Ok(false)
            }
            _ => {
                let body: Value = response.json().await?;
                ensure!(body.get("error").is_none(), "an error body: {body}");
                Ok(false)
            }
        }
    }

    fn post(&self, url: &str) -> reqwest::RequestBuilder {
        self.with_key(self.client.post(url))
    }

    fn with_key(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }
}

async fn admin_stats(client: &reqwest::Client, target: &str, key: &str) -> Option<Value> {
    let response = client
        .get(format!("{target}/admin/stats"))
        .bearer_auth(key)
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

fn read_sample(
    pid: u32,
    start: Instant,
    admin: Option<&Value>,
    counters: &Counters,
) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| bench::status_field(&status, name);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let at = |path: &[&str]| -> Option<u64> {
        let mut value = admin?;
        for key in path {
            value = value.get(key)?;
        }
        value.as_u64()
    };
    Some(Sample {
        t_s: round2(start.elapsed().as_secs_f64()),
        rss_mib: round2(field("VmRSS:")? as f64 / 1024.0),
        heap_mib: at(&["heap", "allocated_bytes"]).map(|b| round2(b as f64 / 1_048_576.0)),
        fds,
        threads: field("Threads:")?,
        tasks: at(&["runtime", "alive_tasks"]),
        db_connections: at(&["store", "connections"]),
        db_idle: at(&["store", "idle"]),
        queued: at(&["admission", "queued"]),
        in_flight: at(&["admission", "in_flight"]),
        requests: counters.requests.load(Ordering::Relaxed),
        unexpected: counters.unexpected.load(Ordering::Relaxed),
    })
}

fn to_csv(samples: &[Sample]) -> String {
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut out = String::from(
        "t_s,rss_mib,heap_mib,fds,threads,tasks,db_connections,db_idle,queued,in_flight,requests,unexpected\n",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            s.t_s,
            s.rss_mib,
            s.heap_mib.map(|h| h.to_string()).unwrap_or_default(),
            s.fds,
            s.threads,
            opt(s.tasks),
            opt(s.db_connections),
            opt(s.db_idle),
            opt(s.queued),
            opt(s.in_flight),
            s.requests,
            s.unexpected,
        );
    }
    out
}

/// One small line chart per series, stacked: drawn by hand (a few dozen lines of SVG) rather
/// than with a plotting crate and its font and image dependencies.
fn to_svg(samples: &[Sample]) -> String {
    type Series = (&'static str, fn(&Sample) -> Option<f64>);
    let series: [Series; 6] = [
        ("RSS (MiB)", |s| Some(s.rss_mib)),
        ("heap allocated (MiB)", |s| s.heap_mib),
        ("open file descriptors", |s| Some(s.fds as f64)),
        ("live tasks", |s| s.tasks.map(|t| t as f64)),
        ("database connections", |s| {
            s.db_connections.map(|c| c as f64)
        }),
        ("queued + in flight", |s| {
            Some((s.queued? + s.in_flight?) as f64)
        }),
    ];
    let (width, chart_h, gap, left) = (720.0, 110.0, 40.0, 70.0);
    let plot_w = width - left - 20.0;
    let t_max = samples.last().map_or(1.0, |s| s.t_s.max(1.0));
    let mut svg = String::new();
    let charts: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, get)| {
            let points = samples
                .iter()
                .filter_map(|s| Some((s.t_s, get(s)?)))
                .collect::<Vec<_>>();
            (*name, points)
        })
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let height = charts.len() as f64 * (chart_h + gap) + 30.0;
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, (name, points)) in charts.iter().enumerate() {
        let top = 20.0 + i as f64 * (chart_h + gap);
        let max = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
        let _ = writeln!(
            svg,
            r##"<text x="{left}" y="{}">{name}</text><rect x="{left}" y="{top}" width="{plot_w}" height="{chart_h}" fill="none" stroke="#bbb"/><text x="{}" y="{}" text-anchor="end">{:.1}</text><text x="{}" y="{}" text-anchor="end">0</text>"##,
            top - 5.0,
            left - 5.0,
            top + 10.0,
            max,
            left - 5.0,
            top + chart_h,
        );
        let path: Vec<String> = points
            .iter()
            .map(|(t, v)| {
                format!(
                    "{:.1},{:.1}",
                    left + t / t_max * plot_w,
                    top + chart_h - v / max * chart_h
                )
            })
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{}"/>"##,
            path.join(" ")
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{}">time (s), 0 – {t_max:.0}</text></svg>"#,
        height - 8.0
    );
    svg
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
