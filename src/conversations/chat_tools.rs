//! The server's tool loop for `/v1/chat/completions` clients that opt in with
//! `x-switchyard-tools: auto` (an extension): the alias's configured tools (`tools = [...]`:
//! HTTP tools, `web_search`, `fetch_url`, MCP servers) are added to the request's
//! functions, and while the model calls them the server runs the calls in parallel,
//! appends the assistant's calls and their results to the messages and asks again. The
//! client gets the last answer, with the usage of every step summed; calls to its own
//! functions come back to it as usual. A step that calls both kinds has the server's calls
//! run and the model asked again without the client's (a chat request must answer every
//! call it carries).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};

use super::Conversations;
use super::mcp::{self, McpOffer};
use super::tool_loop::call_mcp;
use crate::error::GatewayError;
use crate::inference::{CallContext, ChatReply, Completion};
use crate::wire::ChatRequest;

/// The opt-in header and its one value.
pub const HEADER: &str = "x-switchyard-tools";

/// A model's call to a server-side tool, with where it runs.
enum Runs<'a> {
    Tool(String),
    Mcp(&'a McpOffer, String),
}

impl Conversations {
    /// Whether `alias` offers server-side tools (the opt-in has an effect).
    pub fn offers_tools(&self, alias: &str) -> bool {
        self.server_tools.get(alias).is_some_and(|t| !t.is_empty())
    }

    /// Runs `request` through the tool loop and returns the last step's whole answer.
    ///
    /// # Errors
    /// The model calls' refusals and failures, as for any chat call; 400 for a body whose
    /// messages or tools are not lists.
    pub async fn chat_with_tools(
        self: &Arc<Self>,
        ctx: &CallContext,
        request: ChatRequest,
    ) -> Result<Completion, GatewayError> {
        let names = self
            .server_tools
            .get(&request.model)
            .cloned()
            .unwrap_or_default();
        let mut messages: Vec<Value> = parse_list(&request, "messages")?;
        let mut tools: Vec<Value> = parse_list(&request, "tools")?;
        let client_defines = |name: &str| {
            tools
                .iter()
                .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
        };
        let configured: Vec<String> = names
            .iter()
            .filter(|n| self.tools.contains(n) && !client_defines(n))
            .cloned()
            .collect();
        let labels: Vec<String> = names
            .iter()
            .filter(|n| !self.tools.contains(n))
            .cloned()
            .collect();
        // Servers are contacted for a model the key may call only.
        if ctx
            .principal
            .as_ref()
            .is_some_and(|p| !p.may_use(&request.model))
        {
            return Err(GatewayError::ModelNotFound(request.model.clone()));
        }
        let owner = ctx.principal.as_ref().map(|p| &*p.key_id);
        let offered = mcp::offer(&self.tools, owner, &[], &labels, &[]).await?;
        let mut added: Vec<Value> = configured
            .iter()
            .filter_map(|n| self.tools.chat_definition(n))
            .collect();
        for offer in &offered.offers {
            added.extend(offer.chat_definitions());
        }
        tools.extend(added);
        let tools_json = serde_json::to_string(&tools)
            .map_err(|e| GatewayError::Internal(format!("tools: {e}")))?;
        let mut usage = [0u64; 3];
        let mut step = 0;
        loop {
            step += 1;
            let messages_json = serde_json::to_string(&messages)
                .map_err(|e| GatewayError::Internal(format!("messages: {e}")))?;
            let body = request.object.rewrite(&[
                ("messages", Some(&messages_json)),
                ("tools", Some(&tools_json)),
                ("stream", Some("false")),
                ("stream_options", None),
            ]);
            let chat = ChatRequest::parse(Bytes::from(body))?;
            let mut completion = match self.inference.chat(ctx, chat).await? {
                ChatReply::Complete(completion) => completion,
                ChatReply::Stream(_) => {
                    return Err(GatewayError::Internal(
                        "a stream came back for a whole-answer call".into(),
                    ));
                }
            };
            let answer: Value = serde_json::from_slice(&completion.body).map_err(|e| {
                GatewayError::Internal(format!("the model's answer could not be read: {e}"))
            })?;
            for (sum, field) in
                usage
                    .iter_mut()
                    .zip(["prompt_tokens", "completion_tokens", "total_tokens"])
            {
                *sum += answer
                    .pointer(&format!("/usage/{field}"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
            }
            let message = answer.pointer("/choices/0/message").cloned();
            let calls: Vec<Value> = message
                .as_ref()
                .and_then(|m| m.get("tool_calls"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let server_calls: Vec<(Value, Runs<'_>)> = calls
                .into_iter()
                .filter_map(|call| {
                    let name = call.pointer("/function/name")?.as_str()?.to_owned();
                    if configured.contains(&name) {
                        return Some((call, Runs::Tool(name)));
                    }
                    offered.offers.iter().find_map(|offer| {
                        offer
                            .tool(&name)
                            .map(|tool| (call.clone(), Runs::Mcp(offer, tool.name.clone())))
                    })
                })
                .collect();
            if server_calls.is_empty() || step >= self.tools.max_steps() {
                if step > 1 {
                    completion = with_usage(completion, answer, usage);
                }
                return Ok(completion);
            }
            let results = futures_util::future::join_all(server_calls.iter().map(
                |(call, runs)| async move {
                    let arguments = call
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or("{}");
                    let result = match runs {
                        Runs::Tool(name) => self
                            .tools
                            .invoke(
                                name,
                                &Value::String(arguments.to_owned()),
                                Some(&ctx.metering),
                            )
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|i| i.output.map(|o| o.to_string())),
                        Runs::Mcp(offer, tool) => {
                            call_mcp(offer, tool, arguments, &ctx.metering).await
                        }
                    };
                    result.unwrap_or_else(|error| format!("error: {error}"))
                },
            ))
            .await;
            let mut assistant = message.unwrap_or_else(|| json!({"role": "assistant"}));
            assistant["tool_calls"] =
                Value::Array(server_calls.iter().map(|(c, _)| c.clone()).collect());
            messages.push(assistant);
            for ((call, _), output) in server_calls.iter().zip(results) {
                messages.push(json!({
                    "role": "tool",
                    "tool_call_id": call.get("id").cloned().unwrap_or(Value::Null),
                    "content": output,
                }));
            }
        }
    }
}

/// A list field of the request (absent: empty).
fn parse_list(request: &ChatRequest, field: &'static str) -> Result<Vec<Value>, GatewayError> {
    match request.object.raw(field) {
        None | Some("null") => Ok(Vec::new()),
        Some(raw) => serde_json::from_str(raw).map_err(|_| {
            GatewayError::invalid(format!("'{field}' must be an array."), Some(field))
        }),
    }
}

/// The last answer with the usage of every step.
fn with_usage(mut completion: Completion, mut answer: Value, usage: [u64; 3]) -> Completion {
    answer["usage"] = json!({
        "prompt_tokens": usage[0],
        "completion_tokens": usage[1],
        "total_tokens": usage[2],
    });
    if let Ok(body) = serde_json::to_vec(&answer) {
        completion.body = Bytes::from(body);
    }
    completion.usage = Some(crate::wire::Usage {
        prompt_tokens: usage[0],
        completion_tokens: usage[1],
        total_tokens: usage[2],
    });
    completion
}
