//! Command-line interface: clap structs only, no behaviour.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use switchyard_loadlab::bench::BenchArgs;
use switchyard_loadlab::mock::MockConfig;

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
    Bench(Box<BenchArgs>),
    /// Measure the usage log writer: rows per second into the configured database.
    BenchWriter(BenchWriterArgs),
    /// Measure token counting: MB/s on mixed text and the 1 MiB one-character worst case
    /// (against tiktoken-rs when built with the `tokenizer-compare` feature).
    BenchTokens(BenchTokensArgs),
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
pub struct BenchTokensArgs {
    /// MiB of mixed text to count.
    #[arg(long, default_value_t = 8)]
    pub mib: usize,
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
    /// Serve only the mock's MCP tools, on stdin and stdout (an MCP stdio server).
    #[arg(long)]
    pub mcp_stdio: bool,
    #[command(flatten)]
    pub behaviour: MockConfig,
}
