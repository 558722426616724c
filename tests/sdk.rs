//! The official OpenAI Python SDK, unchanged, against a running Switchyard.
//!
//! Needs a Python with the `openai` package: `SWITCHYARD_TEST_PYTHON` names it (CI sets it
//! up in `.ci/run`); without it the test prints a notice and skips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestApp;
use switchyard_loadlab::mock::MockConfig;

#[tokio::test]
async fn official_openai_python_sdk_works_unchanged() {
    let Ok(python) = std::env::var("SWITCHYARD_TEST_PYTHON") else {
        common::notice(
            "SWITCHYARD_TEST_PYTHON is not set (a python with `openai` installed); the SDK test skipped",
        );
        return;
    };
    let app = TestApp::spawn(MockConfig::default()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk_check.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .arg(app.url("/v1"))
        .output()
        .await
        .expect("python runs");
    assert!(
        output.status.success(),
        "SDK check failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The Responses and Conversations clients of the same SDK, sync, async and the stream
/// helper, on an OpenAI-compatible and an Anthropic alias.
#[tokio::test]
async fn official_sdk_responses_and_conversations_work_unchanged() {
    let Ok(python) = std::env::var("SWITCHYARD_TEST_PYTHON") else {
        common::notice(
            "SWITCHYARD_TEST_PYTHON is not set (a python with `openai` installed); the Responses SDK test skipped",
        );
        return;
    };
    // Request MCP servers may be on loopback here: the mock's /mcp is one.
    let tail = "[mcp]\nallow = [\"127.0.0.0/8\"]\n";
    let app = TestApp::spawn_full(MockConfig::default(), "", "", tail).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/responses_check.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .arg(app.url("/v1"))
        .arg(format!("http://{}", app.mock.addr))
        .output()
        .await
        .expect("python runs");
    assert!(
        output.status.success(),
        "SDK check failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
