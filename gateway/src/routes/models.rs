//! `GET /v1/models` and `GET /v1/models/{model}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde_json::{json, Value};

use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::state::{ServedModel, SharedState};

/// A served model as OpenAI's model object (with vLLM's `max_model_len`, and the
/// sampling that requests leaving fields out get).
fn model_object(m: &ServedModel) -> Value {
    json!({"id": m.name, "object": "model", "created": m.created, "owned_by": "sluice",
           "max_model_len": m.context_length, "sampling_defaults": m.sampling})
}

/// Lists the served models this key may use, in OpenAI's format: local ones, then
/// upstreams' (as they list them).
pub async fn list_models(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .filter(|m| key.may_use(&m.name, &m.aliases))
        .map(model_object)
        .chain(state.upstreams.model_objects(&key))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// One served model by its name or an alias (OpenAI's `models.retrieve`): 404 when no
/// model has that name, 403 when this key may not use it, as for generation requests.
pub async fn retrieve_model(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if let Some(m) = state.upstreams.find(&model) {
        if !key.may_use(&m.name, &[]) {
            return Err(ApiError::ModelNotAllowed(m.name.clone()));
        }
        return Ok(Json(m.object.clone()));
    }
    let m = state.resolve_model(Some(&model), &key)?;
    Ok(Json(model_object(m)))
}
