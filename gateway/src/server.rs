//! The HTTP server: routes, layers, and serving on a given listener until shutdown.

use std::future::Future;

use axum::extract::Request;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::auth::require_key;
use crate::error::ApiError;
use crate::routes;
use crate::state::SharedState;

/// Builds the application's router.
pub fn router(state: SharedState) -> Router {
    // Everything that reaches the model (or its vocabulary) needs a key.
    let protected = Router::new()
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/completions", post(routes::completions::completions))
        .route("/v1/models", get(routes::models::list_models))
        .route("/tokenize", post(routes::tokenize::tokenize))
        .route("/detokenize", post(routes::tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(routes::health::health))
        .route("/metrics", get(crate::metrics::metrics))
        .merge(protected)
        .fallback(|req: Request| async move {
            ApiError::RouteNotFound(req.uri().path().to_string()).into_response()
        })
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` resolves, then lets open responses finish.
pub async fn serve(
    listener: TcpListener,
    state: SharedState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
