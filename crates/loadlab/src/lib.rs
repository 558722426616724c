//! The Switchyard load lab: a fault-injecting mock upstream and a load driver, so every
//! figure in `docs/BENCHMARKS.md` can be reproduced offline.
//!
//! - [`mock`]: an OpenAI- and Anthropic-compatible upstream with tunable latency, stream
//!   pacing and injected faults ([`mock::MockServer`], [`mock::MockConfig`]). It is the
//!   upstream of the tests and benchmarks and the engine of the gateway's built-in simulated
//!   provider (`switchyard mock-upstream` runs it alone).
//! - [`bench`](mod@bench): the `switchyard bench` driver ([`bench::BenchArgs`], [`bench::run`]):
//!   open- or closed-loop load, latency percentiles, errors by kind, the latency a gateway
//!   adds over its upstream.
//! - [`locomo`]: `switchyard bench memory`: memory retrieval quality on LoCoMo
//!   conversations, through the target's `/v1/memories`.
//! - [`mcp`]: a small MCP server with deterministic tools, over streamable HTTP (the mock's
//!   `/mcp`) and stdio (`switchyard mock-upstream --mcp-stdio`).
//! - [`memory`]: the simulated model's answers to the gateway's memory-extraction calls
//!   (facts by pattern, decisions by word overlap).
//! - [`soak`]: `switchyard bench --soak`: mixed traffic for a long time with the target's
//!   memory, descriptors, tasks and pools sampled to CSV and SVG, and a verdict on drift.
//!
//! Nothing here depends on the gateway; the gateway depends on this crate.

pub mod bench;
pub mod locomo;
pub mod mcp;
pub mod memory;
pub mod mock;
pub mod soak;

/// The model the mock serves under the gateway's simulated provider, and the model `bench`
/// asks for by default.
pub const ECHO_MODEL: &str = "switchyard/echo";
