//! HTTP handlers, one file per API area.

pub mod admin;
pub mod chat;
pub mod completions;
pub mod health;
pub mod models;
pub mod page;
pub mod render;
pub mod responses;
pub mod tokenize;
pub mod ws;

use std::sync::Arc;

use serde_json::Value;
use sluice_engine::text::chat_template::ChatMessage;
use tokio::sync::Semaphore;

use crate::api_types::InMessage;
use crate::error::ApiError;
use crate::state::{AppState, ServedModel, SharedState};

/// Inputs at least this large (bytes of text, or of token ids) make a "large"
/// preparation job. Tokenizing holds some 150 bytes of memory per byte of text while it
/// runs (measured: 600 MB at the peak for a 4 MiB prompt of varied words, 8 s on a busy
/// 2-core machine), so below this a job needs at most a few MB and tens of ms.
pub const LARGE_PREPARATION_BYTES: usize = 16 << 10;
/// Small jobs that may run at once: bounds their threads and memory (~64 × 2.5 MB).
const SMALL_JOBS: usize = 64;
/// Large jobs that may run at once: one per core (the work is CPU-bound), at most 4, which
/// bounds their memory to ~2.4 GB with the default 4 MiB body limit.
const MAX_LARGE_JOBS: usize = 4;

/// The permits of request preparation, in two classes so that a few huge prompts never
/// hold up ordinary requests.
pub struct Preparation {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl Preparation {
    /// Permits sized for this machine's cores.
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Preparation {
            small: Arc::new(Semaphore::new(SMALL_JOBS)),
            large: Arc::new(Semaphore::new(cores.min(MAX_LARGE_JOBS))),
        }
    }
}

impl Default for Preparation {
    fn default() -> Self {
        Preparation::new()
    }
}

/// Runs `f`, request preparation whose cost grows with the body (chat-template
/// rendering, tokenizing up to `limits.max_body_bytes` of text, decoding token ids), on
/// tokio's blocking pool, so that a large prompt never stalls the other connections
/// served by the same runtime worker. `input_bytes` sizes the job. Errors come back as
/// `f` made them; a panic in `f` is a 500, as a panicking handler is.
///
/// Bounds. A job first takes a permit of its class ([`LARGE_PREPARATION_BYTES`]): at
/// most 64 small and `min(cores, 4)` large jobs run at once, so this path never holds
/// more than 68 of the blocking pool's threads (tokio's default bound is 512: the pool
/// is never saturated from here, and other blocking work such as the engines' shutdown
/// always finds a thread). Beyond the permits, requests wait asynchronously in FIFO
/// order (tokio's semaphore is fair) without holding a thread or a worker; how many
/// can wait is bounded by the requests in flight (`limits.max_concurrent_requests`,
/// 503 beyond), and a waiter whose client hangs up leaves the queue. A job that has
/// started runs to its end even if its client leaves (tokenizing cannot be
/// interrupted), keeping its permit until then. `sluice_requests_preparing` counts
/// the jobs running or waiting.
pub(crate) async fn prepare<T, F>(state: &AppState, input_bytes: usize, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    let preparing = crate::metrics::Preparing::start();
    let class = if input_bytes >= LARGE_PREPARATION_BYTES {
        &state.preparation.large
    } else {
        &state.preparation.small
    };
    let permit = class
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::Internal("request preparation has stopped".into()))?;
    tokio::task::spawn_blocking(move || {
        let _held = (permit, preparing);
        f()
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "request preparation panicked");
        ApiError::Internal("the request handler failed".into())
    })?
}

/// Bytes of text in `messages`, to size their preparation.
fn messages_bytes(messages: &[InMessage]) -> usize {
    let text = |v: &Value| v.as_str().map_or(0, str::len);
    messages
        .iter()
        .map(|m| match &m.content {
            Some(Value::Array(parts)) => parts.iter().map(|p| p.get("text").map_or(0, text)).sum(),
            Some(v) => text(v),
            None => 0,
        })
        .sum()
}

/// [`chat_prompt`] for model `index` of `state`, through [`prepare`].
pub(crate) async fn chat_prompt_prepared(
    state: &SharedState,
    index: usize,
    messages: Vec<InMessage>,
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let st = state.clone();
    prepare(state, messages_bytes(&messages), move || {
        chat_prompt(&st.models[index], &messages, add_generation_prompt)
    })
    .await
}

/// Flattens OpenAI message content (a string or a list of text parts) to text.
pub fn message_text(m: &InMessage, index: usize) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match &m.content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (ty, _) => {
                        return Err(ApiError::invalid(
                            &param,
                            format!("content part type {ty:?} is not supported (only text)"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid(
            &param,
            "content must be a string or an array of text parts",
        )),
    }
}

/// Checks roles and flattens contents into what a chat template renders.
pub fn chat_messages(messages: &[InMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!("unsupported role {:?}", m.role),
            ));
        }
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role.clone()
        };
        msgs.push(ChatMessage {
            role,
            content: message_text(m, i)?,
        });
    }
    Ok(msgs)
}

/// Renders messages with the model's chat template and tokenizes the result, on the
/// calling thread: its cost grows with the conversation, so handlers go through
/// [`chat_prompt_prepared`].
pub fn chat_prompt(
    model: &ServedModel,
    messages: &[InMessage],
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let msgs = chat_messages(messages)?;
    let template = model.template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let text = template
        .render(&msgs, add_generation_prompt)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // The template writes BOS itself when the model wants one; do not add a second.
    let bos_text = model
        .tokenizer
        .bos
        .map(|b| model.tokenizer.decode(&[b], true))
        .unwrap_or_default();
    let add_special = bos_text.is_empty() || !text.starts_with(&bos_text);
    model.tokenizer.encode(&text, add_special).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("the conversation cannot be tokenized: {e}"),
        )
    })
}
