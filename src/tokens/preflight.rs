//! The chat completions pre-flight: for an alias with `preflight = "reject"` or
//! `"truncate"` and a known context window, the prompt is counted before any upstream
//! call and refused, or cut, when it does not leave room for the answer.
//!
//! The room is the request's own `max_completion_tokens` (or `max_tokens`), else the
//! alias's `max_output_tokens`. The prompt is the messages counted as OpenAI documents
//! ([`super::count_messages`]) plus the `tools` / `functions` definitions' JSON text.
//!
//! Truncation keeps every system and developer message, drops the oldest of the others
//! (an assistant message with tool calls leaves with the tool messages answering it; see
//! [`super::fit_newest`]) and rewrites only the body's `messages` field, each kept message
//! copied byte for byte. Messages this gateway's chat schema cannot read are counted from
//! their raw JSON text instead (a little high), and are refused rather than cut when over.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{Preflight, REPLY_PRIMING, TokenBudget, count, count_message, count_tools, fit_newest};
use crate::error::GatewayError;
use crate::wire::chat::{Message, Role};
use crate::wire::{ChatRequest, JsonObject};

/// Bodies up to this size are counted on the request's own task (well under a
/// millisecond); larger ones on the blocking pool, so one huge prompt does not hold up
/// the other requests sharing a runtime worker.
pub const COUNT_INLINE_BYTES: usize = 64 * 1024;

/// A request that was cut to fit.
#[derive(Debug)]
pub struct Truncated {
    /// The request as it goes upstream: the same body with fewer `messages`.
    pub request: ChatRequest,
    /// How many messages were dropped.
    pub dropped: usize,
}

/// Runs [`check`], off the runtime's workers for a large body. Returns the request to
/// send and, when it was cut, how many messages were dropped.
///
/// # Errors
/// 400 `context_length_exceeded` (see [`check`]); 500 if the counting task panicked.
pub async fn run(
    budget: TokenBudget,
    req: ChatRequest,
) -> Result<(ChatRequest, Option<usize>), GatewayError> {
    if req.object.body().len() <= COUNT_INLINE_BYTES {
        return apply(&budget, req);
    }
    tokio::task::spawn_blocking(move || apply(&budget, req))
        .await
        .map_err(|e| GatewayError::Internal(format!("counting the prompt's tokens failed: {e}")))?
}

fn apply(
    budget: &TokenBudget,
    req: ChatRequest,
) -> Result<(ChatRequest, Option<usize>), GatewayError> {
    Ok(match check(budget, &req)? {
        None => (req, None),
        Some(cut) => (cut.request, Some(cut.dropped)),
    })
}

/// Counts `req`'s prompt against `budget`: `Ok(None)` when it fits (or the alias has no
/// pre-flight or no window), `Ok(Some(..))` when `preflight = "truncate"` cut it to fit.
///
/// # Errors
/// 400 `context_length_exceeded` in OpenAI's shape and words when it does not fit and
/// `preflight = "reject"`, or when even the newest message (with the system messages and
/// tools) leaves no room.
pub fn check(budget: &TokenBudget, req: &ChatRequest) -> Result<Option<Truncated>, GatewayError> {
    let Some(window) = budget.context_window else {
        return Ok(None);
    };
    if budget.preflight == Preflight::Off {
        return Ok(None);
    }
    let kind = budget.tokenizer;
    let completion = requested_output(&req.object).unwrap_or(budget.max_output_tokens);
    let limit = window.saturating_sub(completion);
    let tools: u64 = ["tools", "functions"]
        .iter()
        .filter_map(|field| req.object.raw(field))
        .filter(|raw| *raw != "null")
        .map(|raw| count_tools(kind, raw))
        .sum();
    let Some(raw) = req.object.raw("messages") else {
        return Ok(None);
    };
    let too_long =
        |in_messages: u64| context_length_exceeded(window, in_messages, tools, completion);

    let parsed = serde_json::from_str::<Vec<&RawValue>>(raw).and_then(|items| {
        let messages = items
            .iter()
            .map(|item| serde_json::from_str::<Message<'_>>(item.get()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((items, messages))
    });
    let Ok((items, messages)) = parsed else {
        let in_messages = count(kind, raw);
        if in_messages.saturating_add(tools) <= limit {
            return Ok(None);
        }
        return Err(too_long(in_messages));
    };
    let counts: Vec<u64> = messages.iter().map(|m| count_message(kind, m)).collect();
    let in_messages = counts.iter().sum::<u64>() + REPLY_PRIMING;
    if in_messages.saturating_add(tools) <= limit {
        return Ok(None);
    }
    if budget.preflight != Preflight::Truncate {
        return Err(too_long(in_messages));
    }

    let pinned = |i: usize| matches!(messages[i].role, Role::System | Role::Developer);
    let history: Vec<usize> = (0..messages.len()).filter(|&i| !pinned(i)).collect();
    let pinned_tokens: u64 = (0..messages.len())
        .filter(|&i| pinned(i))
        .map(|i| counts[i])
        .sum();
    let history_counts: Vec<u64> = history.iter().map(|&i| counts[i]).collect();
    let answers_previous =
        |j: usize| matches!(messages[history[j]].role, Role::Tool | Role::Function);
    let room = limit
        .checked_sub(tools.saturating_add(REPLY_PRIMING + pinned_tokens))
        .ok_or_else(|| too_long(in_messages))?;
    let first =
        fit_newest(&history_counts, room, answers_previous).map_err(|_| too_long(in_messages))?;
    let Some(&first_kept) = history.get(first) else {
        return Err(too_long(in_messages));
    };
    if first == 0 {
        return Ok(None);
    }

    let mut kept = String::with_capacity(raw.len());
    kept.push('[');
    for (i, item) in items.iter().enumerate() {
        if pinned(i) || i >= first_kept {
            if kept.len() > 1 {
                kept.push(',');
            }
            kept.push_str(item.get());
        }
    }
    kept.push(']');
    let body = req.object.rewrite(&[("messages", Some(&kept))]);
    Ok(Some(Truncated {
        request: ChatRequest {
            object: JsonObject::parse(Bytes::from(body))?,
            model: req.model.clone(),
            stream: req.stream,
            include_usage: req.include_usage,
        },
        dropped: first,
    }))
}

/// The answer length the request asks for: `max_completion_tokens`, else the older
/// `max_tokens`. A value of the wrong type is the upstream's to refuse.
fn requested_output(object: &JsonObject) -> Option<u64> {
    ["max_completion_tokens", "max_tokens"]
        .into_iter()
        .find_map(|field| object.get::<u64>(field).ok().flatten())
}

/// OpenAI's own 400 for a prompt over the window, in its words: `window` tokens in all,
/// of which the prompt needs `messages` + `tools` and the answer `completion`.
pub fn context_length_exceeded(
    window: u64,
    messages: u64,
    tools: u64,
    completion: u64,
) -> GatewayError {
    let total = messages.saturating_add(tools).saturating_add(completion);
    let message = if tools > 0 {
        format!(
            "This model's maximum context length is {window} tokens. However, you requested \
             {total} tokens ({messages} in the messages, {tools} in the functions, {completion} \
             in the completion). Please reduce the length of the messages, functions, or \
             completion."
        )
    } else {
        format!(
            "This model's maximum context length is {window} tokens. However, you requested \
             {total} tokens ({messages} in the messages, {completion} in the completion). \
             Please reduce the length of the messages or completion."
        )
    };
    GatewayError::InvalidRequest {
        message,
        param: Some("messages"),
        code: Some("context_length_exceeded"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::tokens::TokenizerKind;

    fn budget(window: u64, room: u64, preflight: Preflight) -> TokenBudget {
        TokenBudget {
            context_window: Some(window),
            max_output_tokens: room,
            tokenizer: TokenizerKind::O200kBase,
            preflight,
        }
    }

    fn request(body: Value) -> ChatRequest {
        ChatRequest::parse(Bytes::from(body.to_string())).unwrap()
    }

    fn prompt_tokens(body: &Value) -> u64 {
        let text = body["messages"].to_string();
        let messages: Vec<Message<'_>> = serde_json::from_str(&text).unwrap();
        crate::tokens::count_messages(TokenizerKind::O200kBase, &messages)
    }

    /// A conversation of 1 system message and `turns` user/assistant pairs of about 40
    /// tokens each, plus a tool call group in the middle.
    fn conversation(turns: usize) -> Value {
        let mut messages = vec![json!({"role": "system", "content": "You are terse."})];
        for turn in 0..turns {
            messages.push(json!({"role": "user", "content": format!(
                "Turn {turn}: tell me something about the number {turn}, in some detail please, \
                 with a few words more to make this long enough."
            )}));
            if turn == turns / 2 {
                messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": format!("call_{turn}"), "type": "function",
                     "function": {"name": "lookup", "arguments": "{\"n\":1}"}}]}));
                messages.push(
                    json!({"role": "tool", "tool_call_id": format!("call_{turn}"),
                    "content": "the number is odd", "cache_control": {"type": "ephemeral"}}),
                );
            }
            messages.push(json!({"role": "assistant", "content": format!(
                "Here is something about {turn}: it is a number that comes after {}.", turn + 1
            )}));
        }
        messages.push(json!({"role": "user", "content": "And finally?"}));
        json!({"model": "m", "temperature": 0.5, "messages": messages})
    }

    #[test]
    fn off_or_no_window_never_counts() {
        let req = request(conversation(50));
        assert!(
            check(&budget(10, 1, Preflight::Off), &req)
                .unwrap()
                .is_none()
        );
        let unknown = TokenBudget {
            context_window: None,
            ..budget(10, 1, Preflight::Reject)
        };
        assert!(check(&unknown, &req).unwrap().is_none());
    }

    #[test]
    fn a_prompt_that_fits_is_untouched() {
        let body = conversation(3);
        let tokens = prompt_tokens(&body);
        let req = request(body);
        assert!(
            check(&budget(tokens + 100, 100, Preflight::Reject), &req)
                .unwrap()
                .is_none()
        );
        assert!(
            check(&budget(tokens + 100, 100, Preflight::Truncate), &req)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn reject_answers_openais_400() {
        let body = conversation(3);
        let tokens = prompt_tokens(&body);
        let err = check(
            &budget(tokens + 99, 100, Preflight::Reject),
            &request(body.clone()),
        )
        .unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
        let json: Value = serde_json::from_slice(&err.to_json()).unwrap();
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["code"], "context_length_exceeded");
        assert_eq!(json["error"]["param"], "messages");
        let message = json["error"]["message"].as_str().unwrap();
        assert_eq!(
            message,
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} \
                 tokens ({tokens} in the messages, 100 in the completion). Please reduce the \
                 length of the messages or completion.",
                tokens + 99,
                tokens + 100
            )
        );
        // The request's own max_tokens is the room when it sets one.
        let mut asks_less = body;
        asks_less["max_tokens"] = json!(98);
        assert!(
            check(
                &budget(tokens + 99, 100, Preflight::Reject),
                &request(asks_less.clone())
            )
            .unwrap()
            .is_none()
        );
        asks_less["max_completion_tokens"] = json!(5000);
        let err = check(
            &budget(tokens + 99, 100, Preflight::Reject),
            &request(asks_less),
        )
        .unwrap_err();
        assert!(err.to_string().contains("5000 in the completion"), "{err}");
    }

    #[test]
    fn tools_count_against_the_window() {
        let mut body = conversation(1);
        let tokens = prompt_tokens(&body);
        body["tools"] = json!([{"type": "function", "function": {"name": "lookup",
            "description": "Looks a number up in a very large table of facts about numbers.",
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}]);
        let tools = count_tools(TokenizerKind::O200kBase, &body["tools"].to_string());
        let fits = budget(tokens + tools + 10, 10, Preflight::Reject);
        assert!(check(&fits, &request(body.clone())).unwrap().is_none());
        let tight = budget(tokens + tools + 9, 10, Preflight::Reject);
        let err = check(&tight, &request(body)).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("{tools} in the functions")),
            "{err}"
        );
    }

    #[test]
    fn truncate_drops_the_oldest_and_keeps_system_and_tool_groups() {
        let body = conversation(10);
        let all: Vec<Value> = body["messages"].as_array().unwrap().clone();
        let tokens = prompt_tokens(&body);
        let limit = tokens / 2;
        let cut = check(
            &budget(limit + 50, 50, Preflight::Truncate),
            &request(body.clone()),
        )
        .unwrap()
        .expect("cut");
        let sent: Value = serde_json::from_slice(cut.request.object.body()).unwrap();
        let kept = sent["messages"].as_array().unwrap();
        assert_eq!(kept.len() + cut.dropped, all.len());
        assert!(cut.dropped > 0);
        // The system message stays first; the rest is the newest suffix, verbatim.
        assert_eq!(kept[0], all[0]);
        assert_eq!(&kept[1..], &all[cut.dropped + 1..]);
        // It fits, and one more message would not have.
        assert!(prompt_tokens(&sent) <= limit);
        // Every other field is as sent.
        assert_eq!(sent["temperature"], 0.5);
        assert_eq!(sent["model"], "m");
        // A tool message never starts the kept history.
        assert_ne!(kept[1]["role"], "tool");

        // Find the limits that would cut right between the tool call and its output:
        // the output never stays alone.
        for limit in (tokens / 3..tokens).step_by(3) {
            let Some(cut) = check(
                &budget(limit + 50, 50, Preflight::Truncate),
                &request(body.clone()),
            )
            .unwrap() else {
                continue;
            };
            let sent: Value = serde_json::from_slice(cut.request.object.body()).unwrap();
            assert_ne!(sent["messages"][1]["role"], "tool", "limit {limit}");
            assert!(prompt_tokens(&sent) <= limit, "limit {limit}");
        }
    }

    #[test]
    fn truncate_refuses_when_even_the_newest_message_does_not_fit() {
        let body = conversation(2);
        let system_and_last = {
            let messages = body["messages"].as_array().unwrap();
            json!({"messages": [messages[0], messages[messages.len() - 1]]})
        };
        let least = prompt_tokens(&system_and_last);
        let req = request(body);
        assert!(
            check(&budget(least + 10, 10, Preflight::Truncate), &req)
                .unwrap()
                .is_some()
        );
        let err = check(&budget(least + 9, 10, Preflight::Truncate), &req).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("This model's maximum context length is"),
            "{err}"
        );
    }

    #[test]
    fn unreadable_messages_are_counted_raw_and_never_cut() {
        // An image part needs its `image_url` object in this gateway's schema.
        let body = json!({"model": "m", "messages": [
            {"role": "user", "content": "hello there"},
            {"role": "user", "content": [{"type": "image_url"}]},
            {"role": "user", "content": "and again"}
        ]});
        let raw = body["messages"].to_string();
        let tokens = count(TokenizerKind::O200kBase, &raw);
        let req = request(body);
        assert!(
            check(&budget(tokens + 10, 10, Preflight::Truncate), &req)
                .unwrap()
                .is_none()
        );
        assert!(check(&budget(tokens + 9, 10, Preflight::Truncate), &req).is_err());
    }

    #[tokio::test]
    async fn a_large_body_is_counted_off_the_runtime() {
        let text = "lorem ipsum dolor sit amet ".repeat(10_000);
        let body = json!({"model": "m", "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "short"}
        ]});
        let req = request(body);
        assert!(req.object.body().len() > COUNT_INLINE_BYTES);
        let (sent, dropped) = run(budget(1_000, 100, Preflight::Truncate), req)
            .await
            .unwrap();
        assert_eq!(dropped, Some(1));
        let sent: Value = serde_json::from_slice(sent.object.body()).unwrap();
        assert_eq!(
            sent["messages"],
            json!([{"role": "assistant", "content": "ok"}, {"role": "user", "content": "short"}])
        );
    }
}
