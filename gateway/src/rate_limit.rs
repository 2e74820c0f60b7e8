//! Per-key limits: requests per minute, tokens per minute and concurrent streams.
//!
//! Requests and tokens are each a GCRA budget (a token bucket that refills continuously:
//! a limit of N per minute allows a burst of N, then one more every 60/N s), kept as the
//! one instant at which the bucket is full again, so its state can be read without
//! charging it (for the `x-ratelimit-*` headers of a refused request).
//! Token accounting: a request is charged its prompt tokens plus `max_tokens` for every
//! choice when it is accepted, as OpenAI estimates, with no refund for tokens not
//! generated (a request refused after the charge, by a full queue, gets it back). Concurrent streams are a semaphore whose permit lives as long as the
//! response body (or the WebSocket generation).
//!
//! HTTP requests and WebSocket generations go through the same functions here
//! ([`admit`], [`charge_tokens`]), so a limit means the same on both.
//!
//! Where the counts live (`[limits] store`): in this process (the default; each replica
//! counts alone), or in Redis ([`RedisStore`], in `rate_limit/redis_store.rs`), shared
//! by every replica with the same accounting, the same refusals and the same headers.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::auth::ApiKey;
use crate::config::KeyConfig;
use crate::error::ApiError;

mod redis_store;
pub use redis_store::{RedisStore, CALL_TIMEOUT, STORE_ERRORS, STORE_UP, STREAM_LEASE};
use redis_store::{SharedKey, Which};

/// One per-minute budget (requests or tokens).
struct Budget {
    per_minute: u32,
    /// The time one unit takes to come back.
    unit: Duration,
    /// When the bucket is full again (GCRA's theoretical arrival time); in the past
    /// while it is full.
    full_at: Mutex<Instant>,
}

/// What a budget says, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetState {
    /// Units per minute.
    pub limit: u32,
    /// Whole units that could be taken now.
    pub remaining: u32,
    /// Time until the budget is full again.
    pub reset: Duration,
}

/// Why a budget refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Not enough now: the units are back after `wait`.
    Wait(Duration),
    /// More than the whole budget: never possible.
    TooLarge,
}

impl Budget {
    fn new(per_minute: u32) -> Option<Self> {
        (per_minute > 0).then(|| Budget {
            per_minute,
            unit: Duration::from_secs(60) / per_minute,
            full_at: Mutex::new(Instant::now()),
        })
    }

    /// The state when the bucket is full at `full_at`, seen at `now`.
    fn state(&self, full_at: Instant, now: Instant) -> BudgetState {
        let owed = full_at.saturating_duration_since(now);
        // Units still missing, rounded up: a unit is usable only once wholly back.
        let missing = owed.as_nanos().div_ceil(self.unit.as_nanos().max(1));
        BudgetState {
            limit: self.per_minute,
            remaining: u32::try_from(u128::from(self.per_minute).saturating_sub(missing))
                .unwrap_or(0),
            reset: owed,
        }
    }

    /// The state at `now`, charging nothing.
    fn peek(&self, now: Instant) -> BudgetState {
        let full_at = *self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        self.state(full_at, now)
    }

    /// Takes `n` units at `now`, or says why not.
    fn take(&self, n: u32, now: Instant) -> Result<BudgetState, Refusal> {
        if n > self.per_minute {
            return Err(Refusal::TooLarge);
        }
        let mut full_at = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        let owed = full_at.saturating_duration_since(now);
        // Room for `n` units while no more than `per_minute - n` units' time is owed.
        let allowed = self.unit * (self.per_minute - n);
        if owed > allowed {
            return Err(Refusal::Wait(owed - allowed));
        }
        *full_at = (*full_at).max(now) + self.unit * n;
        Ok(self.state(*full_at, now))
    }

    /// Gives back `n` units taken for work that was then refused.
    fn give_back(&self, n: u32) {
        let mut full_at = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        // Earlier than now just means full: `take` starts from now at the latest.
        if let Some(t) = full_at.checked_sub(self.unit * n) {
            *full_at = t;
        }
    }

    /// Takes `n` units whether or not there is room: work already done that cost more
    /// than was charged for it. The budget can then be owed more than a minute.
    fn debit(&self, n: u32, now: Instant) {
        // At most an hour owed: a bound that keeps the instant's arithmetic in range.
        let n = n.min(self.per_minute.saturating_mul(60));
        let mut full_at = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        *full_at = (*full_at).max(now) + self.unit * n;
    }

    /// [`Budget::take`] as the API answers it.
    fn take_or_refuse(&self, n: usize, what: &str) -> Result<BudgetState, ApiError> {
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        self.take(n32, Instant::now())
            .map_err(|r| self.refusal(r, n, what))
    }

    /// Taking `n` units `what` is refused, as the API answers it.
    fn refusal(&self, r: Refusal, n: usize, what: &str) -> ApiError {
        match r {
            Refusal::Wait(wait) => ApiError::RateLimited {
                message: format!(
                    "Rate limit reached: {} {what} per minute. Retry in {:.1} s.",
                    self.per_minute,
                    wait.as_secs_f64()
                ),
                retry_after: wait,
            },
            Refusal::TooLarge => ApiError::InvalidRequest {
                message: format!(
                    "This request needs {n} {what} but the key's limit is {} {what} per minute; \
                     lower max_tokens or n.",
                    self.per_minute
                ),
                param: Some("max_tokens".into()),
            },
        }
    }
}

/// The limits of one API key.
pub struct KeyLimits {
    requests: Option<Budget>,
    tokens: Option<Budget>,
    streams: Option<(u32, Arc<Semaphore>)>,
    /// With `store = "redis"`: the counts, shared by every replica (the budgets and the
    /// semaphore above then only give the limits).
    shared: Option<SharedKey>,
}

/// Held while a request's response is being produced; releases its stream slot on drop.
pub struct StreamSlot(#[allow(dead_code)] Slot);

/// Where a stream slot is held.
enum Slot {
    /// No limit, or none could be taken (Redis unreachable, `redis_on_error = "allow"`).
    Free,
    Local(#[allow(dead_code)] OwnedSemaphorePermit),
    Shared(#[allow(dead_code)] redis_store::Lease),
}

impl KeyLimits {
    /// The limits a `[[keys]]` entry asks for, counted in this process.
    pub fn from_config(k: &KeyConfig) -> Self {
        KeyLimits {
            requests: k.requests_per_minute.and_then(Budget::new),
            tokens: k.tokens_per_minute.and_then(Budget::new),
            streams: k
                .max_concurrent_streams
                .map(|n| (n, Arc::new(Semaphore::new(n as usize)))),
            shared: None,
        }
    }

    /// The limits a `[[keys]]` entry asks for, counted in `store` when given (shared by
    /// every replica; named by the key's SHA-256), else in this process.
    pub fn with_store(k: &KeyConfig, store: Option<&RedisStore>) -> Self {
        let mut limits = KeyLimits::from_config(k);
        limits.shared = store.map(|s| s.key(&k.key_sha256));
        limits
    }

    /// No limits (the development key).
    pub fn unlimited() -> Self {
        KeyLimits {
            requests: None,
            tokens: None,
            streams: None,
            shared: None,
        }
    }

    /// Counts one request in this process's counts; refuses it when over the request
    /// rate. (Requests use [`admit`], which asks the configured store.)
    pub fn take_request(&self) -> Result<Option<BudgetState>, ApiError> {
        self.requests
            .as_ref()
            .map(|b| b.take_or_refuse(1, "requests"))
            .transpose()
    }

    /// Charges `n` tokens to this process's counts; refuses when over the token rate.
    /// (Requests use [`charge_tokens`], which asks the configured store.)
    pub fn take_tokens(&self, n: usize) -> Result<Option<BudgetState>, ApiError> {
        self.tokens
            .as_ref()
            .map(|b| b.take_or_refuse(n, "tokens"))
            .transpose()
    }

    /// Gives back `n` tokens charged for a generation that was then refused (in Redis:
    /// in the background).
    pub fn refund_tokens(&self, n: usize) {
        if let Some(b) = &self.tokens {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            match &self.shared {
                None => b.give_back(n),
                Some(s) => s.give_back(Which::Tokens, b.per_minute, n),
            }
        }
    }

    /// Whether the key has a tokens-per-minute limit.
    pub fn has_token_limit(&self) -> bool {
        self.tokens.is_some()
    }

    /// Settles a generation charged `charged` tokens that turned out to cost `owed`:
    /// gives back the difference or charges it (in Redis: in the background).
    pub fn settle_tokens(&self, charged: usize, owed: usize) {
        let Some(b) = &self.tokens else {
            return;
        };
        if owed <= charged {
            self.refund_tokens(charged - owed);
            return;
        }
        // At most an hour of the budget owed, whatever was reported.
        let n = u32::try_from(owed - charged)
            .unwrap_or(u32::MAX)
            .min(b.per_minute.saturating_mul(60));
        match &self.shared {
            None => b.debit(n, Instant::now()),
            Some(s) => s.debit(Which::Tokens, b.per_minute, n),
        }
    }

    /// A concurrent-stream slot, or 429 when all are taken.
    pub fn take_stream(&self) -> Result<StreamSlot, ApiError> {
        match &self.streams {
            None => Ok(StreamSlot(Slot::Free)),
            Some((n, sem)) => sem
                .clone()
                .try_acquire_owned()
                .map(|p| StreamSlot(Slot::Local(p)))
                .map_err(|_| streams_refusal(*n)),
        }
    }

    /// The request budget now, if the key has one.
    pub fn requests_now(&self) -> Option<BudgetState> {
        self.requests.as_ref().map(|b| b.peek(Instant::now()))
    }

    /// The token budget now, if the key has one.
    pub fn tokens_now(&self) -> Option<BudgetState> {
        self.tokens.as_ref().map(|b| b.peek(Instant::now()))
    }

    /// [`KeyLimits::take_stream`] in whichever store holds the counts.
    async fn acquire_stream(&self) -> Result<StreamSlot, ApiError> {
        match (&self.shared, &self.streams) {
            (Some(s), Some((n, _))) => match s.acquire_stream(*n).await {
                Ok(Some(lease)) => Ok(StreamSlot(Slot::Shared(lease))),
                Ok(None) => Err(streams_refusal(*n)),
                Err(_) => s.store().unavailable(StreamSlot(Slot::Free)),
            },
            _ => self.take_stream(),
        }
    }

    /// Takes `n` units of a budget in whichever store holds the counts.
    async fn take_units(
        &self,
        which: Which,
        n: usize,
        what: &str,
    ) -> Result<Option<BudgetState>, ApiError> {
        let budget = match which {
            Which::Requests => &self.requests,
            Which::Tokens => &self.tokens,
        };
        let (Some(b), Some(s)) = (budget, &self.shared) else {
            return budget
                .as_ref()
                .map(|b| b.take_or_refuse(n, what))
                .transpose();
        };
        // Too large for the whole budget: refused without asking Redis.
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        if n32 > b.per_minute {
            return Err(b.refusal(Refusal::TooLarge, n, what));
        }
        match s.take(which, b.per_minute, n32).await {
            Ok(Ok(state)) => Ok(Some(state)),
            Ok(Err(r)) => Err(b.refusal(r, n, what)),
            Err(_) => s.store().unavailable(None),
        }
    }

    /// A budget's state now, from whichever store holds the counts (none while Redis is
    /// unreachable).
    async fn state_now(&self, which: Which) -> Option<BudgetState> {
        let b = match which {
            Which::Requests => self.requests.as_ref()?,
            Which::Tokens => self.tokens.as_ref()?,
        };
        match &self.shared {
            None => Some(b.peek(Instant::now())),
            Some(s) => s.peek(which, b.per_minute).await,
        }
    }
}

/// The refusal when all `n` of a key's stream slots are taken.
fn streams_refusal(n: u32) -> ApiError {
    ApiError::RateLimited {
        message: format!(
            "Too many concurrent requests for this key (limit {n}). Retry when one finishes."
        ),
        retry_after: Duration::from_secs(1),
    }
}

/// A request its key's limits let through: counted against the request rate, holding
/// one of the key's concurrent-stream slots until dropped.
pub struct Admission {
    /// The request budget after counting this request, if the key has one.
    pub requests: Option<BudgetState>,
    /// The key's concurrent-stream slot, released when dropped.
    pub slot: StreamSlot,
}

/// Admits one request (an HTTP request or a WebSocket generation) under `key`'s
/// request rate and concurrent streams, counting a refusal in the metrics.
pub async fn admit(key: &ApiKey) -> Result<Admission, ApiError> {
    // The slot first: a request refused for want of one spends no request budget (a
    // slot taken for a request the rate then refuses is released at once).
    let slot = key.limits.acquire_stream().await.inspect_err(|e| {
        if matches!(e, ApiError::RateLimited { .. }) {
            crate::metrics::rate_limited(&key.name, "streams");
        }
    })?;
    let requests = key
        .limits
        .take_units(Which::Requests, 1, "requests")
        .await
        .inspect_err(|e| {
            if matches!(e, ApiError::RateLimited { .. }) {
                crate::metrics::rate_limited(&key.name, "requests");
            }
        })?;
    Ok(Admission { requests, slot })
}

/// Charges a generation's `n` tokens to `key` (prompt plus `max_tokens` per choice),
/// counting a refusal in the metrics.
pub async fn charge_tokens(key: &ApiKey, n: usize) -> Result<Option<BudgetState>, ApiError> {
    key.limits
        .take_units(Which::Tokens, n, "tokens")
        .await
        .inspect_err(|e| {
            if matches!(e, ApiError::RateLimited { .. }) {
                crate::metrics::rate_limited(&key.name, "tokens");
            }
        })
}

/// Layer that applies the caller's key limits (after [`crate::auth::ApiKeyLayer`]): it
/// counts the request against the key's request rate, holds one of its stream slots for
/// as long as the response body lives, and adds the `x-ratelimit-*-requests` headers.
/// Token limits are charged by the generation handlers, which know the prompt's length.
#[derive(Clone, Default)]
pub struct RateLimitLayer;

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService { inner }
    }
}

/// The service [`RateLimitLayer`] wraps around a route.
#[derive(Clone)]
pub struct RateLimitService<S> {
    inner: S,
}

impl<S> Service<Request> for RateLimitService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(key) = req.extensions().get::<Arc<ApiKey>>().cloned() else {
            // Only reachable if the layers were composed wrongly: refuse, do not serve.
            return Box::pin(async {
                Ok(
                    ApiError::Internal("rate limiting without an identified key".into())
                        .into_response(),
                )
            });
        };
        Box::pin(async move {
            let admission = match admit(&key).await {
                Ok(a) => a,
                Err(e) => {
                    // A refusal carries the headers too, as OpenAI's 429s do: what is left
                    // of each budget the key has (nothing, for the one that refused).
                    let mut resp = e.into_response();
                    set_key_headers(&key, resp.headers_mut(), None).await;
                    return Ok(resp);
                }
            };
            let mut resp = inner.call(req).await?;
            set_key_headers(&key, resp.headers_mut(), admission.requests).await;
            // The slot is released when the body ends, not when the handler returns.
            Ok(crate::body_guard::hold_until_body_ends(
                resp,
                admission.slot,
            ))
        })
    }
}

/// Writes the `x-ratelimit-*` headers for every budget `key` has: the request budget as
/// `requests` says (after counting this request) or as it is now, and the token budget
/// as the handler left it (after charging this request) or as it is now.
async fn set_key_headers(key: &ApiKey, h: &mut HeaderMap, requests: Option<BudgetState>) {
    let requests = match requests {
        Some(s) => Some(s),
        None => key.limits.state_now(Which::Requests).await,
    };
    if let Some(s) = requests {
        set_headers(h, "requests", &s);
    }
    if !h.contains_key("x-ratelimit-limit-tokens") {
        if let Some(s) = key.limits.state_now(Which::Tokens).await {
            set_headers(h, "tokens", &s);
        }
    }
}

/// Writes OpenAI's `x-ratelimit-*-{kind}` headers.
pub fn set_headers(h: &mut HeaderMap, kind: &str, s: &BudgetState) {
    let reset = format!("{:.3}s", s.reset.as_secs_f64());
    for (name, v) in [
        (format!("x-ratelimit-limit-{kind}"), s.limit.to_string()),
        (
            format!("x-ratelimit-remaining-{kind}"),
            s.remaining.to_string(),
        ),
        (format!("x-ratelimit-reset-{kind}"), reset),
    ] {
        if let (Ok(n), Ok(v)) = (
            axum::http::HeaderName::try_from(name),
            HeaderValue::try_from(v),
        ) {
            h.insert(n, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rpm: Option<u32>, tpm: Option<u32>, streams: Option<u32>) -> KeyLimits {
        KeyLimits::from_config(&KeyConfig {
            name: "t".into(),
            key_sha256: String::new(),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_concurrent_streams: streams,
            models: None,
            admin: false,
        })
    }

    #[test]
    fn settling_gives_back_or_charges_the_difference() {
        let k = key(None, Some(600), None); // ten tokens a second
        assert_eq!(k.take_tokens(100).unwrap().unwrap().remaining, 500);
        // Cost 40 rather than 100: 60 back.
        k.settle_tokens(100, 40);
        assert!(k.tokens_now().unwrap().remaining >= 560);
        // Cost 1000 rather than 40: the key owes it, past its minute's budget.
        k.settle_tokens(40, 1000);
        let now = k.tokens_now().unwrap();
        assert_eq!(now.remaining, 0);
        assert!(now.reset > Duration::from_secs(60), "{now:?}");
        assert!(matches!(
            k.take_tokens(1),
            Err(ApiError::RateLimited { .. })
        ));
        // Owing is bounded (an hour of budget), whatever the difference.
        k.settle_tokens(0, usize::MAX);
        assert!(k.tokens_now().unwrap().reset <= Duration::from_secs(3700));
    }

    #[test]
    fn requests_are_refused_past_the_burst_with_a_wait() {
        let k = key(Some(3), None, None);
        let states: Vec<_> = (0..3).map(|_| k.take_request().unwrap().unwrap()).collect();
        assert_eq!(
            states.iter().map(|s| s.remaining).collect::<Vec<_>>(),
            vec![2, 1, 0]
        );
        assert!(states[2].reset > Duration::from_secs(59));
        match k.take_request() {
            Err(ApiError::RateLimited { retry_after, .. }) => {
                assert!(
                    retry_after > Duration::from_secs(15) && retry_after <= Duration::from_secs(20)
                )
            }
            other => panic!("expected 429, got {other:?}"),
        }
        assert_eq!(k.requests_now().unwrap().remaining, 0);
    }

    #[test]
    fn a_budget_refills_one_unit_per_interval_and_reads_without_charging() {
        let b = Budget::new(60).unwrap(); // one unit a second
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        assert_eq!(b.peek(t0).remaining, 60);
        assert_eq!(b.take(60, t0).unwrap().remaining, 0);
        assert_eq!(b.peek(t0), b.peek(t0), "reading charges nothing");
        assert_eq!(
            b.take(1, s(0.5)),
            Err(Refusal::Wait(Duration::from_millis(500)))
        );
        // Half a unit back is not a unit: still nothing left, and a minute to full.
        let st = b.peek(s(0.5));
        assert_eq!((st.remaining, st.reset), (0, Duration::from_millis(59_500)));
        assert_eq!(b.take(1, s(1.0)).unwrap().remaining, 0);
        assert_eq!(b.peek(s(11.0)).remaining, 10);
        assert_eq!(
            b.take(11, s(11.0)),
            Err(Refusal::Wait(Duration::from_secs(1)))
        );
        assert_eq!(b.take(10, s(11.0)).unwrap().remaining, 0);
        assert_eq!(b.peek(s(200.0)).remaining, 60, "full again, and no further");
        assert_eq!(b.peek(s(200.0)).reset, Duration::ZERO);
        assert_eq!(b.take(61, s(200.0)), Err(Refusal::TooLarge));
    }

    #[test]
    fn tokens_are_charged_in_bulk_and_oversized_requests_are_400() {
        let k = key(None, Some(100), None);
        assert_eq!(k.take_tokens(60).unwrap().unwrap().remaining, 40);
        assert!(matches!(
            k.take_tokens(60),
            Err(ApiError::RateLimited { .. })
        ));
        assert!(matches!(
            k.take_tokens(101),
            Err(ApiError::InvalidRequest { .. })
        ));
        assert!(k.take_request().unwrap().is_none(), "no request limit set");
        assert_eq!(k.tokens_now().unwrap().remaining, 40);
        // A generation refused after its charge (a full queue) gets it back.
        k.refund_tokens(60);
        assert_eq!(k.tokens_now().unwrap().remaining, 100);
        assert_eq!(k.take_tokens(100).unwrap().unwrap().remaining, 0);
    }

    #[test]
    fn stream_slots_come_back_when_dropped() {
        let k = key(None, None, Some(1));
        let slot = k.take_stream().unwrap();
        assert!(matches!(k.take_stream(), Err(ApiError::RateLimited { .. })));
        drop(slot);
        assert!(k.take_stream().is_ok());
    }
}
