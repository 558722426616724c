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
                    InContent::Text(text) => text_blocks(text),
                    InContent::Parts(parts) => parts_to_blocks(parts, i)?,
                    InContent::Null => Vec::new(),
                };
                push_message(&mut out, "user", content);
            }
            "assistant" => {
                let mut content = match message.content {
                    InContent::Text(text) => text_blocks(text),
                    InContent::Parts(parts) => parts_to_blocks(parts, i)?,
                    InContent::Null => Vec::new(),
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
                    vec![Block::ToolResult {
                        tool_use_id,
                        content,
                    }],
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
fn push_message<'a>(out: &mut Vec<OutMessage<'a>>, role: &'static str, content: Vec<Block<'a>>) {
    match out.last_mut() {
        Some(last) if last.role == role => last.content.extend(content),
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::wire::sse::parse_event;
    use serde_json::{Value, json};

    fn request(body: Value) -> ChatRequest {
        ChatRequest::parse(Bytes::from(serde_json::to_vec(&body).unwrap())).unwrap()
    }

    fn encode(body: Value) -> Value {
        let out = encode_request(&request(body), "claude-up", 1024).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn encode_err(body: Value) -> Option<&'static str> {
        match encode_request(&request(body), "claude-up", 1024) {
            Err(GatewayError::InvalidRequest { param, .. }) => param,
            other => panic!(
                "expected a 400, got {:?}",
                other.map(|b| String::from_utf8(b).unwrap())
            ),
        }
    }

    #[test]
    fn system_is_extracted_and_roles_are_merged() {
        let v = encode(json!({
            "model": "alias",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                {"role": "user", "content": "Hi"},
                {"role": "user", "content": [{"type": "text", "text": "Still there?"}]},
                {"role": "assistant", "content": "Oui."},
                {"role": "assistant", "content": null},
                {"role": "assistant", "content": [{"type": "text", "text": "Bonjour."}]},
                {"role": "user", "content": "Merci"}
            ]
        }));
        assert_eq!(v["model"], "claude-up");
        assert_eq!(v["max_tokens"], 1024);
        assert_eq!(v["system"], "Be brief.\n\nUse French.");
        assert!(v.get("stream").is_none());
        assert_eq!(
            v["messages"],
            json!([
                {"role": "user", "content": [
                    {"type": "text", "text": "Hi"},
                    {"type": "text", "text": "Still there?"}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Oui."},
                    {"type": "text", "text": "Bonjour."}
                ]},
                {"role": "user", "content": "Merci"}
            ])
        );
    }

    #[test]
    fn sampling_and_limits_are_mapped() {
        let v = encode(json!({
            "model": "alias",
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 77, "max_tokens": 5,
            "temperature": 0.3, "top_p": 0.9, "stop": "END", "stream": true,
            "user": "u-42", "n": 1, "logprobs": false, "seed": 7
        }));
        assert_eq!(v["max_tokens"], 77);
        assert_eq!(v["temperature"], 0.3);
        assert_eq!(v["top_p"], 0.9);
        assert_eq!(v["stop_sequences"], json!(["END"]));
        assert_eq!(v["stream"], true);
        assert_eq!(v["metadata"], json!({"user_id": "u-42"}));
        assert!(v.get("seed").is_none() && v.get("n").is_none() && v.get("logprobs").is_none());

        let v = encode(json!({
            "model": "alias", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 5, "stop": ["a", "b"]
        }));
        assert_eq!(v["max_tokens"], 5);
        assert_eq!(v["stop_sequences"], json!(["a", "b"]));
        assert!(v.get("temperature").is_none() && v.get("system").is_none());
    }

    #[test]
    fn n_above_one_is_rejected() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2});
        assert_eq!(encode_err(body), Some("n"));
    }

    #[test]
    fn image_parts_become_image_blocks() {
        let v = encode(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
            ]}]
        }));
        assert_eq!(
            v["messages"][0]["content"],
            json!([
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
            ])
        );
        let bad = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}
        ]}]});
        assert_eq!(encode_err(bad), Some("messages"));
        let audio = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
        ]}]});
        assert_eq!(encode_err(audio), Some("messages"));
    }

    #[test]
    fn tool_calls_and_results_are_encoded() {
        let v = encode(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": ""}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "21C"}]},
                {"role": "user", "content": "Thanks"}
            ],
            "tools": [
                {"type": "function", "function": {"name": "weather", "description": "Weather now",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
                {"type": "function", "function": {"name": "ping"}}
            ],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "parallel_tool_calls": false
        }));
        assert_eq!(
            v["messages"],
            json!([
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "weather", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "21C"},
                    {"type": "text", "text": "Thanks"}
                ]}
            ])
        );
        assert_eq!(
            v["tools"],
            json!([
                {"name": "weather", "description": "Weather now", "input_schema":
                    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                {"name": "ping", "input_schema": {"type": "object", "properties": {}}}
            ])
        );
        assert_eq!(
            v["tool_choice"],
            json!({"type": "tool", "name": "weather", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn tool_choice_strings_are_mapped() {
        for (choice, expected) in [
            (json!("auto"), json!({"type": "auto"})),
            (json!("required"), json!({"type": "any"})),
            (json!("none"), json!({"type": "none"})),
        ] {
            let v = encode(json!({
                "model": "m", "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": choice
            }));
            assert_eq!(v["tool_choice"], expected);
        }
        let v = encode(json!({
            "model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "parallel_tool_calls": false
        }));
        assert_eq!(
            v["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        // Without tools there is nothing to choose from.
        let v = encode(json!({
            "model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"
        }));
        assert!(v.get("tool_choice").is_none() && v.get("tools").is_none());
    }

    #[test]
    fn bad_tool_arguments_and_roles_are_400s() {
        for args in ["[1,2]", "{\"a\":", "not json"] {
            let body = json!({"model": "m", "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}]}
            ]});
            assert_eq!(encode_err(body), Some("messages"), "{args}");
        }
        let body = json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]});
        assert_eq!(encode_err(body), Some("messages"));
        let body = json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]});
        assert_eq!(encode_err(body), Some("messages"));
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "web_search"}]});
        assert_eq!(encode_err(body), Some("tools"));
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"});
        assert_eq!(encode_err(body), Some("tool_choice"));
    }

    #[test]
    fn response_format_becomes_a_system_instruction() {
        let v = encode(json!({
            "model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"}
        }));
        assert!(v.get("response_format").is_none());
        let system = v["system"].as_str().unwrap();
        assert!(system.starts_with("S\n\n") && system.contains("JSON object"));

        let v = encode(json!({
            "model": "m", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "r",
                "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}}
        }));
        let system = v["system"].as_str().unwrap();
        let schema_text = &system[system.find('{').unwrap()..];
        let schema: Value = serde_json::from_str(schema_text).unwrap();
        assert_eq!(schema["properties"]["ok"]["type"], "boolean");
    }

    #[test]
    fn escaped_text_survives_the_round_trip() {
        let v = encode(json!({"model": "m", "messages": [
            {"role": "user", "content": "line1\n\"quoted\" \u{e9}"}
        ]}));
        assert_eq!(v["messages"][0]["content"], "line1\n\"quoted\" \u{e9}");
    }

    fn decode(body: Value) -> (Value, Option<Usage>) {
        let (out, usage) =
            decode_response(&serde_json::to_vec(&body).unwrap(), "fallback", "anthropic").unwrap();
        (serde_json::from_slice(&out).unwrap(), usage)
    }

    #[test]
    fn text_response_is_decoded() {
        let (v, usage) = decode(json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 3}
        }));
        assert_eq!(v["id"], "chatcmpl-msg_01");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "claude-x");
        assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
        let choice = &v["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["logprobs"], Value::Null);
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], "Hello world");
        assert!(choice["message"].get("tool_calls").is_none());
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
        );
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 3,
                total_tokens: 13
            })
        );
    }

    #[test]
    fn tool_use_response_is_decoded() {
        let (v, _) = decode(json!({
            "id": "msg_02", "type": "message", "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "ping", "input": {}}
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 100}
        }));
        assert_eq!(v["model"], "fallback");
        let message = &v["choices"][0]["message"];
        assert_eq!(message["content"], Value::Null);
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        let calls = message["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["id"], "toolu_1");
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], "weather");
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        assert_eq!(v["usage"]["prompt_tokens"], 105);
        assert_eq!(v["usage"]["total_tokens"], 112);
    }

    #[test]
    fn stop_reasons_are_mapped() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
        ] {
            let (v, _) = decode(json!({
                "id": "m", "type": "message", "content": [{"type": "text", "text": "x"}],
                "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}
            }));
            assert_eq!(v["choices"][0]["finish_reason"], finish, "{stop}");
        }
    }

    #[test]
    fn malformed_responses_and_errors() {
        assert!(matches!(
            decode_response(b"{\"id\":", "m", "p"),
            Err(GatewayError::UpstreamProtocol { .. })
        ));
        assert!(matches!(
            decode_response(b"[1]", "m", "p"),
            Err(GatewayError::UpstreamProtocol { .. })
        ));
        let err = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert!(matches!(
            decode_response(err, "m", "p"),
            Err(GatewayError::UpstreamRateLimited { .. })
        ));
        assert_eq!(
            decode_error(err),
            Some(("overloaded_error".to_string(), "Overloaded".to_string()))
        );
        assert_eq!(decode_error(b"<html>502</html>"), None);
        assert_eq!(decode_error(br#"{"type":"message","content":[]}"#), None);
    }

    /// Feeds a transcript of `(event name, data)` pairs through framing and parsing, as
    /// the stream pipeline does, and returns the payloads emitted.
    fn run_stream(decoder: &mut StreamDecoder, events: &[(&str, Value)]) -> Vec<String> {
        let mut out = VecDeque::new();
        for (name, data) in events {
            let framed = format!("event: {name}\ndata: {data}\n\n");
            let event = parse_event(framed.as_bytes()).unwrap();
            decoder.on_event(&event, &mut out).unwrap();
        }
        out.iter()
            .map(|b| {
                let s = std::str::from_utf8(b).unwrap();
                assert!(s.starts_with("data: ") && s.ends_with("\n\n"), "{s}");
                s["data: ".len()..s.len() - 2].to_string()
            })
            .collect()
    }

    fn transcript() -> Vec<(&'static str, Value)> {
        vec![
            (
                "message_start",
                json!({"type": "message_start", "message": {
                "id": "msg_abc", "type": "message", "role": "assistant", "model": "claude-sonnet",
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 25, "output_tokens": 1}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
            ("ping", json!({"type": "ping"})),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "Let me "}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "check \"both\".\n"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_A", "name": "weather", "input": {}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "ris\", \"unit\": \"c\"}"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 2,
                "content_block": {"type": "tool_use", "id": "toolu_B", "name": "weather", "input": {}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": "{\"ci"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": "ty\": \"Rome\"}"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 2}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"output_tokens": 89}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ]
    }

    #[test]
    fn stream_transcript_with_parallel_tools_and_usage() {
        let mut decoder = StreamDecoder::new("fallback", true, "anthropic");
        let payloads = run_stream(&mut decoder, &transcript());
        assert!(decoder.is_finished());
        assert_eq!(payloads.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = payloads[..payloads.len() - 1]
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();

        for chunk in &chunks {
            assert_eq!(chunk["id"], "chatcmpl-msg_abc");
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "claude-sonnet");
            assert_eq!(chunk["created"], chunks[0]["created"]);
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(chunks[0]["usage"], Value::Null);

        let mut text = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        let mut finish = None;
        let (last, body) = chunks.split_last().unwrap();
        for chunk in body {
            assert!(chunk.get("usage").unwrap().is_null());
            let choice = &chunk["choices"][0];
            assert_eq!(choice["index"], 0);
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
            for call in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let k = call["index"].as_u64().unwrap() as usize;
                if let Some(id) = call["id"].as_str() {
                    assert_eq!(k, calls.len());
                    assert_eq!(call["type"], "function");
                    calls.push((
                        id.into(),
                        call["function"]["name"].as_str().unwrap().into(),
                        String::new(),
                    ));
                }
                calls[k]
                    .2
                    .push_str(call["function"]["arguments"].as_str().unwrap());
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                assert!(finish.is_none());
                finish = Some(f.to_string());
            }
        }
        assert_eq!(text, "Let me check \"both\".\n");
        assert_eq!(finish.as_deref(), Some("tool_calls"));
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].0.as_str(), calls[0].1.as_str()),
            ("toolu_A", "weather")
        );
        assert_eq!(calls[1].0, "toolu_B");
        let a: Value = serde_json::from_str(&calls[0].2).unwrap();
        let b: Value = serde_json::from_str(&calls[1].2).unwrap();
        assert_eq!(a, json!({"city": "Paris", "unit": "c"}));
        assert_eq!(b, json!({"city": "Rome"}));

        assert_eq!(last["choices"], json!([]));
        assert_eq!(
            last["usage"],
            json!({"prompt_tokens": 25, "completion_tokens": 89, "total_tokens": 114})
        );
        assert_eq!(
            decoder.usage(),
            Some(Usage {
                prompt_tokens: 25,
                completion_tokens: 89,
                total_tokens: 114
            })
        );

        // Anything after message_stop is ignored.
        let mut out = VecDeque::new();
        let late = parse_event(b"data: {\"type\":\"message_stop\"}\n\n").unwrap();
        decoder.on_event(&late, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn stream_without_usage_has_no_usage_key() {
        let mut decoder = StreamDecoder::new("fallback", false, "anthropic");
        let payloads = run_stream(&mut decoder, &transcript());
        assert_eq!(payloads.last().unwrap(), "[DONE]");
        for p in &payloads[..payloads.len() - 1] {
            let chunk: Value = serde_json::from_str(p).unwrap();
            assert!(chunk.get("usage").is_none(), "{p}");
            assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
        }
        // The gateway still accounts usage.
        assert_eq!(decoder.usage().unwrap().total_tokens, 114);
    }

    #[test]
    fn tool_without_argument_deltas_gets_empty_object() {
        let mut decoder = StreamDecoder::new("m", false, "anthropic");
        let payloads = run_stream(
            &mut decoder,
            &[
                (
                    "message_start",
                    json!({"type": "message_start", "message": {"id": "msg_1", "model": "", "usage": {"input_tokens": 3}}}),
                ),
                (
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}}),
                ),
                (
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ),
                (
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}),
                ),
                ("message_stop", json!({"type": "message_stop"})),
            ],
        );
        let args: String = payloads
            .iter()
            .filter_map(|p| serde_json::from_str::<Value>(p).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(args, "{}");
        let first: Value = serde_json::from_str(&payloads[0]).unwrap();
        assert_eq!(first["model"], "m");
    }

    #[test]
    fn stream_error_events_become_errors() {
        let mut out = VecDeque::new();
        let mut decoder = StreamDecoder::new("m", false, "anthropic");
        let overloaded = parse_event(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        )
        .unwrap();
        assert!(matches!(
            decoder.on_event(&overloaded, &mut out),
            Err(GatewayError::UpstreamRateLimited { .. })
        ));
        let api = parse_event(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"boom\"}}\n\n",
        )
        .unwrap();
        match decoder.on_event(&api, &mut out) {
            Err(GatewayError::UpstreamFailed { message, .. }) => assert!(message.contains("boom")),
            other => panic!("{other:?}"),
        }
        let garbage = parse_event(b"data: {not json\n\n").unwrap();
        assert!(matches!(
            decoder.on_event(&garbage, &mut out),
            Err(GatewayError::UpstreamProtocol { .. })
        ));
        assert!(!decoder.is_finished());
    }
}
