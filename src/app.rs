//! The application: build shared state and the router, bind, serve, drain on shutdown.
//!
//! Everything expensive (HTTP clients, the model table, the `/v1/models` body) is built
//! here once. Background work (provider warm-up, the in-process simulated provider) is
//! owned by a [`TaskTracker`] that shutdown cancels and waits for.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::Bytes;
use switchyard_loadlab::mock::MockServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::AdmissionQueue;
use crate::api;
use crate::auth::Authenticator;
use crate::batch::EmbeddingBatcher;
use crate::cache::ResponseCache;
use crate::cache::flight::Flights;
use crate::config::AuthMode;
use crate::config::{ProviderKind, Settings};
use crate::error::GatewayError;
use crate::limits::Limiter;
use crate::providers::Provider;
use crate::routing::ModelTable;
use crate::store::Store;
use crate::store::usage::UsageSink;

/// The request id header, read from the client or assigned, and echoed on the response.
pub const REQUEST_ID: &str = "x-request-id";

/// State shared by every request.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub models: ModelTable,
    pub providers: BTreeMap<String, Arc<Provider>>,
    /// `/v1/models`, rendered once.
    pub models_json: Bytes,
    /// The `created` stamp of the model list.
    pub models_created: u64,
    /// Keys and the usage log.
    pub store: Store,
    pub auth: Authenticator,
    /// Per-key request rate, token rate and budget.
    pub limits: Arc<Limiter>,
    /// The usage log's queue (`None` with `[usage] enabled = false`).
    pub usage: Option<UsageSink>,
    /// The global concurrency limit and queue in front of every upstream call.
    pub admission: AdmissionQueue,
    pub cache: ResponseCache,
    pub flights: Arc<Flights>,
    /// Percentiles and the timeline for `/admin/stats` and the dashboard.
    pub stats: Arc<crate::telemetry::stats::LiveStats>,
    /// Embeddings micro-batchers by deployment id (empty when batching is off).
    pub batchers: HashMap<String, EmbeddingBatcher>,
    /// Background work owned by the app (warm-up, coalesced upstream calls); shutdown
    /// waits for it.
    pub tasks: TaskTracker,
    /// Set when warm-up finished; `/ready` waits for it.
    pub warmed: AtomicBool,
    /// Set when shutdown began; `/ready` turns 503 so load balancers move away.
    pub draining: AtomicBool,
}

/// A bound, not yet serving, Switchyard.
pub struct App {
    state: Arc<AppState>,
    listener: TcpListener,
    addr: SocketAddr,
    /// The operator-only listener (`server.admin_listen`).
    admin: Option<(TcpListener, SocketAddr)>,
    cancel: CancellationToken,
    simulated: Vec<MockServer>,
}

impl App {
    /// Builds providers and routes and binds the listener.
    ///
    /// # Errors
    /// When the address cannot be bound or a provider client cannot be built.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        install_crypto();
        // Install the metrics recorder before the first request records anything; without
        // one every metric macro is a no-op.
        if settings.server.metrics {
            crate::telemetry::prometheus();
        }
        let settings = Arc::new(settings);
        let mut simulated = Vec::new();
        let mut providers = BTreeMap::new();
        for (name, config) in &settings.providers {
            let base_url = match config.kind {
                ProviderKind::Simulated => {
                    let mock = MockServer::start(
                        SocketAddr::from(([127, 0, 0, 1], 0)),
                        config.simulation.clone(),
                    )
                    .await
                    .context("starting the simulated provider")?;
                    let url = mock.base_url();
                    simulated.push(mock);
                    url
                }
                _ => config.base_url.clone().unwrap_or_default(),
            };
            let provider = Provider::build(name, config, &base_url, &settings.admission)
                .with_context(|| format!("building provider {name}"))?;
            providers.insert(name.clone(), Arc::new(provider));
        }
        let models = ModelTable::build(&settings, &providers)?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let models_json = api::models::render(&models, created);
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| format!("binding {}", settings.server.listen))?;
        let addr = listener.local_addr()?;
        let admin = match settings.server.admin_listen {
            Some(admin_addr) => {
                let admin_listener = TcpListener::bind(admin_addr)
                    .await
                    .with_context(|| format!("binding the admin listener {admin_addr}"))?;
                let bound = admin_listener.local_addr()?;
                Some((admin_listener, bound))
            }
            None => None,
        };
        let admission = AdmissionQueue::new(
            "global",
            settings.admission.max_concurrent,
            settings.admission.max_queue,
            Duration::from_millis(settings.admission.max_queue_wait_ms),
        );
        let cache = ResponseCache::build(&settings.cache, settings.redis.as_ref())
            .await
            .context("building the response cache")?;
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let store = Store::connect(&settings.database)
            .await
            .context("opening the database")?;
        let limits = match &settings.redis {
            Some(redis) => Limiter::redis(redis.url.expose(), &redis.key_prefix, tasks.clone())
                .await
                .context("connecting to Redis for shared limits")?,
            None => Limiter::memory(tasks.clone()),
        };
        let usage = settings.usage.enabled.then(|| {
            crate::store::usage::start(store.clone(), &settings.usage, &tasks, cancel.clone())
        });
        let auth = Authenticator::new(&settings.auth, store.clone());
        if settings.auth.mode == AuthMode::None {
            tracing::warn!(
                listen = %settings.server.listen,
                "authentication is OFF ([auth] mode = \"none\"): anyone who can reach this \
                 listener can use every model"
            );
        }
        tracing::info!(
            database = store.backend(),
            limits = limits.backend(),
            auth = ?settings.auth.mode,
            "state ready"
        );
        let mut batchers = HashMap::new();
        let batching = &settings.embeddings;
        if !batching.batch_window.is_zero() {
            for deployment in models.deployments() {
                if deployment.provider.wire == crate::providers::Wire::OpenAi {
                    batchers.insert(
                        deployment.id.clone(),
                        EmbeddingBatcher::start(
                            deployment.clone(),
                            batching.batch_window,
                            batching.batch_max_inputs,
                            &tasks,
                            cancel.clone(),
                        ),
                    );
                }
            }
        }
        let state = Arc::new(AppState {
            settings,
            models,
            providers,
            models_json,
            models_created: created,
            store,
            auth,
            limits,
            usage,
            admission,
            cache,
            flights: Arc::new(Flights::default()),
            batchers,
            stats: Arc::new(crate::telemetry::stats::LiveStats::default()),
            tasks,
            warmed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        });
        Ok(App {
            state,
            listener,
            addr,
            admin,
            cancel,
            simulated,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The operator listener's address, when `server.admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests and
    /// streams finish for up to `server.shutdown_grace`, and stops background work.
    ///
    /// # Errors
    /// When the server fails to accept connections.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let App {
            state,
            listener,
            addr,
            admin,
            cancel,
            simulated,
        } = self;
        let tasks = state.tasks.clone();
        let warm_state = state.clone();
        let warm_cancel = cancel.clone();
        tasks.spawn(async move {
            let warm =
                futures_util::future::join_all(warm_state.providers.values().map(|p| p.warm()));
            tokio::select! {
                _ = warm => warm_state.warmed.store(true, Ordering::Relaxed),
                _ = warm_cancel.cancelled() => {}
            }
        });

        let health_state = state.clone();
        let health_cancel = cancel.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut was_healthy = true;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let healthy = health_state.store.check_health().await;
                        if healthy != was_healthy {
                            if healthy {
                                tracing::info!("database reachable again");
                            } else {
                                tracing::error!("database unreachable");
                            }
                            was_healthy = healthy;
                        }
                    }
                    _ = health_cancel.cancelled() => return,
                }
            }
        });

        let sample_state = state.clone();
        let sample_cancel = cancel.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(sample_state.settings.server.stats_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            // The Prometheus recorder keeps every histogram sample until it is drained;
            // nothing drains it unless `/metrics` is scraped, so drain it on a timer.
            let mut upkeep = tokio::time::interval(crate::telemetry::METRICS_UPKEEP);
            upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let metrics_on = sample_state.settings.server.metrics;
            loop {
                tokio::select! {
                    _ = tick.tick() => sample(&sample_state).await,
                    _ = upkeep.tick(), if metrics_on => crate::telemetry::prometheus().run_upkeep(),
                    _ = sample_cancel.cancelled() => return,
                }
            }
        });

        if let Some((admin_listener, admin_addr)) = admin {
            let admin_cancel = cancel.clone();
            let app = admin_router(state.clone());
            tracing::info!(%admin_addr, "operator listener (metrics, admin, dashboard)");
            tasks.spawn(async move {
                let served = axum::serve(admin_listener, app)
                    .with_graceful_shutdown(async move { admin_cancel.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "operator listener failed");
                }
            });
        }

        let router = router(state.clone());
        let listener = listener.tap_io(|tcp| {
            // Streams are many small writes: never wait to coalesce them.
            let _ = tcp.set_nodelay(true);
        });
        tracing::info!(%addr, models = state.models.iter().count(), "switchyard listening");

        let grace = state.settings.server.shutdown_grace;
        let drain_state = state.clone();
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            drain_state.draining.store(true, Ordering::Relaxed);
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: draining in-flight requests"
            );
            let _ = draining_tx.send(());
        };
        let server = axum::serve(listener, router).with_graceful_shutdown(signal);
        let mut server = std::pin::pin!(server.into_future());
        let result = tokio::select! {
            result = &mut server => result.map_err(anyhow::Error::from),
            _ = async {
                // Once draining starts, give the server `grace` to finish on its own.
                let _ = draining_rx.await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!("shutdown grace elapsed with requests still open; closing them");
                Ok(())
            }
        };
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        state.store.close().await;
        for mock in simulated {
            let _ = tokio::time::timeout(Duration::from_secs(1), mock.shutdown()).await;
        }
        tracing::info!("switchyard stopped");
        result
    }
}

/// Takes one timeline point for the dashboard.
async fn sample(state: &AppState) {
    let limits = state.admission.snapshot();
    let cache = state.cache.snapshot().await;
    state.stats.sample(
        crate::telemetry::resident_memory_bytes().unwrap_or(0),
        limits.queued as u64,
        limits.in_flight as u64,
        cache.hit_rate,
    );
}

/// rustls needs one process-wide crypto provider; ring builds without cmake or NASM.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTP surface. Model routes get the body limit and the request timeout; health,
/// readiness, metrics, admin and the dashboard get neither, so they answer even when
/// upstreams are stuck.
pub fn router(state: Arc<AppState>) -> Router {
    let server = &state.settings.server;
    let model_routes = Router::new()
        .route("/v1/chat/completions", post(api::chat::completions))
        .route("/v1/embeddings", post(api::embeddings::create))
        .layer(DefaultBodyLimit::max(server.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            server.request_timeout,
            request_timeout,
        ));
    Router::new()
        .merge(model_routes)
        .route("/v1/models", get(api::models::list))
        .route("/v1/usage", get(api::usage::mine))
        .merge(operator_routes())
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Routes for operators: on the main port, and alone on `server.admin_listen` if set.
fn operator_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/metrics", get(api::metrics))
        .route("/admin/providers", get(api::admin::providers))
        .route("/admin/limits", get(api::admin::limits))
        .route("/admin/stats", get(api::admin::stats))
        .route("/admin/cache", get(api::admin::cache))
        .route("/admin/cache/clear", post(api::admin::clear_cache))
        .route(
            "/admin/keys",
            get(api::admin::list_keys).post(api::admin::create_key),
        )
        .route(
            "/admin/keys/{id}",
            axum::routing::delete(api::admin::revoke_key),
        )
        .route("/admin/usage", get(api::admin::usage))
        .route("/dashboard", get(api::dashboard::page))
        .route("/dashboard/login", post(api::dashboard::login))
        .route("/dashboard/logout", post(api::dashboard::logout))
        .route("/dashboard/app.js", get(api::dashboard::app_js))
        .route("/dashboard/style.css", get(api::dashboard::style))
}

/// The operator-only router for `server.admin_listen`.
pub fn admin_router(state: Arc<AppState>) -> Router {
    operator_routes()
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Bounds a model request until its response headers; a stream's body is then governed
/// by the provider's stream-idle timeout.
async fn request_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => GatewayError::RequestTimeout(limit.as_millis()).into_response(),
    }
}

/// Takes the client's `x-request-id` (if sane) or assigns one, and returns it.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(REQUEST_ID) {
        Some(v) if v.len() <= 128 && v.to_str().is_ok() => v.clone(),
        _ => {
            let id = new_request_id();
            let value = HeaderValue::try_from(id).unwrap_or(HeaderValue::from_static("-"));
            req.headers_mut().insert(REQUEST_ID, value.clone());
            value
        }
    };
    let mut response = next.run(req).await;
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// A unique id without a syscall: a per-process random prefix and a counter.
fn new_request_id() -> String {
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(rand::random);
    format!(
        "req_{prefix:08x}{:012x}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
