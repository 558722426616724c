//! Unit tests of the Anthropic translation: requests out, responses and errors back, and
//! stream transcripts through the decoder.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;

use bytes::Bytes;
use serde_json::{Value, json};

use super::*;
use crate::error::GatewayError;
use crate::wire::sse::parse_event;
use crate::wire::{ChatRequest, Usage};

fn request(body: Value) -> ChatRequest {
    ChatRequest::parse(Bytes::from(serde_json::to_vec(&body).unwrap())).unwrap()
}

fn encode(body: Value) -> Value {
    let out = encode_request(&request(body), "claude-up", 1024).unwrap();
    serde_json::from_slice(&out).unwrap()
}

fn encode_err(body: Value) -> Option<&'static str> {
    match encode_request(&request(body), "claude-up", 1024) {
        Err(GatewayError::InvalidRequest { param, .. }) => param,
        other => panic!(
            "expected a 400, got {:?}",
            other.map(|b| String::from_utf8(b).unwrap())
        ),
    }
}

#[test]
fn system_is_extracted_and_roles_are_merged() {
    let v = encode(json!({
        "model": "alias",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": [{"type": "text", "text": "Still there?"}]},
            {"role": "assistant", "content": "Oui."},
            {"role": "assistant", "content": null},
            {"role": "assistant", "content": [{"type": "text", "text": "Bonjour."}]},
            {"role": "user", "content": "Merci"}
        ]
    }));
    assert_eq!(v["model"], "claude-up");
    assert_eq!(v["max_tokens"], 1024);
    assert_eq!(v["system"], "Be brief.\n\nUse French.");
    assert!(v.get("stream").is_none());
    assert_eq!(
        v["messages"],
        json!([
            {"role": "user", "content": [
                {"type": "text", "text": "Hi"},
                {"type": "text", "text": "Still there?"}
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Oui."},
                {"type": "text", "text": "Bonjour."}
            ]},
            {"role": "user", "content": "Merci"}
        ])
    );
}

#[test]
fn sampling_and_limits_are_mapped() {
    let v = encode(json!({
        "model": "alias",
        "messages": [{"role": "user", "content": "x"}],
        "max_completion_tokens": 77, "max_tokens": 5,
        "temperature": 0.3, "top_p": 0.9, "stop": "END", "stream": true,
        "user": "u-42", "n": 1, "logprobs": false, "seed": 7
    }));
    assert_eq!(v["max_tokens"], 77);
    assert_eq!(v["temperature"], 0.3);
    assert_eq!(v["top_p"], 0.9);
    assert_eq!(v["stop_sequences"], json!(["END"]));
    assert_eq!(v["stream"], true);
    assert_eq!(v["metadata"], json!({"user_id": "u-42"}));
    assert!(v.get("seed").is_none() && v.get("n").is_none() && v.get("logprobs").is_none());

    let v = encode(json!({
        "model": "alias", "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 5, "stop": ["a", "b"]
    }));
    assert_eq!(v["max_tokens"], 5);
    assert_eq!(v["stop_sequences"], json!(["a", "b"]));
    assert!(v.get("temperature").is_none() && v.get("system").is_none());
}

#[test]
fn n_above_one_is_rejected() {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2});
    assert_eq!(encode_err(body), Some("n"));
}

#[test]
fn image_parts_become_image_blocks() {
    let v = encode(json!({
        "model": "m",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
        ]}]
    }));
    assert_eq!(
        v["messages"][0]["content"],
        json!([
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
        ])
    );
    let bad = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}
    ]}]});
    assert_eq!(encode_err(bad), Some("messages"));
    let audio = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    ]}]});
    assert_eq!(encode_err(audio), Some("messages"));
}

#[test]
fn tool_calls_and_results_are_encoded() {
    let v = encode(json!({
        "model": "m",
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": ""}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "21C"}]},
            {"role": "user", "content": "Thanks"}
        ],
        "tools": [
            {"type": "function", "function": {"name": "weather", "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "ping"}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "parallel_tool_calls": false
    }));
    assert_eq!(
        v["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "weather", "input": {}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "21C"},
                {"type": "text", "text": "Thanks"}
            ]}
        ])
    );
    assert_eq!(
        v["tools"],
        json!([
            {"name": "weather", "description": "Weather now", "input_schema":
                {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            {"name": "ping", "input_schema": {"type": "object", "properties": {}}}
        ])
    );
    assert_eq!(
        v["tool_choice"],
        json!({"type": "tool", "name": "weather", "disable_parallel_tool_use": true})
    );
}

#[test]
fn tool_choice_strings_are_mapped() {
    for (choice, expected) in [
        (json!("auto"), json!({"type": "auto"})),
        (json!("required"), json!({"type": "any"})),
        (json!("none"), json!({"type": "none"})),
    ] {
        let v = encode(json!({
            "model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": choice
        }));
        assert_eq!(v["tool_choice"], expected);
    }
    let v = encode(json!({
        "model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "parallel_tool_calls": false
    }));
    assert_eq!(
        v["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    // Without tools there is nothing to choose from.
    let v = encode(json!({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"
    }));
    assert!(v.get("tool_choice").is_none() && v.get("tools").is_none());
}

#[test]
fn bad_tool_arguments_and_roles_are_400s() {
    for args in ["[1,2]", "{\"a\":", "not json"] {
        let body = json!({"model": "m", "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}]}
        ]});
        assert_eq!(encode_err(body), Some("messages"), "{args}");
    }
    let body = json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]});
    assert_eq!(encode_err(body), Some("messages"));
    let body = json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]});
    assert_eq!(encode_err(body), Some("messages"));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "web_search"}]});
    assert_eq!(encode_err(body), Some("tools"));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"});
    assert_eq!(encode_err(body), Some("tool_choice"));
}

#[test]
fn custom_tools_and_allowed_tools_are_400s() {
    let body = json!({"model": "m", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "sql", "input": "SELECT 1"}}]}
    ]});
    assert_eq!(encode_err(body), Some("messages"));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "custom", "custom": {"name": "sql"}}]});
    assert_eq!(encode_err(body), Some("tools"));
    for choice in [
        json!({"type": "custom", "custom": {"name": "f"}}),
        json!({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}),
    ] {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": choice});
        assert_eq!(encode_err(body), Some("tool_choice"));
    }
}

#[test]
fn response_format_becomes_a_system_instruction() {
    let v = encode(json!({
        "model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}],
        "response_format": {"type": "json_object"}
    }));
    assert!(v.get("response_format").is_none());
    let system = v["system"].as_str().unwrap();
    assert!(system.starts_with("S\n\n") && system.contains("JSON object"));

    let v = encode(json!({
        "model": "m", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "r",
            "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}}
    }));
    let system = v["system"].as_str().unwrap();
    let schema_text = &system[system.find('{').unwrap()..];
    let schema: Value = serde_json::from_str(schema_text).unwrap();
    assert_eq!(schema["properties"]["ok"]["type"], "boolean");
}

#[test]
fn escaped_text_survives_the_round_trip() {
    let v = encode(json!({"model": "m", "messages": [
        {"role": "user", "content": "line1\n\"quoted\" \u{e9}"}
    ]}));
    assert_eq!(v["messages"][0]["content"], "line1\n\"quoted\" \u{e9}");
}

fn decode(body: Value) -> (Value, Option<Usage>) {
    let (out, usage) =
        decode_response(&serde_json::to_vec(&body).unwrap(), "fallback", "anthropic").unwrap();
    (serde_json::from_slice(&out).unwrap(), usage)
}

#[test]
fn text_response_is_decoded() {
    let (v, usage) = decode(json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 3}
    }));
    assert_eq!(v["id"], "chatcmpl-msg_01");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "claude-x");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Hello world");
    assert!(choice["message"].get("tool_calls").is_none());
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
    );
    assert_eq!(
        usage,
        Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 3,
            total_tokens: 13
        })
    );
}

#[test]
fn tool_use_response_is_decoded() {
    let (v, _) = decode(json!({
        "id": "msg_02", "type": "message", "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "ping", "input": {}}
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 100}
    }));
    assert_eq!(v["model"], "fallback");
    let message = &v["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["id"], "toolu_1");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert_eq!(calls[1]["function"]["arguments"], "{}");
    assert_eq!(v["usage"]["prompt_tokens"], 105);
    assert_eq!(v["usage"]["total_tokens"], 112);
}

#[test]
fn stop_reasons_are_mapped() {
    for (stop, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
    ] {
        let (v, _) = decode(json!({
            "id": "m", "type": "message", "content": [{"type": "text", "text": "x"}],
            "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}
        }));
        assert_eq!(v["choices"][0]["finish_reason"], finish, "{stop}");
    }
}

#[test]
fn malformed_responses_and_errors() {
    assert!(matches!(
        decode_response(b"{\"id\":", "m", "p"),
        Err(GatewayError::UpstreamProtocol { .. })
    ));
    assert!(matches!(
        decode_response(b"[1]", "m", "p"),
        Err(GatewayError::UpstreamProtocol { .. })
    ));
    let err = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    assert!(matches!(
        decode_response(err, "m", "p"),
        Err(GatewayError::UpstreamRateLimited { .. })
    ));
    assert_eq!(
        decode_error(err),
        Some(("overloaded_error".to_string(), "Overloaded".to_string()))
    );
    assert_eq!(decode_error(b"<html>502</html>"), None);
    assert_eq!(decode_error(br#"{"type":"message","content":[]}"#), None);
}

/// Feeds a transcript of `(event name, data)` pairs through framing and parsing, as
/// the stream pipeline does, and returns the payloads emitted.
fn run_stream(decoder: &mut StreamDecoder, events: &[(&str, Value)]) -> Vec<String> {
    let mut out = VecDeque::new();
    for (name, data) in events {
        let framed = format!("event: {name}\ndata: {data}\n\n");
        let event = parse_event(framed.as_bytes()).unwrap();
        decoder.on_event(&event, &mut out).unwrap();
    }
    out.iter()
        .map(|b| {
            let s = std::str::from_utf8(b).unwrap();
            assert!(s.starts_with("data: ") && s.ends_with("\n\n"), "{s}");
            s["data: ".len()..s.len() - 2].to_string()
        })
        .collect()
}

fn transcript() -> Vec<(&'static str, Value)> {
    vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_abc", "type": "message", "role": "assistant", "model": "claude-sonnet",
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": "Let me "}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": "check \"both\".\n"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_A", "name": "weather", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": "ris\", \"unit\": \"c\"}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_B", "name": "weather", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": "{\"ci"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": "ty\": \"Rome\"}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 2}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"output_tokens": 89}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]
}

#[test]
fn stream_transcript_with_parallel_tools_and_usage() {
    let mut decoder = StreamDecoder::new("fallback", true, "anthropic");
    let payloads = run_stream(&mut decoder, &transcript());
    assert!(decoder.is_finished());
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();

    for chunk in &chunks {
        assert_eq!(chunk["id"], "chatcmpl-msg_abc");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "claude-sonnet");
        assert_eq!(chunk["created"], chunks[0]["created"]);
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(chunks[0]["usage"], Value::Null);

    let mut text = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    let (last, body) = chunks.split_last().unwrap();
    for chunk in body {
        assert!(chunk.get("usage").unwrap().is_null());
        let choice = &chunk["choices"][0];
        assert_eq!(choice["index"], 0);
        if let Some(t) = choice["delta"]["content"].as_str() {
            text.push_str(t);
        }
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let k = call["index"].as_u64().unwrap() as usize;
            if let Some(id) = call["id"].as_str() {
                assert_eq!(k, calls.len());
                assert_eq!(call["type"], "function");
                calls.push((
                    id.into(),
                    call["function"]["name"].as_str().unwrap().into(),
                    String::new(),
                ));
            }
            calls[k]
                .2
                .push_str(call["function"]["arguments"].as_str().unwrap());
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            assert!(finish.is_none());
            finish = Some(f.to_string());
        }
    }
    assert_eq!(text, "Let me check \"both\".\n");
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].0.as_str(), calls[0].1.as_str()),
        ("toolu_A", "weather")
    );
    assert_eq!(calls[1].0, "toolu_B");
    let a: Value = serde_json::from_str(&calls[0].2).unwrap();
    let b: Value = serde_json::from_str(&calls[1].2).unwrap();
    assert_eq!(a, json!({"city": "Paris", "unit": "c"}));
    assert_eq!(b, json!({"city": "Rome"}));

    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 25, "completion_tokens": 89, "total_tokens": 114})
    );
    assert_eq!(
        decoder.usage(),
        Some(Usage {
            prompt_tokens: 25,
            completion_tokens: 89,
            total_tokens: 114
        })
    );

    // Anything after message_stop is ignored.
    let mut out = VecDeque::new();
    let late = parse_event(b"data: {\"type\":\"message_stop\"}\n\n").unwrap();
    decoder.on_event(&late, &mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn stream_without_usage_has_no_usage_key_but_ends_with_the_usage_chunk() {
    let mut decoder = StreamDecoder::new("fallback", false, "anthropic");
    let payloads = run_stream(&mut decoder, &transcript());
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let (usage_chunk, chunks) = payloads[..payloads.len() - 1].split_last().unwrap();
    for p in chunks {
        let chunk: Value = serde_json::from_str(p).unwrap();
        assert!(chunk.get("usage").is_none(), "{p}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
    // The usage-only chunk is always there for metering; the inference layer removes it
    // for a client that did not ask for it.
    let last: Value = serde_json::from_str(usage_chunk).unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["total_tokens"], 114);
    assert_eq!(decoder.usage().unwrap().total_tokens, 114);
}

#[test]
fn tool_without_argument_deltas_gets_empty_object() {
    let mut decoder = StreamDecoder::new("m", false, "anthropic");
    let payloads = run_stream(
        &mut decoder,
        &[
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1", "model": "", "usage": {"input_tokens": 3}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ],
    );
    let args: String = payloads
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(args, "{}");
    let first: Value = serde_json::from_str(&payloads[0]).unwrap();
    assert_eq!(first["model"], "m");
}

#[test]
fn stream_error_events_become_errors() {
    let mut out = VecDeque::new();
    let mut decoder = StreamDecoder::new("m", false, "anthropic");
    let overloaded = parse_event(
        b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    )
    .unwrap();
    assert!(matches!(
        decoder.on_event(&overloaded, &mut out),
        Err(GatewayError::UpstreamRateLimited { .. })
    ));
    let api = parse_event(
        b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"boom\"}}\n\n",
    )
    .unwrap();
    match decoder.on_event(&api, &mut out) {
        Err(GatewayError::UpstreamFailed { message, .. }) => assert!(message.contains("boom")),
        other => panic!("{other:?}"),
    }
    let garbage = parse_event(b"data: {not json\n\n").unwrap();
    assert!(matches!(
        decoder.on_event(&garbage, &mut out),
        Err(GatewayError::UpstreamProtocol { .. })
    ));
    assert!(!decoder.is_finished());
}

#[test]
fn usage_beyond_u64_saturates_instead_of_overflowing() {
    let body = format!(
        r#"{{"type":"message","content":[{{"type":"text","text":"x"}}],"usage":{{"input_tokens":{max},"cache_read_input_tokens":{max},"output_tokens":{max}}}}}"#,
        max = u64::MAX
    );
    let (_, usage) = decode_response(body.as_bytes(), "m", "p").unwrap();
    let usage = usage.unwrap();
    assert_eq!(usage.prompt_tokens, u64::MAX);
    assert_eq!(usage.total_tokens, u64::MAX);
}

/// A message for the round-trip property: a role and its text, as a string or as parts.
fn message_strategy() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    (
        prop::sample::select(vec!["system", "developer", "user", "assistant"]),
        "[ -~]{0,12}",
        any::<bool>(),
    )
        .prop_map(|(role, text, parts)| {
            if parts {
                json!({"role": role, "content": [{"type": "text", "text": text}]})
            } else {
                json!({"role": role, "content": text})
            }
        })
}

proptest::proptest! {
    /// A translated request round-trips its messages: every non-empty user and assistant
    /// text arrives as a text block, in order, under its role; turns alternate; system and
    /// developer texts arrive in `system`.
    #[test]
    fn translation_keeps_every_text_in_order(
        messages in proptest::collection::vec(message_strategy(), 1..12),
    ) {
        let v = encode(json!({"model": "alias", "messages": messages}));
        let text_of = |m: &Value| match &m["content"] {
            Value::String(s) => s.clone(),
            parts => parts[0]["text"].as_str().unwrap().to_owned(),
        };
        let expected: Vec<(String, String)> = messages
            .iter()
            .filter(|m| m["role"] == "user" || m["role"] == "assistant")
            .map(|m| (m["role"].as_str().unwrap().to_owned(), text_of(m)))
            .filter(|(_, text)| !text.is_empty())
            .collect();
        let mut seen = Vec::new();
        let mut previous = String::new();
        for turn in v["messages"].as_array().unwrap() {
            let role = turn["role"].as_str().unwrap().to_owned();
            proptest::prop_assert_ne!(&role, &previous);
            match &turn["content"] {
                Value::String(text) => seen.push((role.clone(), text.clone())),
                blocks => {
                    for block in blocks.as_array().unwrap() {
                        seen.push((role.clone(), block["text"].as_str().unwrap().to_owned()));
                    }
                }
            }
            previous = role;
        }
        proptest::prop_assert_eq!(seen, expected);
        let system = v["system"].as_str().unwrap_or_default();
        for m in messages.iter().filter(|m| m["role"] == "system" || m["role"] == "developer") {
            proptest::prop_assert!(system.contains(&text_of(m)));
        }
    }
}
