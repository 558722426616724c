//! The Anthropic Messages API, spoken to providers of kind `anthropic`.
//!
//! Clients always talk OpenAI chat completions to Switchyard. When a route resolves to an
//! Anthropic deployment, [`super::Provider::chat`] calls [`encode_request`] to turn the
//! OpenAI request into a `POST /v1/messages` body, then either [`decode_response`] to turn
//! the whole answer back into a `chat.completion`, or feeds every upstream SSE event to a
//! [`StreamDecoder`] that emits `chat.completion.chunk` events (ending with `[DONE]`).
//! Upstream error bodies are read with [`decode_error`].
//!
//! Parsing borrows from the request and response bytes wherever it can: message text,
//! base64 image data and tool schemas are copied once, into the outgoing body, and
//! never built into a `serde_json::Value` tree.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::GatewayError;
use crate::wire::sse::{DONE, Event, data_event};
use crate::wire::{ChatRequest, Usage};

/// `input_schema` for a function declared without `parameters`.
const EMPTY_SCHEMA: &str = r#"{"type":"object","properties":{}}"#;

/// Appended to `system` for `response_format: {"type":"json_object"}`.
const JSON_OBJECT_INSTRUCTION: &str = "Respond only with a single valid JSON object. \
     Do not wrap it in Markdown code fences and do not write anything before or after it.";

/// Appended to `system` (followed by the schema) for `response_format: {"type":"json_schema"}`.
const JSON_SCHEMA_INSTRUCTION: &str = "Respond only with a single valid JSON value that \
     conforms to the JSON Schema below. Do not wrap it in Markdown code fences and do not \
     write anything before or after it.\nJSON Schema:\n";

// ---------------------------------------------------------------------------------------
// Request: OpenAI chat completions -> Anthropic Messages
// ---------------------------------------------------------------------------------------

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
    let messages: Vec<InMessage<'_>> = serde_json::from_str(raw_messages)
        .map_err(|e| GatewayError::invalid(format!("Invalid 'messages': {e}"), Some("messages")))?;

    let mut system = String::new();
    let mut out: Vec<OutMessage<'_>> = Vec::with_capacity(messages.len());
    for (i, message) in messages.into_iter().enumerate() {
        match &*message.role {
            "system" | "developer" => {
                for text in content_texts(message.content, i)? {
                    push_paragraph(&mut system, &text);
                }
            }
            "user" => {
                let content = match message.content {
                    InContent::Text(text) => OutContent::Text(text),
                    InContent::Parts(parts) => OutContent::Blocks(parts_to_blocks(parts, i)?),
                    InContent::Null => OutContent::Text(Cow::Borrowed("")),
                };
                push_message(&mut out, "user", content);
            }
            "assistant" => {
                let mut content = match message.content {
                    InContent::Text(text) => OutContent::Text(text),
                    InContent::Parts(parts) => OutContent::Blocks(parts_to_blocks(parts, i)?),
                    InContent::Null => OutContent::Blocks(Vec::new()),
                };
                let tool_calls = message.tool_calls.unwrap_or_default();
                if !tool_calls.is_empty() {
                    let blocks = content.blocks_mut();
                    for call in tool_calls {
                        blocks.push(tool_use_block(call, i)?);
                    }
                }
                // An assistant turn with nothing in it (content null, no tool calls) would be
                // refused by Anthropic; it carries no information, so it is dropped.
                if !content.is_empty() {
                    push_message(&mut out, "assistant", content);
                }
            }
            "tool" => {
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
                    OutContent::Blocks(vec![Block::ToolResult {
                        tool_use_id,
                        content,
                    }]),
                );
            }
            other => {
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
    if let Some(format) = object.get::<InResponseFormat>("response_format")? {
        match format.kind.as_str() {
            "text" => {}
            "json_object" => push_paragraph(&mut system, JSON_OBJECT_INSTRUCTION),
            "json_schema" => {
                push_paragraph(&mut system, JSON_SCHEMA_INSTRUCTION);
                match format.json_schema.and_then(|s| s.schema) {
                    Some(schema) => system.push_str(schema.get()),
                    None => system.push_str(EMPTY_SCHEMA),
                }
            }
            other => {
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
        let mut choice = match object.get::<serde_json::Value>("tool_choice")? {
            None => None,
            Some(value) => Some(encode_tool_choice(&value)?),
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
    let stop_sequences = match object.get::<Stop>("stop")? {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };

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
fn push_message<'a>(out: &mut Vec<OutMessage<'a>>, role: &'static str, content: OutContent<'a>) {
    match out.last_mut() {
        Some(last) if last.role == role => {
            let blocks = content.into_blocks();
            last.content.blocks_mut().extend(blocks);
        }
        _ => out.push(OutMessage { role, content }),
    }
}

/// The texts of a system, developer or tool message (a string or text parts).
fn content_texts(content: InContent<'_>, i: usize) -> Result<Vec<Cow<'_, str>>, GatewayError> {
    match content {
        InContent::Null => Ok(Vec::new()),
        InContent::Text(text) => Ok(vec![text]),
        InContent::Parts(parts) => parts
            .into_iter()
            .map(|part| match &*part.kind {
                "text" => Ok(part.text),
                other => Err(GatewayError::invalid(
                    format!(
                        "Invalid 'messages[{i}].content': content parts of type '{other}' are \
                         only supported in user messages."
                    ),
                    Some("messages"),
                )),
            })
            .collect(),
    }
}

/// Converts user or assistant content parts into Anthropic content blocks.
fn parts_to_blocks(parts: Vec<InPart<'_>>, i: usize) -> Result<Vec<Block<'_>>, GatewayError> {
    let mut blocks = Vec::with_capacity(parts.len());
    for part in parts {
        match &*part.kind {
            // Anthropic refuses empty text blocks; an empty part carries nothing anyway.
            "text" if part.text.is_empty() => {}
            "text" => blocks.push(Block::Text { text: part.text }),
            // An assistant refusal sent back as history is plain text to Anthropic.
            "refusal" if part.refusal.is_empty() => {}
            "refusal" => blocks.push(Block::Text { text: part.refusal }),
            "image_url" => {
                let url = part.image_url.ok_or_else(|| {
                    GatewayError::invalid(
                        format!("Invalid 'messages[{i}].content': an 'image_url' part needs an 'image_url' object."),
                        Some("messages"),
                    )
                })?;
                blocks.push(Block::Image {
                    source: image_source(url.url, i)?,
                });
            }
            other => {
                return Err(GatewayError::invalid(
                    format!(
                        "Invalid 'messages[{i}].content': content parts of type '{other}' are \
                         not supported by Anthropic models."
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
fn tool_use_block(call: InToolCall<'_>, i: usize) -> Result<Block<'_>, GatewayError> {
    let arguments = call.function.arguments.trim();
    let input = if arguments.is_empty() {
        RawValue::from_string(EMPTY_OBJECT.to_owned())
    } else if arguments.starts_with('{') {
        RawValue::from_string(arguments.to_owned())
    } else {
        return Err(bad_arguments(
            i,
            &call.function.name,
            "expected a JSON object",
        ));
    }
    .map_err(|e| bad_arguments(i, &call.function.name, &e.to_string()))?;
    Ok(Block::ToolUse {
        id: call.id,
        name: call.function.name,
        input,
    })
}

const EMPTY_OBJECT: &str = "{}";

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
    let tools: Vec<InTool<'_>> = serde_json::from_str(raw)
        .map_err(|e| GatewayError::invalid(format!("Invalid 'tools': {e}"), Some("tools")))?;
    let empty_schema: &'static RawValue = serde_json::from_str(EMPTY_SCHEMA)
        .map_err(|e| GatewayError::Internal(format!("empty tool schema: {e}")))?;
    tools
        .into_iter()
        .enumerate()
        .map(|(i, tool)| match (&*tool.kind, tool.function) {
            ("function", Some(function)) => Ok(OutTool {
                name: function.name,
                description: function.description,
                input_schema: function.parameters.unwrap_or(empty_schema),
            }),
            ("function", None) => Err(GatewayError::invalid(
                format!("Invalid 'tools[{i}]': a function tool needs a 'function' object."),
                Some("tools"),
            )),
            (other, _) => Err(GatewayError::invalid(
                format!(
                    "Invalid 'tools[{i}].type': '{other}' tools are not supported by Anthropic \
                     models; only 'function' tools are."
                ),
                Some("tools"),
            )),
        })
        .collect()
}

/// OpenAI `tool_choice` as Anthropic's.
fn encode_tool_choice(value: &serde_json::Value) -> Result<OutToolChoice, GatewayError> {
    let named = || {
        let object = value.as_object()?;
        if object.get("type")?.as_str()? != "function" {
            return None;
        }
        object.get("function")?.get("name")?.as_str()
    };
    match value.as_str() {
        Some("auto") => Ok(OutToolChoice::of("auto")),
        Some("required") => Ok(OutToolChoice::of("any")),
        Some("none") => Ok(OutToolChoice::of("none")),
        _ => match named() {
            Some(name) => Ok(OutToolChoice {
                name: Some(name.to_owned()),
                ..OutToolChoice::of("tool")
            }),
            None => Err(GatewayError::invalid(
                "Invalid 'tool_choice': expected 'none', 'auto', 'required' or \
                 {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                Some("tool_choice"),
            )),
        },
    }
}

/// One OpenAI message, borrowing its strings from the request body.
#[derive(Deserialize)]
struct InMessage<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(default, borrow)]
    content: InContent<'a>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<InToolCall<'a>>>,
    #[serde(default, borrow)]
    tool_call_id: Option<Cow<'a, str>>,
}

/// Message content: a string, an array of parts, or null/absent.
#[derive(Default)]
enum InContent<'a> {
    #[default]
    Null,
    Text(Cow<'a, str>),
    Parts(Vec<InPart<'a>>),
}

// Hand-written rather than `#[serde(untagged)]`, which would buffer every part (and its
// base64 image data) into an intermediate tree before trying each variant.
impl<'de: 'a, 'a> Deserialize<'de> for InContent<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ContentVisitor<'a> {
            type Value = InContent<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of content parts or null")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(InContent::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(InContent::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(InContent::Text(Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(InContent::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(InContent::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(2));
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(InContent::Parts(parts))
            }
        }
        deserializer.deserialize_any(ContentVisitor(PhantomData))
    }
}

#[derive(Deserialize)]
struct InPart<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Cow<'a, str>,
    #[serde(default, borrow)]
    refusal: Cow<'a, str>,
    #[serde(default, borrow)]
    image_url: Option<InImageUrl<'a>>,
}

#[derive(Deserialize)]
struct InImageUrl<'a> {
    #[serde(borrow)]
    url: Cow<'a, str>,
}

#[derive(Deserialize)]
struct InToolCall<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    function: InFunctionCall<'a>,
}

#[derive(Deserialize)]
struct InFunctionCall<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    arguments: Cow<'a, str>,
}

#[derive(Deserialize)]
struct InTool<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    function: Option<InFunction<'a>>,
}

#[derive(Deserialize)]
struct InFunction<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    description: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    parameters: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct InResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<InJsonSchema>,
}

#[derive(Deserialize)]
struct InJsonSchema {
    #[serde(default)]
    schema: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
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
    content: OutContent<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutContent<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<Block<'a>>),
}

impl<'a> OutContent<'a> {
    fn is_empty(&self) -> bool {
        match self {
            OutContent::Text(text) => text.is_empty(),
            OutContent::Blocks(blocks) => blocks.is_empty(),
        }
    }

    fn into_blocks(self) -> Vec<Block<'a>> {
        match self {
            OutContent::Text(text) if text.is_empty() => Vec::new(),
            OutContent::Text(text) => vec![Block::Text { text }],
            OutContent::Blocks(blocks) => blocks,
        }
    }

    /// The content as blocks, converting a plain string in place.
    fn blocks_mut(&mut self) -> &mut Vec<Block<'a>> {
        if let OutContent::Text(_) = self {
            let text = std::mem::replace(self, OutContent::Blocks(Vec::new()));
            *self = OutContent::Blocks(text.into_blocks());
        }
        match self {
            OutContent::Blocks(blocks) => blocks,
            // Unreachable: converted just above.
            OutContent::Text(_) => unreachable!("content was converted to blocks"),
        }
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

// ---------------------------------------------------------------------------------------
// Response: Anthropic message -> OpenAI chat.completion
// ---------------------------------------------------------------------------------------

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
            "tool_use" => tool_calls.push(OutToolCall {
                id: &block.id,
                kind: "function",
                function: OutFunctionCall {
                    name: &block.name,
                    arguments: block.input.map_or(EMPTY_OBJECT, RawValue::get),
                },
            }),
            // Thinking and server-tool blocks have no OpenAI equivalent.
            _ => {}
        }
    }
    let usage = message.usage.map(|u| u.to_openai());
    let id = completion_id(message.id.as_deref());
    let completion = Completion {
        id: &id,
        object: "chat.completion",
        created: now_secs(),
        model: message
            .model
            .as_deref()
            .filter(|m| !m.is_empty())
            .unwrap_or(model),
        choices: [CompletionChoice {
            index: 0,
            message: CompletionMessage {
                role: "assistant",
                content: (!text.is_empty() || tool_calls.is_empty()).then_some(text.as_str()),
                refusal: None,
                tool_calls,
            },
            logprobs: None,
            finish_reason: finish_reason(message.stop_reason.as_deref().unwrap_or("end_turn")),
        }],
        usage,
    };
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
fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and anything newer.
        _ => "stop",
    }
}

/// An Anthropic `error` (in a stream or a body) as the gateway error the client sees.
fn upstream_error(provider: &str, kind: &str, message: &str) -> GatewayError {
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

fn protocol(provider: &str, message: impl Into<String>) -> GatewayError {
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

fn now_secs() -> u64 {
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
struct InBlock<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Cow<'a, str>,
    #[serde(default, borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    input: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct InError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Anthropic usage. Every field is optional: a stream's `message_delta` may carry only
/// `output_tokens`.
#[derive(Deserialize, Default, Clone, Copy)]
struct InUsage {
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
    fn to_openai(self) -> Usage {
        let prompt_tokens = self.input_tokens.unwrap_or(0)
            + self.cache_creation_input_tokens.unwrap_or(0)
            + self.cache_read_input_tokens.unwrap_or(0);
        let completion_tokens = self.output_tokens.unwrap_or(0);
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }

    /// Takes the fields `newer` reports (stream counts are cumulative).
    fn update(&mut self, newer: InUsage) {
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

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: CompletionMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct CompletionMessage<'a> {
    role: &'static str,
    content: Option<&'a str>,
    refusal: Option<()>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutToolCall<'a>>,
}

#[derive(Serialize)]
struct OutToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutFunctionCall<'a>,
}

#[derive(Serialize)]
struct OutFunctionCall<'a> {
    name: &'a str,
    arguments: &'a str,
}

// ---------------------------------------------------------------------------------------
// Stream: Anthropic events -> OpenAI chat.completion.chunk events
// ---------------------------------------------------------------------------------------

/// Translates Anthropic stream events into OpenAI `chat.completion.chunk` SSE events.
///
/// One decoder per upstream stream. Anthropic numbers content blocks across text and
/// tool use; OpenAI numbers tool calls alone, so tool blocks are re-indexed from 0.
pub struct StreamDecoder {
    /// `chatcmpl-` + the Anthropic message id, once `message_start` is seen.
    id: String,
    model: String,
    created: u64,
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
        match &*ev.kind {
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
                    "text" if !block.text.is_empty() => self.emit(
                        out,
                        ChunkDelta {
                            content: Some(&block.text),
                            ..ChunkDelta::default()
                        },
                        None,
                    )?,
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
                    "text_delta" if !delta.text.is_empty() => self.emit(
                        out,
                        ChunkDelta {
                            content: Some(&delta.text),
                            ..ChunkDelta::default()
                        },
                        None,
                    )?,
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
                    self.emit(out, ChunkDelta::default(), Some(finish_reason(&stop)))?;
                    self.finish_sent = true;
                }
            }
            "message_stop" => {
                self.start(out)?;
                if !self.finish_sent {
                    self.emit(out, ChunkDelta::default(), Some("stop"))?;
                    self.finish_sent = true;
                }
                if self.include_usage {
                    let usage = self.usage().unwrap_or_default();
                    self.push_chunk(out, &[], Some(Some(usage)))?;
                }
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
                ChunkDelta {
                    role: Some("assistant"),
                    content: Some(""),
                    ..ChunkDelta::default()
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
            index: k,
            id: head.map(|(id, _)| id),
            kind: head.map(|_| "function"),
            function: FunctionDelta {
                name: head.map(|(_, name)| name),
                arguments,
            },
        };
        self.emit(
            out,
            ChunkDelta {
                tool_calls: Some([call]),
                ..ChunkDelta::default()
            },
            None,
        )
    }

    /// One chunk with a single choice.
    fn emit(
        &self,
        out: &mut VecDeque<Bytes>,
        delta: ChunkDelta<'_>,
        finish_reason: Option<&'static str>,
    ) -> Result<(), GatewayError> {
        let choice = [ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }];
        // OpenAI sends `"usage": null` on every chunk but the last when usage was asked for.
        self.push_chunk(out, &choice, self.include_usage.then_some(None))
    }

    fn push_chunk(
        &self,
        out: &mut VecDeque<Bytes>,
        choices: &[ChunkChoice<'_>],
        usage: Option<Option<Usage>>,
    ) -> Result<(), GatewayError> {
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
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
    #[serde(rename = "type", borrow)]
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

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    /// Absent unless the client asked for usage; then `null` until the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: ChunkDelta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct ChunkDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}
