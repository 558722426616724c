//! The Responses `input` reader and its translation to chat messages.
//!
//! Properties: any JSON either reads as items or is refused (never a panic); every item
//! read has a fresh id of its kind's prefix, unique within the input; an item reads back
//! equal from the JSON it is stored as; and the items translate to chat messages (or are
//! refused) with every text kept, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchyard::conversations::translate::to_messages;
use switchyard::tools::mcp::function_name;
use switchyard::wire::responses::{Item, SERVER_TOOLS_LABEL, is_id, parse_input};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(items) = parse_input(&input) else {
        return;
    };
    if let Value::String(text) = &input {
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].texts(), vec![text.as_str()]);
    }
    let mut ids = std::collections::HashSet::new();
    for item in &items {
        let prefix = match item {
            Item::Message(_) => "msg",
            Item::FunctionCall(_) => "fc",
            Item::FunctionCallOutput(_) => "fco",
            Item::McpCall(_) => "mcp",
            Item::McpListTools(_) => "mcpl",
            Item::McpApprovalRequest(_) => "mcpr",
            Item::McpApprovalResponse(_) => "mcpa",
            Item::WebSearchCall(_) => "ws",
        };
        assert!(is_id(item.id(), prefix), "{}", item.id());
        assert!(ids.insert(item.id().to_owned()), "duplicate id");
        let stored: Item = serde_json::from_str(&item.to_json()).expect("stored item reads back");
        assert_eq!(&stored, item);
    }
    if let Ok(messages) = to_messages(None, &items) {
        let sent = serde_json::to_string(&messages).expect("messages serialise");
        for item in &items {
            // A search's query reaches the model inside the call's JSON arguments.
            let texts: Vec<String> = match item {
                Item::WebSearchCall(search) => {
                    let mut texts =
                        vec![serde_json::json!({"query": search.action.query}).to_string()];
                    texts.extend(search.output.clone());
                    texts
                }
                // An MCP server's tool is called by the function name it was offered as.
                Item::McpCall(call) => {
                    let mut texts = vec![if call.server_label == SERVER_TOOLS_LABEL {
                        call.name.clone()
                    } else {
                        function_name(&call.server_label, &call.name)
                    }];
                    texts.push(call.arguments.clone());
                    texts.extend(call.output.clone());
                    texts.extend(call.error.clone());
                    texts
                }
                // Lists and approvals are not the model's to read.
                Item::McpListTools(_)
                | Item::McpApprovalRequest(_)
                | Item::McpApprovalResponse(_) => Vec::new(),
                _ => item.texts().into_iter().map(str::to_owned).collect(),
            };
            for text in &texts {
                let quoted = serde_json::to_string(text).expect("a string serialises");
                let inner = &quoted[1..quoted.len() - 1];
                assert!(sent.contains(inner), "text {text:?} lost in translation");
            }
        }
    }
});
