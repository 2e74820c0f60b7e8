//! `POST /v1/chat/completions/render` and `POST /v1/completions/render`, in vLLM's shape:
//! what a generation request would run, its prompt's token ids and its sampling
//! parameters, without running it. Cache-aware routers (vllm-router's `cache_aware`
//! policy) call these to route by the tokens a prompt shares with earlier ones.
//!
//! A render is checked exactly as the generation request would be (model, key, messages,
//! every parameter, the context length, the output constraint: the same `respond::plan`),
//! so a request that renders is one that would be accepted, and one that would be
//! refused gets the same error here.

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};
use serde_json::{json, Value};
use sluice_engine::{EngineError, GenerationRequest};

use crate::api_types::{ChatRequest, CommonParams, CompletionRequest};
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::extract::OpenAiJson;
use crate::respond::{plan, Flavor};
use crate::state::SharedState;

/// vLLM's rendered request: `token_ids` and `sampling_params` as its `/inference/v1/generate`
/// takes them (`features` is null: text only).
fn rendered(
    state: &SharedState,
    model: &str,
    req: &GenerationRequest,
    n: usize,
    params: &CommonParams,
) -> Value {
    let s = &req.sampling;
    let logit_bias: serde_json::Map<String, Value> = s
        .logit_bias
        .iter()
        .map(|(id, b)| (id.to_string(), json!(b)))
        .collect();
    json!({
        "request_id": state.new_id("render"),
        "model": model,
        "token_ids": req.prompt,
        "features": null,
        "sampling_params": {
            "n": n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "repetition_penalty": s.repetition_penalty,
            "logit_bias": logit_bias,
            "seed": s.seed,
            "max_tokens": req.max_tokens,
            "min_tokens": req.min_tokens,
            "stop": req.stop,
            "stop_token_ids": req.stop_token_ids,
            "ignore_eos": req.ignore_eos,
            "logprobs": req.logprobs,
        },
        "stream": params.stream,
    })
}

/// Renders a chat request: one rendered request.
pub async fn render_chat(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    OpenAiJson(req): OpenAiJson<ChatRequest>,
) -> Result<Json<Value>, ApiError> {
    let ChatRequest {
        messages,
        add_generation_prompt,
        mut common,
    } = req;
    let (messages, tools) = crate::tools::take_tools(&mut common.rest, messages)?;
    let tools = tools.filter(|t| t.active());
    let index = state.resolve_model_index(common.model.as_deref(), &key)?;
    let prompt =
        super::chat_prompt_prepared(&state, index, messages, add_generation_prompt).await?;
    let model = &state.models[index];
    let (r, n) = plan(
        &state,
        model,
        prompt,
        &common,
        Flavor::Chat,
        tools.as_deref(),
    )
    .await?;
    Ok(Json(rendered(&state, &model.name, &r, n, &common)))
}

/// Renders a completion request: a list with one rendered request per prompt, as vLLM
/// answers (this server takes one prompt per request).
pub async fn render_completion(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Json<Value>, ApiError> {
    let CompletionRequest { prompt, common } = req;
    let index = state.resolve_model_index(common.model.as_deref(), &key)?;
    let prompt = super::completions::prompt_tokens_prepared(&state, index, prompt).await?;
    let model = &state.models[index];
    // The engine checks token ids at submission; a render never reaches it.
    let vocab = model.tokenizer.vocab_size();
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::InvalidToken(bad).into());
    }
    let (r, n) = plan(&state, model, prompt, &common, Flavor::Completion, None).await?;
    Ok(Json(json!([rendered(&state, &model.name, &r, n, &common)])))
}
