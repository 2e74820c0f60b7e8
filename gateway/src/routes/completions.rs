//! `POST /v1/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use serde_json::Value;

use crate::api_types::CompletionRequest;
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::extract::{parse_json, RawJson};
use crate::respond::{generate, Flavor};
use crate::state::{ServedModel, SharedState};

/// A completion prompt as the client sent it.
#[derive(Debug, PartialEq)]
pub enum CompletionPrompt<'a> {
    Text(&'a str),
    Tokens(Vec<u32>),
}

/// Reads `prompt`: a string, a one-string array, or an array of token ids (checked
/// against the vocabulary by the engine).
pub fn completion_prompt(prompt: &Value) -> Result<CompletionPrompt<'_>, ApiError> {
    let text = match prompt {
        Value::String(s) => s.as_str(),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default()
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            return items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| ApiError::invalid("prompt", format!("invalid token id {v}")))
                })
                .collect::<Result<_, _>>()
                .map(CompletionPrompt::Tokens);
        }
        Value::Array(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "only one prompt per request is supported",
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a string or an array of token ids",
            ))
        }
    };
    if text.is_empty() {
        return Err(ApiError::invalid("prompt", "prompt must not be empty"));
    }
    Ok(CompletionPrompt::Text(text))
}

/// The prompt as token ids (tokenizing on the calling thread).
fn prompt_tokens(model: &ServedModel, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    match completion_prompt(prompt)? {
        CompletionPrompt::Tokens(ids) => Ok(ids),
        CompletionPrompt::Text(text) => model.tokenizer.encode(text, true).map_err(|e| {
            ApiError::invalid("prompt", format!("the prompt cannot be tokenized: {e}"))
        }),
    }
}

/// [`prompt_tokens`] for model `index` of `state`: tokenizing up to the body limit runs
/// off the runtime workers.
pub(crate) async fn prompt_tokens_prepared(
    state: &SharedState,
    index: usize,
    prompt: Value,
) -> Result<Vec<u32>, ApiError> {
    let st = state.clone();
    let size = match &prompt {
        Value::String(s) => s.len(),
        Value::Array(items) => items.len() * 4,
        _ => 0,
    };
    super::prepare(state, size, move || {
        prompt_tokens(&st.models[index], &prompt)
    })
    .await
}

/// Plain text completion, streaming or not; an upstream model's request is forwarded as
/// sent.
pub async fn completions(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    headers: HeaderMap,
    RawJson(body): RawJson,
) -> Result<Response, ApiError> {
    let upstream = crate::upstream::Endpoint::Completions;
    if let Some(r) = crate::upstream::dispatch(&state, &key, &headers, &body, upstream).await {
        return r;
    }
    let CompletionRequest { prompt, common } = parse_json(&body)?;
    let index = state.resolve_model_index(common.model.as_deref(), &key)?;
    let prompt = prompt_tokens_prepared(&state, index, prompt).await?;
    let model = &state.models[index];
    generate(
        &state,
        &key,
        model,
        prompt,
        &common,
        Flavor::Completion,
        None,
    )
    .await
}
