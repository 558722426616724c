//! The listening socket: accepts connections up to a cap, serves HTTP/1.1 and HTTP/2 on
//! each with the timeouts and limits a public deployment needs, and drains on shutdown.
//!
//! Written on hyper-util's connection builder rather than `axum::serve`, which exposes
//! none of these limits: without a timer hyper never times out a header read, so a client
//! that sends one header byte a second holds its connection, and a file descriptor, for
//! ever; enough of them and the process can accept nobody.
//!
//! - **Connection cap** (`max_connections`): a connection over the cap is closed at accept,
//!   counted in `switchyard_connections_refused_total`; the others are served as usual.
//! - **Header read timeout** (`header_read_timeout`): the whole request head must arrive
//!   within it. hyper starts this clock when it begins waiting for a request head, so on
//!   HTTP/1.1 it is also how long an idle keep-alive connection is kept.
//! - **Header size** (`max_header_bytes`): a larger request head is answered 431.
//! - **Declared body size**: a `Content-Length` over `max_body_bytes` is answered 413 at
//!   once, from the header, instead of after waiting for (or reading) the body; the rest
//!   of a refused body is read and dropped for a bounded while (nginx's lingering close),
//!   so the client reads the refusal instead of a reset connection.
//!
//! - **Body read timeout** (`body_read_timeout`): a body that pauses longer than this
//!   between two reads fails with 408 (see [`body`]), and a body dropped unread, such as
//!   a chunked body refused for its size while still arriving, is drained the same way.
//!
//! The two size checks run in `Guarded`, before the router, on every route: plain code
//! on the request head, with no middleware future to box.
//! - **HTTP/2**: at most `http2_max_concurrent_streams` streams per connection, a bound on
//!   streams reset before they are accepted (the "rapid reset" flood), and keep-alive pings
//!   that close a connection whose peer stopped answering.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;
use std::future::Ready;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use axum::Router;
use axum::http::{Request, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tower::Service;

use crate::config::Settings;

mod body;

use crate::error::GatewayError;
use body::linger;
pub use body::{BodyError, ClientBody};

/// The router's future for one request.
type RouterFuture = <Router as Service<Request<ClientBody>>>::Future;

/// Streams an HTTP/2 client may reset before they are accepted, per connection, before the
/// connection is closed (hyper's own default, stated here so it is a decision).
const H2_MAX_PENDING_RESETS: usize = 20;
/// The one route that needs the client's address.
const SIGN_IN_PATH: &str = "/dashboard/login";
/// The one route whose body may exceed `server.max_body_bytes`: it streams to disk.
const UPLOAD_PATH: &str = "/v1/files";
/// How often an idle HTTP/2 connection is pinged, and how long the answer may take.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    /// What `POST /v1/files` may declare: the largest file upload (`[files]`).
    pub max_upload_bytes: u64,
    pub http2_max_concurrent_streams: u32,
}

impl Limits {
    pub fn of(settings: &Settings) -> Limits {
        let server = &settings.server;
        Limits {
            max_upload_bytes: settings.files.max_upload_bytes(),
            max_connections: server.max_connections,
            header_read_timeout: server.header_read_timeout,
            body_read_timeout: server.body_read_timeout,
            max_header_bytes: server.max_header_bytes,
            max_body_bytes: server.max_body_bytes,
            http2_max_concurrent_streams: server.http2_max_concurrent_streams,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and waits
/// for the open connections to finish their requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .keep_alive_interval(H2_KEEP_ALIVE)
        .keep_alive_timeout(H2_KEEP_ALIVE);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to be released
                    // rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("switchyard_connections_refused_total").increment(1);
            drop(tcp);
            continue;
        };
        // Streams are many small writes: never wait to coalesce them.
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(Guarded {
            router: router.clone(),
            limits,
            lingering: connections.clone(),
            peer,
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    connections.close();
    connections.wait().await;
}

/// The router behind the request-head checks that every route shares.
#[derive(Clone)]
struct Guarded {
    router: Router,
    limits: Limits,
    /// Owns the bounded reads after a refusal (see [`linger`]).
    lingering: TaskTracker,
    /// The client's address, attached (as axum's `ConnectInfo`) only to the dashboard's
    /// sign-in, which throttles by it: other requests skip the extension insert.
    peer: SocketAddr,
}

impl Guarded {
    /// Why the request is refused from its head alone, if it is.
    fn refuse<B>(&self, req: &Request<B>) -> Option<GatewayError> {
        // hyper's read buffer bounds what a head can occupy, but one read may complete a
        // head somewhat larger than the buffer's limit: this makes the limit exact.
        let uri = req.uri();
        let head = uri.path().len()
            + uri.query().map_or(0, str::len)
            + req
                .headers()
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum::<usize>();
        if head > self.limits.max_header_bytes {
            return Some(GatewayError::HeadersTooLarge {
                limit: self.limits.max_header_bytes,
            });
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        // A file upload streams to disk: it may be as large as the largest file.
        let limit = if req.uri().path() == UPLOAD_PATH {
            usize::try_from(self.limits.max_upload_bytes).unwrap_or(usize::MAX)
        } else {
            self.limits.max_body_bytes
        };
        if declared.is_some_and(|length| length > limit as u64) {
            return Some(GatewayError::PayloadTooLarge { limit });
        }
        None
    }
}

impl Service<Request<Incoming>> for Guarded {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, RouterFuture>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        if req.uri().path() == SIGN_IN_PATH {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(self.peer));
        }
        match self.refuse(&req) {
            Some(err) => {
                linger(&self.lingering, req.into_body(), self.limits.max_body_bytes);
                Either::Left(std::future::ready(Ok(err.into_response())))
            }
            None => {
                let limits = self.limits;
                let lingering = self.lingering.clone();
                Either::Right(self.router.call(req.map(|body| {
                    ClientBody::new(
                        body,
                        limits.body_read_timeout,
                        limits.max_body_bytes,
                        lingering,
                    )
                })))
            }
        }
    }
}

/// The stall behind a failed body read (answered 408), if that is what failed it.
pub fn body_stalled(rejection: &axum::extract::rejection::BytesRejection) -> Option<Duration> {
    body::stalled(rejection)
}
