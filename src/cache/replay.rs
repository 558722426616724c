//! Between streams and stored answers: a live stream is assembled into the
//! `chat.completion` body it stands for, and a stored body is replayed as the SSE chunks a
//! streaming client expects (role, content, tool-call deltas, finish, usage when asked,
//! `[DONE]`), in the same shape as a live stream.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::wire::sse::{DONE, data_event};

#[derive(Default)]
struct ToolCallAcc {
    id: Option<String>,
    name: String,
    arguments: String,
}

#[derive(Default)]
struct ChoiceAcc {
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<ToolCallAcc>,
    finish_reason: Option<Value>,
}

/// Accumulates OpenAI stream chunks into the equivalent non-stream body.
#[derive(Default)]
pub struct StreamAssembler {
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    system_fingerprint: Option<Value>,
    choices: Vec<ChoiceAcc>,
    usage: Option<Value>,
    done: bool,
    broken: bool,
}

impl StreamAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one framed event (`data: {...}\n\n`).
    pub fn push(&mut self, event: &[u8]) {
        let Some(data) = event.strip_prefix(b"data: ") else {
            return;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
            self.broken = true;
            return;
        };
        if chunk.get("error").is_some() {
            self.broken = true;
            return;
        }
        for (field, slot) in [
            ("id", &mut self.id),
            ("created", &mut self.created),
            ("model", &mut self.model),
            ("system_fingerprint", &mut self.system_fingerprint),
        ] {
            if slot.is_none()
                && let Some(v) = chunk.get(field).filter(|v| !v.is_null())
            {
                *slot = Some(v.clone());
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        for choice in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if index > 128 {
                self.broken = true;
                return;
            }
            if self.choices.len() <= index {
                self.choices.resize_with(index + 1, ChoiceAcc::default);
            }
            let acc = &mut self.choices[index];
            let delta = choice.get("delta").unwrap_or(&Value::Null);
            if let Some(text) = delta.get("content").and_then(Value::as_str) {
                acc.content.get_or_insert_with(String::new).push_str(text);
            }
            if let Some(text) = delta.get("refusal").and_then(Value::as_str) {
                acc.refusal.get_or_insert_with(String::new).push_str(text);
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let k = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                if k > 128 {
                    self.broken = true;
                    return;
                }
                if acc.tool_calls.len() <= k {
                    acc.tool_calls.resize_with(k + 1, ToolCallAcc::default);
                }
                let t = &mut acc.tool_calls[k];
                if let Some(id) = call.get("id").and_then(Value::as_str) {
                    t.id = Some(id.to_string());
                }
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    t.name.push_str(name);
                }
                if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    t.arguments.push_str(args);
                }
            }
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                acc.finish_reason = Some(reason.clone());
            }
        }
    }

    /// The assembled `chat.completion`, if the stream ended cleanly with `[DONE]`.
    pub fn finish(self) -> Option<Vec<u8>> {
        if !self.done || self.broken || self.choices.is_empty() {
            return None;
        }
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let mut message = Map::new();
                message.insert("role".into(), json!("assistant"));
                message.insert("content".into(), json!(c.content));
                message.insert("refusal".into(), json!(c.refusal));
                if !c.tool_calls.is_empty() {
                    let calls: Vec<Value> = c
                        .tool_calls
                        .into_iter()
                        .map(|t| {
                            json!({"id": t.id, "type": "function",
                                   "function": {"name": t.name, "arguments": t.arguments}})
                        })
                        .collect();
                    message.insert("tool_calls".into(), Value::Array(calls));
                }
                json!({"index": i, "message": message, "logprobs": null,
                       "finish_reason": c.finish_reason.unwrap_or(json!("stop"))})
            })
            .collect();
        let mut body = json!({
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(obj) = body.as_object_mut() {
            if let Some(usage) = self.usage {
                obj.insert("usage".into(), usage);
            }
            if let Some(fp) = self.system_fingerprint {
                obj.insert("system_fingerprint".into(), fp);
            }
        }
        serde_json::to_vec(&body).ok()
    }
}

/// Replays a stored `chat.completion` as stream events.
///
/// # Errors
/// When the stored body is not a completion (it was validated when stored, so only a
/// foreign writer to a shared cache could cause this).
pub fn completion_to_events(body: &[u8], include_usage: bool) -> Result<Vec<Bytes>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let choices = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or("stored answer has no choices")?;
    let base = |choices: Value| -> Value {
        let mut chunk = json!({
            "id": v.get("id"), "object": "chat.completion.chunk", "created": v.get("created"),
            "model": v.get("model"), "choices": choices,
        });
        if let Some(obj) = chunk.as_object_mut() {
            if let Some(fp) = v.get("system_fingerprint") {
                obj.insert("system_fingerprint".into(), fp.clone());
            }
            if include_usage {
                obj.insert("usage".into(), Value::Null);
            }
        }
        chunk
    };
    let frame = |chunk: Value| data_event(chunk.to_string().as_bytes());
    let mut events = Vec::new();
    for (i, choice) in choices.iter().enumerate() {
        let message = choice.get("message").unwrap_or(&Value::Null);
        events.push(frame(base(json!([{"index": i,
            "delta": {"role": "assistant", "content": "", "refusal": null},
            "logprobs": null, "finish_reason": null}]))));
        if let Some(text) = message.get("content").and_then(Value::as_str)
            && !text.is_empty()
        {
            events.push(frame(base(json!([{"index": i, "delta": {"content": text},
                "logprobs": null, "finish_reason": null}]))));
        }
        for (k, call) in message
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            events.push(frame(base(json!([{"index": i, "delta": {"tool_calls": [{
                "index": k, "id": call.get("id"), "type": "function",
                "function": {"name": call.pointer("/function/name"),
                             "arguments": call.pointer("/function/arguments")}}]},
                "logprobs": null, "finish_reason": null}]))));
        }
        events.push(frame(base(
            json!([{"index": i, "delta": {}, "logprobs": null,
            "finish_reason": choice.get("finish_reason")}]),
        )));
    }
    if include_usage && let Some(usage) = v.get("usage") {
        let mut chunk = base(json!([]));
        if let Some(obj) = chunk.as_object_mut() {
            obj.insert("usage".into(), usage.clone());
        }
        events.push(frame(chunk));
    }
    events.push(Bytes::from_static(DONE));
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

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
