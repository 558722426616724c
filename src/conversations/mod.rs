//! Server-side conversations: the Responses API's turns on any provider, with history
//! kept in the store.
//!
//! A turn ([`Conversations::prepare`] then [`Conversations::complete`] or
//! [`Conversations::stream`]):
//!
//! 1. **read** the request ([`crate::wire::responses`]); refusals are 400s and store
//!    nothing;
//! 2. **assemble the context** ([`context`]): instructions, the history (the chain of
//!    `previous_response_id`, or the `conversation`'s items) newest first within the
//!    alias's token budget, then the new input; token counts of stored items come from
//!    the store, never re-tokenized;
//! 3. **call** the model through [`crate::inference`] as a chat completion
//!    ([`translate`]), so routing, limits, cache and the usage log apply;
//! 4. **store** the response and its input and output items in one transaction, *before*
//!    the client is told the response is complete, so a follow-up turn or a read right
//!    after sees them.
//!
//! A stream runs in a task owned by the app ([`events`] writes its events); the client's
//! body reads from a bounded channel. When the client goes away the task stops the
//! upstream call and stores what was produced as `cancelled`, never half a turn.

pub mod background;
pub mod chat_tools;
pub mod context;
pub mod events;
pub mod mcp;
pub mod recall;
pub mod tool_loop;
pub mod translate;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::auth::Principal;
use crate::error::GatewayError;
use crate::inference::{CallContext, ChatReply, Inference};
use crate::store::Store;
use crate::store::conversations::{NewItem, NewResponse, ResponseRow};
use crate::tokens::{TokenBudgets, TokenizerKind};
use crate::tools::Tools;
use crate::wire::responses::{
    ConversationParam, ConversationRef, Item, ItemStatus, ResponseObject, ResponseUsage,
    TextConfig, check_metadata, is_id, new_id, parse_input,
};
use crate::wire::{ChatRequest, JsonObject};
use context::{CachedItem, Context, ContextCache, History};
use events::{EventStream, Sequencer};
use translate::{Ending, Sampling};

/// Events a stream may have written but the client not yet read.
const STREAM_BUFFER: usize = 64;

/// The Responses engine: prepares turns, calls the model, stores the results.
pub struct Conversations {
    store: Store,
    inference: Arc<Inference>,
    budgets: Arc<TokenBudgets>,
    /// The operator's tools, run for the model in a turn's tool loop.
    tools: Arc<Tools>,
    /// The configured tools each alias offers its model (`tools = [...]`).
    server_tools: HashMap<String, Vec<String>>,
    /// Conversations' newest items between turns.
    cache: ContextCache,
    /// Owns the streams' tasks; shutdown waits for them.
    tasks: TaskTracker,
    /// Long-term memory: recalled into turns, fed by them.
    memory: Arc<crate::memory::Memory>,
    /// Woken when a streamed background response's events were stored here (its
    /// followers on this instance read them at once; others poll).
    job_events: tokio::sync::Notify,
    /// Uploaded files, for parts that name one by `file_id`.
    files: Arc<crate::files::FileStore>,
    /// The most bytes of uploaded files one request sends inline (`server.max_body_bytes`).
    max_inline_bytes: u64,
    /// A conversation's turns' events, for its `/v1/events` subscribers.
    fanout: Arc<crate::fanout::Fanout>,
}

/// A streamed turn: its SSE frames, and its usage once the stream has ended (for the
/// request's log line).
pub struct TurnStream {
    pub frames: mpsc::Receiver<Bytes>,
    pub usage: Arc<OnceLock<crate::wire::Usage>>,
}

/// A turn ready to be sent: the response as it will be announced, the new input items
/// with their token counts, and the chat request.
pub struct Turn {
    pub response: ResponseObject,
    pub stream: bool,
    /// Older items were left out to fit the context window (`truncation: "auto"`).
    pub truncated: bool,
    /// The conversation's version its history was read at.
    read_at: Option<(i64, i64)>,
    owner: Option<String>,
    input: Vec<(Item, i64)>,
    chat: ChatRequest,
    tokenizer: TokenizerKind,
    /// Configured tools offered to the model: their calls are run by the server.
    server_tools: Vec<String>,
    /// MCP servers whose tools are offered to the model.
    mcp: Vec<mcp::McpOffer>,
    /// `mcp_list_tools` items the output opens with.
    listed: Vec<Item>,
    /// Calls the client approved or refused in this turn's input.
    answered: Vec<mcp::Answered>,
    /// The request's options for its web searches.
    search: crate::tools::search::SearchOptions,
    /// Whose memories the turn read: its messages are extracted for it once stored.
    memory_subject: Option<crate::memory::Subject>,
    /// A background response's job attempt: the turn is saved over its queued row only
    /// while the job's claim is this attempt's.
    job_attempt: Option<i64>,
}

impl Turn {
    /// The model's calls may be run here: the turn is a tool loop.
    fn loops(&self) -> bool {
        !self.server_tools.is_empty() || !self.mcp.is_empty()
    }
}

impl Conversations {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        inference: Arc<Inference>,
        budgets: Arc<TokenBudgets>,
        tools: Arc<Tools>,
        server_tools: HashMap<String, Vec<String>>,
        tasks: TaskTracker,
        memory: Arc<crate::memory::Memory>,
        files: Arc<crate::files::FileStore>,
        max_inline_bytes: u64,
        fanout: Arc<crate::fanout::Fanout>,
    ) -> Conversations {
        Conversations {
            store,
            inference,
            budgets,
            tools,
            server_tools,
            cache: ContextCache::default(),
            tasks,
            memory,
            job_events: tokio::sync::Notify::new(),
            files,
            max_inline_bytes,
            fanout,
        }
    }

    /// The `/v1/events` topic of a turn's conversation, when someone may be listening.
    fn audience(&self, turn: &Turn) -> Option<String> {
        let id = &turn.response.conversation.as_ref()?.id;
        let topic = format!("conversation:{id}");
        self.fanout.has_audience(&topic).then_some(topic)
    }

    /// A streamed turn's frames, also published to its conversation's subscribers.
    fn tee(&self, topic: String, mut frames: mpsc::Receiver<Bytes>) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let fanout = self.fanout.clone();
        self.tasks.spawn(async move {
            while let Some(frame) = frames.recv().await {
                if let Some(event) = crate::wire::sse::parse_event(&frame) {
                    fanout.publish(&topic, Arc::from(event.data.as_ref()));
                }
                // The client went away: dropping `frames` stops the turn, as without us.
                if tx.send(frame).await.is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// Reads the owner's files that `ids` name, as data URLs for sending inline.
    ///
    /// # Errors
    /// 400 for a file that is not the owner's (or not there), or when together they are
    /// larger than a request may carry; 503 when the store or the disk fails.
    async fn inline_files(
        &self,
        owner: Option<&str>,
        ids: &[&str],
    ) -> Result<translate::InlineFiles, GatewayError> {
        use base64::Engine as _;
        let mut files = translate::InlineFiles::new();
        let mut left = self.max_inline_bytes;
        for &id in ids {
            let missing = || GatewayError::InvalidRequest {
                message: format!("File '{id}' was not found."),
                param: Some("input"),
                code: Some("invalid_value"),
            };
            if !crate::files::is_file_id(id) {
                return Err(missing());
            }
            let row = self
                .store
                .file(owner.unwrap_or_default(), id)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "reading an uploaded file's row failed");
                    GatewayError::DependencyUnavailable("The file store")
                })?
                .ok_or_else(missing)?;
            let size = u64::try_from(row.bytes).unwrap_or(u64::MAX);
            if size > left {
                return Err(GatewayError::invalid(
                    format!(
                        "The files this request names add up to more than {} bytes, the most \
                         one request may send.",
                        self.max_inline_bytes
                    ),
                    Some("input"),
                ));
            }
            left -= size;
            let bytes = self.files.read(id, size).await.map_err(|e| {
                tracing::warn!(file = id, error = %e, "reading an uploaded file failed");
                GatewayError::DependencyUnavailable("The file store")
            })?;
            let url = format!(
                "data:{};base64,{}",
                crate::files::media_type(&row.filename),
                base64::engine::general_purpose::STANDARD.encode(bytes)
            );
            files.insert(id.to_string(), (url, row.filename));
        }
        Ok(files)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The tokenizers turns count with, for warming up at start.
    pub fn tokenizers(&self) -> Vec<TokenizerKind> {
        self.budgets.kinds()
    }

    /// Reads a create request and assembles its context; nothing is stored and no model
    /// is called.
    ///
    /// # Errors
    /// 400 for a malformed request or a context that does not fit; 404 for an unknown
    /// `previous_response_id` or `conversation`.
    pub async fn prepare(
        &self,
        principal: Option<&Arc<Principal>>,
        body: Bytes,
        memory: recall::MemorySwitch,
    ) -> Result<Turn, GatewayError> {
        let owner = principal.map(|p| &*p.key_id);
        let mut request = CreateRequest::parse(body)?;
        let budget = self.budgets.get(&request.model);
        let tokenizer = budget.tokenizer;
        let input: Vec<(Item, i64)> = std::mem::take(&mut request.input)
            .into_iter()
            .map(|item| {
                let tokens = context::item_tokens(tokenizer, &item);
                (item, tokens)
            })
            .collect();
        let history = match (&request.previous_response_id, &request.conversation) {
            (Some(previous), None) => History::Chain(previous.clone()),
            (None, Some(conversation)) => History::Conversation(conversation.clone()),
            (None, None) => History::None,
            (Some(_), Some(_)) => {
                return Err(GatewayError::InvalidRequest {
                    message: "Mutually exclusive parameters: Ensure you are only providing one \
                              of: 'previous_response_id' or 'conversation'."
                        .into(),
                    param: None,
                    code: Some("mutually_exclusive_parameters"),
                });
            }
        };
        let recalled = if self.memory_on(&request.model, memory) {
            let user = request
                .user
                .as_deref()
                .or(request.safety_identifier.as_deref());
            let conversation = request.conversation.as_deref();
            self.recall(principal, user, conversation, &input, tokenizer)
                .await?
        } else {
            recall::Recalled::default()
        };
        let window = budget.context_window.map(|w| {
            let reserve = request
                .max_output_tokens
                .unwrap_or(budget.max_output_tokens);
            // The memory slot is taken from the history's share.
            w.saturating_sub(reserve).saturating_sub(recalled.tokens)
        });
        let assembling = std::time::Instant::now();
        let context = Context::assemble(
            &self.store,
            &self.cache,
            owner,
            &history,
            request.instructions.as_deref(),
            &input,
            &request.tools,
            tokenizer,
            window,
            request.truncation == "auto",
        )
        .await?;
        metrics::histogram!("switchyard_context_assembly_seconds")
            .record(assembling.elapsed().as_secs_f64());
        let files = self
            .inline_files(owner, &translate::file_ids(context.items(&input)))
            .await?;
        let mut messages = translate::to_messages_with(
            request.instructions.as_deref(),
            context.items(&input),
            &files,
        )?;
        if let Some(text) = &recalled.text {
            // After the instructions, before the conversation.
            let at = usize::from(request.instructions.is_some());
            messages.insert(at, crate::wire::chat::Message::system(text.as_str()));
        }
        // The alias's configured tools, unless the client declared a function of the same
        // name (the client's own is what it expects to be called).
        if let Some(kind) = &request.web_search
            && !self.tools.contains(crate::tools::search::NAME)
        {
            return Err(GatewayError::InvalidRequest {
                message: format!(
                    "Invalid value for 'tools': tool type '{kind}' is not available on this \
                     server (no [web_search] is configured)."
                ),
                param: Some("tools"),
                code: Some("invalid_value"),
            });
        }
        let requested = request
            .web_search
            .is_some()
            .then(|| crate::tools::search::NAME.to_owned());
        let alias_tools = self.server_tools.get(&request.model);
        let alias_mcp: Vec<String> = alias_tools
            .into_iter()
            .flatten()
            .filter(|name| !self.tools.contains(name))
            .cloned()
            .collect();
        let mut server_tools: Vec<String> = alias_tools
            .into_iter()
            .flatten()
            .filter(|name| self.tools.contains(name))
            .filter(|name| {
                !request.chat_tools.iter().any(|t| {
                    t.pointer("/function/name").and_then(Value::as_str) == Some(name.as_str())
                })
            })
            .cloned()
            .collect();
        if let Some(name) = requested
            && !server_tools.contains(&name)
        {
            server_tools.push(name);
        }
        for name in &server_tools {
            if let Some(definition) = self.tools.chat_definition(name) {
                request.chat_tools.push(definition);
            }
        }
        let (offered, answered) = if request.mcp.is_empty() && alias_mcp.is_empty() {
            (mcp::Offered::default(), Vec::new())
        } else {
            // Servers are contacted for a model the key may call only.
            if principal.is_some_and(|p| !p.may_use(&request.model)) {
                return Err(GatewayError::ModelNotFound(request.model.clone()));
            }
            let seen: Vec<&Item> = context.items(&input).collect();
            let new: Vec<&Item> = input.iter().map(|(item, _)| item).collect();
            let offered = mcp::offer(&self.tools, owner, &request.mcp, &alias_mcp, &seen).await?;
            let answered = mcp::answered(&new, &seen, &offered.offers)?;
            for offer in &offered.offers {
                request.chat_tools.extend(offer.chat_definitions());
            }
            (offered, answered)
        };
        if offered.offers.is_empty()
            && input
                .iter()
                .any(|(item, _)| matches!(item, Item::McpApprovalResponse(_)))
        {
            return Err(GatewayError::invalid(
                "An mcp_approval_response needs its server's mcp tool in 'tools'.",
                Some("tools"),
            ));
        }
        let body = translate::chat_body(
            &request.model,
            &messages,
            &request.sampling(),
            request.stream,
        );
        let chat = ChatRequest::parse(Bytes::from(body))?;
        let response = ResponseObject {
            id: new_id("resp"),
            object: crate::wire::responses::RESPONSE_OBJECT.into(),
            created_at: now_secs(),
            status: if request.background {
                "queued".into()
            } else {
                "in_progress".into()
            },
            background: request.background,
            completed_at: None,
            error: None,
            incomplete_details: None,
            instructions: request.instructions.clone(),
            max_output_tokens: request.max_output_tokens,
            max_tool_calls: request.max_tool_calls,
            model: request.model.clone(),
            output: Vec::new(),
            parallel_tool_calls: request.parallel_tool_calls.unwrap_or(true),
            previous_response_id: request.previous_response_id.clone(),
            conversation: request
                .conversation
                .as_ref()
                .map(|id| ConversationRef { id: id.clone() }),
            prompt_cache_key: request.prompt_cache_key.clone(),
            reasoning: request.reasoning.clone(),
            safety_identifier: request.safety_identifier.clone(),
            service_tier: Some("default".into()),
            store: request.store,
            temperature: request.temperature,
            text: serde_json::to_value(&request.text)
                .ok()
                .filter(|t| t.get("format").is_some())
                .unwrap_or_else(|| serde_json::json!({"format": {"type": "text"}})),
            tool_choice: request
                .tool_choice
                .clone()
                .unwrap_or_else(|| Value::from("auto")),
            tools: request.tools.clone(),
            top_logprobs: request.top_logprobs,
            top_p: request.top_p,
            truncation: request.truncation.clone(),
            usage: None,
            user: request.user.clone(),
            metadata: request.metadata.clone(),
        };
        let mut response = response;
        if recalled.no_subject {
            response
                .metadata
                .insert("memory".into(), "no_subject".into());
        }
        Ok(Turn {
            response,
            stream: request.stream,
            truncated: context.truncated(),
            read_at: context.version(),
            owner: owner.map(str::to_owned),
            input,
            chat,
            tokenizer,
            server_tools,
            mcp: offered.offers,
            listed: offered.listed,
            answered,
            search: request.search_options,
            memory_subject: recalled.subject,
            job_attempt: None,
        })
    }

    /// Counts the input tokens a create request would send (`POST
    /// /v1/responses/input_tokens`), history included.
    ///
    /// # Errors
    /// As [`Conversations::prepare`].
    pub async fn count_input_tokens(
        &self,
        principal: Option<&Arc<Principal>>,
        body: Bytes,
    ) -> Result<u64, GatewayError> {
        let turn = self
            .prepare(principal, body, recall::MemorySwitch::Alias)
            .await?;
        // Counted only for a model the key could call.
        let alias = &turn.response.model;
        self.inference.models().resolve(alias)?;
        if principal.is_some_and(|p| !p.may_use(alias)) {
            return Err(GatewayError::ModelNotFound(alias.clone()));
        }
        // The chat body's messages are what the model reads: count them.
        let raw = turn.chat.object.raw("messages").unwrap_or("[]");
        let parsed: Vec<crate::wire::chat::Message<'_>> = serde_json::from_str(raw)
            .map_err(|e| GatewayError::Internal(format!("assembled messages unreadable: {e}")))?;
        let mut tokens = crate::tokens::count_messages(turn.tokenizer, &parsed);
        if let Some(tools) = turn.chat.object.raw("tools") {
            tokens += crate::tokens::count_tools(turn.tokenizer, tools);
        }
        Ok(tokens)
    }

    /// Calls the model for a whole answer, stores the turn, returns the response and its
    /// JSON (as stored).
    ///
    /// # Errors
    /// The model call's refusals and failures (nothing is stored then); 503 when the
    /// store cannot take the turn (the answer is not returned unstored).
    pub async fn complete(
        &self,
        ctx: &CallContext,
        mut turn: Turn,
    ) -> Result<(ResponseObject, String), GatewayError> {
        if turn.loops() {
            let (output, ending) = self.run_steps(ctx, &mut turn, None).await?;
            finish_response(&mut turn.response, ending, output);
        } else {
            let (output, ending, usage) = self.step(ctx, turn.chat.clone()).await?;
            turn.response.usage = usage;
            finish_response(&mut turn.response, ending, output);
        }
        let body = self.save(&turn).await?;
        if let Some(topic) = self.audience(&turn) {
            // A whole answer: its conversation's subscribers get the ending event.
            let event = format!(
                r#"{{"type":"response.{}","response":{body}}}"#,
                turn.response.status
            );
            self.fanout.publish(&topic, Arc::from(event));
        }
        Ok((turn.response, body))
    }

    /// One whole-answer model call: its output items, how it ended, its usage.
    async fn step(
        &self,
        ctx: &CallContext,
        chat: ChatRequest,
    ) -> Result<(Vec<Item>, Ending, Option<ResponseUsage>), GatewayError> {
        let reply = self.inference.chat(ctx, chat).await?;
        let completion = match reply {
            ChatReply::Complete(completion) => completion,
            ChatReply::Stream(_) => {
                return Err(GatewayError::Internal(
                    "a stream came back for a whole-answer call".into(),
                ));
            }
        };
        let chat = completion.chat().map_err(|e| {
            GatewayError::Internal(format!("the model's answer could not be read: {e}"))
        })?;
        let usage = chat
            .usage
            .as_ref()
            .map(ResponseUsage::from_chat)
            .or(completion.usage.map(ResponseUsage::from_totals));
        let (items, ending) = translate::completion_output(&chat);
        Ok((items, ending, usage))
    }

    /// The tool loop: model steps until the model answers without calling a server tool
    /// (or calls a client one, or the step limit is reached), the server's calls of each
    /// step run in parallel between them. With `stream`, each step's items are sent as
    /// events once the step is over. Returns the whole output and how it ended; the usage
    /// of every step is summed into the response.
    async fn run_steps(
        &self,
        ctx: &CallContext,
        turn: &mut Turn,
        mut stream: Option<(&mut EventStream, &mpsc::Sender<Bytes>)>,
    ) -> Result<(Vec<Item>, Ending), GatewayError> {
        // The servers' lists, then the calls the client answered, before the first step.
        let mut output: Vec<Item> = std::mem::take(&mut turn.listed);
        let answered = std::mem::take(&mut turn.answered);
        let ran_answered = !answered.is_empty();
        if ran_answered {
            output.extend(tool_loop::run_answered(answered, &turn.mcp, &ctx.metering).await);
        }
        if let Some((events, tx)) = stream.as_mut()
            && !output.is_empty()
        {
            let mut frames = Vec::new();
            for item in &output {
                events.item(item, &mut frames);
            }
            send_all(tx, &mut frames).await;
        }
        let mut calls_left = turn.response.max_tool_calls;
        let mut chat = if ran_answered {
            tool_loop::next_chat(&turn.chat, &output)?
        } else {
            tool_loop::unstreamed(&turn.chat, None)?
        };
        let max_steps = self.tools.max_steps();
        for step in 1..=max_steps {
            let (items, ending, usage) = self.step(ctx, chat).await?;
            turn.response.usage = match (turn.response.usage, usage) {
                (Some(sum), Some(more)) => Some(sum.plus(more)),
                (sum, more) => sum.or(more),
            };
            let last = step == max_steps;
            let offered = tool_loop::Offered {
                configured: &turn.server_tools,
                mcp: &turn.mcp,
                search: &turn.search,
                max_steps,
            };
            let mut ran = tool_loop::run_step(
                &self.tools,
                &ctx.metering,
                &offered,
                items,
                &mut calls_left,
                last,
            )
            .await;
            tool_loop::cite(&output, &mut ran.items);
            if let Some((events, tx)) = stream.as_mut() {
                let mut frames = Vec::new();
                for item in &ran.items {
                    events.item(item, &mut frames);
                }
                send_all(tx, &mut frames).await;
            }
            let limited = last && ran.held;
            output.extend(ran.items);
            if limited {
                return Ok((output, Ending::ToolLimit));
            }
            if !ran.ran || ran.client_calls || ending != Ending::Completed {
                return Ok((output, ending));
            }
            chat = tool_loop::next_chat(&turn.chat, &output)?;
        }
        Ok((output, Ending::ToolLimit))
    }

    /// Starts the model call and returns the response's events as SSE frames: written
    /// by a task owned by the app, read by the client through a bounded channel.
    ///
    /// # Errors
    /// Refusals and failures before the stream started: the client gets a plain error
    /// response, as for chat completions.
    pub async fn stream(
        self: &Arc<Self>,
        ctx: &CallContext,
        turn: Turn,
    ) -> Result<TurnStream, GatewayError> {
        let audience = self.audience(&turn);
        let (tx, frames) = mpsc::channel(STREAM_BUFFER);
        let usage = Arc::new(OnceLock::new());
        let engine = self.clone();
        let usage_cell = usage.clone();
        if turn.loops() {
            let ctx = ctx.clone();
            self.tasks.spawn(async move {
                engine.run_tool_stream(ctx, turn, tx, usage_cell).await;
            });
        } else {
            let reply = self.inference.chat(ctx, turn.chat.clone()).await?;
            self.tasks.spawn(async move {
                engine.run_stream(turn, reply, tx, usage_cell).await;
            });
        }
        let frames = match audience {
            Some(topic) => self.tee(topic, frames),
            None => frames,
        };
        Ok(TurnStream { frames, usage })
    }

    async fn run_stream(
        &self,
        mut turn: Turn,
        reply: ChatReply,
        tx: mpsc::Sender<Bytes>,
        usage: Arc<OnceLock<crate::wire::Usage>>,
    ) {
        let mut seq = Sequencer::default();
        let mut out = vec![
            seq.lifecycle("response.created", &turn.response),
            seq.lifecycle("response.in_progress", &turn.response),
        ];
        let mut events = EventStream::new(seq);
        let mut gone = !send_all(&tx, &mut out).await;
        let mut failure: Option<String> = None;
        match reply {
            ChatReply::Complete(completion) => {
                // A whole answer (a cached one, say): cut into chunks and streamed.
                if let Ok(chat) = completion.chat() {
                    events.set_annotations(chat.message().and_then(|m| m.annotations.as_deref()));
                    for chunk in chat.to_chunks(false) {
                        events.chunk(&chunk, &mut out);
                    }
                    turn.response.usage = chat.usage.as_ref().map(ResponseUsage::from_chat);
                }
                gone = gone || !send_all(&tx, &mut out).await;
            }
            ChatReply::Stream(mut stream) => {
                while !gone {
                    let event = tokio::select! {
                        event = stream.next() => event,
                        () = tx.closed() => { gone = true; break; }
                    };
                    let Some(event) = event else { break };
                    match event.kind {
                        crate::wire::event::EventKind::Chunk
                        | crate::wire::event::EventKind::UsageOnly => {
                            if let Ok(chunk) = event.chunk() {
                                events.chunk(&chunk, &mut out);
                            }
                        }
                        crate::wire::event::EventKind::Error => {
                            failure = Some(error_message(event.data()));
                        }
                        crate::wire::event::EventKind::Done => {}
                    }
                    if !send_all(&tx, &mut out).await {
                        gone = true;
                    }
                }
                turn.response.usage = stream.usage().map(ResponseUsage::from_totals);
                // Dropping the stream here ends the upstream call if it is still going.
            }
        }
        let status = if gone || failure.is_some() {
            ItemStatus::Incomplete
        } else if events.ending() == Ending::Completed {
            ItemStatus::Completed
        } else {
            ItemStatus::Incomplete
        };
        if let Some(u) = turn.response.usage {
            let _ = usage.set(crate::wire::Usage {
                prompt_tokens: u.input_tokens,
                completion_tokens: u.output_tokens,
                total_tokens: u.total_tokens,
            });
        }
        let output = events.finish(status, &mut out);
        let ending = events.ending();
        finish_response(&mut turn.response, ending, output);
        if gone {
            turn.response.status = "cancelled".into();
            turn.response.completed_at = None;
        } else if let Some(message) = &failure {
            fail_response(&mut turn.response, message);
        }
        let saved = self.save(&turn).await;
        if gone {
            return;
        }
        if let Err(err) = saved {
            tracing::error!(response = %turn.response.id, error = %err, "response not stored");
            fail_response(&mut turn.response, "the response could not be stored");
            failure = Some(err.to_string());
        }
        end_frames(&mut events.seq, &turn.response, failure, &mut out);
        send_all(&tx, &mut out).await;
    }

    /// A streamed turn whose model steps may call server tools: `response.created` at
    /// once, then each step's items as events when the step is over (its tool calls run),
    /// then the stored turn's terminal event. A client that goes away stops the loop; the
    /// turn is stored as `cancelled` with the items produced.
    async fn run_tool_stream(
        &self,
        ctx: CallContext,
        mut turn: Turn,
        tx: mpsc::Sender<Bytes>,
        usage: Arc<OnceLock<crate::wire::Usage>>,
    ) {
        let mut seq = Sequencer::default();
        let mut out = vec![
            seq.lifecycle("response.created", &turn.response),
            seq.lifecycle("response.in_progress", &turn.response),
        ];
        let mut events = EventStream::new(seq);
        let mut gone = !send_all(&tx, &mut out).await;
        let result = if gone {
            None
        } else {
            tokio::select! {
                result = self.run_steps(&ctx, &mut turn, Some((&mut events, &tx))) => Some(result),
                () = tx.closed() => None,
            }
        };
        let mut failure = None;
        match result {
            Some(Ok((output, ending))) => {
                events.finish(ItemStatus::Completed, &mut out);
                finish_response(&mut turn.response, ending, output);
            }
            Some(Err(err)) => {
                let produced = events.finish(ItemStatus::Incomplete, &mut out);
                finish_response(&mut turn.response, Ending::Completed, produced);
                let message = err.to_string();
                fail_response(&mut turn.response, &message);
                failure = Some(message);
            }
            None => {
                gone = true;
                let produced = events.finish(ItemStatus::Incomplete, &mut out);
                finish_response(&mut turn.response, Ending::Completed, produced);
                turn.response.status = "cancelled".into();
                turn.response.completed_at = None;
            }
        }
        if let Some(u) = turn.response.usage {
            let _ = usage.set(crate::wire::Usage {
                prompt_tokens: u.input_tokens,
                completion_tokens: u.output_tokens,
                total_tokens: u.total_tokens,
            });
        }
        let saved = self.save(&turn).await;
        if gone {
            return;
        }
        if let Err(err) = saved {
            tracing::error!(response = %turn.response.id, error = %err, "response not stored");
            fail_response(&mut turn.response, "the response could not be stored");
            failure = Some(err.to_string());
        }
        end_frames(&mut events.seq, &turn.response, failure, &mut out);
        send_all(&tx, &mut out).await;
    }

    /// Stores the response (when `store`) and appends its items to its conversation (when
    /// it has one), in one transaction.
    async fn save(&self, turn: &Turn) -> Result<String, GatewayError> {
        let response = &turn.response;
        let body = serde_json::to_string(response).unwrap_or_default();
        if !response.store && response.conversation.is_none() {
            return Ok(body);
        }
        let new_item = |kind: &'static str, item: &Item, tokens: i64| NewItem {
            id: item.id().to_owned(),
            kind,
            item_type: item.kind().to_owned(),
            body: item.to_json(),
            tokens,
        };
        let input = turn
            .input
            .iter()
            .map(|(item, tokens)| new_item("input", item, *tokens))
            .collect();
        let output = response
            .output
            .iter()
            .map(|item| new_item("output", item, context::item_tokens(turn.tokenizer, item)))
            .collect();
        let usage = response.usage.unwrap_or_default();
        let row = ResponseRow {
            id: response.id.clone(),
            key_id: turn.owner.clone(),
            created_at: i64::try_from(response.created_at).unwrap_or(i64::MAX),
            status: response.status.clone(),
            model: response.model.clone(),
            previous_response_id: response.previous_response_id.clone(),
            conversation_id: response.conversation.as_ref().map(|c| c.id.clone()),
            body: body.clone(),
            input_tokens: i64::try_from(usage.input_tokens).unwrap_or(i64::MAX),
            output_tokens: i64::try_from(usage.output_tokens).unwrap_or(i64::MAX),
        };
        let new = NewResponse {
            row,
            input,
            output,
            store: response.store,
        };
        let saved = match turn.job_attempt {
            None => self.store.save_response(&new).await,
            // A background response: over its queued row, completing its job, unless
            // another worker's claim took the job.
            Some(attempt) => match self.store.save_job_response(&new, attempt).await {
                Ok(Some(rows)) => Ok(rows),
                Ok(None) => return Err(GatewayError::Internal(background::SUPERSEDED.into())),
                Err(e) => Err(e),
            },
        };
        saved
            .map(|rows| {
                if let (Some(conversation), Some(read_at)) = (&response.conversation, turn.read_at)
                {
                    // The rows are the input items then the output items, in order.
                    let items = turn
                        .input
                        .iter()
                        .map(|(item, _)| item)
                        .chain(&response.output);
                    let added = rows
                        .into_iter()
                        .zip(items)
                        .map(|(row, item)| {
                            Arc::new(CachedItem {
                                seq: row.seq,
                                item: item.clone(),
                                tokens: row.tokens,
                                bytes: u32::try_from(row.body.len()).unwrap_or(u32::MAX),
                            })
                        })
                        .collect();
                    self.cache.extend(&conversation.id, read_at, added);
                }
                body
            })
            .map_err(|e| match (e, &response.conversation) {
                // The conversation was deleted while the turn ran.
                (crate::store::StoreError::Database(sqlx::Error::RowNotFound), Some(c)) => {
                    GatewayError::NotFound(format!("Conversation with id '{}' not found.", c.id))
                }
                (e, _) => {
                    tracing::error!(error = %e, "storing a response failed");
                    GatewayError::DependencyUnavailable("The conversation store")
                }
            })
            .inspect(|_| {
                // A stored, completed turn: its messages go to extraction.
                if response.status == "completed" {
                    self.observe(turn);
                }
            })
    }
}

/// The terminal events of a stream: `error` and `response.failed` after a failure, else
/// `response.incomplete` or `response.completed`.
fn end_frames(
    seq: &mut Sequencer,
    response: &ResponseObject,
    failure: Option<String>,
    out: &mut Vec<Bytes>,
) {
    if let Some(message) = failure {
        let mut fields = serde_json::Map::new();
        fields.insert("code".into(), Value::from("server_error"));
        fields.insert("message".into(), Value::from(message));
        fields.insert("param".into(), Value::Null);
        out.push(seq.frame("error", fields));
        out.push(seq.lifecycle("response.failed", response));
    } else if response.status == "incomplete" {
        out.push(seq.lifecycle("response.incomplete", response));
    } else {
        out.push(seq.lifecycle("response.completed", response));
    }
}

/// Sends and clears `out`; false when the client has gone.
async fn send_all(tx: &mpsc::Sender<Bytes>, out: &mut Vec<Bytes>) -> bool {
    for frame in out.drain(..) {
        if tx.send(frame).await.is_err() {
            return false;
        }
    }
    true
}

/// The message of an upstream error event's payload.
fn error_message(data: &[u8]) -> String {
    serde_json::from_slice::<Value>(data)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "the upstream stream failed".into())
}

/// Sets the output and the final status from how the answer ended.
fn finish_response(response: &mut ResponseObject, ending: Ending, output: Vec<Item>) {
    response.output = output;
    match ending.incomplete_reason() {
        None => {
            response.status = "completed".into();
            response.completed_at = Some(now_secs());
        }
        Some(reason) => {
            response.status = "incomplete".into();
            response.incomplete_details = Some(serde_json::json!({"reason": reason}));
        }
    }
}

fn fail_response(response: &mut ResponseObject, message: &str) {
    response.status = "failed".into();
    response.completed_at = None;
    response.error = Some(serde_json::json!({"code": "server_error", "message": message}));
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Every parameter of `ResponseCreateParams` (and `InputTokenCountParams`) in the
/// official SDK; the ones this server does not act on (`context_management`,
/// `moderation`, `prompt_cache_options`, …) are accepted and have no effect.
const KNOWN_FIELDS: &[&str] = &[
    "background",
    "context_management",
    "conversation",
    "include",
    "input",
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "model",
    "moderation",
    "parallel_tool_calls",
    "personality",
    "previous_response_id",
    "prompt",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "reasoning",
    "safety_identifier",
    "service_tier",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "truncation",
    "user",
];

/// A `POST /v1/responses` body, read and checked.
struct CreateRequest {
    model: String,
    input: Vec<Item>,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    conversation: Option<String>,
    store: bool,
    stream: bool,
    /// Run as a job in the store (see [`background`]).
    background: bool,
    tools: Vec<Value>,
    chat_tools: Vec<Value>,
    /// The type of the request's `{"type": "web_search"}` tool (or `web_search_preview`).
    web_search: Option<String>,
    /// The options of its web search tool.
    search_options: crate::tools::search::SearchOptions,
    /// The request's `{"type": "mcp"}` tools.
    mcp: Vec<mcp::McpRequest>,
    tool_choice: Option<Value>,
    chat_tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    max_output_tokens: Option<u64>,
    max_tool_calls: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_logprobs: Option<u64>,
    text: TextConfig,
    response_format: Option<Value>,
    truncation: String,
    metadata: BTreeMap<String, String>,
    user: Option<String>,
    safety_identifier: Option<String>,
    prompt_cache_key: Option<String>,
    reasoning: Option<Value>,
}

impl CreateRequest {
    fn parse(body: Bytes) -> Result<CreateRequest, GatewayError> {
        let object = JsonObject::parse(body)?;
        crate::wire::check_field_types(&object, crate::wire::RESPONSES_FIELD_KINDS)?;
        // As OpenAI answers: a parameter the API does not have is a mistake worth naming
        // (a chat field such as `messages` or `max_tokens` sent here, a typo).
        if let Some((unknown, _)) = object
            .fields()
            .find(|(name, _)| !KNOWN_FIELDS.contains(name))
        {
            return Err(GatewayError::InvalidRequest {
                message: format!("Unknown parameter: '{unknown}'."),
                param: None,
                code: Some("unknown_parameter"),
            });
        }
        if object.raw("prompt").is_some_and(|p| p != "null") {
            return Err(GatewayError::invalid(
                "Stored prompt templates are not available on this server; send 'input' and \
                 'instructions'.",
                Some("prompt"),
            ));
        }
        let model: String = object.get("model")?.ok_or_else(|| {
            GatewayError::invalid("Missing required parameter: 'model'.", Some("model"))
        })?;
        if model.is_empty() {
            return Err(GatewayError::invalid(
                "Invalid 'model': empty string.",
                Some("model"),
            ));
        }
        let input = match object.get::<Value>("input")? {
            Some(input) => parse_input(&input)?,
            None => Vec::new(),
        };
        let previous_response_id: Option<String> = object.get("previous_response_id")?;
        if let Some(id) = &previous_response_id
            && !is_id(id, "resp")
        {
            return Err(GatewayError::invalid(
                format!(
                    "Invalid 'previous_response_id': '{id}'. Expected an ID that begins with 'resp'."
                ),
                Some("previous_response_id"),
            ));
        }
        let conversation = object
            .get::<ConversationParam>("conversation")?
            .map(|c| c.id().to_owned());
        if let Some(id) = &conversation
            && !is_id(id, "conv")
        {
            return Err(GatewayError::invalid(
                format!("Invalid 'conversation': '{id}'. Expected an ID that begins with 'conv'."),
                Some("conversation"),
            ));
        }
        if input.is_empty() && previous_response_id.is_none() && conversation.is_none() {
            return Err(GatewayError::invalid(
                "Missing required parameter: 'input'.",
                Some("input"),
            ));
        }
        let tools: Vec<Value> = object.get("tools")?.unwrap_or_default();
        // OpenAI's hosted search tool: run by this server's `web_search`, not sent as a
        // function of the client's.
        let is_search = |tool: &Value| {
            matches!(
                tool.get("type").and_then(Value::as_str),
                Some("web_search" | "web_search_preview")
            )
        };
        let search_tool = tools.iter().enumerate().find(|(_, t)| is_search(t));
        let web_search =
            search_tool.and_then(|(_, t)| t.get("type").and_then(Value::as_str).map(str::to_owned));
        let search_options = match search_tool {
            Some((i, tool)) => {
                crate::tools::search::SearchOptions::from_tool(tool).map_err(|why| {
                    GatewayError::InvalidRequest {
                        message: format!("Invalid value for 'tools[{i}]': {why}."),
                        param: Some("tools"),
                        code: Some("invalid_value"),
                    }
                })?
            }
            None => crate::tools::search::SearchOptions::default(),
        };
        let is_mcp = |tool: &Value| tool.get("type").and_then(Value::as_str) == Some("mcp");
        let chat_tools = tools
            .iter()
            .enumerate()
            .filter(|(_, tool)| !is_search(tool) && !is_mcp(tool))
            .map(|(i, tool)| translate::chat_tool(tool, i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut mcp: Vec<mcp::McpRequest> = Vec::new();
        for (i, tool) in tools.iter().enumerate().filter(|(_, t)| is_mcp(t)) {
            let parsed = mcp::parse_tool(tool, i)?;
            if mcp.iter().any(|m| m.label == parsed.label) {
                return Err(GatewayError::invalid(
                    format!(
                        "Invalid value for 'tools[{i}]': server_label '{}' is given twice.",
                        parsed.label
                    ),
                    Some("tools"),
                ));
            }
            mcp.push(parsed);
        }
        let tool_choice: Option<Value> = object.get("tool_choice")?;
        let chat_tool_choice = tool_choice
            .as_ref()
            .map(translate::chat_tool_choice)
            .transpose()?;
        let text: TextConfig = object.get("text")?.unwrap_or_default();
        let response_format = match &text.format {
            Some(format) => translate::chat_response_format(format)?,
            None => None,
        };
        let truncation: String = object
            .get("truncation")?
            .unwrap_or_else(|| "disabled".to_owned());
        if truncation != "auto" && truncation != "disabled" {
            return Err(GatewayError::InvalidRequest {
                message: format!(
                    "Invalid value for 'truncation': '{truncation}'. Supported values are: \
                     'auto' and 'disabled'."
                ),
                param: Some("truncation"),
                code: Some("invalid_value"),
            });
        }
        let metadata: BTreeMap<String, String> = object.get("metadata")?.unwrap_or_default();
        check_metadata(&metadata, "metadata")?;
        let temperature: Option<f64> = object.get("temperature")?;
        if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(GatewayError::invalid(
                "Invalid 'temperature': expected a number between 0 and 2.",
                Some("temperature"),
            ));
        }
        let max_output_tokens: Option<u64> = object.get("max_output_tokens")?;
        if max_output_tokens == Some(0) {
            return Err(GatewayError::invalid(
                "Invalid 'max_output_tokens': expected a value of at least 1.",
                Some("max_output_tokens"),
            ));
        }
        let background = object.get::<bool>("background")?.unwrap_or(false);
        let _: Option<Vec<String>> = object.get("include")?;
        let safety_identifier: Option<String> = object.get("safety_identifier")?;
        if safety_identifier
            .as_ref()
            .is_some_and(|s| s.chars().count() > 64)
        {
            return Err(GatewayError::invalid(
                "Invalid 'safety_identifier': longer than 64 characters.",
                Some("safety_identifier"),
            ));
        }
        let store = object.get("store")?.unwrap_or(true);
        let stream = object.get("stream")?.unwrap_or(false);
        if background && !store {
            return Err(GatewayError::invalid(
                "Background responses must be stored: 'background' needs 'store' left true.",
                Some("store"),
            ));
        }
        Ok(CreateRequest {
            model,
            input,
            instructions: object.get("instructions")?,
            previous_response_id,
            conversation,
            store,
            stream,
            background,
            tools,
            chat_tools,
            web_search,
            search_options,
            mcp,
            tool_choice,
            chat_tool_choice,
            parallel_tool_calls: object.get("parallel_tool_calls")?,
            max_output_tokens,
            max_tool_calls: object.get("max_tool_calls")?,
            temperature,
            top_p: object.get("top_p")?,
            top_logprobs: object.get("top_logprobs")?,
            text,
            response_format,
            truncation,
            metadata,
            user: object.get("user")?,
            safety_identifier,
            prompt_cache_key: object.get("prompt_cache_key")?,
            reasoning: object.get("reasoning")?,
        })
    }

    fn sampling(&self) -> Sampling<'_> {
        Sampling {
            tools: &self.chat_tools,
            tool_choice: self.chat_tool_choice.as_ref(),
            parallel_tool_calls: self.parallel_tool_calls,
            max_output_tokens: self.max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            response_format: self.response_format.as_ref(),
            user: self.user.as_deref(),
            safety_identifier: self.safety_identifier.as_deref(),
            prompt_cache_key: self.prompt_cache_key.as_deref(),
            reasoning_effort: self
                .reasoning
                .as_ref()
                .and_then(|r| r.get("effort"))
                .and_then(Value::as_str),
        }
    }
}
