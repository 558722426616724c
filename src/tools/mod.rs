//! Server-side tools: the operator's HTTP APIs (`[tools.NAME]`), each called on one
//! pooled client under its own concurrency bound, deadline and answer cache.
//!
//! [`Tools::invoke`] is the one way a tool runs, whether an app calls it directly
//! (`POST /v1/tools/{name}/invoke`) or a model does. Identical calls in flight share one
//! upstream request, and with `cache_ttl` its answer is reused. A failure is an answer
//! too: an [`Invocation`] whose output is the error's sentence, which is what a model
//! needs to read; only an unknown tool or unusable arguments are the caller's mistake.
//!
//! [`mcp`] runs MCP servers' tools: the operator's `[mcp_servers.LABEL]`, started once and
//! kept, and a request's own servers, whose sessions are kept in a bounded cache.
//!
//! [`address`] decides what a URL a model chose may reach (private, loopback, link-local
//! and other non-public ranges refused, checked on every resolved address); the operator's
//! own tool URLs are not subject to it.

pub mod address;
pub mod fetch;
pub mod http;
pub mod mcp;
pub mod search;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::config::{McpConfig, Settings};
use crate::routing::breaker::CircuitBreaker;
use address::AddressPolicy;
use http::HttpTool;
use mcp::McpServer;

/// Bytes of answers each tool's cache keeps.
const CACHE_BYTES_PER_TOOL: u64 = 16 << 20;

/// Every configured tool.
pub struct Tools {
    tools: BTreeMap<String, Tool>,
    client: reqwest::Client,
    /// The operator's MCP servers, by label.
    mcp: BTreeMap<String, Arc<McpServer>>,
    /// Sessions with servers that requests named themselves.
    remote: RemoteServers,
    /// Slots for tool calls in flight, across every tool (`[tool_loop] max_concurrent`).
    global: Arc<tokio::sync::Semaphore>,
    /// Model calls a turn may make (`[tool_loop] max_steps`).
    max_steps: usize,
}

/// Servers a request names by `server_url`: address-checked like `fetch_url`, reached
/// through a client that connects only to checked addresses, and kept open (bounded, closed
/// when idle) so a conversation's turns share one session.
struct RemoteServers {
    config: McpConfig,
    policy: Arc<AddressPolicy>,
    client: reqwest::Client,
    sessions: moka::future::Cache<String, Arc<McpServer>>,
    global: Arc<tokio::sync::Semaphore>,
}

struct Tool {
    runner: Runner,
    /// Answers by canonical arguments: shared while in flight, kept for `cache_ttl`.
    answers: moka::future::Cache<String, Arc<str>>,
    /// Nothing is kept once a call is over (identical calls in flight still share it).
    keep_none: bool,
    counts: Counts,
}

/// A tool's figures since start, for `/admin/stats`.
#[derive(Default)]
struct Counts {
    calls: AtomicU64,
    errors: AtomicU64,
    cached: AtomicU64,
    total_us: AtomicU64,
}

/// One tool's figures in `/admin/stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ToolSnapshot {
    pub name: String,
    pub calls: u64,
    pub errors: u64,
    pub cached: u64,
    pub mean_ms: f64,
    /// Its host's breaker (HTTP tools only).
    pub circuit: Option<crate::routing::breaker::CircuitState>,
}

/// What a tool runs.
enum Runner {
    Http(Box<HttpTool>),
    Fetch(Box<fetch::FetchTool>),
    Search(Box<search::SearchTool>),
}

impl Tool {
    fn new(runner: Runner, cache_ttl: Duration) -> Tool {
        // With no cache_ttl an answer is kept only while in flight (see `invoke`).
        let ttl = if cache_ttl.is_zero() {
            Duration::from_secs(60)
        } else {
            cache_ttl
        };
        let answers = moka::future::Cache::builder()
            .max_capacity(CACHE_BYTES_PER_TOOL)
            .weigher(|k: &String, v: &Arc<str>| {
                u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX)
            })
            .time_to_live(ttl)
            .build();
        Tool {
            runner,
            answers,
            keep_none: cache_ttl.is_zero(),
            counts: Counts::default(),
        }
    }

    fn description(&self) -> &str {
        match &self.runner {
            Runner::Http(http) => &http.config.description,
            Runner::Fetch(_) => fetch::FetchTool::description(),
            Runner::Search(_) => search::SearchTool::description(),
        }
    }

    fn parameters(&self) -> Value {
        match &self.runner {
            Runner::Http(http) => http.config.parameters.clone(),
            Runner::Fetch(_) => fetch::FetchTool::parameters(),
            Runner::Search(_) => search::SearchTool::parameters(),
        }
    }

    /// The longest a call may take, waiting for a slot included.
    fn timeout(&self) -> Duration {
        match &self.runner {
            Runner::Http(http) => http.config.timeout,
            Runner::Fetch(fetch) => fetch.config.timeout,
            Runner::Search(search) => search.config.timeout,
        }
    }

    fn check(&self, arguments: &Map<String, Value>) -> Result<(), String> {
        match &self.runner {
            Runner::Http(http) => http.check(arguments),
            Runner::Fetch(_) => fetch::FetchTool::check(arguments),
            Runner::Search(_) => search::SearchTool::check(arguments),
        }
    }

    async fn call(
        &self,
        client: &reqwest::Client,
        arguments: &Map<String, Value>,
    ) -> Result<String, String> {
        match &self.runner {
            Runner::Http(http) => http
                .call(client, arguments)
                .await
                .map_err(|e| e.to_string()),
            Runner::Fetch(fetch) => fetch.call(arguments).await,
            Runner::Search(search) => search.call(client, arguments).await,
        }
    }
}

/// The outcome of one call.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The tool's answer, or why there is none.
    pub output: Result<Arc<str>, String>,
    /// Served from the answer cache.
    pub cached: bool,
    pub duration: Duration,
}

/// Why the tools could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ToolsError {
    #[error("the tools' HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("{0}")]
    Fetch(String),
    #[error("mcp: {0}")]
    Mcp(String),
}

/// Why a call was not made: the caller's mistake.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("No tool named '{0}'.")]
    Unknown(String),
    #[error("{0}")]
    Arguments(String),
}

impl Tools {
    /// The tools of `settings`, sharing one client (a pool per host, no proxy from the
    /// environment: what a tool reaches is what the operator wrote).
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn from_settings(settings: &Settings) -> Result<Tools, ToolsError> {
        crate::providers::install_crypto();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        // One breaker per host: tools on the same API fail together.
        let mut breakers: BTreeMap<String, Arc<CircuitBreaker>> = BTreeMap::new();
        let mut tools: BTreeMap<String, Tool> = BTreeMap::new();
        for (name, config) in &settings.tools {
            let host = HttpTool::host_key(config);
            let breaker = breakers
                .entry(host.clone())
                .or_insert_with(|| {
                    Arc::new(CircuitBreaker::new(
                        &format!("tool:{host}"),
                        settings.circuit_breaker.clone(),
                    ))
                })
                .clone();
            let http = HttpTool::new(name, config, breaker);
            tools.insert(
                name.clone(),
                Tool::new(Runner::Http(Box::new(http)), config.cache_ttl),
            );
        }
        if let Some(config) = &settings.web_search {
            let search = search::SearchTool {
                config: config.clone(),
            };
            tools.insert(
                search::NAME.to_owned(),
                Tool::new(Runner::Search(Box::new(search)), config.cache_ttl),
            );
        }
        if let Some(config) = &settings.fetch_url {
            // Checked when the settings were read: an error here is a bug.
            let fetch = fetch::FetchTool::new(config).map_err(ToolsError::Fetch)?;
            tools.insert(
                fetch::NAME.to_owned(),
                Tool::new(Runner::Fetch(Box::new(fetch)), config.cache_ttl),
            );
        }
        let global = Arc::new(tokio::sync::Semaphore::new(
            settings.tool_loop.max_concurrent,
        ));
        let mcp = settings
            .mcp_servers
            .iter()
            .map(|(label, config)| {
                (
                    label.clone(),
                    Arc::new(McpServer::from_config(
                        label,
                        config,
                        &client,
                        global.clone(),
                    )),
                )
            })
            .collect();
        let remote = RemoteServers::new(&settings.mcp, global.clone())?;
        Ok(Tools {
            tools,
            client,
            mcp,
            remote,
            global,
            max_steps: settings.tool_loop.max_steps,
        })
    }

    /// Model calls one turn may make (`[tool_loop] max_steps`).
    pub fn max_steps(&self) -> usize {
        self.max_steps
    }

    /// The operator's MCP server `label`.
    pub fn mcp_server(&self, label: &str) -> Option<Arc<McpServer>> {
        self.mcp.get(label).cloned()
    }

    /// The MCP server a request names at `url` under `label`, with the request's
    /// `headers`: a kept session when the same key named the same server before.
    ///
    /// # Errors
    /// Request servers are off, or the URL may not be reached.
    pub async fn request_mcp_server(
        &self,
        owner: Option<&str>,
        label: &str,
        url: &str,
        headers: &[(String, String)],
    ) -> Result<Arc<McpServer>, String> {
        self.remote.server(owner, label, url, headers).await
    }

    /// Every MCP server's calls, errors, mean latency and starts.
    pub fn mcp_snapshot(&self) -> Vec<ToolSnapshot> {
        self.mcp
            .iter()
            .map(|(label, server)| ToolSnapshot {
                name: format!("mcp:{label}"),
                calls: server.counts.calls.load(Ordering::Relaxed),
                errors: server.counts.errors.load(Ordering::Relaxed),
                cached: 0,
                mean_ms: server.mean_ms(),
                circuit: None,
            })
            .collect()
    }

    /// Ends every MCP session: clients closed, child processes killed and reaped.
    pub async fn shutdown(&self) {
        let servers = self.mcp.values().cloned().chain(
            self.remote
                .sessions
                .iter()
                .map(|(_, server)| server)
                .collect::<Vec<_>>(),
        );
        futures_util::future::join_all(servers.map(|s| async move { s.shutdown().await })).await;
        self.remote.sessions.invalidate_all();
    }

    /// Every tool's calls, errors, cache hits, mean latency and circuit, by name.
    pub fn snapshot(&self) -> Vec<ToolSnapshot> {
        let mut all = self.tool_snapshot();
        all.extend(self.mcp_snapshot());
        all
    }

    fn tool_snapshot(&self) -> Vec<ToolSnapshot> {
        self.tools
            .iter()
            .map(|(name, tool)| {
                let calls = tool.counts.calls.load(Ordering::Relaxed);
                let total_us = tool.counts.total_us.load(Ordering::Relaxed);
                #[allow(clippy::cast_precision_loss)] // microseconds: far below 2^52
                let mean_ms = if calls == 0 {
                    0.0
                } else {
                    total_us as f64 / calls as f64 / 1000.0
                };
                ToolSnapshot {
                    name: name.clone(),
                    calls,
                    errors: tool.counts.errors.load(Ordering::Relaxed),
                    cached: tool.counts.cached.load(Ordering::Relaxed),
                    mean_ms,
                    circuit: match &tool.runner {
                        Runner::Http(http) => Some(http.circuit()),
                        _ => None,
                    },
                }
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty() && self.mcp.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// Every tool as a function definition in the Responses API's shape (`type`, `name`,
    /// `description`, `parameters`), in name order.
    pub fn definitions(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|(name, tool)| {
                serde_json::json!({
                    "type": "function",
                    "name": name,
                    "description": tool.description(),
                    "parameters": tool.parameters(),
                })
            })
            .collect()
    }

    /// Tool `name` as a Chat Completions function tool, for a model call.
    pub fn chat_definition(&self, name: &str) -> Option<Value> {
        let tool = self.tools.get(name)?;
        Some(serde_json::json!({
            "type": "function",
            "function": {
                "name": name,
                "description": tool.description(),
                "parameters": tool.parameters(),
            },
        }))
    }

    /// Runs tool `name` with `arguments` (an object, or a string holding one as models
    /// write them); with `metering`, the call is a usage row of that operation.
    ///
    /// # Errors
    /// An unknown tool, or arguments that are not an object or lack a required one.
    pub async fn invoke(
        &self,
        name: &str,
        arguments: &Value,
        metering: Option<&crate::inference::Metering>,
    ) -> Result<Invocation, InvokeError> {
        let tool = self
            .tools
            .get(name)
            .ok_or_else(|| InvokeError::Unknown(name.to_owned()))?;
        let parsed;
        let arguments = match arguments {
            Value::Object(map) => map,
            Value::String(text) => {
                parsed = serde_json::from_str::<Map<String, Value>>(text).map_err(|_| {
                    InvokeError::Arguments("The arguments string is not a JSON object.".into())
                })?;
                &parsed
            }
            _ => {
                return Err(InvokeError::Arguments(
                    "'arguments' must be a JSON object.".into(),
                ));
            }
        };
        tool.check(arguments).map_err(InvokeError::Arguments)?;
        // serde_json's map is ordered by key: equal arguments give equal keys.
        let key = serde_json::to_string(arguments).unwrap_or_default();
        let started = Instant::now();
        let (output, cached) = match tool.answers.get(&key).await {
            Some(answer) => (Ok(answer), true),
            None => {
                let answer = tool
                    .answers
                    .try_get_with(key.clone(), async {
                        // The global bound: a slot among every tool's calls, waited for
                        // within the tool's own deadline.
                        let timeout = tool.timeout();
                        tokio::time::timeout(timeout, async {
                            let _slot = self.global.acquire().await.ok();
                            tool.call(&self.client, arguments).await
                        })
                        .await
                        .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")))
                        .map(Arc::<str>::from)
                    })
                    .await
                    .map_err(|e| e.to_string());
                if tool.keep_none {
                    tool.answers.invalidate(&key).await;
                }
                (answer, false)
            }
        };
        let duration = started.elapsed();
        let counts = &tool.counts;
        counts.calls.fetch_add(1, Ordering::Relaxed);
        counts
            .errors
            .fetch_add(u64::from(output.is_err()), Ordering::Relaxed);
        counts
            .cached
            .fetch_add(u64::from(cached), Ordering::Relaxed);
        counts.total_us.fetch_add(
            u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let outcome = match (&output, cached) {
            (Ok(_), true) => "cached",
            (Ok(_), false) => "ok",
            (Err(_), _) => "error",
        };
        metrics::counter!("switchyard_tool_calls_total", "tool" => name.to_owned(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("switchyard_tool_call_duration_seconds", "tool" => name.to_owned())
            .record(duration.as_secs_f64());
        if let Some(metering) = metering {
            let status = match &output {
                Ok(_) => 200,
                Err(e) if e.contains("timed out") => 504,
                Err(_) => 502,
            };
            metering.tool_call(name, duration, status, cached);
        }
        Ok(Invocation {
            output,
            cached,
            duration,
        })
    }
}

impl RemoteServers {
    fn new(
        config: &McpConfig,
        global: Arc<tokio::sync::Semaphore>,
    ) -> Result<RemoteServers, ToolsError> {
        let (policy, resolver) = address::guarded(&config.allow, &config.deny, &config.resolve)
            .map_err(ToolsError::Mcp)?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(resolver)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let sessions = moka::future::Cache::builder()
            .max_capacity(config.max_sessions)
            .time_to_idle(config.idle_timeout)
            .build();
        Ok(RemoteServers {
            config: config.clone(),
            policy,
            client,
            sessions,
            global,
        })
    }

    async fn server(
        &self,
        owner: Option<&str>,
        label: &str,
        url: &str,
        headers: &[(String, String)],
    ) -> Result<Arc<McpServer>, String> {
        if !self.config.request_servers {
            return Err(
                "this server does not connect to MCP servers named by requests \
                        ([mcp] request_servers = false); use a configured server's label"
                    .into(),
            );
        }
        let parsed = reqwest::Url::parse(url).map_err(|_| format!("{url:?} is not a URL"))?;
        address::check_url(&self.policy, &parsed)?;
        // A session is the key's own: headers (credentials) are part of what it is.
        let mut hasher = sha2::Sha256::default();
        for part in [owner.unwrap_or(""), label, url] {
            sha2::Digest::update(&mut hasher, part.as_bytes());
            sha2::Digest::update(&mut hasher, [0]);
        }
        for (name, value) in headers {
            sha2::Digest::update(&mut hasher, name.to_ascii_lowercase().as_bytes());
            sha2::Digest::update(&mut hasher, [0]);
            sha2::Digest::update(&mut hasher, value.as_bytes());
            sha2::Digest::update(&mut hasher, [0]);
        }
        let key = format!("{:x}", sha2::Digest::finalize(hasher));
        let server = self
            .sessions
            .get_with(key, async {
                Arc::new(McpServer::remote(
                    label,
                    url,
                    headers,
                    self.client.clone(),
                    self.config.timeout,
                    self.global.clone(),
                ))
            })
            .await;
        Ok(server)
    }
}
