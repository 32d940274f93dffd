//! Rate limits: GCRA (the generic cell rate algorithm — a token bucket kept as one
//! timestamp per key, the "theoretical arrival time") for requests and tokens per minute.
//!
//! In process by default. With `redis.url` set, limits are kept in Redis by one Lua
//! script per check, so every instance shares them exactly: the script checks all of a
//! request's buckets (workspace and credential) and takes from them only if every one
//! allows it, atomically. Redis unreachable (or slower than 50 ms) → the local limiter
//! answers, a warning is logged at most every 10 s and
//! `keel_ratelimit_redis_errors_total` counts it; after an error Redis is skipped for a
//! second, so an outage does not add a timeout to every request. Never a 5xx.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::Digest as _;

/// A bucket's name: what is limited (`kind`) and whose (`id`). Ids are UUIDs, or the
/// first 128 bits of the SHA-256 of text (an email, an address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimitKey {
    kind: Kind,
    id: u128,
}

/// What a bucket limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A workspace's requests.
    WorkspaceRequests,
    /// A credential's (API key or user) requests.
    PrincipalRequests,
    /// A workspace's LLM tokens.
    WorkspaceTokens,
    /// A credential's LLM tokens.
    PrincipalTokens,
    /// A client address's requests to routes without credentials.
    Ip,
    /// Failed logins of one account.
    LoginFailures,
    /// Login attempts from one address.
    LoginIp,
}

impl Kind {
    const fn tag(self) -> &'static str {
        match self {
            Kind::WorkspaceRequests => "ws:rpm",
            Kind::PrincipalRequests => "cred:rpm",
            Kind::WorkspaceTokens => "ws:tpm",
            Kind::PrincipalTokens => "cred:tpm",
            Kind::Ip => "ip:rpm",
            Kind::LoginFailures => "login:fail",
            Kind::LoginIp => "login:ip",
        }
    }

    /// How the limit reads in an error.
    #[must_use]
    pub const fn describe(self) -> &'static str {
        match self {
            Kind::WorkspaceRequests => "the workspace's requests per minute",
            Kind::PrincipalRequests => "this credential's requests per minute",
            Kind::WorkspaceTokens => "the workspace's tokens per minute",
            Kind::PrincipalTokens => "this credential's tokens per minute",
            Kind::Ip => "this address's requests per minute",
            Kind::LoginFailures => "failed logins for this account",
            Kind::LoginIp => "login attempts from this address",
        }
    }
}

impl LimitKey {
    /// A bucket for an id.
    #[must_use]
    pub fn id(kind: Kind, id: uuid::Uuid) -> Self {
        Self {
            kind,
            id: id.as_u128(),
        }
    }

    /// A bucket for a piece of text.
    #[must_use]
    pub fn text(kind: Kind, text: &str) -> Self {
        let digest = sha2::Sha256::digest(text.as_bytes());
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Self {
            kind,
            id: u128::from_be_bytes(first),
        }
    }

    fn redis_key(self) -> String {
        format!("keel:rl:{}:{:032x}", self.kind.tag(), self.id)
    }
}

/// A limit: `limit` units per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units allowed per period (at least 1).
    pub limit: u32,
    /// The period.
    pub period: Duration,
}

impl Rate {
    /// `limit` per minute.
    #[must_use]
    pub const fn per_minute(limit: u32) -> Self {
        Self {
            limit,
            period: Duration::from_secs(60),
        }
    }

    fn period_us(self) -> f64 {
        self.period.as_micros() as f64
    }

    fn interval_us(self) -> f64 {
        self.period_us() / f64::from(self.limit.max(1))
    }
}

/// What a check decided, for the most constrained bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Whether the request may go ahead (and was counted).
    pub allowed: bool,
    /// The most constrained bucket's limit.
    pub limit: u32,
    /// Units left in it.
    pub remaining: u32,
    /// Until it is full again.
    pub reset: Duration,
    /// When refused: how long until the request would be allowed.
    pub retry_after: Duration,
    /// When refused: the bucket that refused.
    pub denied_by: Option<Kind>,
}

impl Decision {
    /// No limit applied.
    pub const UNLIMITED: Decision = Decision {
        allowed: true,
        limit: 0,
        remaining: 0,
        reset: Duration::ZERO,
        retry_after: Duration::ZERO,
        denied_by: None,
    };
}

/// How a check treats its buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Take `cost` from every bucket if all allow it; else take nothing.
    Take,
    /// Say whether `cost` would be allowed; take nothing.
    Peek,
    /// Add `cost` (negative: give back) whatever the buckets hold: settling an estimate.
    Force,
}

/// GCRA over many buckets at once, against theoretical arrival times `tats` (µs; `None`
/// for a bucket never used). Returns the decision and, when it takes, the new tats.
fn gcra(
    now: f64,
    buckets: &[(Rate, Option<f64>)],
    cost: f64,
    mode: Mode,
    kinds: &[Kind],
) -> (Decision, Vec<f64>) {
    let mut allowed = true;
    let mut retry = 0f64;
    let mut denied_by = None;
    let mut worst: Option<(u32, f64, f64)> = None; // (limit, remaining, reset)
    let mut new_tats = Vec::with_capacity(buckets.len());
    for (i, (rate, tat)) in buckets.iter().enumerate() {
        let interval = rate.interval_us();
        let period = rate.period_us();
        let tat = tat.unwrap_or(now).max(now);
        let new_tat = (tat + cost * interval).max(now);
        let allow_at = new_tat - period;
        if mode != Mode::Force && cost > 0.0 && allow_at > now {
            allowed = false;
            if allow_at - now > retry {
                retry = allow_at - now;
                denied_by = kinds.get(i).copied();
            }
        }
        let after = if mode == Mode::Peek { tat } else { new_tat };
        let remaining = ((period - (after - now)) / interval).floor().max(0.0);
        if worst.is_none_or(|(_, r, _)| remaining < r) {
            worst = Some((rate.limit, remaining, after - now));
        }
        new_tats.push(new_tat);
    }
    let (limit, remaining, reset) = worst.unwrap_or((0, 0.0, 0.0));
    let decision = Decision {
        allowed,
        limit,
        remaining: remaining as u32,
        reset: Duration::from_micros(reset.max(0.0) as u64),
        retry_after: Duration::from_micros(retry.ceil() as u64),
        denied_by,
    };
    (decision, new_tats)
}

const SHARDS: usize = 16;
/// Most buckets remembered per shard (160 k in all; a few MB).
const SHARD_CAPACITY: usize = 10_000;

/// The in-process limiter: sharded maps of theoretical arrival times.
#[derive(Debug)]
struct Local {
    epoch: Instant,
    shards: Vec<Mutex<HashMap<LimitKey, f64>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Local {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn shard(&self, key: &LimitKey) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    fn check(&self, buckets: &[(LimitKey, Rate)], cost: i64, mode: Mode) -> Decision {
        let now = self.epoch.elapsed().as_micros() as f64;
        // A request's buckets are few and usually in different shards; they are taken
        // in shard order so two checks never wait on each other in a cycle.
        let mut order: Vec<(usize, usize)> = buckets
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (self.shard(k), i))
            .collect();
        order.sort_unstable();
        let mut guards: Vec<(usize, std::sync::MutexGuard<'_, HashMap<LimitKey, f64>>)> =
            Vec::with_capacity(order.len());
        for (shard, _) in &order {
            if guards.last().is_some_and(|(s, _)| s == shard) {
                continue;
            }
            let guard = self.shards[*shard]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            guards.push((*shard, guard));
        }
        let find = |guards: &Vec<(usize, std::sync::MutexGuard<'_, HashMap<LimitKey, f64>>)>,
                    shard: usize| {
            guards.iter().position(|(s, _)| *s == shard).unwrap_or(0)
        };
        let state: Vec<(Rate, Option<f64>)> = buckets
            .iter()
            .map(|(k, r)| {
                let g = find(&guards, self.shard(k));
                (*r, guards.get(g).and_then(|(_, m)| m.get(k).copied()))
            })
            .collect();
        let kinds: Vec<Kind> = buckets.iter().map(|(k, _)| k.kind).collect();
        let (decision, tats) = gcra(now, &state, cost as f64, mode, &kinds);
        if mode == Mode::Force || (mode == Mode::Take && decision.allowed) {
            for ((k, _), tat) in buckets.iter().zip(tats) {
                let g = find(&guards, self.shard(k));
                if let Some((_, map)) = guards.get_mut(g) {
                    if map.len() >= SHARD_CAPACITY && !map.contains_key(k) {
                        // A bucket whose time has passed is full again: the same as
                        // absent. Dropping them keeps memory bounded at no cost to
                        // accuracy; if none has passed, the fullest live bucket (the
                        // earliest time) is forgotten — it errs towards letting through,
                        // by the least, and a flood of new keys cannot pick which.
                        map.retain(|_, t| *t > now);
                        if map.len() >= SHARD_CAPACITY
                            && let Some(victim) = map
                                .iter()
                                .min_by(|a, b| a.1.total_cmp(b.1))
                                .map(|(k, _)| *k)
                        {
                            map.remove(&victim);
                        }
                    }
                    map.insert(*k, tat);
                }
            }
        }
        decision
    }
}

/// The Lua script: the same GCRA over KEYS, against Redis' own clock (so instances with
/// skewed clocks still agree). ARGV: cost, mode (0 take, 1 peek, 2 force), then per key
/// its limit and period (µs). Returns allowed, limit, remaining, reset µs, retry µs and
/// the 1-based index of the refusing key (0 for none).
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local mode = tonumber(ARGV[2])
local allowed = 1
local retry = 0
local denied = 0
local wl, wr, wreset = 0, nil, 0
local tats = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[1 + 2 * i])
  local period = tonumber(ARGV[2 + 2 * i])
  local interval = period / limit
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  if new_tat < now then new_tat = now end
  local allow_at = new_tat - period
  if mode ~= 2 and cost > 0 and allow_at > now then
    allowed = 0
    if allow_at - now > retry then retry = allow_at - now; denied = i end
  end
  local after = new_tat
  if mode == 1 then after = tat end
  local remaining = math.floor((period - (after - now)) / interval)
  if remaining < 0 then remaining = 0 end
  if wr == nil or remaining < wr then wl = limit; wr = remaining; wreset = after - now end
  tats[i] = new_tat
end
if mode == 2 or (mode == 0 and allowed == 1) then
  for i = 1, #KEYS do
    local ttl = math.ceil((tats[i] - now) / 1000) + 1
    redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', ttl)
  end
end
return {allowed, wl, wr or 0, math.ceil(wreset), math.ceil(retry), denied}
";

/// Longest a Redis check may take before the local limiter answers instead.
const REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// After a Redis error, how long checks stay local before trying Redis again.
const REDIS_BACKOFF: Duration = Duration::from_secs(1);

struct Shared {
    manager: OnceLock<redis::aio::ConnectionManager>,
    script: redis::Script,
    skip_until: Mutex<Option<Instant>>,
    last_warning: Mutex<Option<Instant>>,
}

/// The limiter: Redis-backed when configured and reachable, else in process.
pub struct Limiter {
    local: Local,
    redis: Option<std::sync::Arc<Shared>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// An in-process limiter.
    #[must_use]
    pub fn local() -> Self {
        Self {
            local: Local::new(),
            redis: None,
        }
    }

    /// A limiter shared through Redis at `url`. Connects in the background (retrying
    /// every 2 s until `shutdown`); until connected, limits are local.
    pub fn redis(
        url: &str,
        ca_file: Option<&std::path::Path>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Self, String> {
        let client = keel_llm::cache::redis_client(url, ca_file)?;
        let shared = std::sync::Arc::new(Shared {
            manager: OnceLock::new(),
            script: redis::Script::new(SCRIPT),
            skip_until: Mutex::new(None),
            last_warning: Mutex::new(None),
        });
        let bg = shared.clone();
        tokio::spawn(async move {
            loop {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_connection_timeout(Some(Duration::from_secs(1)));
                let attempt = client.get_connection_manager_with_config(config);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    result = attempt => match result {
                        Ok(manager) => {
                            let _ = bg.manager.set(manager);
                            tracing::info!("rate limits are shared through Redis");
                            return;
                        }
                        Err(e) => {
                            bg.warn(&e.to_string());
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                            }
                        }
                    }
                }
            }
        });
        Ok(Self {
            local: Local::new(),
            redis: Some(shared),
        })
    }

    /// Whether limits are shared through Redis right now.
    #[must_use]
    pub fn shared(&self) -> bool {
        self.redis
            .as_ref()
            .is_some_and(|r| r.manager.get().is_some() && !r.skipping())
    }

    /// Checks (and, per `mode`, takes `cost` from) every bucket, atomically.
    pub async fn check(&self, buckets: &[(LimitKey, Rate)], cost: i64, mode: Mode) -> Decision {
        if buckets.is_empty() {
            return Decision::UNLIMITED;
        }
        if let Some(shared) = &self.redis
            && !shared.skipping()
            && let Some(manager) = shared.manager.get()
        {
            match shared.run(manager.clone(), buckets, cost, mode).await {
                Ok(decision) => return decision,
                Err(e) => {
                    metrics::counter!("keel_ratelimit_redis_errors_total").increment(1);
                    shared.warn(&e);
                    *shared
                        .skip_until
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) =
                        Some(Instant::now() + REDIS_BACKOFF);
                }
            }
        }
        self.local.check(buckets, cost, mode)
    }
}

impl Shared {
    fn skipping(&self) -> bool {
        self.skip_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    fn warn(&self, error: &str) {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(
                error,
                "Redis is unavailable for rate limits: limits are per instance until it is back"
            );
        }
    }

    async fn run(
        &self,
        mut manager: redis::aio::ConnectionManager,
        buckets: &[(LimitKey, Rate)],
        cost: i64,
        mode: Mode,
    ) -> Result<Decision, String> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(cost).arg(match mode {
            Mode::Take => 0,
            Mode::Peek => 1,
            Mode::Force => 2,
        });
        for (key, rate) in buckets {
            invocation.key(key.redis_key());
            invocation
                .arg(rate.limit.max(1))
                .arg(rate.period.as_micros() as u64);
        }
        let call = invocation.invoke_async::<(i64, i64, i64, i64, i64, i64)>(&mut manager);
        let (allowed, limit, remaining, reset, retry, denied) =
            tokio::time::timeout(REDIS_TIMEOUT, call)
                .await
                .map_err(|_| format!("no answer within {} ms", REDIS_TIMEOUT.as_millis()))?
                .map_err(|e| e.to_string())?;
        let micros = |n: i64| Duration::from_micros(u64::try_from(n).unwrap_or(0));
        Ok(Decision {
            allowed: allowed == 1,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset: micros(reset),
            retry_after: micros(retry),
            denied_by: usize::try_from(denied)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| buckets.get(i))
                .map(|(k, _)| k.kind),
        })
    }
}

/// The wall clock in seconds (for `RateLimit-Reset` arithmetic in tests and logs).
#[must_use]
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: Kind) -> LimitKey {
        LimitKey::id(kind, uuid::Uuid::now_v7())
    }

    #[test]
    fn a_bucket_allows_its_limit_then_refuses_with_a_retry_time() {
        let l = Local::new();
        let k = key(Kind::WorkspaceRequests);
        let rate = Rate::per_minute(5);
        for i in 0..5 {
            let d = l.check(&[(k, rate)], 1, Mode::Take);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let d = l.check(&[(k, rate)], 1, Mode::Take);
        assert!(!d.allowed);
        assert_eq!(d.denied_by, Some(Kind::WorkspaceRequests));
        assert!(
            d.retry_after > Duration::from_secs(11) && d.retry_after <= Duration::from_secs(12),
            "{d:?}"
        );
        assert!(d.reset > Duration::from_secs(59), "{d:?}");
    }

    #[test]
    fn a_refusal_takes_nothing_from_any_bucket() {
        let l = Local::new();
        let (ws, cred) = (key(Kind::WorkspaceRequests), key(Kind::PrincipalRequests));
        let roomy = Rate::per_minute(100);
        let tight = Rate::per_minute(1);
        assert!(
            l.check(&[(ws, roomy), (cred, tight)], 1, Mode::Take)
                .allowed
        );
        let d = l.check(&[(ws, roomy), (cred, tight)], 1, Mode::Take);
        assert_eq!(
            (d.allowed, d.denied_by),
            (false, Some(Kind::PrincipalRequests))
        );
        // The workspace bucket lost only the one request that went through.
        let d = l.check(&[(ws, roomy)], 1, Mode::Peek);
        assert_eq!(d.remaining, 99);
    }

    #[test]
    fn peeking_takes_nothing_and_forcing_settles_estimates() {
        let l = Local::new();
        let k = key(Kind::WorkspaceTokens);
        let rate = Rate::per_minute(1000);
        assert!(l.check(&[(k, rate)], 1, Mode::Peek).allowed);
        assert_eq!(l.check(&[(k, rate)], 600, Mode::Take).remaining, 400);
        assert!(
            !l.check(&[(k, rate)], 500, Mode::Take).allowed,
            "600 + 500 > 1000"
        );
        // The request used 100 tokens, not 600: give 500 back.
        l.check(&[(k, rate)], -500, Mode::Force);
        assert_eq!(l.check(&[(k, rate)], 1, Mode::Peek).remaining, 900);
        assert!(l.check(&[(k, rate)], 500, Mode::Take).allowed);
        // Forcing past the limit is allowed (the tokens were already spent)...
        l.check(&[(k, rate)], 2000, Mode::Force);
        // ...and the next request waits for them.
        assert!(!l.check(&[(k, rate)], 1, Mode::Take).allowed);
    }

    #[test]
    fn memory_is_bounded() {
        let l = Local::new();
        for _ in 0..(SHARDS * SHARD_CAPACITY + 5_000) {
            l.check(&[(key(Kind::Ip), Rate::per_minute(10))], 1, Mode::Take);
        }
        let total: usize = l.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= SHARDS * SHARD_CAPACITY, "{total}");
    }

    #[test]
    fn text_keys_are_stable_and_distinct() {
        assert_eq!(
            LimitKey::text(Kind::LoginFailures, "a@b.c"),
            LimitKey::text(Kind::LoginFailures, "a@b.c")
        );
        assert_ne!(
            LimitKey::text(Kind::LoginFailures, "a@b.c"),
            LimitKey::text(Kind::LoginIp, "a@b.c")
        );
        assert_ne!(
            LimitKey::text(Kind::LoginFailures, "a@b.c"),
            LimitKey::text(Kind::LoginFailures, "a@b.d")
        );
    }
}
