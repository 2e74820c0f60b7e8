//! `GET /v1/models`.

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};
use serde_json::{json, Value};

use crate::auth::ApiKey;
use crate::state::SharedState;

/// Lists the served models this key may use, in OpenAI's format.
pub async fn list_models(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .filter(|m| key.may_use(&m.name, &m.aliases))
        .map(|m| json!({"id": m.name, "object": "model", "created": m.created, "owned_by": "sluice", "max_model_len": m.context_length}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}
