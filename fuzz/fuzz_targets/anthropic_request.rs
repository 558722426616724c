//! OpenAI chat request → Anthropic Messages request.
//!
//! Properties: the translation is valid JSON; its turns alternate user and assistant;
//! every non-empty text of a user or assistant message arrives as a text block, in order,
//! under the same role; system and developer texts arrive in `system`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchyard::providers::anthropic::encode_request;
use switchyard::wire::ChatRequest;

/// The (role, text) pairs a message contributes as text blocks.
fn texts(message: &Value) -> Vec<(String, String)> {
    let role = message["role"].as_str().unwrap_or_default();
    if role != "user" && role != "assistant" {
        return Vec::new();
    }
    let parts: Vec<&str> = match &message["content"] {
        Value::String(text) => vec![text],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| match part["type"].as_str() {
                Some("text") => part["text"].as_str(),
                Some("refusal") => part["refusal"].as_str(),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    parts
        .into_iter()
        .filter(|text| !text.is_empty())
        .map(|text| (role.to_owned(), text.to_owned()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = ChatRequest::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    let Ok(out) = encode_request(&req, "claude-test", 1024) else {
        return;
    };
    let out: Value = serde_json::from_slice(&out).expect("the translation is JSON");
    let input: Value = serde_json::from_slice(data).expect("an accepted request is JSON");
    let expected: Vec<(String, String)> = input["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .flat_map(texts)
        .collect();
    let turns = out["messages"]
        .as_array()
        .expect("messages in the translation");
    let mut seen = Vec::new();
    let mut previous = "";
    for turn in turns {
        let role = turn["role"].as_str().expect("a role");
        assert!(role == "user" || role == "assistant", "role {role}");
        assert_ne!(role, previous, "two {role} turns in a row");
        previous = role;
        // A lone text block is sent as a plain string.
        if let Some(text) = turn["content"].as_str() {
            assert!(!text.is_empty(), "an empty text");
            seen.push((role.to_owned(), text.to_owned()));
            continue;
        }
        for block in turn["content"]
            .as_array()
            .expect("a string or content blocks")
        {
            if block["type"] == "text" {
                let text = block["text"].as_str().expect("text");
                assert!(!text.is_empty(), "an empty text block");
                seen.push((role.to_owned(), text.to_owned()));
            }
        }
    }
    assert_eq!(seen, expected);
    let system = out["system"].as_str().unwrap_or_default();
    for message in input["messages"].as_array().into_iter().flatten() {
        if matches!(message["role"].as_str(), Some("system" | "developer"))
            && let Some(text) = message["content"].as_str()
        {
            assert!(system.contains(text), "system text lost");
        }
    }
});
