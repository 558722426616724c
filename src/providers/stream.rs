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
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::{Provider, Slot, anthropic};
use crate::error::GatewayError;
use crate::wire::Usage;
use crate::wire::event::{EventInfo, EventKind, inspect};
use crate::wire::sse::{SseFramer, parse_event};

/// How upstream events become client events.
pub enum Decoder {
    /// Events are forwarded as they are; `[DONE]` ends the stream.
    OpenAi {
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

/// How long the upstream body is read past the stream's last event for its end of stream.
/// A body dropped before its end is reset: over HTTP/1.1 the connection is not reused, and
/// over HTTP/2 thousands of resets a second trip the client's reset-flood guard, which
/// closes the connection and every stream on it.
const END_OF_BODY_WAIT: Duration = Duration::from_millis(250);

/// A started upstream stream, ready to become a response body.
pub struct UpstreamStream {
    body: ByteStream,
    framer: SseFramer,
    decoder: Decoder,
    /// Events ready to hand out, already inspected.
    out: VecDeque<(Bytes, EventInfo)>,
    /// Decoded events not yet inspected (the Anthropic decoder writes here).
    decoded: VecDeque<Bytes>,
    usage: Option<Usage>,
    idle_timeout: Duration,
    provider: Arc<str>,
    ended: bool,
    /// The upstream body has been read to its end.
    body_done: bool,
    /// What ended the stream early, if anything did.
    failure: Option<GatewayError>,
    /// Time from sending upstream to its response headers.
    pub upstream_headers: Duration,
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
            decoded: VecDeque::new(),
            usage: None,
            idle_timeout: provider.config().pool().stream_idle_timeout,
            provider: provider.name.clone(),
            ended: false,
            body_done: false,
            failure: None,
            upstream_headers,
            _slot: slot,
        }
    }

    /// Usage read from the stream so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The failure that ended the stream with an error event, if one did.
    pub fn failure(&self) -> Option<&GatewayError> {
        self.failure.as_ref()
    }

    /// The next event, as soon as it is complete, with what kind it is; `None` at the end.
    pub async fn next_event(&mut self) -> Option<(Bytes, EventInfo)> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Some(event);
            }
            if self.ended {
                self.finish_body().await;
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
                    self.body_done = true;
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

    /// After the last event of a complete stream, reads the rest of the upstream body (in
    /// practice only its end-of-stream marker) for a short while, so the exchange ends
    /// cleanly instead of being reset.
    async fn finish_body(&mut self) {
        if self.body_done || self.failure.is_some() {
            return;
        }
        self.body_done = true;
        let _ = tokio::time::timeout(END_OF_BODY_WAIT, async {
            while let Some(Ok(_)) = self.body.next().await {}
        })
        .await;
    }

    fn handle(&mut self, event: Bytes) {
        match &mut self.decoder {
            Decoder::OpenAi { done } => {
                let info = inspect(&event);
                if info.usage.is_some() {
                    self.usage = info.usage;
                }
                if info.kind == EventKind::Done {
                    *done = true;
                    self.ended = true;
                }
                self.out.push_back((event, info));
            }
            Decoder::Anthropic(decoder) => {
                let Some(parsed) = parse_event(&event) else {
                    return;
                };
                let result = decoder.on_event(&parsed, &mut self.decoded);
                self.usage = decoder.usage();
                for event in self.decoded.drain(..) {
                    let info = inspect(&event);
                    self.out.push_back((event, info));
                }
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
        let event = err.to_sse_event();
        let info = inspect(&event);
        self.out.push_back((event, info));
        self.failure = Some(err);
        self.ended = true;
    }
}
