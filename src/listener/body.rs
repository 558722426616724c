//! The request body as the router sees it: hyper's body with a read timeout between
//! frames, and a lingering close when it is dropped unread.
//!
//! A client that declares a body and then stops sending it would otherwise hold its
//! connection until the request timeout (minutes); here the read fails after
//! `body_read_timeout` of silence and the client is answered 408. A body dropped before
//! its end (refused as too large while still arriving, or never read by its handler) is
//! drained for a bounded while, so the client still writing reads the answer instead of
//! a reset connection.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;
use tokio_util::task::TaskTracker;

/// How long a refused or unread body is drained before the connection is closed.
const LINGER: Duration = Duration::from_secs(10);

/// The least a refused body is drained by, whatever the body limit.
const LINGER_MIN_BYTES: usize = 128 * 1024 * 1024;

/// The body read failed because nothing arrived for this long.
#[derive(Debug, Clone, Copy)]
pub struct BodyStalled(pub Duration);

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no body bytes arrived for {} ms", self.0.as_millis())
    }
}

impl std::error::Error for BodyStalled {}

/// Why reading a request body failed.
#[derive(Debug)]
pub enum BodyError {
    /// The connection failed or the client sent a malformed body.
    Read(hyper::Error),
    /// The client went silent.
    Stalled(BodyStalled),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Read(e) => e.fmt(f),
            BodyError::Stalled(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Read(e) => Some(e),
            BodyError::Stalled(e) => Some(e),
        }
    }
}

/// A request body with a read timeout and a lingering close.
pub struct ClientBody {
    /// `None` once the body ended (nothing to drain) or was handed to the drain.
    inner: Option<Incoming>,
    timeout: Duration,
    /// Allocated the first time a read waits, so a body that arrives with its head (most
    /// model requests) never allocates a timer; re-armed, not re-allocated, after that.
    stall: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the timer was last armed: the next wait starts a new clock.
    progressed: bool,
    max_bytes: usize,
    lingering: TaskTracker,
}

impl ClientBody {
    pub fn new(
        inner: Incoming,
        timeout: Duration,
        max_bytes: usize,
        lingering: TaskTracker,
    ) -> ClientBody {
        let inner = (!inner.is_end_stream()).then_some(inner);
        ClientBody {
            inner,
            timeout,
            stall: None,
            progressed: false,
            max_bytes,
            lingering,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.progressed = true;
                if frame.is_none() {
                    this.inner = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Read)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let stall = match this.stall.as_mut() {
                    Some(stall) => {
                        if std::mem::take(&mut this.progressed) {
                            stall.as_mut().reset(tokio::time::Instant::now() + timeout);
                        }
                        stall
                    }
                    None => {
                        this.progressed = false;
                        this.stall.insert(Box::pin(tokio::time::sleep(timeout)))
                    }
                };
                ready!(stall.as_mut().poll(cx));
                this.progressed = true;
                Poll::Ready(Some(Err(BodyError::Stalled(BodyStalled(timeout)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(body) = self.inner.take() {
            linger(&self.lingering, body, self.max_bytes);
        }
    }
}

/// Reads and drops what the client keeps sending after its request was refused (or its
/// body left unread), for a bounded time and amount, as nginx's lingering close does: a
/// client still writing a large body then reads the answer instead of a broken pipe (and
/// an SDK does not retry the same upload because of it).
pub fn linger(tasks: &TaskTracker, mut body: Incoming, max_body_bytes: usize) {
    if body.is_end_stream() {
        return;
    }
    // A body dropped while the runtime shuts down has no one left to answer.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    // Enough for the upload an SDK sends whole before it reads (so it sees the answer),
    // not enough to serve as a sink for an endless one.
    let cap = max_body_bytes.saturating_mul(4).max(LINGER_MIN_BYTES);
    tasks.spawn_on(
        async move {
            let drain = async {
                let mut read = 0usize;
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > cap {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        },
        &runtime,
    );
}

/// The stall behind a failed body read, if that is what failed it.
pub fn stalled(error: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(BodyStalled(after)) = e.downcast_ref::<BodyStalled>() {
            return Some(*after);
        }
        cause = e.source();
    }
    None
}
