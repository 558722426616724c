//! Anthropic stream events → OpenAI `chat.completion.chunk` events ([`StreamDecoder`]).

use std::borrow::Cow;
use std::collections::VecDeque;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::EMPTY_OBJECT;
use super::response::{
    InBlock, InError, InUsage, finish_reason, now_secs, protocol, upstream_error,
};
use crate::error::GatewayError;
use crate::wire::Usage;
use crate::wire::chat::{
    Chunk, ChunkChoice, CompletionUsage, Delta, FinishReason, FunctionCallDelta, Role,
    ToolCallDelta, ToolType,
};
use crate::wire::sse::{DONE, Event, data_event};

/// Translates Anthropic stream events into OpenAI `chat.completion.chunk` SSE events.
///
/// One decoder per upstream stream. Anthropic numbers content blocks across text and
/// tool use; OpenAI numbers tool calls alone, so tool blocks are re-indexed from 0.
pub struct StreamDecoder {
    /// `chatcmpl-` + the Anthropic message id, once `message_start` is seen.
    id: String,
    model: String,
    created: u64,
    /// The client asked for usage: every chunk carries `"usage": null` as OpenAI's do.
    include_usage: bool,
    provider: String,
    /// The role chunk has been sent.
    started: bool,
    /// A chunk with a `finish_reason` has been sent.
    finish_sent: bool,
    /// `message_stop` was seen and `[DONE]` emitted.
    finished: bool,
    /// Tool-use blocks seen so far; the position is the OpenAI tool call index.
    tools: Vec<ToolBlock>,
    usage: Option<InUsage>,
}

struct ToolBlock {
    /// The Anthropic content block index.
    block: u64,
    /// Some non-empty arguments were sent for this call.
    sent_arguments: bool,
}

impl StreamDecoder {
    pub fn new(model: &str, include_usage: bool, provider: &str) -> Self {
        StreamDecoder {
            id: String::from("chatcmpl-"),
            model: model.to_owned(),
            created: now_secs(),
            include_usage,
            provider: provider.to_owned(),
            started: false,
            finish_sent: false,
            finished: false,
            tools: Vec::new(),
            usage: None,
        }
    }

    /// Feeds one upstream event; pushes zero or more framed OpenAI SSE events (each
    /// `data: {...}\n\n`, or `[DONE]`) to `out`.
    ///
    /// # Errors
    /// An Anthropic `error` event: [`GatewayError::UpstreamRateLimited`] for overloaded or
    /// rate-limit errors, [`GatewayError::UpstreamFailed`] otherwise. An event that is not
    /// valid JSON: [`GatewayError::UpstreamProtocol`].
    pub fn on_event(
        &mut self,
        event: &Event<'_>,
        out: &mut VecDeque<Bytes>,
    ) -> Result<(), GatewayError> {
        if self.finished || event.name == Some("ping") {
            return Ok(());
        }
        let ev: StreamEvent<'_> = serde_json::from_str(&event.data).map_err(|e| {
            protocol(
                &self.provider,
                format!("stream event is not valid JSON: {e}"),
            )
        })?;
        // The payload's `type` names the event; the SSE `event:` line is the fallback.
        let kind = match &*ev.kind {
            "" => event.name.unwrap_or(""),
            kind => kind,
        };
        match kind {
            "message_start" => {
                if let Some(message) = ev.message {
                    if !message.id.is_empty() {
                        self.id.truncate("chatcmpl-".len());
                        self.id.push_str(&message.id);
                    }
                    if !message.model.is_empty() {
                        self.model.clear();
                        self.model.push_str(&message.model);
                    }
                    if let Some(usage) = message.usage {
                        self.usage.get_or_insert_default().update(usage);
                    }
                }
                self.start(out)?;
            }
            "content_block_start" => {
                self.start(out)?;
                let (Some(index), Some(block)) = (ev.index, ev.content_block) else {
                    return Ok(());
                };
                match &*block.kind {
                    "text" if !block.text.is_empty() => {
                        self.emit(out, Delta::content(&*block.text), None)?
                    }
                    "tool_use" => {
                        // The start normally carries `"input": {}` and the arguments follow
                        // as deltas; a non-empty input is sent whole.
                        let arguments = block
                            .input
                            .map(RawValue::get)
                            .filter(|a| a.trim() != EMPTY_OBJECT)
                            .unwrap_or("");
                        let k = self.tools.len();
                        self.tools.push(ToolBlock {
                            block: index,
                            sent_arguments: !arguments.is_empty(),
                        });
                        self.emit_tool(out, k, Some((&block.id, &block.name)), arguments)?;
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                self.start(out)?;
                let (Some(index), Some(delta)) = (ev.index, ev.delta) else {
                    return Ok(());
                };
                match &*delta.kind {
                    "text_delta" if !delta.text.is_empty() => {
                        self.emit(out, Delta::content(&*delta.text), None)?
                    }
                    "input_json_delta" if !delta.partial_json.is_empty() => {
                        if let Some(k) = self.tools.iter().position(|t| t.block == index) {
                            self.tools[k].sent_arguments = true;
                            self.emit_tool(out, k, None, &delta.partial_json)?;
                        }
                    }
                    // thinking_delta, signature_delta, citations_delta, empty deltas.
                    _ => {}
                }
            }
            "content_block_stop" => {
                // A call without parameters may stream no argument text at all; OpenAI
                // clients parse the arguments, so they get `{}` rather than "".
                if let Some(index) = ev.index
                    && let Some(k) = self.tools.iter().position(|t| t.block == index)
                    && !self.tools[k].sent_arguments
                {
                    self.tools[k].sent_arguments = true;
                    self.emit_tool(out, k, None, EMPTY_OBJECT)?;
                }
            }
            "message_delta" => {
                if let Some(usage) = ev.usage {
                    self.usage.get_or_insert_default().update(usage);
                }
                if let Some(stop) = ev.delta.and_then(|d| d.stop_reason) {
                    self.start(out)?;
                    self.emit(out, Delta::default(), Some(finish_reason(&stop)))?;
                    self.finish_sent = true;
                }
            }
            "message_stop" => {
                self.start(out)?;
                if !self.finish_sent {
                    self.emit(out, Delta::default(), Some(FinishReason::Stop))?;
                    self.finish_sent = true;
                }
                // Always: usage is metered whatever the client asked; the inference layer
                // removes this chunk for a caller that did not ask for it.
                let usage = self.usage().unwrap_or_default();
                self.push_chunk(out, Vec::new(), Some(Some(usage.into())))?;
                out.push_back(Bytes::from_static(DONE));
                self.finished = true;
            }
            "error" => {
                let error = ev.error.unwrap_or_default();
                return Err(upstream_error(&self.provider, &error.kind, &error.message));
            }
            // `ping`, and event types added after this was written (Anthropic's versioning
            // policy says to ignore unknown events).
            _ => {}
        }
        Ok(())
    }

    /// True once `message_stop` was seen (and `[DONE]` was emitted).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Usage seen so far (input tokens from `message_start`, output tokens from
    /// `message_delta`).
    pub fn usage(&self) -> Option<Usage> {
        self.usage.map(InUsage::to_openai)
    }

    /// Sends the opening `{"role":"assistant","content":""}` chunk once.
    fn start(&mut self, out: &mut VecDeque<Bytes>) -> Result<(), GatewayError> {
        if !self.started {
            self.started = true;
            self.emit(
                out,
                Delta {
                    role: Some(Role::Assistant),
                    ..Delta::content("")
                },
                None,
            )?;
        }
        Ok(())
    }

    /// A tool call delta for OpenAI tool index `k`; `head` (id, name) on its first chunk.
    fn emit_tool(
        &self,
        out: &mut VecDeque<Bytes>,
        k: usize,
        head: Option<(&str, &str)>,
        arguments: &str,
    ) -> Result<(), GatewayError> {
        let call = ToolCallDelta {
            index: u32::try_from(k).unwrap_or(u32::MAX),
            id: head.map(|(id, _)| Cow::Borrowed(id)),
            kind: head.map(|_| ToolType::Function),
            function: Some(FunctionCallDelta {
                name: head.map(|(_, name)| Cow::Borrowed(name)),
                arguments: Some(Cow::Borrowed(arguments)),
            }),
            custom: None,
        };
        self.emit(
            out,
            Delta {
                tool_calls: Some(vec![call]),
                ..Delta::default()
            },
            None,
        )
    }

    /// One chunk with a single choice.
    fn emit(
        &self,
        out: &mut VecDeque<Bytes>,
        delta: Delta<'_>,
        finish_reason: Option<FinishReason>,
    ) -> Result<(), GatewayError> {
        let choice = ChunkChoice {
            finish_reason,
            ..ChunkChoice::new(0, delta)
        };
        // OpenAI sends `"usage": null` on every chunk but the last when usage was asked for.
        self.push_chunk(out, vec![choice], self.include_usage.then_some(None))
    }

    /// `usage` is `None` for no usage key, `Some(None)` for `"usage": null`.
    fn push_chunk(
        &self,
        out: &mut VecDeque<Bytes>,
        choices: Vec<ChunkChoice<'_>>,
        usage: Option<Option<CompletionUsage>>,
    ) -> Result<(), GatewayError> {
        let chunk = Chunk {
            usage,
            ..Chunk::new(&*self.id, self.created, &*self.model, choices)
        };
        let json = serde_json::to_vec(&chunk)
            .map_err(|e| GatewayError::Internal(format!("encoding a stream chunk: {e}")))?;
        out.push_back(data_event(&json));
        Ok(())
    }
}

/// Every Anthropic stream event as one flat struct: no per-event-type buffering, and text
/// deltas borrow from the event data unless they contain escapes.
#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default, borrow)]
    content_block: Option<InBlock<'a>>,
    #[serde(default, borrow)]
    delta: Option<StreamDelta<'a>>,
    #[serde(default)]
    usage: Option<InUsage>,
    #[serde(default)]
    error: Option<InError>,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: Option<InUsage>,
}

#[derive(Deserialize)]
struct StreamDelta<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Cow<'a, str>,
    #[serde(default, borrow)]
    partial_json: Cow<'a, str>,
    #[serde(default)]
    stop_reason: Option<String>,
}
