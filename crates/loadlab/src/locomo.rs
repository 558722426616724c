//! `switchyard bench memory --locomo FILE…`: memory retrieval quality on conversations of
//! the public LoCoMo benchmark, measured through the target's `/v1/memories` API.
//!
//! For each conversation file: every dialogue turn is stored as one memory of one fresh
//! user (`infer: false`, text "Speaker: words" plus the image caption when the turn shared
//! one, metadata `{"dia_id": …}`); then every question of categories 1–4 is searched with
//! its text alone (limit 10), and the top results' `dia_id`s are compared with the
//! question's evidence: recall@k (any) is the share of questions with at least one
//! evidence turn in the top k, recall@k (all) the share with every one. Search latency is
//! measured at the client, one search at a time.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

/// The cut-offs reported.
const KS: [usize; 3] = [1, 5, 10];

#[derive(Debug, Clone, Args)]
pub struct MemoryBenchArgs {
    /// LoCoMo conversation files (JSON, one conversation each).
    #[arg(long, required = true, num_args = 1..)]
    pub locomo: Vec<PathBuf>,
    /// Base URL of the target.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Bearer token for the target.
    #[arg(long, env = "SWITCHYARD_API_KEY")]
    pub api_key: Option<String>,
    /// Print one JSON document instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// One turn of a conversation, as stored.
struct Turn {
    dia_id: String,
    text: String,
}

/// One question with its evidence.
struct Question {
    text: String,
    evidence: BTreeSet<String>,
}

/// Reads a LoCoMo file: its turns in order and its questions of categories 1–4.
fn read(path: &PathBuf) -> anyhow::Result<(Vec<Turn>, Vec<Question>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let file: Value = serde_json::from_str(&text).with_context(|| format!("parsing {path:?}"))?;
    let conversation = file.get("conversation").unwrap_or(&file);
    let mut turns = Vec::new();
    for n in 1.. {
        let Some(session) = conversation
            .get(format!("session_{n}"))
            .and_then(Value::as_array)
        else {
            break;
        };
        for turn in session {
            let field = |name: &str| turn.get(name).and_then(Value::as_str).unwrap_or_default();
            let mut text = format!("{}: {}", field("speaker"), field("text"));
            if !field("blip_caption").is_empty() {
                text.push_str(&format!(" [shares {}]", field("blip_caption")));
            }
            turns.push(Turn {
                dia_id: field("dia_id").to_owned(),
                text,
            });
        }
    }
    let questions: Vec<Question> = file
        .get("qa")
        .and_then(Value::as_array)
        .map(|qa| {
            qa.iter()
                .filter(|q| matches!(q.get("category").and_then(Value::as_u64), Some(1..=4)))
                .filter_map(|q| {
                    Some(Question {
                        text: q.get("question")?.as_str()?.to_owned(),
                        evidence: q
                            .get("evidence")?
                            .as_array()?
                            .iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if turns.is_empty() || questions.is_empty() {
        bail!("{path:?}: no dialogue turns or no questions of categories 1-4");
    }
    Ok((turns, questions))
}

/// The figures of one run.
#[derive(Debug, Serialize)]
pub struct MemoryReport {
    pub conversations: usize,
    pub memories: usize,
    pub questions: usize,
    /// recall@1, @5, @10 (any evidence), percent.
    pub recall_any: [f64; 3],
    /// recall@1, @5, @10 (all evidence), percent.
    pub recall_all: [f64; 3],
    pub search_p50_ms: f64,
    pub search_p99_ms: f64,
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// Unreadable files, or a target that refuses a store or a search.
pub async fn run(args: MemoryBenchArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "memory retrieval: {} conversations, {} memories, {} questions (categories 1-4)",
            report.conversations, report.memories, report.questions
        );
        println!(
            "recall@1/5/10 (any evidence): {:.1}% / {:.1}% / {:.1}%",
            report.recall_any[0], report.recall_any[1], report.recall_any[2]
        );
        println!(
            "recall@1/5/10 (all evidence): {:.1}% / {:.1}% / {:.1}%",
            report.recall_all[0], report.recall_all[1], report.recall_all[2]
        );
        println!(
            "search latency: P50 {:.3} ms, P99 {:.3} ms",
            report.search_p50_ms, report.search_p99_ms
        );
    }
    Ok(())
}

/// Stores, searches and scores every file.
///
/// # Errors
/// As [`run`].
pub async fn measure(args: &MemoryBenchArgs) -> anyhow::Result<MemoryReport> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = args.target.trim_end_matches('/').to_owned();
    let post = |path: &str, body: Value| {
        let mut request = client.post(format!("{base}{path}")).json(&body);
        if let Some(key) = &args.api_key {
            request = request.bearer_auth(key);
        }
        request
    };
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut any, mut all) = ([0usize; 3], [0usize; 3]);
    let (mut memories, mut questions) = (0usize, 0usize);
    for path in &args.locomo {
        let (turns, qa) = read(path)?;
        let stem = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into());
        let user = format!("locomo-{stem}-{nonce}");
        for turn in &turns {
            let response = post(
                "/v1/memories",
                json!({
                    "user": user,
                    "infer": false,
                    "messages": [{"role": "user", "content": turn.text}],
                    "metadata": {"dia_id": turn.dia_id}
                }),
            )
            .send()
            .await
            .context("storing a memory")?;
            if !response.status().is_success() {
                bail!(
                    "storing a memory: {}",
                    response.text().await.unwrap_or_default()
                );
            }
        }
        memories += turns.len();
        for question in &qa {
            let started = Instant::now();
            let response = post(
                "/v1/memories/search",
                json!({"user": user, "query": question.text, "limit": 10}),
            )
            .send()
            .await
            .context("searching")?;
            let status = response.status();
            let found: Value = response.json().await.context("reading a search")?;
            latency.record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))?;
            if !status.is_success() {
                bail!("search answered {status}: {found}");
            }
            let ids: Vec<&str> = found["data"]
                .as_array()
                .map(|data| {
                    data.iter()
                        .map(|m| m["metadata"]["dia_id"].as_str().unwrap_or_default())
                        .collect()
                })
                .unwrap_or_default();
            for (i, k) in KS.iter().enumerate() {
                let top: BTreeSet<&str> = ids.iter().take(*k).copied().collect();
                let hits = question
                    .evidence
                    .iter()
                    .filter(|e| top.contains(e.as_str()))
                    .count();
                // A question without evidence counts as missed, in both.
                any[i] += usize::from(hits > 0);
                all[i] += usize::from(hits > 0 && hits == question.evidence.len());
            }
            questions += 1;
        }
        // Leave nothing behind on the target.
        let mut request = client.delete(format!("{base}/v1/memories?user={user}"));
        if let Some(key) = &args.api_key {
            request = request.bearer_auth(key);
        }
        let _ = request.send().await;
    }
    let share = |n: usize| 100.0 * n as f64 / questions.max(1) as f64;
    Ok(MemoryReport {
        conversations: args.locomo.len(),
        memories,
        questions,
        recall_any: any.map(share),
        recall_all: all.map(share),
        search_p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        search_p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
    })
}
