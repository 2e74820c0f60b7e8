//! Per-key limits: requests per minute, tokens per minute and concurrent streams.
//!
//! Requests and tokens use governor's GCRA limiters (a token bucket that refills
//! continuously: a limit of N per minute allows a burst of N, then one more every 60/N s).
//! Token accounting: a request is charged its prompt tokens plus `max_tokens` for every
//! choice when it is accepted, as OpenAI estimates, with no refund for tokens not
//! generated. Concurrent streams are a semaphore whose permit lives as long as the
//! response body.

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::auth::ApiKey;
use crate::config::KeyConfig;
use crate::error::ApiError;

type Gcra = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One per-minute budget (requests or tokens).
struct Budget {
    per_minute: u32,
    limiter: Gcra,
}

/// What a budget says after a successful check, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct BudgetState {
    pub limit: u32,
    pub remaining: u32,
    /// Time until the budget is full again.
    pub reset: Duration,
}

impl Budget {
    fn new(per_minute: u32) -> Option<Self> {
        let n = NonZeroU32::new(per_minute)?;
        Some(Budget {
            per_minute,
            limiter: RateLimiter::direct(Quota::per_minute(n))
                .with_middleware::<StateInformationMiddleware>(),
        })
    }

    /// Takes `n` units, or says how long until they would be available.
    fn take(&self, n: u32, what: &str) -> Result<BudgetState, ApiError> {
        let limited = |wait: Duration| ApiError::RateLimited {
            message: format!(
                "Rate limit reached: {} {what} per minute. Retry in {:.1} s.",
                self.per_minute,
                wait.as_secs_f64()
            ),
            retry_after: wait,
        };
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(self.state(self.per_minute));
        };
        match self.limiter.check_n(n) {
            Ok(Ok(snapshot)) => Ok(self.state(snapshot.remaining_burst_capacity())),
            Ok(Err(not_until)) => Err(limited(
                not_until.wait_time_from(DefaultClock::default().now()),
            )),
            Err(_) => Err(ApiError::InvalidRequest {
                message: format!(
                    "This request needs {n} {what} but the key's limit is {} {what} per minute; \
                     lower max_tokens or n.",
                    self.per_minute
                ),
                param: Some("max_tokens".into()),
            }),
        }
    }

    fn state(&self, remaining: u32) -> BudgetState {
        let per_unit = 60.0 / self.per_minute as f64;
        BudgetState {
            limit: self.per_minute,
            remaining,
            reset: Duration::from_secs_f64(per_unit * (self.per_minute - remaining) as f64),
        }
    }
}

/// The limits of one API key.
pub struct KeyLimits {
    requests: Option<Budget>,
    tokens: Option<Budget>,
    streams: Option<(u32, Arc<Semaphore>)>,
}

/// Held while a request's response is being produced; releases its stream slot on drop.
pub struct StreamSlot(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl KeyLimits {
    /// The limits a `[[keys]]` entry asks for.
    pub fn from_config(k: &KeyConfig) -> Self {
        KeyLimits {
            requests: k.requests_per_minute.and_then(Budget::new),
            tokens: k.tokens_per_minute.and_then(Budget::new),
            streams: k
                .max_concurrent_streams
                .map(|n| (n, Arc::new(Semaphore::new(n as usize)))),
        }
    }

    /// No limits (the development key).
    pub fn unlimited() -> Self {
        KeyLimits {
            requests: None,
            tokens: None,
            streams: None,
        }
    }

    /// Counts one request; refuses it when over the request rate.
    pub fn take_request(&self) -> Result<Option<BudgetState>, ApiError> {
        self.requests
            .as_ref()
            .map(|b| b.take(1, "requests"))
            .transpose()
    }

    /// Charges `n` tokens; refuses when over the token rate.
    pub fn take_tokens(&self, n: usize) -> Result<Option<BudgetState>, ApiError> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.tokens
            .as_ref()
            .map(|b| b.take(n, "tokens"))
            .transpose()
    }

    /// A concurrent-stream slot, or 429 when all are taken.
    pub fn take_stream(&self) -> Result<StreamSlot, ApiError> {
        match &self.streams {
            None => Ok(StreamSlot(None)),
            Some((n, sem)) => sem
                .clone()
                .try_acquire_owned()
                .map(|p| StreamSlot(Some(p)))
                .map_err(|_| ApiError::RateLimited {
                    message: format!(
                        "Too many concurrent requests for this key (limit {n}). Retry when one finishes."
                    ),
                    retry_after: Duration::from_secs(1),
                }),
        }
    }
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
            let requests = match key.limits.take_request() {
                Ok(s) => s,
                Err(e) => {
                    crate::metrics::rate_limited(&key.name, "requests");
                    return Ok(e.into_response());
                }
            };
            let slot = match key.limits.take_stream() {
                Ok(s) => s,
                Err(e) => {
                    crate::metrics::rate_limited(&key.name, "streams");
                    return Ok(e.into_response());
                }
            };
            let mut resp = inner.call(req).await?;
            if let Some(s) = requests {
                set_headers(resp.headers_mut(), "requests", &s);
            }
            // The slot is released when the body ends, not when the handler returns.
            Ok(crate::body_guard::hold_until_body_ends(resp, slot))
        })
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
