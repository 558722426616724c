//! The mock upstream: an OpenAI- and Anthropic-compatible server with tunable latency,
//! stream pacing and injected faults.
//!
//! It is the upstream of every test and benchmark, the engine behind the built-in
//! `switchyard/echo` model, and a product feature for offline development. Answers echo the
//! last user message; when tools are offered it calls them (in parallel, with arguments
//! filled from their schemas) and answers in text once tool results come back. `/stats`
//! counts requests and accepted TCP connections, which is how tests read pool reuse;
//! `PUT /config` changes faults at run time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the mock behaves. Every field is also a `mock-upstream` flag.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockConfig {
    /// Delay before the response starts, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Uniform random extra delay, 0..=this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_jitter_ms: u64,
    /// Content chunks in a streamed answer (0: one per word).
    #[arg(long, default_value_t = 8)]
    pub chunks: usize,
    /// Pause between stream chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub chunk_interval_ms: u64,
    /// Fixed answer text instead of echoing the last user message.
    #[arg(long)]
    pub reply: Option<String>,
    /// Fraction of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Fraction of requests answered 429 with `Retry-After`.
    #[arg(long, default_value_t = 0.0)]
    pub rate_limit_rate: f64,
    /// Answer the first N requests with 429 (then behave), for deterministic retry tests.
    #[arg(long, default_value_t = 0)]
    pub rate_limit_first: u64,
    /// Refuse prompts longer than this many tokens (about 4 bytes each) with a 400
    /// `context_length_exceeded`, like a model with a small context window.
    #[arg(long)]
    pub context_window: Option<u64>,
    /// The `Retry-After` value sent with injected 429s, in seconds.
    #[arg(long, default_value_t = 1)]
    pub retry_after_s: u64,
    /// Fraction of requests that never answer (bounded by `hang_ms`).
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// How long a hung request holds before the mock gives up on it, in milliseconds.
    #[arg(long, default_value_t = 600_000)]
    pub hang_ms: u64,
    /// Fraction of responses cut off mid-body (streams: after half the chunks).
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Fraction of responses with malformed JSON (streams: one malformed chunk).
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// Embedding vector length when the request does not set `dimensions`.
    #[arg(long, default_value_t = 8)]
    pub embedding_dims: usize,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            latency_ms: 0,
            latency_jitter_ms: 0,
            chunks: 8,
            chunk_interval_ms: 0,
            reply: None,
            fail_rate: 0.0,
            rate_limit_rate: 0.0,
            retry_after_s: 1,
            rate_limit_first: 0,
            context_window: None,
            hang_rate: 0.0,
            hang_ms: 600_000,
            drop_rate: 0.0,
            malformed_rate: 0.0,
            embedding_dims: 8,
        }
    }
}

impl MockConfig {
    /// Pacing that feels like a hosted model: a short think, then a word every 25 ms.
    pub fn realistic() -> Self {
        MockConfig {
            latency_ms: 150,
            latency_jitter_ms: 100,
            chunks: 0,
            chunk_interval_ms: 25,
            ..MockConfig::default()
        }
    }
}

/// Counters served at `/stats`.
#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
    pub chat: AtomicU64,
    pub messages: AtomicU64,
    pub embeddings: AtomicU64,
    pub streams: AtomicU64,
    pub faults: AtomicU64,
    /// Responses whose body (or stream) was fully written.
    pub completed: AtomicU64,
    /// Stream events handed to the connection.
    pub events: AtomicU64,
    /// Calls abandoned before their end because the client went away (streams, and any
    /// call during its latency).
    pub cancelled: AtomicU64,
    /// Calls of the fake tool APIs (`/tools/...`).
    pub tools: AtomicU64,
}

/// A point-in-time copy of [`MockStats`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct MockStatsSnapshot {
    pub requests: u64,
    pub connections: u64,
    pub chat: u64,
    pub messages: u64,
    pub embeddings: u64,
    pub streams: u64,
    pub faults: u64,
    pub completed: u64,
    pub events: u64,
    pub cancelled: u64,
    #[serde(default)]
    pub tools: u64,
}

impl MockStats {
    pub fn snapshot(&self) -> MockStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MockStatsSnapshot {
            requests: get(&self.requests),
            connections: get(&self.connections),
            chat: get(&self.chat),
            messages: get(&self.messages),
            embeddings: get(&self.embeddings),
            streams: get(&self.streams),
            faults: get(&self.faults),
            completed: get(&self.completed),
            events: get(&self.events),
            cancelled: get(&self.cancelled),
            tools: get(&self.tools),
        }
    }
}

/// Shared state of one mock server.
#[derive(Debug, Default)]
pub struct MockState {
    config: RwLock<MockConfig>,
    pub stats: MockStats,
    ids: AtomicU64,
    /// Model requests seen, for `rate_limit_first` (model listings do not count).
    model_requests: AtomicU64,
    /// The body of the last chat request, served at `/last-request` so tests can see what
    /// a gateway sent (a reference-counted copy: nothing is parsed or cloned for it).
    last_chat: RwLock<Bytes>,
}

impl MockState {
    pub fn config(&self) -> MockConfig {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }
    pub fn set_config(&self, config: MockConfig) {
        if let Ok(mut c) = self.config.write() {
            *c = config;
        }
    }
    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}

/// A running mock server.
pub struct MockServer {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MockServer {
    /// Binds `addr` (port 0 for any) and serves until [`MockServer::shutdown`] or drop.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(addr: SocketAddr, config: MockConfig) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(MockState {
            config: RwLock::new(config),
            ..MockState::default()
        });
        let shutdown = CancellationToken::new();
        let task = Some(tokio::spawn(serve(
            listener,
            state.clone(),
            shutdown.clone(),
        )));
        Ok(MockServer {
            addr,
            state,
            shutdown,
            task,
        })
    }

    /// The OpenAI-style base URL, `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn stats(&self) -> MockStatsSnapshot {
        self.state.stats.snapshot()
    }

    /// Stops accepting, lets open responses finish, and waits for the server task.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Most concurrent HTTP/2 streams on one connection. hyper's default (200) would make a
/// gateway that multiplexes thousands of slow streams over one connection queue them here.
const MAX_H2_STREAMS: u32 = 100_000;

/// Serves the mock on `listener` until `shutdown` fires: HTTP/1.1, and HTTP/2 with prior
/// knowledge. Then stops accepting and lets open responses finish.
pub async fn serve(listener: TcpListener, state: Arc<MockState>, shutdown: CancellationToken) {
    let app = router(state.clone());
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(MAX_H2_STREAMS);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                // Out of descriptors, most likely: wait for some rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        state.stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(tcp),
                TowerToHyperService::new(app.clone()),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    connections.close();
    connections.wait().await;
}

/// The mock's routes.
pub fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/stats", get(stats))
        .route("/last-request", get(last_request))
        .route("/stats/reset", post(reset_stats))
        .route("/config", get(get_config).put(put_config))
        .route("/tools/quote", get(fake_quote))
        .route("/tools/foods/search", get(fake_food_search))
        .route("/tools/foods/batch", get(fake_food_batch))
        .route("/search", get(fake_searxng))
        .nest_service("/mcp", crate::mcp::http_service())
        .with_state(state)
}

/// Which fault, if any, this request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Fail,
    RateLimit,
    Hang,
    Drop,
    Malformed,
}

fn pick_fault(config: &MockConfig) -> Fault {
    let mut rng = rand::rng();
    let mut roll: f64 = rng.random();
    for (rate, fault) in [
        (config.fail_rate, Fault::Fail),
        (config.rate_limit_rate, Fault::RateLimit),
        (config.hang_rate, Fault::Hang),
        (config.drop_rate, Fault::Drop),
        (config.malformed_rate, Fault::Malformed),
    ] {
        if roll < rate {
            return fault;
        }
        roll -= rate;
    }
    Fault::None
}

/// Wire dialect of an error body.
#[derive(Clone, Copy)]
enum Dialect {
    OpenAi,
    Anthropic,
}

/// Applies the start-of-request part of a fault and the configured latency. Returns a
/// response when the fault answers the request itself.
async fn prelude(
    state: &MockState,
    config: &MockConfig,
    dialect: Dialect,
    body_len: usize,
) -> (Fault, Option<Response>) {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    let seq = state.model_requests.fetch_add(1, Ordering::Relaxed);
    let fault = if seq < config.rate_limit_first {
        Fault::RateLimit
    } else {
        pick_fault(config)
    };
    if fault != Fault::None {
        state.stats.faults.fetch_add(1, Ordering::Relaxed);
    }
    let delay = config.latency_ms
        + if config.latency_jitter_ms > 0 {
            rand::rng().random_range(0..=config.latency_jitter_ms)
        } else {
            0
        };
    if delay > 0 {
        // A caller that hangs up during the wait (a cancelled call) is counted with the
        // streams dropped early.
        struct Waiting<'a>(&'a AtomicU64, bool);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let mut waiting = Waiting(&state.stats.cancelled, false);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        waiting.1 = true;
    }
    if let Some(window) = config.context_window
        && body_len as u64 / 4 > window
    {
        let mut response = error_response(
            dialect,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!(
                "This model's maximum context length is {window} tokens. However, your messages resulted in {} tokens.",
                body_len / 4
            ),
            None,
        );
        if let Dialect::OpenAi = dialect {
            response = error_response_with_code(response, "context_length_exceeded");
        }
        return (fault, Some(response));
    }
    let response = match fault {
        Fault::Fail => Some(error_response(
            dialect,
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The mock upstream injected a server error.",
            None,
        )),
        Fault::RateLimit => Some(error_response(
            dialect,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "The mock upstream injected a rate limit.",
            Some(config.retry_after_s),
        )),
        Fault::Hang => {
            tokio::time::sleep(Duration::from_millis(config.hang_ms)).await;
            Some(error_response(
                dialect,
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "The mock upstream hung.",
                None,
            ))
        }
        _ => None,
    };
    (fault, response)
}

fn error_response(
    dialect: Dialect,
    status: StatusCode,
    kind: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response {
    let body = match dialect {
        Dialect::OpenAi => {
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        }
        Dialect::Anthropic => {
            let kind = match status {
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                StatusCode::BAD_REQUEST => "invalid_request_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    };
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Rebuilds an OpenAI error response with a `code`.
fn error_response_with_code(response: Response, code: &str) -> Response {
    let status = response.status();
    let body = json!({"error": {
        "message": "This model's maximum context length was exceeded.",
        "type": "invalid_request_error", "param": "messages", "code": code,
    }});
    (status, axum::Json(body)).into_response()
}

/// What OpenAI would refuse in one chat message: not an object, an unknown role, or
/// content that is neither a string, an array of parts nor null.
fn message_problem((i, message): (usize, &Value)) -> Option<String> {
    let Some(message) = message.as_object() else {
        return Some(format!(
            "Invalid type for 'messages[{i}]': expected an object."
        ));
    };
    match message.get("role").and_then(Value::as_str) {
        Some("system" | "developer" | "user" | "assistant" | "tool" | "function") => {}
        _ => return Some(format!("Invalid value for 'messages[{i}].role'.")),
    }
    match message.get("content") {
        None | Some(Value::Null | Value::String(_) | Value::Array(_)) => None,
        Some(_) => Some(format!(
            "Invalid type for 'messages[{i}].content': expected a string or an array."
        )),
    }
}

fn bad_request(dialect: Dialect, message: &str) -> Response {
    error_response(
        dialect,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        None,
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the mock decided to answer, independent of wire format.
struct Answer {
    text: String,
    tool_calls: Vec<ToolCall>,
    prompt_tokens: u64,
}

struct ToolCall {
    id: String,
    name: String,
    arguments: String,
}

impl Answer {
    fn completion_tokens(&self) -> u64 {
        let words = self.text.split_whitespace().count() as u64;
        let args: u64 = self
            .tool_calls
            .iter()
            .map(|c| c.arguments.len() as u64 / 4 + 1)
            .sum();
        (words + args).max(1)
    }
}

/// Text of a message's content: a string, or the text parts of an array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Arguments filled from a JSON schema: strings get the user's text, numbers 1, flags true.
fn arguments_for(schema: Option<&Value>, text: &str) -> String {
    let mut args = serde_json::Map::new();
    if let Some(props) = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
    {
        for (name, prop) in props {
            let value = match prop.get("type").and_then(Value::as_str) {
                // The first number the user wrote ("wait 500 ms"), else 1.
                Some("number") | Some("integer") => json!(
                    text.split(|c: char| !c.is_ascii_digit())
                        .find_map(|w| w.parse::<u64>().ok())
                        .unwrap_or(1)
                ),
                Some("boolean") => json!(true),
                Some("array") => json!([text]),
                Some("object") => json!({}),
                _ => json!(text),
            };
            args.insert(name.clone(), value);
        }
    }
    Value::Object(args).to_string()
}

/// What the mock reads from a request, whatever its wire format.
struct Prompt {
    last_user: Option<String>,
    last_is_user: bool,
    /// Offered tools as `(name, schema)`.
    tools: Vec<(String, Option<Value>)>,
    /// The one tool the client required, if any.
    forced: Option<String>,
    allow_tools: bool,
    parallel: bool,
    prompt_chars: usize,
}

/// Decides the answer: echo, or calls to the offered tools when the user spoke last.
/// `tools` are `(name, schema)` pairs; `forced` names the one tool the client required.
fn decide(state: &MockState, config: &MockConfig, prompt: Prompt) -> Answer {
    let Prompt {
        last_user,
        last_is_user,
        tools,
        forced,
        allow_tools,
        parallel,
        prompt_chars,
    } = prompt;
    let user_text = last_user.unwrap_or_default();
    let prompt_tokens = (prompt_chars as u64 / 4).max(1);
    if allow_tools && last_is_user && !tools.is_empty() {
        let chosen: Vec<_> = match &forced {
            Some(name) => tools.into_iter().filter(|(n, _)| n == name).collect(),
            // Parallel calls: every offered tool (up to 8), as a model asked about
            // several things at once would; one otherwise.
            None => tools
                .into_iter()
                .take(if parallel { 8 } else { 1 })
                .collect(),
        };
        if !chosen.is_empty() {
            let tool_calls = chosen
                .into_iter()
                .map(|(name, schema)| ToolCall {
                    id: format!("call_mock_{}", state.next_id()),
                    arguments: arguments_for(schema.as_ref(), &user_text),
                    name,
                })
                .collect();
            return Answer {
                text: String::new(),
                tool_calls,
                prompt_tokens,
            };
        }
    }
    let text = match &config.reply {
        Some(reply) => reply.clone(),
        None if user_text.is_empty() => "Hello from the Switchyard mock upstream.".to_string(),
        None if !last_is_user => format!("Here is what the tools returned about: {user_text}"),
        None => user_text,
    };
    Answer {
        text,
        tool_calls: Vec::new(),
        prompt_tokens,
    }
}

/// Splits text into `n` roughly equal pieces on word boundaries (0: one per word).
fn split_text(text: &str, n: usize) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    if words.is_empty() {
        return vec![String::new()];
    }
    let n = if n == 0 {
        words.len()
    } else {
        n.min(words.len())
    };
    let per = words.len().div_ceil(n);
    words.chunks(per).map(|c| c.concat()).collect()
}

/// Splits a string into `n` pieces on char boundaries.
fn split_chars(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let per = chars.len().div_ceil(n.max(1)).max(1);
    chars.chunks(per).map(|c| c.iter().collect()).collect()
}

type Events = Vec<Bytes>;

/// Counts a stream as cancelled if it is dropped before its last event was sent (a request
/// dropped during its latency counts too: see `prelude`).
struct StreamGuard {
    state: Arc<MockState>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.state.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Builds a streaming body from pre-rendered events, pacing them and applying a fault.
fn stream_body(state: Arc<MockState>, events: Events, interval: Duration, fault: Fault) -> Body {
    let total = events.len();
    let guard = StreamGuard {
        state,
        finished: false,
    };
    let stream = futures_util::stream::unfold(
        (events.into_iter().enumerate(), guard),
        move |(mut it, mut guard)| async move {
            let (i, event) = it.next()?;
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            if fault == Fault::Drop && i == total / 2 {
                // An injected failure, not a client leaving.
                guard.finished = true;
                return Some((
                    Err(std::io::Error::other("mock: injected drop")),
                    (it, guard),
                ));
            }
            let event = if fault == Fault::Malformed && i == total / 2 {
                Bytes::from_static(b"data: {\"choices\": [ malformed\n\n")
            } else {
                event
            };
            let stats = &guard.state.stats;
            stats.events.fetch_add(1, Ordering::Relaxed);
            if i + 1 == total {
                stats.completed.fetch_add(1, Ordering::Relaxed);
                guard.finished = true;
            }
            Some((Ok::<_, std::io::Error>(event), (it, guard)))
        },
    );
    Body::from_stream(stream)
}

/// One SSE event carrying `json` as its data: `data: {json}\n\n`.
fn data_event(json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The OpenAI end-of-stream marker.
const DONE: &[u8] = b"data: [DONE]\n\n";

fn sse_response(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A complete JSON body, or a damaged one for the drop and malformed faults.
fn json_body(state: &MockState, json: Vec<u8>, fault: Fault) -> Response {
    let body = match fault {
        Fault::Malformed => Body::from(json[..json.len() / 2].to_vec()),
        Fault::Drop => {
            let half = Bytes::from(json[..json.len() / 2].to_vec());
            Body::from_stream(futures_util::stream::iter([
                Ok(half),
                Err(std::io::Error::other("mock: injected drop")),
            ]))
        }
        _ => {
            state.stats.completed.fetch_add(1, Ordering::Relaxed);
            Body::from(json)
        }
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn chat_completions(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    state.stats.chat.fetch_add(1, Ordering::Relaxed);
    let config = state.config();
    let (fault, early) = prelude(&state, &config, Dialect::OpenAi, body.len()).await;
    if let Some(response) = early {
        return response;
    }
    if let Ok(mut last) = state.last_chat.write() {
        *last = body.clone();
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad_request(Dialect::OpenAi, "mock: body is not JSON");
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return bad_request(Dialect::OpenAi, "mock: messages missing");
    };
    if let Some(problem) = messages.iter().enumerate().find_map(message_problem) {
        return bad_request(Dialect::OpenAi, &problem);
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)));
    let last_is_user = messages
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        == Some("user");
    let tools: Vec<(String, Option<Value>)> = req
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| {
                    let f = t.get("function")?;
                    Some((
                        f.get("name")?.as_str()?.to_string(),
                        f.get("parameters").cloned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let tool_choice = req.get("tool_choice");
    let allow_tools = tool_choice.and_then(Value::as_str) != Some("none");
    let forced = tool_choice
        .and_then(|c| c.pointer("/function/name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let parallel = req.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false);
    let answer = decide(
        &state,
        &config,
        Prompt {
            last_user,
            last_is_user,
            tools,
            forced,
            allow_tools,
            parallel,
            prompt_chars: body.len(),
        },
    );
    // The gateway's memory calls get the simulated extractor's answer.
    let mut answer = answer;
    if let Some(text) = req
        .pointer("/response_format/json_schema/name")
        .and_then(Value::as_str)
        .and_then(|schema| {
            crate::memory::answer(
                schema,
                &content_text(
                    messages
                        .last()
                        .and_then(|m| m.get("content"))
                        .unwrap_or(&Value::Null),
                ),
            )
        })
    {
        answer.text = text;
        answer.tool_calls.clear();
    }
    // One word is one token here: an answer longer than the limit is cut, as a model's is.
    let limit = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64);
    let mut cut = false;
    if let Some(limit) = limit
        && answer.tool_calls.is_empty()
        && answer.text.split_whitespace().count() as u64 > limit
    {
        let kept: String = answer
            .text
            .split_inclusive(' ')
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .collect();
        answer.text = kept.trim_end().to_string();
        cut = true;
    }
    let n = req
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 16) as usize;
    let id = format!("chatcmpl-mock-{}", state.next_id());
    let created = now_secs();
    let usage = json!({
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens() * n as u64,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens() * n as u64,
    });
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        let finish = if cut {
            "length"
        } else if answer.tool_calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        };
        let message = if answer.tool_calls.is_empty() {
            json!({"role": "assistant", "content": answer.text, "refusal": null})
        } else {
            json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": answer.tool_calls.iter().map(|c| json!({
                "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}
            })).collect::<Vec<_>>()})
        };
        let choices: Vec<Value> = (0..n)
            .map(|i| json!({"index": i, "message": message, "logprobs": null, "finish_reason": finish}))
            .collect();
        let out = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage, "system_fingerprint": "fp_switchyard_mock",
        });
        return json_body(&state, out.to_string().into_bytes(), fault);
    }
    state.stats.streams.fetch_add(1, Ordering::Relaxed);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chunk = |choices: Value| -> Bytes {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_switchyard_mock", "choices": choices,
        });
        if include_usage && let Some(obj) = c.as_object_mut() {
            obj.insert("usage".into(), Value::Null);
        }
        data_event(c.to_string().as_bytes())
    };
    let mut events: Events = Vec::new();
    for i in 0..n {
        events.push(chunk(json!([{"index": i, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}])));
    }
    let finish = if answer.tool_calls.is_empty() {
        for piece in split_text(&answer.text, config.chunks) {
            for i in 0..n {
                events.push(chunk(json!([{"index": i, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}])));
            }
        }
        if cut { "length" } else { "stop" }
    } else {
        for (k, call) in answer.tool_calls.iter().enumerate() {
            events.push(chunk(json!([{"index": 0, "delta": {"tool_calls": [{
                "index": k, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}]}, "logprobs": null, "finish_reason": null}])));
            for piece in split_chars(&call.arguments, 3) {
                events.push(chunk(json!([{"index": 0, "delta": {"tool_calls": [{
                    "index": k, "function": {"arguments": piece}}]}, "logprobs": null, "finish_reason": null}])));
            }
        }
        "tool_calls"
    };
    for i in 0..n {
        events.push(chunk(
            json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish}]),
        ));
    }
    if include_usage {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_switchyard_mock", "choices": [], "usage": usage,
        });
        if let Some(obj) = c.as_object_mut() {
            obj.remove("system_fingerprint");
        }
        events.push(data_event(c.to_string().as_bytes()));
    }
    events.push(Bytes::from_static(DONE));
    sse_response(stream_body(
        state,
        events,
        Duration::from_millis(config.chunk_interval_ms),
        fault,
    ))
}

async fn anthropic_messages(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    state.stats.messages.fetch_add(1, Ordering::Relaxed);
    let config = state.config();
    let (fault, early) = prelude(&state, &config, Dialect::Anthropic, body.len()).await;
    if let Some(response) = early {
        return response;
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad_request(Dialect::Anthropic, "mock: body is not JSON");
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return bad_request(Dialect::Anthropic, "messages: field required");
    };
    if req.get("max_tokens").and_then(Value::as_u64).is_none() {
        return bad_request(Dialect::Anthropic, "max_tokens: field required");
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    let is_tool_result = |m: &Value| {
        m.get("content")
            .and_then(Value::as_array)
            .is_some_and(|blocks| {
                blocks
                    .iter()
                    .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            })
    };
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user") && !is_tool_result(m))
        .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)));
    let last_is_user = messages.last().is_some_and(|m| {
        m.get("role").and_then(Value::as_str) == Some("user") && !is_tool_result(m)
    });
    let tools: Vec<(String, Option<Value>)> = req
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| {
                    Some((
                        t.get("name")?.as_str()?.to_string(),
                        t.get("input_schema").cloned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let choice = req.get("tool_choice");
    let choice_type = choice.and_then(|c| c.get("type")).and_then(Value::as_str);
    let forced = (choice_type == Some("tool"))
        .then(|| choice.and_then(|c| c.get("name")).and_then(Value::as_str))
        .flatten()
        .map(str::to_string);
    let parallel = choice
        .and_then(|c| c.get("disable_parallel_tool_use"))
        .and_then(Value::as_bool)
        != Some(true);
    let answer = decide(
        &state,
        &config,
        Prompt {
            last_user,
            last_is_user,
            tools,
            forced,
            allow_tools: choice_type != Some("none"),
            parallel,
            prompt_chars: body.len(),
        },
    );
    let id = format!("msg_mock_{}", state.next_id());
    let stop_reason = if answer.tool_calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    let mut blocks: Vec<Value> = Vec::new();
    if !answer.text.is_empty() {
        blocks.push(json!({"type": "text", "text": answer.text}));
    }
    for call in &answer.tool_calls {
        let input: Value = serde_json::from_str(&call.arguments).unwrap_or(json!({}));
        blocks.push(json!({"type": "tool_use", "id": call.id.replace("call_", "toolu_"), "name": call.name, "input": input}));
    }
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        let out = json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": blocks, "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens()},
        });
        return json_body(&state, out.to_string().into_bytes(), fault);
    }
    state.stats.streams.fetch_add(1, Ordering::Relaxed);
    let event = |name: &str, data: Value| -> Bytes {
        Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
    };
    let mut events: Events = vec![event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 1}}}),
    )];
    events.push(event("ping", json!({"type": "ping"})));
    let mut index = 0;
    if !answer.text.is_empty() {
        events.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ));
        for piece in split_text(&answer.text, config.chunks) {
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}),
            ));
        }
        events.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    for call in &answer.tool_calls {
        events.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": call.id.replace("call_", "toolu_"), "name": call.name, "input": {}}}),
        ));
        for piece in split_chars(&call.arguments, 3) {
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        events.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": answer.completion_tokens()}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    sse_response(stream_body(
        state,
        events,
        Duration::from_millis(config.chunk_interval_ms),
        fault,
    ))
}

/// A deterministic unit vector for `text`, with a model's rough sense of similarity: the
/// character trigrams of its lower-cased words are hashed into `dims` signed buckets
/// (feature hashing), so texts that share words or word parts ("allergic", "allergies")
/// point the same way. A text without a word embeds as pseudo-random noise of its bytes.
fn embed(text: &str, dims: usize) -> Vec<f32> {
    fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
        bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
    let mut v = vec![0f32; dims];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let padded: Vec<char> = format!("^{}$", word.to_lowercase()).chars().collect();
        for gram in padded.windows(3) {
            let h = fnv(gram.iter().collect::<String>().into_bytes());
            let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
            v[(h % dims as u64) as usize] += sign;
        }
    }
    if v.iter().all(|x| *x == 0.0) {
        // xorshift seeded by the bytes: quality is irrelevant, determinism is the point.
        let mut seed = fnv(text.bytes());
        v.iter_mut().for_each(|x| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *x = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        });
    }
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

async fn embeddings(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    state.stats.embeddings.fetch_add(1, Ordering::Relaxed);
    let config = state.config();
    let (fault, early) = prelude(&state, &config, Dialect::OpenAi, 0).await;
    if let Some(response) = early {
        return response;
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad_request(Dialect::OpenAi, "mock: body is not JSON");
    };
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_array) => {
            items.iter().map(Value::to_string).collect()
        }
        _ => return bad_request(Dialect::OpenAi, "mock: input must be a string or an array"),
    };
    let dims = req
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(config.embedding_dims, |d| d as usize)
        .clamp(1, 8192);
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let vector = embed(text, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|s| (s.len() as u64 / 4).max(1)).sum();
    let out = json!({
        "object": "list", "data": data,
        "model": req.get("model").cloned().unwrap_or(json!("mock")),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    json_body(&state, out.to_string().into_bytes(), fault)
}

async fn models(State(state): State<Arc<MockState>>) -> impl IntoResponse {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({"object": "list", "data": [
        {"id": "mock-model", "object": "model", "created": 0, "owned_by": "switchyard-mock"},
    ]}))
}

/// The body of the last chat request, as received.
async fn last_request(State(state): State<Arc<MockState>>) -> Response {
    let body = state
        .last_chat
        .read()
        .map(|b| b.clone())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The query parameter `name` of a request, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| {
            percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// A small number from a text, the same every time: fake data that looks stable.
fn stable_number(text: &str, modulo: u64) -> u64 {
    text.bytes().fold(1_469_598_103_934_665_603_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1_099_511_628_211)
    }) % modulo
}

/// `GET /tools/quote?symbol=…`: a fake stock quote (the seeds' stock service), the same
/// price for the same symbol. Without an `x-api-key` header it answers 401, as such APIs do.
async fn fake_quote(
    State(state): State<Arc<MockState>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    state.stats.tools.fetch_add(1, Ordering::Relaxed);
    if !headers.contains_key("x-api-key") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "missing x-api-key"})),
        )
            .into_response();
    }
    let Some(symbol) = query_param(uri.query(), "symbol").filter(|s| !s.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "symbol is required"})),
        )
            .into_response();
    };
    // `delay_ms` makes a slow API (for measuring parallel tool calls), at most 10 s.
    if let Some(ms) = query_param(uri.query(), "delay_ms").and_then(|m| m.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    }
    let cents = 1_000 + stable_number(&symbol, 90_000);
    #[allow(clippy::cast_precision_loss)] // below 2^17
    let price = cents as f64 / 100.0;
    axum::Json(json!({
        "symbol": symbol.to_uppercase(),
        "price": price,
        "currency": "USD",
        "source": "mock-upstream",
    }))
    .into_response()
}

/// `GET /tools/foods/search?q=…`: a fake food database (the seeds' food search), three
/// entries per query, with stable nutrition figures.
async fn fake_food_search(State(state): State<Arc<MockState>>, uri: axum::http::Uri) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    state.stats.tools.fetch_add(1, Ordering::Relaxed);
    let query = query_param(uri.query(), "q").unwrap_or_default();
    let foods: Vec<Value> = ["plain", "with cheese", "light"]
        .iter()
        .map(|variant| {
            let name = format!("{query} ({variant})");
            json!({
                "name": name,
                "calories_per_100g": 50 + stable_number(&name, 400),
                "protein_g": stable_number(&name, 30),
            })
        })
        .collect();
    axum::Json(json!({"query": query, "foods": foods})).into_response()
}

/// `GET /tools/foods/batch?ids=a,b,…`: a food API that takes many ids at once (what a
/// tool's batching window is for): one entry per id, in `foods`.
async fn fake_food_batch(State(state): State<Arc<MockState>>, uri: axum::http::Uri) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    state.stats.tools.fetch_add(1, Ordering::Relaxed);
    let ids = query_param(uri.query(), "ids").unwrap_or_default();
    let foods: Vec<Value> = ids
        .split(',')
        .filter(|id| !id.is_empty())
        .map(|id| json!({"id": id, "calories_per_100g": 50 + stable_number(id, 400)}))
        .collect();
    axum::Json(json!({"foods": foods})).into_response()
}

/// `GET /search?q=…&format=json`: a SearXNG instance's JSON API, three stable results
/// per query (the `web_search` tool's offline backend).
async fn fake_searxng(State(state): State<Arc<MockState>>, uri: axum::http::Uri) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    state.stats.tools.fetch_add(1, Ordering::Relaxed);
    if query_param(uri.query(), "format").as_deref() != Some("json") {
        return (StatusCode::FORBIDDEN, "format=json is not enabled").into_response();
    }
    let query = query_param(uri.query(), "q").unwrap_or_default();
    let slug: String = query
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let results: Vec<Value> = ["news", "wiki", "blog"]
        .iter()
        .enumerate()
        .map(|(i, site)| {
            json!({
                "url": format!("https://{site}.example/{slug}"),
                "title": format!("{query}: result {} from {site}", i + 1),
                "content": format!("What {site}.example says about {query}."),
                "engine": "mock",
            })
        })
        .collect();
    axum::Json(json!({"query": query, "number_of_results": results.len(), "results": results}))
        .into_response()
}

async fn stats(State(state): State<Arc<MockState>>) -> impl IntoResponse {
    axum::Json(state.stats.snapshot())
}

async fn reset_stats(State(state): State<Arc<MockState>>) -> impl IntoResponse {
    for c in [
        &state.stats.requests,
        &state.stats.connections,
        &state.stats.chat,
        &state.stats.messages,
        &state.stats.embeddings,
        &state.stats.streams,
        &state.stats.faults,
        &state.stats.completed,
        &state.stats.events,
        &state.stats.cancelled,
        &state.stats.tools,
    ] {
        c.store(0, Ordering::Relaxed);
    }
    StatusCode::NO_CONTENT
}

async fn get_config(State(state): State<Arc<MockState>>) -> impl IntoResponse {
    axum::Json(state.config())
}

async fn put_config(
    State(state): State<Arc<MockState>>,
    body: Bytes,
) -> Result<StatusCode, (StatusCode, String)> {
    let config: MockConfig = serde_json::from_slice(&body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid mock config: {e}")))?;
    state.set_config(config);
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many more concurrent HTTP/2 streams than hyper's default of 200 share one
    /// connection: a gateway multiplexing slow streams is not queued by its upstream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_http2_connection_carries_many_concurrent_streams() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = MockConfig {
            chunks: 4,
            chunk_interval_ms: 1_000,
            ..MockConfig::default()
        };
        let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap();
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let url = format!("{}/chat/completions", mock.base_url());
        let body = json!({"model": "m", "stream": true,
            "messages": [{"role": "user", "content": "a b c d"}]});
        // Every stream's head arrives while all of them are still open: with a limit of
        // 200 streams a connection, the 201st would wait for one of the first to end.
        let heads = (0..600).map(|_| client.post(&url).json(&body).send());
        let responses: Vec<reqwest::Response> = futures_util::future::join_all(heads)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(
            mock.stats().completed,
            0,
            "no stream ended before all had begun"
        );
        for response in responses {
            let text = response.text().await.unwrap();
            assert!(text.trim_end().ends_with("data: [DONE]"));
        }
        assert_eq!(
            mock.stats().connections,
            1,
            "one connection carried them all"
        );
    }

    #[test]
    fn text_splits_into_requested_chunks() {
        let pieces = split_text("one two three four five six seven eight nine", 4);
        assert_eq!(
            pieces.concat(),
            "one two three four five six seven eight nine"
        );
        assert!(pieces.len() <= 4);
        assert_eq!(split_text("a b c", 0).len(), 3);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed("hello", 16);
        assert_eq!(a, embed("hello", 16));
        assert_ne!(a, embed("world", 16));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        let noise = embed("?!", 16);
        assert!((noise.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn texts_that_share_word_parts_embed_closer() {
        let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let allergic = embed("User is allergic to peanuts", 256);
        let allergies = embed("any allergies?", 256);
        let cello = embed("plays the cello in an orchestra", 256);
        assert!(cos(&allergic, &allergies) > cos(&cello, &allergies) + 0.1);
    }

    #[test]
    fn sse_events_are_framed_like_openai() {
        assert_eq!(&data_event(b"{\"a\":1}")[..], b"data: {\"a\":1}\n\n");
        assert_eq!(DONE, b"data: [DONE]\n\n");
    }

    #[test]
    fn fault_fractions_add_up() {
        let config = MockConfig {
            fail_rate: 1.0,
            ..MockConfig::default()
        };
        assert_eq!(pick_fault(&config), Fault::Fail);
        assert_eq!(pick_fault(&MockConfig::default()), Fault::None);
    }
}
