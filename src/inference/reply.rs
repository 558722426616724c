//! What a model call returns: a whole completion, or a stream of events that carry the
//! raw bytes to forward and are parsed only by a caller that needs them typed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use super::meter::Meter;
use crate::admission::Admitted;
use crate::cache::flight::{Next, Subscription};
use crate::providers::UpstreamStream;
use crate::routing::InFlight;
use crate::wire::Usage;
use crate::wire::event::{EventInfo, EventKind, inspect};

/// Who answered a call.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// The alias the call was made for.
    pub alias: Arc<str>,
    pub provider: Option<Arc<str>>,
    /// `provider/model`.
    pub deployment: Option<Arc<str>>,
    /// Answered from the response cache.
    pub cache_hit: bool,
    /// The call went through the cache path (hit, or a miss that may be stored).
    pub cache_used: bool,
    /// Time the upstream took (headers for streams, whole body otherwise); `None` when no
    /// upstream call was made for this caller.
    pub upstream: Option<Duration>,
}

/// A chat call's answer.
pub enum ChatReply {
    Complete(Completion),
    Stream(Box<ChatStream>),
}

/// A whole `chat.completion` (or embeddings) body, as the upstream sent it.
#[derive(Debug, Clone)]
pub struct Completion {
    pub body: Bytes,
    pub usage: Option<Usage>,
    pub served: Served,
}

impl Completion {
    /// The answer as a typed `chat.completion` (for a chat call), borrowing from the body.
    ///
    /// # Errors
    /// When the body is not a chat completion.
    pub fn chat(&self) -> Result<crate::wire::chat::Completion<'_>, serde_json::Error> {
        self.parse()
    }

    /// The body as typed JSON, for callers that read the answer rather than forward it.
    ///
    /// # Errors
    /// When the body is not the shape asked for.
    pub fn parse<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// One event of a chat stream: its raw bytes (`data: …\n\n`, as forwarded to an HTTP
/// client) and what kind of event it is.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub raw: Bytes,
    pub kind: EventKind,
}

impl StreamEvent {
    /// The event's JSON payload (empty for `[DONE]`).
    pub fn data(&self) -> &[u8] {
        match self.kind {
            EventKind::Done => b"",
            _ => crate::wire::event::event_data(&self.raw),
        }
    }

    /// The payload as a typed `chat.completion.chunk` (`Chunk` and `UsageOnly` events).
    ///
    /// # Errors
    /// When the payload is not a chunk (`[DONE]`, an error event).
    pub fn chunk(&self) -> Result<crate::wire::chat::Chunk<'_>, serde_json::Error> {
        self.parse()
    }

    /// The payload as typed JSON (a `chat.completion.chunk`, or an error object).
    ///
    /// # Errors
    /// When the payload is not the shape asked for.
    pub fn parse<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.data())
    }
}

/// Where a stream's events come from.
pub(super) enum Source {
    /// An upstream call made for this caller alone.
    Upstream(Box<UpstreamStream>),
    /// A shared flight, replayed from its first event and then followed live.
    Flight {
        subscription: Subscription,
        watch: watch::Receiver<u64>,
        index: usize,
    },
    /// A stored answer replayed as events.
    Replay(std::vec::IntoIter<Bytes>),
}

/// A started chat stream. Reading it to the end settles its meter; dropping it early (a
/// client that went away) settles the meter as abandoned and drops the upstream call.
pub struct ChatStream {
    source: Source,
    /// The caller asked for the usage chunk (`stream_options.include_usage`); other
    /// callers do not see it, though it is always read.
    include_usage: bool,
    meter: Meter,
    served: Served,
    usage: Option<Usage>,
    /// Status and kind of the failure that ended the stream with an error event.
    failed: Option<(u16, &'static str)>,
    ended: bool,
    /// Slots held until the stream ends, not just until its headers.
    _admitted: Option<Admitted>,
    _in_flight: Option<InFlight>,
}

impl ChatStream {
    pub(super) fn new(
        source: Source,
        include_usage: bool,
        meter: Meter,
        served: Served,
        admitted: Option<Admitted>,
        in_flight: Option<InFlight>,
    ) -> ChatStream {
        ChatStream {
            source,
            include_usage,
            meter,
            served,
            usage: None,
            failed: None,
            ended: false,
            _admitted: admitted,
            _in_flight: in_flight,
        }
    }

    pub fn served(&self) -> &Served {
        &self.served
    }

    /// Usage read so far (complete once the stream has ended).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Status and kind of the failure that ended the stream with an error event.
    pub fn failure(&self) -> Option<(u16, &'static str)> {
        self.failed
    }

    /// The next event for this caller; `None` once the stream has ended (and its meter is
    /// settled).
    pub async fn next(&mut self) -> Option<StreamEvent> {
        loop {
            if self.ended {
                return None;
            }
            let Some((raw, info)) = self.pull().await else {
                self.end();
                return None;
            };
            if info.usage.is_some() {
                self.usage = info.usage;
                self.meter.observe(info.usage);
            }
            match info.kind {
                EventKind::UsageOnly if !self.include_usage => continue,
                EventKind::Error if self.failed.is_none() => {
                    self.failed = Some((502, "upstream_failed_mid_stream"));
                }
                _ => {}
            }
            self.meter.delivered();
            return Some(StreamEvent {
                raw,
                kind: info.kind,
            });
        }
    }

    /// The stream as an HTTP body: each event's bytes, as soon as it is produced.
    pub fn into_body(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures_util::stream::unfold(self, |mut s| async move {
            let event = s.next().await?;
            Some((Ok(event.raw), s))
        })
    }

    fn end(&mut self) {
        self.ended = true;
        if let Source::Flight { subscription, .. } = &self.source {
            // A flight's usage is read by its leader, once for every subscriber.
            if self.usage.is_none() {
                self.usage = subscription.flight.usage();
            }
            self.served.provider = subscription.flight.provider();
            self.served.deployment = subscription.flight.deployment();
            self.meter.deployment = self.served.deployment.clone();
        }
        if let Source::Upstream(upstream) = &self.source {
            if self.usage.is_none() {
                self.usage = upstream.usage();
            }
            if let Some(err) = upstream.failure() {
                self.failed = Some((err.status().as_u16(), err.kind()));
            }
        }
        let status = self.failed.map_or(200, |(status, _)| status);
        self.meter.finish(self.usage, status);
    }

    async fn pull(&mut self) -> Option<(Bytes, EventInfo)> {
        let raw = match &mut self.source {
            // The provider stream has inspected its events already.
            Source::Upstream(upstream) => return upstream.next_event().await,
            Source::Replay(events) => events.next(),
            Source::Flight {
                subscription,
                watch,
                index,
            } => loop {
                match subscription.flight.event_at(*index) {
                    Next::Event(event) => {
                        *index += 1;
                        break Some(event);
                    }
                    Next::End => break None,
                    Next::Wait => {
                        if watch.changed().await.is_err() {
                            break None;
                        }
                    }
                }
            },
        }?;
        let info = inspect(&raw);
        Some((raw, info))
    }
}
