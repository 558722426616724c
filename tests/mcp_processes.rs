//! MCP child processes are never left behind: a stdio server that starts a process of its
//! own is started, called and crashed 100 times, then the gateway shuts down; every server
//! and everything each one started is gone, and this process has the children it had.
//! (Its own test binary: it counts every child of the process.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::TestApp;
use serde_json::{Value, json};
use switchyard_loadlab::mock::MockConfig;

const BINARY: &str = env!("CARGO_BIN_EXE_switchyard");
const SESSIONS: usize = 100;

/// `(pid, ppid, pgrp)` of every process.
fn processes() -> Vec<(u32, u32, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, ppid, pgrp.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(ppid), Some(pgrp)) = (fields.get(1), fields.get(2)) {
            out.push((pid, ppid.parse().unwrap_or(0), pgrp.parse().unwrap_or(0)));
        }
    }
    out
}

fn children() -> usize {
    let me = std::process::id();
    processes()
        .iter()
        .filter(|(_, ppid, _)| *ppid == me)
        .count()
}

async fn turn(app: &TestApp, tool: &str) -> Value {
    let r = app
        .post(
            "/v1/responses",
            &json!({
                "model": "m",
                "input": "go",
                "store": false,
                "tools": [{"type": "mcp", "server_label": "spawner", "require_approval": "never"}],
                "tool_choice": {"type": "mcp", "server_label": "spawner", "name": tool},
            }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let response: Value = r.json().await.unwrap();
    response["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "mcp_call")
        .cloned()
        .unwrap_or_else(|| panic!("no call in {response}"))
}

#[tokio::test]
async fn a_hundred_sessions_leave_no_process_behind() {
    let before = children();
    // The server runs `sleep` in the background, then becomes the MCP server: the sleep
    // is in its process group and must die with it.
    let tail = format!(
        r#"
[mcp_servers.spawner]
command = "sh"
args = ["-c", "sleep 600 & exec {BINARY} mock-upstream --mcp-stdio"]
"#
    );
    let mut app = TestApp::spawn_full(MockConfig::default(), "", "", &tail).await;
    let mut groups = HashSet::new();
    for _ in 0..SESSIONS {
        let pid = turn(&app, "pid").await;
        let pid: u32 = pid["output"].as_str().unwrap().parse().unwrap();
        groups.insert(pid);
        let crashed = turn(&app, "crash").await;
        assert!(crashed["error"].is_string(), "{crashed}");
    }
    assert_eq!(groups.len(), SESSIONS, "each session was a new process");
    // One more session is open when the gateway stops.
    let last = turn(&app, "pid").await;
    groups.insert(last["output"].as_str().unwrap().parse().unwrap());
    app.shutdown().await.unwrap();

    let clean = common::eventually(Duration::from_secs(10), || {
        children() == before && !processes().iter().any(|(_, _, pgrp)| groups.contains(pgrp))
    })
    .await;
    let left: Vec<_> = processes()
        .into_iter()
        .filter(|(_, ppid, pgrp)| *ppid == std::process::id() || groups.contains(pgrp))
        .collect();
    assert!(clean, "left behind: {left:?} (children before: {before})");
}
