//! MCP servers as tool sources, end to end: the mock upstream's MCP server run as a real
//! child process over stdio (this build's `switchyard mock-upstream --mcp-stdio`) and
//! served over streamable HTTP at the mock's `/mcp`; tools listed and called by the
//! turn's tool loop, errors and deadlines, a crashed server restarted, approvals, and
//! request-named servers address-checked before any connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::TestApp;
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;

const BINARY: &str = env!("CARGO_BIN_EXE_switchyard");

/// An app whose alias `kitchen` offers the stdio server `kitchen` (two of its tools) and
/// whose alias `m` offers none; `[mcp]` lets requests name loopback servers.
async fn app(server_extra: &str) -> TestApp {
    let tail = format!(
        r#"
[mcp_servers.kitchen]
command = "{BINARY}"
args = ["mock-upstream", "--mcp-stdio"]
allowed_tools = ["nutrition", "echo"]

[mcp_servers.tricky]
command = "{BINARY}"
args = ["mock-upstream", "--mcp-stdio"]
timeout = "400ms"
{server_extra}

[mcp]
allow = ["127.0.0.0/8"]

[models.kitchen]
provider = "mock"
model = "mock-model"
tools = ["kitchen"]
"#
    );
    TestApp::spawn_full(MockConfig::default(), "", "", &tail).await
}

fn items<'a>(response: &'a Value, kind: &str) -> Vec<&'a Value> {
    response["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == kind)
        .collect()
}

async fn create(app: &TestApp, body: &Value) -> (u16, Value) {
    let r = app.post("/v1/responses", body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// A turn on the stdio server `tricky` that must call `tool`.
async fn call_tricky(app: &TestApp, tool: &str, input: &str) -> Value {
    let (status, response) = create(
        app,
        &json!({
            "model": "m",
            "input": input,
            "tools": [{"type": "mcp", "server_label": "tricky", "require_approval": "never"}],
            "tool_choice": {"type": "mcp", "server_label": "tricky", "name": tool},
        }),
    )
    .await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["status"], "completed", "{response}");
    response
}

#[tokio::test]
async fn an_aliases_stdio_server_runs_its_tools_in_the_loop() {
    let app = app("").await;
    let (status, response) = create(&app, &json!({"model": "kitchen", "input": "soup"})).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["status"], "completed", "{response}");
    let calls = items(&response, "mcp_call");
    // The two allowed tools, run by the child process, under the server's label.
    let mut names: Vec<&str> = calls.iter().map(|c| c["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["echo", "nutrition"], "{response}");
    for call in &calls {
        assert_eq!(call["server_label"], "kitchen");
        assert_eq!(call["error"], Value::Null);
    }
    let nutrition = calls.iter().find(|c| c["name"] == "nutrition").unwrap();
    let facts: Value = serde_json::from_str(nutrition["output"].as_str().unwrap()).unwrap();
    assert_eq!(facts["food"], "soup");
    assert_eq!(facts["source"], "mock-upstream (MCP)");
    // The model read the outputs under the function names it was offered.
    let text = app.upstream_last_request().await.to_string();
    assert!(text.contains("kitchen__nutrition"), "{text}");
    assert!(text.contains("mock-upstream (MCP)"), "{text}");
    let last = response["output"].as_array().unwrap().last().unwrap();
    assert_eq!(last["type"], "message");
    // The operator's own server is not listed in the output, and one process serves
    // every turn.
    assert!(items(&response, "mcp_list_tools").is_empty());
    create(&app, &json!({"model": "kitchen", "input": "bread"})).await;
    let server = app.state.tools.mcp_server("kitchen").unwrap();
    assert_eq!(server.counts.starts.load(Ordering::Relaxed), 1);
    assert_eq!(server.counts.calls.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_tool_error_and_a_deadline_reach_the_model_as_errors() {
    let app = app("").await;
    let failed = call_tricky(&app, "fail", "please fail").await;
    let call = items(&failed, "mcp_call")[0];
    assert_eq!(call["error"], "please fail", "{failed}");
    assert_eq!(call["output"], Value::Null);
    // `sleep` takes the first number of the input as its milliseconds.
    let slow = call_tricky(&app, "sleep", "wait 3000 ms").await;
    let call = items(&slow, "mcp_call")[0];
    assert!(
        call["error"].as_str().unwrap().contains("timed out"),
        "{slow}"
    );
    // The server still answers afterwards, within its deadline.
    let quick = call_tricky(&app, "sleep", "wait 5 ms").await;
    assert_eq!(items(&quick, "mcp_call")[0]["output"], "slept 5 ms");
    // Both failures are in the usage log as tool calls.
    let server = app.state.tools.mcp_server("tricky").unwrap();
    assert_eq!(server.counts.errors.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_crashed_server_is_started_again_by_the_next_call() {
    let app = app("").await;
    let first = call_tricky(&app, "pid", "which process?").await;
    let pid_before = items(&first, "mcp_call")[0]["output"]
        .as_str()
        .unwrap()
        .to_owned();
    let crashed = call_tricky(&app, "crash", "crash now").await;
    assert!(
        items(&crashed, "mcp_call")[0]["error"].is_string(),
        "{crashed}"
    );
    let after = call_tricky(&app, "pid", "which process now?").await;
    let pid_after = items(&after, "mcp_call")[0]["output"].as_str().unwrap();
    assert_ne!(pid_before, pid_after, "a new process answers");
    let server = app.state.tools.mcp_server("tricky").unwrap();
    assert_eq!(server.counts.starts.load(Ordering::Relaxed), 2);
    // The crashed process is gone (reaped, not a zombie).
    let gone = common::eventually(Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{pid_before}")).exists()
    })
    .await;
    assert!(gone, "process {pid_before} is still there");
}

fn http_tool(app: &TestApp, extra: Value) -> Value {
    let mut tool = json!({
        "type": "mcp",
        "server_label": "mock",
        "server_url": format!("{}/mcp", app.mock.base_url().trim_end_matches("/v1")),
        "allowed_tools": ["echo"],
    });
    for (k, v) in extra.as_object().unwrap() {
        tool[k] = v.clone();
    }
    tool
}

#[tokio::test]
async fn a_requests_http_server_is_listed_once_then_called() {
    let app = app("").await;
    let tool = http_tool(&app, json!({"require_approval": "never"}));
    let (status, first) = create(
        &app,
        &json!({"model": "m", "input": "hello there", "tools": [tool]}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let lists = items(&first, "mcp_list_tools");
    assert_eq!(lists.len(), 1, "{first}");
    assert_eq!(lists[0]["server_label"], "mock");
    let listed: Vec<&str> = lists[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["echo"], "allowed_tools filters the list");
    assert!(lists[0]["tools"][0]["input_schema"].is_object());
    let call = items(&first, "mcp_call")[0];
    assert_eq!(call["name"], "echo");
    assert_eq!(call["output"], "hello there");
    // The next turn of the same conversation does not list again.
    let (status, second) = create(
        &app,
        &json!({"model": "m", "input": "again", "tools": [tool],
                "previous_response_id": first["id"]}),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    assert!(items(&second, "mcp_list_tools").is_empty(), "{second}");
    assert_eq!(items(&second, "mcp_call")[0]["output"], "again");
    // Stored and served back like any other item.
    let stored = app
        .client
        .get(app.url(&format!("/v1/responses/{}", first["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(stored["output"], first["output"]);
}

#[tokio::test]
async fn a_streamed_turn_sends_list_and_call_events() {
    let app = app("").await;
    let tool = http_tool(&app, json!({"require_approval": "never"}));
    let r = app
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "stream it", "tools": [tool], "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let frames = common::sse_data(r).await;
    let kinds: Vec<String> = frames
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    let at = |kind: &str| {
        kinds
            .iter()
            .position(|k| k == kind)
            .unwrap_or_else(|| panic!("no {kind} in {kinds:?}"))
    };
    assert!(at("response.mcp_list_tools.in_progress") < at("response.mcp_list_tools.completed"));
    assert!(at("response.mcp_list_tools.completed") < at("response.mcp_call.completed"));
    assert!(at("response.mcp_call.completed") < at("response.completed"));
}

#[tokio::test]
async fn approval_is_asked_then_the_answer_runs_or_refuses_the_call() {
    let app = app("").await;
    // OpenAI's default: a request's server waits for approval.
    let tool = http_tool(&app, json!({}));
    let (status, asked) = create(
        &app,
        &json!({"model": "m", "input": "secret plan", "tools": [tool]}),
    )
    .await;
    assert_eq!(status, 200, "{asked}");
    assert!(items(&asked, "mcp_call").is_empty(), "nothing ran: {asked}");
    let request = items(&asked, "mcp_approval_request")[0].clone();
    assert_eq!(request["server_label"], "mock");
    assert_eq!(request["name"], "echo");
    let request_id = request["id"].as_str().unwrap();
    assert!(request_id.starts_with("mcpr_"));

    let approve = |approve: bool| {
        json!({"model": "m", "tools": [tool], "previous_response_id": asked["id"],
               "input": [{"type": "mcp_approval_response", "approval_request_id": request_id,
                          "approve": approve}]})
    };
    let (status, ran) = create(&app, &approve(true)).await;
    assert_eq!(status, 200, "{ran}");
    let call = items(&ran, "mcp_call")[0];
    assert_eq!(call["approval_request_id"], request_id);
    assert_eq!(call["output"], "secret plan");
    assert_eq!(
        ran["output"].as_array().unwrap().last().unwrap()["type"],
        "message"
    );

    let (status, refused) = create(&app, &approve(false)).await;
    assert_eq!(status, 200, "{refused}");
    let call = items(&refused, "mcp_call")[0];
    assert_eq!(call["output"], Value::Null);
    assert!(
        call["error"].as_str().unwrap().contains("did not approve"),
        "{refused}"
    );

    // An answer to no request is the client's mistake.
    let (status, err) = create(
        &app,
        &json!({"model": "m", "tools": [tool], "previous_response_id": asked["id"],
                "input": [{"type": "mcp_approval_response", "approval_request_id": "mcpr_nope",
                           "approve": true}]}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mcpr_nope")
    );
}

/// A listener that counts the connections it accepts (and answers none).
async fn counting_listener() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_request_server_on_a_private_address_is_refused_before_connecting() {
    // No [mcp] allow list: loopback is refused, as every private range is.
    let app = TestApp::spawn_full(MockConfig::default(), "", "", "").await;
    let (addr, accepted) = counting_listener().await;
    let port = addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/mcp"),
        format!("http://[::1]:{port}/mcp"),
        format!("http://2130706433:{port}/mcp"),
        format!("http://localhost:{port}/mcp"),
        format!("http://[::ffff:127.0.0.1]:{port}/mcp"),
    ] {
        let (status, err) = create(
            &app,
            &json!({"model": "m", "input": "hi",
                    "tools": [{"type": "mcp", "server_label": "x", "server_url": url}]}),
        )
        .await;
        assert_eq!(status, 400, "{url}: {err}");
        assert_eq!(err["error"]["param"], "tools", "{err}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "no connection was made");
    // A label with no configured server and no URL is named back.
    let (status, err) = create(
        &app,
        &json!({"model": "m", "input": "hi", "tools": [{"type": "mcp", "server_label": "ghost"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("ghost"));
}

#[tokio::test]
async fn request_servers_can_be_turned_off() {
    let tail = "[mcp]\nrequest_servers = false\nallow = [\"127.0.0.0/8\"]\n";
    let app = TestApp::spawn_full(MockConfig::default(), "", "", tail).await;
    let tool = http_tool(&app, json!({"require_approval": "never"}));
    let (status, err) = create(&app, &json!({"model": "m", "input": "hi", "tools": [tool]})).await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request_servers")
    );
}

#[tokio::test]
async fn no_server_is_contacted_for_a_model_the_key_may_not_call() {
    let tail = "[auth]\nmode = \"keys\"\n[admin]\nkey = \"admin-mcp-test\"\n\
                [mcp]\nallow = [\"127.0.0.0/8\"]\n";
    let app = TestApp::spawn_full(MockConfig::default(), "", "", tail).await;
    let created: Value = app
        .client
        .post(app.url("/admin/keys"))
        .bearer_auth("admin-mcp-test")
        .json(&json!({"name": "narrow", "models": ["claude"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap();
    let (addr, accepted) = counting_listener().await;
    let r = app
        .client
        .post(app.url("/v1/responses"))
        .bearer_auth(key)
        .json(
            &json!({"model": "m", "input": "hi", "tools": [{"type": "mcp",
            "server_label": "x", "server_url": format!("http://{addr}/mcp")}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "no connection was made");
}
