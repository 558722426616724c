//! Command-line interface: clap structs only, no behaviour.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Switchyard: an OpenAI-compatible AI gateway and application backend in one binary.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (with no config: offline, on the built-in simulated provider).
    Serve(ServeArgs),
    /// Validate a config file and exit non-zero with a one-line reason if it is unusable.
    CheckConfig(ConfigArgs),
    /// Create or upgrade the database schema (`serve` does this too) and exit.
    Migrate(ConfigArgs),
    /// Create, list and revoke API keys in the configured database.
    Keys(KeysArgs),
    /// Run the fault-injecting OpenAI- and Anthropic-compatible mock upstream.
    MockUpstream(MockArgs),
    /// Drive load against a target and report latency percentiles.
    Bench(BenchArgs),
    /// Measure the usage log writer: rows per second into the configured database.
    BenchWriter(BenchWriterArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Path to switchyard.toml.
    #[arg(long, short, global = true, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Listen address; overrides `[server] listen`.
    #[arg(long, env = "SWITCHYARD_LISTEN")]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct BenchWriterArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Rows to write.
    #[arg(long, default_value_t = 200_000)]
    pub rows: u64,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; the secret is printed once, alone on the last line of stdout.
    Create(KeyCreateArgs),
    /// List keys (never their secrets).
    List {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id.
    Revoke {
        /// The key's id (`key_...`), as `keys list` shows it.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct KeyCreateArgs {
    /// A name to recognise the key by.
    #[arg(long)]
    pub name: String,
    /// Aliases the key may use, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Requests per minute.
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute.
    #[arg(long)]
    pub tpm: Option<u64>,
    /// Token budget (in + out) per --budget-period.
    #[arg(long)]
    pub budget: Option<u64>,
    /// When the budget starts again: day, month or total.
    #[arg(long, default_value = "month", value_parser = ["day", "month", "total"])]
    pub budget_period: String,
}

#[derive(Debug, Args)]
pub struct MockArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub behaviour: crate::loadlab::mock::MockConfig,
}

/// Which request shape `bench` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Non-stream chat completions.
    Chat,
    /// Streamed chat completions (SSE); time to first byte is reported.
    Stream,
    /// Embeddings.
    Embeddings,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Base URL of the target, e.g. http://127.0.0.1:8080 (the /v1/... path is appended).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Model sent in every request.
    #[arg(long, default_value = crate::config::SIMULATED_MODEL)]
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
}
