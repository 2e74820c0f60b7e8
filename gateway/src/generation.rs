//! Turning OpenAI request parameters into a validated engine request.

use serde_json::Value;
use sluice_engine::sampling::SamplingParams;
use sluice_engine::GenerationRequest;

use crate::api_types::CommonParams;
use crate::error::ApiError;

/// Fields we accept and that do not change the output.
const HARMLESS: &[&str] = &["metadata", "store", "service_tier", "parallel_tool_calls"];

/// Whether a field's value is its "off" default, which we can honour by ignoring it.
fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => {
            o.is_empty() || (o.len() == 1 && o.get("type") == Some(&Value::String("text".into())))
        }
        Value::String(_) => false,
    }
}

/// Refuses fields that would change the output but are not implemented, naming them,
/// rather than silently ignoring them.
fn refuse_unsupported(rest: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in rest {
        if HARMLESS.contains(&k.as_str()) || is_default(v) {
            continue;
        }
        return Err(ApiError::invalid(
            k,
            format!("`{k}` is not supported by this server"),
        ));
    }
    Ok(())
}

/// Builds the engine request for `prompt` from the shared parameters.
pub fn build_request(
    p: &CommonParams,
    prompt: Vec<u32>,
    context_length: usize,
) -> Result<GenerationRequest, ApiError> {
    refuse_unsupported(&p.rest)?;
    if let Some(n) = p.n {
        if n != 1 {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match p.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let room = context_length.saturating_sub(prompt.len());
    let (field, asked) = match (p.max_completion_tokens, p.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match asked {
        None => room,
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                field,
                format!("{field} must be at least 1, got {m}"),
            ))
        }
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
    };
    if prompt.len() + max_tokens.max(1) > context_length {
        return Err(ApiError::invalid(
            field,
            format!(
                "This model's maximum context length is {context_length} tokens. However, you requested {} tokens ({} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
                prompt.len().saturating_add(max_tokens),
                prompt.len()
            ),
        ));
    }
    Ok(GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed: p.seed.map(|s| s as u64),
        },
        ignore_eos: p.ignore_eos,
    })
}
