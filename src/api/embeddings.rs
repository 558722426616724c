//! `POST /v1/embeddings`: a pass-through with the alias swapped for the upstream model,
//! cached and coalesced like chat when the alias asks for it, and micro-batched per
//! deployment when `[embeddings] batch_window` is set.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tracing::Instrument;

use crate::app::AppState;
use crate::cache::flight::FlightKey;
use crate::cache::{CacheKey, CachePolicy};
use crate::error::GatewayError;
use crate::routing::Route;
use crate::wire::{EmbeddingsRequest, Usage};

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = super::request_log(&state, "embeddings", &headers);
    let principal = match super::authenticate(&state, &headers, &mut log).await {
        Ok(principal) => principal,
        Err(err) => {
            log.fail(err.status().as_u16(), err.kind());
            return err.into_response();
        }
    };
    let parsed = body
        .map_err(|r| GatewayError::from_body_rejection(r, state.settings.server.max_body_bytes))
        .and_then(EmbeddingsRequest::parse)
        .and_then(|req| Ok((state.models.resolve(&req.model)?, req)));
    let (route, req) = match parsed {
        Ok(ok) => ok,
        Err(err) => {
            log.fail(err.status().as_u16(), err.kind());
            return err.into_response();
        }
    };
    log.model = Some(route.alias.clone());
    let body_len = req.object.body().len();
    if let Err(err) = super::charge(
        &state,
        principal.as_ref(),
        &route.alias,
        body_len,
        || Some(0),
        &mut log,
    )
    .await
    {
        log.fail(err.status().as_u16(), err.kind());
        return err.into_response();
    }
    if state.settings.log.bodies {
        log.body = Some(super::loggable_body(req.object.body()));
    }
    let policy = CachePolicy::for_request(route.cache, &headers);
    let span = tracing::info_span!(
        "embeddings",
        otel.name = "POST /v1/embeddings",
        request_id = %log.request_id,
        model = %route.alias,
    );
    let (result, cache_header) = if policy.active() {
        (
            cached(&state, route, req, policy).instrument(span).await,
            Some(()),
        )
    } else {
        (upstream(&state, route, &req).instrument(span).await, None)
    };
    match result {
        Err(err) => {
            log.fail(err.status().as_u16(), err.kind());
            err.into_response()
        }
        Ok(answer) => {
            log.usage = answer.usage;
            log.provider = answer.provider;
            log.deployment = answer.deployment;
            log.cache_hit = answer.hit;
            log.first_byte();
            log.succeed();
            let mut response = super::chat::json_response(answer.body);
            if cache_header.is_some() {
                let value = if answer.hit { "hit" } else { "miss" };
                response
                    .headers_mut()
                    .insert("x-switchyard-cache", HeaderValue::from_static(value));
            }
            response
        }
    }
}

struct Answer {
    body: Bytes,
    usage: Option<Usage>,
    provider: Option<Arc<str>>,
    deployment: Option<Arc<str>>,
    hit: bool,
}

/// Admission, dispatch, and the call itself (batched when the deployment batches).
async fn upstream(
    state: &AppState,
    route: Arc<Route>,
    req: &EmbeddingsRequest,
) -> Result<Answer, GatewayError> {
    let _admitted = super::admit(state).await?;
    let dispatched = state
        .models
        .dispatch(route, super::deadline(state), |d| async move {
            if let Some(batcher) = state.batchers.get(&d.id)
                && let Some(reply) = batcher.submit(req).await
            {
                return reply;
            }
            d.provider
                .embeddings(req, &d.model)
                .await
                .map(|(body, usage, _)| (body, usage))
        })
        .await?;
    let (body, usage) = dispatched.value;
    Ok(Answer {
        body,
        usage,
        provider: Some(dispatched.deployment.provider.name.clone()),
        deployment: Some(dispatched.deployment.id.as_str().into()),
        hit: false,
    })
}

/// The cacheable path: hit, or join/lead a flight that stores its answer.
async fn cached(
    state: &Arc<AppState>,
    route: Arc<Route>,
    req: EmbeddingsRequest,
    policy: CachePolicy,
) -> Result<Answer, GatewayError> {
    let key = CacheKey::of("embeddings", &route.alias, &req.object);
    if policy.lookup
        && let Some(body) = state.cache.get(&key).await
    {
        return Ok(Answer {
            body,
            usage: None,
            provider: None,
            deployment: None,
            hit: true,
        });
    }
    let flight_key = FlightKey { key, stream: false };
    let subscription = state
        .flights
        .join(flight_key, state.cache.coalescing(), &state.cache.stats);
    if subscription.leader {
        let flight = subscription.flight.clone();
        let state = state.clone();
        let store = policy.store;
        state.clone().tasks.spawn(async move {
            let work = async {
                match upstream(&state, route, &req).await {
                    Ok(answer) => {
                        if store {
                            state.cache.put(key, answer.body.clone()).await;
                        }
                        if let Some(provider) = answer.provider {
                            flight.set_provider(provider, answer.deployment.clone());
                        }
                        flight.complete(answer.body, answer.usage);
                    }
                    Err(err) => flight.fail(err),
                }
                state.flights.retire(&flight_key, &flight);
            };
            tokio::select! {
                _ = work => {}
                _ = flight.cancel.cancelled() => {}
            }
        });
    }
    let body = subscription.flight.wait_body().await?;
    Ok(Answer {
        body,
        usage: subscription.flight.usage(),
        provider: subscription.flight.provider(),
        deployment: subscription.flight.deployment(),
        hit: false,
    })
}
