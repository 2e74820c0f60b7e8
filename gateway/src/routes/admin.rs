//! `/admin/*`: operator endpoints, for keys with `admin = true` only.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::{Extension, Json};
use serde_json::{json, Value};

use crate::auth::{sha256, ApiKey};
use crate::error::ApiError;
use crate::state::{EngineState, MetricsAccess, ServedModel, SharedState};

/// Middleware: refuses keys without `admin = true` (403). Runs after authentication.
pub async fn require_admin(
    Extension(key): Extension<Arc<ApiKey>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !key.admin {
        return Err(ApiError::AdminOnly);
    }
    Ok(next.run(req).await)
}

/// Middleware for `GET /metrics` with `[metrics] require_key = true`: admits an admin key
/// or the scrape-only key; a missing or unknown key is a 401, another key a 403. Unlike
/// the API's key check it keeps answering while the server drains, so the last scrapes
/// of a shutdown still see it.
pub async fn require_metrics_key(
    State(state): State<SharedState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let MetricsAccess::Key { scrape_key_sha256 } = &state.metrics_access else {
        return Ok(next.run(req).await);
    };
    let key = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::MissingApiKey)?;
    // Constant time, as for API keys: the scrape key is compared by its hash.
    let scrape = scrape_key_sha256
        .is_some_and(|h| bool::from(subtle::ConstantTimeEq::ct_eq(&h[..], &sha256(key)[..])));
    if !scrape {
        match state.auth.find(key) {
            None => return Err(ApiError::InvalidApiKey),
            Some(k) if !k.admin => return Err(ApiError::AdminOnly),
            Some(_) => {}
        }
    }
    Ok(next.run(req).await)
}

/// `GET /admin/models`: each model's engine: what computes it (`backend` and `device`),
/// its state (`ready`, `restarting` or `down` for good), restarts, queue and KV cache.
pub async fn engines(State(state): State<SharedState>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| {
            let s = m.engine.stats();
            let engine_state = m.state();
            let runtime = m.engine.runtime();
            json!({
                "id": m.name,
                "backend": runtime.backend,
                "device": runtime.device,
                "ready": engine_state == EngineState::Ready,
                "state": engine_state.as_str(),
                "restarts": m.engine.restarts(),
                "running": s.running,
                "waiting": m.engine.waiting(),
                "kv_blocks_in_use": s.kv_blocks_in_use,
                "kv_blocks_total": s.kv_blocks_total,
                "kv_blocks_touched": s.kv_blocks_touched,
                "preemptions": s.preemptions,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

fn served(state: &SharedState, model: String) -> Result<&ServedModel, ApiError> {
    state
        .models
        .iter()
        .find(|m| m.name == model || m.aliases.contains(&model))
        .ok_or(ApiError::ModelNotFound(model))
}

/// `POST /admin/models/{model}/inject-stop`: closes the model's engine so that its loop
/// thread finishes what it runs and exits, as when its supervisor gives up: the engine
/// is down for good (`/health` 503). Routed only with `[debug] fault_injection = true`.
pub async fn inject_stop(
    State(state): State<SharedState>,
    Path(model): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let m = served(&state, model)?;
    m.engine.close();
    tracing::warn!(model = %m.name, "engine stopped for good by an admin key");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"injected": "stop", "model": m.name})),
    ))
}

/// `POST /admin/models/{model}/inject-panic`: makes the model's engine loop panic in its
/// next step. Routed only with `[debug] fault_injection = true`.
pub async fn inject_panic(
    State(state): State<SharedState>,
    Path(model): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let m = served(&state, model)?;
    m.engine.inject_panic()?;
    tracing::warn!(model = %m.name, "engine panic injected by an admin key");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"injected": "panic", "model": m.name})),
    ))
}
