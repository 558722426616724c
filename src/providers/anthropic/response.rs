//! Anthropic Messages response → OpenAI `chat.completion` ([`decode_response`]), Anthropic
//! error bodies ([`decode_error`]), and the Anthropic-side types and mappings the stream
//! decoder shares: content blocks, usage, errors, stop reasons.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::EMPTY_OBJECT;
use crate::error::GatewayError;
use crate::wire::Usage;
use crate::wire::chat::{
    Choice, Completion, CompletionMessage, CompletionUsage, FinishReason, ToolCall,
};

/// Turns a non-stream Anthropic response body into an OpenAI `chat.completion` JSON body.
/// `model` is reported unless Anthropic names the model it used.
///
/// # Errors
/// [`GatewayError::UpstreamProtocol`] for a body that is not an Anthropic message; an
/// error envelope in a success body maps like a stream `error` event.
pub fn decode_response(
    body: &[u8],
    model: &str,
    provider: &str,
) -> Result<(Vec<u8>, Option<Usage>), GatewayError> {
    let message: InResponse<'_> = serde_json::from_slice(body)
        .map_err(|e| protocol(provider, format!("body is not an Anthropic message: {e}")))?;
    if message.kind.as_deref() == Some("error") {
        let error = message.error.unwrap_or_default();
        return Err(upstream_error(provider, &error.kind, &error.message));
    }
    let Some(blocks) = message.content else {
        return Err(protocol(provider, "message has no 'content'"));
    };

    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in &blocks {
        match &*block.kind {
            "text" => text.push_str(&block.text),
            "tool_use" => tool_calls.push(ToolCall::function(
                &*block.id,
                &*block.name,
                block.input.map_or(EMPTY_OBJECT, RawValue::get),
            )),
            // Thinking and server-tool blocks have no OpenAI equivalent.
            _ => {}
        }
    }
    let usage = message.usage.map(|u| u.to_openai());
    let content = (!text.is_empty() || tool_calls.is_empty()).then_some(Cow::Owned(text));
    let mut completion = Completion::new(
        completion_id(message.id.as_deref()),
        now_secs(),
        message
            .model
            .as_deref()
            .filter(|m| !m.is_empty())
            .unwrap_or(model),
        vec![Choice {
            index: 0,
            message: CompletionMessage {
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                ..CompletionMessage::new(content)
            },
            logprobs: None,
            finish_reason: Some(finish_reason(
                message.stop_reason.as_deref().unwrap_or("end_turn"),
            )),
        }],
    );
    completion.usage = usage.map(CompletionUsage::from);
    let json = serde_json::to_vec(&completion)
        .map_err(|e| GatewayError::Internal(format!("encoding the completion: {e}")))?;
    Ok((json, usage))
}

/// Reads an Anthropic error body `{"type":"error","error":{"type":..,"message":..}}` into
/// (error type, message); `None` if the body is not that shape.
pub fn decode_error(body: &[u8]) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(rename = "type")]
        kind: Option<String>,
        error: Option<InError>,
    }
    let envelope = serde_json::from_slice::<Envelope>(body).ok()?;
    if envelope.kind.as_deref().is_some_and(|k| k != "error") {
        return None;
    }
    let error = envelope.error?;
    if error.kind.is_empty() && error.message.is_empty() {
        return None;
    }
    Some((error.kind, error.message))
}

/// OpenAI's `finish_reason` for an Anthropic `stop_reason`.
pub(super) fn finish_reason(stop_reason: &str) -> FinishReason {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        // end_turn, stop_sequence, pause_turn and anything newer.
        _ => FinishReason::Stop,
    }
}

/// An Anthropic `error` (in a stream or a body) as the gateway error the client sees.
pub(super) fn upstream_error(provider: &str, kind: &str, message: &str) -> GatewayError {
    match kind {
        "overloaded_error" | "rate_limit_error" => GatewayError::UpstreamRateLimited {
            provider: provider.to_owned(),
            message: format!("{kind}: {message}"),
            retry_after: None,
        },
        _ => GatewayError::UpstreamFailed {
            provider: provider.to_owned(),
            status: None,
            message: format!("{kind}: {message}"),
        },
    }
}

pub(super) fn protocol(provider: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::UpstreamProtocol {
        provider: provider.to_owned(),
        message: message.into(),
    }
}

fn completion_id(anthropic_id: Option<&str>) -> String {
    match anthropic_id {
        Some(id) if !id.is_empty() => format!("chatcmpl-{id}"),
        _ => format!("chatcmpl-{:016x}", rand::random::<u64>()),
    }
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Deserialize)]
struct InResponse<'a> {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default, borrow)]
    content: Option<Vec<InBlock<'a>>>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<InUsage>,
    #[serde(default)]
    error: Option<InError>,
}

/// A content block of a response, or of a stream's `content_block_start`.
#[derive(Deserialize)]
pub(super) struct InBlock<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub text: Cow<'a, str>,
    #[serde(default, borrow)]
    pub id: Cow<'a, str>,
    #[serde(default, borrow)]
    pub name: Cow<'a, str>,
    #[serde(default, borrow)]
    pub input: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
pub(super) struct InError {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
}

/// Anthropic usage. Every field is optional: a stream's `message_delta` may carry only
/// `output_tokens`.
#[derive(Deserialize, Default, Clone, Copy)]
pub(super) struct InUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl InUsage {
    /// Anthropic counts cache writes and reads apart from `input_tokens`; OpenAI's
    /// `prompt_tokens` includes cached tokens, so all three are summed.
    pub fn to_openai(self) -> Usage {
        // Saturating: the figures come from outside and must not overflow.
        let prompt_tokens = self
            .input_tokens
            .unwrap_or(0)
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0));
        let completion_tokens = self.output_tokens.unwrap_or(0);
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }

    /// Takes the fields `newer` reports (stream counts are cumulative).
    pub fn update(&mut self, newer: InUsage) {
        self.input_tokens = newer.input_tokens.or(self.input_tokens);
        self.output_tokens = newer.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = newer
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = newer
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
    }
}
