//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;

use crate::api_types::ChatRequest;
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::extract::OpenAiJson;
use crate::respond::{generate, Flavor};
use crate::state::SharedState;

/// Chat completion, streaming or not.
pub async fn chat_completions(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    OpenAiJson(req): OpenAiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let model = state.resolve_model(req.common.model.as_deref(), &key)?;
    let prompt = super::chat_prompt(model, &req.messages, true)?;
    generate(&state, &key, model, prompt, &req.common, Flavor::Chat).await
}
