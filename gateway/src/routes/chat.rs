//! `POST /v1/chat/completions`.

use axum::extract::State;
use axum::response::Response;

use crate::api_types::ChatRequest;
use crate::error::ApiError;
use crate::extract::OpenAiJson;
use crate::generation::build_request;
use crate::respond::{respond, Flavor, ResponseMeta};
use crate::state::{unix_now, SharedState};

/// Chat completion, streaming or not.
pub async fn chat_completions(
    State(state): State<SharedState>,
    OpenAiJson(req): OpenAiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let model = state.resolve_model(req.common.model.as_deref())?;
    let prompt = super::chat_prompt(model, &req.messages, true)?;
    let gen = build_request(&req.common, prompt, model.context_length)?;
    let stream = model.engine.submit(gen)?;
    let meta = ResponseMeta {
        id: state.new_id("chatcmpl"),
        model: model.name.clone(),
        created: unix_now(),
        flavor: Flavor::Chat,
        include_usage: req
            .common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    };
    respond(stream, meta, req.common.stream).await
}
