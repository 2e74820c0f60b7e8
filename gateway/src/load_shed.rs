//! Load shedding: a cap on requests in flight across all keys. Past it a request gets
//! 503 + Retry-After at once instead of queueing, so a flood cannot pile up connections
//! and memory in front of the engine's own bounded queue. A streaming response holds its
//! place until its body ends.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::error::ApiError;

/// Layer refusing requests beyond `max` in flight.
#[derive(Clone)]
pub struct LoadShedLayer {
    permits: Arc<Semaphore>,
    max: usize,
}

impl LoadShedLayer {
    /// At most `max` requests in flight.
    pub fn new(max: usize) -> Self {
        LoadShedLayer {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
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
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            crate::metrics::refused("concurrency");
            let e = ApiError::Overloaded(format!(
                "{} requests are already in flight (limits.max_concurrent_requests)",
                self.layer.max
            ));
            return Box::pin(async move { Ok(e.into_response()) });
        };
        Box::pin(async move {
            let resp = inner.call(req).await?;
            Ok(crate::body_guard::hold_until_body_ends(resp, permit))
        })
    }
}
