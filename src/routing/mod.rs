//! Routing: from the model alias a client names to the deployment that answers, with
//! balancing, retries, fallbacks and a circuit breaker per deployment.
//!
//! Built once from `[models]` at start-up. A deployment (provider + upstream model) is
//! shared by every alias that uses it, so its breaker and latency figures see all of its
//! traffic. [`ModelTable::dispatch`] runs one request: pick a healthy deployment, call it,
//! retry retryable failures (on another deployment where one exists, after a jittered
//! backoff or the upstream's `Retry-After`), then walk the fallback aliases, all within the
//! request's deadline. A call only "succeeds" once the upstream answered with a success
//! status, which for a stream is before its first byte reaches the client, so a retry can
//! never duplicate output the client has seen.

pub mod breaker;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;

use crate::config::{Balancing, FallbackOn, RoutingConfig, Settings};
use crate::error::GatewayError;
use crate::providers::{PoolSnapshot, Provider};
use breaker::{BreakerSnapshot, CircuitBreaker, Ticket};

/// Smoothing of the latency average: each new sample weighs 20%.
const EWMA_WEIGHT: f64 = 0.2;

/// One place a model can be served: a provider and the upstream model name.
pub struct Deployment {
    /// `provider/model`, the name used in logs, metrics and the admin view.
    pub id: String,
    pub provider: Arc<Provider>,
    /// The model name sent upstream.
    pub model: String,
    pub breaker: CircuitBreaker,
    in_flight: AtomicU64,
    /// EWMA of successful call latency, as f64 bits, in milliseconds.
    ewma_ms: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
}

/// A deployment's share of one alias.
pub struct Weighted {
    pub deployment: Arc<Deployment>,
    pub weight: u32,
}

/// A client-facing model name and where it goes.
pub struct Route {
    /// Shared, so that logs, metrics and usage rows name it without copying.
    pub alias: Arc<str>,
    pub deployments: Vec<Weighted>,
    pub fallbacks: Vec<String>,
    pub balancing: Balancing,
    pub fallback_on: Vec<FallbackOn>,
    /// Answers for this alias are cached (and identical requests coalesced).
    pub cache: bool,
}

/// Every configured alias and deployment.
#[derive(Default)]
pub struct ModelTable {
    routes: HashMap<String, Arc<Route>>,
    /// Aliases in config order, for `/v1/models`.
    order: Vec<String>,
    deployments: Vec<Arc<Deployment>>,
    config: RoutingConfig,
}

/// A successful dispatch: the value, who produced it, and a guard that keeps the
/// deployment's in-flight count up until the response (or stream) is done.
pub struct Dispatched<T> {
    pub value: T,
    pub route: Arc<Route>,
    pub deployment: Arc<Deployment>,
    pub in_flight: InFlight,
    pub attempts: u32,
}

/// Counts a request against its deployment's in-flight figure while alive.
pub struct InFlight(Arc<Deployment>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An attempt's breaker ticket, given back if the attempt is abandoned mid-way.
struct Attempt<'a> {
    deployment: &'a Deployment,
    ticket: Option<Ticket>,
}

impl Attempt<'_> {
    fn finish(mut self, success: bool) {
        if let Some(ticket) = self.ticket.take() {
            self.deployment.breaker.record(ticket, success);
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.deployment.breaker.release(ticket);
        }
    }
}

impl Deployment {
    fn new(provider: Arc<Provider>, model: String, settings: &Settings) -> Self {
        let id = format!("{}/{}", provider.name, model);
        Deployment {
            breaker: CircuitBreaker::new(&id, settings.circuit_breaker.clone()),
            id,
            provider,
            model,
            in_flight: AtomicU64::new(0),
            ewma_ms: AtomicU64::new(0f64.to_bits()),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    fn ewma_ms(&self) -> f64 {
        f64::from_bits(self.ewma_ms.load(Ordering::Relaxed))
    }

    fn observe_latency(&self, took: Duration) {
        let sample = took.as_secs_f64() * 1e3;
        let old = self.ewma_ms();
        let new = if old == 0.0 {
            sample
        } else {
            old + EWMA_WEIGHT * (sample - old)
        };
        // Racing updates may lose a sample; an average does not need every one.
        self.ewma_ms.store(new.to_bits(), Ordering::Relaxed);
    }

    /// The load score for least-loaded balancing: queue length times service time.
    fn load_score(&self) -> f64 {
        (self.in_flight.load(Ordering::Relaxed) as f64 + 1.0) * self.ewma_ms().max(0.001)
    }

    pub fn snapshot(&self) -> DeploymentSnapshot {
        let requests = self.requests.load(Ordering::Relaxed);
        let failures = self.failures.load(Ordering::Relaxed);
        DeploymentSnapshot {
            id: self.id.clone(),
            provider: self.provider.name.to_string(),
            model: self.model.clone(),
            circuit: self.breaker.snapshot(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            ewma_latency_ms: (self.ewma_ms() * 1e3).round() / 1e3,
            requests,
            failures,
            error_rate: if requests == 0 {
                0.0
            } else {
                failures as f64 / requests as f64
            },
            pool: self.provider.pool().stats().snapshot(),
        }
    }
}

/// A deployment as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentSnapshot {
    pub id: String,
    pub provider: String,
    pub model: String,
    pub circuit: BreakerSnapshot,
    pub in_flight: u64,
    pub ewma_latency_ms: f64,
    pub requests: u64,
    pub failures: u64,
    pub error_rate: f64,
    pub pool: PoolSnapshot,
}

impl Route {
    /// Picks a deployment whose breaker lets a request through, preferring ones not yet
    /// tried for this request.
    /// Deployments in `busy` (their queue refused this request) are never picked again.
    fn pick(
        &self,
        tried: &[Arc<Deployment>],
        busy: &[Arc<Deployment>],
    ) -> Option<(Arc<Deployment>, Ticket)> {
        let open: Vec<&Weighted> = self
            .deployments
            .iter()
            .filter(|w| !busy.iter().any(|b| Arc::ptr_eq(b, &w.deployment)))
            .collect();
        let untried: Vec<&Weighted> = open
            .iter()
            .copied()
            .filter(|w| !tried.iter().any(|t| Arc::ptr_eq(t, &w.deployment)))
            .collect();
        let pool: Vec<&Weighted> = if untried.is_empty() { open } else { untried };
        let mut candidates: Vec<&Weighted> = pool
            .into_iter()
            .filter(|w| w.deployment.breaker.is_available())
            .collect();
        // The breaker may refuse between the check and the acquire (a probe taken by a
        // concurrent request); try the next choice then.
        while !candidates.is_empty() {
            let i = self.choose(&candidates);
            let w = candidates.swap_remove(i);
            if let Some(ticket) = w.deployment.breaker.try_acquire() {
                return Some((w.deployment.clone(), ticket));
            }
        }
        None
    }

    fn choose(&self, candidates: &[&Weighted]) -> usize {
        let mut rng = rand::rng();
        if candidates.len() == 1 {
            return 0;
        }
        match self.balancing {
            Balancing::Weighted => {
                let total: u64 = candidates.iter().map(|w| u64::from(w.weight)).sum();
                let mut roll = rng.random_range(0..total.max(1));
                for (i, w) in candidates.iter().enumerate() {
                    if roll < u64::from(w.weight) {
                        return i;
                    }
                    roll -= u64::from(w.weight);
                }
                0
            }
            Balancing::LeastLoaded => {
                let a = rng.random_range(0..candidates.len());
                let mut b = rng.random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let score = |i: usize| candidates[i].deployment.load_score();
                if score(a) <= score(b) { a } else { b }
            }
        }
    }
}

impl ModelTable {
    /// Builds routes and deployments from the settings.
    ///
    /// # Errors
    /// When a model names a provider that was not built.
    pub fn build(
        settings: &Settings,
        providers: &std::collections::BTreeMap<String, Arc<Provider>>,
    ) -> Result<ModelTable, GatewayError> {
        let mut table = ModelTable {
            config: settings.routing.clone(),
            ..ModelTable::default()
        };
        let mut shared: HashMap<(String, String), Arc<Deployment>> = HashMap::new();
        for (alias, config) in &settings.models {
            let mut deployments = Vec::new();
            for (provider, model, weight) in config.deployments(alias) {
                let provider = providers.get(&provider).cloned().ok_or_else(|| {
                    GatewayError::Internal(format!("model {alias}: unknown provider {provider}"))
                })?;
                let key = (provider.name.to_string(), model.clone());
                let deployment = shared
                    .entry(key)
                    .or_insert_with(|| {
                        let d = Arc::new(Deployment::new(provider, model, settings));
                        table.deployments.push(d.clone());
                        d
                    })
                    .clone();
                deployments.push(Weighted { deployment, weight });
            }
            table.order.push(alias.clone());
            table.routes.insert(
                alias.clone(),
                Arc::new(Route {
                    alias: alias.as_str().into(),
                    deployments,
                    fallbacks: config.fallbacks.clone(),
                    balancing: config.balancing,
                    fallback_on: config.fallback_on.clone(),
                    cache: config.cache,
                }),
            );
        }
        Ok(table)
    }

    /// # Errors
    /// 404 `model_not_found` for an alias that is not configured.
    pub fn resolve(&self, alias: &str) -> Result<Arc<Route>, GatewayError> {
        self.routes
            .get(alias)
            .cloned()
            .ok_or_else(|| GatewayError::ModelNotFound(alias.to_string()))
    }

    /// Routes in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.order.iter().filter_map(|alias| self.routes.get(alias))
    }

    /// Every deployment, once each.
    pub fn deployments(&self) -> &[Arc<Deployment>] {
        &self.deployments
    }

    /// Runs `call` against the deployments of `route` and then its fallbacks until one
    /// succeeds, a non-retryable error occurs, or `deadline` passes.
    ///
    /// # Errors
    /// The last upstream error, a client error from the upstream, a timeout at the
    /// deadline, or 503 when no deployment is available (every circuit open).
    pub async fn dispatch<T, F, Fut>(
        &self,
        route: Arc<Route>,
        deadline: Instant,
        mut call: F,
    ) -> Result<Dispatched<T>, GatewayError>
    where
        F: FnMut(Arc<Deployment>) -> Fut,
        Fut: Future<Output = Result<T, GatewayError>>,
    {
        let first_alias = route.alias.clone();
        let mut chain = vec![route];
        let mut last_error: Option<GatewayError> = None;
        let mut attempts = 0u32;
        let mut next = 0;
        // Deployments whose queue refused this request: queueing there again would wait
        // out the queue a second time, so they are out for the rest of the request.
        let mut busy: Vec<Arc<Deployment>> = Vec::new();
        while next < chain.len() {
            let route = chain[next].clone();
            next += 1;
            for fallback in &route.fallbacks {
                if !chain.iter().any(|r| *r.alias == **fallback)
                    && let Ok(r) = self.resolve(fallback)
                {
                    chain.push(r);
                }
            }
            if next > 1 {
                metrics::counter!("switchyard_fallbacks_total", "model" => first_alias.clone(), "to" => route.alias.clone())
                    .increment(1);
                tracing::info!(model = %first_alias, fallback = %route.alias, "trying fallback model");
            }
            let mut tried: Vec<Arc<Deployment>> = Vec::new();
            for attempt in 0..self.config.max_attempts {
                let Some((deployment, ticket)) = route.pick(&tried, &busy) else {
                    break;
                };
                if attempt > 0 {
                    let same = tried.iter().any(|t| Arc::ptr_eq(t, &deployment));
                    let wait = self.backoff(attempt, same, last_error.as_ref());
                    match wait {
                        Some(wait)
                            if Instant::now()
                                .checked_add(wait)
                                .is_some_and(|at| at < deadline) =>
                        {
                            tokio::time::sleep(wait).await;
                        }
                        Some(_) => {
                            // Waiting would overrun the deadline: answer now.
                            deployment.breaker.release(ticket);
                            break;
                        }
                        None => {}
                    }
                    metrics::counter!("switchyard_retries_total", "model" => route.alias.clone())
                        .increment(1);
                }
                attempts += 1;
                let guard = Attempt {
                    deployment: &deployment,
                    ticket: Some(ticket),
                };
                deployment.in_flight.fetch_add(1, Ordering::Relaxed);
                let in_flight = InFlight(deployment.clone());
                deployment.requests.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let span = tracing::info_span!(
                    "upstream",
                    otel.name = "upstream attempt",
                    deployment = %deployment.id,
                    attempt,
                );
                let result = match tokio::time::timeout_at(
                    tokio::time::Instant::from_std(deadline),
                    tracing::Instrument::instrument(call(deployment.clone()), span),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(GatewayError::UpstreamTimeout {
                        provider: deployment.provider.name.to_string(),
                        phase: "the request deadline",
                    }),
                };
                metrics::histogram!("switchyard_upstream_duration_seconds",
                    "deployment" => deployment.id.clone(),
                    "outcome" => if result.is_ok() { "ok" } else { "error" })
                .record(started.elapsed().as_secs_f64());
                match result {
                    Ok(value) => {
                        deployment.observe_latency(started.elapsed());
                        guard.finish(true);
                        return Ok(Dispatched {
                            value,
                            route: route.clone(),
                            deployment: deployment.clone(),
                            in_flight,
                            attempts,
                        });
                    }
                    Err(err) => {
                        drop(in_flight);
                        if err.counts_against_deployment() {
                            deployment.failures.fetch_add(1, Ordering::Relaxed);
                            guard.finish(false);
                        } else {
                            drop(guard);
                        }
                        tracing::debug!(deployment = %deployment.id, error = %err, attempt, "upstream attempt failed");
                        if Instant::now() >= deadline {
                            return Err(err);
                        }
                        if matches!(err, GatewayError::ProviderBusy { .. }) {
                            busy.push(deployment.clone());
                        }
                        if err.is_retryable() {
                            tried.push(deployment.clone());
                            last_error = Some(err);
                            continue;
                        }
                        if err
                            .fallback_class()
                            .is_some_and(|class| route.fallback_on.contains(&class))
                        {
                            last_error = Some(err);
                            break;
                        }
                        return Err(err);
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| GatewayError::NoDeployment {
            model: first_alias.to_string(),
        }))
    }

    /// How long to wait before the next attempt: the upstream's `Retry-After` when it
    /// gave one (and it is not too long), else full-jitter exponential backoff when
    /// retrying the same deployment; nothing when moving to another one.
    fn backoff(&self, attempt: u32, same: bool, last: Option<&GatewayError>) -> Option<Duration> {
        let retry_after = last
            .and_then(GatewayError::retry_after)
            .map(Duration::from_secs);
        if let Some(wait) = retry_after
            && same
        {
            return (wait <= self.config.max_retry_after)
                .then_some(wait)
                .or(Some(Duration::MAX));
        }
        if !same {
            return None;
        }
        let cap = self
            .config
            .backoff_base
            .saturating_mul(1 << attempt.min(16))
            .min(self.config.backoff_max);
        let jittered = rand::rng().random_range(0..=cap.as_micros() as u64);
        Some(Duration::from_micros(jittered))
    }
}
