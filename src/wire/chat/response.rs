//! The answer side of Chat Completions: the whole [`Completion`] and the stream's
//! [`Chunk`]s (SDK: `chat_completion.py`, `chat_completion_message.py`,
//! `chat_completion_chunk.py`, `chat_completion_message_tool_call.py`,
//! `chat_completion_token_logprob.py`, `completion_usage.py`).
//!
//! Serialised field order is the one OpenAI sends. Fields OpenAI always sends, even as
//! `null` (`content`, `refusal`, `logprobs`, `finish_reason`, `usage` of a completion), are
//! always written; optional extras are written only when set. In a chunk, `delta.content`,
//! `delta.refusal` and `usage` tell absent (`None`) from `null` (`Some(None)`), because
//! OpenAI streams use both.

use std::borrow::Cow;

use serde::de::{self, Deserializer};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use super::serde_util::{nullable, nullable_cow, opt_cow};
use super::string_enum;
use crate::wire::Usage;

string_enum! {
    /// The author of a message (SDK: `ChatCompletionRole`).
    pub enum Role {
        System = "system",
        Developer = "developer",
        User = "user",
        Assistant = "assistant",
        Tool = "tool",
        /// Deprecated in favour of `tool`.
        Function = "function",
    }
}

string_enum! {
    /// Why the model stopped (SDK: `Choice.finish_reason`).
    pub enum FinishReason {
        /// A natural stop point or a stop sequence.
        Stop = "stop",
        /// `max_tokens` or the context window.
        Length = "length",
        /// The model called tools.
        ToolCalls = "tool_calls",
        /// Content was omitted by a filter.
        ContentFilter = "content_filter",
        /// Deprecated: the model called a function.
        FunctionCall = "function_call",
    }
}

string_enum! {
    /// A tool call's `type`.
    pub enum ToolType {
        Function = "function",
        Custom = "custom",
    }
}

/// A `chat.completion` (SDK: `ChatCompletion`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion<'a> {
    #[serde(default, borrow)]
    pub id: Cow<'a, str>,
    /// Always `chat.completion`.
    #[serde(default, borrow)]
    pub object: Cow<'a, str>,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    #[serde(default, borrow)]
    pub model: Cow<'a, str>,
    #[serde(borrow)]
    pub choices: Vec<Choice<'a>>,
    #[serde(default)]
    pub usage: Option<CompletionUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<Cow<'a, str>>,
}

impl<'a> Completion<'a> {
    /// A completion with these choices and nothing else set.
    pub fn new(
        id: impl Into<Cow<'a, str>>,
        created: u64,
        model: impl Into<Cow<'a, str>>,
        choices: Vec<Choice<'a>>,
    ) -> Self {
        Completion {
            id: id.into(),
            object: Cow::Borrowed(super::COMPLETION_OBJECT),
            created,
            model: model.into(),
            choices,
            usage: None,
            service_tier: None,
            system_fingerprint: None,
        }
    }

    /// The first choice's message, which is the whole answer unless the client asked for
    /// `n` > 1.
    pub fn message(&self) -> Option<&CompletionMessage<'a>> {
        self.choices.first().map(|choice| &choice.message)
    }

    /// The first choice's text content.
    pub fn text(&self) -> Option<&str> {
        self.message().and_then(|m| m.content.as_deref())
    }

    /// The first choice's tool calls (empty when it made none).
    pub fn tool_calls(&self) -> &[ToolCall<'a>] {
        self.message()
            .and_then(|m| m.tool_calls.as_deref())
            .unwrap_or_default()
    }

    /// The first choice's `finish_reason`.
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.choices
            .first()
            .and_then(|choice| choice.finish_reason.as_ref())
    }
}

/// One choice of a completion (SDK: `chat_completion.Choice`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice<'a> {
    #[serde(default)]
    pub index: u32,
    #[serde(borrow)]
    pub message: CompletionMessage<'a>,
    #[serde(default)]
    pub logprobs: Option<ChoiceLogprobs>,
    /// Always set by OpenAI; `null` from some compatible servers.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

/// The model's message in a completion (SDK: `ChatCompletionMessage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionMessage<'a> {
    /// Always `assistant`.
    #[serde(default = "assistant")]
    pub role: Role,
    #[serde(default, borrow, deserialize_with = "opt_cow")]
    pub content: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "opt_cow")]
    pub refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall<'a>>>,
    /// URL citations of web search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Vec<Annotation>>,
    /// The audio reply, when audio output was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<AudioOutput>,
    /// Deprecated in favour of `tool_calls`.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCall<'a>>,
}

fn assistant() -> Role {
    Role::Assistant
}

impl<'a> CompletionMessage<'a> {
    /// An assistant message with this content and nothing else.
    pub fn new(content: Option<Cow<'a, str>>) -> Self {
        CompletionMessage {
            role: Role::Assistant,
            content,
            refusal: None,
            tool_calls: None,
            annotations: None,
            audio: None,
            function_call: None,
        }
    }

    /// The tool calls (empty when there are none).
    pub fn tool_calls(&self) -> &[ToolCall<'a>] {
        self.tool_calls.as_deref().unwrap_or_default()
    }
}

/// SDK: `Annotation` of `ChatCompletionMessage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Annotation {
    /// `url_citation`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_citation: Option<UrlCitation>,
}

/// SDK: `AnnotationURLCitation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlCitation {
    pub end_index: u64,
    pub start_index: u64,
    pub title: String,
    pub url: String,
}

/// SDK: `ChatCompletionAudio`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudioOutput {
    pub id: String,
    /// Base64-encoded audio.
    pub data: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub transcript: String,
}

/// A tool call made by the model, in a completion or in assistant history (SDK:
/// `ChatCompletionMessageToolCallUnion`: `ChatCompletionMessageFunctionToolCall` or
/// `ChatCompletionMessageCustomToolCall`). In a request a missing `type` reads as
/// `function`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolCall<'a> {
    Function {
        id: Cow<'a, str>,
        function: FunctionCall<'a>,
    },
    Custom {
        id: Cow<'a, str>,
        custom: CustomToolCall<'a>,
    },
}

impl<'a> ToolCall<'a> {
    /// A function call.
    pub fn function(
        id: impl Into<Cow<'a, str>>,
        name: impl Into<Cow<'a, str>>,
        arguments: impl Into<Cow<'a, str>>,
    ) -> Self {
        ToolCall::Function {
            id: id.into(),
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
            },
        }
    }

    pub fn id(&self) -> &str {
        match self {
            ToolCall::Function { id, .. } | ToolCall::Custom { id, .. } => id,
        }
    }

    /// The name of the function or custom tool called.
    pub fn name(&self) -> &str {
        match self {
            ToolCall::Function { function, .. } => &function.name,
            ToolCall::Custom { custom, .. } => &custom.name,
        }
    }

    pub fn kind(&self) -> ToolType {
        match self {
            ToolCall::Function { .. } => ToolType::Function,
            ToolCall::Custom { .. } => ToolType::Custom,
        }
    }

    /// The function called, unless this is a custom tool call.
    pub fn as_function(&self) -> Option<&FunctionCall<'a>> {
        match self {
            ToolCall::Function { function, .. } => Some(function),
            ToolCall::Custom { .. } => None,
        }
    }
}

impl Serialize for ToolCall<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut call = s.serialize_struct("ToolCall", 3)?;
        call.serialize_field("id", self.id())?;
        match self {
            ToolCall::Function { function, .. } => {
                call.serialize_field("type", "function")?;
                call.serialize_field("function", function)?;
            }
            ToolCall::Custom { custom, .. } => {
                call.serialize_field("type", "custom")?;
                call.serialize_field("custom", custom)?;
            }
        }
        call.end()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ToolCall<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields<'a> {
            #[serde(borrow)]
            id: Cow<'a, str>,
            #[serde(rename = "type", default)]
            kind: Option<ToolType>,
            #[serde(default, borrow)]
            function: Option<FunctionCall<'a>>,
            #[serde(default, borrow)]
            custom: Option<CustomToolCall<'a>>,
        }
        let f = Fields::deserialize(deserializer)?;
        match f.kind.unwrap_or(ToolType::Function) {
            ToolType::Function => Ok(ToolCall::Function {
                id: f.id,
                function: f
                    .function
                    .ok_or_else(|| de::Error::missing_field("function"))?,
            }),
            ToolType::Custom => Ok(ToolCall::Custom {
                id: f.id,
                custom: f.custom.ok_or_else(|| de::Error::missing_field("custom"))?,
            }),
            ToolType::Other(other) => {
                Err(de::Error::unknown_variant(&other, &["function", "custom"]))
            }
        }
    }
}

/// SDK: `Function` of `ChatCompletionMessageFunctionToolCall`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// JSON text as generated by the model: not necessarily valid. Missing reads as empty.
    #[serde(default, borrow)]
    pub arguments: Cow<'a, str>,
}

/// SDK: `Custom` of `ChatCompletionMessageCustomToolCall`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomToolCall<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(default, borrow)]
    pub input: Cow<'a, str>,
}

/// SDK: `ChoiceLogprobs`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChoiceLogprobs {
    #[serde(default)]
    pub content: Option<Vec<TokenLogprob>>,
    #[serde(default)]
    pub refusal: Option<Vec<TokenLogprob>>,
}

/// SDK: `ChatCompletionTokenLogprob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    /// The token's UTF-8 bytes.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    pub logprob: f64,
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// SDK: `TopLogprob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    pub logprob: f64,
}

/// Token counts (SDK: `CompletionUsage`). Fields beyond OpenAI's (a provider's cost, say)
/// are kept in `extra` and written back, here and in the details.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CompletionUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl CompletionUsage {
    /// The three counts the gateway accounts.
    pub fn totals(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
        }
    }
}

impl From<Usage> for CompletionUsage {
    fn from(usage: Usage) -> Self {
        CompletionUsage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
            ..CompletionUsage::default()
        }
    }
}

/// SDK: `PromptTokensDetails`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_tokens: Option<u64>,
    /// Tokens read from the prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Tokens written to the prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// SDK: `CompletionTokensDetails`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_prediction_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_prediction_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A `chat.completion.chunk` (SDK: `ChatCompletionChunk`). Its `obfuscation` and
/// `moderation` fields are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk<'a> {
    #[serde(default, borrow)]
    pub id: Cow<'a, str>,
    /// Always `chat.completion.chunk`.
    #[serde(default, borrow)]
    pub object: Cow<'a, str>,
    #[serde(default)]
    pub created: u64,
    #[serde(default, borrow)]
    pub model: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<Cow<'a, str>>,
    /// Empty on the final usage chunk.
    #[serde(default, borrow)]
    pub choices: Vec<ChunkChoice<'a>>,
    /// Absent unless the client asked for usage; then `null` on every chunk but the last.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub usage: Option<Option<CompletionUsage>>,
}

impl<'a> Chunk<'a> {
    /// A chunk with these choices and nothing else set.
    pub fn new(
        id: impl Into<Cow<'a, str>>,
        created: u64,
        model: impl Into<Cow<'a, str>>,
        choices: Vec<ChunkChoice<'a>>,
    ) -> Self {
        Chunk {
            id: id.into(),
            object: Cow::Borrowed(super::CHUNK_OBJECT),
            created,
            model: model.into(),
            service_tier: None,
            system_fingerprint: None,
            choices,
            usage: None,
        }
    }

    /// The usage this chunk reports, if any.
    pub fn usage(&self) -> Option<&CompletionUsage> {
        self.usage.as_ref().and_then(Option::as_ref)
    }
}

/// One choice of a chunk (SDK: `chat_completion_chunk.Choice`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChunkChoice<'a> {
    #[serde(default)]
    pub index: u32,
    #[serde(default, borrow)]
    pub delta: Delta<'a>,
    #[serde(default)]
    pub logprobs: Option<ChoiceLogprobs>,
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

impl<'a> ChunkChoice<'a> {
    /// Choice `index` carrying `delta`.
    pub fn new(index: u32, delta: Delta<'a>) -> Self {
        ChunkChoice {
            index,
            delta,
            ..ChunkChoice::default()
        }
    }
}

/// What one chunk adds to a choice's message (SDK: `ChoiceDelta`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Delta<'a> {
    /// On the first chunk of a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Absent, `null`, or text to append.
    #[serde(
        default,
        borrow,
        deserialize_with = "nullable_cow",
        skip_serializing_if = "Option::is_none"
    )]
    pub content: Option<Option<Cow<'a, str>>>,
    /// Absent, `null`, or refusal text to append.
    #[serde(
        default,
        borrow,
        deserialize_with = "nullable_cow",
        skip_serializing_if = "Option::is_none"
    )]
    pub refusal: Option<Option<Cow<'a, str>>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta<'a>>>,
    /// Deprecated in favour of `tool_calls`.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCallDelta<'a>>,
}

impl<'a> Delta<'a> {
    /// A delta appending `text` to the content.
    pub fn content(text: impl Into<Cow<'a, str>>) -> Self {
        Delta {
            content: Some(Some(text.into())),
            ..Delta::default()
        }
    }

    /// The text this delta appends to the content.
    pub fn text(&self) -> Option<&str> {
        self.content.as_ref().and_then(|c| c.as_deref())
    }
}

/// A piece of a tool call, merged with the other pieces of the same `index` (SDK:
/// `ChoiceDeltaToolCall`). The first piece of a call carries `id`, `type` and the name;
/// the following ones append to the arguments (or a custom tool's input).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolCallDelta<'a> {
    /// The call's position among the choice's tool calls.
    #[serde(default)]
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ToolType>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta<'a>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub custom: Option<CustomToolCallDelta<'a>>,
}

/// SDK: `ChoiceDeltaToolCallFunction`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FunctionCallDelta<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Cow<'a, str>>,
    #[serde(
        default,
        borrow,
        deserialize_with = "opt_cow",
        skip_serializing_if = "Option::is_none"
    )]
    pub arguments: Option<Cow<'a, str>>,
}

/// SDK: `ChoiceDeltaToolCallCustom`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CustomToolCallDelta<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Cow<'a, str>>,
    #[serde(
        default,
        borrow,
        deserialize_with = "opt_cow",
        skip_serializing_if = "Option::is_none"
    )]
    pub input: Option<Cow<'a, str>>,
}
