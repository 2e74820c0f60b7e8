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
    let index = state.resolve_model_index(req.model.as_deref(), &key)?;
    let TokenizeRequest {
        prompt,
        messages,
        add_special_tokens,
        add_generation_prompt,
        ..
    } = req;
    // Tokenizing (and rendering) up to the body limit runs off the runtime workers.
    let tokens = match (prompt, messages) {
        (Some(p), None) => {
            let st = state.clone();
            super::prepare(&state, p.len(), move || {
                st.models[index]
                    .tokenizer
                    .encode(&p, add_special_tokens.unwrap_or(true))
                    .map_err(|e| {
                        ApiError::invalid("prompt", format!("the prompt cannot be tokenized: {e}"))
                    })
            })
            .await?
        }
        (None, Some(m)) => {
            super::chat_prompt_prepared(&state, index, m, add_generation_prompt).await?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of `prompt` or `messages`",
            ))
        }
    };
    let max_model_len = state.models[index].context_length;
    Ok(Json(
        json!({"tokens": tokens, "count": tokens.len(), "max_model_len": max_model_len}),
    ))
}

/// Token ids back to text.
pub async fn detokenize(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    OpenAiJson(req): OpenAiJson<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let index = state.resolve_model_index(req.model.as_deref(), &key)?;
    // Up to the body limit of ids to check and decode: off the runtime workers.
    let st = state.clone();
    let text = super::prepare(&state, req.tokens.len() * 4, move || {
        let tokenizer = &st.models[index].tokenizer;
        let vocab = tokenizer.vocab_size();
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
        Ok(tokenizer.decode(&ids, true))
    })
    .await?;
    Ok(Json(json!({"prompt": text})))
}
