//! Anthropic Messages response → OpenAI `chat.completion`, and Anthropic stream events →
//! `chat.completion.chunk` events.
//!
//! Properties: a decoded body is a `chat.completion` with one choice and usage whose total
//! is the sum of its parts; the stream decoder emits only framed JSON chunks or `[DONE]`,
//! `[DONE]` at most once and last, and nothing after an error.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchyard::providers::anthropic::{StreamDecoder, decode_error, decode_response};
use switchyard::wire::sse::{DONE, SseFramer, parse_event};

fuzz_target!(|data: &[u8]| {
    let _ = decode_error(data);
    if let Ok((body, usage)) = decode_response(data, "claude-test", "p") {
        let completion: Value = serde_json::from_slice(&body).expect("a completion is JSON");
        assert_eq!(completion["object"], "chat.completion");
        assert_eq!(completion["choices"].as_array().map(Vec::len), Some(1));
        if let Some(usage) = usage {
            assert_eq!(
                usage.total_tokens,
                usage.prompt_tokens.saturating_add(usage.completion_tokens)
            );
        }
    }

    let mut framer = SseFramer::new();
    if framer.push(data).is_err() {
        return;
    }
    let mut decoder = StreamDecoder::new("claude-test", true, "p");
    let mut out = VecDeque::new();
    let mut done = false;
    let mut events = Vec::new();
    while let Some(raw) = framer.next_event() {
        events.push(raw);
    }
    events.extend(framer.finish());
    for raw in events {
        let Some(event) = parse_event(&raw) else {
            continue;
        };
        let failed = decoder.on_event(&event, &mut out).is_err();
        for chunk in out.drain(..) {
            assert!(!done, "an event after [DONE]");
            if &chunk[..] == DONE {
                done = true;
                continue;
            }
            let json = chunk
                .strip_prefix(b"data: ")
                .and_then(|c| c.strip_suffix(b"\n\n"))
                .expect("a framed data event");
            let chunk: Value = serde_json::from_slice(json).expect("a chunk is JSON");
            assert_eq!(chunk["object"], "chat.completion.chunk");
        }
        if failed {
            break;
        }
    }
    assert_eq!(done, decoder.is_finished());
});
