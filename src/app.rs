//! The application: build shared state and the router, bind, serve, drain on shutdown.
//!
//! Everything expensive (HTTP clients, the model table, the `/v1/models` body) is built
//! here once. Background work (provider warm-up, the in-process simulated provider) is
//! owned by a [`TaskTracker`] that shutdown cancels and waits for.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use switchyard_loadlab::mock::MockServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::AdmissionQueue;
use crate::api;
use crate::auth::Authenticator;
use crate::cache::ResponseCache;
use crate::config::AuthMode;
use crate::config::{ProviderConfig, Settings};
use crate::conversations::Conversations;
use crate::inference::{Inference, InferenceParts};
use crate::limits::Limiter;
use crate::microbatch::EmbeddingBatcher;
use crate::providers::Provider;
use crate::routing::ModelTable;
use crate::state::{AppState, Catalog, Lifecycle};
use crate::store::Store;
use crate::tokens::TokenBudgets;

pub use crate::api::REQUEST_ID;
pub use crate::api::router::{admin_router, router};
pub use crate::providers::install_crypto;

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
            let base_url = match config {
                ProviderConfig::Simulated(sim) => {
                    let mock = MockServer::start(
                        SocketAddr::from(([127, 0, 0, 1], 0)),
                        sim.simulation.clone(),
                    )
                    .await
                    .context("starting the simulated provider")?;
                    let url = mock.base_url();
                    simulated.push(mock);
                    url
                }
                _ => config.base_url().unwrap_or_default().to_string(),
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
        let inference = Arc::new(Inference::new(InferenceParts {
            models,
            admission,
            cache,
            batchers,
            limits,
            usage,
            tasks: tasks.clone(),
            request_timeout: settings.server.request_timeout,
            completion_reserve: settings.auth.default_completion_reserve,
        }));
        let budgets = Arc::new(TokenBudgets::from_settings(&settings));
        let tools = Arc::new(
            crate::tools::Tools::from_settings(&settings)
                .context("building the tools' HTTP client")?,
        );
        let server_tools = settings
            .models
            .iter()
            .filter(|(_, model)| !model.tools.is_empty())
            .map(|(alias, model)| (alias.clone(), model.tools.clone()))
            .collect();
        let memory_aliases = settings
            .models
            .iter()
            .filter(|(_, model)| model.memory)
            .map(|(alias, _)| alias.clone())
            .collect();
        let memory = crate::memory::Memory::new(
            settings.memory.clone(),
            memory_aliases,
            store.clone(),
            tasks.clone(),
            inference.clone(),
        );
        let files = Arc::new(crate::files::FileStore::open(&settings.files).with_context(
            || match &settings.files.s3 {
                Some(s3) => format!("opening the files bucket {}", s3.bucket),
                None => format!(
                    "opening the files directory {}",
                    settings.files.dir.display()
                ),
            },
        )?);
        let fanout = crate::fanout::Fanout::start(
            &store,
            settings.database.schema.as_deref(),
            settings.redis.as_ref(),
            settings.server.websocket_send_buffer,
            &tasks,
            &cancel,
        )
        .context("starting the event fan-out")?;
        let conversations = Arc::new(Conversations::new(
            store.clone(),
            inference.clone(),
            budgets.clone(),
            tools.clone(),
            server_tools,
            tasks.clone(),
            memory.clone(),
            files.clone(),
            settings.server.max_body_bytes as u64,
            fanout.clone(),
        ));
        let jobs = crate::jobs::Jobs::new(settings.jobs.clone());
        let state = Arc::new(AppState {
            settings,
            memory,
            jobs,
            files,
            fanout,
            tools,
            inference,
            conversations,
            budgets,
            providers,
            store,
            auth,
            // Ten guesses a minute per address: plenty for a person, useless for a guesser.
            sign_in: crate::auth::SignInThrottle::new(10),
            catalog: Catalog {
                json: models_json,
                created,
            },
            stats: Arc::new(crate::telemetry::stats::LiveStats::default()),
            lifecycle: Lifecycle::new(tasks),
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
        let tasks = state.lifecycle.tasks.clone();
        let warm_state = state.clone();
        let warm_cancel = cancel.clone();
        // Tokenizer vocabularies load off the runtime (tens of milliseconds each), beside
        // the providers' warm-up; `/ready` waits for both.
        let tokenizers = state.conversations.tokenizers();
        let vocabularies = tasks.spawn_blocking(move || {
            for kind in tokenizers {
                crate::tokens::warm_up(kind);
            }
        });
        tasks.spawn(async move {
            let warm =
                futures_util::future::join_all(warm_state.providers.values().map(|p| p.warm()));
            tokio::select! {
                _ = futures_util::future::join(warm, vocabularies) => warm_state.lifecycle.set_warmed(),
                _ = warm_cancel.cancelled() => {}
            }
        });
        state.store.spawn_health_check(&tasks, cancel.clone());
        state.store.spawn_checkpointer(&tasks, cancel.clone());
        crate::memory::extract::start(state.clone(), cancel.clone());
        crate::memory::embed::start(state.clone(), cancel.clone());
        crate::jobs::start(state.clone(), cancel.clone());
        crate::telemetry::stats::spawn_sampler(
            state.stats.clone(),
            state.inference.clone(),
            state.settings.server.stats_interval,
            state.settings.server.metrics,
            &tasks,
            cancel.clone(),
        );

        if let Some((admin_listener, admin_addr)) = admin {
            let admin_cancel = cancel.clone();
            let app = admin_router(state.clone());
            tracing::info!(%admin_addr, "operator listener (metrics, admin, dashboard)");
            let limits = crate::listener::Limits::of(&state.settings);
            tasks.spawn(async move {
                crate::listener::serve(admin_listener, app, limits, async move {
                    admin_cancel.cancelled().await;
                })
                .await;
            });
        }

        let router = router(state.clone());
        tracing::info!(%addr, models = state.inference.models().iter().count(), "switchyard listening");

        let grace = state.settings.server.shutdown_grace;
        let drain_state = state.clone();
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            drain_state.lifecycle.set_draining();
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: draining in-flight requests"
            );
            let _ = draining_tx.send(());
        };
        let limits = crate::listener::Limits::of(&state.settings);
        let server = crate::listener::serve(listener, router, limits, signal);
        let mut server = std::pin::pin!(server);
        let result = tokio::select! {
            () = &mut server => Ok(()),
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
        // MCP servers' child processes end with the gateway, not after it.
        let _ = tokio::time::timeout(Duration::from_secs(5), state.tools.shutdown()).await;
        state.store.close().await;
        for mock in simulated {
            let _ = tokio::time::timeout(Duration::from_secs(1), mock.shutdown()).await;
        }
        tracing::info!("switchyard stopped");
        result
    }
}
