//! OpenAI chat request → Anthropic Messages request ([`encode_request`]).
//!
//! System and developer messages become `system`; user, assistant and tool messages become
//! alternating user and assistant turns (tool results ride in user turns); tools,
//! `tool_choice`, sampling and limits are mapped, and `response_format` becomes a system
//! instruction. Message text, base64 image data and tool schemas are borrowed from the
//! request body and copied once, into the outgoing body.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::EMPTY_OBJECT;
use crate::error::GatewayError;
use crate::wire::ChatRequest;

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
