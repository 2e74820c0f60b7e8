//! `GET /health` (alive: every engine's loop runs) and `GET /ready` (serving: engines
//! ready, not draining).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::{EngineState, SharedState};

/// 200 while every engine's loop thread runs (the models are loaded before the listener
/// opens; a restart after a panic is still alive). 503, naming the models, once an
/// engine is down for good: only restarting the process brings it back, which is what a
/// liveness probe is for.
pub async fn health(State(state): State<SharedState>) -> (StatusCode, Json<Value>) {
    let down = state.models_in(EngineState::Down);
    if down.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "engine_down", "models": down})),
        )
    }
}

/// 200 while the server takes requests; 503 once shutdown has begun, so load balancers
/// stop sending traffic while streams in flight finish, while an engine restarts after
/// a failure, and once one is down for good.
pub async fn ready(State(state): State<SharedState>) -> (StatusCode, Json<Value>) {
    let down = state.models_in(EngineState::Down);
    let restarting = state.models_in(EngineState::Restarting);
    let unavailable = |status: &str, models: Vec<&str>| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": status, "models": models})),
        )
    };
    if state.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
    } else if !down.is_empty() {
        unavailable("engine_down", down)
    } else if !restarting.is_empty() {
        unavailable("engine_restarting", restarting)
    } else {
        let mut models: Vec<&str> = state.models.iter().map(|m| m.name.as_str()).collect();
        let ups = &state.upstreams;
        let unreachable = ups.unreachable_models();
        let upstream_names = ups.model_names();
        // A gateway whose every model is an upstream's, none of them reachable, can
        // serve nothing: not ready. Some reachable: ready, naming those that are not
        // (every gateway replica sees the same upstreams, so turning them all unready
        // for one model would cut the others too).
        if models.is_empty()
            && !upstream_names.is_empty()
            && unreachable.len() == upstream_names.len()
        {
            return unavailable("upstreams_unreachable", unreachable);
        }
        models.extend(
            upstream_names
                .iter()
                .map(String::as_str)
                .filter(|m| !unreachable.contains(m)),
        );
        let mut body = json!({"status": "ready", "models": models});
        if !unreachable.is_empty() {
            body["unreachable_models"] = json!(unreachable);
        }
        (StatusCode::OK, Json(body))
    }
}
