//! Switchyard: an OpenAI-compatible AI gateway in one binary.
//!
//! The modules, in the order a request meets them:
//!
//! - [`app`]: builds state, binds, serves, drains on shutdown; [`state`]: the shared state.
//! - [`listener`]: the accept loop: connection cap, header read timeout, HTTP/2 limits,
//!   request-head size checks.
//! - [`api`]: the router and its guards (API key, admin key), one module per endpoint
//!   family (`chat`, `embeddings`, `models`, `usage`, `admin`) plus health, readiness and
//!   metrics. Handlers extract, call [`inference`], render.
//! - [`wire`]: OpenAI request envelopes with raw pass-through fields, the typed chat schema
//!   with stream assembly (`wire::chat`), stream event classification, SSE framing.
//! - [`conversations`]: the Responses API's turns on any provider: context assembly under
//!   a token budget, items ⇄ chat messages, the event lifecycle, history in the store.
//! - [`inference`]: the one place a model call is made: charge → cache/coalesce → admit →
//!   dispatch → settle, for HTTP handlers and every other caller alike.
//! - [`auth`]: API keys (hashed at rest) and the per-request key check.
//! - [`limits`]: per-key request rate, token rate and token budget (memory or Redis).
//! - [`admission`]: the global and per-provider concurrency limits with bounded queues.
//! - [`routing`]: model alias → weighted deployments; balancing, retries, fallbacks,
//!   circuit breakers.
//! - [`batch`]: embeddings micro-batching per deployment.
//! - [`cache`]: exact-match response cache, request coalescing, stream replay.
//! - [`tokens`]: token counts with the model's tokenizer, per-alias token budgets, the
//!   chat pre-flight (refuse or truncate an over-long prompt), context truncation.
//! - [`providers`]: one pooled client per upstream; OpenAI-compatible and Anthropic wire
//!   formats; the stream pipeline that forwards events as they arrive.
//! - [`error`]: the gateway error and its OpenAI shape.
//! - [`telemetry`]: logs, Prometheus metrics, the per-request record.
//! - [`store`]: SQLite or PostgreSQL for keys and the usage log, with its batched writer.
//! - [`config`]: `switchyard.toml`, loaded and validated once.
//!
//! The load lab (the fault-injecting mock upstream behind the simulated provider, and the
//! `bench` driver) is its own crate, `switchyard_loadlab`, which depends on nothing here.

pub mod admission;
pub mod api;
pub mod app;
pub mod auth;
pub mod batches;
pub mod cache;
pub mod cli;
pub mod config;
pub mod conversations;
pub mod error;
pub mod fanout;
pub mod files;
pub mod inference;
pub mod jobs;
pub mod limits;
pub mod listener;
pub mod memory;
pub mod microbatch;
pub mod providers;
pub mod routing;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod tools;
pub mod wire;
