//! Unit tests of the chat schema: OpenAI-shaped samples parse into the typed values and
//! serialise back to the same JSON; the assembler merges chunks; replay and assembly are
//! inverse.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::{Value, json};

use super::*;
use crate::wire::Usage;
use crate::wire::sse::{DONE, data_event};

/// Parses `sample` as `T`, hands it to `check`, and asserts it serialises back unchanged.
fn round_trip<'a, T>(sample: &'a str, check: impl FnOnce(&T)) -> T
where
    T: serde::Deserialize<'a> + Serialize,
{
    let parsed: T = serde_json::from_str(sample).unwrap();
    check(&parsed);
    let again: Value = serde_json::to_value(&parsed).unwrap();
    let original: Value = serde_json::from_str(sample).unwrap();
    assert_eq!(again, original, "round trip of {sample}");
    parsed
}

fn completion_sample() -> String {
    json!({
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": null,
                    "refusal": null,
                    "tool_calls": [
                        {"id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                        {"id": "call_b", "type": "function",
                         "function": {"name": "get_time", "arguments": "{}"}}
                    ],
                    "annotations": []
                },
                "logprobs": null,
                "finish_reason": "tool_calls"
            },
            {
                "index": 1,
                "message": {
                    "role": "assistant",
                    "content": "Paris is sunny, see the forecast.",
                    "refusal": null,
                    "annotations": [{"type": "url_citation", "url_citation": {
                        "end_index": 33, "start_index": 19, "title": "Forecast",
                        "url": "https://example.com/paris"}}]
                },
                "logprobs": {"content": [
                    {"token": "Paris", "logprob": -0.25, "bytes": [80, 97, 114, 105, 115],
                     "top_logprobs": [{"token": "Paris", "logprob": -0.25, "bytes": [80, 97, 114, 105, 115]}]}
                ], "refusal": null},
                "finish_reason": "stop"
            }
        ],
        "usage": {
            "prompt_tokens": 82,
            "completion_tokens": 17,
            "total_tokens": 99,
            "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
            "cost": 0.00042
        },
        "service_tier": "default",
        "system_fingerprint": "fp_b376dfbbd5"
    })
    .to_string()
}

#[test]
fn a_completion_with_tool_calls_logprobs_and_usage_details_parses_and_round_trips() {
    let sample = completion_sample();
    round_trip::<Completion<'_>>(&sample, |c| {
        assert_eq!(c.object, COMPLETION_OBJECT);
        assert_eq!(c.created, 1741569952);
        assert_eq!(c.finish_reason(), Some(&FinishReason::ToolCalls));
        assert_eq!(c.text(), None);
        let calls = c.tool_calls();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].id(), calls[0].name()), ("call_a", "get_weather"));
        assert_eq!(
            calls[0].as_function().unwrap().arguments,
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(calls[1].kind(), ToolType::Function);

        let second = &c.choices[1];
        assert_eq!(second.finish_reason, Some(FinishReason::Stop));
        assert!(matches!(second.message.content, Some(Cow::Borrowed(_))));
        let citation = second.message.annotations.as_ref().unwrap()[0]
            .url_citation
            .as_ref()
            .unwrap();
        assert_eq!(citation.url, "https://example.com/paris");
        let logprobs = second.logprobs.as_ref().unwrap().content.as_ref().unwrap();
        assert_eq!(logprobs[0].bytes.as_deref(), Some(&b"Paris"[..]));

        let usage = c.usage.as_ref().unwrap();
        assert_eq!(
            usage.totals(),
            Usage {
                prompt_tokens: 82,
                completion_tokens: 17,
                total_tokens: 99
            }
        );
        assert_eq!(
            usage.prompt_tokens_details.as_ref().unwrap().cached_tokens,
            Some(64)
        );
        assert_eq!(
            usage
                .completion_tokens_details
                .as_ref()
                .unwrap()
                .reasoning_tokens,
            Some(0)
        );
        assert_eq!(
            usage.extra["cost"],
            json!(0.00042),
            "unknown usage fields survive"
        );
        assert_eq!(c.service_tier.as_deref(), Some("default"));
    });
}

#[test]
fn a_refusal_parses_and_round_trips() {
    let sample = json!({
        "id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
            "refusal": "I can't help with that."}, "logprobs": null, "finish_reason": "stop"}],
        "usage": null
    })
    .to_string();
    round_trip::<Completion<'_>>(&sample, |c| {
        let message = c.message().unwrap();
        assert_eq!(message.refusal.as_deref(), Some("I can't help with that."));
        assert_eq!(message.content, None);
        assert!(message.tool_calls().is_empty());
        assert!(c.usage.is_none());
    });
}

#[test]
fn stream_chunks_parse_and_round_trip() {
    let head = |choices: Value, usage: Value| {
        json!({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1741569952,
            "model": "gpt-4.1", "service_tier": "default", "system_fingerprint": "fp_1",
            "choices": choices, "usage": usage})
        .to_string()
    };
    let role = head(
        json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null},
            "logprobs": null, "finish_reason": null}]),
        Value::Null,
    );
    round_trip::<Chunk<'_>>(&role, |c| {
        let delta = &c.choices[0].delta;
        assert_eq!(delta.role, Some(Role::Assistant));
        assert_eq!(delta.content, Some(Some(Cow::Borrowed(""))));
        assert_eq!(delta.refusal, Some(None), "null is not absent");
        assert_eq!(c.usage, Some(None));
        assert!(c.usage().is_none());
    });
    let call = head(
        json!([{"index": 0, "delta": {"content": null, "tool_calls": [{"index": 0, "id": "call_a",
            "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
            "logprobs": null, "finish_reason": null}]),
        Value::Null,
    );
    round_trip::<Chunk<'_>>(&call, |c| {
        let delta = &c.choices[0].delta;
        assert_eq!(delta.content, Some(None));
        assert_eq!(delta.text(), None);
        let call = &delta.tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.kind, Some(ToolType::Function));
        assert_eq!(
            call.function.as_ref().unwrap().name.as_deref(),
            Some("get_weather")
        );
    });
    let arguments = head(
        json!([{"index": 0, "delta": {"tool_calls": [{"index": 0,
            "function": {"arguments": "{\"city\": \"Pa"}}]}, "logprobs": null, "finish_reason": null}]),
        Value::Null,
    );
    round_trip::<Chunk<'_>>(&arguments, |c| {
        let call = &c.choices[0].delta.tool_calls.as_ref().unwrap()[0];
        assert!(call.id.is_none() && call.kind.is_none());
    });
    let text = head(
        json!([{"index": 0, "delta": {"content": "Hel\"lo"}, "logprobs": {"content": [
            {"token": "Hel", "logprob": -0.125, "bytes": null, "top_logprobs": []}], "refusal": null},
            "finish_reason": null}]),
        Value::Null,
    );
    round_trip::<Chunk<'_>>(&text, |c| {
        assert_eq!(c.choices[0].delta.text(), Some("Hel\"lo"));
    });
    let finish = head(
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}]),
        Value::Null,
    );
    round_trip::<Chunk<'_>>(&finish, |c| {
        assert_eq!(c.choices[0].finish_reason, Some(FinishReason::Length));
        assert_eq!(c.choices[0].delta, Delta::default());
    });
    let usage = head(
        json!([]),
        json!({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 8, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}),
    );
    round_trip::<Chunk<'_>>(&usage, |c| {
        assert!(c.choices.is_empty());
        let usage = c.usage().unwrap();
        assert_eq!(usage.total_tokens, 21);
        assert_eq!(
            usage
                .completion_tokens_details
                .as_ref()
                .unwrap()
                .reasoning_tokens,
            Some(8)
        );
    });
    // A chunk without `usage` serialises without it; an unknown finish reason is kept.
    let bare = r#"{"id":"x","object":"chat.completion.chunk","created":2,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"eos"}]}"#;
    round_trip::<Chunk<'_>>(bare, |c| {
        assert!(c.usage.is_none());
        assert_eq!(
            c.choices[0].finish_reason,
            Some(FinishReason::Other("eos".into()))
        );
    });
}

#[test]
fn request_messages_parse_and_round_trip() {
    let sample = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
        {"role": "user", "name": "ana", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "file", "file": {"file_data": "JVBERi0=", "filename": "a.pdf"}},
            {"type": "file", "file": {"file_id": "file-abc"}}
        ]},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_b", "type": "custom", "custom": {"name": "sql", "input": "SELECT 1"}}
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}, {"type": "refusal", "refusal": "I can't."}],
            "refusal": "I can't."},
        {"role": "user", "content": "Thanks"}
    ])
    .to_string();
    round_trip::<Vec<Message<'_>>>(&sample, |messages| {
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            [
                "system",
                "developer",
                "user",
                "assistant",
                "tool",
                "tool",
                "assistant",
                "user"
            ]
        );
        assert!(matches!(
            messages[0].content,
            Content::Text(Cow::Borrowed("Be brief."))
        ));
        assert_eq!(messages[1].content.text().as_deref(), Some("Use French."));
        let Content::Parts(parts) = &messages[2].content else {
            panic!("parts expected");
        };
        let kinds: Vec<&str> = parts.iter().map(ContentPart::kind).collect();
        assert_eq!(
            kinds,
            [
                "text",
                "image_url",
                "image_url",
                "input_audio",
                "file",
                "file"
            ]
        );
        match &parts[1] {
            ContentPart::ImageUrl { image_url } => {
                assert!(matches!(image_url.url, Cow::Borrowed(_)), "borrowed");
                assert_eq!(image_url.detail.as_deref(), Some("low"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(messages[2].name.as_deref(), Some("ana"));
        let calls = messages[3].tool_calls.as_ref().unwrap();
        assert_eq!(messages[3].content, Content::Null);
        assert_eq!(calls[1].kind(), ToolType::Custom);
        assert_eq!(calls[1].name(), "sql");
        assert!(calls[1].as_function().is_none());
        assert_eq!(messages[4].tool_call_id.as_deref(), Some("call_a"));
        assert_eq!(messages[6].refusal.as_deref(), Some("I can't."));
    });

    // Unknown roles and part types are named, not refused; a tool call without `type` is a
    // function call.
    let odd: Vec<Message<'_>> = serde_json::from_str(
        r#"[{"role":"robot","content":[{"type":"video_url","video_url":{"url":"x"}}]},
            {"role":"assistant","tool_calls":[{"id":"c","function":{"name":"f"}}]}]"#,
    )
    .unwrap();
    assert_eq!(odd[0].role, Role::Other("robot".into()));
    assert!(matches!(
        &odd[0].content,
        Content::Parts(p) if p[0].kind() == "video_url"
    ));
    let call = &odd[1].tool_calls.as_ref().unwrap()[0];
    assert_eq!(call.as_function().unwrap().arguments, "");
    assert!(
        serde_json::from_str::<Message<'_>>(r#"{"role":"user","content":[{"type":"image_url"}]}"#)
            .is_err(),
        "an image part without its image"
    );
}

#[test]
fn tools_tool_choice_and_response_format_parse_and_round_trip() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"], "additionalProperties": false}, "strict": true}},
        {"type": "function", "function": {"name": "ping"}},
        {"type": "custom", "custom": {"name": "sql", "description": "Run SQL",
            "format": {"type": "grammar", "grammar": {"definition": "start: /SELECT .*/", "syntax": "lark"}}}}
    ])
    .to_string();
    round_trip::<Vec<Tool<'_>>>(&tools, |tools| {
        let Tool::Function { function } = &tools[0] else {
            panic!("function tool expected");
        };
        assert_eq!(function.name, "get_weather");
        assert_eq!(function.strict, Some(true));
        let schema: Value = serde_json::from_str(function.parameters.unwrap().get()).unwrap();
        assert_eq!(schema["required"], json!(["city"]));
        assert_eq!(tools[2].kind(), "custom");
    });
    let other: Tool<'_> = serde_json::from_str(r#"{"type":"web_search","x":1}"#).unwrap();
    assert_eq!(other.kind(), "web_search");

    for (sample, check) in [
        (r#""none""#, "none"),
        (r#""auto""#, "auto"),
        (r#""required""#, "required"),
        (
            r#"{"type":"function","function":{"name":"get_weather"}}"#,
            "function",
        ),
        (r#"{"type":"custom","custom":{"name":"sql"}}"#, "custom"),
        (
            r#"{"type":"allowed_tools","allowed_tools":{"mode":"auto","tools":[{"type":"function","function":{"name":"ping"}}]}}"#,
            "allowed_tools",
        ),
    ] {
        round_trip::<ToolChoice<'_>>(sample, |choice| {
            let kind = match choice {
                ToolChoice::None => "none",
                ToolChoice::Auto => "auto",
                ToolChoice::Required => "required",
                ToolChoice::Function { name } => {
                    assert_eq!(name, "get_weather");
                    "function"
                }
                ToolChoice::Custom { .. } => "custom",
                ToolChoice::AllowedTools(allowed) => {
                    assert_eq!(allowed.tools.len(), 1);
                    "allowed_tools"
                }
            };
            assert_eq!(kind, check);
        });
    }
    assert!(serde_json::from_str::<ToolChoice<'_>>(r#""sometimes""#).is_err());

    for sample in [
        r#"{"type":"text"}"#,
        r#"{"type":"json_object"}"#,
        r#"{"type":"json_schema","json_schema":{"name":"r","description":"A result","schema":{"type":"object","properties":{"ok":{"type":"boolean"}}},"strict":true}}"#,
    ] {
        round_trip::<ResponseFormat<'_>>(sample, |format| {
            if let ResponseFormat::JsonSchema { json_schema } = format {
                assert_eq!(json_schema.name, "r");
                assert!(json_schema.schema.unwrap().get().contains("boolean"));
            }
        });
    }
    let bare: ResponseFormat<'_> = serde_json::from_str(r#"{"type":"json_schema"}"#).unwrap();
    assert!(
        matches!(bare, ResponseFormat::JsonSchema { json_schema } if json_schema.schema.is_none())
    );

    let stop: Stop = serde_json::from_str(r#""END""#).unwrap();
    assert_eq!(stop.into_vec(), ["END"]);
}

#[test]
fn a_reply_becomes_the_next_turns_assistant_message() {
    let sample = completion_sample();
    let completion: Completion<'_> = serde_json::from_str(&sample).unwrap();
    let reply = completion.choices.into_iter().next().unwrap().message;
    let turn = Message::from(reply);
    let history = vec![
        Message::user("Weather in Paris?"),
        turn,
        Message::tool("call_a", "18C"),
        Message::tool("call_b", "noon"),
    ];
    assert_eq!(
        serde_json::to_value(&history).unwrap(),
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
            ]},
            {"role": "tool", "content": "18C", "tool_call_id": "call_a"},
            {"role": "tool", "content": "noon", "tool_call_id": "call_b"}
        ])
    );
}

/// Merges a chunk with these choices into `a`.
fn push(a: &mut ChunkAssembler, choices: Value) -> Result<(), AssembleError> {
    let json = json!({"id": "chatcmpl-i", "object": "chat.completion.chunk", "created": 7,
        "model": "m", "choices": choices})
    .to_string();
    a.push(&serde_json::from_str(&json).unwrap())
}

fn call_delta(index: u32, head: Option<(&str, &str)>, arguments: &str) -> Value {
    let mut call = json!({"index": index, "function": {"arguments": arguments}});
    if let Some((id, name)) = head {
        call["id"] = json!(id);
        call["type"] = json!("function");
        call["function"]["name"] = json!(name);
    }
    call
}

#[test]
fn the_assembler_merges_interleaved_tool_call_deltas_by_index() {
    let mut a = ChunkAssembler::new();
    let deltas = [
        json!([{"index": 0, "delta": {"role": "assistant", "content": null}}]),
        json!([{"index": 0, "delta": {"tool_calls": [call_delta(0, Some(("call_a", "get_weather")), "")]}}]),
        json!([{"index": 0, "delta": {"tool_calls": [call_delta(1, Some(("call_b", "get_time")), "")]}}]),
        json!([{"index": 0, "delta": {"tool_calls": [call_delta(1, None, "{\"tz\":")]}}]),
        json!([{"index": 0, "delta": {"tool_calls": [call_delta(0, None, "{\"city\":")]}}]),
        // Both calls advance in one chunk.
        json!([{"index": 0, "delta": {"tool_calls": [
            call_delta(0, None, "\"Paris\""), call_delta(1, None, "\"CET\"")]}}]),
        json!([{"index": 0, "delta": {"tool_calls": [call_delta(1, None, "}")]}}]),
        json!([{"index": 0, "delta": {"tool_calls": [call_delta(0, None, "}")]}}]),
        json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
    ];
    for choices in deltas {
        push(&mut a, choices).unwrap();
    }
    let done = a.finish();
    assert_eq!(done.object, COMPLETION_OBJECT);
    assert_eq!(
        (&*done.id, done.created, &*done.model),
        ("chatcmpl-i", 7, "m")
    );
    assert_eq!(done.text(), None, "content stayed null");
    assert_eq!(done.finish_reason(), Some(&FinishReason::ToolCalls));
    assert_eq!(
        done.tool_calls(),
        [
            ToolCall::function("call_a", "get_weather", "{\"city\":\"Paris\"}"),
            ToolCall::function("call_b", "get_time", "{\"tz\":\"CET\"}"),
        ]
    );

    let mut too_far = ChunkAssembler::new();
    assert_eq!(
        push(
            &mut too_far,
            json!([{"index": 0, "delta": {"tool_calls": [
                call_delta(MAX_INDEX + 1, Some(("c", "f")), "")]}}])
        ),
        Err(AssembleError::ToolCallIndex(MAX_INDEX + 1))
    );
    assert_eq!(
        push(&mut too_far, json!([{"index": 500, "delta": {}}])),
        Err(AssembleError::ChoiceIndex(500))
    );
}

/// A completion that streams losslessly: no annotations or audio, every finish set.
fn streamable(sample: &str) -> Completion<'_> {
    let mut c: Completion<'_> = serde_json::from_str(sample).unwrap();
    for choice in &mut c.choices {
        choice.message.annotations = None;
    }
    let mut refusing = CompletionMessage::new(None);
    refusing.refusal = Some("I can't help with that.".into());
    c.choices.push(Choice {
        index: 2,
        message: refusing,
        logprobs: Some(ChoiceLogprobs {
            content: None,
            refusal: Some(Vec::new()),
        }),
        finish_reason: Some(FinishReason::ContentFilter),
    });
    let mut text_and_calls =
        CompletionMessage::new(Some("Checking both.\n\"quoted\"".to_owned().into()));
    text_and_calls.tool_calls = Some(vec![
        ToolCall::function("call_x", "f", ""),
        ToolCall::Custom {
            id: "call_y".into(),
            custom: CustomToolCall {
                name: "sql".into(),
                input: "SELECT 1".into(),
            },
        },
    ]);
    c.choices.push(Choice {
        index: 3,
        message: text_and_calls,
        logprobs: None,
        finish_reason: Some(FinishReason::Other("eos".into())),
    });
    c
}

#[test]
fn a_completion_replayed_as_chunks_assembles_back_to_itself() {
    let sample = completion_sample();
    let original = streamable(&sample);
    for include_usage in [true, false] {
        let chunks = original.to_chunks(include_usage);
        for c in &chunks {
            assert_eq!(c.object, CHUNK_OBJECT);
            assert_eq!(c.id, original.id);
            assert_eq!(c.system_fingerprint, original.system_fingerprint);
            assert_eq!(c.usage.is_some(), include_usage);
        }
        let (last, _) = chunks.split_last().unwrap();
        assert_eq!(last.choices.is_empty(), include_usage, "usage chunk last");

        // Typed, and through framed SSE events as the cache sees them.
        let mut typed = ChunkAssembler::new();
        let mut framed = StreamAssembler::new();
        for c in &chunks {
            typed.push(c).unwrap();
            framed.push(&data_event(&serde_json::to_vec(c).unwrap()));
        }
        framed.push(DONE);
        let mut expected = original.clone();
        if !include_usage {
            expected.usage = None;
        }
        assert_eq!(typed.finish(), expected);
        assert_eq!(framed.completion().unwrap(), expected);
    }
}

#[test]
fn the_stream_assembler_only_answers_for_a_clean_stream() {
    let event = |v: Value| data_event(v.to_string().as_bytes());
    let text = event(json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}]}));

    let mut ok = StreamAssembler::new();
    ok.push(b": keep-alive\n\n");
    ok.push(&text);
    ok.push(b"data:[DONE]\n\n");
    assert_eq!(ok.completion().unwrap().text(), Some("x"));

    let mut unfinished = StreamAssembler::new();
    unfinished.push(&text);
    assert!(unfinished.finish().is_none(), "no [DONE]");

    let mut failed = StreamAssembler::new();
    failed.push(&text);
    failed.push(&event(json!({"error": {"message": "boom"}})));
    failed.push(DONE);
    assert!(failed.finish().is_none(), "error event");

    let mut garbage = StreamAssembler::new();
    garbage.push(&text);
    garbage.push(b"data: {not json\n\n");
    garbage.push(DONE);
    assert!(garbage.finish().is_none(), "not a chunk");

    let mut empty = StreamAssembler::new();
    empty.push(DONE);
    assert!(empty.finish().is_none(), "no choice");

    // A content text that merely mentions "error" is not an error event.
    let mut mention = StreamAssembler::new();
    mention.push(&event(
        json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "\"error\""}}]}),
    ));
    mention.push(DONE);
    assert_eq!(mention.completion().unwrap().text(), Some("\"error\""));
}
