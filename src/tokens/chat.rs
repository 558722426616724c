//! A chat prompt counted the way OpenAI documents it (the cookbook's
//! `num_tokens_from_messages`, which tiktoken-rs implements too): every message costs a
//! few framing tokens plus its role and text, and every reply is primed with three.
//!
//! What the cookbook does not cover is estimated, and said so here: an image is a fixed
//! figure by its `detail`, tool definitions are counted from their JSON text (OpenAI
//! renders them into a prompt of its own whose exact form is not published; the JSON is
//! close and errs high), audio and file parts are not counted (their cost depends on
//! content the gateway does not decode).

use super::{TokenizerKind, count};
use crate::wire::chat::{Content, ContentPart, Message, ToolCall};

/// Framing tokens of every message (`<|start|>{role}<|message|>…<|end|>`): the
/// cookbook's `tokens_per_message` for every current model.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// A message's `name` costs one token beyond its text (the cookbook's `tokens_per_name`).
pub const TOKENS_PER_NAME: u64 = 1;
/// Each tool call costs one token beyond its name and arguments (tiktoken-rs's
/// `FUNCTION_CALL_OVERHEAD`, a heuristic).
pub const TOKENS_PER_TOOL_CALL: u64 = 1;
/// Every reply is primed with `<|start|>assistant<|message|>`.
pub const REPLY_PRIMING: u64 = 3;
/// An image at `detail: "low"`: OpenAI's fixed 85 tokens.
pub const IMAGE_TOKENS_LOW: u64 = 85;
/// An image at `high` or `auto` detail, whose size the gateway does not read: a
/// 1024×1024 image's cost (85 + 4 tiles × 170), OpenAI's own worked example.
pub const IMAGE_TOKENS: u64 = 765;

/// The tokens of a whole prompt's messages, reply priming included.
pub fn count_messages(kind: TokenizerKind, messages: &[Message<'_>]) -> u64 {
    messages
        .iter()
        .map(|message| count_message(kind, message))
        .sum::<u64>()
        + REPLY_PRIMING
}

/// The tokens one message adds to a prompt: framing, role, content (text parts counted,
/// images estimated), name, refusal, tool calls (name and arguments) and the id of the
/// call a tool message answers.
pub fn count_message(kind: TokenizerKind, message: &Message<'_>) -> u64 {
    let mut tokens = TOKENS_PER_MESSAGE + count(kind, message.role.as_str());
    tokens += count_content(kind, &message.content);
    if let Some(name) = &message.name {
        tokens += count(kind, name) + TOKENS_PER_NAME;
    }
    if let Some(refusal) = &message.refusal {
        tokens += count(kind, refusal);
    }
    for call in message.tool_calls.iter().flatten() {
        let input = match call {
            ToolCall::Function { function, .. } => &function.arguments,
            ToolCall::Custom { custom, .. } => &custom.input,
        };
        tokens += count(kind, call.name()) + count(kind, input) + TOKENS_PER_TOOL_CALL;
    }
    if let Some(call) = &message.function_call {
        tokens += count(kind, &call.name) + count(kind, &call.arguments) + TOKENS_PER_TOOL_CALL;
    }
    if let Some(id) = &message.tool_call_id {
        tokens += count(kind, id);
    }
    tokens
}

/// The tokens of tool (or legacy `functions`) definitions, from their raw JSON text.
pub fn count_tools(kind: TokenizerKind, raw_json: &str) -> u64 {
    count(kind, raw_json)
}

fn count_content(kind: TokenizerKind, content: &Content<'_>) -> u64 {
    match content {
        Content::Null => 0,
        Content::Text(text) => count(kind, text),
        Content::Parts(parts) => parts
            .iter()
            .map(|part| match part {
                ContentPart::Text { text } => count(kind, text),
                ContentPart::Refusal { refusal } => count(kind, refusal),
                ContentPart::ImageUrl { image_url } => match image_url.detail.as_deref() {
                    Some("low") => IMAGE_TOKENS_LOW,
                    _ => IMAGE_TOKENS,
                },
                ContentPart::InputAudio { .. }
                | ContentPart::File { .. }
                | ContentPart::Other { .. } => 0,
            })
            .sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::chat::Role;

    fn parse(json: &str) -> Vec<Message<'_>> {
        serde_json::from_str(json).unwrap()
    }

    /// The same prompt through tiktoken-rs's cookbook implementation.
    fn reference(model: &str, messages: &[Message<'_>]) -> u64 {
        let converted: Vec<tiktoken_rs::ChatCompletionRequestMessage> = messages
            .iter()
            .map(|m| tiktoken_rs::ChatCompletionRequestMessage {
                role: m.role.as_str().to_string(),
                content: m.content.text().map(|t| t.into_owned()),
                name: m.name.as_deref().map(str::to_string),
                function_call: None,
                tool_calls: m
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|call| tiktoken_rs::FunctionCall {
                        name: call.name().to_string(),
                        arguments: call
                            .as_function()
                            .map(|f| f.arguments.to_string())
                            .unwrap_or_default(),
                    })
                    .collect(),
                refusal: m.refusal.as_deref().map(str::to_string),
            })
            .collect();
        tiktoken_rs::num_tokens_from_messages(model, &converted).unwrap() as u64
    }

    #[test]
    fn messages_count_like_the_cookbook() {
        let messages = parse(
            r#"[
              {"role":"system","content":"You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
              {"role":"system","name":"example_user","content":"New synergies will help drive top-line growth."},
              {"role":"system","name":"example_assistant","content":"Things working well together will increase revenue."},
              {"role":"user","content":[{"type":"text","text":"This late pivot means we don't have time to boil the ocean"},{"type":"text","text":" for the client deliverable."}]},
              {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"lookup","arguments":"{\"term\":\"boil the ocean\"}"}}]},
              {"role":"assistant","content":"I can't help with that.","refusal":"Not allowed."}
            ]"#,
        );
        for (model, kind) in [
            ("gpt-4o", TokenizerKind::O200kBase),
            ("gpt-4", TokenizerKind::Cl100kBase),
        ] {
            assert_eq!(
                count_messages(kind, &messages),
                reference(model, &messages),
                "{model}"
            );
        }
    }

    #[test]
    fn a_short_message_has_known_overheads() {
        // "hello world" is 2 tokens and "user" 1 in both encodings (checked against
        // tiktoken-rs in the module tests): 3 + 1 + 2.
        let message = Message::user("hello world");
        assert_eq!(count_message(TokenizerKind::O200kBase, &message), 6);
        assert_eq!(
            count_messages(TokenizerKind::Cl100kBase, &[message]),
            6 + REPLY_PRIMING
        );
        let named = Message {
            name: Some("bob".into()),
            ..Message::new(Role::User, "hello world")
        };
        assert_eq!(
            count_message(TokenizerKind::O200kBase, &named),
            6 + count(TokenizerKind::O200kBase, "bob") + TOKENS_PER_NAME
        );
    }

    #[test]
    fn images_tools_and_tool_answers_are_counted() {
        let kind = TokenizerKind::O200kBase;
        let messages = parse(
            r#"[
              {"role":"user","content":[
                {"type":"image_url","image_url":{"url":"https://example.com/a.png","detail":"low"}},
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},
                {"type":"input_audio","input_audio":{"data":"AAAA","format":"wav"}}
              ]},
              {"role":"tool","tool_call_id":"call_abc","content":"{\"temp\":21}"}
            ]"#,
        );
        let user = TOKENS_PER_MESSAGE + count(kind, "user") + IMAGE_TOKENS_LOW + IMAGE_TOKENS;
        assert_eq!(count_message(kind, &messages[0]), user);
        let tool = TOKENS_PER_MESSAGE
            + count(kind, "tool")
            + count(kind, "call_abc")
            + count(kind, "{\"temp\":21}");
        assert_eq!(count_message(kind, &messages[1]), tool);
        let tools = r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]"#;
        assert_eq!(count_tools(kind, tools), count(kind, tools));
        assert!(count_tools(kind, tools) > 10);
    }
}
