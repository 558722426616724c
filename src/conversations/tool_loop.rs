//! The server side of a turn's tool calls. When an alias offers configured tools
//! (`tools = [...]` in its `[models."…"]`), each model step's calls to them are run here,
//! all at once, and become `mcp_call` items (labelled `switchyard`) holding the call and its
//! output or error; the next step's chat call carries them as tool calls and tool results.
//! Calls to the client's own function tools are left as `function_call` items for the
//! client, and end the turn. Calls to an MCP server's tools become `mcp_call` items under
//! the server's label, or, when the server's policy asks for it, `mcp_approval_request`
//! items that end the turn until the client answers.

use bytes::Bytes;
use serde_json::Value;

use super::mcp::{Answered, McpOffer};
use super::translate;
use crate::error::GatewayError;
use crate::tools::Tools;
use crate::tools::search::{self, SearchOptions, SearchResult};
use crate::wire::ChatRequest;
use crate::wire::responses::{
    Item, ItemStatus, McpApprovalRequestItem, McpCallItem, Part, SERVER_TOOLS_LABEL, SearchAction,
    SearchSource, WebSearchCallItem, new_id,
};

/// The tools a turn's model was offered that the server runs.
pub struct Offered<'a> {
    /// The operator's configured tools (and the built-in ones) by name.
    pub configured: &'a [String],
    pub mcp: &'a [McpOffer],
    /// The request's options for its searches.
    pub search: &'a SearchOptions,
    /// The turn's limit of model calls (`[tool_loop] max_steps`).
    pub max_steps: usize,
}

/// What became of one step's output.
pub struct Step {
    /// The output with the server's calls run (as `mcp_call` items).
    pub items: Vec<Item>,
    /// Server calls were made: the model should see their outputs.
    pub ran: bool,
    /// Calls to the client's function tools, or calls waiting for its approval, are among
    /// them: the turn ends here.
    pub client_calls: bool,
    /// Some server calls were not run (a limit was reached).
    pub held: bool,
}

/// Runs the server's calls in `items` concurrently (each under its tool's bounds); calls
/// beyond `calls_left` (the request's `max_tool_calls`), or every call when `last` is set,
/// are recorded as not run.
pub async fn run_step(
    tools: &Tools,
    metering: &crate::inference::Metering,
    offered: &Offered<'_>,
    items: Vec<Item>,
    calls_left: &mut Option<u64>,
    last: bool,
) -> Step {
    let (server, offers) = (offered.configured, offered.mcp);
    let mut client_calls = false;
    let mut held = false;
    let mut pending: Vec<(usize, String)> = Vec::new();
    let mut remote: Vec<(usize, &McpOffer)> = Vec::new();
    let mut out: Vec<Item> = Vec::with_capacity(items.len());
    for item in items {
        let mcp_tool = match &item {
            Item::FunctionCall(call) => offers
                .iter()
                .find_map(|o| o.tool(&call.name).map(|t| (o, t))),
            _ => None,
        };
        if let (Some((offer, tool)), Item::FunctionCall(call)) = (mcp_tool, &item) {
            let label = offer.server.label().to_owned();
            if offer.approval.required(tool) {
                client_calls = true;
                out.push(Item::McpApprovalRequest(McpApprovalRequestItem {
                    id: new_id("mcpr"),
                    server_label: label,
                    name: tool.name.clone(),
                    arguments: call.arguments.clone(),
                }));
                continue;
            }
            let mut mcp = McpCallItem {
                id: new_id("mcp"),
                server_label: label,
                name: tool.name.clone(),
                arguments: call.arguments.clone(),
                output: None,
                error: None,
                status: ItemStatus::Completed,
                approval_request_id: None,
            };
            if take_call(calls_left, last) {
                remote.push((out.len(), offer));
            } else {
                held = true;
                mcp.status = ItemStatus::Incomplete;
                mcp.error = Some(not_run(last, offered.max_steps));
            }
            out.push(Item::McpCall(mcp));
            continue;
        }
        match item {
            Item::FunctionCall(call)
                if call.name == search::NAME && server.contains(&call.name) =>
            {
                let query = serde_json::from_str::<Value>(&call.arguments)
                    .ok()
                    .and_then(|a| a.get("query").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default();
                let mut item = WebSearchCallItem {
                    id: new_id("ws"),
                    action: SearchAction {
                        kind: "search".into(),
                        query,
                        sources: Vec::new(),
                    },
                    status: "completed".into(),
                    output: None,
                };
                if take_call(calls_left, last) {
                    pending.push((out.len(), offered.search.apply(&call.arguments)));
                } else {
                    held = true;
                    item.status = "failed".into();
                    item.output = Some(not_run(last, offered.max_steps));
                }
                out.push(Item::WebSearchCall(item));
            }
            Item::FunctionCall(call) if server.contains(&call.name) => {
                let mut mcp = McpCallItem {
                    id: new_id("mcp"),
                    server_label: SERVER_TOOLS_LABEL.to_owned(),
                    name: call.name,
                    arguments: call.arguments,
                    output: None,
                    error: None,
                    status: ItemStatus::Completed,
                    approval_request_id: None,
                };
                if take_call(calls_left, last) {
                    pending.push((out.len(), mcp.arguments.clone()));
                } else {
                    held = true;
                    mcp.status = ItemStatus::Incomplete;
                    mcp.error = Some(not_run(last, offered.max_steps));
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
    let runs = pending.into_iter().map(|(at, arguments)| {
        let name = match &out[at] {
            Item::WebSearchCall(_) => search::NAME.to_owned(),
            Item::McpCall(call) => call.name.clone(),
            _ => String::new(),
        };
        async move {
            let result = tools
                .invoke(&name, &Value::String(arguments), Some(metering))
                .await;
            // Arguments the model got wrong: said back to it, to correct.
            let result = match result {
                Ok(invocation) => invocation.output.map(|o| o.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (at, result)
        }
    });
    let remote_runs = remote.into_iter().map(|(at, offer)| {
        let (name, arguments) = match &out[at] {
            Item::McpCall(call) => (call.name.clone(), call.arguments.clone()),
            _ => (String::new(), String::new()),
        };
        async move { (at, call_mcp(offer, &name, &arguments, metering).await) }
    });
    let (mut results, remote_results) = futures_util::future::join(
        futures_util::future::join_all(runs),
        futures_util::future::join_all(remote_runs),
    )
    .await;
    results.extend(remote_results);
    let ran = !results.is_empty();
    for (at, result) in results {
        match (&mut out[at], result) {
            (Item::McpCall(call), Ok(output)) => call.output = Some(output),
            (Item::McpCall(call), Err(error)) => call.error = Some(error),
            (Item::WebSearchCall(search), Ok(output)) => {
                let found: Vec<SearchResult> = serde_json::from_str(&output).unwrap_or_default();
                search.action.sources = found
                    .into_iter()
                    .map(|r| SearchSource {
                        kind: "url".into(),
                        url: r.url,
                    })
                    .collect();
                search.output = Some(output);
            }
            (Item::WebSearchCall(search), Err(error)) => {
                search.status = "failed".into();
                search.output = Some(format!("error: {error}"));
            }
            _ => {}
        }
    }
    Step {
        items: out,
        ran,
        client_calls,
        held,
    }
}

/// Runs one call on an MCP server, metered as a tool call named `label.tool`.
pub(super) async fn call_mcp(
    offer: &McpOffer,
    name: &str,
    arguments: &str,
    metering: &crate::inference::Metering,
) -> Result<String, String> {
    let started = std::time::Instant::now();
    let result = match serde_json::from_str::<serde_json::Map<String, Value>>(arguments) {
        Ok(arguments) => offer.server.call(name, arguments).await,
        // Arguments the model got wrong: said back to it, to correct.
        Err(_) if arguments.trim().is_empty() => offer.server.call(name, Default::default()).await,
        Err(_) => Err("the arguments are not a JSON object".to_owned()),
    };
    let status = match &result {
        Ok(_) => 200,
        Err(e) if e.starts_with("timed out") => 504,
        Err(_) => 502,
    };
    let label = offer.server.label();
    metrics::counter!("switchyard_mcp_calls_total", "server" => label.to_owned(),
        "outcome" => if result.is_ok() { "ok" } else { "error" })
    .increment(1);
    metering.tool_call(&format!("{label}.{name}"), started.elapsed(), status, false);
    result
}

/// The calls the client answered, as `mcp_call` items: an approved call run (all at
/// once), a refused one with the refusal as its error, for the model to read.
pub async fn run_answered(
    answered: Vec<Answered>,
    offers: &[McpOffer],
    metering: &crate::inference::Metering,
) -> Vec<Item> {
    let runs = answered.into_iter().map(|answer| async move {
        let request = answer.request;
        let mut call = McpCallItem {
            id: new_id("mcp"),
            server_label: request.server_label.clone(),
            name: request.name.clone(),
            arguments: request.arguments.clone(),
            output: None,
            error: None,
            status: ItemStatus::Completed,
            approval_request_id: Some(request.id.clone()),
        };
        let offer = offers
            .iter()
            .find(|o| o.server.label() == request.server_label);
        match offer {
            Some(offer) if answer.approve => {
                match call_mcp(offer, &request.name, &request.arguments, metering).await {
                    Ok(output) => call.output = Some(output),
                    Err(error) => call.error = Some(error),
                }
            }
            _ => {
                call.status = ItemStatus::Incomplete;
                call.error = Some(match answer.reason {
                    Some(reason) => format!("the user did not approve this call: {reason}"),
                    None => "the user did not approve this call".to_owned(),
                });
            }
        }
        Item::McpCall(call)
    });
    futures_util::future::join_all(runs).await
}

/// Adds a `url_citation` annotation to the answer's text wherever it quotes the URL of a
/// result of this turn's searches (in `earlier` or `items`), with the result's title.
pub fn cite(earlier: &[Item], items: &mut [Item]) {
    let mut sources: Vec<SearchResult> = Vec::new();
    for item in earlier.iter().chain(items.iter()) {
        if let Item::WebSearchCall(search) = item
            && let Some(output) = &search.output
        {
            let found: Vec<SearchResult> = serde_json::from_str(output).unwrap_or_default();
            for result in found {
                if !sources.iter().any(|s| s.url == result.url) {
                    sources.push(result);
                }
            }
        }
    }
    if sources.is_empty() {
        return;
    }
    for item in items {
        let Item::Message(message) = item else {
            continue;
        };
        for part in &mut message.content {
            if let Part::OutputText {
                text, annotations, ..
            } = part
            {
                for source in &sources {
                    for (start, end) in quoted(text, &source.url) {
                        let exists = annotations.iter().any(|a| {
                            a.get("start_index").and_then(Value::as_u64) == Some(start as u64)
                                && a.get("url").and_then(Value::as_str) == Some(&*source.url)
                        });
                        if !exists {
                            annotations.push(serde_json::json!({
                                "type": "url_citation",
                                "start_index": start,
                                "end_index": end,
                                "url": source.url,
                                "title": source.title,
                            }));
                        }
                    }
                }
                annotations.sort_by_key(|a| a.get("start_index").and_then(Value::as_u64));
            }
        }
    }
}

/// Where `url` stands whole in `text` (not as the start of a longer URL), as character
/// offsets `[start, end)`.
fn quoted(text: &str, url: &str) -> Vec<(usize, usize)> {
    let continues = |c: char| c.is_alphanumeric() || "/-_?=&%#~+".contains(c);
    text.match_indices(url)
        .filter(|(at, _)| {
            text[at + url.len()..]
                .chars()
                .next()
                .is_none_or(|c| !continues(c))
        })
        .map(|(at, _)| {
            let start = text[..at].chars().count();
            (start, start + url.chars().count())
        })
        .collect()
}

/// Whether one more server call may run (not on the last step, and within the request's
/// `max_tool_calls`), counting it when it may.
fn take_call(calls_left: &mut Option<u64>, last: bool) -> bool {
    match calls_left {
        _ if last => false,
        Some(0) => false,
        Some(left) => {
            *left -= 1;
            true
        }
        None => true,
    }
}

/// Why a call was not run.
fn not_run(last: bool, max_steps: usize) -> String {
    if last {
        format!("not run: the turn reached its limit of {max_steps} model calls")
    } else {
        "not run: max_tool_calls reached".to_owned()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::responses::{MessageItem, MessageRole};

    #[test]
    fn a_quoted_result_url_is_cited_with_its_title() {
        let found = serde_json::to_string(&vec![SearchResult {
            title: "Soup".into(),
            url: "https://news.example/soup".into(),
            snippet: String::new(),
        }])
        .unwrap();
        let search = Item::WebSearchCall(WebSearchCallItem {
            id: new_id("ws"),
            action: SearchAction {
                kind: "search".into(),
                query: "soup".into(),
                sources: Vec::new(),
            },
            status: "completed".into(),
            output: Some(found),
        });
        let text = "Voilà: https://news.example/soup. Not https://news.example/soups.";
        let mut items = vec![Item::Message(MessageItem {
            id: new_id("msg"),
            status: ItemStatus::Completed,
            role: MessageRole::Assistant,
            content: vec![Part::OutputText {
                text: text.into(),
                annotations: Vec::new(),
                logprobs: Vec::new(),
            }],
        })];
        cite(&[search], &mut items);
        let Item::Message(message) = &items[0] else {
            unreachable!()
        };
        let Part::OutputText { annotations, .. } = &message.content[0] else {
            unreachable!()
        };
        assert_eq!(annotations.len(), 1, "{annotations:?}");
        let a = &annotations[0];
        assert_eq!(a["type"], "url_citation");
        assert_eq!(a["title"], "Soup");
        // Character offsets: "Voilà: " is 7 characters (8 bytes).
        assert_eq!(
            (a["start_index"].as_u64(), a["end_index"].as_u64()),
            (Some(7), Some(32))
        );
    }
}
