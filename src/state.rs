//! The state every request shares, grouped by what it is for.
//!
//! Built once by [`crate::app::App::build`]; handlers receive it as `State<Arc<AppState>>`.
//! Model calls go through [`AppState::inference`] and nothing else: the HTTP layer holds no
//! queue, cache or limiter of its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, SignInThrottle};
use crate::config::Settings;
use crate::conversations::Conversations;
use crate::inference::Inference;
use crate::providers::Provider;
use crate::store::Store;
use crate::telemetry::stats::LiveStats;
use crate::tokens::TokenBudgets;

/// State shared by every request.
pub struct AppState {
    pub settings: Arc<Settings>,
    /// Every model call: limits, cache and coalescing, admission, routing, metering.
    pub inference: Arc<Inference>,
    /// The Responses API's turns and the conversations they keep.
    pub conversations: Arc<Conversations>,
    /// Long-term memory: the memories of each key's users and their search indexes.
    pub memory: Arc<crate::memory::Memory>,
    /// Background jobs (responses created with `background: true`).
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Uploaded files' bytes (their rows are in the store).
    pub files: Arc<crate::files::FileStore>,
    /// `/v1/events`: conversation events to their subscribers, across instances.
    pub fanout: Arc<crate::fanout::Fanout>,
    /// The operator's HTTP tools.
    pub tools: Arc<crate::tools::Tools>,
    /// Every alias's token budget (window, output reserve, tokenizer, pre-flight).
    pub budgets: Arc<TokenBudgets>,
    /// The configured upstreams, by name (their pools and counters).
    pub providers: BTreeMap<String, Arc<Provider>>,
    /// Keys and the usage log.
    pub store: Store,
    pub auth: Authenticator,
    /// Dashboard sign-in attempts per client address.
    pub sign_in: SignInThrottle,
    /// `/v1/models`, rendered once.
    pub catalog: Catalog,
    /// Percentiles and the timeline for `/admin/stats` and the dashboard.
    pub stats: Arc<LiveStats>,
    pub lifecycle: Lifecycle,
}

/// The model list, rendered once at start-up.
pub struct Catalog {
    pub json: Bytes,
    /// The `created` stamp of every entry.
    pub created: u64,
}

/// Start-up, background work and shutdown.
pub struct Lifecycle {
    /// Background work owned by the app (warm-up, coalesced upstream calls, the usage
    /// writer); shutdown waits for it.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown begins: long-lived connections (WebSockets) close.
    pub closing: tokio_util::sync::CancellationToken,
    /// Set when warm-up finished; `/ready` waits for it.
    warmed: AtomicBool,
    /// Set when shutdown began; `/ready` turns 503 so load balancers move away.
    draining: AtomicBool,
}

impl Lifecycle {
    pub fn new(tasks: TaskTracker) -> Lifecycle {
        Lifecycle {
            tasks,
            closing: tokio_util::sync::CancellationToken::new(),
            warmed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_warmed(&self) -> bool {
        self.warmed.load(Ordering::Relaxed)
    }

    pub fn set_warmed(&self) {
        self.warmed.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.closing.cancel();
    }
}
