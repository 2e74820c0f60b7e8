//! Load shedding: a cap on requests in flight across all keys. Past it a request gets
//! 503 + Retry-After at once instead of queueing, so a flood cannot pile up connections
//! and memory in front of the engine's own bounded queue. A streaming response holds its
//! place until its body ends, a WebSocket generation until it ends.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::error::ApiError;

/// The server-wide bound on requests in flight (`limits.max_concurrent_requests`),
/// shared by the HTTP routes (through [`LoadShedLayer`]) and WebSocket generations, so
/// that both count against the same places.
#[derive(Clone)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    max: usize,
}

impl InFlight {
    /// At most `max` requests in flight.
    pub fn new(max: usize) -> Self {
        InFlight {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A place in flight, held until dropped; a 503 (counted in the metrics) when every
    /// place is taken.
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            crate::metrics::refused("concurrency");
            ApiError::Overloaded(format!(
                "{} requests are already in flight (limits.max_concurrent_requests)",
                self.max
            ))
        })
    }
}

/// Layer refusing requests beyond the [`InFlight`] bound.
#[derive(Clone)]
pub struct LoadShedLayer {
    in_flight: InFlight,
}

impl LoadShedLayer {
    /// Sheds requests beyond `in_flight`'s bound.
    pub fn new(in_flight: InFlight) -> Self {
        LoadShedLayer { in_flight }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShedService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`LoadShedLayer`] wraps around a route.
#[derive(Clone)]
pub struct LoadShedService<S> {
    inner: S,
    layer: LoadShedLayer,
}

impl<S> Service<Request> for LoadShedService<S>
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
        let permit = match self.layer.in_flight.enter() {
            Ok(p) => p,
            Err(e) => return Box::pin(async move { Ok(e.into_response()) }),
        };
        Box::pin(async move {
            let resp = inner.call(req).await?;
            Ok(crate::body_guard::hold_until_body_ends(resp, permit))
        })
    }
}
