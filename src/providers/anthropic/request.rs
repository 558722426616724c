//! OpenAI chat request → Anthropic Messages request ([`encode_request`]).
//!
//! System and developer messages become `system`; user, assistant and tool messages become
//! alternating user and assistant turns (tool results ride in user turns); tools,
//! `tool_choice`, sampling and limits are mapped, and `response_format` becomes a system
//! instruction. The OpenAI side is read with the typed [`crate::wire::chat`] request types,
//! borrowing from the request body: message text, base64 image data and tool schemas are
//! copied once, into the outgoing body.

use std::borrow::Cow;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::EMPTY_OBJECT;
use crate::error::GatewayError;
use crate::wire::chat::{
    Content, ContentPart, Message, ResponseFormat, Role, Stop, Tool, ToolCall, ToolChoice,
};
use crate::wire::{ChatRequest, JsonObject};

/// `input_schema` for a function declared without `parameters`.
const EMPTY_SCHEMA: &str = r#"{"type":"object","properties":{}}"#;

/// Appended to `system` for `response_format: {"type":"json_object"}`.
const JSON_OBJECT_INSTRUCTION: &str = "Respond only with a single valid JSON object. \
     Do not wrap it in Markdown code fences and do not write anything before or after it.";

/// Appended to `system` (followed by the schema) for `response_format: {"type":"json_schema"}`.
const JSON_SCHEMA_INSTRUCTION: &str = "Respond only with a single valid JSON value that \
     conforms to the JSON Schema below. Do not wrap it in Markdown code fences and do not \
     write anything before or after it.\nJSON Schema:\n";

/// Builds the Anthropic Messages request body from an OpenAI chat request.
///
/// # Errors
/// 400 ([`GatewayError::InvalidRequest`]) for what Anthropic cannot express (`n` > 1,
/// unsupported content parts or tool types) or malformed messages, tools or tool calls.
pub fn encode_request(
    req: &ChatRequest,
    upstream_model: &str,
    default_max_tokens: u32,
) -> Result<Vec<u8>, GatewayError> {
    let object = &req.object;
    if let Some(n) = object.get::<u64>("n")?
        && n > 1
    {
        return Err(GatewayError::invalid(
            format!("Invalid 'n': {n}. Anthropic models return a single choice; 'n' must be 1."),
            Some("n"),
        ));
    }

    let raw_messages = object.raw("messages").ok_or_else(|| {
        GatewayError::invalid("Missing required parameter: 'messages'.", Some("messages"))
    })?;
    let messages: Vec<Message<'_>> = serde_json::from_str(raw_messages)
        .map_err(|e| GatewayError::invalid(format!("Invalid 'messages': {e}"), Some("messages")))?;

    let mut system = String::new();
    let mut out: Vec<OutMessage<'_>> = Vec::with_capacity(messages.len());
    for (i, message) in messages.into_iter().enumerate() {
        match message.role {
            Role::System | Role::Developer => {
                for text in content_texts(message.content, i)? {
                    push_paragraph(&mut system, &text);
                }
            }
            Role::User => {
                let content = match message.content {
                    Content::Text(text) => text_blocks(text),
                    Content::Parts(parts) => parts_to_blocks(parts, i)?,
                    Content::Null => Vec::new(),
                };
                push_message(&mut out, "user", content);
            }
            Role::Assistant => {
                let mut content = match message.content {
                    Content::Text(text) => text_blocks(text),
                    Content::Parts(parts) => parts_to_blocks(parts, i)?,
                    Content::Null => Vec::new(),
                };
                for call in message.tool_calls.unwrap_or_default() {
                    content.push(tool_use_block(call, i)?);
                }
                // An assistant turn with nothing in it (content null, no tool calls) would be
                // refused by Anthropic; it carries no information, so it is dropped.
                if !content.is_empty() {
                    push_message(&mut out, "assistant", content);
                }
            }
            Role::Tool => {
                let tool_use_id = message.tool_call_id.ok_or_else(|| {
                    GatewayError::invalid(
                        format!(
                            "Invalid 'messages[{i}]': a 'tool' message needs a 'tool_call_id'."
                        ),
                        Some("messages"),
                    )
                })?;
                let mut texts = content_texts(message.content, i)?.into_iter();
                let content = match (texts.next(), texts.next()) {
                    (None, _) => Cow::Borrowed(""),
                    (Some(only), None) => only,
                    (Some(first), Some(second)) => {
                        let mut joined = first.into_owned();
                        for text in std::iter::once(second).chain(texts) {
                            push_paragraph(&mut joined, &text);
                        }
                        Cow::Owned(joined)
                    }
                };
                // Anthropic wants tool results in a user turn; consecutive tool messages (the
                // answers to parallel calls) and a following user message merge into one.
                push_message(
                    &mut out,
                    "user",
                    vec![Block::ToolResult {
                        tool_use_id,
                        content,
                    }],
                );
            }
            other @ (Role::Function | Role::Other(_)) => {
                return Err(GatewayError::invalid(
                    format!(
                        "Invalid 'messages[{i}].role': '{other}' is not supported; expected \
                         'system', 'developer', 'user', 'assistant' or 'tool'."
                    ),
                    Some("messages"),
                ));
            }
        }
    }

    // Anthropic has no portable JSON mode (structured outputs are a beta limited to some
    // models, and forcing a tool call would change the response shape the client sees), so
    // `response_format` is not forwarded: the JSON requirement, and the schema when there is
    // one, is appended to the system prompt instead. The reply stays an ordinary text
    // message, which is what the client expects from OpenAI's JSON modes.
    if let Some(format) = borrowed::<ResponseFormat<'_>>(object, "response_format")? {
        match format {
            ResponseFormat::Text => {}
            ResponseFormat::JsonObject => push_paragraph(&mut system, JSON_OBJECT_INSTRUCTION),
            ResponseFormat::JsonSchema { json_schema } => {
                push_paragraph(&mut system, JSON_SCHEMA_INSTRUCTION);
                match json_schema.schema {
                    Some(schema) => system.push_str(schema.get()),
                    None => system.push_str(EMPTY_SCHEMA),
                }
            }
            ResponseFormat::Other { kind: other } => {
                return Err(GatewayError::invalid(
                    format!(
                        "Invalid 'response_format.type': '{other}'; expected 'text', \
                         'json_object' or 'json_schema'."
                    ),
                    Some("response_format"),
                ));
            }
        }
    }

    let tools = encode_tools(object.raw("tools"))?;
    let tool_choice = if tools.is_empty() {
        // Anthropic refuses a tool_choice without tools; without tools it means nothing.
        None
    } else {
        let mut choice = match object.raw("tool_choice").filter(|raw| *raw != "null") {
            None => None,
            Some(raw) => Some(encode_tool_choice(raw)?),
        };
        if object.get::<bool>("parallel_tool_calls")? == Some(false) {
            let choice = choice.get_or_insert(OutToolChoice::of("auto"));
            if choice.kind != "none" {
                choice.disable_parallel_tool_use = Some(true);
            }
        }
        choice
    };

    let max_tokens = match object.get::<u64>("max_completion_tokens")? {
        Some(n) => n,
        None => object
            .get::<u64>("max_tokens")?
            .unwrap_or(u64::from(default_max_tokens)),
    };
    let stop_sequences = object
        .get::<Stop>("stop")?
        .map(Stop::into_vec)
        .unwrap_or_default();

    let body = OutRequest {
        model: upstream_model,
        max_tokens,
        system,
        messages: out,
        temperature: object.get("temperature")?,
        top_p: object.get("top_p")?,
        stop_sequences,
        stream: req.stream,
        metadata: object
            .get::<String>("user")?
            .map(|user_id| Metadata { user_id }),
        tools,
        tool_choice,
    };
    serde_json::to_vec(&body)
        .map_err(|e| GatewayError::Internal(format!("encoding the Anthropic request: {e}")))
}

/// Deserialises one field borrowing from the body; `Ok(None)` when absent or `null`.
///
/// # Errors
/// 400 naming `key` when the field has the wrong shape.
fn borrowed<'a, T: Deserialize<'a>>(
    object: &'a JsonObject,
    key: &'static str,
) -> Result<Option<T>, GatewayError> {
    match object.raw(key) {
        None | Some("null") => Ok(None),
        Some(raw) => serde_json::from_str(raw).map(Some).map_err(|e| {
            GatewayError::invalid(format!("Invalid value for '{key}': {e}"), Some(key))
        }),
    }
}

/// Appends `text` to `buf` as a new paragraph (separated by a blank line).
fn push_paragraph(buf: &mut String, text: &str) {
    if text.is_empty() {
        return;
    }
    if !buf.is_empty() {
        buf.push_str("\n\n");
    }
    buf.push_str(text);
}

/// Appends a message, merging it into the previous one when the role repeats (Anthropic
/// requires user and assistant turns to alternate).
fn push_message<'a>(out: &mut Vec<OutMessage<'a>>, role: &'static str, content: Vec<Block<'a>>) {
    match out.last_mut() {
        Some(last) if last.role == role => last.content.extend(content),
        _ => out.push(OutMessage { role, content }),
    }
}

/// The texts of a system, developer or tool message (a string or text parts).
fn content_texts(content: Content<'_>, i: usize) -> Result<Vec<Cow<'_, str>>, GatewayError> {
    match content {
        Content::Null => Ok(Vec::new()),
        Content::Text(text) => Ok(vec![text]),
        Content::Parts(parts) => parts
            .into_iter()
            .map(|part| match part {
                ContentPart::Text { text } => Ok(text),
                other => Err(GatewayError::invalid(
                    format!(
                        "Invalid 'messages[{i}].content': content parts of type '{}' are \
                         only supported in user messages.",
                        other.kind()
                    ),
                    Some("messages"),
                )),
            })
            .collect(),
    }
}

/// Converts user or assistant content parts into Anthropic content blocks.
fn parts_to_blocks(parts: Vec<ContentPart<'_>>, i: usize) -> Result<Vec<Block<'_>>, GatewayError> {
    let mut blocks = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            // Anthropic refuses empty text blocks; an empty part carries nothing anyway.
            ContentPart::Text { text } if text.is_empty() => {}
            ContentPart::Text { text } => blocks.push(Block::Text { text }),
            // An assistant refusal sent back as history is plain text to Anthropic.
            ContentPart::Refusal { refusal } if refusal.is_empty() => {}
            ContentPart::Refusal { refusal } => blocks.push(Block::Text { text: refusal }),
            ContentPart::ImageUrl { image_url } => blocks.push(Block::Image {
                source: image_source(image_url.url, i)?,
            }),
            other => {
                return Err(GatewayError::invalid(
                    format!(
                        "Invalid 'messages[{i}].content': content parts of type '{}' are \
                         not supported by Anthropic models.",
                        other.kind()
                    ),
                    Some("messages"),
                ));
            }
        }
    }
    Ok(blocks)
}

/// `data:<media type>;base64,<data>` becomes a base64 source, anything else a URL source.
fn image_source(url: Cow<'_, str>, i: usize) -> Result<ImageSource<'_>, GatewayError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Ok(ImageSource::Url { url });
    };
    let parsed = rest.split_once(',').and_then(|(meta, _)| {
        meta.strip_suffix(";base64")
            .map(|mt| (mt.len(), meta.len()))
    });
    let Some((media_type_len, meta_len)) = parsed else {
        return Err(GatewayError::invalid(
            format!(
                "Invalid 'messages[{i}].content': image data URLs must be base64 encoded \
                 ('data:<media type>;base64,<data>')."
            ),
            Some("messages"),
        ));
    };
    let start = "data:".len();
    Ok(ImageSource::Base64 {
        media_type: sub_cow(&url, start..start + media_type_len),
        data: sub_cow(&url, start + meta_len + 1..url.len()),
    })
}

/// A slice of a `Cow`, still borrowing from the original input when the `Cow` does.
fn sub_cow<'a>(s: &Cow<'a, str>, range: Range<usize>) -> Cow<'a, str> {
    match s {
        Cow::Borrowed(b) => {
            let b: &'a str = b;
            Cow::Borrowed(&b[range])
        }
        Cow::Owned(o) => Cow::Owned(o[range].to_owned()),
    }
}

/// An assistant `tool_calls` entry as a `tool_use` block; the arguments must be a JSON
/// object (empty arguments mean `{}`).
fn tool_use_block(call: ToolCall<'_>, i: usize) -> Result<Block<'_>, GatewayError> {
    let (id, function) = match call {
        ToolCall::Function { id, function } => (id, function),
        ToolCall::Custom { custom, .. } => {
            return Err(GatewayError::invalid(
                format!(
                    "Invalid 'messages[{i}].tool_calls': the call to custom tool '{}' cannot \
                     be sent to Anthropic models; only function calls can.",
                    custom.name
                ),
                Some("messages"),
            ));
        }
    };
    let arguments = function.arguments.trim();
    let input = if arguments.is_empty() {
        RawValue::from_string(EMPTY_OBJECT.to_owned())
    } else if arguments.starts_with('{') {
        RawValue::from_string(arguments.to_owned())
    } else {
        return Err(bad_arguments(i, &function.name, "expected a JSON object"));
    }
    .map_err(|e| bad_arguments(i, &function.name, &e.to_string()))?;
    Ok(Block::ToolUse {
        id,
        name: function.name,
        input,
    })
}

fn bad_arguments(i: usize, name: &str, why: &str) -> GatewayError {
    GatewayError::invalid(
        format!(
            "Invalid 'messages[{i}].tool_calls': the arguments of the call to '{name}' are not \
             a valid JSON object ({why})."
        ),
        Some("messages"),
    )
}

/// OpenAI function tools as Anthropic tools.
fn encode_tools(raw: Option<&str>) -> Result<Vec<OutTool<'_>>, GatewayError> {
    let Some(raw) = raw.filter(|r| *r != "null") else {
        return Ok(Vec::new());
    };
    let tools: Vec<Tool<'_>> = serde_json::from_str(raw)
        .map_err(|e| GatewayError::invalid(format!("Invalid 'tools': {e}"), Some("tools")))?;
    let empty_schema: &'static RawValue = serde_json::from_str(EMPTY_SCHEMA)
        .map_err(|e| GatewayError::Internal(format!("empty tool schema: {e}")))?;
    tools
        .into_iter()
        .enumerate()
        .map(|(i, tool)| match tool {
            Tool::Function { function } => Ok(OutTool {
                name: function.name,
                description: function.description,
                input_schema: function.parameters.unwrap_or(empty_schema),
            }),
            other => Err(GatewayError::invalid(
                format!(
                    "Invalid 'tools[{i}].type': '{}' tools are not supported by Anthropic \
                     models; only 'function' tools are.",
                    other.kind()
                ),
                Some("tools"),
            )),
        })
        .collect()
}

/// OpenAI `tool_choice` as Anthropic's.
fn encode_tool_choice(raw: &str) -> Result<OutToolChoice, GatewayError> {
    let invalid = || {
        GatewayError::invalid(
            "Invalid 'tool_choice': expected 'none', 'auto', 'required' or \
             {\"type\": \"function\", \"function\": {\"name\": ...}}.",
            Some("tool_choice"),
        )
    };
    match serde_json::from_str::<ToolChoice<'_>>(raw).map_err(|_| invalid())? {
        ToolChoice::Auto => Ok(OutToolChoice::of("auto")),
        ToolChoice::Required => Ok(OutToolChoice::of("any")),
        ToolChoice::None => Ok(OutToolChoice::of("none")),
        ToolChoice::Function { name } => Ok(OutToolChoice {
            name: Some(name.into_owned()),
            ..OutToolChoice::of("tool")
        }),
        // Custom tools are refused with the tools; Anthropic has no allowed-tools subset.
        ToolChoice::Custom { .. } | ToolChoice::AllowedTools(_) => Err(invalid()),
    }
}

#[derive(Serialize)]
struct OutRequest<'a> {
    model: &'a str,
    max_tokens: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    system: String,
    messages: Vec<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "is_false")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<OutToolChoice>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
struct Metadata {
    user_id: String,
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    #[serde(serialize_with = "string_or_blocks")]
    content: Vec<Block<'a>>,
}

/// A lone text block is sent as a plain string, as the client most likely wrote it.
fn string_or_blocks<S: serde::Serializer>(blocks: &[Block<'_>], s: S) -> Result<S::Ok, S::Error> {
    match blocks {
        [Block::Text { text }] => s.serialize_str(text),
        _ => s.collect_seq(blocks),
    }
}

/// A text block, unless the text is empty (Anthropic refuses empty text blocks).
fn text_blocks(text: Cow<'_, str>) -> Vec<Block<'_>> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![Block::Text { text }]
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: Cow<'a, str>,
    },
    Image {
        source: ImageSource<'a>,
    },
    ToolUse {
        id: Cow<'a, str>,
        name: Cow<'a, str>,
        input: Box<RawValue>,
    },
    ToolResult {
        tool_use_id: Cow<'a, str>,
        #[serde(skip_serializing_if = "str::is_empty")]
        content: Cow<'a, str>,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource<'a> {
    Base64 {
        media_type: Cow<'a, str>,
        data: Cow<'a, str>,
    },
    Url {
        url: Cow<'a, str>,
    },
}

#[derive(Serialize)]
struct OutTool<'a> {
    name: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<Cow<'a, str>>,
    input_schema: &'a RawValue,
}

#[derive(Serialize)]
struct OutToolChoice {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

impl OutToolChoice {
    fn of(kind: &'static str) -> Self {
        OutToolChoice {
            kind,
            name: None,
            disable_parallel_tool_use: None,
        }
    }
}
