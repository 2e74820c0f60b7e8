//! `POST /tokenize` and `POST /detokenize`, as vLLM serves them.

use std::sync::Arc;

use axum::extract::State;
use axum::Extension;
use axum::Json;
use serde_json::{json, Value};

use crate::api_types::{DetokenizeRequest, TokenizeRequest};
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::extract::OpenAiJson;
use crate::state::SharedState;

/// Text or chat messages to token ids.
pub async fn tokenize(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    OpenAiJson(req): OpenAiJson<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let model = state.resolve_model(req.model.as_deref(), &key)?;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(p), None) => model
            .tokenizer
            .encode(p, req.add_special_tokens.unwrap_or(true))
            .map_err(|e| {
                ApiError::invalid("prompt", format!("the prompt cannot be tokenized: {e}"))
            })?,
        (None, Some(m)) => super::chat_prompt(model, m, req.add_generation_prompt)?,
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of `prompt` or `messages`",
            ))
        }
    };
    Ok(Json(
        json!({"tokens": tokens, "count": tokens.len(), "max_model_len": model.context_length}),
    ))
}

/// Token ids back to text.
pub async fn detokenize(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    OpenAiJson(req): OpenAiJson<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let model = state.resolve_model(req.model.as_deref(), &key)?;
    let vocab = model.tokenizer.vocab_size();
    let ids = req
        .tokens
        .iter()
        .map(|&t| {
            u32::try_from(t)
                .ok()
                .filter(|&t| (t as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tokens",
                        format!("token id {t} is outside the vocabulary (0..{vocab})"),
                    )
                })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    Ok(Json(json!({"prompt": model.tokenizer.decode(&ids, true)})))
}
