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

async fn local_api() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/quote", get(quote))
        .route("/slow", get(slow))
        .route("/fail", get(fail))
        .route("/search", post(echo))
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
        ["broken", "food_search", "hang", "slow", "stock_quote"]
    );
    let quote = &list["data"][4];
    assert_eq!(quote["type"], "function");
    assert_eq!(quote["description"], "Latest price for a stock ticker");
    assert_eq!(quote["parameters"]["required"], json!(["ticker"]));
    // Nothing about how the tool is reached is shown.
    assert!(!list.to_string().contains("k-secret"));
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
