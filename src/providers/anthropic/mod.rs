//! The Anthropic Messages API, spoken to providers of kind `anthropic`.
//!
//! Clients always talk OpenAI chat completions to Switchyard. When a route resolves to an
//! Anthropic deployment, [`super::Provider::chat`] calls [`chat`], which translates the
//! request with [`encode_request`] (`request.rs`), sends it to `POST /v1/messages`, and
//! translates the answer back: a whole body with [`decode_response`] (`response.rs`) into a
//! `chat.completion`, or every upstream SSE event through a [`StreamDecoder`] (`stream.rs`)
//! into `chat.completion.chunk` events ending with `[DONE]`. Upstream error bodies are read
//! with [`decode_error`].
//!
//! The OpenAI side is [`crate::wire::chat`]'s typed schema; the Anthropic side's types are
//! private to this module. Parsing borrows from the request and response bytes wherever it
//! can: message text, base64 image data and tool schemas are copied once, into the
//! outgoing body, and never built into a `serde_json::Value` tree.

mod request;
mod response;
mod stream;
#[cfg(test)]
mod tests;

use bytes::Bytes;

pub use request::encode_request;
pub use response::{decode_error, decode_response};
pub use stream::StreamDecoder;

use super::stream::{Decoder, UpstreamStream};
use super::{ChatReply, Provider};
use crate::admission::QueueBudget;
use crate::error::GatewayError;
use crate::wire::ChatRequest;

/// A JSON object with nothing in it: the arguments of a call without parameters.
const EMPTY_OBJECT: &str = "{}";

/// Anthropic's chat: translate, send to `/messages`, translate back.
///
/// # Errors
/// 400 for a request Anthropic cannot express; upstream failures as mapped by
/// [`Provider`]; a body that is not an Anthropic message.
pub async fn chat(
    provider: &Provider,
    req: &ChatRequest,
    model: &str,
    queue: QueueBudget,
) -> Result<ChatReply, GatewayError> {
    let body = encode_request(req, model, provider.config().default_max_tokens())?;
    let (response, slot, started) = provider.post("/messages", body, queue).await?;
    if req.stream {
        let decoder = StreamDecoder::new(model, req.include_usage, &provider.name);
        return Ok(ChatReply::Stream(Box::new(UpstreamStream::new(
            provider,
            response,
            slot,
            Decoder::Anthropic(Box::new(decoder)),
            started.elapsed(),
        ))));
    }
    let raw = provider.read_body(response, started).await?;
    drop(slot);
    let (body, usage) = decode_response(&raw, model, &provider.name)?;
    Ok(ChatReply::Complete {
        body: Bytes::from(body),
        usage,
        upstream: started.elapsed(),
    })
}
