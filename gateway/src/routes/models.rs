//! `GET /v1/models`.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::state::SharedState;

/// Lists the served models in OpenAI's format.
pub async fn list_models(State(state): State<SharedState>) -> Json<Value> {
    let m = &state.model;
    Json(json!({
        "object": "list",
        "data": [{"id": m.name, "object": "model", "created": m.created, "owned_by": "sluice", "max_model_len": m.context_length}],
    }))
}
