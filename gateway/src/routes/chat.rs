//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;

use crate::api_types::ChatRequest;
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::extract::{parse_json, RawJson};
use crate::respond::{generate, Flavor};
use crate::state::SharedState;

/// Chat completion, streaming or not; an upstream model's request is forwarded as sent.
pub async fn chat_completions(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    headers: HeaderMap,
    RawJson(body): RawJson,
) -> Result<Response, ApiError> {
    let upstream = crate::upstream::Endpoint::Chat;
    if let Some(r) = crate::upstream::dispatch(&state, &key, &headers, &body, upstream).await {
        return r;
    }
    let req: ChatRequest = parse_json(&body)?;
    let ChatRequest {
        messages,
        add_generation_prompt,
        mut common,
    } = req;
    let (messages, tools) = crate::tools::take_tools(&mut common.rest, messages)?;
    let index = state.resolve_model_index(common.model.as_deref(), &key)?;
    // Rendering and tokenizing up to the body limit runs off the runtime workers.
    let prompt =
        super::chat_prompt_prepared(&state, index, messages, add_generation_prompt).await?;
    let model = &state.models[index];
    generate(&state, &key, model, prompt, &common, Flavor::Chat, tools).await
}
