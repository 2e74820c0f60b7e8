//! `GET /health` (alive) and `GET /ready` (serving: models loaded, not draining).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::SharedState;

/// Always 200 once the server answers: the models are loaded before the listener opens.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 while the server takes requests; 503 once shutdown has begun, so load balancers
/// stop sending traffic while streams in flight finish, and while an engine restarts
/// after a failure.
pub async fn ready(State(state): State<SharedState>) -> (StatusCode, Json<Value>) {
    if state.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
    } else if !state.engines_ready() {
        let down: Vec<&str> = state
            .models
            .iter()
            .filter(|m| !m.engine.is_ready())
            .map(|m| m.name.as_str())
            .collect();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "engine_restarting", "models": down})),
        )
    } else {
        let models: Vec<&str> = state.models.iter().map(|m| m.name.as_str()).collect();
        (
            StatusCode::OK,
            Json(json!({"status": "ready", "models": models})),
        )
    }
}
