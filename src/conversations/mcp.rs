//! A turn's MCP servers: OpenAI's `{"type": "mcp"}` tools of the request and the alias's
//! configured servers, each listed and offered to the model as functions; and the
//! approvals a client sends back (`mcp_approval_response`) for calls that waited for one.

use std::sync::Arc;

use serde_json::Value;

use crate::error::GatewayError;
use crate::tools::Tools;
use crate::tools::mcp::{Approval, McpServer, McpTool, ToolFilter, function_name};
use crate::wire::responses::{
    Item, McpApprovalRequestItem, McpListToolsItem, SERVER_TOOLS_LABEL, new_id,
};

/// A request's `{"type": "mcp", …}` tool, read and checked.
#[derive(Debug, Clone)]
pub struct McpRequest {
    pub label: String,
    /// Absent: the configured server of that label.
    pub url: Option<String>,
    pub headers: Vec<(String, String)>,
    pub allowed: Option<ToolFilter>,
    pub approval: Option<Approval>,
}

/// A server whose tools the model is offered in this turn.
pub struct McpOffer {
    pub server: Arc<McpServer>,
    /// Each tool with the function name the model calls it by.
    pub tools: Vec<(String, McpTool)>,
    pub approval: Approval,
}

impl McpOffer {
    /// The tool the model's function `name` is, when it is one of this server's.
    pub fn tool(&self, function: &str) -> Option<&McpTool> {
        self.tools
            .iter()
            .find(|(name, _)| name == function)
            .map(|(_, tool)| tool)
    }

    /// Each tool as a Chat Completions function.
    pub fn chat_definitions(&self) -> impl Iterator<Item = Value> + '_ {
        self.tools.iter().map(|(name, tool)| {
            serde_json::json!({
                "type": "function",
                "function": {
                    "name": name,
                    "description": tool.description.clone().unwrap_or_default(),
                    "parameters": tool.input_schema,
                },
            })
        })
    }
}

/// A call the client has answered: run it (approved) or tell the model it was refused.
pub struct Answered {
    pub request: McpApprovalRequestItem,
    pub approve: bool,
    pub reason: Option<String>,
}

fn bad(index: usize, what: &str) -> GatewayError {
    GatewayError::InvalidRequest {
        message: format!("Invalid value for 'tools[{index}]': {what}."),
        param: Some("tools"),
        code: Some("invalid_value"),
    }
}

/// Reads the `mcp` tool at `tools[index]`.
///
/// # Errors
/// 400 naming what is wrong.
pub fn parse_tool(tool: &Value, index: usize) -> Result<McpRequest, GatewayError> {
    let label = tool
        .get("server_label")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let valid = !label.is_empty()
        && label.len() <= 64
        && !label.contains("__")
        && label != SERVER_TOOLS_LABEL
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(bad(
            index,
            "'server_label' must be 1-64 letters, digits, '_' or '-' (no \"__\")",
        ));
    }
    if tool.get("connector_id").is_some_and(|c| !c.is_null()) {
        return Err(bad(index, "connectors are not available on this server"));
    }
    let url = match tool.get("server_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => Some(url.clone()),
        Some(_) => return Err(bad(index, "'server_url' must be a string")),
    };
    let mut headers = Vec::new();
    match tool.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                let Some(value) = value.as_str() else {
                    return Err(bad(index, "'headers' values must be strings"));
                };
                headers.push((name.clone(), value.to_owned()));
            }
        }
        Some(_) => return Err(bad(index, "'headers' must be an object")),
    }
    match tool.get("authorization") {
        None | Some(Value::Null) => {}
        Some(Value::String(token)) => {
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        Some(_) => return Err(bad(index, "'authorization' must be a string")),
    }
    let allowed = match tool.get("allowed_tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(names)) => Some(ToolFilter {
            tool_names: Some(names_of(names).ok_or_else(|| {
                bad(
                    index,
                    "'allowed_tools' must be a list of tool names or a filter",
                )
            })?),
            read_only: None,
        }),
        Some(filter @ Value::Object(_)) => Some(
            parse_filter(filter)
                .ok_or_else(|| bad(index, "'allowed_tools' is not a valid filter"))?,
        ),
        Some(_) => {
            return Err(bad(
                index,
                "'allowed_tools' must be a list of tool names or a filter",
            ));
        }
    };
    let approval = match tool.get("require_approval") {
        None | Some(Value::Null) => None,
        Some(Value::String(mode)) if mode == "always" => Some(Approval::Always),
        Some(Value::String(mode)) if mode == "never" => Some(Approval::Never),
        Some(Value::Object(fields)) => {
            // Tools matching `never` run at once; everything else (matching `always` or
            // not) waits for approval.
            let never = match fields.get("never") {
                None | Some(Value::Null) => ToolFilter::default(),
                Some(filter) => parse_filter(filter)
                    .ok_or_else(|| bad(index, "'require_approval.never' is not a valid filter"))?,
            };
            if let Some(always) = fields.get("always").filter(|a| !a.is_null())
                && parse_filter(always).is_none()
            {
                return Err(bad(
                    index,
                    "'require_approval.always' is not a valid filter",
                ));
            }
            Some(Approval::Filter { never })
        }
        Some(_) => {
            return Err(bad(
                index,
                "'require_approval' must be 'always', 'never' or a filter",
            ));
        }
    };
    Ok(McpRequest {
        label: label.to_owned(),
        url,
        headers,
        allowed,
        approval,
    })
}

fn names_of(values: &[Value]) -> Option<Vec<String>> {
    values
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// `{"tool_names": [...], "read_only": bool}`.
fn parse_filter(value: &Value) -> Option<ToolFilter> {
    let fields = value.as_object()?;
    let tool_names = match fields.get("tool_names") {
        None | Some(Value::Null) => None,
        Some(Value::Array(names)) => Some(names_of(names)?),
        Some(_) => return None,
    };
    let read_only = match fields.get("read_only") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return None,
    };
    Some(ToolFilter {
        tool_names,
        read_only,
    })
}

/// What a turn's MCP servers give it: the servers offered, and the `mcp_list_tools` items
/// that open its output.
#[derive(Default)]
pub struct Offered {
    pub offers: Vec<McpOffer>,
    pub listed: Vec<Item>,
}

/// Connects to (or reuses the session of) each server the request names and each the
/// alias offers, and lists their tools. A request's server is listed in the output unless
/// the conversation so far already holds its list; a server that cannot be listed is
/// listed with its error and not offered.
///
/// # Errors
/// 400 for a label no configured server has (and no `server_url`), or a `server_url` that
/// may not be reached.
pub async fn offer(
    tools: &Tools,
    owner: Option<&str>,
    requested: &[McpRequest],
    configured: &[String],
    history: &[&Item],
) -> Result<Offered, GatewayError> {
    let mut offered = Offered::default();
    let mut servers: Vec<(Arc<McpServer>, Option<&McpRequest>)> = Vec::new();
    for request in requested {
        let server =
            match &request.url {
                Some(url) => tools
                    .request_mcp_server(owner, &request.label, url, &request.headers)
                    .await
                    .map_err(|why| GatewayError::InvalidRequest {
                        message: format!(
                            "Invalid value for 'tools': the MCP server '{}' cannot be used: {why}",
                            request.label
                        ),
                        param: Some("tools"),
                        code: Some("invalid_value"),
                    })?,
                None => tools.mcp_server(&request.label).ok_or_else(|| {
                    GatewayError::InvalidRequest {
                        message: format!(
                            "Invalid value for 'tools': no MCP server labelled '{}' is configured \
                         here; give its 'server_url'.",
                            request.label
                        ),
                        param: Some("tools"),
                        code: Some("invalid_value"),
                    }
                })?,
            };
        servers.push((server, Some(request)));
    }
    for label in configured {
        if requested.iter().any(|r| r.label == *label) {
            continue;
        }
        if let Some(server) = tools.mcp_server(label) {
            servers.push((server, None));
        }
    }
    // Listed concurrently: a turn waits for the slowest server once, not for their sum.
    let lists = futures_util::future::join_all(servers.iter().map(|(s, _)| s.tools())).await;
    for ((server, request), listed) in servers.into_iter().zip(lists) {
        let label = server.label().to_owned();
        let shown = request.is_some()
            && !history.iter().any(|item| {
                matches!(item, Item::McpListTools(l) if l.server_label == label && l.error.is_none())
            });
        match listed {
            Ok(all) => {
                let kept: Vec<(String, McpTool)> = all
                    .iter()
                    .filter(|t| {
                        request
                            .and_then(|r| r.allowed.as_ref())
                            .is_none_or(|f| f.matches(t))
                    })
                    .map(|t| (function_name(&label, &t.name), t.clone()))
                    .collect();
                if shown {
                    offered.listed.push(Item::McpListTools(McpListToolsItem {
                        id: new_id("mcpl"),
                        server_label: label.clone(),
                        tools: kept.iter().map(|(_, t)| t.listed()).collect(),
                        error: None,
                    }));
                }
                let approval = request
                    .and_then(|r| r.approval.clone())
                    .unwrap_or_else(|| server.approval().clone());
                offered.offers.push(McpOffer {
                    server,
                    tools: kept,
                    approval,
                });
            }
            Err(error) => {
                tracing::warn!(server = %label, %error, "MCP server not listed");
                offered.listed.push(Item::McpListTools(McpListToolsItem {
                    id: new_id("mcpl"),
                    server_label: label,
                    tools: Vec::new(),
                    error: Some(error),
                }));
            }
        }
    }
    Ok(offered)
}

/// The approval responses in `input`, each with the request it answers (found in the
/// conversation so far).
///
/// # Errors
/// 400 for a response to no known request, or to a server this request does not offer.
pub fn answered(
    input: &[&Item],
    history: &[&Item],
    offers: &[McpOffer],
) -> Result<Vec<Answered>, GatewayError> {
    let mut out = Vec::new();
    for item in input {
        let Item::McpApprovalResponse(response) = item else {
            continue;
        };
        let request = history
            .iter()
            .chain(input.iter())
            .find_map(|item| match item {
                Item::McpApprovalRequest(r) if r.id == response.approval_request_id => Some(r),
                _ => None,
            })
            .ok_or_else(|| {
                GatewayError::invalid(
                    format!(
                        "No mcp_approval_request with id '{}' in this conversation.",
                        response.approval_request_id
                    ),
                    Some("input"),
                )
            })?;
        if !offers
            .iter()
            .any(|o| o.server.label() == request.server_label)
        {
            return Err(GatewayError::invalid(
                format!(
                    "The approved call is to MCP server '{}', which is not among this \
                     request's tools; send its mcp tool again.",
                    request.server_label
                ),
                Some("tools"),
            ));
        }
        // An answered request already run (a retried request) is not run twice.
        let ran = history.iter().any(|item| {
            matches!(item, Item::McpCall(c) if c.approval_request_id.as_deref() == Some(&*request.id))
        });
        if !ran {
            out.push(Answered {
                request: request.clone(),
                approve: response.approve,
                reason: response.reason.clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mcp_tools_are_read_as_openai_defines_them() {
        let tool = parse_tool(
            &json!({
                "type": "mcp", "server_label": "docs", "server_url": "https://mcp.example/mcp",
                "headers": {"X-Key": "k"}, "authorization": "tok",
                "allowed_tools": ["search"], "require_approval": "never"
            }),
            0,
        )
        .unwrap();
        assert_eq!(tool.label, "docs");
        assert_eq!(tool.url.as_deref(), Some("https://mcp.example/mcp"));
        assert!(
            tool.headers
                .contains(&("authorization".into(), "Bearer tok".into()))
        );
        assert_eq!(tool.approval, Some(Approval::Never));
        assert_eq!(
            tool.allowed.unwrap().tool_names,
            Some(vec!["search".to_owned()])
        );
        let filtered = parse_tool(
            &json!({"type": "mcp", "server_label": "d",
                    "require_approval": {"never": {"read_only": true}}}),
            0,
        )
        .unwrap();
        assert!(matches!(filtered.approval, Some(Approval::Filter { .. })));
        for bad in [
            json!({"type": "mcp"}),
            json!({"type": "mcp", "server_label": "a b"}),
            json!({"type": "mcp", "server_label": "a__b"}),
            json!({"type": "mcp", "server_label": "switchyard"}),
            json!({"type": "mcp", "server_label": "a", "connector_id": "connector_gmail"}),
            json!({"type": "mcp", "server_label": "a", "headers": {"x": 1}}),
            json!({"type": "mcp", "server_label": "a", "allowed_tools": [1]}),
            json!({"type": "mcp", "server_label": "a", "require_approval": "sometimes"}),
        ] {
            let err = parse_tool(&bad, 2).unwrap_err().to_string();
            assert!(err.contains("tools[2]"), "{bad}: {err}");
        }
    }
}
