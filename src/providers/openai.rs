//! The OpenAI wire format, spoken to every OpenAI-compatible base URL (OpenAI, DeepSeek,
//! Groq, Mistral, OpenRouter, vLLM, Ollama, llama.cpp, the mock).
//!
//! Requests are forwarded as the client sent them with only `model` swapped for the
//! upstream name and, on streams, `stream_options.include_usage` switched on so usage can
//! be accounted (the inference layer removes the chunk again for a caller that did not ask
//! for it).

use bytes::Bytes;
use serde::Deserialize;

use super::stream::{Decoder, UpstreamStream};
use super::{ChatReply, Provider};
use crate::admission::QueueBudget;
use crate::error::GatewayError;
use crate::wire::{ChatRequest, EmbeddingsRequest, JsonObject, Usage};

/// Sends a chat completion and returns the whole body or the started stream.
pub(super) async fn chat(
    provider: &Provider,
    req: &ChatRequest,
    model: &str,
    queue: QueueBudget,
) -> Result<ChatReply, GatewayError> {
    // Ask for usage unless the client already did; the inference layer removes the chunk
    // again for callers that did not ask for it.
    let ask_usage = req.stream && !req.include_usage && provider.config().stream_usage();
    let body = encode(&req.object, model, ask_usage)?;
    let (response, slot, started) = provider.post("/chat/completions", body, queue).await?;
    if req.stream {
        let decoder = Decoder::OpenAi { done: false };
        return Ok(ChatReply::Stream(Box::new(UpstreamStream::new(
            provider,
            response,
            slot,
            decoder,
            started.elapsed(),
        ))));
    }
    let body = provider.read_body(response, started).await?;
    drop(slot);
    let usage = check_json(provider, &body)?;
    Ok(ChatReply::Complete {
        body,
        usage,
        upstream: started.elapsed(),
    })
}

/// Sends an embeddings request with the upstream model name.
pub(super) async fn embeddings(
    provider: &Provider,
    req: &EmbeddingsRequest,
    model: &str,
    queue: QueueBudget,
) -> Result<(Bytes, Option<Usage>, std::time::Duration), GatewayError> {
    let body = encode(&req.object, model, false)?;
    embeddings_body(provider, body, queue).await
}

/// Sends a ready embeddings body (as built by the micro-batcher).
pub(super) async fn embeddings_body(
    provider: &Provider,
    body: Vec<u8>,
    queue: QueueBudget,
) -> Result<(Bytes, Option<Usage>, std::time::Duration), GatewayError> {
    let (response, slot, started) = provider.post("/embeddings", body, queue).await?;
    let body = provider.read_body(response, started).await?;
    drop(slot);
    let usage = check_json(provider, &body)?;
    Ok((body, usage, started.elapsed()))
}

/// The client's body with the upstream model name (and, if asked, a usage request).
fn encode(object: &JsonObject, model: &str, ask_usage: bool) -> Result<Vec<u8>, GatewayError> {
    let mut model_json = Vec::with_capacity(model.len() + 2);
    crate::wire::write_json_string(&mut model_json, model);
    let model_json = String::from_utf8(model_json)
        .map_err(|e| GatewayError::Internal(format!("model name encoding: {e}")))?;
    if !ask_usage {
        return Ok(object.rewrite(&[("model", Some(&model_json))]));
    }
    // Keep any other stream options the client set; only add include_usage.
    let mut options: serde_json::Map<String, serde_json::Value> =
        object.get("stream_options")?.unwrap_or_default();
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let options = serde_json::to_string(&options)
        .map_err(|e| GatewayError::Internal(format!("stream_options encoding: {e}")))?;
    Ok(object.rewrite(&[
        ("model", Some(&model_json)),
        ("stream_options", Some(&options)),
    ]))
}

/// Validates an upstream JSON body (a truncated or garbled body is a 502, not a 200 the
/// client chokes on) and reads its usage on the way.
fn check_json(provider: &Provider, body: &[u8]) -> Result<Option<Usage>, GatewayError> {
    #[derive(Deserialize)]
    struct WithUsage {
        usage: Option<Usage>,
    }
    serde_json::from_slice::<WithUsage>(body)
        .map(|v| v.usage)
        .map_err(|e| provider.protocol_error(format!("body is not valid JSON: {e}")))
}

/// Reads an OpenAI error body into (type, message, param, code).
pub fn decode_error(body: &[u8]) -> Option<(String, String, Option<String>, Option<String>)> {
    #[derive(Deserialize)]
    struct Envelope {
        error: Body,
    }
    #[derive(Deserialize)]
    struct Body {
        message: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
        param: Option<String>,
        code: Option<serde_json::Value>,
    }
    let e = serde_json::from_slice::<Envelope>(body).ok()?.error;
    let code = e.code.and_then(|c| match c {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    Some((
        e.kind.unwrap_or_else(|| "upstream_error".into()),
        e.message.unwrap_or_default(),
        e.param,
        code,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_decoded() {
        let (t, m, p, c) = decode_error(
            br#"{"error":{"message":"bad","type":"invalid_request_error","param":"x","code":400}}"#,
        )
        .unwrap();
        assert_eq!(
            (t.as_str(), m.as_str(), p.as_deref(), c.as_deref()),
            ("invalid_request_error", "bad", Some("x"), Some("400"))
        );
        assert!(decode_error(b"<html>").is_none());
    }
}
