//! The keys' limits kept in Redis (`[limits] store = "redis"`), shared by every replica
//! that uses the same Redis, with the accounting of the in-memory store.
//!
//! - **Budgets** (requests and tokens per minute) run the in-memory GCRA in one Lua
//!   script (`gcra.lua`), atomically and on the Redis server's clock (`TIME`), so the
//!   replicas' clocks do not matter: one "full at" instant per key and budget, charged on
//!   admission, given back on refusal by a full queue, read without charging for the
//!   `x-ratelimit-*` headers.
//! - **Concurrent streams** are a sorted set per key of stream ids scored by the end of
//!   their lease (`streams.lua`): a stream takes a slot when fewer than the limit are
//!   live, renews its lease every [`RENEW_EVERY`] while it runs and removes itself when
//!   it ends. A replica that dies stops renewing: its streams stop counting when their
//!   lease ([`STREAM_LEASE`]) ends, so nothing leaks for longer. A stream whose entry was
//!   lost (Redis restarted empty) is added back at its next renewal.
//! - Redis keys are named by the SHA-256 of the API key (`{prefix}key:{sha256}:…`),
//!   never by the key itself.
//!
//! **Failures.** No call waits more than [`CALL_TIMEOUT`]. The first failure marks the
//! store down: that is logged once, counted, and until Redis answers again (probed every
//! [`PROBE_EVERY`] in the background; the connection manager reconnects by itself)
//! requests do not wait on Redis at all: `limits.redis_on_error` decides at once whether
//! they are served without their key's limits (`allow`) or refused with 503 (`deny`).
//! The recovery is logged once too. What an outage costs in accuracy, all of it bounded:
//! requests served during it (`allow`) are not counted, nor do their streams hold slots;
//! a refund or a slot's release that fails is lost (a released slot still ends with its
//! lease); a call that timed out on a hung Redis may still be applied when it goes on;
//! a Redis that restarts empty starts every budget full, and live streams count again at
//! their next renewal.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tracing::{info, warn};

use super::{BudgetState, Refusal};
use crate::config::{ConfigError, LimitsConfig, RedisOnError};
use crate::error::ApiError;

/// Longest one call to Redis may take; past it, the request goes on without it.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a stream's slot counts without being renewed (a crashed replica's streams
/// stop counting after it).
pub const STREAM_LEASE: Duration = Duration::from_secs(30);
/// How often a live stream renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// How often Redis is probed while it is down.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// 1 while the Redis limit store answers, 0 while it does not.
pub const STORE_UP: &str = "sluice_limit_store_up";
/// Limit-store operations that got no answer from Redis, by reason.
pub const STORE_ERRORS: &str = "sluice_limit_store_errors_total";

/// Redis could not be asked: `limits.redis_on_error` decides.
#[derive(Debug)]
pub(super) struct Unavailable;

/// The Redis limit store: one reconnecting connection, shared by every key.
#[derive(Clone)]
pub struct RedisStore(Arc<Inner>);

struct Inner {
    conn: ConnectionManager,
    prefix: String,
    on_error: RedisOnError,
    gcra: redis::Script,
    streams: redis::Script,
    /// Whether Redis answered the last call (false: calls skip it until a probe answers).
    up: AtomicBool,
    /// When the current outage began.
    down_since: Mutex<Option<Instant>>,
    /// Names this process's streams: a random prefix and a counter.
    replica: String,
    next_stream: AtomicU64,
}

impl RedisStore {
    /// Connects to the Redis of `limits` (lazily: the server starts while Redis is down,
    /// applying `redis_on_error` until it is back). Fails only on a bad URL.
    pub async fn connect(limits: &LimitsConfig) -> Result<Self, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(vec![m]);
        let url = limits.resolve_redis_url().map_err(invalid)?;
        let client = redis::Client::open(url.as_str())
            .map_err(|e| invalid(format!("the Redis URL is not valid: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| invalid(format!("cannot use the Redis limit store: {e}")))?;
        // The help texts go to the process's recorder: install it first.
        crate::metrics::handle();
        metrics::describe_gauge!(
            STORE_UP,
            "1 while the Redis store of the keys' limits answers, 0 while it does not."
        );
        metrics::describe_counter!(
            STORE_ERRORS,
            "Operations on the Redis store of the keys' limits that got no answer, by reason \
             (error, timeout, or down: skipped during an outage); limits.redis_on_error \
             applied instead."
        );
        let mut replica = [0u8; 8];
        rand::RngCore::fill_bytes(
            &mut <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng(),
            &mut replica,
        );
        let store = RedisStore(Arc::new(Inner {
            conn,
            prefix: limits.redis_key_prefix.clone(),
            on_error: limits.redis_on_error,
            gcra: redis::Script::new(include_str!("gcra.lua")),
            streams: redis::Script::new(include_str!("streams.lua")),
            up: AtomicBool::new(true),
            down_since: Mutex::new(None),
            replica: replica.iter().map(|b| format!("{b:02x}")).collect(),
            next_stream: AtomicU64::new(0),
        }));
        // One check now, so an unreachable Redis is in the logs at start-up.
        let mut c = store.0.conn.clone();
        if store
            .call(
                async move { redis::cmd("PING").query_async::<()>(&mut c).await },
                false,
            )
            .await
            .is_ok()
        {
            gauge!(STORE_UP).set(1.0);
            info!(
                policy = store.0.on_error.as_str(),
                "the keys' limits are counted in Redis, shared by every replica"
            );
        }
        Ok(store)
    }

    /// The names of one key's counts (`key_sha256`: the key's SHA-256, in hex).
    pub(super) fn key(&self, key_sha256: &str) -> SharedKey {
        let base = format!("{}key:{}", self.0.prefix, key_sha256.to_ascii_lowercase());
        SharedKey {
            store: self.clone(),
            requests: format!("{base}:requests").into(),
            tokens: format!("{base}:tokens").into(),
            streams: format!("{base}:streams").into(),
        }
    }

    /// What a request gets when Redis could not be asked: `allowed` (served without the
    /// limit) or 503, as `limits.redis_on_error` says.
    pub(super) fn unavailable<T>(&self, allowed: T) -> Result<T, ApiError> {
        match self.0.on_error {
            RedisOnError::Allow => Ok(allowed),
            RedisOnError::Deny => Err(ApiError::Overloaded(
                "the store of this key's rate limits cannot be reached".into(),
            )),
        }
    }

    /// Runs one call to Redis, bounded by [`CALL_TIMEOUT`]; a request's call is skipped
    /// while Redis is down, a background one (a refund, a lease renewed or given back:
    /// nobody waits on it) is tried anyway. A failure marks the store down.
    async fn call<T>(
        &self,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
        background: bool,
    ) -> Result<T, Unavailable> {
        if !background && !self.0.up.load(Ordering::Acquire) {
            counter!(STORE_ERRORS, "reason" => "down").increment(1);
            return Err(Unavailable);
        }
        match tokio::time::timeout(CALL_TIMEOUT, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.failed("error", &e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.failed(
                    "timeout",
                    &format!("no answer within {} ms", CALL_TIMEOUT.as_millis()),
                );
                Err(Unavailable)
            }
        }
    }

    /// Counts a failed call; the first of an outage logs it and starts probing.
    fn failed(&self, reason: &'static str, error: &str) {
        counter!(STORE_ERRORS, "reason" => reason).increment(1);
        if !self.0.up.swap(false, Ordering::AcqRel) {
            return; // already down: logged once
        }
        *self.0.down_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        gauge!(STORE_UP).set(0.0);
        let effect = match self.0.on_error {
            RedisOnError::Allow => "requests are served without their key's limits",
            RedisOnError::Deny => "requests of keys with limits are refused with 503",
        };
        warn!(
            %error,
            policy = self.0.on_error.as_str(),
            "the Redis store of the keys' limits is unreachable; until it is back, {effect} \
             (limits.redis_on_error)"
        );
        let store = self.clone();
        tokio::spawn(async move { store.probe_until_up().await });
    }

    /// Pings Redis every [`PROBE_EVERY`] until it answers, then marks the store up.
    async fn probe_until_up(self) {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let mut c = self.0.conn.clone();
            let ping = redis::cmd("PING");
            let answer = tokio::time::timeout(CALL_TIMEOUT, ping.query_async::<()>(&mut c));
            if let Ok(Ok(())) = answer.await {
                break;
            }
        }
        let since = self
            .0
            .down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.0.up.store(true, Ordering::Release);
        gauge!(STORE_UP).set(1.0);
        info!(
            down_seconds = since.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            "the Redis store of the keys' limits answers again; limits are shared again"
        );
    }

    /// Runs `gcra.lua` on `key` (a refund in the background).
    async fn gcra(
        &self,
        key: &str,
        per_minute: u32,
        n: u32,
        mode: &str,
    ) -> Result<(bool, BudgetState, Duration), Unavailable> {
        let mut c = self.0.conn.clone();
        let mut inv = self.0.gcra.key(key);
        inv.arg(per_minute).arg(n).arg(mode);
        let reply: Vec<i64> = self
            .call(inv.invoke_async(&mut c), mode == "refund")
            .await?;
        let [taken, remaining, owed_us, wait_us] = reply[..] else {
            self.failed("error", "gcra.lua answered something unexpected");
            return Err(Unavailable);
        };
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        let state = BudgetState {
            limit: per_minute,
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset: us(owed_us),
        };
        Ok((taken == 1, state, us(wait_us)))
    }

    /// Runs `streams.lua` on `key`: whether the stream `id` holds a slot (a renewal in
    /// the background).
    async fn streams(
        &self,
        key: &str,
        mode: &str,
        id: &str,
        limit: u32,
    ) -> Result<bool, Unavailable> {
        let mut c = self.0.conn.clone();
        let mut inv = self.0.streams.key(key);
        inv.arg(mode)
            .arg(id)
            .arg(STREAM_LEASE.as_millis() as u64)
            .arg(limit);
        let held: i64 = self.call(inv.invoke_async(&mut c), mode == "renew").await?;
        Ok(held == 1)
    }
}

/// One key's counts in Redis.
#[derive(Clone)]
pub(super) struct SharedKey {
    store: RedisStore,
    requests: Arc<str>,
    tokens: Arc<str>,
    streams: Arc<str>,
}

/// Which budget of a key.
#[derive(Clone, Copy)]
pub(super) enum Which {
    Requests,
    Tokens,
}

impl SharedKey {
    pub(super) fn store(&self) -> &RedisStore {
        &self.store
    }

    fn name(&self, which: Which) -> &str {
        match which {
            Which::Requests => &self.requests,
            Which::Tokens => &self.tokens,
        }
    }

    /// Takes `n` units (at most `per_minute`) of a budget: its state after, or why not.
    pub(super) async fn take(
        &self,
        which: Which,
        per_minute: u32,
        n: u32,
    ) -> Result<Result<BudgetState, Refusal>, Unavailable> {
        let (taken, state, wait) = self
            .store
            .gcra(self.name(which), per_minute, n, "take")
            .await?;
        Ok(if taken {
            Ok(state)
        } else {
            Err(Refusal::Wait(wait))
        })
    }

    /// A budget's state, charging nothing.
    pub(super) async fn peek(&self, which: Which, per_minute: u32) -> Option<BudgetState> {
        let r = self.store.gcra(self.name(which), per_minute, 0, "peek");
        r.await.ok().map(|(_, state, _)| state)
    }

    /// Gives back `n` units of a budget, in the background (the caller has answered).
    pub(super) fn give_back(&self, which: Which, per_minute: u32, n: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this
                .store
                .gcra(this.name(which), per_minute, n, "refund")
                .await;
        });
    }

    /// Charges `n` units of a budget whether or not there is room, in the background
    /// (a charge settled higher than admission's).
    pub(super) fn debit(&self, which: Which, per_minute: u32, n: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this
                .store
                .gcra(this.name(which), per_minute, n, "debit")
                .await;
        });
    }

    /// A slot among the key's `limit` concurrent streams: the lease, or `None` when all
    /// are taken.
    pub(super) async fn acquire_stream(&self, limit: u32) -> Result<Option<Lease>, Unavailable> {
        let s = &self.store.0;
        let id = format!(
            "{}-{}",
            s.replica,
            s.next_stream.fetch_add(1, Ordering::Relaxed)
        );
        if !self
            .store
            .streams(&self.streams, "acquire", &id, limit)
            .await?
        {
            return Ok(None);
        }
        let this = self.clone();
        let id2 = id.clone();
        let renew = tokio::spawn(async move {
            let mut every = tokio::time::interval(RENEW_EVERY);
            every.tick().await; // the first tick is now: the slot was just taken
            loop {
                every.tick().await;
                let _ = this
                    .store
                    .streams(&this.streams, "renew", &id2, limit)
                    .await;
            }
        });
        Ok(Some(Lease {
            key: self.clone(),
            id,
            renew,
        }))
    }
}

/// A stream's slot in Redis, renewed while held and given back when dropped.
pub(super) struct Lease {
    key: SharedKey,
    id: String,
    renew: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        let (key, id) = (self.key.clone(), std::mem::take(&mut self.id));
        // Outside a runtime (the process is ending) the lease simply runs out.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut c = key.store.0.conn.clone();
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(&*key.streams).arg(&id);
                let _ = key.store.call(cmd.query_async::<()>(&mut c), true).await;
            });
        }
    }
}
