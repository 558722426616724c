//! Per-key limits: requests per minute, tokens per minute, and a token budget per period.
//!
//! A request first *reserves*: the request rate is charged, the token rate must not be in
//! debt, and the budget must hold what the request could cost (its prompt estimate plus
//! its `max_tokens`). When the request ends its [`Reservation`] is *settled* with the real
//! usage: the reserve is released, the real tokens are charged to the budget and to the
//! token rate. Reserve-then-settle is what makes a budget exact under concurrency: 100
//! simultaneous requests against room for 10 admit 10.
//!
//! Limits live in memory by default (the request rate through `governor`) and in Redis
//! when `[redis] url` is set, where one Lua script per phase does every check and update
//! in one round trip, so any number of instances enforce one limit. Both use GCRA. The
//! token rate is GCRA that may run into debt, because a request's tokens are known only
//! after it ran; that is why it is written here rather than taken from `governor`.
//!
//! If Redis fails, requests are admitted (and the failure logged and counted): an outage
//! of the limiter must not become an outage of the gateway.

pub mod period;
mod redis;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter, clock::Clock};
use tokio_util::task::TaskTracker;

use crate::error::GatewayError;
pub use period::BudgetPeriod;

/// The limits of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyPolicy {
    /// Requests per minute, enforced per second (burst of one second's worth), the way
    /// OpenAI quantises its own limits.
    pub rpm: Option<u32>,
    /// Tokens per minute; a minute's worth may be spent at once.
    pub tpm: Option<u64>,
    /// Tokens (in + out) per period.
    pub budget: Option<(u64, BudgetPeriod)>,
}

impl KeyPolicy {
    pub fn is_unlimited(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.budget.is_none()
    }

    fn rpm_burst(rpm: u32) -> u32 {
        rpm.div_ceil(60).max(1)
    }
}

/// How far a key's token rate may run ahead of the clock: a minute's worth of tokens.
const TPM_TOLERANCE: Duration = Duration::from_secs(60);

/// What a caller must know to reserve for a key.
#[derive(Debug, Clone)]
pub struct KeyLimits {
    pub key_id: Arc<str>,
    pub policy: KeyPolicy,
    /// Tokens the usage log held for the budget period starting at `seed_period_start`
    /// when the key was loaded; seeds the counter the first time it is needed.
    pub budget_seed: u64,
    pub seed_period_start: i64,
}

impl KeyLimits {
    /// The seed for the period starting at `period_start`: a seed read in an earlier
    /// period says nothing about this one.
    pub fn seed_for(&self, period_start: i64) -> u64 {
        if self.seed_period_start == period_start {
            self.budget_seed
        } else {
            0
        }
    }
}

/// Reserved capacity, returned by [`Limiter::reserve`] and settled when the request ends.
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<Limiter>,
    key_id: Arc<str>,
    policy: KeyPolicy,
    reserved: u64,
    period_start: i64,
    settled: bool,
}

impl Reservation {
    /// Charges the real usage and releases the reserve. `used` is `None` when the tokens
    /// are unknown (the request failed before the upstream answered: nothing is charged).
    pub fn settle(mut self, used: Option<u64>) {
        self.settled = true;
        self.limiter.settle(&self, used.unwrap_or(0));
    }

    /// Tokens held for this request.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.settled = true;
            self.limiter.settle(self, 0);
        }
    }
}

/// Per-key limiter, in memory or in Redis.
#[derive(Debug)]
pub struct Limiter {
    backend: Backend,
    /// Owns the Redis settle calls that a request's end starts.
    tasks: TaskTracker,
    /// Reservations settled so far (each exactly once).
    settled: AtomicU64,
}

#[derive(Debug)]
enum Backend {
    Memory(Mutex<HashMap<Arc<str>, Arc<MemoryKey>>>),
    Redis(redis::RedisLimits),
}

/// One key's state in memory.
#[derive(Debug)]
struct MemoryKey {
    policy: KeyPolicy,
    rpm: Option<DefaultDirectRateLimiter>,
    state: Mutex<MemoryState>,
}

#[derive(Debug)]
struct MemoryState {
    /// Theoretical arrival time of the token-rate GCRA.
    tpm_tat: Instant,
    period_start: i64,
    used: u64,
    reserved: u64,
}

impl Limiter {
    /// Limits kept in this process.
    pub fn memory(tasks: TaskTracker) -> Arc<Limiter> {
        Arc::new(Limiter {
            backend: Backend::Memory(Mutex::new(HashMap::new())),
            tasks,
            settled: AtomicU64::new(0),
        })
    }

    /// Limits kept in Redis, shared by every instance using it.
    ///
    /// # Errors
    /// When the Redis URL is unusable or Redis cannot be reached.
    pub async fn redis(
        url: &str,
        prefix: &str,
        tasks: TaskTracker,
    ) -> anyhow::Result<Arc<Limiter>> {
        Ok(Arc::new(Limiter {
            backend: Backend::Redis(redis::RedisLimits::connect(url, prefix).await?),
            tasks,
            settled: AtomicU64::new(0),
        }))
    }

    /// `memory` or `redis`.
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Memory(_) => "memory",
            Backend::Redis(_) => "redis",
        }
    }

    /// Checks and charges a request of at most `estimate` tokens.
    ///
    /// # Errors
    /// 429 when the key is over its request or token rate (with `Retry-After`) or its
    /// budget cannot hold the request.
    pub async fn reserve(
        self: &Arc<Self>,
        key: &KeyLimits,
        estimate: u64,
    ) -> Result<Option<Reservation>, GatewayError> {
        let policy = key.policy;
        if policy.is_unlimited() {
            return Ok(None);
        }
        let now_ms = period::now_ms();
        let period_start = policy.budget.map_or(0, |(_, p)| p.bounds(now_ms).0);
        let reserved = if policy.budget.is_some() { estimate } else { 0 };
        match &self.backend {
            Backend::Memory(keys) => self.reserve_memory(keys, key, reserved, now_ms)?,
            Backend::Redis(redis) => {
                let started = Instant::now();
                let outcome = redis.reserve(key, reserved, now_ms).await;
                metrics::histogram!("switchyard_limits_redis_seconds", "op" => "reserve")
                    .record(started.elapsed().as_secs_f64());
                match outcome {
                    Ok(result) => result?,
                    Err(e) => {
                        metrics::counter!("switchyard_limits_errors_total").increment(1);
                        tracing::warn!(error = %e, "limits: Redis unavailable; admitting");
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some(Reservation {
            limiter: self.clone(),
            key_id: key.key_id.clone(),
            policy,
            reserved,
            period_start,
            settled: false,
        }))
    }

    fn reserve_memory(
        &self,
        keys: &Mutex<HashMap<Arc<str>, Arc<MemoryKey>>>,
        key: &KeyLimits,
        reserve: u64,
        now_ms: i64,
    ) -> Result<(), GatewayError> {
        let entry = {
            let mut keys = keys.lock().unwrap_or_else(|e| e.into_inner());
            match keys.get(&key.key_id) {
                Some(entry) if entry.policy == key.policy => entry.clone(),
                _ => {
                    let entry = Arc::new(MemoryKey::new(key, now_ms));
                    keys.insert(key.key_id.clone(), entry.clone());
                    entry
                }
            }
        };
        let mut state = entry.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if entry.policy.tpm.is_some() {
            let ahead = state.tpm_tat.saturating_duration_since(now);
            if ahead > TPM_TOLERANCE {
                return Err(GatewayError::KeyRateLimited {
                    limit: "tokens",
                    retry_after: (ahead - TPM_TOLERANCE).as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        if let Some((limit, period)) = entry.policy.budget {
            let start = period.bounds(now_ms).0;
            if start != state.period_start {
                state.period_start = start;
                state.used = 0;
            }
            if state
                .used
                .saturating_add(state.reserved)
                .saturating_add(reserve)
                > limit
            {
                return Err(GatewayError::BudgetExceeded {
                    period: period.as_str(),
                });
            }
        }
        if let Some(rpm) = &entry.rpm
            && let Err(not_until) = rpm.check()
        {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            return Err(GatewayError::KeyRateLimited {
                limit: "requests",
                retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        state.reserved = state.reserved.saturating_add(reserve);
        Ok(())
    }

    /// Reservations settled since start-up.
    pub fn settlements(&self) -> u64 {
        self.settled.load(Ordering::Relaxed)
    }

    /// A key's budget in this process, as (tokens used this period, tokens reserved);
    /// `None` with limits in Redis or for a key not seen yet.
    pub fn budget_of(&self, key_id: &str) -> Option<(u64, u64)> {
        let Backend::Memory(keys) = &self.backend else {
            return None;
        };
        let entry = keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key_id)
            .cloned()?;
        let state = entry.state.lock().unwrap_or_else(|e| e.into_inner());
        Some((state.used, state.reserved))
    }

    fn settle(&self, reservation: &Reservation, used: u64) {
        self.settled.fetch_add(1, Ordering::Relaxed);
        let policy = reservation.policy;
        if policy.tpm.is_none() && policy.budget.is_none() {
            return;
        }
        match &self.backend {
            Backend::Memory(keys) => {
                let entry = keys
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&reservation.key_id)
                    .cloned();
                let Some(entry) = entry else { return };
                let mut state = entry.state.lock().unwrap_or_else(|e| e.into_inner());
                state.reserved = state.reserved.saturating_sub(reservation.reserved);
                if policy.budget.is_some() && state.period_start == reservation.period_start {
                    state.used = state.used.saturating_add(used);
                }
                if let Some(tpm) = policy.tpm
                    && used > 0
                {
                    let per_token = TPM_TOLERANCE.as_secs_f64() / tpm as f64;
                    let now = Instant::now();
                    let base = state.tpm_tat.max(now);
                    // Capped at a day of debt so absurd upstream usage cannot overflow.
                    let debt = (per_token * used as f64).min(86_400.0);
                    state.tpm_tat = base
                        .checked_add(Duration::from_secs_f64(debt))
                        .unwrap_or(base);
                }
            }
            Backend::Redis(redis) => {
                let redis = redis.clone();
                let key_id = reservation.key_id.clone();
                let (reserved, period_start) = (reservation.reserved, reservation.period_start);
                self.tasks.spawn(async move {
                    if let Err(e) = redis
                        .settle(&key_id, policy, reserved, period_start, used)
                        .await
                    {
                        metrics::counter!("switchyard_limits_errors_total").increment(1);
                        tracing::warn!(error = %e, "limits: settling in Redis failed");
                    }
                });
            }
        }
    }
}

impl MemoryKey {
    fn new(key: &KeyLimits, now_ms: i64) -> MemoryKey {
        let policy = key.policy;
        let rpm = policy.rpm.and_then(NonZeroU32::new).map(|rpm| {
            let burst = NonZeroU32::new(KeyPolicy::rpm_burst(rpm.get())).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_minute(rpm).allow_burst(burst))
        });
        MemoryKey {
            policy,
            rpm,
            state: Mutex::new(MemoryState {
                tpm_tat: Instant::now(),
                period_start: policy.budget.map_or(0, |(_, p)| p.bounds(now_ms).0),
                used: key.seed_for(policy.budget.map_or(0, |(_, p)| p.bounds(now_ms).0)),
                reserved: 0,
            }),
        }
    }
}

/// Tokens a request may cost at most, without tokenising it: the body's bytes / 4 (an
/// over-estimate of its prompt tokens for text), plus the completion allowance.
pub fn estimate_tokens(body_len: usize, max_tokens: Option<u64>, default_reserve: u64) -> u64 {
    // Saturating: a client's absurd `max_tokens` must be refused, never wrap into a small
    // reservation.
    (body_len as u64)
        .div_ceil(4)
        .saturating_add(max_tokens.unwrap_or(default_reserve))
}
