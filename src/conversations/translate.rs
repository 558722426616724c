//! Responses items ⇄ Chat Completions messages: how a turn of the Responses API becomes a
//! chat call that any provider can answer, and how the answer becomes output items.
//!
//! Every provider speaks Chat Completions (Anthropic through its own translation below
//! `inference`), so the Responses API is built on it rather than forwarded: the same
//! routing, limits, cache and usage log apply, and a provider without a Responses API
//! still serves it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Serialize;
use serde_json::Value;

use crate::error::GatewayError;
use crate::wire::chat::{
    self, Content, ContentPart, FileInput, FinishReason, ImageUrl, Message, Role, ToolCall,
};
use crate::wire::responses::{
    FunctionCallItem, Item, ItemStatus, MessageItem, MessageRole, Part, SERVER_TOOLS_LABEL, new_id,
};

/// Uploaded files that parts name by `file_id`, read for sending inline: file id →
/// (data URL, filename).
pub type InlineFiles = HashMap<String, (String, String)>;

static NO_FILES: LazyLock<InlineFiles> = LazyLock::new(HashMap::new);

/// The file ids that parts of `items` need sent inline: images without a URL, files
/// without their data.
pub fn file_ids<'a>(items: impl IntoIterator<Item = &'a Item>) -> Vec<&'a str> {
    let mut ids: Vec<&str> = Vec::new();
    for item in items {
        let Item::Message(message) = item else {
            continue;
        };
        for part in &message.content {
            let id = match part {
                Part::InputImage {
                    image_url: None,
                    file_id: Some(id),
                    ..
                }
                | Part::InputFile {
                    file_data: None,
                    file_id: Some(id),
                    ..
                } => id.as_str(),
                _ => continue,
            };
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// [`to_messages_with`] for items that name no uploaded file.
///
/// # Errors
/// As [`to_messages_with`].
pub fn to_messages<'a>(
    instructions: Option<&'a str>,
    items: impl IntoIterator<Item = &'a Item>,
) -> Result<Vec<Message<'a>>, GatewayError> {
    to_messages_with(instructions, items, &NO_FILES)
}

/// The chat messages for `instructions` followed by `items`, in order; parts that name an
/// uploaded file by id are sent with its bytes from `files`.
///
/// Assistant text and the function calls that follow it become one assistant message with
/// `tool_calls`, as a chat model produced them; a function call output becomes a `tool`
/// message answering its `call_id`.
///
/// # Errors
/// 400 for a part a chat model cannot be given (a file id not in `files`).
pub fn to_messages_with<'a>(
    instructions: Option<&'a str>,
    items: impl IntoIterator<Item = &'a Item>,
    files: &'a InlineFiles,
) -> Result<Vec<Message<'a>>, GatewayError> {
    let mut messages: Vec<Message<'a>> = Vec::new();
    if let Some(instructions) = instructions {
        messages.push(Message::system(instructions));
    }
    for item in items {
        match item {
            Item::Message(message) => messages.push(message_to_chat(message, files)?),
            Item::FunctionCall(call) => {
                let tool_call = ToolCall::function(&*call.call_id, &*call.name, &*call.arguments);
                push_tool_call(&mut messages, tool_call);
            }
            Item::FunctionCallOutput(output) => {
                let text: Cow<'a, str> = match &output.output {
                    Value::String(s) => Cow::Borrowed(s),
                    Value::Array(parts) => Cow::Owned(
                        parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join(""),
                    ),
                    other => Cow::Owned(other.to_string()),
                };
                messages.push(Message::tool(&*output.call_id, text));
            }
            // A call the server ran: the model's call, then what came back, under the
            // item's id as the call id.
            Item::McpCall(call) => {
                // The name the model was offered: an MCP server's tools carry its label.
                let name: Cow<'a, str> = if call.server_label == SERVER_TOOLS_LABEL {
                    Cow::Borrowed(&call.name)
                } else {
                    Cow::Owned(crate::tools::mcp::function_name(
                        &call.server_label,
                        &call.name,
                    ))
                };
                let tool_call = ToolCall::function(&*call.id, name, &*call.arguments);
                push_tool_call(&mut messages, tool_call);
                // A client's item may carry both: the model reads both.
                let text: Cow<'a, str> = match (&call.output, &call.error) {
                    (Some(output), None) => Cow::Borrowed(output),
                    (Some(output), Some(error)) => Cow::Owned(format!("{output}\nerror: {error}")),
                    (None, Some(error)) => Cow::Owned(format!("error: {error}")),
                    (None, None) => Cow::Borrowed(""),
                };
                messages.push(Message::tool(&*call.id, text));
            }
            // What the server listed is offered as functions; approvals are resolved into
            // the `mcp_call` items that follow them.
            Item::McpListTools(_) | Item::McpApprovalRequest(_) | Item::McpApprovalResponse(_) => {}
            Item::WebSearchCall(search) => {
                let arguments = serde_json::json!({"query": search.action.query}).to_string();
                let tool_call = ToolCall::function(
                    &*search.id,
                    crate::tools::search::NAME,
                    Cow::Owned(arguments),
                );
                push_tool_call(&mut messages, tool_call);
                let text = search
                    .output
                    .as_deref()
                    .unwrap_or("error: the search failed");
                messages.push(Message::tool(&*search.id, text));
            }
        }
    }
    Ok(messages)
}

/// Adds a tool call to the assistant turn it belongs to (the last message, when it is the
/// assistant's: its text or earlier calls), or starts one.
fn push_tool_call<'a>(messages: &mut Vec<Message<'a>>, tool_call: ToolCall<'a>) {
    match messages.last_mut() {
        Some(last) if last.role == Role::Assistant => {
            last.tool_calls.get_or_insert_with(Vec::new).push(tool_call);
        }
        _ => {
            let mut turn = Message::new(Role::Assistant, "");
            turn.content = Content::Null;
            turn.tool_calls = Some(vec![tool_call]);
            messages.push(turn);
        }
    }
}

fn message_to_chat<'a>(
    message: &'a MessageItem,
    files: &'a InlineFiles,
) -> Result<Message<'a>, GatewayError> {
    let role = match message.role {
        MessageRole::User => Role::User,
        MessageRole::Assistant => Role::Assistant,
        MessageRole::System => Role::System,
        MessageRole::Developer => Role::Developer,
    };
    let only_text = message.content.iter().all(|p| {
        matches!(
            p,
            Part::InputText { .. } | Part::OutputText { .. } | Part::Refusal { .. }
        )
    });
    let mut chat = Message::new(role, "");
    if only_text {
        // Plain text content: every provider takes it, whatever the role.
        let mut text = String::new();
        for part in &message.content {
            match part {
                Part::InputText { text: t } | Part::OutputText { text: t, .. } => text.push_str(t),
                Part::Refusal { refusal } => chat.refusal = Some(Cow::Borrowed(refusal)),
                _ => {}
            }
        }
        chat.content = if text.is_empty() && chat.refusal.is_some() {
            Content::Null
        } else {
            Content::Text(Cow::Owned(text))
        };
        return Ok(chat);
    }
    let mut parts = Vec::with_capacity(message.content.len());
    for part in &message.content {
        parts.push(match part {
            Part::InputText { text } | Part::OutputText { text, .. } => ContentPart::text(&**text),
            Part::Refusal { refusal } => ContentPart::Refusal {
                refusal: Cow::Borrowed(refusal),
            },
            Part::InputImage {
                image_url: Some(url),
                detail,
                ..
            } => ContentPart::ImageUrl {
                image_url: ImageUrl {
                    url: Cow::Borrowed(url),
                    detail: Some(Cow::Borrowed(detail)),
                },
            },
            Part::InputImage {
                file_id, detail, ..
            } => {
                let id = file_id.as_deref().unwrap_or_default();
                let Some((url, _)) = files.get(id) else {
                    return Err(GatewayError::InvalidRequest {
                        message: format!("Image file '{id}' was not found."),
                        param: Some("input"),
                        code: Some("invalid_value"),
                    });
                };
                ContentPart::ImageUrl {
                    image_url: ImageUrl {
                        url: Cow::Borrowed(url),
                        detail: Some(Cow::Borrowed(detail)),
                    },
                }
            }
            Part::InputFile {
                file_id,
                file_data,
                filename,
                file_url,
            } => {
                if file_url.is_some() && file_data.is_none() && file_id.is_none() {
                    return Err(GatewayError::InvalidRequest {
                        message: "Files by URL are not supported: send 'file_data'.".into(),
                        param: Some("input"),
                        code: Some("invalid_value"),
                    });
                }
                // A file of ours goes inline: the provider never saw our ids.
                let inline = match (file_data, file_id) {
                    (None, Some(id)) => Some(files.get(id.as_str()).ok_or_else(|| {
                        GatewayError::InvalidRequest {
                            message: format!("File '{id}' was not found."),
                            param: Some("input"),
                            code: Some("invalid_value"),
                        }
                    })?),
                    _ => None,
                };
                match inline {
                    Some((data, name)) => ContentPart::File {
                        file: FileInput {
                            file_data: Some(Cow::Borrowed(data)),
                            file_id: None,
                            filename: Some(Cow::Borrowed(filename.as_deref().unwrap_or(name))),
                        },
                    },
                    None => ContentPart::File {
                        file: FileInput {
                            file_data: file_data.as_deref().map(Cow::Borrowed),
                            file_id: file_id.as_deref().map(Cow::Borrowed),
                            filename: filename.as_deref().map(Cow::Borrowed),
                        },
                    },
                }
            }
        });
    }
    chat.content = Content::Parts(parts);
    Ok(chat)
}

/// How a chat answer ended, in the Responses API's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completed,
    /// Cut by `max_output_tokens` (or the context window).
    MaxOutputTokens,
    ContentFilter,
    /// The tool loop reached its step limit with calls still to run.
    ToolLimit,
}

impl Ending {
    pub fn from_finish(reason: Option<&FinishReason>) -> Ending {
        match reason {
            Some(FinishReason::Length) => Ending::MaxOutputTokens,
            Some(FinishReason::ContentFilter) => Ending::ContentFilter,
            _ => Ending::Completed,
        }
    }

    /// `incomplete_details.reason`, when the answer is incomplete.
    pub fn incomplete_reason(self) -> Option<&'static str> {
        match self {
            Ending::Completed => None,
            Ending::MaxOutputTokens => Some("max_output_tokens"),
            Ending::ContentFilter => Some("content_filter"),
            Ending::ToolLimit => Some("max_tool_calls"),
        }
    }
}

/// The output items of a whole chat completion: the assistant message (text or refusal),
/// then one function call per tool call, each with a fresh id.
pub fn completion_output(completion: &chat::Completion<'_>) -> (Vec<Item>, Ending) {
    let ending = Ending::from_finish(completion.finish_reason());
    let status = if ending == Ending::Completed {
        ItemStatus::Completed
    } else {
        ItemStatus::Incomplete
    };
    let mut output = Vec::new();
    if let Some(message) = completion.message() {
        let mut content = Vec::new();
        if let Some(text) = message.content.as_deref().filter(|t| !t.is_empty()) {
            content.push(Part::OutputText {
                text: text.to_owned(),
                annotations: annotations(message.annotations.as_deref()),
                logprobs: Vec::new(),
            });
        }
        if let Some(refusal) = message.refusal.as_deref().filter(|t| !t.is_empty()) {
            content.push(Part::Refusal {
                refusal: refusal.to_owned(),
            });
        }
        if !content.is_empty() {
            output.push(Item::Message(MessageItem {
                id: new_id("msg"),
                status,
                role: MessageRole::Assistant,
                content,
            }));
        }
        for call in message.tool_calls() {
            if let ToolCall::Function { id, function } = call {
                output.push(Item::FunctionCall(FunctionCallItem {
                    id: new_id("fc"),
                    call_id: id.to_string(),
                    name: function.name.to_string(),
                    arguments: function.arguments.to_string(),
                    status: ItemStatus::Completed,
                }));
            }
        }
    }
    (output, ending)
}

/// Chat `url_citation` annotations in the Responses shape (flat, with `type`).
pub fn annotations(annotations: Option<&[chat::Annotation]>) -> Vec<Value> {
    annotations
        .unwrap_or_default()
        .iter()
        .filter_map(|a| {
            let c = a.url_citation.as_ref()?;
            Some(serde_json::json!({
                "type": "url_citation",
                "start_index": c.start_index,
                "end_index": c.end_index,
                "title": c.title,
                "url": c.url,
            }))
        })
        .collect()
}

/// What a Responses request asks of the model, besides its messages.
#[derive(Debug)]
pub struct Sampling<'a> {
    pub tools: &'a [Value],
    pub tool_choice: Option<&'a Value>,
    pub parallel_tool_calls: Option<bool>,
    pub max_output_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub response_format: Option<&'a Value>,
    pub user: Option<&'a str>,
    pub safety_identifier: Option<&'a str>,
    pub prompt_cache_key: Option<&'a str>,
    pub reasoning_effort: Option<&'a str>,
}

/// The Chat Completions body of one call.
#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: &'a [Message<'a>],
    #[serde(skip_serializing_if = "<[Value]>::is_empty")]
    tools: &'a [Value],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    /// OpenAI's current name; every model of it accepts this one, reasoning models only
    /// this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    safety_identifier: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'a str>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<Value>,
}

/// Serialises the chat request for `model` (the alias): usage is always asked for on a
/// stream, since the response reports it.
pub fn chat_body(
    model: &str,
    messages: &[Message<'_>],
    sampling: &Sampling<'_>,
    stream: bool,
) -> Vec<u8> {
    let body = ChatBody {
        model,
        messages,
        tools: sampling.tools,
        tool_choice: sampling.tool_choice,
        parallel_tool_calls: sampling
            .parallel_tool_calls
            .filter(|_| !sampling.tools.is_empty()),
        max_completion_tokens: sampling.max_output_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        response_format: sampling.response_format,
        user: sampling.user,
        safety_identifier: sampling.safety_identifier,
        prompt_cache_key: sampling.prompt_cache_key,
        reasoning_effort: sampling.reasoning_effort,
        stream,
        stream_options: stream.then(|| serde_json::json!({"include_usage": true})),
    };
    // Strings, numbers and JSON values only: serialising cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// A Responses `tools` entry as a chat tool: a function tool's flat fields move into
/// `function`.
///
/// # Errors
/// 400 for a tool type this gateway cannot run (yet), naming it.
pub fn chat_tool(tool: &Value, index: usize) -> Result<Value, GatewayError> {
    let kind = tool.get("type").and_then(Value::as_str).unwrap_or_default();
    if kind != "function" {
        return Err(GatewayError::InvalidRequest {
            message: format!(
                "Invalid value for 'tools[{index}].type': tool type '{kind}' is not available \
                 on this server."
            ),
            param: Some("tools"),
            code: Some("invalid_value"),
        });
    }
    let Some(name) = tool
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    else {
        return Err(GatewayError::invalid(
            format!("Missing required parameter: 'tools[{index}].name'."),
            Some("tools"),
        ));
    };
    let mut function = serde_json::Map::new();
    function.insert("name".into(), Value::String(name.to_owned()));
    for field in ["description", "parameters", "strict"] {
        if let Some(value) = tool.get(field).filter(|v| !v.is_null()) {
            function.insert(field.into(), value.clone());
        }
    }
    Ok(serde_json::json!({"type": "function", "function": function}))
}

/// A Responses `tool_choice` as the chat one.
///
/// # Errors
/// 400 for a choice that names no function or an unknown mode.
pub fn chat_tool_choice(choice: &Value) -> Result<Value, GatewayError> {
    let bad = |what: String| GatewayError::InvalidRequest {
        message: format!("Invalid value for 'tool_choice': {what}."),
        param: Some("tool_choice"),
        code: Some("invalid_value"),
    };
    match choice {
        Value::String(mode) if matches!(mode.as_str(), "none" | "auto" | "required") => {
            Ok(choice.clone())
        }
        Value::String(mode) => Err(bad(format!("'{mode}' is not one of none, auto, required"))),
        Value::Object(fields) => match fields.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = fields
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a function choice needs 'name'".into()))?;
                Ok(serde_json::json!({"type": "function", "function": {"name": name}}))
            }
            // One MCP server's tool: the function it is offered as.
            Some("mcp") => {
                let label = fields
                    .get("server_label")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("an mcp choice needs 'server_label'".into()))?;
                let name = fields
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("an mcp choice needs 'name' here".into()))?;
                let function = crate::tools::mcp::function_name(label, name);
                Ok(serde_json::json!({"type": "function", "function": {"name": function}}))
            }
            Some("allowed_tools") => {
                let mode = fields.get("mode").and_then(Value::as_str).unwrap_or("auto");
                let tools: Vec<Value> = fields
                    .get("tools")
                    .and_then(Value::as_array)
                    .map(|tools| {
                        tools
                            .iter()
                            .filter_map(|t| t.get("name").and_then(Value::as_str))
                            .map(|name| {
                                serde_json::json!({"type": "function", "function": {"name": name}})
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(serde_json::json!({
                    "type": "allowed_tools",
                    "allowed_tools": {"mode": mode, "tools": tools},
                }))
            }
            other => Err(bad(format!(
                "choice type '{}' is not available on this server",
                other.unwrap_or_default()
            ))),
        },
        _ => Err(bad("expected a string or an object".into())),
    }
}

/// `text.format` as a chat `response_format`; `None` for plain text.
///
/// # Errors
/// 400 for an unknown format type or a JSON schema without a name or schema.
pub fn chat_response_format(format: &Value) -> Result<Option<Value>, GatewayError> {
    let bad = |what: &str| GatewayError::InvalidRequest {
        message: format!("Invalid value for 'text.format': {what}."),
        param: Some("text"),
        code: Some("invalid_value"),
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(serde_json::json!({"type": "json_object"}))),
        Some("json_schema") => {
            let name = format
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("a json_schema format needs 'name'"))?;
            let schema = format
                .get("schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| bad("a json_schema format needs a 'schema' object"))?;
            let mut json_schema = serde_json::Map::new();
            json_schema.insert("name".into(), Value::String(name.to_owned()));
            json_schema.insert("schema".into(), schema.clone());
            for field in ["description", "strict"] {
                if let Some(value) = format.get(field).filter(|v| !v.is_null()) {
                    json_schema.insert(field.into(), value.clone());
                }
            }
            Ok(Some(serde_json::json!({
                "type": "json_schema",
                "json_schema": json_schema,
            })))
        }
        _ => Err(bad("'type' must be text, json_object or json_schema")),
    }
}

#[cfg(test)]
mod tests {
    /// Found by the `responses_input` fuzz target: an `mcp_call` with both an output and an
    /// error lost the error on its way to the model.
    #[test]
    fn an_mcp_call_with_output_and_error_keeps_both() {
        let input: serde_json::Value = serde_json::from_str(
            r#"[{"type":"mcp_call","server_label":"s","name":"f","arguments":"{}",
                "output":"{\"p","error":"timed out"},{"role":"user","content":"next"}]"#,
        )
        .unwrap();
        let items = crate::wire::responses::parse_input(&input).unwrap();
        let sent = serde_json::to_string(&super::to_messages(None, &items).unwrap()).unwrap();
        assert!(
            sent.contains("timed out") && sent.contains(r#"{\"p"#),
            "{sent}"
        );
    }

    use super::*;
    use crate::wire::responses::parse_input;
    use serde_json::json;

    #[test]
    fn items_become_chat_messages_with_tool_turns_merged() {
        let items = parse_input(&json!([
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Let me look."},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"q\":1}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
        ]))
        .unwrap();
        let messages = to_messages(Some("be brief"), &items).unwrap();
        let json = serde_json::to_value(&messages).unwrap();
        assert_eq!(json[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(json[1], json!({"role": "user", "content": "weather?"}));
        assert_eq!(json[2]["role"], "assistant");
        assert_eq!(json[2]["content"], "Let me look.");
        assert_eq!(json[2]["tool_calls"][1]["id"], "c2");
        assert_eq!(
            json[2]["tool_calls"][0]["function"]["arguments"],
            "{\"q\":1}"
        );
        assert_eq!(
            json[3],
            json!({"role": "tool", "content": "sunny", "tool_call_id": "c1"})
        );
        assert_eq!(json[4]["content"], "rain");
        assert_eq!(messages.len(), 5);
    }

    #[test]
    fn images_stay_parts() {
        let items = parse_input(&json!([{"role": "user", "content": [
            {"type": "input_text", "text": "what is this"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}
        ]}]))
        .unwrap();
        let json = serde_json::to_value(to_messages(None, &items).unwrap()).unwrap();
        assert_eq!(
            json[0]["content"][1]["image_url"]["url"],
            "data:image/png;base64,AAAA"
        );
        assert_eq!(json[0]["content"][1]["image_url"]["detail"], "low");
    }

    #[test]
    fn a_completion_becomes_a_message_and_function_calls() {
        let body = json!({
            "id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "calling",
                "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "f", "arguments": "{}"}}]}}]
        })
        .to_string();
        let completion: chat::Completion<'_> = serde_json::from_str(&body).unwrap();
        let (items, ending) = completion_output(&completion);
        assert_eq!(ending, Ending::Completed);
        assert_eq!(items.len(), 2);
        let Item::FunctionCall(call) = &items[1] else {
            panic!()
        };
        assert_eq!(call.call_id, "call_1");
        assert!(call.id.starts_with("fc_"));
    }

    #[test]
    fn tools_choices_and_formats_translate() {
        let tool = chat_tool(
            &json!({"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": true}),
            0,
        )
        .unwrap();
        assert_eq!(
            tool,
            json!({"type": "function", "function": {
            "name": "f", "parameters": {"type": "object"}, "strict": true}})
        );
        assert!(
            chat_tool(&json!({"type": "web_search_preview"}), 1)
                .unwrap_err()
                .to_string()
                .contains("tools[1]")
        );
        assert_eq!(
            chat_tool_choice(&json!({"type": "function", "name": "f"})).unwrap(),
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert!(chat_tool_choice(&json!("sometimes")).is_err());
        let format = chat_response_format(&json!({"type": "json_schema", "name": "n",
            "schema": {"type": "object"}, "strict": true}))
        .unwrap()
        .unwrap();
        assert_eq!(format["json_schema"]["strict"], true);
        assert_eq!(
            chat_response_format(&json!({"type": "text"})).unwrap(),
            None
        );
    }
}
