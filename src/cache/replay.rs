//! Between streams and stored answers, for the cache: a live stream is assembled into the
//! `chat.completion` body it stands for ([`StreamAssembler`], from [`crate::wire::chat`]),
//! and a stored body is replayed as the SSE events a streaming client expects
//! ([`completion_to_events`]: role, content, refusal, tool-call deltas, finish, usage when
//! asked, `[DONE]`), in the same shape as a live stream.

use bytes::Bytes;

use crate::wire::chat::Completion;
use crate::wire::sse::{DONE, data_event};

pub use crate::wire::chat::StreamAssembler;

/// Replays a stored `chat.completion` as stream events.
///
/// # Errors
/// When the stored body is not a completion (it was validated when stored, so only a
/// foreign writer to a shared cache could cause this).
pub fn completion_to_events(body: &[u8], include_usage: bool) -> Result<Vec<Bytes>, String> {
    let completion: Completion<'_> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let chunks = completion.to_chunks(include_usage);
    let mut events = Vec::with_capacity(chunks.len() + 1);
    for chunk in &chunks {
        let json = serde_json::to_vec(chunk).map_err(|e| e.to_string())?;
        events.push(data_event(&json));
    }
    events.push(Bytes::from_static(DONE));
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn ev(v: Value) -> Bytes {
        data_event(v.to_string().as_bytes())
    }

    #[test]
    fn a_stream_assembles_into_a_completion_and_replays_back() {
        let mut a = StreamAssembler::new();
        let base =
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m"});
        let with = |choices: Value| {
            let mut c = base.clone();
            c["choices"] = choices;
            ev(c)
        };
        a.push(&with(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
        ));
        a.push(&with(json!([{"index": 0, "delta": {"content": "Hel"}}])));
        a.push(&with(json!([{"index": 0, "delta": {"content": "lo"}}])));
        a.push(&with(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "t1", "function": {"name": "f", "arguments": "{\"a\""}}]}}])));
        a.push(&with(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}])));
        a.push(&with(
            json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        ));
        let mut usage = base.clone();
        usage["choices"] = json!([]);
        usage["usage"] = json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3});
        a.push(&ev(usage));
        a.push(DONE);
        let body = a.finish().unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(v["usage"]["total_tokens"], 3);

        let events = completion_to_events(&body, true).unwrap();
        let mut again = StreamAssembler::new();
        for e in &events {
            again.push(e);
        }
        let replayed: Value = serde_json::from_slice(&again.finish().unwrap()).unwrap();
        assert_eq!(replayed, v, "replay then assemble is the identity");
        let without = completion_to_events(&body, false).unwrap();
        assert_eq!(
            without.len(),
            events.len() - 1,
            "no usage chunk unless asked"
        );
    }

    #[test]
    fn an_unfinished_or_failed_stream_is_not_stored() {
        let mut a = StreamAssembler::new();
        a.push(&ev(
            json!({"choices": [{"index": 0, "delta": {"content": "x"}}]}),
        ));
        assert!(a.finish().is_none(), "no [DONE]");
        let mut b = StreamAssembler::new();
        b.push(&ev(
            json!({"choices": [{"index": 0, "delta": {"content": "x"}}]}),
        ));
        b.push(&ev(json!({"error": {"message": "boom"}})));
        b.push(DONE);
        assert!(b.finish().is_none(), "error event");
    }
}
