//! The leader's side of a shared flight: the one upstream call that identical cacheable
//! requests in flight at the same time share (the flight's state lives in
//! [`crate::cache::flight`]).
//!
//! The leader's work runs in a task owned by the app, so it outlives the request that
//! started it while other subscribers still wait; it is cancelled when the last subscriber
//! leaves. It publishes stream events as they come (with the usage chunk always kept:
//! subscribers differ in whether they asked for it and filter it themselves), stores a
//! complete answer in the cache, and retires the flight only after that, so a request
//! arriving in between finds one or the other.

use std::sync::Arc;

use bytes::Bytes;

use super::Inference;
use crate::cache::CacheKey;
use crate::cache::flight::{Flight, FlightKey};
use crate::error::GatewayError;
use crate::providers::ChatReply as ProviderReply;
use crate::routing::Route;
use crate::wire::chat::StreamAssembler;
use crate::wire::{ChatRequest, EmbeddingsRequest};

/// Starts the leader's chat work for `flight` in an owned task.
pub(super) fn lead_chat(
    inference: &Arc<Inference>,
    route: Arc<Route>,
    req: ChatRequest,
    key: FlightKey,
    store: bool,
    flight: Arc<Flight>,
    deadline: std::time::Instant,
) {
    let owner = inference.clone();
    run_until_abandoned(inference, flight.clone(), async move {
        fly_chat(&owner, route, &req, key, store, &flight, deadline).await;
    });
}

/// Runs a flight's work in a task the app owns, until it is done or its last subscriber
/// has left.
fn run_until_abandoned(
    inference: &Inference,
    flight: Arc<Flight>,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) {
    inference.tasks.spawn(async move {
        tokio::select! {
            _ = work => {}
            _ = flight.cancel.cancelled() => {}
        }
    });
}

async fn fly_chat(
    inference: &Inference,
    route: Arc<Route>,
    req: &ChatRequest,
    key: FlightKey,
    store: bool,
    flight: &Arc<Flight>,
    deadline: std::time::Instant,
) {
    let work = async {
        let (_admitted, queue) = inference.admit().await?;
        let dispatched = inference
            .models
            .dispatch(route, deadline, |d| async move {
                d.provider.chat(req, &d.model, queue).await
            })
            .await?;
        flight.set_provider(
            dispatched.deployment.provider.name.clone(),
            Some(dispatched.deployment.id.as_str().into()),
        );
        match dispatched.value {
            ProviderReply::Complete { body, usage, .. } => {
                if store {
                    inference.cache.put(key.key, body.clone()).await;
                }
                flight.complete(body, usage);
            }
            ProviderReply::Stream(mut stream) => {
                let mut assembler = StreamAssembler::new();
                let mut usage = None;
                while let Some((event, info)) = stream.next_event().await {
                    if store {
                        assembler.push(&event);
                    }
                    if info.usage.is_some() {
                        usage = info.usage;
                    }
                    flight.publish(event);
                }
                if store && let Some(body) = assembler.finish() {
                    inference.cache.put(key.key, Bytes::from(body)).await;
                }
                flight.end_stream(usage);
            }
        }
        Ok::<_, GatewayError>(())
    };
    if let Err(err) = work.await {
        flight.fail(err);
    }
    inference.flights.retire(&key, flight);
}

/// Starts the leader's embeddings work for `flight` in an owned task.
pub(super) fn lead_embeddings(
    inference: &Arc<Inference>,
    route: Arc<Route>,
    req: EmbeddingsRequest,
    key: CacheKey,
    store: bool,
    flight: Arc<Flight>,
    deadline: std::time::Instant,
) {
    let owner = inference.clone();
    run_until_abandoned(inference, flight.clone(), async move {
        let inference = owner;
        let flight_key = FlightKey { key, stream: false };
        match inference.embed_upstream(route, &req, deadline).await {
            Ok(answer) => {
                if store {
                    inference.cache.put(key, answer.body.clone()).await;
                }
                if let Some(provider) = answer.served.provider {
                    flight.set_provider(provider, answer.served.deployment.clone());
                }
                flight.complete(answer.body, answer.usage);
            }
            Err(err) => flight.fail(err),
        }
        inference.flights.retire(&flight_key, &flight);
    });
}
