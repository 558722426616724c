//! One OpenAI stream event, classified without being parsed.
//!
//! Every streamed chunk passes through here on the hot path, so the common case (a content
//! delta) costs one substring search and no JSON parse. Only an event that carries a
//! `usage` object is parsed, and only for that object. This is the one place usage is read
//! from an event: the provider stream, coalesced followers and the stream assembler all
//! ask [`inspect`], so an upstream that writes `"usage": {` (with a space) is counted
//! exactly like one that writes `"usage":{`.

use serde::Deserialize;

use super::Usage;

/// What an event is, for forwarding decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An ordinary `chat.completion.chunk` (it may also carry usage).
    Chunk,
    /// The usage-only chunk (`"choices": []` with `usage`) that `include_usage` asks for.
    UsageOnly,
    /// `data: [DONE]`.
    Done,
    /// An error event (`data: {"error": …}`), which ends the stream.
    Error,
}

/// An event's kind and, when it carries one, its usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventInfo {
    pub kind: EventKind,
    pub usage: Option<Usage>,
}

/// The JSON payload of a framed event (`data: {...}\n\n` → `{...}`).
pub fn event_data(event: &[u8]) -> &[u8] {
    event
        .strip_prefix(b"data: ")
        .or_else(|| event.strip_prefix(b"data:"))
        .unwrap_or(event)
        .trim_ascii()
}

/// Classifies one framed event and reads its usage.
pub fn inspect(event: &[u8]) -> EventInfo {
    let data = event_data(event);
    if data == b"[DONE]" {
        return EventInfo {
            kind: EventKind::Done,
            usage: None,
        };
    }
    if data
        .strip_prefix(b"{")
        .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"\"error\""))
    {
        return EventInfo {
            kind: EventKind::Error,
            usage: None,
        };
    }
    let usage = read_usage(data);
    let kind = if usage.is_some() && has_key_followed_by(data, b"\"choices\"", b"[]") {
        EventKind::UsageOnly
    } else {
        EventKind::Chunk
    };
    EventInfo { kind, usage }
}

/// Reads `usage` from a JSON response or chunk, searching before parsing: `None` when it
/// has no `usage` object (absent or `null`).
pub fn read_usage(json: &[u8]) -> Option<Usage> {
    if !has_key_followed_by(json, b"\"usage\"", b"{") {
        return None;
    }
    #[derive(Deserialize)]
    struct WithUsage {
        usage: Option<Usage>,
    }
    serde_json::from_slice::<WithUsage>(json).ok()?.usage
}

/// Whether `json` has `key` (quoted) followed, after `:` and any whitespace, by `value`
/// (itself allowed inner whitespace between its two bytes when it is `[]`). A quoted key
/// cannot occur inside a JSON string, where its quotes would be escaped.
fn has_key_followed_by(json: &[u8], key: &[u8], value: &[u8]) -> bool {
    memchr::memmem::find_iter(json, key).any(|at| {
        let rest = json[at + key.len()..].trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b":") else {
            return false;
        };
        let rest = rest.trim_ascii_start();
        match value {
            [open, close] => rest
                .strip_prefix(&[*open])
                .is_some_and(|r| r.trim_ascii_start().starts_with(&[*close])),
            _ => rest.starts_with(value),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPACT: &[u8] = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n";
    const SPACED: &[u8] = b"data: {\"choices\": [ ], \"usage\": {\"prompt_tokens\": 1, \"completion_tokens\": 2, \"total_tokens\": 3}}\n\n";

    #[test]
    fn usage_is_read_with_and_without_the_space() {
        for event in [COMPACT, SPACED] {
            let info = inspect(event);
            assert_eq!(info.kind, EventKind::UsageOnly, "{event:?}");
            assert_eq!(info.usage.map(|u| u.total_tokens), Some(3), "{event:?}");
        }
        let body =
            br#"{"id":"x", "usage" : {"prompt_tokens":4,"completion_tokens":5,"total_tokens":9}}"#;
        assert_eq!(read_usage(body).map(|u| u.total_tokens), Some(9));
    }

    #[test]
    fn ordinary_chunks_done_and_errors_are_told_apart() {
        let chunk = inspect(b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\": {\"}}],\"usage\":null}\n\n");
        assert_eq!(chunk.kind, EventKind::Chunk);
        assert_eq!(chunk.usage, None, "text that mentions usage is not usage");
        assert_eq!(inspect(b"data: [DONE]\n\n").kind, EventKind::Done);
        assert_eq!(
            inspect(b"data: { \"error\": {\"message\":\"x\"}}\n\n").kind,
            EventKind::Error
        );
        // A chunk with choices and usage together (some servers send the last delta so).
        let both =
            inspect(b"data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"total_tokens\":7}}\n\n");
        assert_eq!(both.kind, EventKind::Chunk);
        assert_eq!(both.usage.map(|u| u.total_tokens), Some(7));
    }

    proptest::proptest! {
        /// The usage reader reads the same figures whatever whitespace the upstream puts
        /// around the colons and brackets, and never takes text for usage.
        #[test]
        fn usage_is_read_whatever_the_spacing(
            prompt in 0u64..1_000_000,
            completion in 0u64..1_000_000,
            ws in proptest::collection::vec(proptest::sample::select(vec!["", " ", "  ", "\t", "\n"]), 6),
            text in "[ -~]{0,30}",
        ) {
            let event = format!(
                "data: {{\"choices\"{a}:{b}[{c}],\"usage\"{d}:{e}{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion},\"total_tokens\":{total}}}{f}}}\n\n",
                a = ws[0], b = ws[1], c = ws[2], d = ws[3], e = ws[4], f = ws[5],
                total = prompt + completion,
            );
            let info = inspect(event.as_bytes());
            proptest::prop_assert_eq!(info.kind, EventKind::UsageOnly);
            proptest::prop_assert_eq!(info.usage, Some(Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt + completion,
            }));
            // Any text in a delta, escaped as JSON, is never usage.
            let chunk = serde_json::json!({"choices": [{"delta": {"content": text}}]});
            let info = inspect(format!("data: {chunk}\n\n").as_bytes());
            proptest::prop_assert_eq!(info.kind, EventKind::Chunk);
            proptest::prop_assert_eq!(info.usage, None);
        }
    }
}
