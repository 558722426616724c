//! Inference: the one place a model call is made.
//!
//! [`Inference::chat`] and [`Inference::embed`] run a call in this order:
//!
//! 1. **charge**: the key may use the alias; its request rate, token rate and budget are
//!    reserved ([`crate::limits`]), held by the call's [`Meter`];
//! 2. **cache / coalesce** (cacheable aliases): a stored answer is returned at once (replayed
//!    as events for a stream); otherwise the call joins, or leads, the flight of identical
//!    calls in progress ([`coalesce`]);
//! 3. **admit**: a slot in the global admission queue;
//! 4. **dispatch**: [`crate::routing`] picks a deployment, retries, falls back, and the
//!    provider makes the upstream request;
//! 5. **settle**: the meter charges the real usage and queues the usage row, when the
//!    completion is in hand or when the stream has been read to its end (or dropped).
//!
//! Callers (the HTTP handlers, and every later feature that calls a model) describe the
//! call with a [`CallContext`]: request id, principal, deadline, tracing span, cache
//! directive and metering. Nothing here knows about HTTP: a reply is bytes to forward plus
//! what is needed to read them typed, and the pass-through path never parses a body it
//! does not have to.

pub mod coalesce;
pub mod meter;
pub mod reply;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::{AdmissionQueue, Admitted, QueueBudget};
use crate::auth::Principal;
use crate::cache::flight::{FlightKey, Flights, Subscription};
use crate::cache::replay::completion_to_events;
use crate::cache::{CacheDirective, CacheKey, ResponseCache};
use crate::error::GatewayError;
use crate::limits::Limiter;
use crate::microbatch::EmbeddingBatcher;
use crate::providers::ChatReply as ProviderReply;
use crate::routing::{ModelTable, Route};
use crate::store::usage::UsageSink;
use crate::wire::{ChatRequest, EmbeddingsRequest};

pub use meter::{Meter, Metering};
pub use reply::{ChatReply, ChatStream, Completion, Served, StreamEvent};

use reply::Source;

/// Everything a model call needs, built once at start-up and shared.
pub struct Inference {
    models: ModelTable,
    /// The global concurrency limit and queue in front of every upstream call.
    admission: AdmissionQueue,
    cache: ResponseCache,
    flights: Arc<Flights>,
    /// Embeddings micro-batchers by deployment id (empty when batching is off).
    batchers: HashMap<String, EmbeddingBatcher>,
    limits: Arc<Limiter>,
    /// The usage log's queue (`None` with `[usage] enabled = false`).
    usage: Option<UsageSink>,
    /// Owns the coalesced calls' upstream work.
    tasks: TaskTracker,
    /// Default deadline of a call: the time allowed until its answer has started.
    request_timeout: Duration,
    /// Completion tokens reserved when a request sets no `max_tokens`.
    completion_reserve: u64,
}

/// The parts an [`Inference`] is built from.
pub struct InferenceParts {
    pub models: ModelTable,
    pub admission: AdmissionQueue,
    pub cache: ResponseCache,
    pub batchers: HashMap<String, EmbeddingBatcher>,
    pub limits: Arc<Limiter>,
    pub usage: Option<UsageSink>,
    pub tasks: TaskTracker,
    pub request_timeout: Duration,
    pub completion_reserve: u64,
}

/// One operation's description: who asks, until when, and how it is traced and metered.
/// An operation that makes several calls (a tool loop) uses one context for all of them.
#[derive(Clone)]
pub struct CallContext {
    pub request_id: Arc<str>,
    /// The key making the call; `None` when authentication is off.
    pub principal: Option<Arc<Principal>>,
    /// By when the answer must have started.
    pub deadline: Instant,
    /// The span the call's work is recorded under.
    pub span: tracing::Span,
    /// The caller's cache directive (the alias's setting applies when it has none).
    pub cache: CacheDirective,
    pub metering: Metering,
}

impl Inference {
    pub fn new(parts: InferenceParts) -> Inference {
        Inference {
            models: parts.models,
            admission: parts.admission,
            cache: parts.cache,
            flights: Arc::new(Flights::default()),
            batchers: parts.batchers,
            limits: parts.limits,
            usage: parts.usage,
            tasks: parts.tasks,
            request_timeout: parts.request_timeout,
            completion_reserve: parts.completion_reserve,
        }
    }

    pub fn models(&self) -> &ModelTable {
        &self.models
    }

    pub fn admission(&self) -> &AdmissionQueue {
        &self.admission
    }

    pub fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    pub fn flights(&self) -> &Flights {
        &self.flights
    }

    pub fn limits(&self) -> &Arc<Limiter> {
        &self.limits
    }

    pub fn usage_sink(&self) -> Option<&UsageSink> {
        self.usage.as_ref()
    }

    /// A context for an operation of kind `route` (the usage row's route: `chat`,
    /// `embeddings`, …), with the default deadline, the current span and no cache
    /// directive.
    pub fn context(
        &self,
        route: &'static str,
        request_id: Arc<str>,
        principal: Option<Arc<Principal>>,
    ) -> CallContext {
        CallContext {
            metering: Metering::new(
                self.usage.clone(),
                route,
                principal.as_deref(),
                request_id.clone(),
            ),
            request_id,
            principal,
            deadline: Instant::now() + self.request_timeout,
            span: tracing::Span::current(),
            cache: CacheDirective::default(),
        }
    }

    /// One chat completion: a whole completion, or a started stream.
    ///
    /// # Errors
    /// Refusals (model not found or not allowed, limits, overload) and upstream failures
    /// that happened before any output, in the shape the client should see.
    pub async fn chat(
        self: &Arc<Self>,
        ctx: &CallContext,
        req: ChatRequest,
    ) -> Result<ChatReply, GatewayError> {
        let mut meter = ctx.metering.open();
        let call = self.chat_call(ctx, req, &mut meter);
        match call.instrument(ctx.span.clone()).await {
            Ok(Call::Complete(completion)) => {
                meter.finish(completion.usage, 200);
                Ok(ChatReply::Complete(completion))
            }
            Ok(Call::Stream(parts)) => Ok(ChatReply::Stream(Box::new(ChatStream::new(
                parts.source,
                parts.include_usage,
                meter,
                parts.served,
                parts.admitted,
                parts.in_flight,
            )))),
            Err(err) => {
                meter.fail(&err);
                Err(err)
            }
        }
    }

    async fn chat_call(
        self: &Arc<Self>,
        ctx: &CallContext,
        req: ChatRequest,
        meter: &mut Meter,
    ) -> Result<Call, GatewayError> {
        let route = self.models.resolve(&req.model)?;
        meter.alias = Some(route.alias.clone());
        let max_tokens = || {
            let read = |field| req.object.get::<u64>(field).ok().flatten();
            read("max_completion_tokens").or_else(|| read("max_tokens"))
        };
        self.charge(
            ctx,
            &route.alias,
            req.object.body().len(),
            max_tokens,
            meter,
        )
        .await?;
        let served = Served {
            alias: route.alias.clone(),
            ..Served::default()
        };
        let policy = ctx.cache.policy(route.cache);
        if !policy.active() {
            return self.chat_direct(ctx, route, &req, served, meter).await;
        }
        let mut served = Served {
            cache_used: true,
            ..served
        };
        let key = CacheKey::of("chat", &route.alias, &req.object);
        if policy.lookup
            && let Some(body) = self.cache.get(&key).await
        {
            meter.cache_hit = true;
            served.cache_hit = true;
            if !req.stream {
                return Ok(Call::Complete(Completion {
                    body,
                    usage: None,
                    served,
                }));
            }
            match completion_to_events(&body, true) {
                Ok(events) => {
                    return Ok(Call::Stream(StreamParts {
                        source: Source::Replay(events.into_iter()),
                        include_usage: req.include_usage,
                        served,
                        admitted: None,
                        in_flight: None,
                    }));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cache: stored answer cannot be replayed");
                    meter.cache_hit = false;
                    served.cache_hit = false;
                    served.cache_used = false;
                    return self.chat_direct(ctx, route, &req, served, meter).await;
                }
            }
        }
        let flight_key = FlightKey {
            key,
            stream: req.stream,
        };
        let subscription =
            self.flights
                .join(flight_key, self.cache.coalescing(), &self.cache.stats);
        let include_usage = req.include_usage;
        let stream = req.stream;
        if subscription.leader {
            coalesce::lead_chat(
                self,
                route,
                req,
                flight_key,
                policy.store,
                subscription.flight.clone(),
                ctx.deadline,
            );
        }
        if stream {
            subscription.flight.wait_start().await?;
            let watch = subscription.flight.watch();
            return Ok(Call::Stream(StreamParts {
                source: Source::Flight {
                    subscription,
                    watch,
                    index: 0,
                },
                include_usage,
                served,
                admitted: None,
                in_flight: None,
            }));
        }
        let answer = flight_answer(&subscription, served).await?;
        meter.deployment = answer.served.deployment.clone();
        Ok(Call::Complete(answer))
    }

    /// The uncached path: admission, dispatch, answer.
    async fn chat_direct(
        &self,
        ctx: &CallContext,
        route: Arc<Route>,
        req: &ChatRequest,
        mut served: Served,
        meter: &mut Meter,
    ) -> Result<Call, GatewayError> {
        let (admitted, queue) = self.admit().await?;
        let dispatched = self
            .models
            .dispatch(route, ctx.deadline, |d| async move {
                d.provider.chat(req, &d.model, queue).await
            })
            .await?;
        served.provider = Some(dispatched.deployment.provider.name.clone());
        served.deployment = Some(dispatched.deployment.id.as_str().into());
        meter.deployment = served.deployment.clone();
        match dispatched.value {
            ProviderReply::Complete {
                body,
                usage,
                upstream,
            } => {
                served.upstream = Some(upstream);
                Ok(Call::Complete(Completion {
                    body,
                    usage,
                    served,
                }))
            }
            ProviderReply::Stream(stream) => {
                served.upstream = Some(stream.upstream_headers);
                Ok(Call::Stream(StreamParts {
                    source: Source::Upstream(stream),
                    include_usage: req.include_usage,
                    served,
                    admitted: Some(admitted),
                    in_flight: Some(dispatched.in_flight),
                }))
            }
        }
    }

    /// One embeddings call (micro-batched when the deployment batches).
    ///
    /// # Errors
    /// As for [`Inference::chat`].
    pub async fn embed(
        self: &Arc<Self>,
        ctx: &CallContext,
        req: EmbeddingsRequest,
    ) -> Result<Completion, GatewayError> {
        let mut meter = ctx.metering.open();
        let call = self.embed_call(ctx, req, &mut meter);
        match call.instrument(ctx.span.clone()).await {
            Ok(answer) => {
                meter.cache_hit = answer.served.cache_hit;
                meter.finish(answer.usage, 200);
                Ok(answer)
            }
            Err(err) => {
                meter.fail(&err);
                Err(err)
            }
        }
    }

    async fn embed_call(
        self: &Arc<Self>,
        ctx: &CallContext,
        req: EmbeddingsRequest,
        meter: &mut Meter,
    ) -> Result<Completion, GatewayError> {
        let route = self.models.resolve(&req.model)?;
        meter.alias = Some(route.alias.clone());
        self.charge(
            ctx,
            &route.alias,
            req.object.body().len(),
            || Some(0),
            meter,
        )
        .await?;
        let policy = ctx.cache.policy(route.cache);
        if !policy.active() {
            let answer = self.embed_upstream(route, &req, ctx.deadline).await?;
            meter.deployment = answer.served.deployment.clone();
            return Ok(answer);
        }
        let served = Served {
            alias: route.alias.clone(),
            cache_used: true,
            ..Served::default()
        };
        let key = CacheKey::of("embeddings", &route.alias, &req.object);
        if policy.lookup
            && let Some(body) = self.cache.get(&key).await
        {
            return Ok(Completion {
                body,
                usage: None,
                served: Served {
                    cache_hit: true,
                    ..served
                },
            });
        }
        let flight_key = FlightKey { key, stream: false };
        let subscription =
            self.flights
                .join(flight_key, self.cache.coalescing(), &self.cache.stats);
        if subscription.leader {
            coalesce::lead_embeddings(
                self,
                route,
                req,
                key,
                policy.store,
                subscription.flight.clone(),
                ctx.deadline,
            );
        }
        let answer = flight_answer(&subscription, served).await?;
        meter.deployment = answer.served.deployment.clone();
        Ok(answer)
    }

    /// Admission, dispatch, and the embeddings call itself.
    async fn embed_upstream(
        &self,
        route: Arc<Route>,
        req: &EmbeddingsRequest,
        deadline: Instant,
    ) -> Result<Completion, GatewayError> {
        let alias = route.alias.clone();
        let (_admitted, queue) = self.admit().await?;
        let dispatched = self
            .models
            .dispatch(route, deadline, |d| async move {
                if let Some(batcher) = self.batchers.get(&d.id)
                    && let Some(reply) = batcher.submit(req).await
                {
                    return reply.map(|(body, usage)| (body, usage, None));
                }
                d.provider
                    .embeddings(req, &d.model, queue)
                    .await
                    .map(|(body, usage, took)| (body, usage, Some(took)))
            })
            .await?;
        let (body, usage, upstream): (Bytes, _, _) = dispatched.value;
        Ok(Completion {
            body,
            usage,
            served: Served {
                alias,
                provider: Some(dispatched.deployment.provider.name.clone()),
                deployment: Some(dispatched.deployment.id.as_str().into()),
                upstream,
                ..Served::default()
            },
        })
    }

    /// Checks the key may use `alias` and reserves its rate and budget for a request of
    /// `body_len` bytes answering in at most `max_tokens` (read only when a budget needs it).
    async fn charge(
        &self,
        ctx: &CallContext,
        alias: &str,
        body_len: usize,
        max_tokens: impl FnOnce() -> Option<u64>,
        meter: &mut Meter,
    ) -> Result<(), GatewayError> {
        let Some(principal) = &ctx.principal else {
            return Ok(());
        };
        if !principal.may_use(alias) {
            return Err(GatewayError::ModelNotFound(alias.to_owned()));
        }
        let estimate = if principal.limits.policy.budget.is_some() {
            crate::limits::estimate_tokens(body_len, max_tokens(), self.completion_reserve)
        } else {
            0
        };
        meter.reservation = self.limits.reserve(&principal.limits, estimate).await?;
        Ok(())
    }

    /// Counts a call that is not a model's (a direct tool invocation) against the key's
    /// request rate; it reserves no tokens, so a budget only refuses it once spent.
    ///
    /// # Errors
    /// 429 when the key's rate or budget is exhausted.
    pub async fn charge_request(&self, ctx: &CallContext) -> Result<(), GatewayError> {
        let Some(principal) = &ctx.principal else {
            return Ok(());
        };
        // Settled at once with nothing spent: the request is what counted.
        drop(self.limits.reserve(&principal.limits, 0).await?);
        Ok(())
    }

    /// Takes a slot in the global admission queue (503 with `Retry-After` when full), and
    /// returns it with what is left of the call's queue budget for the provider queues.
    async fn admit(&self) -> Result<(Admitted, QueueBudget), GatewayError> {
        let budget = QueueBudget::new(self.admission.max_wait());
        let admitted = self.admission.acquire_within(budget).await.map_err(|_| {
            GatewayError::ServiceOverloaded {
                retry_after: self.admission.retry_after_secs(),
            }
        })?;
        Ok((admitted, budget))
    }
}

/// The answer of a non-stream flight once it has landed, with who served it.
async fn flight_answer(
    subscription: &Subscription,
    mut served: Served,
) -> Result<Completion, GatewayError> {
    let body = subscription.flight.wait_body().await?;
    served.provider = subscription.flight.provider();
    served.deployment = subscription.flight.deployment();
    Ok(Completion {
        body,
        usage: subscription.flight.usage(),
        served,
    })
}

/// What a call produced before it is handed out with its meter.
enum Call {
    Complete(Completion),
    Stream(StreamParts),
}

struct StreamParts {
    source: Source,
    include_usage: bool,
    served: Served,
    admitted: Option<Admitted>,
    in_flight: Option<crate::routing::InFlight>,
}
