//! The OpenAI Responses and Conversations schema: the request a client sends to
//! `POST /v1/responses`, the items of a response's input and output (which are also a
//! conversation's items), and the `Response` object.
//!
//! Field for field these follow the official SDK's types (`openai-python`,
//! `src/openai/types/responses/` and `src/openai/types/conversations/`). Items are owned
//! values: they are stored one row each and served again, so they are parsed once, given
//! ids, and written back as JSON.
//!
//! Input is read leniently where the SDK is lenient (a message without `type`, `content`
//! as a string) and strictly where a wrong value would reach a model: an unknown item or
//! part type, a missing `call_id` or a role that is not one of the four is a 400 that
//! names the item.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::GatewayError;

/// `object` of a [`Response`].
pub const RESPONSE_OBJECT: &str = "response";

/// An item of a response's input or output, or of a conversation (SDK: `ResponseInputItem`,
/// `ResponseOutputItem`, `ConversationItem`; the kinds this gateway runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Item {
    Message(MessageItem),
    FunctionCall(FunctionCallItem),
    FunctionCallOutput(FunctionCallOutputItem),
    McpCall(McpCallItem),
    McpListTools(McpListToolsItem),
    McpApprovalRequest(McpApprovalRequestItem),
    McpApprovalResponse(McpApprovalResponseItem),
    WebSearchCall(WebSearchCallItem),
}

/// SDK: `McpListTools`: the tools an MCP server offered, listed once per conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpListToolsItem {
    pub id: String,
    pub server_label: String,
    /// Each `{name, description, input_schema, annotations}` (SDK: `McpListToolsTool`).
    pub tools: Vec<Value>,
    #[serde(default)]
    pub error: Option<String>,
}

/// SDK: `McpApprovalRequest`: a call waiting for the client's approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpApprovalRequestItem {
    pub id: String,
    pub server_label: String,
    pub name: String,
    pub arguments: String,
}

/// SDK: `McpApprovalResponse`: the client's answer to an approval request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpApprovalResponseItem {
    pub id: String,
    pub approval_request_id: String,
    pub approve: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// SDK: `ResponseFunctionWebSearch`: a search the server ran for the model. `output` (what
/// the model read: the results as JSON) is Switchyard's addition, kept so that a later turn
/// replays the same context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebSearchCallItem {
    pub id: String,
    pub action: SearchAction,
    /// `completed` or `failed`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// SDK: `ActionSearch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchAction {
    /// Always `search`.
    #[serde(rename = "type")]
    pub kind: String,
    pub query: String,
    #[serde(default)]
    pub sources: Vec<SearchSource>,
}

/// SDK: `ActionSearchSource`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchSource {
    /// Always `url`.
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
}

/// SDK: `McpCall`: a tool the server ran for the model, with its output or its error.
/// The operator's own tools carry the label [`SERVER_TOOLS_LABEL`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpCallItem {
    pub id: String,
    pub server_label: String,
    pub name: String,
    /// The arguments as the model wrote them: a JSON text.
    pub arguments: String,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    pub status: ItemStatus,
    /// The approval request this call was run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_request_id: Option<String>,
}

/// `server_label` of the calls of the operator's configured tools.
pub const SERVER_TOOLS_LABEL: &str = "switchyard";

/// SDK: `ResponseOutputMessage` (assistant) and the conversation `Message` (any role).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageItem {
    pub id: String,
    pub status: ItemStatus,
    pub role: MessageRole,
    pub content: Vec<Part>,
}

/// SDK: `ResponseFunctionToolCall`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallItem {
    pub id: String,
    pub call_id: String,
    pub name: String,
    /// The arguments as the model wrote them: a JSON text, not a JSON value.
    pub arguments: String,
    pub status: ItemStatus,
}

/// SDK: `ResponseFunctionToolCallOutputItem`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallOutputItem {
    pub id: String,
    pub call_id: String,
    /// A string, or a list of `input_text` / `input_image` / `input_file` parts.
    pub output: Value,
    pub status: ItemStatus,
}

/// A message's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageRole {
    User,
    Assistant,
    System,
    Developer,
}

/// An item's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    InProgress,
    Completed,
    Incomplete,
}

/// A part of a message's `content` (SDK: `ResponseInputText`, `ResponseInputImage`,
/// `ResponseInputFile`, `ResponseOutputText`, `ResponseOutputRefusal`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    InputText {
        text: String,
    },
    InputImage {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file_id: Option<String>,
        #[serde(default = "auto")]
        detail: String,
    },
    InputFile {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file_data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filename: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file_url: Option<String>,
    },
    OutputText {
        text: String,
        #[serde(default)]
        annotations: Vec<Value>,
        #[serde(default)]
        logprobs: Vec<Value>,
    },
    Refusal {
        refusal: String,
    },
}

fn auto() -> String {
    "auto".into()
}

impl Item {
    pub fn id(&self) -> &str {
        match self {
            Item::Message(m) => &m.id,
            Item::FunctionCall(f) => &f.id,
            Item::FunctionCallOutput(o) => &o.id,
            Item::McpCall(c) => &c.id,
            Item::McpListTools(l) => &l.id,
            Item::McpApprovalRequest(r) => &r.id,
            Item::McpApprovalResponse(r) => &r.id,
            Item::WebSearchCall(c) => &c.id,
        }
    }

    /// The item's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Item::Message(_) => "message",
            Item::FunctionCall(_) => "function_call",
            Item::FunctionCallOutput(_) => "function_call_output",
            Item::McpCall(_) => "mcp_call",
            Item::McpListTools(_) => "mcp_list_tools",
            Item::McpApprovalRequest(_) => "mcp_approval_request",
            Item::McpApprovalResponse(_) => "mcp_approval_response",
            Item::WebSearchCall(_) => "web_search_call",
        }
    }

    /// The item as stored and served.
    pub fn to_json(&self) -> String {
        // Serialising plain strings and values into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A user message with one text part.
    pub fn user_text(text: impl Into<String>) -> Item {
        Item::Message(MessageItem {
            id: new_id("msg"),
            status: ItemStatus::Completed,
            role: MessageRole::User,
            content: vec![Part::InputText { text: text.into() }],
        })
    }

    /// The text a tokenizer should count for this item (text parts, call names and
    /// arguments, tool output); images and files are counted by the caller's estimate.
    pub fn texts(&self) -> Vec<&str> {
        match self {
            Item::Message(m) => m
                .content
                .iter()
                .filter_map(|p| match p {
                    Part::InputText { text } | Part::OutputText { text, .. } => Some(&**text),
                    Part::Refusal { refusal } => Some(&**refusal),
                    _ => None,
                })
                .collect(),
            Item::FunctionCall(f) => vec![&f.name, &f.arguments],
            Item::FunctionCallOutput(o) => match &o.output {
                Value::String(s) => vec![s.as_str()],
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect(),
                _ => Vec::new(),
            },
            Item::McpCall(c) => [&c.name, &c.arguments]
                .into_iter()
                .map(String::as_str)
                .chain(c.output.as_deref())
                .chain(c.error.as_deref())
                .collect(),
            // Offered to the model as function definitions, counted with the tools.
            Item::McpListTools(_) => Vec::new(),
            Item::McpApprovalRequest(r) => vec![&r.name, &r.arguments],
            Item::McpApprovalResponse(r) => r.reason.as_deref().into_iter().collect(),
            Item::WebSearchCall(c) => std::iter::once(c.action.query.as_str())
                .chain(c.output.as_deref())
                .collect(),
        }
    }

    /// Images and files in the item, each counted as a fixed estimate.
    pub fn attachments(&self) -> usize {
        match self {
            Item::Message(m) => m
                .content
                .iter()
                .filter(|p| matches!(p, Part::InputImage { .. } | Part::InputFile { .. }))
                .count(),
            _ => 0,
        }
    }
}

/// A fresh object id: `prefix_` and 48 random hex digits, as OpenAI's ids look.
pub fn new_id(prefix: &str) -> String {
    use std::fmt::Write;
    let bytes: [u8; 24] = rand::random();
    let mut id = String::with_capacity(prefix.len() + 49);
    id.push_str(prefix);
    id.push('_');
    for b in bytes {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// Whether `id` looks like one of our ids of this prefix (`resp`, `conv`, …): an id of the
/// wrong kind or with stray characters is refused before any lookup.
pub fn is_id(id: &str, prefix: &str) -> bool {
    id.len() > prefix.len() + 1
        && id.len() <= 128
        && id.starts_with(prefix)
        && id.as_bytes()[prefix.len()] == b'_'
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `input` as items, each with a fresh id: a string is one user message; a list holds
/// messages (`type` may be left out; `content` may be a string), function calls and
/// function call outputs. Ids sent by the client are replaced: an item stored twice (a
/// client sending back a previous output) must not collide with the first.
///
/// # Errors
/// 400 naming the item for anything a model could not be given.
pub fn parse_input(input: &Value) -> Result<Vec<Item>, GatewayError> {
    match input {
        Value::String(text) => Ok(vec![Item::user_text(text.clone())]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_item(item).map_err(|e| bad(format!("input[{i}]: {e}"))))
            .collect(),
        _ => Err(GatewayError::InvalidRequest {
            message: "Invalid type for 'input': expected a string or an array of input items."
                .into(),
            param: Some("input"),
            code: Some("invalid_type"),
        }),
    }
}

/// Items given to `POST /v1/conversations` or `…/items`: the same shapes as `input`.
///
/// # Errors
/// 400 naming the item.
pub fn parse_items(items: &[Value], param: &'static str) -> Result<Vec<Item>, GatewayError> {
    // Input items get fresh ids; an approval response given with the request it answers
    // follows that request to its new id.
    let mut renamed: HashMap<&str, String> = HashMap::new();
    items
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let mut item = parse_item(value)
                .map_err(|e| GatewayError::invalid(format!("{param}[{i}]: {e}"), Some(param)))?;
            match &mut item {
                Item::McpApprovalRequest(request) => {
                    if let Some(old) = value.get("id").and_then(Value::as_str) {
                        renamed.insert(old, request.id.clone());
                    }
                }
                Item::McpApprovalResponse(response) => {
                    if let Some(new) = renamed.get(response.approval_request_id.as_str()) {
                        response.approval_request_id.clone_from(new);
                    }
                }
                _ => {}
            }
            Ok(item)
        })
        .collect()
}

fn bad(message: String) -> GatewayError {
    GatewayError::invalid(message, Some("input"))
}

/// One input item, with a fresh id.
fn parse_item(item: &Value) -> Result<Item, String> {
    let Value::Object(fields) = item else {
        return Err("expected an object".into());
    };
    let kind = match fields.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        None | Some(Value::Null) if fields.contains_key("role") => "message",
        None | Some(Value::Null) => return Err("missing 'type'".into()),
        Some(_) => return Err("'type' must be a string".into()),
    };
    let text = |name: &str| -> Result<String, String> {
        match fields.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("'{name}' must be a string")),
            None => Err(format!("missing '{name}'")),
        }
    };
    let status = match fields.get("status") {
        None | Some(Value::Null) => ItemStatus::Completed,
        Some(value) => ItemStatus::deserialize(value)
            .map_err(|_| "'status' must be in_progress, completed or incomplete".to_string())?,
    };
    match kind {
        "message" => {
            let role = match fields.get("role") {
                Some(value) => MessageRole::deserialize(value).map_err(|_| {
                    "'role' must be one of user, assistant, system, developer".to_string()
                })?,
                None => return Err("missing 'role'".into()),
            };
            let content = match fields.get("content") {
                Some(Value::String(text)) if role == MessageRole::Assistant => {
                    vec![Part::OutputText {
                        text: text.clone(),
                        annotations: Vec::new(),
                        logprobs: Vec::new(),
                    }]
                }
                Some(Value::String(text)) => vec![Part::InputText { text: text.clone() }],
                Some(Value::Array(parts)) => parts
                    .iter()
                    .enumerate()
                    .map(|(j, part)| parse_part(part).map_err(|e| format!("content[{j}]: {e}")))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err("'content' must be a string or an array of parts".into()),
                None => return Err("missing 'content'".into()),
            };
            Ok(Item::Message(MessageItem {
                id: new_id("msg"),
                status,
                role,
                content,
            }))
        }
        "function_call" => {
            let arguments = text("arguments")?;
            Ok(Item::FunctionCall(FunctionCallItem {
                id: new_id("fc"),
                call_id: nonempty(text("call_id")?, "call_id")?,
                name: nonempty(text("name")?, "name")?,
                arguments,
                status,
            }))
        }
        "function_call_output" => {
            let output = match fields.get("output") {
                Some(Value::String(s)) => Value::String(s.clone()),
                Some(Value::Array(parts)) => {
                    for (j, part) in parts.iter().enumerate() {
                        parse_part(part).map_err(|e| format!("output[{j}]: {e}"))?;
                    }
                    Value::Array(parts.clone())
                }
                Some(_) => return Err("'output' must be a string or an array of parts".into()),
                None => return Err("missing 'output'".into()),
            };
            Ok(Item::FunctionCallOutput(FunctionCallOutputItem {
                id: new_id("fco"),
                call_id: nonempty(text("call_id")?, "call_id")?,
                output,
                status,
            }))
        }
        "mcp_call" => {
            let optional = |name: &str| match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("'{name}' must be a string")),
            };
            Ok(Item::McpCall(McpCallItem {
                id: new_id("mcp"),
                server_label: nonempty(text("server_label")?, "server_label")?,
                name: nonempty(text("name")?, "name")?,
                arguments: text("arguments")?,
                output: optional("output")?,
                error: optional("error")?,
                status,
                approval_request_id: optional("approval_request_id")?,
            }))
        }
        "mcp_list_tools" => {
            let tools = match fields.get("tools") {
                Some(Value::Array(tools)) => tools.clone(),
                _ => return Err("'tools' must be an array".into()),
            };
            let error = match fields.get("error") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err("'error' must be a string".into()),
            };
            Ok(Item::McpListTools(McpListToolsItem {
                id: new_id("mcpl"),
                server_label: nonempty(text("server_label")?, "server_label")?,
                tools,
                error,
            }))
        }
        "mcp_approval_request" => Ok(Item::McpApprovalRequest(McpApprovalRequestItem {
            id: new_id("mcpr"),
            server_label: nonempty(text("server_label")?, "server_label")?,
            name: nonempty(text("name")?, "name")?,
            arguments: text("arguments")?,
        })),
        "mcp_approval_response" => {
            let approve = match fields.get("approve") {
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("'approve' must be a boolean".into()),
                None => return Err("missing 'approve'".into()),
            };
            let reason = match fields.get("reason") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err("'reason' must be a string".into()),
            };
            Ok(Item::McpApprovalResponse(McpApprovalResponseItem {
                id: new_id("mcpa"),
                approval_request_id: nonempty(text("approval_request_id")?, "approval_request_id")?,
                approve,
                reason,
            }))
        }
        "web_search_call" => {
            let action = fields.get("action").ok_or("missing 'action'")?;
            let query = action
                .get("query")
                .and_then(Value::as_str)
                .ok_or("'action.query' must be a string")?;
            let sources = action
                .get("sources")
                .and_then(Value::as_array)
                .map(|sources| {
                    sources
                        .iter()
                        .filter_map(|s| s.get("url").and_then(Value::as_str))
                        .map(|url| SearchSource {
                            kind: "url".into(),
                            url: url.to_owned(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let output = match fields.get("output") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err("'output' must be a string".into()),
            };
            Ok(Item::WebSearchCall(WebSearchCallItem {
                id: new_id("ws"),
                action: SearchAction {
                    kind: "search".into(),
                    query: query.to_owned(),
                    sources,
                },
                status: "completed".into(),
                output,
            }))
        }
        "item_reference" => Err("item references are not supported; send the item itself".into()),
        other => Err(format!("unsupported item type '{other}'")),
    }
}

fn nonempty(value: String, name: &str) -> Result<String, String> {
    if value.is_empty() {
        Err(format!("'{name}' must not be empty"))
    } else {
        Ok(value)
    }
}

/// One content part, checked for the fields its type needs.
fn parse_part(part: &Value) -> Result<Part, String> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
    let parsed = Part::deserialize(part).map_err(|e| match kind {
        "" => "a content part needs a 'type'".to_string(),
        "input_text" | "input_image" | "input_file" | "output_text" | "refusal" => {
            format!("invalid '{kind}' part: {e}")
        }
        other => format!("unsupported content part type '{other}'"),
    })?;
    if let Part::InputImage {
        image_url: None,
        file_id: None,
        ..
    } = parsed
    {
        return Err("an 'input_image' part needs 'image_url' or 'file_id'".into());
    }
    Ok(parsed)
}

/// `conversation` of a create request: an id or `{"id": …}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ConversationParam {
    Id(String),
    Object { id: String },
}

impl ConversationParam {
    pub fn id(&self) -> &str {
        match self {
            ConversationParam::Id(id) | ConversationParam::Object { id } => id,
        }
    }
}

/// A `Response` object (SDK: `Response`). Every key the SDK declares is written, `null`
/// where there is no value, as OpenAI does: clients in stricter languages expect them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseObject {
    pub id: String,
    pub object: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `queued`, `in_progress`, `completed`, `incomplete`, `failed` or `cancelled`.
    pub status: String,
    pub background: bool,
    /// Unix seconds; only when `status` is `completed`.
    pub completed_at: Option<u64>,
    /// `{code, message}` of a failed response.
    pub error: Option<Value>,
    /// `{reason}` of an incomplete response.
    pub incomplete_details: Option<Value>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    pub max_tool_calls: Option<u64>,
    /// The alias the client asked for.
    pub model: String,
    pub output: Vec<Item>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub conversation: Option<ConversationRef>,
    pub prompt_cache_key: Option<String>,
    pub reasoning: Option<Value>,
    pub safety_identifier: Option<String>,
    pub service_tier: Option<String>,
    pub store: bool,
    pub temperature: Option<f64>,
    pub text: Value,
    pub tool_choice: Value,
    pub tools: Vec<Value>,
    pub top_logprobs: Option<u64>,
    pub top_p: Option<f64>,
    pub truncation: String,
    pub usage: Option<ResponseUsage>,
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// `conversation` of a `Response`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationRef {
    pub id: String,
}

/// SDK: `ResponseUsage` (every field required).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ResponseUsage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct InputTokensDetails {
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u64,
}

impl ResponseUsage {
    /// From a chat completion's usage, with its cached and reasoning token details.
    pub fn from_chat(usage: &crate::wire::chat::CompletionUsage) -> ResponseUsage {
        ResponseUsage {
            input_tokens: usage.prompt_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: usage
                    .prompt_tokens_details
                    .as_ref()
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(0),
                cache_write_tokens: 0,
            },
            output_tokens: usage.completion_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: usage
                    .completion_tokens_details
                    .as_ref()
                    .and_then(|d| d.reasoning_tokens)
                    .unwrap_or(0),
            },
            total_tokens: usage.total_tokens,
        }
    }

    /// The usage of two model calls of one turn (a tool loop's steps), added up.
    #[must_use]
    pub fn plus(self, other: ResponseUsage) -> ResponseUsage {
        ResponseUsage {
            input_tokens: self.input_tokens + other.input_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: self.input_tokens_details.cached_tokens
                    + other.input_tokens_details.cached_tokens,
                cache_write_tokens: self.input_tokens_details.cache_write_tokens
                    + other.input_tokens_details.cache_write_tokens,
            },
            output_tokens: self.output_tokens + other.output_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: self.output_tokens_details.reasoning_tokens
                    + other.output_tokens_details.reasoning_tokens,
            },
            total_tokens: self.total_tokens + other.total_tokens,
        }
    }

    /// From the three counts every provider reports.
    pub fn from_totals(usage: crate::wire::Usage) -> ResponseUsage {
        ResponseUsage {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
            ..ResponseUsage::default()
        }
    }
}

/// `text` of a create request (SDK: `ResponseTextConfigParam`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct TextConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verbosity: Option<String>,
}

/// Metadata: up to 16 pairs, keys up to 64 characters, values up to 512 (OpenAI's limits).
///
/// # Errors
/// 400 naming the limit that was passed.
pub fn check_metadata(
    metadata: &BTreeMap<String, String>,
    param: &'static str,
) -> Result<(), GatewayError> {
    if metadata.len() > 16 {
        return Err(GatewayError::invalid(
            format!(
                "Invalid '{param}': too many properties. Expected an object with at most 16 \
                 properties, but got {} instead.",
                metadata.len()
            ),
            Some(param),
        ));
    }
    for (key, value) in metadata {
        if key.chars().count() > 64 {
            return Err(GatewayError::invalid(
                format!("Invalid '{param}': key '{key}' is longer than 64 characters."),
                Some(param),
            ));
        }
        if value.chars().count() > 512 {
            return Err(GatewayError::invalid(
                format!("Invalid '{param}': the value of '{key}' is longer than 512 characters."),
                Some(param),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_string_input_is_one_user_message() {
        let items = parse_input(&json!("hi")).unwrap();
        assert_eq!(items.len(), 1);
        let Item::Message(m) = &items[0] else {
            panic!()
        };
        assert_eq!(m.role, MessageRole::User);
        assert!(is_id(&m.id, "msg"));
        assert_eq!(m.content, vec![Part::InputText { text: "hi".into() }]);
    }

    #[test]
    fn easy_messages_calls_and_outputs_parse_with_fresh_ids() {
        let items = parse_input(&json!([
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": "https://x/y.png"}
            ]},
            {"role": "assistant", "content": "ok", "id": "msg_old"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "id": "fc_1"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"}
        ]))
        .unwrap();
        assert_eq!(
            items.iter().map(Item::kind).collect::<Vec<_>>(),
            [
                "message",
                "message",
                "message",
                "function_call",
                "function_call_output"
            ]
        );
        assert_ne!(items[2].id(), "msg_old");
        assert_ne!(items[3].id(), "fc_1");
        let json: Value = serde_json::from_str(&items[2].to_json()).unwrap();
        assert_eq!(json["content"][0]["type"], "output_text");
        assert_eq!(json["content"][0]["annotations"], json!([]));
        // What is stored reads back as the same item.
        for item in &items {
            let back: Item = serde_json::from_str(&item.to_json()).unwrap();
            assert_eq!(&back, item);
        }
    }

    #[test]
    fn bad_items_name_their_place() {
        for (input, needle) in [
            (
                json!([{"role": "king", "content": "x"}]),
                "input[0]: 'role'",
            ),
            (
                json!([{"type": "function_call", "name": "f", "arguments": "{}"}]),
                "call_id",
            ),
            (json!([1]), "expected an object"),
            (json!([{"type": "bogus"}]), "unsupported item type 'bogus'"),
            (
                json!([{"role": "user", "content": [{"type": "input_image"}]}]),
                "image_url",
            ),
            (
                json!([{"role": "user", "content": [{"type": "audio"}]}]),
                "'audio'",
            ),
            (json!(5), "expected a string or an array"),
        ] {
            let err = parse_input(&input).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
    }

    #[test]
    fn ids_are_checked_by_prefix_and_alphabet() {
        assert!(is_id(&new_id("resp"), "resp"));
        assert!(!is_id("conv_123", "resp"));
        assert!(!is_id("resp_../../etc", "resp"));
        assert!(!is_id("resp_", "resp"));
        assert!(!is_id("resp_a%00", "resp"));
    }

    #[test]
    fn metadata_limits_are_openais() {
        let mut m: BTreeMap<String, String> =
            (0..16).map(|i| (i.to_string(), "v".into())).collect();
        assert!(check_metadata(&m, "metadata").is_ok());
        m.insert("x".into(), "v".into());
        assert!(check_metadata(&m, "metadata").is_err());
        let long_key = BTreeMap::from([("k".repeat(65), String::new())]);
        assert!(check_metadata(&long_key, "metadata").is_err());
        let long_value = BTreeMap::from([("k".into(), "v".repeat(513))]);
        assert!(check_metadata(&long_value, "metadata").is_err());
    }
}
