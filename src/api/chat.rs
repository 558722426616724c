//! `POST /v1/chat/completions`: parse once, resolve the alias, then either call the
//! upstream directly or, for cacheable requests, answer from the cache or from a shared
//! flight; streams are flushed event by event.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tracing::Instrument;

use crate::app::AppState;
use crate::cache::flight::{FlightKey, Next, Subscription};
use crate::cache::replay::{StreamAssembler, completion_to_events};
use crate::cache::{CacheKey, CachePolicy};
use crate::error::GatewayError;
use crate::providers::ChatReply;
use crate::routing::Route;
use crate::telemetry::RequestLog;
use crate::wire::ChatRequest;

/// The response header naming the cache outcome.
const CACHE_HEADER: &str = "x-switchyard-cache";

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = super::request_log(&state, "chat", &headers);
    let principal = match super::authenticate(&state, &headers, &mut log).await {
        Ok(principal) => principal,
        Err(err) => return fail(&mut log, err),
    };
    let parsed = body
        .map_err(|r| GatewayError::from_body_rejection(r, state.settings.server.max_body_bytes))
        .and_then(ChatRequest::parse)
        .and_then(|req| Ok((state.models.resolve(&req.model)?, req)));
    let (route, req) = match parsed {
        Ok(ok) => ok,
        Err(err) => return fail(&mut log, err),
    };
    log.stream = req.stream;
    log.model = Some(route.alias.clone());
    let max_tokens = || {
        let read = |field| req.object.get::<u64>(field).ok().flatten();
        read("max_completion_tokens").or_else(|| read("max_tokens"))
    };
    let body_len = req.object.body().len();
    if let Err(err) = super::charge(
        &state,
        principal.as_ref(),
        &route.alias,
        body_len,
        max_tokens,
        &mut log,
    )
    .await
    {
        return fail(&mut log, err);
    }
    if state.settings.log.bodies {
        log.body = Some(super::loggable_body(req.object.body()));
    }
    let policy = CachePolicy::for_request(route.cache, &headers);
    let span = tracing::info_span!(
        "chat.completions",
        otel.name = "POST /v1/chat/completions",
        request_id = %log.request_id,
        model = %route.alias,
        stream = req.stream,
    );
    if policy.active() {
        cached(state, route, req, policy, log)
            .instrument(span)
            .await
    } else {
        direct(&state, route, &req, log).instrument(span).await
    }
}

fn fail(log: &mut RequestLog, err: GatewayError) -> Response {
    log.fail(err.status().as_u16(), err.kind());
    err.into_response()
}

/// The uncached path: admission, dispatch, answer.
async fn direct(
    state: &AppState,
    route: Arc<Route>,
    req: &ChatRequest,
    mut log: RequestLog,
) -> Response {
    let result = async {
        let admitted = super::admit(state).await?;
        let dispatched = state
            .models
            .dispatch(route, super::deadline(state), |d| async move {
                d.provider.chat(req, &d.model).await
            })
            .await?;
        Ok::<_, GatewayError>((dispatched, admitted))
    }
    .await;
    let (dispatched, admitted) = match result {
        Ok(ok) => ok,
        Err(err) => return fail(&mut log, err),
    };
    log.provider = Some(dispatched.deployment.provider.name.clone());
    log.deployment = Some(dispatched.deployment.id.as_str().into());
    match dispatched.value {
        ChatReply::Complete {
            body,
            usage,
            upstream,
        } => {
            log.usage = usage;
            log.upstream_time(upstream);
            log.first_byte();
            log.succeed();
            json_response(body)
        }
        ChatReply::Stream(mut stream) => {
            log.upstream_time(stream.upstream_headers);
            stream.attach_log(log);
            // The slots are held until the stream ends, not just until its headers.
            stream.hold(admitted);
            stream.hold(dispatched.in_flight);
            sse_response(Body::from_stream(stream.into_body()))
        }
    }
}

/// The cacheable path: a hit is answered at once; a miss joins (or leads) a flight.
async fn cached(
    state: Arc<AppState>,
    route: Arc<Route>,
    req: ChatRequest,
    policy: CachePolicy,
    mut log: RequestLog,
) -> Response {
    let key = CacheKey::of("chat", &route.alias, &req.object);
    if policy.lookup
        && let Some(body) = state.cache.get(&key).await
    {
        log.cache_hit = true;
        log.first_byte();
        log.succeed();
        let response = if req.stream {
            match completion_to_events(&body, req.include_usage) {
                Ok(events) => sse_response(Body::from_stream(futures_util::stream::iter(
                    events.into_iter().map(Ok::<_, Infallible>),
                ))),
                Err(e) => {
                    tracing::warn!(error = %e, "cache: stored answer cannot be replayed");
                    return direct(&state, route, &req, log).await;
                }
            }
        } else {
            json_response(body)
        };
        return with_cache_header(response, "hit");
    }
    let flight_key = FlightKey {
        key,
        stream: req.stream,
    };
    let subscription = state
        .flights
        .join(flight_key, state.cache.coalescing(), &state.cache.stats);
    if subscription.leader {
        let flight = subscription.flight.clone();
        let work = fly(
            state.clone(),
            route,
            req.clone(),
            flight_key,
            policy.store,
            flight.clone(),
        );
        state.tasks.spawn(async move {
            tokio::select! {
                _ = work => {}
                _ = flight.cancel.cancelled() => {}
            }
        });
    }
    let response = if req.stream {
        match subscription.flight.wait_start().await {
            Err(err) => return fail(&mut log, err),
            Ok(()) => sse_response(Body::from_stream(follow(
                subscription,
                req.include_usage,
                log,
            ))),
        }
    } else {
        match subscription.flight.wait_body().await {
            Err(err) => return fail(&mut log, err),
            Ok(body) => {
                log.provider = subscription.flight.provider();
                log.deployment = subscription.flight.deployment();
                log.usage = subscription.flight.usage();
                log.first_byte();
                log.succeed();
                json_response(body)
            }
        }
    };
    with_cache_header(response, "miss")
}

/// A flight's upstream work: admission, dispatch, publish, and store when complete.
async fn fly(
    state: Arc<AppState>,
    route: Arc<Route>,
    mut req: ChatRequest,
    key: FlightKey,
    store: bool,
    flight: Arc<crate::cache::flight::Flight>,
) {
    // Subscribers differ in whether they want the usage chunk: keep it, they filter.
    req.force_usage = true;
    let work = async {
        let _admitted = super::admit(&state).await?;
        let req = &req;
        let dispatched = state
            .models
            .dispatch(route, super::deadline(&state), |d| async move {
                d.provider.chat(req, &d.model).await
            })
            .await?;
        flight.set_provider(
            dispatched.deployment.provider.name.clone(),
            Some(dispatched.deployment.id.as_str().into()),
        );
        match dispatched.value {
            ChatReply::Complete { body, usage, .. } => {
                if store {
                    state.cache.put(key.key, body.clone()).await;
                }
                flight.complete(body, usage);
            }
            ChatReply::Stream(stream) => {
                let mut assembler = StreamAssembler::new();
                let mut events = std::pin::pin!(stream.into_body());
                let mut usage = None;
                while let Some(Ok(event)) = events.next().await {
                    if store {
                        assembler.push(&event);
                    }
                    if usage.is_none() && memchr::memmem::find(&event, b"\"usage\":{").is_some() {
                        usage = crate::wire::read_usage(
                            event.strip_prefix(b"data: ").unwrap_or(&event),
                        );
                    }
                    flight.publish(event);
                }
                if store && let Some(body) = assembler.finish() {
                    state.cache.put(key.key, Bytes::from(body)).await;
                }
                flight.end_stream(usage);
            }
        }
        Ok::<_, GatewayError>(())
    };
    if let Err(err) = work.await {
        flight.fail(err);
    }
    state.flights.retire(&key, &flight);
}

/// A subscriber's stream: the flight's events from the first, then live, with the usage
/// chunk removed unless this client asked for it.
fn follow(
    subscription: Subscription,
    include_usage: bool,
    log: RequestLog,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let watch = subscription.flight.watch();
    futures_util::stream::unfold(
        (subscription, watch, 0usize, log),
        move |(subscription, mut watch, mut index, mut log)| async move {
            loop {
                match subscription.flight.event_at(index) {
                    Next::Event(event) => {
                        index += 1;
                        let mut done = false;
                        let mut usage = None;
                        if !crate::providers::openai::inspect_event(
                            &event,
                            !include_usage,
                            &mut done,
                            &mut usage,
                        ) {
                            continue;
                        }
                        if event.starts_with(b"data: {\"error\"") {
                            log.fail(502, "upstream_failed_mid_stream");
                        }
                        log.first_byte();
                        return Some((Ok(event), (subscription, watch, index, log)));
                    }
                    Next::End => {
                        log.provider = subscription.flight.provider();
                        log.deployment = subscription.flight.deployment();
                        log.usage = subscription.flight.usage();
                        log.succeed();
                        return None;
                    }
                    Next::Wait => {
                        if watch.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            }
        },
    )
}

fn with_cache_header(mut response: Response, value: &'static str) -> Response {
    response
        .headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static(value));
    response
}

/// A JSON body as the upstream sent it.
pub fn json_response(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// An SSE response that no proxy or client buffers.
pub fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and compatible proxies buffer responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
