//! Between a stream and the answer it stands for.
//!
//! [`ChunkAssembler`] merges `chat.completion.chunk`s into the `chat.completion` a
//! non-stream request would have received: content and refusal text concatenated, tool-call
//! pieces merged by their `index` (names and arguments appended, the first `id` kept),
//! logprobs concatenated, the last `finish_reason` and usage kept. [`StreamAssembler`] does
//! the same from framed SSE events, and only answers for a stream that ended cleanly with
//! `[DONE]`. [`Completion::to_chunks`] goes the other way: a completion cut into the chunks a
//! streaming client expects, which assemble back into the same completion.
//!
//! Dropped on the way, as unknown fields are everywhere in [`super`]: fields of a delta or
//! a message beyond the schema (`reasoning_content` of some servers, say), the chunks'
//! `obfuscation`, and a message's `annotations` and `audio` (they do not stream). A choice
//! that never got a `finish_reason` is assembled as `stop`.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::response::{
    Choice, ChoiceLogprobs, Chunk, ChunkChoice, Completion, CompletionMessage, CompletionUsage,
    CustomToolCall, CustomToolCallDelta, Delta, FinishReason, FunctionCall, FunctionCallDelta,
    Role, ToolCall, ToolCallDelta, ToolType,
};
use super::{CHUNK_OBJECT, COMPLETION_OBJECT};
use crate::wire::sse::parse_event;

/// The highest choice or tool-call index accepted: far above any real stream, low enough
/// that a hostile index cannot make the assembler allocate without bound.
pub const MAX_INDEX: u32 = 128;

/// A chunk the assembler cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    #[error("choice index {0} is above {MAX_INDEX}")]
    ChoiceIndex(u32),
    #[error("tool call index {0} is above {MAX_INDEX}")]
    ToolCallIndex(u32),
}

#[derive(Default)]
struct ToolCallAcc {
    id: Option<String>,
    custom: bool,
    name: String,
    /// A function's arguments or a custom tool's input.
    input: String,
}

#[derive(Default)]
struct ChoiceAcc {
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<ToolCallAcc>,
    function_call: Option<(String, String)>,
    logprobs: Option<ChoiceLogprobs>,
    finish_reason: Option<FinishReason>,
}

/// Merges typed chunks into a completion.
#[derive(Default)]
pub struct ChunkAssembler {
    id: Option<String>,
    created: Option<u64>,
    model: Option<String>,
    service_tier: Option<String>,
    system_fingerprint: Option<String>,
    choices: Vec<ChoiceAcc>,
    usage: Option<CompletionUsage>,
}

/// Keeps the first non-empty value.
fn keep_first(slot: &mut Option<String>, value: Option<&str>) {
    if slot.is_none()
        && let Some(value) = value.filter(|v| !v.is_empty())
    {
        *slot = Some(value.to_owned());
    }
}

/// The accumulator at `index`, growing the list up to it.
fn slot<T: Default>(list: &mut Vec<T>, index: u32) -> Option<&mut T> {
    if index > MAX_INDEX {
        return None;
    }
    let index = index as usize;
    if list.len() <= index {
        list.resize_with(index + 1, T::default);
    }
    list.get_mut(index)
}

impl ChunkAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Merges one chunk.
    ///
    /// # Errors
    /// A choice or tool-call index above [`MAX_INDEX`]; the chunk may be partly merged.
    pub fn push(&mut self, chunk: &Chunk<'_>) -> Result<(), AssembleError> {
        keep_first(&mut self.id, Some(&chunk.id));
        keep_first(&mut self.model, Some(&chunk.model));
        keep_first(&mut self.service_tier, chunk.service_tier.as_deref());
        keep_first(
            &mut self.system_fingerprint,
            chunk.system_fingerprint.as_deref(),
        );
        if self.created.is_none() && chunk.created != 0 {
            self.created = Some(chunk.created);
        }
        if let Some(usage) = chunk.usage() {
            self.usage = Some(usage.clone());
        }
        for choice in &chunk.choices {
            let acc = slot(&mut self.choices, choice.index)
                .ok_or(AssembleError::ChoiceIndex(choice.index))?;
            merge_choice(acc, choice)?;
        }
        Ok(())
    }

    /// No choice has been seen.
    pub fn is_empty(&self) -> bool {
        self.choices.is_empty()
    }

    /// The completion the chunks add up to.
    pub fn finish(self) -> Completion<'static> {
        let choices = self
            .choices
            .into_iter()
            .zip(0u32..)
            .map(|(acc, index)| {
                let tool_calls: Vec<ToolCall<'static>> = acc
                    .tool_calls
                    .into_iter()
                    .map(|call| {
                        let id = Cow::Owned(call.id.unwrap_or_default());
                        let (name, input) = (Cow::Owned(call.name), Cow::Owned(call.input));
                        if call.custom {
                            ToolCall::Custom {
                                id,
                                custom: CustomToolCall { name, input },
                            }
                        } else {
                            ToolCall::Function {
                                id,
                                function: FunctionCall {
                                    name,
                                    arguments: input,
                                },
                            }
                        }
                    })
                    .collect();
                Choice {
                    index,
                    message: CompletionMessage {
                        refusal: acc.refusal.map(Cow::Owned),
                        tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                        function_call: acc.function_call.map(|(name, arguments)| FunctionCall {
                            name: Cow::Owned(name),
                            arguments: Cow::Owned(arguments),
                        }),
                        ..CompletionMessage::new(acc.content.map(Cow::Owned))
                    },
                    logprobs: acc.logprobs,
                    finish_reason: Some(acc.finish_reason.unwrap_or(FinishReason::Stop)),
                }
            })
            .collect();
        Completion {
            id: Cow::Owned(self.id.unwrap_or_default()),
            object: Cow::Borrowed(COMPLETION_OBJECT),
            created: self.created.unwrap_or(0),
            model: Cow::Owned(self.model.unwrap_or_default()),
            choices,
            usage: self.usage,
            service_tier: self.service_tier.map(Cow::Owned),
            system_fingerprint: self.system_fingerprint.map(Cow::Owned),
        }
    }
}

fn merge_choice(acc: &mut ChoiceAcc, choice: &ChunkChoice<'_>) -> Result<(), AssembleError> {
    let delta = &choice.delta;
    if let Some(text) = delta.content.as_ref().and_then(Option::as_deref) {
        acc.content.get_or_insert_default().push_str(text);
    }
    if let Some(text) = delta.refusal.as_ref().and_then(Option::as_deref) {
        acc.refusal.get_or_insert_default().push_str(text);
    }
    for call in delta.tool_calls.iter().flatten() {
        let t = slot(&mut acc.tool_calls, call.index)
            .ok_or(AssembleError::ToolCallIndex(call.index))?;
        if t.id.is_none()
            && let Some(id) = &call.id
        {
            t.id = Some(id.clone().into_owned());
        }
        if call.kind == Some(ToolType::Custom) || call.custom.is_some() {
            t.custom = true;
        }
        let (name, input) = match (&call.function, &call.custom) {
            (Some(f), _) => (f.name.as_deref(), f.arguments.as_deref()),
            (None, Some(c)) => (c.name.as_deref(), c.input.as_deref()),
            (None, None) => (None, None),
        };
        t.name.push_str(name.unwrap_or_default());
        t.input.push_str(input.unwrap_or_default());
    }
    if let Some(f) = &delta.function_call {
        let (name, arguments) = acc.function_call.get_or_insert_default();
        name.push_str(f.name.as_deref().unwrap_or_default());
        arguments.push_str(f.arguments.as_deref().unwrap_or_default());
    }
    if let Some(logprobs) = &choice.logprobs {
        let into = acc.logprobs.get_or_insert_default();
        for (into, from) in [
            (&mut into.content, &logprobs.content),
            (&mut into.refusal, &logprobs.refusal),
        ] {
            if let Some(from) = from {
                into.get_or_insert_default().extend(from.iter().cloned());
            }
        }
    }
    if let Some(reason) = &choice.finish_reason {
        acc.finish_reason = Some(reason.clone());
    }
    Ok(())
}

/// Assembles a stream of framed SSE events (`data: {...}\n\n`, ending with `[DONE]`).
#[derive(Default)]
pub struct StreamAssembler {
    chunks: ChunkAssembler,
    done: bool,
    broken: bool,
}

impl StreamAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one framed event. An error event, an event that is not a chunk or an index out
    /// of range spoils the stream: it will not be assembled.
    pub fn push(&mut self, event: &[u8]) {
        if self.done || self.broken {
            return;
        }
        let Some(event) = parse_event(event) else {
            // Not UTF-8, or no `data:` (a comment): only the former is a broken stream.
            self.broken = std::str::from_utf8(event).is_err();
            return;
        };
        let data = event.data.trim_ascii();
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        if memchr::memmem::find(data.as_bytes(), b"\"error\"").is_some() {
            #[derive(Deserialize)]
            struct Probe {
                error: Option<IgnoredAny>,
            }
            if serde_json::from_str::<Probe>(data).is_ok_and(|p| p.error.is_some()) {
                self.broken = true;
                return;
            }
        }
        match serde_json::from_str::<Chunk<'_>>(data) {
            Ok(chunk) => self.broken = self.chunks.push(&chunk).is_err(),
            Err(_) => self.broken = true,
        }
    }

    /// The assembled completion, if the stream ended cleanly with `[DONE]` and had a choice.
    pub fn completion(self) -> Option<Completion<'static>> {
        (self.done && !self.broken && !self.chunks.is_empty()).then(|| self.chunks.finish())
    }

    /// The assembled completion as a JSON body; `None` as for [`StreamAssembler::completion`].
    pub fn finish(self) -> Option<Vec<u8>> {
        serde_json::to_vec(&self.completion()?).ok()
    }
}

impl Completion<'_> {
    /// The completion as the chunks of a stream, in the shape OpenAI streams: per choice a
    /// role chunk, the content, the refusal, one chunk per tool call, a finish chunk; then,
    /// with `include_usage`, a usage chunk with no choices (and `"usage": null` on every
    /// other chunk). Logprobs travel with the text they belong to. Assembling the chunks
    /// gives back this completion. The caller frames them and adds `[DONE]`.
    pub fn to_chunks<'s>(&'s self, include_usage: bool) -> Vec<Chunk<'s>> {
        let chunk = |choices: Vec<ChunkChoice<'s>>| Chunk {
            id: Cow::Borrowed(&*self.id),
            object: Cow::Borrowed(CHUNK_OBJECT),
            created: self.created,
            model: Cow::Borrowed(&*self.model),
            service_tier: self.service_tier.as_deref().map(Cow::Borrowed),
            system_fingerprint: self.system_fingerprint.as_deref().map(Cow::Borrowed),
            choices,
            usage: include_usage.then_some(None),
        };
        let mut chunks = Vec::with_capacity(self.choices.len() * 4 + 1);
        for choice in &self.choices {
            let message = &choice.message;
            let index = choice.index;
            let mut pending = choice.logprobs.clone();
            let mut sent_logprobs = false;
            let mut take = |content: bool| -> Option<ChoiceLogprobs> {
                let pending = pending.as_mut()?;
                let taken = if content {
                    pending.content.take().map(|c| ChoiceLogprobs {
                        content: Some(c),
                        refusal: None,
                    })
                } else {
                    pending.refusal.take().map(|r| ChoiceLogprobs {
                        content: None,
                        refusal: Some(r),
                    })
                };
                sent_logprobs |= taken.is_some();
                taken
            };

            // An empty string opens content (and refusal) when the message has them;
            // `null` says it has none.
            let opening =
                |text: &Option<Cow<'_, str>>| Some(text.as_ref().map(|_| Cow::Borrowed("")));
            chunks.push(chunk(vec![ChunkChoice::new(
                index,
                Delta {
                    role: Some(Role::Assistant),
                    content: opening(&message.content),
                    refusal: opening(&message.refusal),
                    ..Delta::default()
                },
            )]));
            if let Some(text) = message.content.as_deref().filter(|t| !t.is_empty()) {
                chunks.push(chunk(vec![ChunkChoice {
                    logprobs: take(true),
                    ..ChunkChoice::new(index, Delta::content(text))
                }]));
            }
            if let Some(text) = message.refusal.as_deref().filter(|t| !t.is_empty()) {
                let delta = Delta {
                    refusal: Some(Some(Cow::Borrowed(text))),
                    ..Delta::default()
                };
                chunks.push(chunk(vec![ChunkChoice {
                    logprobs: take(false),
                    ..ChunkChoice::new(index, delta)
                }]));
            }
            for (call, k) in message.tool_calls().iter().zip(0u32..) {
                let mut delta = ToolCallDelta {
                    index: k,
                    id: Some(Cow::Borrowed(call.id())),
                    kind: Some(call.kind()),
                    ..ToolCallDelta::default()
                };
                match call {
                    ToolCall::Function { function, .. } => {
                        delta.function = Some(FunctionCallDelta {
                            name: Some(Cow::Borrowed(&function.name)),
                            arguments: Some(Cow::Borrowed(&function.arguments)),
                        });
                    }
                    ToolCall::Custom { custom, .. } => {
                        delta.custom = Some(CustomToolCallDelta {
                            name: Some(Cow::Borrowed(&custom.name)),
                            input: Some(Cow::Borrowed(&custom.input)),
                        });
                    }
                }
                let delta = Delta {
                    tool_calls: Some(vec![delta]),
                    ..Delta::default()
                };
                chunks.push(chunk(vec![ChunkChoice::new(index, delta)]));
            }
            if let Some(call) = &message.function_call {
                let delta = Delta {
                    function_call: Some(FunctionCallDelta {
                        name: Some(Cow::Borrowed(&call.name)),
                        arguments: Some(Cow::Borrowed(&call.arguments)),
                    }),
                    ..Delta::default()
                };
                chunks.push(chunk(vec![ChunkChoice::new(index, delta)]));
            }
            // Whatever logprobs found no text to travel with go with the finish.
            let rest = pending
                .filter(|rest| !sent_logprobs || rest.content.is_some() || rest.refusal.is_some());
            chunks.push(chunk(vec![ChunkChoice {
                logprobs: rest,
                finish_reason: choice.finish_reason.clone(),
                ..ChunkChoice::new(index, Delta::default())
            }]));
        }
        if include_usage && let Some(usage) = &self.usage {
            chunks.push(Chunk {
                usage: Some(Some(usage.clone())),
                ..chunk(Vec::new())
            });
        }
        chunks
    }
}
