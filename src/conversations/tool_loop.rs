//! The server side of a turn's tool calls. When an alias offers configured tools
//! (`tools = [...]` in its `[models."…"]`), each model step's calls to them are run here,
//! all at once, and become `mcp_call` items (labelled `switchyard`) holding the call and its
//! output or error; the next step's chat call carries them as tool calls and tool results.
//! Calls to the client's own function tools are left as `function_call` items for the
//! client, and end the turn.

use bytes::Bytes;
use serde_json::Value;

use super::translate;
use crate::error::GatewayError;
use crate::tools::Tools;
use crate::wire::ChatRequest;
use crate::wire::responses::{Item, ItemStatus, McpCallItem, SERVER_TOOLS_LABEL, new_id};

/// Model calls one turn may make when the model keeps calling server tools. The last
/// step's server calls are not run: the turn ends `incomplete` (`max_tool_calls`).
pub const MAX_STEPS: usize = 8;

/// What became of one step's output.
pub struct Step {
    /// The output with the server's calls run (as `mcp_call` items).
    pub items: Vec<Item>,
    /// Server calls were made: the model should see their outputs.
    pub ran: bool,
    /// Calls to the client's function tools are among them: the turn ends here.
    pub client_calls: bool,
}

/// Runs the server's calls in `items` concurrently (each under its tool's bounds); calls
/// beyond `calls_left` (the request's `max_tool_calls`), or every call when `last` is set,
/// are recorded as not run.
pub async fn run_step(
    tools: &Tools,
    server: &[String],
    items: Vec<Item>,
    calls_left: &mut Option<u64>,
    last: bool,
) -> Step {
    let mut client_calls = false;
    let mut pending = Vec::new();
    let mut out: Vec<Item> = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Item::FunctionCall(call) if server.contains(&call.name) => {
                let mut mcp = McpCallItem {
                    id: new_id("mcp"),
                    server_label: SERVER_TOOLS_LABEL.to_owned(),
                    name: call.name,
                    arguments: call.arguments,
                    output: None,
                    error: None,
                    status: ItemStatus::Completed,
                };
                let allowed = !last && calls_left.is_none_or(|left| left > 0);
                if allowed {
                    if let Some(left) = calls_left.as_mut() {
                        *left -= 1;
                    }
                    pending.push(out.len());
                } else {
                    mcp.status = ItemStatus::Incomplete;
                    mcp.error = Some(if last {
                        format!("not run: the turn reached its limit of {MAX_STEPS} model calls")
                    } else {
                        "not run: max_tool_calls reached".to_owned()
                    });
                }
                out.push(Item::McpCall(mcp));
            }
            Item::FunctionCall(call) => {
                client_calls = true;
                out.push(Item::FunctionCall(call));
            }
            other => out.push(other),
        }
    }
    let runs = pending.iter().map(|&at| {
        let Item::McpCall(call) = &out[at] else {
            unreachable!("pending holds the positions of mcp_call items")
        };
        let name = call.name.clone();
        let arguments = Value::String(call.arguments.clone());
        async move { (at, tools.invoke(&name, &arguments).await) }
    });
    let results = futures_util::future::join_all(runs).await;
    let ran = !results.is_empty();
    for (at, result) in results {
        if let Item::McpCall(call) = &mut out[at] {
            match result {
                Ok(invocation) => match invocation.output {
                    Ok(output) => call.output = Some(output.to_string()),
                    Err(error) => call.error = Some(error),
                },
                // Arguments the model got wrong: said back to it, to correct.
                Err(e) => call.error = Some(e.to_string()),
            }
        }
    }
    Step {
        items: out,
        ran,
        client_calls,
    }
}

/// The chat call of the next step: the first step's request with the output so far
/// appended to its messages, never streamed (a step's items are streamed once complete).
///
/// # Errors
/// When the first step's messages cannot be read back (they were written by us).
pub fn next_chat(first: &ChatRequest, output: &[Item]) -> Result<ChatRequest, GatewayError> {
    let base = first.object.raw("messages").unwrap_or("[]");
    let added = translate::to_messages(None, output)?;
    let added = serde_json::to_string(&added)
        .map_err(|e| GatewayError::Internal(format!("tool messages: {e}")))?;
    // Both arrays are compact JSON written by serde: join them without parsing either.
    let messages = match (base.trim(), added.as_str()) {
        (base, "[]") => base.to_owned(),
        ("[]", added) => added.to_owned(),
        (base, added) => format!("{},{}", &base[..base.len() - 1], &added[1..]),
    };
    unstreamed(first, Some(&messages))
}

/// `request` as a whole-answer call, its messages replaced when given.
///
/// # Errors
/// As [`ChatRequest::parse`].
pub fn unstreamed(
    request: &ChatRequest,
    messages: Option<&str>,
) -> Result<ChatRequest, GatewayError> {
    let mut overrides = vec![("stream", Some("false")), ("stream_options", None)];
    if let Some(messages) = messages {
        overrides.push(("messages", Some(messages)));
    }
    ChatRequest::parse(Bytes::from(request.object.rewrite(&overrides)))
}
