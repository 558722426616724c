//! `switchyard bench`: a load driver for OpenAI-compatible endpoints.
//!
//! It sends one request shape (chat, streamed chat or embeddings) either on an open-loop
//! timetable (`--rate`) or from a fixed number of closed-loop users (`--users`), optionally
//! interleaved with the same load sent straight to an upstream (`--compare-direct`), and reports
//! latency percentiles, errors by kind, the latency the target adds and the target's memory.
//!
//! Coordinated omission: a driver that waits for a slow answer before sending the next request
//! never sends the requests that would have seen the stall. In open loop every request has a
//! fixed scheduled start and its latency is measured from that instant, so queueing behind a
//! stall (in the target or in this driver) is counted rather than omitted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

/// Closed-loop users per side when neither `--rate` nor `--users` is given.
const DEFAULT_USERS: usize = 10;
/// How often the target's resident memory is sampled.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How often the progress bar's message is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Slack on top of `--timeout` before requests still in flight are abandoned.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Largest latency the histograms track (one hour, in microseconds); larger values saturate.
const HISTOGRAM_MAX_MICROS: u64 = 3_600_000_000;
/// Bytes of the end of an SSE body kept to check that it ended with `data: [DONE]`.
const SSE_TAIL: usize = 32;

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------

/// Which request shape `bench` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Non-stream chat completions.
    Chat,
    /// Streamed chat completions (SSE); time to first byte is reported.
    Stream,
    /// Embeddings.
    Embeddings,
    /// `POST /v1/responses`, a stored one-turn response each (the direct side sends the
    /// same chat call).
    Responses,
    /// `POST /v1/responses` streamed; time to the first event is reported.
    ResponsesStream,
    /// A turn of a stored conversation: `--conversations` conversations of `--history`
    /// items are created first, and each request is the next turn of one of them (the
    /// direct side sends the chat call with the same history).
    Conversation,
    /// A turn on `/v1/responses` whose model calls the alias's server-side tools, then
    /// answers (`--model` names such an alias; nothing is stored). The direct side makes
    /// the turn's two model calls one after the other: the call that asks for one tool,
    /// then the one that reads its result.
    ToolTurn,
}

/// Benchmarks other than load.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// Memory retrieval quality on LoCoMo conversations, through `/v1/memories`.
    Memory(crate::locomo::MemoryBenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// A benchmark other than load (`memory`); without one, load.
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// Base URL of the target, e.g. http://127.0.0.1:8080 (the /v1/... path is appended).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Model sent in every request.
    #[arg(long, default_value = crate::ECHO_MODEL)]
    pub model: String,
    /// Request shape.
    #[arg(long, value_enum, default_value_t = Scenario::Chat)]
    pub scenario: Scenario,
    /// Open loop: requests per second, scheduled on a fixed timetable; latency is measured
    /// from each request's scheduled start, so a stall is not hidden (no coordinated omission).
    #[arg(long, conflicts_with = "users")]
    pub rate: Option<f64>,
    /// Closed loop: this many concurrent users, each sending its next request when the
    /// previous one finished.
    #[arg(long)]
    pub users: Option<usize>,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured load before measuring, to fill pools and caches.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Also send the same load straight to this upstream base URL, interleaved with the
    /// target's, and report the latency the target adds.
    #[arg(long)]
    pub compare_direct: Option<String>,
    /// Model for the direct requests (defaults to --model).
    #[arg(long)]
    pub direct_model: Option<String>,
    /// Bearer token for the target.
    #[arg(long, env = "SWITCHYARD_API_KEY")]
    pub api_key: Option<String>,
    /// Also send the same load to the target with this model, interleaved, and report
    /// what --model adds over it (e.g. an alias with memory on against one without).
    #[arg(long, conflicts_with = "compare_direct")]
    pub compare_model: Option<String>,
    /// Conversation scenario: the seeded conversations belong to this user (their `user`
    /// metadata), whose memories a memory alias reads on every turn.
    #[arg(long)]
    pub memory_user: Option<String>,
    /// With --memory-user: store this many memories for the user first (`infer: false`).
    #[arg(long, default_value_t = 0, requires = "memory_user")]
    pub seed_memories: usize,
    /// Per-request timeout.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Open-loop cap on requests in flight; beyond it a scheduled request counts as an error.
    #[arg(long, default_value_t = 20_000)]
    pub max_in_flight: usize,
    /// Sample this process's resident memory (e.g. the gateway's pid) during the run.
    #[arg(long)]
    pub target_pid: Option<u32>,
    /// Send one of 20 repeated prompts with this probability (0-1) and a unique prompt
    /// otherwise, to measure caching; without it every request is identical.
    #[arg(long)]
    pub repeat_fraction: Option<f64>,
    /// Print one JSON document instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Soak instead of a benchmark: mixed traffic (chat, streams, dropped streams,
    /// embeddings, client errors, conversation turns, uploads) at --rate (default 100/s) for this long, sampling the
    /// process --target-pid; writes soak.csv and soak.svg to --soak-out and fails if memory
    /// or descriptors drift after --soak-settle or an unexpected error occurs.
    #[arg(long, value_parser = humantime::parse_duration, requires = "target_pid")]
    pub soak: Option<Duration>,
    /// Soak: samples before this are warm-up and not judged.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub soak_settle: Duration,
    /// Soak: how often the target is sampled.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
    /// Soak: where soak.csv and soak.svg are written.
    #[arg(long, default_value = "target/soak")]
    pub soak_out: std::path::PathBuf,
    /// Soak: embeddings model for the embeddings slice (chat is sent in its place without it).
    #[arg(long)]
    pub soak_embeddings_model: Option<String>,
    /// Soak: the alias of the conversation turns (default --model). Give it `memory = true`
    /// and a server-side tool the model calls, and every turn runs the tool loop and feeds
    /// the memory pipeline (its words state a fact that changes over the run).
    #[arg(long)]
    pub soak_turn_model: Option<String>,
    /// Soak: also upload a small file (purpose `user_data`), read it back and delete it
    /// in one slot of every twenty, in place of a chat call.
    #[arg(long)]
    pub soak_uploads: bool,
    /// Conversation scenario: conversations to spread the turns over.
    #[arg(long, default_value_t = 100)]
    pub conversations: usize,
    /// Conversation scenario: items each conversation holds before the run.
    #[arg(long, default_value_t = 50)]
    pub history: usize,
    /// Soak: the target's admin key, to sample its heap, tasks, database pool and queue.
    #[arg(long, env = "SWITCHYARD_ADMIN_KEY")]
    pub admin_key: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// The measured result of one run; also exactly what `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `chat`, `stream` or `embeddings`.
    pub scenario: &'static str,
    /// `open` (fixed timetable, `--rate`) or `closed` (`--users`).
    pub mode: LoadMode,
    /// Open loop: requests per second sent to each side.
    pub rate: Option<f64>,
    /// Closed loop: concurrent users per side.
    pub users: Option<usize>,
    /// Length of the measured window, in seconds.
    pub duration_s: f64,
    /// Length of the unrecorded warm-up before it, in seconds.
    pub warmup_s: f64,
    /// The system under test.
    pub target: SideReport,
    /// The same load sent straight upstream (`--compare-direct`).
    pub direct: Option<SideReport>,
    /// Target percentile minus direct percentile (`--compare-direct`, both sides with data).
    pub added_latency: Option<AddedLatency>,
    /// Resident memory of `--target-pid` during the measured window.
    pub rss: Option<RssReport>,
}

/// How load was generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadMode {
    Open,
    Closed,
}

/// What one side (target or direct) achieved in the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct SideReport {
    /// Full request URL.
    pub url: String,
    /// Model sent.
    pub model: String,
    /// Requests that completed successfully.
    pub ok: u64,
    /// Failed requests by kind: `status_XXX`, `timeout`, `connect`, `incomplete_stream`,
    /// `overload` (open loop: over `--max-in-flight`, not sent), `other`.
    pub errors: BTreeMap<String, u64>,
    /// Sum of `errors`.
    pub error_count: u64,
    /// `ok` divided by the measured duration.
    pub achieved_rps: f64,
    /// Total latency of successful requests (none when nothing succeeded).
    pub latency_ms: Option<Percentiles>,
    /// Time to the first body chunk carrying `data:` (stream scenario only).
    pub ttfb_ms: Option<Percentiles>,
}

/// Latency percentiles in milliseconds (microsecond resolution).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Target minus direct, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Delta {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The latency the target adds over going direct.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AddedLatency {
    pub latency_ms: Delta,
    /// Stream scenario only.
    pub ttfb_ms: Option<Delta>,
}

/// Resident set size (`VmRSS`) of a process, in MiB, and the CPU it used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RssReport {
    pub pid: u32,
    pub start_mib: f64,
    pub peak_mib: f64,
    pub end_mib: f64,
    pub samples: u32,
    /// CPU time (user + system, all threads) over the measured window, as a percentage of
    /// one core (200 = two cores busy).
    pub cpu_percent: Option<f64>,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        let at = |q: f64| micros_to_ms(histogram.value_at_quantile(q));
        Some(Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: micros_to_ms(histogram.max()),
        })
    }
}

impl Delta {
    fn between(target: &Percentiles, direct: &Percentiles) -> Self {
        Self {
            p50: round3(target.p50 - direct.p50),
            p90: round3(target.p90 - direct.p90),
            p99: round3(target.p99 - direct.p99),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Runs the benchmark described by `args`, prints the report (text, or JSON with --json) to stdout.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchCommand::Memory(memory)) = args.command {
        return crate::locomo::run(memory).await;
    }
    if let Some(duration) = args.soak {
        return crate::soak::run(&args, duration).await;
    }
    let progress = !args.json && std::io::stderr().is_terminal();
    let report = drive(&args, progress).await?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &report).context("writing the JSON report")?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{report}")?;
    }
    stdout.flush()?;
    Ok(())
}

/// Runs without printing (used by tests and by run()).
pub async fn measure(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    drive(args, false).await
}

/// How load is generated, validated from the arguments.
#[derive(Debug, Clone, Copy)]
enum Load {
    Open { rate: f64 },
    Closed { users: usize },
}

impl Load {
    fn from_args(args: &BenchArgs) -> anyhow::Result<Self> {
        match (args.rate, args.users) {
            (Some(_), Some(_)) => {
                bail!("--rate (open loop) and --users (closed loop) are mutually exclusive")
            }
            (Some(rate), None) => {
                ensure!(
                    rate.is_finite() && rate > 0.0,
                    "--rate must be a positive number of requests per second, got {rate}"
                );
                ensure!(args.max_in_flight > 0, "--max-in-flight must be at least 1");
                Ok(Self::Open { rate })
            }
            (None, users) => {
                let users = users.unwrap_or(DEFAULT_USERS);
                ensure!(users > 0, "--users must be at least 1");
                Ok(Self::Closed { users })
            }
        }
    }

    /// Most requests one side can have in flight; sizes the connection pool.
    fn concurrency(self, max_in_flight: usize) -> usize {
        match self {
            Self::Open { .. } => max_in_flight,
            Self::Closed { users } => users,
        }
    }
}

/// The run's fixed instants: load starts at `start`, is recorded from `measure_from`, and no
/// request is started at or after `end`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    measure_from: Instant,
    end: Instant,
}

impl Clock {
    fn new(warmup: Duration, duration: Duration) -> anyhow::Result<Self> {
        let start = Instant::now();
        let measure_from = start.checked_add(warmup).context("--warmup is too long")?;
        let end = measure_from
            .checked_add(duration)
            .context("--duration is too long")?;
        Ok(Self {
            start,
            measure_from,
            end,
        })
    }
}

async fn drive(args: &BenchArgs, show_progress: bool) -> anyhow::Result<BenchReport> {
    let load = Load::from_args(args)?;
    ensure!(
        !args.duration.is_zero(),
        "--duration must be longer than zero"
    );
    ensure!(
        !args.timeout.is_zero(),
        "--timeout must be longer than zero"
    );
    ensure_crypto_provider();

    let pool = load.concurrency(args.max_in_flight);
    let repeats = |side: Side| match args.repeat_fraction {
        Some(fraction) => side.with_repeats(fraction),
        None => Ok(side),
    };
    let mut sides = vec![Arc::new(repeats(Side::new(
        "target",
        &args.target,
        &args.model,
        args.api_key.as_deref(),
        args.scenario,
        args.timeout,
        pool,
    )?)?)];
    if args.scenario == Scenario::Conversation {
        let target = Arc::get_mut(&mut sides[0]).context("the target side is shared")?;
        target.conversations = seed_conversations(args, &target.client).await?;
        seed_memories(args, &target.client).await?;
    }
    if let Some(model) = &args.compare_model {
        let mut side = repeats(Side::new(
            "direct",
            &args.target,
            model,
            args.api_key.as_deref(),
            args.scenario,
            args.timeout,
            pool,
        )?)?;
        if args.scenario == Scenario::Conversation {
            side.conversations = seed_conversations(args, &side.client).await?;
        }
        sides.push(Arc::new(side));
    }
    if let Some(direct) = &args.compare_direct {
        let model = args.direct_model.as_deref().unwrap_or(&args.model);
        // The upstream has no Responses API: it gets the chat call a turn makes.
        let scenario = match args.scenario {
            Scenario::Responses | Scenario::Conversation | Scenario::ToolTurn => Scenario::Chat,
            Scenario::ResponsesStream => Scenario::Stream,
            other => other,
        };
        let mut side = repeats(Side::new(
            "direct",
            direct,
            model,
            None,
            scenario,
            args.timeout,
            pool,
        )?)?;
        if args.scenario == Scenario::Conversation {
            side.body = history_chat_body(model, args.history)?;
        }
        if args.scenario == Scenario::ToolTurn {
            let (first, second) = tool_turn_chat_bodies(model)?;
            side.body = first;
            side.follow_up = Some(second);
        }
        sides.push(Arc::new(side));
    }
    if let Some(pid) = args.target_pid {
        read_rss_kib(pid).with_context(|| format!("cannot read VmRSS from /proc/{pid}/status"))?;
    }

    let clock = Clock::new(args.warmup, args.duration)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut monitors: JoinSet<Option<RssReport>> = JoinSet::new();
    if let Some(pid) = args.target_pid {
        monitors.spawn(sample_rss(pid, clock));
    }
    let bar = if show_progress {
        let bar = progress_bar(clock);
        monitors.spawn(show_load(bar.clone(), sides.clone(), clock, stop_rx));
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut requests: JoinSet<()> = JoinSet::new();
    match load {
        Load::Open { rate } => {
            open_loop(&sides, rate, clock, args.max_in_flight, &mut requests).await;
        }
        Load::Closed { users } => {
            for side in &sides {
                for _ in 0..users {
                    requests.spawn(closed_loop_user(Arc::clone(side), clock));
                }
            }
        }
    }
    let deadline = clock
        .end
        .checked_add(args.timeout.saturating_add(DRAIN_GRACE))
        .unwrap_or(clock.end);
    drain(&mut requests, deadline).await;

    // Closing the channel (send or drop) stops the progress task; the sampler stops at `end`.
    let _ = stop_tx.send(true);
    let mut rss = None;
    while let Some(joined) = monitors.join_next().await {
        match joined {
            Ok(Some(report)) => rss = Some(report),
            Ok(None) => {}
            Err(error) => note_join_error(&error),
        }
    }
    bar.finish_and_clear();

    Ok(build_report(args, load, &sides, rss))
}

/// reqwest panics when it builds a rustls client and no crypto provider is installed; the
/// binary installs ring at start-up, this covers library callers that did not.
pub(crate) fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: either provider will do.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn build_report(
    args: &BenchArgs,
    load: Load,
    sides: &[Arc<Side>],
    rss: Option<RssReport>,
) -> BenchReport {
    let mut reports = sides.iter().map(|side| side.report(args.duration));
    let target = reports.next().unwrap_or_else(SideReport::empty);
    let direct = reports.next();
    let added_latency = direct.as_ref().and_then(|direct| {
        let latency_ms = Delta::between(target.latency_ms.as_ref()?, direct.latency_ms.as_ref()?);
        let ttfb_ms = match (&target.ttfb_ms, &direct.ttfb_ms) {
            (Some(t), Some(d)) => Some(Delta::between(t, d)),
            _ => None,
        };
        Some(AddedLatency {
            latency_ms,
            ttfb_ms,
        })
    });
    let (mode, rate, users) = match load {
        Load::Open { rate } => (LoadMode::Open, Some(rate), None),
        Load::Closed { users } => (LoadMode::Closed, None, Some(users)),
    };
    BenchReport {
        scenario: scenario_name(args.scenario),
        mode,
        rate,
        users,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        target,
        direct,
        added_latency,
        rss,
    }
}

fn scenario_name(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Chat => "chat",
        Scenario::Stream => "stream",
        Scenario::Embeddings => "embeddings",
        Scenario::Responses => "responses",
        Scenario::ResponsesStream => "responses-stream",
        Scenario::Conversation => "conversation",
        Scenario::ToolTurn => "tool-turn",
    }
}

// ---------------------------------------------------------------------------------------------
// Load generation
// ---------------------------------------------------------------------------------------------

/// Open loop: one scheduler (this future) walks a fixed timetable and spawns every request that
/// is due. With two sides the slots alternate, so the target runs at `start + i/rate` and the
/// direct side at `start + (i + 0.5)/rate`. Returns once the next slot is at or after `end`.
async fn open_loop(
    sides: &[Arc<Side>],
    rate: f64,
    clock: Clock,
    max_in_flight: usize,
    requests: &mut JoinSet<()>,
) {
    let streams = sides.len().max(1);
    let period_s = 1.0 / (rate * streams as f64);
    // `None` once the slot's time cannot be represented, which is certainly past the end.
    let due_at = |slot: u64| {
        Duration::try_from_secs_f64(slot as f64 * period_s)
            .ok()
            .and_then(|offset| clock.start.checked_add(offset))
            .filter(|due| *due < clock.end)
    };
    let mut slot: u64 = 0;
    loop {
        let now = Instant::now();
        let Some(mut due) = due_at(slot) else { return };
        // Spawn everything that is due, however late the timer woke us.
        while due <= now {
            reap_finished(requests);
            let Some(side) = sides.get((slot % streams as u64) as usize) else {
                return;
            };
            let measured = due >= clock.measure_from;
            if side.in_flight.load(Ordering::Relaxed) >= max_in_flight {
                side.record(measured, due, Err(ErrorKind::Overload));
            } else {
                requests.spawn(Ticket::issue(side, due, measured).run());
            }
            slot += 1;
            match due_at(slot) {
                Some(next) => due = next,
                None => return,
            }
        }
        // Sleep until the next slot, collecting finished tasks meanwhile so the set stays small.
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            Some(joined) = requests.join_next() => note_join(joined),
        }
    }
}

/// Closed loop: one user sends request after request until the end of the run.
async fn closed_loop_user(side: Arc<Side>, clock: Clock) {
    loop {
        let start = Instant::now();
        if start >= clock.end {
            return;
        }
        Ticket::issue(&side, start, start >= clock.measure_from)
            .run()
            .await;
    }
}

/// Waits for every task up to `deadline`, then abandons what is left (each request already has
/// its own timeout, so this only triggers if something is badly stuck).
pub(crate) async fn drain(requests: &mut JoinSet<()>, deadline: Instant) {
    let finished = tokio::time::timeout_at(deadline, async {
        while let Some(joined) = requests.join_next().await {
            note_join(joined);
        }
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            remaining = requests.len(),
            "bench: tasks still running after the timeout; abandoning them"
        );
        requests.abort_all();
        while let Some(joined) = requests.join_next().await {
            note_join(joined);
        }
    }
}

fn reap_finished(requests: &mut JoinSet<()>) {
    while let Some(joined) = requests.try_join_next() {
        note_join(joined);
    }
}

fn note_join(joined: Result<(), JoinError>) {
    if let Err(error) = joined {
        note_join_error(&error);
    }
}

fn note_join_error(error: &JoinError) {
    if error.is_panic() {
        tracing::error!(%error, "bench: a load task panicked");
    }
}

// ---------------------------------------------------------------------------------------------
// One side: client, request and recording
// ---------------------------------------------------------------------------------------------

/// Why a request did not count as a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ErrorKind {
    Status(u16),
    Timeout,
    Connect,
    IncompleteStream,
    Overload,
    Other,
}

impl ErrorKind {
    fn label(self) -> String {
        match self {
            Self::Status(code) => format!("status_{code}"),
            Self::Timeout => "timeout".to_owned(),
            Self::Connect => "connect".to_owned(),
            Self::IncompleteStream => "incomplete_stream".to_owned(),
            Self::Overload => "overload".to_owned(),
            Self::Other => "other".to_owned(),
        }
    }

    fn of(error: &reqwest::Error) -> Self {
        if error.is_connect() {
            Self::Connect
        } else if error.is_timeout() {
            Self::Timeout
        } else {
            Self::Other
        }
    }
}

/// A successful exchange: when the first SSE data arrived (stream only) and when it ended.
#[derive(Debug, Clone, Copy)]
struct Done {
    first_data: Option<Instant>,
    end: Instant,
}

/// Everything recorded in the measured window for one side.
struct Stats {
    ok: u64,
    errors: BTreeMap<ErrorKind, u64>,
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
}

/// A target (or the direct upstream) with its own client, pre-serialised body and histograms.
struct Side {
    name: &'static str,
    url: reqwest::Url,
    model: String,
    client: reqwest::Client,
    body: Bytes,
    /// With `--repeat-fraction`: the pool of repeated bodies; other requests are unique.
    repeats: Option<(f64, Vec<Bytes>)>,
    /// Conversation scenario, target side: the conversations turns go to, in turn.
    conversations: Vec<String>,
    /// Tool-turn scenario, direct side: the second model call, sent once the first
    /// has answered; the two are measured as one.
    follow_up: Option<Bytes>,
    scenario: Scenario,
    /// Unique prompts are `nonce-counter`, so two runs never share one.
    nonce: u64,
    unique: AtomicU64,
    stream: bool,
    timeout: Duration,
    in_flight: AtomicUsize,
    /// Measured successes and failures, for the progress bar (the report reads `stats`).
    ok: AtomicU64,
    failed: AtomicU64,
    stats: Mutex<Stats>,
}

impl Side {
    fn new(
        name: &'static str,
        base: &str,
        model: &str,
        api_key: Option<&str>,
        scenario: Scenario,
        timeout: Duration,
        pool: usize,
    ) -> anyhow::Result<Self> {
        let path = match scenario {
            Scenario::Chat | Scenario::Stream => "/v1/chat/completions",
            Scenario::Embeddings => "/v1/embeddings",
            Scenario::Responses
            | Scenario::ResponsesStream
            | Scenario::Conversation
            | Scenario::ToolTurn => "/v1/responses",
        };
        let url = reqwest::Url::parse(&format!("{}{path}", base.trim_end_matches('/')))
            .with_context(|| format!("invalid {name} URL {base:?}"))?;
        ensure!(
            matches!(url.scheme(), "http" | "https"),
            "the {name} URL {base:?} must be http:// or https://"
        );

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                .context("the API key is not a valid HTTP header value")?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(pool)
            .tcp_nodelay(true)
            .connect_timeout(timeout)
            // Measure the target, not whatever proxy the environment points at.
            .no_proxy()
            .build()
            .with_context(|| format!("building the HTTP client for {name}"))?;

        let histogram = || {
            Histogram::<u64>::new_with_bounds(1, HISTOGRAM_MAX_MICROS, 3)
                .context("creating a latency histogram")
        };
        Ok(Self {
            name,
            url,
            model: model.to_owned(),
            client,
            body: request_body(scenario, model)?,
            repeats: None,
            conversations: Vec::new(),
            follow_up: None,
            scenario,
            nonce: rand::random(),
            unique: AtomicU64::new(0),
            stream: matches!(scenario, Scenario::Stream | Scenario::ResponsesStream),
            timeout,
            in_flight: AtomicUsize::new(0),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stats: Mutex::new(Stats {
                ok: 0,
                errors: BTreeMap::new(),
                latency: histogram()?,
                ttfb: histogram()?,
            }),
        })
    }

    /// Repeats a pooled body with probability `fraction`, else sends a unique one.
    fn with_repeats(mut self, fraction: f64) -> anyhow::Result<Self> {
        let pool = (0..REPEAT_POOL)
            .map(|i| {
                request_body_with(
                    self.scenario,
                    &self.model,
                    &format!("repeated question {i}"),
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.repeats = Some((fraction, pool));
        Ok(self)
    }

    fn next_body(&self) -> Bytes {
        if !self.conversations.is_empty() {
            let n = self.unique.fetch_add(1, Ordering::Relaxed) as usize;
            let id = &self.conversations[n % self.conversations.len()];
            let body = serde_json::json!({
                "model": self.model,
                "input": "Say something about load testing.",
                "conversation": id,
                "max_output_tokens": 64,
                // A long conversation keeps its newest items, as a chat app wants.
                "truncation": "auto",
            });
            return Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        }
        let Some((fraction, pool)) = &self.repeats else {
            return self.body.clone();
        };
        let mut rng = rand::rng();
        if rand::Rng::random_bool(&mut rng, fraction.clamp(0.0, 1.0)) {
            return pool[rand::Rng::random_range(&mut rng, 0..pool.len())].clone();
        }
        let n = self.unique.fetch_add(1, Ordering::Relaxed);
        request_body_with(
            self.scenario,
            &self.model,
            &format!("unique question {:x}-{n}", self.nonce),
        )
        .unwrap_or_else(|_| self.body.clone())
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        // Recording cannot leave the stats half-updated, so a poisoned lock is still usable.
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One request, bounded by the timeout from the moment it is actually sent.
    async fn execute(&self) -> Result<Done, ErrorKind> {
        tokio::time::timeout(self.timeout, self.exchange())
            .await
            .unwrap_or(Err(ErrorKind::Timeout))
    }

    async fn exchange(&self) -> Result<Done, ErrorKind> {
        let done = self.exchange_body(self.next_body()).await?;
        match &self.follow_up {
            Some(next) => self.exchange_body(next.clone()).await,
            None => Ok(done),
        }
    }

    async fn exchange_body(&self, body: Bytes) -> Result<Done, ErrorKind> {
        let mut response = self
            .client
            .post(self.url.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| ErrorKind::of(&e))?;
        let status = response.status();
        if !status.is_success() {
            // Read the error body so the connection goes back to the pool.
            while let Ok(Some(_)) = response.chunk().await {}
            return Err(ErrorKind::Status(status.as_u16()));
        }
        if !self.stream {
            while response
                .chunk()
                .await
                .map_err(|e| ErrorKind::of(&e))?
                .is_some()
            {}
            return Ok(Done {
                first_data: None,
                end: Instant::now(),
            });
        }
        let mut scan = SseScan::default();
        while let Some(chunk) = response.chunk().await.map_err(|e| ErrorKind::of(&e))? {
            scan.feed(&chunk);
        }
        let end = Instant::now();
        if !scan.ended_with_done() && !scan.ended_with_response() {
            return Err(ErrorKind::IncompleteStream);
        }
        Ok(Done {
            first_data: scan.first_data,
            end,
        })
    }

    /// Records one outcome; latency is measured from `origin` (the scheduled start in open loop).
    fn record(&self, measured: bool, origin: Instant, outcome: Result<Done, ErrorKind>) {
        if !measured {
            return;
        }
        let mut stats = self.stats();
        match outcome {
            Ok(done) => {
                stats.ok += 1;
                let total = done.end.saturating_duration_since(origin);
                stats.latency.saturating_record(duration_micros(total));
                if let Some(first) = done.first_data {
                    let ttfb = first.saturating_duration_since(origin);
                    stats.ttfb.saturating_record(duration_micros(ttfb));
                }
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(kind) => {
                *stats.errors.entry(kind).or_default() += 1;
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn report(&self, duration: Duration) -> SideReport {
        let stats = self.stats();
        let errors: BTreeMap<String, u64> = stats
            .errors
            .iter()
            .map(|(kind, count)| (kind.label(), *count))
            .collect();
        let secs = duration.as_secs_f64();
        SideReport {
            url: self.url.to_string(),
            model: self.model.clone(),
            ok: stats.ok,
            error_count: errors.values().sum(),
            errors,
            achieved_rps: if secs > 0.0 {
                round3(stats.ok as f64 / secs)
            } else {
                0.0
            },
            latency_ms: Percentiles::of(&stats.latency),
            ttfb_ms: if self.stream {
                Percentiles::of(&stats.ttfb)
            } else {
                None
            },
        }
    }
}

impl SideReport {
    fn empty() -> Self {
        Self {
            url: String::new(),
            model: String::new(),
            ok: 0,
            errors: BTreeMap::new(),
            error_count: 0,
            achieved_rps: 0.0,
            latency_ms: None,
            ttfb_ms: None,
        }
    }
}

/// One request in flight. Counts towards the side's in-flight total from issue until it is
/// dropped; dropped without an outcome (aborted at the drain deadline, or a panic), it records
/// an error so no started request silently disappears from the report.
struct Ticket {
    side: Arc<Side>,
    origin: Instant,
    measured: bool,
    settled: bool,
}

impl Ticket {
    fn issue(side: &Arc<Side>, origin: Instant, measured: bool) -> Self {
        side.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            side: Arc::clone(side),
            origin,
            measured,
            settled: false,
        }
    }

    async fn run(mut self) {
        let outcome = self.side.execute().await;
        self.side.record(self.measured, self.origin, outcome);
        self.settled = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.side.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.settled {
            let kind = if std::thread::panicking() {
                ErrorKind::Other
            } else {
                ErrorKind::Timeout
            };
            self.side.record(self.measured, self.origin, Err(kind));
        }
    }
}

/// One message of a seeded history: about twelve words, alternating user and assistant.
fn history_message(i: usize) -> serde_json::Value {
    let role = if i.is_multiple_of(2) {
        "user"
    } else {
        "assistant"
    };
    serde_json::json!({
        "role": role,
        "content": format!("message {i} of the seeded history, about a dozen words long here"),
    })
}

/// The chat call a conversation turn with `history` earlier items amounts to.
fn history_chat_body(model: &str, history: usize) -> anyhow::Result<Bytes> {
    let mut messages: Vec<serde_json::Value> = (0..history).map(history_message).collect();
    messages
        .push(serde_json::json!({"role": "user", "content": "Say something about load testing."}));
    let body = serde_json::json!({"model": model, "messages": messages, "max_tokens": 64});
    Ok(Bytes::from(
        serde_json::to_vec(&body).context("serialising the request body")?,
    ))
}

/// Creates `--conversations` conversations of `--history` items on the target (at most 20
/// items per call, as the API takes them) and returns their ids.
async fn seed_conversations(
    args: &BenchArgs,
    client: &reqwest::Client,
) -> anyhow::Result<Vec<String>> {
    let base = args.target.trim_end_matches('/');
    let mut ids = Vec::with_capacity(args.conversations);
    for _ in 0..args.conversations.max(1) {
        let created: serde_json::Value = client
            .post(format!("{base}/v1/conversations"))
            .body(match &args.memory_user {
                Some(user) => {
                    serde_json::json!({"metadata": {"source": "bench", "user": user}}).to_string()
                }
                None => r#"{"metadata":{"source":"bench"}}"#.to_owned(),
            })
            .send()
            .await
            .context("creating a conversation")?
            .error_for_status()
            .context("creating a conversation")?
            .json()
            .await?;
        let id = created["id"]
            .as_str()
            .context("the conversation has no id")?
            .to_owned();
        let messages: Vec<serde_json::Value> = (0..args.history).map(history_message).collect();
        for batch in messages.chunks(20) {
            client
                .post(format!("{base}/v1/conversations/{id}/items"))
                .body(serde_json::to_vec(&serde_json::json!({"items": batch}))?)
                .send()
                .await
                .context("adding conversation items")?
                .error_for_status()
                .context("adding conversation items")?;
        }
        ids.push(id);
    }
    Ok(ids)
}

/// `--seed-memories`: the memories a memory alias searches on every turn, stored before
/// the run, a thousand per call.
async fn seed_memories(args: &BenchArgs, client: &reqwest::Client) -> anyhow::Result<()> {
    let (Some(user), n) = (&args.memory_user, args.seed_memories) else {
        return Ok(());
    };
    let base = args.target.trim_end_matches('/');
    let facts: Vec<serde_json::Value> = (0..n).map(seed_fact).collect();
    for batch in facts.chunks(1_000) {
        client
            .post(format!("{base}/v1/memories"))
            .body(serde_json::to_vec(
                &serde_json::json!({"user": user, "infer": false, "messages": batch}),
            )?)
            .send()
            .await
            .context("storing memories")?
            .error_for_status()
            .context("storing memories")?;
    }
    Ok(())
}

/// The `i`th seeded memory: varied words, so a search has postings of every length.
fn seed_fact(i: usize) -> serde_json::Value {
    const TOPICS: [&str; 8] = [
        "tea", "hiking", "jazz", "cycling", "pottery", "chess", "sailing", "baking",
    ];
    const VERBS: [&str; 4] = ["likes", "tried", "talked about", "plans"];
    let text = format!(
        "The user {} {} with friend number {} in week {}",
        VERBS[i % VERBS.len()],
        TOPICS[(i / 4) % TOPICS.len()],
        i % 97,
        i % 52
    );
    serde_json::json!({"role": "user", "content": text})
}

/// Distinct repeated prompts with `--repeat-fraction`.
const REPEAT_POOL: usize = 20;

fn request_body(scenario: Scenario, model: &str) -> anyhow::Result<Bytes> {
    let prompt = match scenario {
        Scenario::Embeddings => "benchmark input",
        _ => "Say something about load testing.",
    };
    request_body_with(scenario, model, prompt)
}

fn request_body_with(scenario: Scenario, model: &str, prompt: &str) -> anyhow::Result<Bytes> {
    let messages = serde_json::json!([{ "role": "user", "content": prompt }]);
    let body = match scenario {
        Scenario::Chat => serde_json::json!({
            "model": model,
            "messages": messages,
            "max_tokens": 64,
        }),
        Scenario::Stream => serde_json::json!({
            "model": model,
            "messages": messages,
            "max_tokens": 64,
            "stream": true,
            "stream_options": { "include_usage": true },
        }),
        Scenario::Embeddings => serde_json::json!({
            "model": model,
            "input": prompt,
        }),
        Scenario::Responses | Scenario::Conversation => serde_json::json!({
            "model": model,
            "input": prompt,
            "max_output_tokens": 64,
        }),
        Scenario::ToolTurn => serde_json::json!({
            "model": model,
            "input": prompt,
            "max_output_tokens": 64,
            "store": false,
        }),
        Scenario::ResponsesStream => serde_json::json!({
            "model": model,
            "input": prompt,
            "max_output_tokens": 64,
            "stream": true,
        }),
    };
    Ok(Bytes::from(
        serde_json::to_vec(&body).context("serialising the request body")?,
    ))
}

/// The two chat calls of a tool turn, as the gateway makes them: the user's question with
/// one function offered (the model calls it), then the same with the call and its result
/// (the model answers).
fn tool_turn_chat_bodies(model: &str) -> anyhow::Result<(Bytes, Bytes)> {
    let tools = serde_json::json!([{"type": "function", "function": {
        "name": "stock_quote",
        "description": "Latest price for a stock ticker",
        "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}},
                       "required": ["ticker"]},
    }}]);
    let question = serde_json::json!({"role": "user", "content": "benchmark input"});
    let first = serde_json::json!({
        "model": model, "messages": [question], "tools": tools, "max_tokens": 64,
    });
    let second = serde_json::json!({
        "model": model,
        "messages": [
            question,
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
             "type": "function", "function": {"name": "stock_quote",
             "arguments": "{\"ticker\":\"benchmark input\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1",
             "content": "{\"symbol\":\"BENCHMARK INPUT\",\"price\":123.45}"},
        ],
        "tools": tools,
        "max_tokens": 64,
    });
    let bytes = |v: serde_json::Value| {
        serde_json::to_vec(&v)
            .map(Bytes::from)
            .context("serialising the request body")
    };
    Ok((bytes(first)?, bytes(second)?))
}

/// Watches an SSE body chunk by chunk without buffering it: notes when the first `data:`
/// arrives and keeps the last few bytes to check the terminal `data: [DONE]`.
#[derive(Debug, Default)]
struct SseScan {
    first_data: Option<Instant>,
    tail: [u8; SSE_TAIL],
    tail_len: usize,
}

impl SseScan {
    const DATA: &'static [u8] = b"data:";

    fn feed(&mut self, chunk: &[u8]) {
        if self.first_data.is_none() && self.has_data(chunk) {
            self.first_data = Some(Instant::now());
        }
        self.push_tail(chunk);
    }

    /// `data:` in this chunk, or split across the previous chunk and this one.
    fn has_data(&self, chunk: &[u8]) -> bool {
        if memchr::memmem::find(chunk, Self::DATA).is_some() {
            return true;
        }
        let keep = Self::DATA.len() - 1;
        let before = &self.tail[self.tail_len.saturating_sub(keep)..self.tail_len];
        let after = &chunk[..chunk.len().min(keep)];
        let mut seam = [0u8; 8];
        let joined = before.len() + after.len();
        seam[..before.len()].copy_from_slice(before);
        seam[before.len()..joined].copy_from_slice(after);
        memchr::memmem::find(&seam[..joined], Self::DATA).is_some()
    }

    fn push_tail(&mut self, chunk: &[u8]) {
        if chunk.len() >= SSE_TAIL {
            self.tail.copy_from_slice(&chunk[chunk.len() - SSE_TAIL..]);
            self.tail_len = SSE_TAIL;
            return;
        }
        let keep = self.tail_len.min(SSE_TAIL - chunk.len());
        self.tail
            .copy_within(self.tail_len - keep..self.tail_len, 0);
        self.tail[keep..keep + chunk.len()].copy_from_slice(chunk);
        self.tail_len = keep + chunk.len();
    }

    /// A Responses stream ends with its final lifecycle event.
    fn ended_with_response(&self) -> bool {
        let tail = self.tail[..self.tail_len].trim_ascii_end();
        tail.ends_with(b"\"type\":\"response.completed\"}")
            || tail.ends_with(b"\"type\":\"response.incomplete\"}")
    }

    fn ended_with_done(&self) -> bool {
        let tail = self.tail[..self.tail_len].trim_ascii_end();
        tail.ends_with(b"data: [DONE]") || tail.ends_with(b"data:[DONE]")
    }
}

// ---------------------------------------------------------------------------------------------
// Monitors: resident memory and progress
// ---------------------------------------------------------------------------------------------

/// Samples `VmRSS` every 250 ms from `measure_from` to `end` (stops early if the process goes).
async fn sample_rss(pid: u32, clock: Clock) -> Option<RssReport> {
    let mut samples: Vec<u64> = Vec::new();
    let mut next = clock.measure_from;
    let mut cpu_start = None;
    let mut cpu_end = None;
    loop {
        tokio::time::sleep_until(next).await;
        let cpu = read_cpu_ticks(pid).map(|ticks| (ticks, Instant::now()));
        if cpu_start.is_none() {
            cpu_start = cpu;
        }
        cpu_end = cpu.or(cpu_end);
        // A /proc read is a few microseconds; not worth a blocking-pool hop.
        match read_rss_kib(pid) {
            Some(kib) => samples.push(kib),
            None => break,
        }
        if next >= clock.end {
            break;
        }
        next = next
            .checked_add(RSS_SAMPLE_EVERY)
            .map_or(clock.end, |n| n.min(clock.end));
    }
    let mib = |kib: u64| round3(kib as f64 / 1024.0);
    let cpu_percent = match (cpu_start, cpu_end) {
        (Some((t0, at0)), Some((t1, at1))) if at1 > at0 => {
            let busy = t1.saturating_sub(t0) as f64 / USER_HZ;
            Some(round3(busy / (at1 - at0).as_secs_f64() * 100.0))
        }
        _ => None,
    };
    Some(RssReport {
        pid,
        start_mib: mib(*samples.first()?),
        peak_mib: mib(samples.iter().copied().max()?),
        end_mib: mib(*samples.last()?),
        samples: u32::try_from(samples.len()).unwrap_or(u32::MAX),
        cpu_percent,
    })
}

/// The unit of the CPU times in `/proc/{pid}/stat`: fixed at 100 per second by the
/// kernel's ABI (`USER_HZ`), whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

/// User + system CPU time of every thread of `pid`, in `USER_HZ` ticks, from
/// `/proc/{pid}/stat` (fields 14 and 15).
fn read_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of `pid` in KiB, from `/proc/{pid}/status`.
fn read_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss_kib(&status)
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status_field(status, "VmRSS:")
}

/// The number after `field` (e.g. `VmRSS:`, `Threads:`) in a `/proc/{pid}/status` text.
pub(crate) fn status_field(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find_map(|line| line.strip_prefix(field))?;
    line.split_whitespace().next()?.parse().ok()
}

fn progress_bar(clock: Clock) -> ProgressBar {
    let total_ms = duration_millis(clock.end.saturating_duration_since(clock.start));
    let bar = ProgressBar::with_draw_target(Some(total_ms), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:24}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Refreshes the progress bar until told to stop (or the sender is gone).
async fn show_load(
    bar: ProgressBar,
    sides: Vec<Arc<Side>>,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
) -> Option<RssReport> {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let measure_len = clock.end.saturating_duration_since(clock.measure_from);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return None,
        }
        let now = Instant::now();
        bar.set_position(duration_millis(now.saturating_duration_since(clock.start)));
        let phase = if now < clock.measure_from {
            "warm-up"
        } else if now < clock.end {
            "measuring"
        } else {
            "draining"
        };
        let measured_s = now
            .saturating_duration_since(clock.measure_from)
            .min(measure_len)
            .as_secs_f64();
        let mut parts = vec![phase.to_owned()];
        for side in &sides {
            let ok = side.ok.load(Ordering::Relaxed);
            let failed = side.failed.load(Ordering::Relaxed);
            let rate = if measured_s > 0.0 {
                ok as f64 / measured_s
            } else {
                0.0
            };
            let in_flight = side.in_flight.load(Ordering::Relaxed);
            parts.push(format!(
                "{}: {ok} ok, {failed} err, {rate:.0}/s, {in_flight} in flight",
                side.name
            ));
        }
        bar.set_message(parts.join(" | "));
    }
}

// ---------------------------------------------------------------------------------------------
// Text report
// ---------------------------------------------------------------------------------------------

type Pick = fn(&Percentiles) -> f64;
type PickDelta = fn(&Delta) -> f64;
type PickSection = fn(&SideReport) -> Option<&Percentiles>;

const PERCENTILE_ROWS: [(&str, Pick, Option<PickDelta>); 5] = [
    ("p50", |p| p.p50, Some(|d| d.p50)),
    ("p90", |p| p.p90, Some(|d| d.p90)),
    ("p99", |p| p.p99, Some(|d| d.p99)),
    ("p99.9", |p| p.p999, None),
    ("max", |p| p.max, None),
];

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_side = if self.direct.is_some() {
            " per side"
        } else {
            ""
        };
        let load = match (self.mode, self.rate, self.users) {
            (LoadMode::Open, Some(rate), _) => format!("open loop, {rate} req/s{per_side}"),
            (LoadMode::Closed, _, Some(users)) => format!("closed loop, {users} users{per_side}"),
            (LoadMode::Open, ..) => "open loop".to_owned(),
            (LoadMode::Closed, ..) => "closed loop".to_owned(),
        };
        writeln!(
            f,
            "switchyard bench: {}, {load}, {}s measured after {}s warm-up",
            self.scenario, self.duration_s, self.warmup_s
        )?;
        writeln!(
            f,
            "  target  {}  (model {})",
            self.target.url, self.target.model
        )?;
        if let Some(direct) = &self.direct {
            writeln!(f, "  direct  {}  (model {})", direct.url, direct.model)?;
        }
        writeln!(f)?;

        let target = &self.target;
        let direct = self.direct.as_ref();
        let added = self.added_latency.as_ref();
        let mut rows: Vec<[String; 4]> = vec![[
            String::new(),
            "target".to_owned(),
            "direct".to_owned(),
            "added".to_owned(),
        ]];
        let mut push = |label: String, t: String, d: Option<String>, a: Option<String>| {
            rows.push([label, t, d.unwrap_or_default(), a.unwrap_or_default()]);
        };
        push(
            "requests ok".into(),
            target.ok.to_string(),
            direct.map(|d| d.ok.to_string()),
            None,
        );
        push(
            "errors".into(),
            target.error_count.to_string(),
            direct.map(|d| d.error_count.to_string()),
            None,
        );
        let kinds: BTreeSet<&String> = target
            .errors
            .keys()
            .chain(direct.into_iter().flat_map(|d| d.errors.keys()))
            .collect();
        for kind in kinds {
            let count = |side: &SideReport| side.errors.get(kind).copied().unwrap_or(0).to_string();
            push(format!("  {kind}"), count(target), direct.map(count), None);
        }
        push(
            "rate (req/s)".into(),
            format!("{:.1}", target.achieved_rps),
            direct.map(|d| format!("{:.1}", d.achieved_rps)),
            None,
        );
        let sections: [(&str, PickSection, Option<&Delta>); 2] = [
            (
                "latency",
                |s| s.latency_ms.as_ref(),
                added.map(|a| &a.latency_ms),
            ),
            (
                "ttfb",
                |s| s.ttfb_ms.as_ref(),
                added.and_then(|a| a.ttfb_ms.as_ref()),
            ),
        ];
        for (name, section, delta) in sections {
            if name == "ttfb" && !self.scenario.ends_with("stream") {
                continue;
            }
            for (label, pick, pick_delta) in PERCENTILE_ROWS {
                let cell =
                    |side: &SideReport| section(side).map_or("-".to_owned(), |p| ms(pick(p)));
                let added_cell =
                    pick_delta.map(|pd| delta.map_or("-".to_owned(), |d| signed_ms(pd(d))));
                push(
                    format!("{name} {label} (ms)"),
                    cell(target),
                    direct.map(cell),
                    added_cell,
                );
            }
        }

        let columns = if direct.is_some() { 4 } else { 2 };
        let mut widths = [0usize; 4];
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in &rows {
            let mut line = format!("{:<w$}", row[0], w = widths[0]);
            for (cell, width) in row.iter().zip(widths).take(columns).skip(1) {
                write!(line, "  {cell:>width$}")?;
            }
            writeln!(f, "{}", line.trim_end())?;
        }

        if let Some(rss) = &self.rss {
            writeln!(f)?;
            writeln!(
                f,
                "rss (MiB, pid {})  start {:.1}  peak {:.1}  end {:.1}  ({} samples)",
                rss.pid, rss.start_mib, rss.peak_mib, rss.end_mib, rss.samples
            )?;
            if let Some(cpu) = rss.cpu_percent {
                writeln!(f, "cpu (pid {})  {cpu:.1}% of one core", rss.pid)?;
            }
        }
        Ok(())
    }
}

fn ms(value: f64) -> String {
    format!("{value:.3}")
}

fn signed_ms(value: f64) -> String {
    format!("{value:+.3}")
}

// ---------------------------------------------------------------------------------------------
// Units
// ---------------------------------------------------------------------------------------------

fn duration_micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Microseconds to milliseconds; exact to three decimals.
fn micros_to_ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use axum::Router;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;

    const SSE_OK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                          data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n\
                          data: [DONE]\n\n";
    const SSE_CUT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";

    /// A server on 127.0.0.1:0, stopped when dropped.
    struct TestServer {
        base: String,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve(app: Router) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestServer { base, task }
    }

    /// Chat (JSON or SSE, as asked) and embeddings; 401 unless a bearer token is sent when
    /// `key` is set.
    fn upstream(key: Option<&'static str>, stream_body: &'static str) -> Router {
        let chat = move |headers: AxumHeaders, body: Bytes| async move {
            if let Some(key) = key {
                let expected = format!("Bearer {key}");
                if headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    != Some(expected.as_str())
                {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
            }
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(request["max_tokens"], 64);
            if request["stream"] == true {
                assert_eq!(request["stream_options"]["include_usage"], true);
                ([(header::CONTENT_TYPE, "text/event-stream")], stream_body).into_response()
            } else {
                axum::Json(serde_json::json!({
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": request["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                 "finish_reason": "stop"}],
                }))
                .into_response()
            }
        };
        let embeddings = |body: Bytes| async move {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(request["input"], "benchmark input");
            axum::Json(serde_json::json!({
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": request["model"],
            }))
        };
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
    }

    fn failing() -> Router {
        let fail = || async { (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response() };
        Router::new()
            .route("/v1/chat/completions", post(fail))
            .route("/v1/embeddings", post(fail))
    }

    fn slow(delay: Duration) -> Router {
        let answer = move || async move {
            tokio::time::sleep(delay).await;
            Response::new(axum::body::Body::from("{}"))
        };
        Router::new().route("/v1/chat/completions", post(answer))
    }

    fn args(target: &str, scenario: Scenario) -> BenchArgs {
        let _ = rustls::crypto::ring::default_provider().install_default();
        BenchArgs {
            command: None,
            compare_model: None,
            memory_user: None,
            seed_memories: 0,
            target: target.to_owned(),
            model: "bench-model".to_owned(),
            scenario,
            rate: None,
            users: None,
            duration: Duration::from_millis(1000),
            warmup: Duration::from_millis(200),
            compare_direct: None,
            direct_model: None,
            api_key: None,
            timeout: Duration::from_secs(5),
            max_in_flight: 1000,
            target_pid: None,
            repeat_fraction: None,
            json: true,
            soak: None,
            soak_settle: Duration::from_secs(300),
            sample_every: Duration::from_secs(10),
            soak_out: std::path::PathBuf::from("target/soak"),
            soak_embeddings_model: None,
            soak_turn_model: None,
            soak_uploads: false,
            conversations: 100,
            history: 50,
            admin_key: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_chat_counts_every_scheduled_request() {
        let server = serve(upstream(Some("sekrit"), SSE_OK)).await;
        let mut a = args(&server.base, Scenario::Chat);
        a.rate = Some(40.0);
        a.api_key = Some("sekrit".to_owned());
        let report = measure(&a).await.unwrap();

        assert_eq!(report.mode, LoadMode::Open);
        assert!(
            report.target.errors.is_empty(),
            "{:?}",
            report.target.errors
        );
        // The timetable fixes the count: 40/s over the 1 s window (±1 at the edges).
        assert!(
            (39..=41).contains(&report.target.ok),
            "ok = {}",
            report.target.ok
        );
        let latency = report.target.latency_ms.unwrap();
        assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
        assert!(report.target.ttfb_ms.is_none());
        assert!(report.direct.is_none() && report.added_latency.is_none());
        assert!(report.target.url.ends_with("/v1/chat/completions"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_stream_with_direct_comparison() {
        let gateway = serve(upstream(None, SSE_OK)).await;
        let upstream_server = serve(upstream(None, SSE_OK)).await;
        let mut a = args(&gateway.base, Scenario::Stream);
        a.rate = Some(30.0);
        a.compare_direct = Some(format!("{}/", upstream_server.base));
        a.direct_model = Some("upstream-model".to_owned());
        let report = measure(&a).await.unwrap();

        let direct = report.direct.as_ref().unwrap();
        for side in [&report.target, direct] {
            assert!(side.errors.is_empty(), "{:?}", side.errors);
            assert!((29..=31).contains(&side.ok), "ok = {}", side.ok);
            assert!(side.ttfb_ms.is_some());
        }
        assert_eq!(direct.model, "upstream-model");
        let added = report.added_latency.unwrap();
        assert!(added.ttfb_ms.is_some());

        let text = report.to_string();
        assert!(
            text.contains("ttfb p99 (ms)") && text.contains("added"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["scenario"], "stream");
        assert_eq!(json["mode"], "open");
        assert!(json["added_latency"]["latency_ms"]["p50"].is_number());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_embeddings_with_two_users() {
        let server = serve(upstream(None, SSE_OK)).await;
        let mut a = args(&server.base, Scenario::Embeddings);
        a.users = Some(2);
        a.target_pid = Some(std::process::id());
        let report = measure(&a).await.unwrap();

        assert_eq!(report.mode, LoadMode::Closed);
        assert_eq!(report.users, Some(2));
        assert!(report.target.ok > 0);
        assert!(
            report.target.errors.is_empty(),
            "{:?}",
            report.target.errors
        );
        assert!(report.target.url.ends_with("/v1/embeddings"));
        let rss = report.rss.unwrap();
        assert!(rss.samples >= 1 && rss.peak_mib >= rss.start_mib && rss.start_mib > 0.0);
        assert!(report.to_string().contains("rss (MiB"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_errors_are_counted_by_status() {
        let server = serve(failing()).await;
        let mut a = args(&server.base, Scenario::Chat);
        a.users = Some(2);
        let report = measure(&a).await.unwrap();

        assert_eq!(report.target.ok, 0);
        assert!(report.target.latency_ms.is_none());
        let failed = report.target.errors.get("status_500").copied().unwrap_or(0);
        assert!(failed > 0);
        assert_eq!(report.target.errors.len(), 1, "{:?}", report.target.errors);
        assert_eq!(report.target.error_count, failed);
        assert!(report.added_latency.is_none());
        assert!(report.to_string().contains("status_500"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_done_is_an_incomplete_stream() {
        let server = serve(upstream(None, SSE_CUT)).await;
        let mut a = args(&server.base, Scenario::Stream);
        a.users = Some(2);
        let report = measure(&a).await.unwrap();

        assert_eq!(report.target.ok, 0);
        assert!(
            report
                .target
                .errors
                .get("incomplete_stream")
                .copied()
                .unwrap_or(0)
                > 0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_target_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let mut a = args(&base, Scenario::Chat);
        a.rate = Some(20.0);
        a.warmup = Duration::ZERO;
        a.duration = Duration::from_millis(500);
        let report = measure(&a).await.unwrap();

        assert_eq!(report.target.ok, 0);
        assert!(report.target.errors.get("connect").copied().unwrap_or(0) > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_over_the_in_flight_cap_is_overload() {
        let server = serve(slow(Duration::from_millis(400))).await;
        let mut a = args(&server.base, Scenario::Chat);
        a.rate = Some(50.0);
        a.max_in_flight = 1;
        a.warmup = Duration::ZERO;
        a.duration = Duration::from_millis(500);
        let report = measure(&a).await.unwrap();

        assert!(report.target.errors.get("overload").copied().unwrap_or(0) > 0);
        // Sent or refused, every slot on the timetable is accounted for.
        let total = report.target.ok + report.target.error_count;
        assert!((24..=26).contains(&total), "total = {total}");
    }

    #[tokio::test]
    async fn invalid_arguments_are_rejected() {
        let mut a = args("http://127.0.0.1:9", Scenario::Chat);
        a.rate = Some(0.0);
        assert!(measure(&a).await.is_err());
        a.rate = Some(f64::NAN);
        assert!(measure(&a).await.is_err());
        a.rate = Some(10.0);
        a.users = Some(3);
        assert!(measure(&a).await.is_err());
        a.rate = None;
        a.users = Some(0);
        assert!(measure(&a).await.is_err());
        a.users = None;
        a.target = "not a url".to_owned();
        assert!(measure(&a).await.is_err());
    }

    #[test]
    fn bodies_are_the_documented_shapes() {
        let chat: serde_json::Value =
            serde_json::from_slice(&request_body(Scenario::Chat, "m").unwrap()).unwrap();
        assert_eq!(
            chat,
            serde_json::json!({"model": "m", "max_tokens": 64, "messages": [
                {"role": "user", "content": "Say something about load testing."}]})
        );
        let stream: serde_json::Value =
            serde_json::from_slice(&request_body(Scenario::Stream, "m").unwrap()).unwrap();
        assert_eq!(stream["stream"], true);
        assert_eq!(stream["stream_options"]["include_usage"], true);
        let embeddings: serde_json::Value =
            serde_json::from_slice(&request_body(Scenario::Embeddings, "m").unwrap()).unwrap();
        assert_eq!(
            embeddings,
            serde_json::json!({"model": "m", "input": "benchmark input"})
        );
    }

    #[test]
    fn sse_scan_finds_data_across_chunks_and_checks_done() {
        let mut scan = SseScan::default();
        scan.feed(b": keep-alive\n\nda");
        assert!(scan.first_data.is_none());
        scan.feed(b"ta: {}\n\n");
        assert!(scan.first_data.is_some());
        assert!(!scan.ended_with_done());
        scan.feed(b"data: [DO");
        scan.feed(b"NE]\r\n\r\n");
        assert!(scan.ended_with_done());

        let mut cut = SseScan::default();
        cut.feed(SSE_CUT.as_bytes());
        assert!(cut.first_data.is_some() && !cut.ended_with_done());

        let mut long = SseScan::default();
        long.feed(SSE_OK.as_bytes());
        assert!(long.ended_with_done());
        let mut compact = SseScan::default();
        compact.feed(b"data:[DONE]\n\n");
        assert!(compact.ended_with_done());
    }

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "4242 (switch yard) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 70 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(320));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn vm_rss_is_parsed_in_kib() {
        let status = "Name:\tswitchyard\nVmPeak:\t  2000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss_kib(status), Some(12345));
        assert_eq!(parse_vm_rss_kib("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn percentiles_are_milliseconds_with_three_decimals() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, HISTOGRAM_MAX_MICROS, 3).unwrap();
        for micros in [1_234, 1_500, 2_000] {
            histogram.saturating_record(micros);
        }
        let p = Percentiles::of(&histogram).unwrap();
        assert_eq!(p.p50, 1.5);
        assert_eq!(p.max, 2.0);
        assert_eq!(ms(p.p50), "1.500");
        let empty = Histogram::<u64>::new_with_bounds(1, HISTOGRAM_MAX_MICROS, 3).unwrap();
        assert!(Percentiles::of(&empty).is_none());
        assert_eq!(signed_ms(round3(1.2 - 1.5)), "-0.300");
    }
}
