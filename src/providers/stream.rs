//! The upstream stream as the client sees it: OpenAI-shaped SSE events, forwarded the
//! moment each one is complete.
//!
//! Upstream bytes are cut into events, passed through (OpenAI) or translated (Anthropic),
//! and handed to the client without waiting for more. Usage is read on the way. Any
//! failure after the first byte (a dropped connection, a stalled upstream, garbage) ends
//! the stream with an OpenAI error event, never with silence. Dropping the stream, which is
//! what happens when the client disconnects, drops the upstream response and so closes the
//! upstream connection: the provider stops generating for nobody.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::{Provider, Slot, anthropic};
use crate::error::GatewayError;
use crate::telemetry::RequestLog;
use crate::wire::Usage;
use crate::wire::sse::{SseFramer, parse_event};

/// How upstream events become client events.
pub enum Decoder {
    OpenAi {
        /// The gateway asked for usage; the client did not, so its chunk is dropped.
        strip_usage: bool,
        done: bool,
    },
    Anthropic(Box<anthropic::StreamDecoder>),
}

impl Decoder {
    fn finished(&self) -> bool {
        match self {
            Decoder::OpenAi { done, .. } => *done,
            Decoder::Anthropic(d) => d.is_finished(),
        }
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A started upstream stream, ready to become a response body.
pub struct UpstreamStream {
    body: ByteStream,
    framer: SseFramer,
    decoder: Decoder,
    out: VecDeque<Bytes>,
    usage: Option<Usage>,
    idle_timeout: Duration,
    provider: Arc<str>,
    ended: bool,
    log: Option<RequestLog>,
    /// Time from sending upstream to its response headers.
    pub upstream_headers: Duration,
    /// Guards that must live as long as the stream (admission slots, in-flight counts).
    held: Vec<Box<dyn Send + Sync>>,
    _slot: Slot,
}

impl UpstreamStream {
    pub(super) fn new(
        provider: &Provider,
        response: reqwest::Response,
        slot: Slot,
        decoder: Decoder,
        upstream_headers: Duration,
    ) -> Self {
        UpstreamStream {
            body: Box::pin(response.bytes_stream()),
            framer: SseFramer::new(),
            decoder,
            out: VecDeque::with_capacity(4),
            usage: None,
            idle_timeout: provider.config().pool().stream_idle_timeout,
            provider: provider.name.clone(),
            ended: false,
            log: None,
            upstream_headers,
            held: Vec::new(),
            _slot: slot,
        }
    }

    /// Keeps `guard` alive until the stream ends.
    pub fn hold(&mut self, guard: impl Send + Sync + 'static) {
        self.held.push(Box::new(guard));
    }

    /// Hands the request's log to the stream, so it is written when the stream ends.
    pub fn attach_log(&mut self, log: RequestLog) {
        self.log = Some(log);
    }

    /// The response body: SSE event bytes, each yielded as soon as it is complete.
    pub fn into_body(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures_util::stream::unfold(self, |mut s| async move {
            let event = s.next_event().await?;
            if let Some(log) = s.log.as_mut() {
                log.first_byte();
            }
            Some((Ok(event), s))
        })
    }

    async fn next_event(&mut self) -> Option<Bytes> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Some(event);
            }
            if self.ended {
                self.finish_log();
                return None;
            }
            match tokio::time::timeout(self.idle_timeout, self.body.next()).await {
                Err(_) => self.fail(GatewayError::UpstreamTimeout {
                    provider: self.provider.to_string(),
                    phase: "the next stream chunk",
                }),
                Ok(Some(Ok(chunk))) => {
                    if self.framer.push(&chunk).is_err() {
                        self.fail(self.protocol("an event exceeded the size limit"));
                        continue;
                    }
                    while let Some(event) = self.framer.next_event() {
                        self.handle(event);
                        if self.ended {
                            break;
                        }
                    }
                }
                Ok(Some(Err(e))) => self.fail(GatewayError::UpstreamFailed {
                    provider: self.provider.to_string(),
                    status: None,
                    message: format!(
                        "the connection was lost mid-stream: {}",
                        super::error_chain(&e)
                    ),
                }),
                Ok(None) => {
                    if let Some(tail) = self.framer.finish() {
                        self.handle(tail);
                    }
                    if !self.ended {
                        if self.decoder.finished() {
                            self.ended = true;
                        } else {
                            self.fail(self.protocol("the stream ended before it was complete"));
                        }
                    }
                }
            }
        }
    }

    fn handle(&mut self, event: Bytes) {
        match &mut self.decoder {
            Decoder::OpenAi { strip_usage, done } => {
                if super::openai::inspect_event(&event, *strip_usage, done, &mut self.usage) {
                    self.out.push_back(event);
                }
                if *done {
                    self.ended = true;
                }
            }
            Decoder::Anthropic(decoder) => {
                let Some(parsed) = parse_event(&event) else {
                    return;
                };
                let result = decoder.on_event(&parsed, &mut self.out);
                self.usage = decoder.usage();
                match result {
                    Err(e) => self.fail(e),
                    Ok(()) if decoder.is_finished() => self.ended = true,
                    Ok(()) => {}
                }
            }
        }
    }

    fn protocol(&self, message: &str) -> GatewayError {
        GatewayError::UpstreamProtocol {
            provider: self.provider.to_string(),
            message: message.into(),
        }
    }

    /// Ends the stream with an error event the OpenAI SDKs raise as an `APIError`.
    fn fail(&mut self, err: GatewayError) {
        tracing::warn!(provider = %self.provider, error = %err, "stream failed after it started");
        self.out.push_back(err.to_sse_event());
        if let Some(log) = self.log.as_mut() {
            log.fail(err.status().as_u16(), err.kind());
        }
        self.ended = true;
    }

    fn finish_log(&mut self) {
        if let Some(log) = self.log.as_mut() {
            log.usage = self.usage;
            log.succeed();
        }
        self.log = None;
    }
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        // A client that went away mid-stream still gets its usage so far recorded.
        if let Some(log) = self.log.as_mut() {
            log.usage = self.usage;
        }
    }
}
