//! The Redis side of per-key limits: two Lua scripts, one per phase, each one round trip
//! and atomic. Time comes from the Redis server (`TIME`), so instances with drifting
//! clocks still share one timeline. Keys carry a `{key id}` hash tag so a key's counters
//! sit in one Redis Cluster slot.

use std::sync::Arc;

use redis::aio::ConnectionManager;

use super::{KeyLimits, KeyPolicy, TPM_TOLERANCE};
use crate::error::GatewayError;

/// Checks every limit first and only then charges, so a refusal changes nothing.
/// Returns `{0, 0}` admitted, `{1, ms}` request rate, `{2, ms}` token rate, `{3, used}` budget.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rpm_i = tonumber(ARGV[1])
local rpm_tat = now
if rpm_i > 0 then
  rpm_tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
  local tol = rpm_i * (tonumber(ARGV[2]) - 1)
  if rpm_tat - now > tol then
    return {1, math.ceil((rpm_tat - now - tol) / 1000)}
  end
end
if tonumber(ARGV[3]) > 0 then
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  local tol = tonumber(ARGV[4])
  if tat - now > tol then
    return {2, math.ceil((tat - now - tol) / 1000)}
  end
end
local limit = tonumber(ARGV[5])
local want = tonumber(ARGV[6])
if limit > 0 then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    redis.call('HSET', KEYS[3], 'used', ARGV[7], 'reserved', 0)
    redis.call('PEXPIRE', KEYS[3], ARGV[8])
  end
  local used = tonumber(redis.call('HGET', KEYS[3], 'used') or '0')
  local reserved = tonumber(redis.call('HGET', KEYS[3], 'reserved') or '0')
  if used + reserved + want > limit then
    return {3, used + reserved}
  end
  redis.call('HINCRBY', KEYS[3], 'reserved', want)
end
if rpm_i > 0 then
  local tat = rpm_tat + rpm_i
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return {0, 0}
";

/// Releases the reserve, charges real tokens to the budget and the token rate.
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local per_token = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
if per_token > 0 and tokens > 0 then
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now) + tokens * per_token
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
if tonumber(ARGV[4]) > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'reserved', -tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[2], 'used', tokens)
end
return 0
";

#[derive(Clone)]
pub struct RedisLimits {
    conn: ConnectionManager,
    prefix: Arc<str>,
    reserve: Arc<redis::Script>,
    settle: Arc<redis::Script>,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisLimits {
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<RedisLimits> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(RedisLimits {
            conn,
            prefix: prefix.into(),
            reserve: Arc::new(redis::Script::new(RESERVE)),
            settle: Arc::new(redis::Script::new(SETTLE)),
        })
    }

    fn keys(&self, key_id: &str, period_start: i64) -> [String; 3] {
        let base = format!("{}limits:{{{key_id}}}", self.prefix);
        [
            format!("{base}:rpm"),
            format!("{base}:tpm"),
            format!("{base}:budget:{period_start}"),
        ]
    }

    /// The outer `Result` is Redis failing; the inner one the limit's verdict.
    pub async fn reserve(
        &self,
        key: &KeyLimits,
        reserve: u64,
        now_ms: i64,
    ) -> Result<Result<(), GatewayError>, redis::RedisError> {
        let policy = key.policy;
        let (period_start, period_end) = policy.budget.map_or((0, 0), |(_, p)| p.bounds(now_ms));
        let [rpm_key, tpm_key, budget_key] = self.keys(&key.key_id, period_start);
        let rpm_interval_us = policy.rpm.map_or(0.0, |rpm| 60e6 / f64::from(rpm.max(1)));
        let rpm_burst = policy.rpm.map_or(1, KeyPolicy::rpm_burst);
        let tpm_per_token_us = per_token_us(policy);
        let (limit, period) = policy
            .budget
            .map_or((0, None), |(limit, period)| (limit, Some(period)));
        // The budget hash lives a day past its period so late settles still land.
        let ttl_ms = period_end
            .saturating_sub(now_ms)
            .saturating_add(86_400_000)
            .min(400 * 86_400_000);
        let mut conn = self.conn.clone();
        let (verdict, detail): (i64, i64) = self
            .reserve
            .key(rpm_key)
            .key(tpm_key)
            .key(budget_key)
            .arg(rpm_interval_us)
            .arg(rpm_burst)
            .arg(tpm_per_token_us)
            .arg(TPM_TOLERANCE.as_micros() as u64)
            .arg(limit)
            .arg(reserve.min(1 << 52))
            .arg(key.seed_for(period_start))
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await?;
        let retry_after = |ms: i64| (ms.max(1) as u64).div_ceil(1000);
        Ok(match verdict {
            1 => Err(GatewayError::KeyRateLimited {
                limit: "requests",
                retry_after: retry_after(detail),
            }),
            2 => Err(GatewayError::KeyRateLimited {
                limit: "tokens",
                retry_after: retry_after(detail),
            }),
            3 => Err(GatewayError::BudgetExceeded {
                period: period.map_or("total", |p| p.as_str()),
            }),
            _ => Ok(()),
        })
    }

    pub async fn settle(
        &self,
        key_id: &str,
        policy: KeyPolicy,
        reserved: u64,
        period_start: i64,
        used: u64,
    ) -> Result<(), redis::RedisError> {
        let [_, tpm_key, budget_key] = self.keys(key_id, period_start);
        let mut conn = self.conn.clone();
        let _: i64 = self
            .settle
            .key(tpm_key)
            .key(budget_key)
            .arg(per_token_us(policy))
            .arg(used)
            .arg(reserved)
            .arg(u8::from(policy.budget.is_some()))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

fn per_token_us(policy: KeyPolicy) -> f64 {
    policy.tpm.map_or(0.0, |tpm| {
        TPM_TOLERANCE.as_micros() as f64 / tpm.max(1) as f64
    })
}
