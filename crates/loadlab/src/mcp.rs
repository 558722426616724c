//! A small MCP server (the official Rust SDK, rmcp) with deterministic tools: served by
//! the mock upstream over streamable HTTP at `/mcp`, and over stdio by
//! `switchyard mock-upstream --mcp-stdio`, so the gateway's MCP client can be shown and
//! tested offline against both transports.
//!
//! Tools: `nutrition` (stable figures for a food: the demo), `echo`, `sleep` (for
//! deadlines), `fail` (a tool error), `pid` (which process answers) and `crash` (stdio only:
//! the process exits, for restart handling).

use std::sync::Arc;
use std::time::Duration;

use rmcp::ErrorData;
use rmcp::handler::server::ServerHandler;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::{RequestContext, RoleServer, ServiceExt};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::{Map, Value, json};

/// The mock's MCP server; `stdio` says whether `crash` may end the process.
#[derive(Debug, Clone, Copy, Default)]
pub struct MockMcp {
    stdio: bool,
}

/// The longest `sleep` may sleep.
const MAX_SLEEP_MS: u64 = 60_000;

fn schema(value: Value) -> Arc<Map<String, Value>> {
    match value {
        Value::Object(map) => Arc::new(map),
        _ => Arc::new(Map::new()),
    }
}

fn tools() -> Vec<Tool> {
    let read_only = || {
        let mut a = ToolAnnotations::default();
        a.read_only_hint = Some(true);
        a
    };
    let mut nutrition = Tool::new(
        "nutrition",
        "Nutrition facts per 100 g for a food",
        schema(
            json!({"type": "object", "properties": {"food": {"type": "string"}}, "required": ["food"]}),
        ),
    );
    nutrition.annotations = Some(read_only());
    let mut echo = Tool::new(
        "echo",
        "Says the text back",
        schema(
            json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
        ),
    );
    echo.annotations = Some(read_only());
    vec![
        nutrition,
        echo,
        Tool::new(
            "sleep",
            "Waits this many milliseconds, then answers",
            schema(
                json!({"type": "object", "properties": {"ms": {"type": "integer"}}, "required": ["ms"]}),
            ),
        ),
        Tool::new(
            "fail",
            "Always fails, with this message",
            schema(json!({"type": "object", "properties": {"message": {"type": "string"}}})),
        ),
        Tool::new(
            "pid",
            "The server's process id",
            schema(json!({"type": "object", "properties": {}})),
        ),
        Tool::new(
            "crash",
            "Ends the server's process (stdio only)",
            schema(json!({"type": "object", "properties": {}})),
        ),
    ]
}

/// A small stable number from a text.
fn stable(text: &str, modulo: u64) -> u64 {
    text.bytes().fold(1_469_598_103_934_665_603_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1_099_511_628_211)
    }) % modulo
}

fn text(result: impl Into<String>) -> CallToolResponse {
    CallToolResponse::Complete(CallToolResult::success(vec![ContentBlock::text(
        result.into(),
    )]))
}

fn tool_error(message: impl Into<String>) -> CallToolResponse {
    CallToolResponse::Complete(CallToolResult::error(vec![ContentBlock::text(
        message.into(),
    )]))
}

impl MockMcp {
    async fn run(
        &self,
        name: &str,
        args: &Map<String, Value>,
    ) -> Result<CallToolResponse, ErrorData> {
        let string = |key: &str| args.get(key).and_then(Value::as_str).unwrap_or_default();
        Ok(match name {
            "nutrition" => {
                let food = string("food");
                text(
                    json!({
                        "food": food,
                        "calories": 40 + stable(food, 500),
                        "protein_g": stable(food, 30),
                        "source": "mock-upstream (MCP)",
                    })
                    .to_string(),
                )
            }
            "echo" => text(string("text")),
            "sleep" => {
                let ms = args
                    .get("ms")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    .min(MAX_SLEEP_MS);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(format!("slept {ms} ms"))
            }
            "fail" => {
                let message = string("message");
                tool_error(if message.is_empty() {
                    "failed on purpose"
                } else {
                    message
                })
            }
            "pid" => text(std::process::id().to_string()),
            "crash" if self.stdio => std::process::exit(3),
            "crash" => tool_error("crash is served over stdio only"),
            other => {
                return Err(ErrorData::invalid_params(
                    format!("no tool named {other}"),
                    None,
                ));
            }
        })
    }
}

impl ServerHandler for MockMcp {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::default();
        let mut capabilities = ServerCapabilities::default();
        capabilities.tools = Some(Default::default());
        info.capabilities = capabilities;
        info.server_info.name = "switchyard-mock".into();
        info.server_info.version = env!("CARGO_PKG_VERSION").into();
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        self.run(&request.name, &args).await
    }
}

/// The streamable-HTTP service the mock mounts at `/mcp`. Host checks are off: it is a
/// mock, reached on whatever address the tests and demos give it.
pub fn http_service() -> StreamableHttpService<MockMcp, LocalSessionManager> {
    StreamableHttpService::new(
        || Ok(MockMcp::default()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().disable_allowed_hosts(),
    )
}

/// Serves MCP on stdin and stdout until the client closes them.
///
/// # Errors
/// When the client's initialisation fails.
pub async fn serve_stdio() -> anyhow::Result<()> {
    let server = MockMcp { stdio: true }
        .serve(rmcp::transport::stdio())
        .await?;
    server.waiting().await?;
    Ok(())
}
