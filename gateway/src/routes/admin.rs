//! `/admin/*`: operator endpoints, for keys with `admin = true` only.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::{Extension, Json};
use serde_json::{json, Value};

use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::state::SharedState;

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

/// `GET /admin/models`: each model's engine: readiness, restarts, queue and KV cache.
pub async fn engines(State(state): State<SharedState>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| {
            let s = m.engine.stats();
            json!({
                "id": m.name,
                "ready": m.engine.is_ready(),
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

/// `POST /admin/models/{model}/inject-panic`: makes the model's engine loop panic in its
/// next step. Routed only with `[debug] fault_injection = true`.
pub async fn inject_panic(
    State(state): State<SharedState>,
    Path(model): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let m = state
        .models
        .iter()
        .find(|m| m.name == model || m.aliases.contains(&model))
        .ok_or(ApiError::ModelNotFound(model))?;
    m.engine.inject_panic()?;
    tracing::warn!(model = %m.name, "engine panic injected by an admin key");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"injected": "panic", "model": m.name})),
    ))
}
