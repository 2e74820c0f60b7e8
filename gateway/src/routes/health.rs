//! `GET /health`: the process is up and its model is loaded.

use axum::Json;
use serde_json::{json, Value};

/// Always 200 once the server answers: the model is loaded before the listener opens.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}
