//! MCP servers as tool sources, through the official Rust SDK (rmcp): the operator's
//! `[mcp_servers.LABEL]` (a child process on stdio, or a streamable-HTTP endpoint) and a
//! request's own `{"type": "mcp", "server_url": …}` servers.
//!
//! An [`McpServer`] holds at most one session. It is opened on first use (the process
//! started, `initialize` sent, the tools listed), kept for the calls after it, and opened
//! again when it has died (a crashed child, a dropped HTTP session): the call that finds
//! it dead restarts it; a call in flight when it died fails with the reason. A stdio
//! server runs as the leader of its own process group, and the whole group is killed when
//! its session ends (restart, shutdown, or the server dropped), so nothing it started is
//! left behind.
//!
//! The model sees each tool as a function named `{label}__{tool}` ([`function_name`]);
//! items show the label and the tool's own name, as OpenAI's `mcp_call` does.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use process_wrap::tokio::{ChildWrapper, CommandWrap, KillOnDrop, ProcessGroup};
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ContentBlock};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{ApprovalMode, McpServerConfig};

/// The most of a call's output that goes back to the model.
const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// One of a server's tools, as listed.
#[derive(Debug, Clone)]
pub struct McpTool {
    pub name: String,
    pub description: Option<String>,
    pub input_schema: Value,
    pub annotations: Option<Value>,
}

impl McpTool {
    fn read_only(&self) -> bool {
        self.annotations
            .as_ref()
            .and_then(|a| a.get("readOnlyHint"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The tool in `mcp_list_tools`'s shape (SDK: `McpListToolsTool`).
    pub fn listed(&self) -> Value {
        let mut tool = serde_json::json!({
            "name": self.name,
            "input_schema": self.input_schema,
        });
        if let Some(description) = &self.description {
            tool["description"] = Value::from(description.as_str());
        }
        if let Some(annotations) = &self.annotations {
            tool["annotations"] = annotations.clone();
        }
        tool
    }
}

/// The function name the model calls `tool` of server `label` by: `{label}__{tool}`, with
/// characters function names may not hold replaced, at most 64 bytes.
pub fn function_name(label: &str, tool: &str) -> String {
    let mut name: String = format!("{label}__{tool}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(64);
    name
}

/// Which tools need the client's approval before they run (OpenAI's `require_approval`).
#[derive(Debug, Clone, PartialEq)]
pub enum Approval {
    Never,
    Always,
    /// Tools matching `never` run at once; the rest wait for approval (matching `always`
    /// or not: approval is the default).
    Filter {
        never: ToolFilter,
    },
}

/// `tool_names` and `read_only` of a filter: a tool matches when it meets every given one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolFilter {
    pub tool_names: Option<Vec<String>>,
    pub read_only: Option<bool>,
}

impl ToolFilter {
    pub fn matches(&self, tool: &McpTool) -> bool {
        self.tool_names
            .as_ref()
            .is_none_or(|names| names.contains(&tool.name))
            && self.read_only.is_none_or(|r| r == tool.read_only())
            && (self.tool_names.is_some() || self.read_only.is_some())
    }
}

impl Approval {
    pub fn required(&self, tool: &McpTool) -> bool {
        match self {
            Approval::Never => false,
            Approval::Always => true,
            Approval::Filter { never } => !never.matches(tool),
        }
    }
}

impl From<ApprovalMode> for Approval {
    fn from(mode: ApprovalMode) -> Approval {
        match mode {
            ApprovalMode::Never => Approval::Never,
            ApprovalMode::Always => Approval::Always,
        }
    }
}

/// How a session is opened.
enum Transport {
    Stdio {
        command: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
    },
    Http {
        url: String,
        headers: HashMap<http::HeaderName, http::HeaderValue>,
        client: reqwest::Client,
    },
}

/// An open session: the client, the tools listed when it opened, and (stdio) the watch
/// on its process.
struct Session {
    service: RunningService<RoleClient, ()>,
    tools: Arc<[McpTool]>,
    process: Option<Process>,
}

impl Session {
    /// The client is running and, for stdio, the process has not exited.
    fn alive(&self) -> bool {
        !self.service.is_closed()
            && self
                .process
                .as_ref()
                .is_none_or(|p| !p.exited.is_cancelled())
    }

    /// Resolves when the server process has exited (never for HTTP).
    async fn exited(&self) {
        match &self.process {
            Some(process) => process.exited.cancelled().await,
            None => std::future::pending().await,
        }
    }
}

/// A stdio server's process, watched by a task that owns it: when the process exits on
/// its own, or when this is dropped, the task kills its whole process group (what the
/// server started included), reaps it, and marks `exited`.
struct Process {
    exited: CancellationToken,
    /// Dropped (with the session): the watcher kills the group.
    _kill: oneshot::Sender<()>,
}

impl Process {
    fn watch(mut child: Box<dyn ChildWrapper>) -> Process {
        let exited = CancellationToken::new();
        let (kill, killed) = oneshot::channel::<()>();
        let done = exited.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = child.wait() => {}
                _ = killed => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
            // The leader is gone; anything it left in its group goes too (the group id
            // outlives the leader while members remain).
            let _ = child.signal(SIGKILL);
            done.cancel();
        });
        Process {
            exited,
            _kill: kill,
        }
    }
}

/// SIGKILL's number (9 on every Unix).
const SIGKILL: i32 = 9;

/// A server's figures since start, for `/admin/stats` and tests.
#[derive(Default)]
pub struct McpCounts {
    pub starts: AtomicU64,
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    total_us: AtomicU64,
}

/// One MCP server and its session.
pub struct McpServer {
    label: String,
    transport: Transport,
    allowed: Option<Vec<String>>,
    approval: Approval,
    timeout: Duration,
    startup_timeout: Duration,
    slots: Semaphore,
    /// Slots shared by every tool's calls.
    global: Arc<Semaphore>,
    /// Locked while a session is opened, so that one start serves every waiting call.
    session: Mutex<Option<Arc<Session>>>,
    pub counts: McpCounts,
}

impl McpServer {
    /// A configured server (nothing is started until it is used).
    pub fn from_config(
        label: &str,
        config: &McpServerConfig,
        client: &reqwest::Client,
        global: Arc<Semaphore>,
    ) -> Self {
        let transport = match (&config.command, &config.url) {
            (Some(command), _) => Transport::Stdio {
                command: command.clone(),
                args: config.args.clone(),
                env: config
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.expose().to_owned()))
                    .collect(),
            },
            (None, url) => Transport::Http {
                url: url.clone().unwrap_or_default(),
                headers: header_map(config.headers.iter().map(|(k, v)| (k.as_str(), v.expose()))),
                client: client.clone(),
            },
        };
        McpServer {
            label: label.to_owned(),
            transport,
            allowed: config.allowed_tools.clone(),
            approval: config.require_approval.into(),
            timeout: config.timeout,
            startup_timeout: config.startup_timeout,
            slots: Semaphore::new(config.max_concurrent),
            global,
            session: Mutex::new(None),
            counts: McpCounts::default(),
        }
    }

    /// A request's server at `url` (already address-checked; `client` connects only to
    /// checked addresses).
    pub fn remote(
        label: &str,
        url: &str,
        headers: &[(String, String)],
        client: reqwest::Client,
        timeout: Duration,
        global: Arc<Semaphore>,
    ) -> McpServer {
        McpServer {
            label: label.to_owned(),
            transport: Transport::Http {
                url: url.to_owned(),
                headers: header_map(headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                client,
            },
            allowed: None,
            approval: Approval::Always,
            timeout,
            startup_timeout: timeout,
            slots: Semaphore::new(16),
            global,
            session: Mutex::new(None),
            counts: McpCounts::default(),
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The configured approval policy (a request's `require_approval` replaces it).
    pub fn approval(&self) -> &Approval {
        &self.approval
    }

    /// The server's tools (its `allowed_tools` only), opening a session if none is open.
    ///
    /// # Errors
    /// Why the server could not be started or listed.
    pub async fn tools(&self) -> Result<Arc<[McpTool]>, String> {
        Ok(self.session().await?.tools.clone())
    }

    /// The open session, or a new one.
    async fn session(&self) -> Result<Arc<Session>, String> {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref()
            && session.alive()
        {
            return Ok(session.clone());
        }
        // A dead session's child is killed and reaped as it is dropped here.
        *slot = None;
        let opened = tokio::time::timeout(self.startup_timeout, self.open())
            .await
            .map_err(|_| {
                format!(
                    "MCP server {} did not start within {:?}",
                    self.label, self.startup_timeout
                )
            })??;
        self.counts.starts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("switchyard_mcp_sessions_started_total", "server" => self.label.clone())
            .increment(1);
        let session = Arc::new(opened);
        *slot = Some(session.clone());
        Ok(session)
    }

    async fn open(&self) -> Result<Session, String> {
        let label = &self.label;
        let (service, child) = match &self.transport {
            Transport::Stdio { command, args, env } => {
                let mut cmd = tokio::process::Command::new(command);
                cmd.args(args)
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit());
                let mut wrap = CommandWrap::from(cmd);
                wrap.wrap(ProcessGroup::leader()).wrap(KillOnDrop);
                let mut child = wrap
                    .spawn()
                    .map_err(|e| format!("MCP server {label}: cannot start {command}: {e}"))?;
                let (Some(stdout), Some(stdin)) = (child.stdout().take(), child.stdin().take())
                else {
                    return Err(format!("MCP server {label}: no pipes to {command}"));
                };
                let process = Process::watch(child);
                let service = ()
                    .serve((stdout, stdin))
                    .await
                    .map_err(|e| format!("MCP server {label} did not initialise: {e}"))?;
                (service, Some(process))
            }
            Transport::Http {
                url,
                headers,
                client,
            } => {
                let config = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                    .custom_headers(headers.clone());
                let transport = StreamableHttpClientTransport::with_client(client.clone(), config);
                let service = ()
                    .serve(transport)
                    .await
                    .map_err(|e| format!("MCP server {label} did not initialise: {e}"))?;
                (service, None)
            }
        };
        let listed = service
            .peer()
            .list_all_tools()
            .await
            .map_err(|e| format!("MCP server {label}: listing its tools failed: {e}"))?;
        let tools: Arc<[McpTool]> = listed
            .into_iter()
            .filter(|t| {
                self.allowed
                    .as_ref()
                    .is_none_or(|allowed| allowed.iter().any(|a| *a == *t.name))
            })
            .map(|t| McpTool {
                name: t.name.to_string(),
                description: t.description.map(|d| d.to_string()),
                input_schema: Value::Object((*t.input_schema).clone()),
                annotations: t
                    .annotations
                    .as_ref()
                    .and_then(|a| serde_json::to_value(a).ok()),
            })
            .collect();
        Ok(Session {
            service,
            tools,
            process: child,
        })
    }

    /// Calls `tool` with `arguments`: its text output, or why there is none (the
    /// server's own error result included). Bounded by the server's concurrency and
    /// deadline; a call cut off by the deadline is cancelled on the server.
    ///
    /// # Errors
    /// The error's sentence, for the model.
    pub async fn call(&self, tool: &str, arguments: Map<String, Value>) -> Result<String, String> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| "the server is shutting down".to_owned())?;
            let _global = self.global.acquire().await.ok();
            let session = self.session().await?;
            let mut params = CallToolRequestParams::new(tool.to_owned());
            params.arguments = Some(arguments);
            let called = tokio::select! {
                called = session.service.peer().call_tool(params) => called,
                () = session.exited() => {
                    self.forget(&session).await;
                    return Err(format!("MCP server {}: its process exited", self.label));
                }
            };
            let result = match called {
                Ok(result) => result,
                Err(e) => {
                    if matches!(
                        e,
                        rmcp::ServiceError::TransportClosed | rmcp::ServiceError::TransportSend(_)
                    ) {
                        // The session is gone: the next call opens another.
                        self.forget(&session).await;
                    }
                    return Err(format!("MCP server {}: {e}", self.label));
                }
            };
            let text = output_text(&result.content, result.structured_content.as_ref());
            if result.is_error == Some(true) {
                Err(text)
            } else {
                Ok(text)
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {:?}", self.timeout)));
        let counts = &self.counts;
        counts.calls.fetch_add(1, Ordering::Relaxed);
        counts
            .errors
            .fetch_add(u64::from(result.is_err()), Ordering::Relaxed);
        counts.total_us.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        result
    }

    async fn forget(&self, session: &Arc<Session>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|open| Arc::ptr_eq(open, session)) {
            *slot = None;
        }
    }

    /// Mean call latency in milliseconds.
    pub fn mean_ms(&self) -> f64 {
        let calls = self.counts.calls.load(Ordering::Relaxed);
        let total_us = self.counts.total_us.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)] // microseconds: far below 2^52
        if calls == 0 {
            0.0
        } else {
            total_us as f64 / calls as f64 / 1000.0
        }
    }

    /// Ends the session: the client closed, the child's process group killed and reaped.
    pub async fn shutdown(&self) {
        self.slots.close();
        let session = self.session.lock().await.take();
        if let Some(session) = session
            && let Ok(mut session) = Arc::try_unwrap(session)
        {
            let _ = session
                .service
                .close_with_timeout(Duration::from_secs(2))
                .await;
            if let Some(process) = session.process.take() {
                let exited = process.exited.clone();
                drop(process);
                exited.cancelled().await;
            }
        }
    }
}

/// A call's content as text: text blocks joined, anything else as its JSON; the
/// structured result when there is no content. Cut to [`MAX_OUTPUT_BYTES`].
fn output_text(content: &[ContentBlock], structured: Option<&Value>) -> String {
    let mut text = content
        .iter()
        .map(|block| match block.as_text() {
            Some(t) => t.text.clone(),
            None => serde_json::to_string(block).unwrap_or_default(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    if text.is_empty()
        && let Some(structured) = structured
    {
        text = structured.to_string();
    }
    if text.len() > MAX_OUTPUT_BYTES {
        let mut end = MAX_OUTPUT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn header_map<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> HashMap<http::HeaderName, http::HeaderValue> {
    pairs
        .filter_map(|(k, v)| {
            Some((
                http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                http::HeaderValue::from_str(v).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, read_only: bool) -> McpTool {
        McpTool {
            name: name.into(),
            description: None,
            input_schema: serde_json::json!({"type": "object"}),
            annotations: read_only.then(|| serde_json::json!({"readOnlyHint": true})),
        }
    }

    #[test]
    fn function_names_are_what_models_accept() {
        assert_eq!(function_name("files", "read"), "files__read");
        assert_eq!(
            function_name("files", "read.file v2"),
            "files__read_file_v2"
        );
        assert_eq!(function_name("x", &"y".repeat(100)).len(), 64);
    }

    #[test]
    fn approval_filters_match_names_and_read_only_hints() {
        let read = tool("read", true);
        let write = tool("write", false);
        assert!(!Approval::Never.required(&write));
        assert!(Approval::Always.required(&read));
        let by_name = Approval::Filter {
            never: ToolFilter {
                tool_names: Some(vec!["read".into()]),
                read_only: None,
            },
        };
        assert!(!by_name.required(&read));
        assert!(by_name.required(&write));
        let read_only = Approval::Filter {
            never: ToolFilter {
                tool_names: None,
                read_only: Some(true),
            },
        };
        assert!(!read_only.required(&read));
        assert!(read_only.required(&write));
        // An empty filter matches nothing: everything waits for approval.
        let empty = Approval::Filter {
            never: ToolFilter::default(),
        };
        assert!(empty.required(&read));
    }

    #[test]
    fn output_is_text_joined_and_cut() {
        let blocks = vec![ContentBlock::text("a"), ContentBlock::text("b")];
        assert_eq!(output_text(&blocks, None), "a\nb");
        let structured = serde_json::json!({"x": 1});
        assert_eq!(output_text(&[], Some(&structured)), r#"{"x":1}"#);
        let long = vec![ContentBlock::text("é".repeat(MAX_OUTPUT_BYTES))];
        assert!(output_text(&long, None).len() <= MAX_OUTPUT_BYTES);
    }
}
