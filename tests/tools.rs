//! Operator-declared HTTP tools through `GET /v1/tools` and `POST /v1/tools/{name}/invoke`,
//! against a local API on port 0 that records what it was sent: templates, header secrets,
//! the answer cache, coalescing, the concurrency bound, timeouts and failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use common::TestApp;
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;

/// What the local API saw.
#[derive(Default)]
struct Seen {
    /// Requests per path.
    hits: Mutex<HashMap<String, usize>>,
    /// Query strings of `/quote`, decoded.
    symbols: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl Seen {
    fn hit(&self, path: &str) {
        *self
            .hits
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_default() += 1;
    }
    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

async fn quote(
    State(seen): State<Arc<Seen>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> (StatusCode, axum::Json<Value>) {
    seen.hit("/quote");
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("k-secret") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "bad key"})),
        );
    }
    let symbol = q.get("symbol").cloned().unwrap_or_default();
    seen.symbols.lock().unwrap().push(symbol.clone());
    (
        StatusCode::OK,
        axum::Json(json!({"data": {"symbol": symbol, "price": 12.5}, "noise": "x".repeat(500)})),
    )
}

async fn slow(
    State(seen): State<Arc<Seen>>,
    Query(q): Query<HashMap<String, String>>,
) -> axum::Json<Value> {
    seen.hit("/slow");
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let ms: u64 = q.get("ms").and_then(|m| m.parse().ok()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
    axum::Json(json!({"slept_ms": ms}))
}

async fn fail(State(seen): State<Arc<Seen>>) -> (StatusCode, &'static str) {
    seen.hit("/fail");
    (StatusCode::INTERNAL_SERVER_ERROR, "boom")
}

async fn echo(State(seen): State<Arc<Seen>>, body: axum::Json<Value>) -> axum::Json<Value> {
    seen.hit("/search");
    body
}

/// An OAuth2 token endpoint: client `client` with secret `s3cret` (HTTP Basic) gets
/// `tok-N`, N counting the tokens issued.
async fn token(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, axum::Json<Value>) {
    use base64::Engine;
    seen.hit("/token");
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("client:s3cret")
    );
    let authorized =
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str());
    if !authorized
        || !body.contains("grant_type=client_credentials")
        || !body.contains("scope=basic")
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        );
    }
    let n = seen.hits("/token");
    (
        StatusCode::OK,
        axum::Json(
            json!({"access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": 86400}),
        ),
    )
}

/// A food API that wants the first token issued.
async fn foods(State(seen): State<Arc<Seen>>, headers: HeaderMap) -> (StatusCode, &'static str) {
    seen.hit("/foods");
    if headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer tok-1") {
        (StatusCode::OK, "soup")
    } else {
        (StatusCode::UNAUTHORIZED, "no")
    }
}

async fn local_api() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/quote", get(quote))
        .route("/slow", get(slow))
        .route("/fail", get(fail))
        .route("/search", post(echo))
        .route("/token", post(token))
        .route("/foods", get(foods))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

async fn app_with_tools() -> (TestApp, Arc<Seen>) {
    let (api, seen) = local_api().await;
    let tail = format!(
        r#"
[tools.stock_quote]
description = "Latest price for a stock ticker"
parameters = {{ type = "object", properties = {{ ticker = {{ type = "string" }} }}, required = ["ticker"] }}
url = "http://{api}/quote?symbol={{ticker}}"
headers = {{ "X-Api-Key" = "k-secret" }}
cache_ttl = "30s"
pointer = "/data"

[tools.slow]
description = "Sleeps"
parameters = {{ type = "object", properties = {{ ms = {{ type = "integer" }} }} }}
url = "http://{api}/slow?ms={{ms}}"
max_concurrent = 2

[tools.hang]
description = "Never answers in time"
url = "http://{api}/slow?ms=5000"
timeout = "300ms"

[tools.broken]
description = "Always fails"
url = "http://{api}/fail"

[tools.food_search]
description = "Search foods"
parameters = {{ type = "object", properties = {{ q = {{ type = "string" }}, n = {{ type = "integer" }} }}, required = ["q"] }}
method = "POST"
url = "http://{api}/search"
body = {{ query = "{{q}}", limit = "{{n}}", label = "find {{q}}" }}
max_output_bytes = 64

[tools.oauth_food]
description = "Foods behind OAuth2"
parameters = {{ type = "object", properties = {{ q = {{ type = "string" }} }} }}
url = "http://{api}/foods?q={{q}}"
oauth2 = {{ token_url = "http://{api}/token", client_id = "client", client_secret = "s3cret", scope = "basic" }}
"#
    );
    let app = TestApp::spawn_full(MockConfig::default(), "", "", &tail).await;
    (app, seen)
}

async fn invoke(app: &TestApp, tool: &str, body: &Value) -> (u16, Value) {
    let r = app.post(&format!("/v1/tools/{tool}/invoke"), body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn an_oauth2_token_is_fetched_once_and_reused() {
    let (app, seen) = app_with_tools().await;
    let app = Arc::new(app);
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                invoke(
                    &app,
                    "oauth_food",
                    &json!({"arguments": {"q": format!("q{i}")}}),
                )
                .await
            })
        })
        .collect();
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["output"], "soup", "{body}");
    }
    assert_eq!(seen.hits("/token"), 1, "one token for concurrent calls");
    assert_eq!(seen.hits("/foods"), 4);
    invoke(&app, "oauth_food", &json!({"arguments": {"q": "later"}})).await;
    assert_eq!(seen.hits("/token"), 1);
}

#[tokio::test]
async fn tools_are_listed_as_functions() {
    let (app, _) = app_with_tools().await;
    let list: Value = app
        .client
        .get(app.url("/v1/tools"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "broken",
            "food_search",
            "hang",
            "oauth_food",
            "slow",
            "stock_quote"
        ]
    );
    let quote = &list["data"][5];
    assert_eq!(quote["type"], "function");
    assert_eq!(quote["description"], "Latest price for a stock ticker");
    assert_eq!(quote["parameters"]["required"], json!(["ticker"]));
    // Nothing about how the tool is reached is shown.
    assert!(!list.to_string().contains("k-secret"));
    assert!(!list.to_string().contains("s3cret"));
    assert!(!list.to_string().contains("127.0.0.1"));
}

#[tokio::test]
async fn a_templated_call_sends_its_secret_and_is_cached() {
    let (app, seen) = app_with_tools().await;
    let (status, body) = invoke(
        &app,
        "stock_quote",
        &json!({"arguments": {"ticker": "BRK.B & co/../x?y=1"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "tool.invocation");
    assert_eq!(body["cached"], false);
    assert_eq!(body["error"], Value::Null);
    // The pointer kept only `/data`.
    let output: Value = serde_json::from_str(body["output"].as_str().unwrap()).unwrap();
    assert_eq!(
        output,
        json!({"symbol": "BRK.B & co/../x?y=1", "price": 12.5})
    );
    // The argument arrived whole, as one query value.
    assert_eq!(*seen.symbols.lock().unwrap(), ["BRK.B & co/../x?y=1"]);

    // The same arguments (as a JSON string, as models write them): from the cache.
    let (_, again) = invoke(
        &app,
        "stock_quote",
        &json!({"arguments": "{\"ticker\": \"BRK.B & co/../x?y=1\"}"}),
    )
    .await;
    assert_eq!(again["cached"], true);
    assert_eq!(again["output"], body["output"]);
    assert_eq!(seen.hits("/quote"), 1);
    let (_, other) = invoke(
        &app,
        "stock_quote",
        &json!({"arguments": {"ticker": "MSFT"}}),
    )
    .await;
    assert_eq!(other["cached"], false);
    assert_eq!(seen.hits("/quote"), 2);
}

#[tokio::test]
async fn identical_calls_in_flight_share_one_request_and_the_bound_holds() {
    let (app, seen) = app_with_tools().await;
    let app = Arc::new(app);
    let same: Vec<_> = (0..5)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(
                async move { invoke(&app, "slow", &json!({"arguments": {"ms": 300}})).await },
            )
        })
        .collect();
    for call in same {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["output"], "{\"slept_ms\":300}");
    }
    assert_eq!(seen.hits("/slow"), 1, "identical calls were not shared");
    // Without a cache_ttl nothing is kept once the call is over.
    invoke(&app, "slow", &json!({"arguments": {"ms": 300}})).await;
    assert_eq!(seen.hits("/slow"), 2);

    seen.most_in_flight.store(0, Ordering::SeqCst);
    let distinct: Vec<_> = (0..6)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                invoke(&app, "slow", &json!({"arguments": {"ms": 100 + i}})).await
            })
        })
        .collect();
    for call in distinct {
        let (_, body) = call.await.unwrap();
        assert_eq!(body["error"], Value::Null, "{body}");
    }
    assert_eq!(
        seen.most_in_flight.load(Ordering::SeqCst),
        2,
        "max_concurrent = 2"
    );
}

#[tokio::test]
async fn failures_are_answers_not_errors() {
    let (app, seen) = app_with_tools().await;
    let (status, body) = invoke(&app, "broken", &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["output"], Value::Null);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("HTTP 500") && error.contains("boom"),
        "{error}"
    );
    // Failures are not cached.
    invoke(&app, "broken", &json!({})).await;
    assert_eq!(seen.hits("/fail"), 2);

    let (status, body) = invoke(&app, "hang", &json!({})).await;
    assert_eq!(status, 200);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 300ms"),
        "{body}"
    );
    assert!(body["duration_ms"].as_u64().unwrap() < 4_000);
}

#[tokio::test]
async fn a_post_body_is_filled_from_the_arguments_and_cut() {
    let (app, _) = app_with_tools().await;
    let (status, body) = invoke(
        &app,
        "food_search",
        &json!({"arguments": {"q": "lentil soup", "n": 3}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let output = body["output"].as_str().unwrap();
    assert!(output.len() <= 64, "{output}");
    // The echoed body, cut at 64 bytes: the number stayed a number.
    assert!(output.starts_with("{\""), "{output}");
    let full = r#"{"label":"find lentil soup","limit":3,"query":"lentil soup"}"#;
    assert_eq!(output, &full[..output.len()]);
}

#[tokio::test]
async fn mistakes_are_4xx_in_openai_shape() {
    let (app, seen) = app_with_tools().await;
    let (status, body) = invoke(&app, "nope", &json!({"arguments": {}})).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["message"], "No tool named 'nope'.");
    let (status, body) = invoke(&app, "stock_quote", &json!({"arguments": {}})).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "Missing required argument 'ticker'."
    );
    assert_eq!(body["error"]["param"], "arguments");
    for bad in [
        json!({"arguments": [1]}),
        json!({"arguments": "not json"}),
        json!({"arguments": {"ticker": "A"}, "extra": 1}),
    ] {
        let (status, body) = invoke(&app, "stock_quote", &bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let r = app
        .post_raw("/v1/tools/stock_quote/invoke", "{\"arguments\": ")
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        seen.hits("/quote"),
        0,
        "nothing was sent for a refused call"
    );
}

/// A model that calls the tool `slow_a` whatever it is told, counting its calls.
async fn looping_model() -> (SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                axum::Json(json!({
                    "id": format!("chatcmpl-{n}"), "object": "chat.completion", "created": 0,
                    "model": "loop-model",
                    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                        "role": "assistant", "content": null,
                        "tool_calls": [{"id": format!("call_{n}"), "type": "function",
                            "function": {"name": "slow_a", "arguments": "{}"}}]}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, calls)
}

/// Aliases whose turns run server tools: `tooled` (three 300 ms tools), `mixed` (one that
/// fails, one that times out), `looping` (a model that never stops calling).
async fn app_with_tool_loop() -> (TestApp, Arc<Seen>, Arc<AtomicUsize>) {
    app_with_tool_loop_and("").await
}

/// [`app_with_tool_loop`] with `extra` config.
async fn app_with_tool_loop_and(extra: &str) -> (TestApp, Arc<Seen>, Arc<AtomicUsize>) {
    let (api, seen) = local_api().await;
    let (model, model_calls) = looping_model().await;
    let mut tail = String::new();
    for name in ["slow_a", "slow_b", "slow_c"] {
        tail.push_str(&format!(
            "[tools.{name}]\ndescription = \"Sleeps 300 ms\"\nurl = \"http://{api}/slow?ms=300\"\n"
        ));
    }
    tail.push_str(&format!(
        r#"
[tools.broken]
description = "Always fails"
url = "http://{api}/fail"

[tools.hang]
description = "Never answers in time"
url = "http://{api}/slow?ms=5000"
timeout = "300ms"

[providers.looper]
kind = "openai"
base_url = "http://{model}/v1"
warm_connections = 0

[models.tooled]
provider = "mock"
model = "mock-model"
tools = ["slow_a", "slow_b", "slow_c"]

[models.mixed]
provider = "mock"
model = "mock-model"
tools = ["broken", "hang"]

[models.looping]
provider = "looper"
model = "loop-model"
tools = ["slow_a"]
"#
    ));
    tail.push_str(extra);
    let app = TestApp::spawn_full(MockConfig::default(), "", "", &tail).await;
    (app, seen, model_calls)
}

fn mcp_calls(response: &Value) -> Vec<&Value> {
    response["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "mcp_call")
        .collect()
}

#[tokio::test]
async fn a_turn_runs_the_servers_tools_in_parallel_then_answers() {
    let (app, seen, _) = app_with_tool_loop().await;
    let chats_before = app.mock_stats().chat;
    let r = app
        .post(
            "/v1/responses",
            &json!({"model": "tooled", "input": "what is new?"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let response: Value = r.json().await.unwrap();
    assert_eq!(response["status"], "completed", "{response}");
    let calls = mcp_calls(&response);
    assert_eq!(calls.len(), 3, "{response}");
    for call in &calls {
        assert_eq!(call["server_label"], "switchyard");
        assert_eq!(call["output"], "{\"slept_ms\":300}");
        assert_eq!(call["error"], Value::Null);
        assert!(call["id"].as_str().unwrap().starts_with("mcp_"));
    }
    // The three ran at once, not one after another.
    assert_eq!(seen.most_in_flight.load(Ordering::SeqCst), 3);
    // Two model calls: the one that asked for the tools and the one that read them.
    assert_eq!(app.mock_stats().chat - chats_before, 2);
    let last = response["output"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["type"], "message");
    assert_eq!(
        last["content"][0]["text"],
        "Here is what the tools returned about: what is new?"
    );
    // The second call carried the calls and their outputs.
    let second: Value = app.upstream_last_request().await;
    let messages = second["messages"].as_array().unwrap();
    let tool_results: Vec<&Value> = messages.iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(tool_results.len(), 3, "{second}");
    assert!(
        tool_results
            .iter()
            .all(|m| m["content"] == "{\"slept_ms\":300}")
    );
    // Usage is both calls'.
    assert!(response["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Stored, and replayed into the next turn's context.
    let id = response["id"].as_str().unwrap();
    let stored: Value = app
        .client
        .get(app.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["output"], response["output"]);
    let next = app
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "thanks", "previous_response_id": id}),
        )
        .await;
    assert_eq!(next.status(), 200);
    let third: Value = app.upstream_last_request().await;
    let roles: Vec<&str> = third["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        [
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "user"
        ]
    );
}

#[tokio::test]
async fn a_streamed_turn_sends_the_tool_calls_as_events() {
    let (app, _, _) = app_with_tool_loop().await;
    let r = app
        .post(
            "/v1/responses",
            &json!({"model": "tooled", "input": "news please", "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let frames = common::sse_data(r).await;
    let events: Vec<Value> = frames
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[..2], ["response.created", "response.in_progress"]);
    assert_eq!(*kinds.last().unwrap(), "response.completed");
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "response.mcp_call.completed")
            .count(),
        3
    );
    assert!(kinds.contains(&"response.output_text.delta"));
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    // Each mcp_call: added, arguments, in progress, completed, done, in that order.
    let first = kinds
        .iter()
        .position(|k| *k == "response.output_item.added")
        .unwrap();
    assert_eq!(
        kinds[first..first + 6],
        [
            "response.output_item.added",
            "response.mcp_call_arguments.delta",
            "response.mcp_call_arguments.done",
            "response.mcp_call.in_progress",
            "response.mcp_call.completed",
            "response.output_item.done"
        ]
    );
    let completed = &events.last().unwrap()["response"];
    assert_eq!(mcp_calls(completed).len(), 3);
    let id = completed["id"].as_str().unwrap();
    let stored: Value = app
        .client
        .get(app.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["output"], completed["output"]);
}

#[tokio::test]
async fn failures_and_timeouts_reach_the_model_as_outputs() {
    let (app, _, _) = app_with_tool_loop().await;
    let r = app
        .post("/v1/responses", &json!({"model": "mixed", "input": "try"}))
        .await;
    assert_eq!(r.status(), 200);
    let response: Value = r.json().await.unwrap();
    assert_eq!(response["status"], "completed", "{response}");
    let calls = mcp_calls(&response);
    assert_eq!(calls.len(), 2);
    let errors: Vec<&str> = calls.iter().map(|c| c["error"].as_str().unwrap()).collect();
    assert!(errors.iter().any(|e| e.contains("HTTP 500")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("timed out")), "{errors:?}");
    let second: Value = app.upstream_last_request().await;
    let results: Vec<&str> = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(results.len(), 2);
    assert!(
        results.iter().all(|c| c.starts_with("error: ")),
        "{results:?}"
    );
}

#[tokio::test]
async fn a_client_function_and_a_server_tool_in_one_turn() {
    let (app, seen, _) = app_with_tool_loop().await;
    let chats_before = app.mock_stats().chat;
    let r = app
        .post(
            "/v1/responses",
            &json!({
                "model": "tooled",
                "input": "both",
                "tools": [{"type": "function", "name": "client_fn", "description": "the app's own",
                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}],
            }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let response: Value = r.json().await.unwrap();
    let kinds: Vec<&str> = response["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    // The client's call comes back for it to run; the server's ran; one model call.
    assert_eq!(
        kinds.iter().filter(|k| **k == "function_call").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "mcp_call").count(),
        3,
        "{kinds:?}"
    );
    assert!(seen.hits("/slow") >= 1);
    assert_eq!(app.mock_stats().chat - chats_before, 1);
    // The response echoes the client's tools only.
    assert_eq!(response["tools"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_loop_stops_at_its_limits() {
    let (app, seen, model_calls) = app_with_tool_loop().await;
    let r = app
        .post("/v1/responses", &json!({"model": "looping", "input": "go"}))
        .await;
    assert_eq!(r.status(), 200);
    let response: Value = r.json().await.unwrap();
    assert_eq!(response["status"], "incomplete", "{response}");
    assert_eq!(response["incomplete_details"]["reason"], "max_tool_calls");
    assert_eq!(model_calls.load(Ordering::SeqCst), 8);
    let calls = mcp_calls(&response);
    assert_eq!(calls.len(), 8);
    assert!(calls[..7].iter().all(|c| c["error"] == Value::Null));
    assert!(calls[7]["error"].as_str().unwrap().starts_with("not run"));
    assert_eq!(seen.hits("/slow"), 7);
    // Usage is every step's.
    assert_eq!(response["usage"]["total_tokens"], 8 * 7);

    // max_tool_calls: one call runs, the model hears the rest were not.
    model_calls.store(0, Ordering::SeqCst);
    let r = app
        .post(
            "/v1/responses",
            &json!({"model": "tooled", "input": "limited", "max_tool_calls": 1}),
        )
        .await;
    let response: Value = r.json().await.unwrap();
    let calls = mcp_calls(&response);
    assert_eq!(calls.len(), 3);
    assert_eq!(
        calls.iter().filter(|c| c["error"] == Value::Null).count(),
        1
    );
    assert_eq!(
        calls
            .iter()
            .filter(|c| c["error"] == "not run: max_tool_calls reached")
            .count(),
        2
    );
}

/// A page server on 127.0.0.2 (opened by the allow list) and a server on 127.0.0.1 that
/// only counts the connections it accepts (which must stay at zero).
async fn fetch_setup() -> (TestApp, u16, u16, Arc<AtomicUsize>) {
    let pages = Router::new()
        .route(
            "/article",
            get(|| async {
                axum::response::Html(
                    "<html><head><title>Lentil soup</title><script>var tracking = 1;</script>\
                     </head><body><nav>Home | Recipes | About</nav><article><h1>Lentil soup</h1>\
                     <p>Lentil soup is a soup based on lentils; it may be vegetarian or include \
                     meat, and it keeps well for several days.</p><p>Red lentils cook in about \
                     twenty minutes and need no soaking at all.</p></article>\
                     <footer>Copyright</footer></body></html>",
                )
            }),
        )
        .route(
            "/image",
            get(|| async { ([("content-type", "image/png")], vec![0_u8; 64]) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let page_port = listener.local_addr().unwrap().port();
    let counted = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let counted_port = counted.local_addr().unwrap().port();
    let redirect_to = format!("http://127.0.0.1:{counted_port}/secret");
    let pages = pages.route(
        "/redirect",
        get(move || {
            let to = redirect_to.clone();
            async move { axum::response::Redirect::temporary(&to) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, pages).await });
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_tcp, _)) = counted.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let tail = r#"
[fetch_url]
allow = ["127.0.0.2/32"]
resolve = { "pages.test" = "127.0.0.2", "intranet.test" = "127.0.0.1" }
timeout = "5s"
"#;
    let app = TestApp::spawn_full(MockConfig::default(), "", "", tail).await;
    (app, page_port, counted_port, accepted)
}

#[tokio::test]
async fn fetch_url_reads_a_page_as_text() {
    let (app, page, _, _) = fetch_setup().await;
    for url in [
        format!("http://pages.test:{page}/article"),
        format!("http://127.0.0.2:{page}/article"),
    ] {
        let (status, body) = invoke(&app, "fetch_url", &json!({"arguments": {"url": url}})).await;
        assert_eq!(status, 200, "{body}");
        let text = body["output"].as_str().unwrap_or_else(|| panic!("{body}"));
        assert!(
            text.contains("Red lentils cook in about twenty minutes"),
            "{text}"
        );
        assert!(!text.contains("tracking") && !text.contains('<'), "{text}");
    }
    let (_, body) = invoke(
        &app,
        "fetch_url",
        &json!({"arguments": {"url": format!("http://pages.test:{page}/image")}}),
    )
    .await;
    assert!(
        body["error"].as_str().unwrap().contains("not a text page"),
        "{body}"
    );
}

#[tokio::test]
async fn fetch_url_refuses_every_spelling_of_loopback() {
    let (app, page, port, accepted) = fetch_setup().await;
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://[::1]:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://0x7f.1:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://localhost:{port}/"),
        format!("http://intranet.test:{port}/"),
        format!("http://pages.test:{page}/redirect"),
        "file:///etc/passwd".to_owned(),
    ] {
        let (status, body) = invoke(&app, "fetch_url", &json!({"arguments": {"url": url}})).await;
        assert_eq!(status, 200, "{url}: {body}");
        assert_eq!(body["output"], Value::Null, "{url}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("refused") || error.contains("loopback"),
            "{url}: {error}"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused address was connected to"
    );
    let (status, _) = invoke(&app, "fetch_url", &json!({"arguments": {}})).await;
    assert_eq!(status, 400);
}

/// The app with `[web_search]` on the mock's SearXNG-compatible API.
async fn search_app() -> TestApp {
    search_app_with(MockConfig::default()).await
}

async fn search_app_with(config: MockConfig) -> TestApp {
    let mock = common::mock(config).await;
    let root = mock.base_url().trim_end_matches("/v1").to_owned();
    let toml = common::config_for(
        &mock,
        "",
        "",
        &format!("[web_search]\nbackend = \"searxng\"\nurl = \"{root}\"\nmax_results = 2\n"),
    );
    TestApp::spawn_toml(mock, &toml).await
}

#[tokio::test]
async fn web_search_runs_on_the_configured_backend() {
    let app = search_app().await;
    let body = json!({"model": "m", "input": "rust 2026", "tools": [{"type": "web_search"}]});
    let r = app.post("/v1/responses", &body).await;
    assert_eq!(r.status(), 200);
    let response: Value = r.json().await.unwrap();
    assert_eq!(response["status"], "completed", "{response}");
    let output = response["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "web_search_call", "{response}");
    assert!(output[0]["id"].as_str().unwrap().starts_with("ws_"));
    assert_eq!(output[0]["status"], "completed");
    assert_eq!(output[0]["action"]["type"], "search");
    assert_eq!(output[0]["action"]["query"], "rust 2026");
    assert_eq!(
        output[0]["action"]["sources"],
        json!([
            {"type": "url", "url": "https://news.example/rust-2026"},
            {"type": "url", "url": "https://wiki.example/rust-2026"}
        ])
    );
    assert_eq!(output.last().unwrap()["type"], "message");
    assert_eq!(response["tools"], json!([{"type": "web_search"}]));
    // The model read the results.
    let second: Value = app.upstream_last_request().await;
    let tool = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap();
    assert!(
        tool["content"]
            .as_str()
            .unwrap()
            .contains("What news.example says about rust 2026")
    );
    // The same query again: answered from the cache.
    let searches = app.mock_stats().tools;
    app.post("/v1/responses", &body).await;
    assert_eq!(app.mock_stats().tools, searches);

    // Streamed: the search's progress events, in order.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["input"] = json!("other things");
    let frames = common::sse_data(app.post("/v1/responses", &streamed).await).await;
    let kinds: Vec<String> = frames
        .iter()
        .map(|f| {
            serde_json::from_str::<Value>(f).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let at = kinds
        .iter()
        .position(|k| k == "response.web_search_call.in_progress")
        .unwrap_or_else(|| panic!("{kinds:?}"));
    assert_eq!(
        kinds[at - 1..at + 4],
        [
            "response.output_item.added",
            "response.web_search_call.in_progress",
            "response.web_search_call.searching",
            "response.web_search_call.completed",
            "response.output_item.done"
        ]
    );
    assert_eq!(kinds.last().unwrap(), "response.completed");
}

#[tokio::test]
async fn web_search_options_filter_the_results_and_the_answer_cites_them() {
    let app = search_app_with(MockConfig {
        reply: Some("Read https://wiki.example/lentil-soup today.".into()),
        ..MockConfig::default()
    })
    .await;
    let tool = json!({"type": "web_search", "search_context_size": "low",
                      "filters": {"allowed_domains": ["wiki.example"]},
                      "user_location": {"type": "approximate", "country": "GB"}});
    let (status, response) = {
        let r = app
            .post(
                "/v1/responses",
                &json!({"model": "m", "input": "lentil soup", "tools": [tool]}),
            )
            .await;
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200, "{response}");
    let output = response["output"].as_array().unwrap();
    // Only the allowed domain's result is kept.
    assert_eq!(
        output[0]["action"]["sources"],
        json!([{"type": "url", "url": "https://wiki.example/lentil-soup"}]),
        "{response}"
    );
    // The answer quotes it: a url_citation over the URL, with the result's title.
    let message = output.last().unwrap();
    assert_eq!(message["type"], "message");
    let part = &message["content"][0];
    assert_eq!(part["text"], "Read https://wiki.example/lentil-soup today.");
    assert_eq!(
        part["annotations"],
        json!([{"type": "url_citation", "start_index": 5, "end_index": 37,
                "url": "https://wiki.example/lentil-soup",
                "title": "lentil soup: result 2 from wiki"}])
    );
    // Streamed, the citation is announced as an event before the text is done.
    let r = app
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "lentil soup", "tools": [tool], "stream": true}),
        )
        .await;
    let events: Vec<Value> = common::sse_data(r)
        .await
        .iter()
        .filter_map(|f| serde_json::from_str(f).ok())
        .collect();
    let added = events
        .iter()
        .position(|e| e["type"] == "response.output_text.annotation.added")
        .unwrap_or_else(|| panic!("no annotation event in {events:?}"));
    assert_eq!(
        events[added]["annotation"]["url"],
        "https://wiki.example/lentil-soup"
    );
    assert_eq!(events[added]["annotation_index"], 0);
    assert_eq!(events[added + 1]["type"], "response.output_text.done");
    // Options that cannot be met are the client's mistake.
    for bad in [
        json!({"type": "web_search", "search_context_size": "huge"}),
        json!({"type": "web_search", "filters": {"allowed_domains": "wiki.example"}}),
    ] {
        let r = app
            .post(
                "/v1/responses",
                &json!({"model": "m", "input": "x", "tools": [bad]}),
            )
            .await;
        assert_eq!(r.status(), 400);
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["param"], "tools", "{err}");
    }
}

#[tokio::test]
async fn web_search_without_a_backend_is_a_400() {
    let app = TestApp::spawn(MockConfig::default()).await;
    let r = app
        .post(
            "/v1/responses",
            &json!({"model": "m", "input": "x", "tools": [{"type": "web_search_preview"}]}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("web_search")
    );
}

/// The usage rows of `request_id` once `n` have been written.
async fn usage_rows(app: &TestApp, request_id: &str, n: usize) -> Vec<switchyard::store::UsageRow> {
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = app.state.store.usage_of_request(request_id).await.unwrap();
        if rows.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rows
}

#[tokio::test]
async fn tool_calls_are_rows_of_the_usage_log() {
    let (app, _) = app_with_tools().await;
    let r = app
        .client
        .post(app.url("/v1/tools/stock_quote/invoke"))
        .header("x-request-id", "req-tool-direct")
        .json(&json!({"arguments": {"ticker": "MSFT"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.client
        .post(app.url("/v1/tools/broken/invoke"))
        .header("x-request-id", "req-tool-broken")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let rows = usage_rows(&app, "req-tool-direct", 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].route, "tool");
    assert_eq!(rows[0].alias.as_deref(), Some("stock_quote"));
    assert_eq!(rows[0].status, 200);
    let rows = usage_rows(&app, "req-tool-broken", 1).await;
    assert_eq!(rows[0].status, 502);
    // The same calls in the figures `/admin/stats` and the dashboard show.
    let figures = app.state.tools.snapshot();
    let quote = figures.iter().find(|t| t.name == "stock_quote").unwrap();
    assert_eq!((quote.calls, quote.errors, quote.cached), (1, 0, 0));
    let broken = figures.iter().find(|t| t.name == "broken").unwrap();
    assert_eq!((broken.calls, broken.errors), (1, 1));
    assert_eq!(
        broken.circuit,
        Some(switchyard::routing::breaker::CircuitState::Closed)
    );

    // A turn's calls are rows of the turn's request, beside its model calls.
    let (app, _, _) = app_with_tool_loop().await;
    let r = app
        .client
        .post(app.url("/v1/responses"))
        .header("x-request-id", "req-tool-loop")
        .json(&json!({"model": "tooled", "input": "go"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rows = usage_rows(&app, "req-tool-loop", 5).await;
    let routes: Vec<&str> = rows.iter().map(|r| r.route.as_str()).collect();
    assert_eq!(
        routes.iter().filter(|r| **r == "tool").count(),
        3,
        "{routes:?}"
    );
    assert_eq!(
        routes.iter().filter(|r| **r == "responses").count(),
        2,
        "{routes:?}"
    );
}

#[tokio::test]
async fn a_failing_host_opens_its_breaker() {
    let (api, seen) = local_api().await;
    let tail = format!(
        r#"
[circuit_breaker]
consecutive_failures = 3
cooldown = "60s"

[tools.down]
description = "Fails with 500"
url = "http://{api}/fail"

[tools.same_host]
description = "Fine, but on the same host"
url = "http://{api}/slow?ms=1"
"#
    );
    let app = TestApp::spawn_full(MockConfig::default(), "", "", &tail).await;
    for _ in 0..3 {
        let (_, body) = invoke(&app, "down", &json!({})).await;
        assert!(
            body["error"].as_str().unwrap().contains("HTTP 500"),
            "{body}"
        );
    }
    for tool in ["down", "same_host"] {
        let (status, body) = invoke(&app, tool, &json!({})).await;
        assert_eq!(status, 200);
        assert!(
            body["error"].as_str().unwrap().contains("circuit open"),
            "{tool}: {body}"
        );
    }
    assert_eq!(
        seen.hits("/fail"),
        3,
        "calls after the breaker opened reached the host"
    );
    assert_eq!(seen.hits("/slow"), 0);
}

#[tokio::test]
async fn a_direct_invocation_counts_against_the_keys_request_rate() {
    let (api, _) = local_api().await;
    let tail = format!(
        r#"
[auth]
mode = "keys"
[admin]
key = "admin-tools-test"

[tools.slow]
description = "Sleeps"
parameters = {{ type = "object", properties = {{ ms = {{ type = "integer" }} }} }}
url = "http://{api}/slow?ms={{ms}}"
"#
    );
    let app = TestApp::spawn_full(MockConfig::default(), "", "", &tail).await;
    let created: Value = app
        .client
        .post(app.url("/admin/keys"))
        .bearer_auth("admin-tools-test")
        .json(&json!({"name": "tools", "rpm": 60}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap();
    let call = || {
        app.client
            .post(app.url("/v1/tools/slow/invoke"))
            .bearer_auth(key)
            .json(&json!({"arguments": {"ms": 0}}))
            .send()
    };
    // 60 rpm: a burst of one, then one a second.
    assert_eq!(call().await.unwrap().status(), 200);
    let refused = call().await.unwrap();
    assert_eq!(refused.status(), 429);
    let err: Value = refused.json().await.unwrap();
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    // Without a key there is no call at all.
    let anonymous = app
        .client
        .post(app.url("/v1/tools/slow/invoke"))
        .json(&json!({"arguments": {"ms": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn chat_completions_clients_opt_in_to_the_aliases_tools() {
    let (app, seen, _) = app_with_tool_loop().await;
    let body = common::chat_body("tooled", "what is new?");
    // Without the header: the plain chat API, the alias's tools are not offered.
    let (status, plain) = app.chat(&body).await;
    assert_eq!(status, 200, "{plain}");
    assert!(
        plain["choices"][0]["message"]["tool_calls"].is_null(),
        "{plain}"
    );

    let chats_before = app.mock_stats().chat;
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-switchyard-tools", "auto")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Here is what the tools returned about: what is new?"
    );
    // The three tools ran together between the two model calls, whose usage is summed.
    assert_eq!(seen.most_in_flight.load(Ordering::SeqCst), 3);
    assert_eq!(app.mock_stats().chat - chats_before, 2);
    let second: Value = app.upstream_last_request().await;
    let tool_messages = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .count();
    assert_eq!(tool_messages, 3, "{second}");
    let usage = &answer["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // Streamed: the last answer as chat chunks, then [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-switchyard-tools", "auto")
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let frames = common::sse_data(r).await;
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let text: String = frames
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Here is what the tools returned about: what is new?");
}

#[tokio::test]
async fn calls_within_a_batching_window_are_sent_as_one() {
    let mock = common::mock(MockConfig::default()).await;
    let root = mock.base_url().trim_end_matches("/v1").to_owned();
    let tail = format!(
        r#"
[tools.food_by_id]
description = "Nutrition for a food id"
parameters = {{ type = "object", properties = {{ id = {{ type = "string" }} }}, required = ["id"] }}
url = "{root}/tools/foods/batch?ids={{id}}"
pointer = "/foods"
batch = {{ argument = "id", window = "200ms", max = 4 }}
"#
    );
    let toml = common::config_for(&mock, "", "", &tail);
    let app = TestApp::spawn_toml(mock, &toml).await;
    let before = app.mock_stats().tools;
    let ids = ["apple", "bean", "corn", "date", "egg", "fig"];
    let bodies: Vec<Value> = ids
        .iter()
        .map(|id| json!({"arguments": {"id": id}}))
        .collect();
    let answers =
        futures_util::future::join_all(bodies.iter().map(|b| invoke(&app, "food_by_id", b))).await;
    for (id, (status, answer)) in ids.iter().zip(&answers) {
        assert_eq!(*status, 200, "{answer}");
        let output = answer["output"]
            .as_str()
            .unwrap_or_else(|| panic!("{answer}"));
        let food: Value = serde_json::from_str(output).unwrap();
        assert_eq!(food["id"], *id, "each call gets its own element: {answer}");
    }
    // Six calls, at most four per batch: two upstream requests.
    assert_eq!(app.mock_stats().tools - before, 2);
}

#[tokio::test]
async fn the_tool_loops_step_limit_and_global_bound_are_configured() {
    let (app, seen, model_calls) =
        app_with_tool_loop_and("\n[tool_loop]\nmax_steps = 2\nmax_concurrent = 1\n").await;
    // One slot for every tool: the three calls of a step run one at a time.
    let r = app
        .post("/v1/responses", &json!({"model": "tooled", "input": "go"}))
        .await;
    let response: Value = r.json().await.unwrap();
    assert_eq!(response["status"], "completed", "{response}");
    assert_eq!(mcp_calls(&response).len(), 3);
    assert_eq!(seen.most_in_flight.load(Ordering::SeqCst), 1);
    // Two model calls at most: the second step's call is not run.
    let r = app
        .post("/v1/responses", &json!({"model": "looping", "input": "go"}))
        .await;
    let response: Value = r.json().await.unwrap();
    assert_eq!(response["status"], "incomplete", "{response}");
    assert_eq!(response["incomplete_details"]["reason"], "max_tool_calls");
    assert_eq!(model_calls.load(Ordering::SeqCst), 2);
    let calls = mcp_calls(&response);
    assert_eq!(
        calls.last().unwrap()["error"],
        "not run: the turn reached its limit of 2 model calls"
    );
}
