//! OTLP trace export: spans of a request reach a collector over OTLP/HTTP.
//! (Its own test binary: the tracing subscriber is global to the process.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use common::*;
use switchyard_loadlab::mock::{MockConfig, MockServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_are_exported_over_otlp() {
    // A stand-in collector that keeps every export it receives.
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let store = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                store
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), MockConfig::default())
        .await
        .unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\notlp_endpoint = \"http://{collector_addr}\"\notlp_service_name = \"switchyard-test\"\n\
         [providers.mock]\nkind = \"openai\"\nbase_url = \"{}\"\n[models.m]\nprovider = \"mock\"\n",
        mock.base_url()
    );
    let settings = switchyard::config::Settings::from_toml(&toml, &|_| None).unwrap();
    switchyard::telemetry::init_logging(&settings.log).unwrap();
    let mut app = TestApp::spawn_toml(mock, &toml).await;
    let (status, _) = app.chat(&chat_body("m", "trace me")).await;
    assert_eq!(status, 200);
    app.shutdown().await.unwrap();
    switchyard::telemetry::otlp::shutdown().await;

    let mut exported = String::new();
    for _ in 0..50 {
        exported = received.lock().unwrap().join("\n");
        if exported.contains("upstream attempt") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exported.contains("POST /v1/chat/completions"), "{exported}");
    assert!(exported.contains("upstream attempt"), "{exported}");
    assert!(
        exported.contains("switchyard-test"),
        "service name: {exported}"
    );
    assert!(
        exported.contains("mock/m"),
        "deployment attribute: {exported}"
    );
}
