//! Turning OpenAI request parameters into validated engine requests.
//!
//! Limits (also in the README): `n` ≤ 16, at most 16 stop strings of up to 256 bytes,
//! 32 stop token ids, 1,024 `logit_bias` entries in [-100, 100], `top_logprobs` ≤ 20.

use serde_json::Value;
use sluice_engine::sampling::SamplingParams;
use sluice_engine::GenerationRequest;

use crate::api_types::CommonParams;
use crate::error::ApiError;
use crate::respond::Flavor;
use crate::sampling_defaults::SamplingDefaults;

/// Most choices per request.
pub const MAX_N: usize = 16;
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
const MAX_STOP_TOKEN_IDS: usize = 32;
const MAX_LOGIT_BIAS: usize = 1024;
const MAX_TOP_LOGPROBS: i64 = 20;

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

/// For the vLLM and SGLang extension fields whose defaults are not "off", whether this
/// value asks for what this server does anyway (`None` for other fields). Routers in
/// front of vLLM and SGLang (vllm-router, sglang-router) add these to every body they
/// forward, with these values.
fn asks_for_our_behaviour(k: &str, v: &Value) -> Option<bool> {
    Some(match k {
        // Control tokens never reach the output text (`false` would render them).
        "skip_special_tokens" | "spaces_between_special_tokens" => v == &Value::Bool(true),
        // No model served here has a reasoning parser: there is no reasoning to include,
        // separate or stream, so every setting gives the same output.
        "include_reasoning" | "separate_reasoning" | "stream_reasoning" => v.is_boolean(),
        "best_of" => v.is_null() || v.as_i64() == Some(1),
        _ => return None,
    })
}

/// Refuses fields that would change the output but are not implemented, naming them,
/// rather than silently ignoring them.
fn refuse_unsupported(rest: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in rest {
        let ok = asks_for_our_behaviour(k, v).unwrap_or_else(|| {
            HARMLESS.contains(&k.as_str())
                || crate::structured_output::FIELDS.contains(&k.as_str())
                || is_default(v)
        });
        if ok {
            continue;
        }
        // The value helps with flags (`skip_special_tokens` set to false); a long one
        // (a list of tools) would only bury the message.
        let value = v.to_string();
        let message = if value.len() <= 40 {
            format!("`{k}` set to {value} is not supported by this server")
        } else {
            format!("`{k}` is not supported by this server")
        };
        return Err(ApiError::invalid(k, message));
    }
    Ok(())
}

fn in_range(name: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f32, ApiError> {
    let x = v.unwrap_or(default);
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            name,
            format!("{name} must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(x as f32)
}

fn token_id(name: &str, v: i64, vocab: usize) -> Result<u32, ApiError> {
    u32::try_from(v)
        .ok()
        .filter(|&t| (t as usize) < vocab)
        .ok_or_else(|| {
            ApiError::invalid(
                name,
                format!("{name}: token id {v} is outside the vocabulary (0..{vocab})"),
            )
        })
}

fn stop_strings(v: &Option<Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid("stop", "stop must be a string or a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "stop must be a string or a list of strings",
            ))
        }
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {MAX_STOPS} stop strings are allowed, got {}",
                list.len()
            ),
        ));
    }
    if list.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!("each stop string must be at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(list)
}

/// `logprobs` / `top_logprobs` as "how many alternatives per token", or `None` for off.
fn logprobs(p: &CommonParams, flavor: Flavor) -> Result<Option<usize>, ApiError> {
    let top = |name: &str, n: i64| -> Result<usize, ApiError> {
        if !(0..=MAX_TOP_LOGPROBS).contains(&n) {
            return Err(ApiError::invalid(
                name,
                format!("{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            ));
        }
        Ok(n as usize)
    };
    match flavor {
        Flavor::Chat => {
            let on = match &p.logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(ApiError::invalid("logprobs", "logprobs must be a boolean")),
            };
            match (on, p.top_logprobs) {
                (false, Some(n)) if n > 0 => Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs set to true",
                )),
                (false, _) => Ok(None),
                (true, n) => Ok(Some(top("top_logprobs", n.unwrap_or(0))?)),
            }
        }
        Flavor::Completion => match &p.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(n) => Ok(Some(top("logprobs", n)?)),
                None => Err(ApiError::invalid("logprobs", "logprobs must be an integer")),
            },
            Some(_) => Err(ApiError::invalid("logprobs", "logprobs must be an integer")),
        },
    }
}

/// Builds the engine request for `prompt` from the shared parameters, and the number
/// of choices (`n`) to generate from it.
pub fn build_request(
    p: &CommonParams,
    flavor: Flavor,
    prompt: Vec<u32>,
    context_length: usize,
    vocab: usize,
    defaults: &SamplingDefaults,
) -> Result<(GenerationRequest, usize), ApiError> {
    refuse_unsupported(&p.rest)?;
    let n = match p.n {
        None => 1,
        Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ))
        }
    };
    // A field the request leaves out takes the model's default (checked at start-up),
    // else OpenAI's.
    let temperature = in_range(
        "temperature",
        p.temperature.or(defaults.temperature),
        0.0,
        2.0,
        1.0,
    )?;
    let top_p = p.top_p.or(defaults.top_p).unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match p.top_k.or(defaults.top_k) {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let min_p = in_range("min_p", p.min_p.or(defaults.min_p), 0.0, 1.0, 0.0)?;
    let presence_penalty = in_range(
        "presence_penalty",
        p.presence_penalty.or(defaults.presence_penalty),
        -2.0,
        2.0,
        0.0,
    )?;
    let frequency_penalty = in_range(
        "frequency_penalty",
        p.frequency_penalty.or(defaults.frequency_penalty),
        -2.0,
        2.0,
        0.0,
    )?;
    let repetition_penalty = p
        .repetition_penalty
        .or(defaults.repetition_penalty)
        .unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("repetition_penalty must be in (0, 10], got {repetition_penalty}"),
        ));
    }
    let mut logit_bias = Vec::new();
    if let Some(map) = &p.logit_bias {
        if map.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("at most {MAX_LOGIT_BIAS} logit_bias entries are allowed"),
            ));
        }
        for (k, v) in map {
            let id = k.parse::<i64>().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias key {k:?} is not a token id"),
                )
            })?;
            let id = token_id("logit_bias", id, vocab)?;
            let b = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("logit_bias values must be numbers in [-100, 100], got {v}"),
                    )
                })?;
            logit_bias.push((id, b as f32));
        }
    }
    let stop = stop_strings(&p.stop)?;
    let ids = p.stop_token_ids.as_deref().unwrap_or_default();
    if ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!("at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed"),
        ));
    }
    let stop_token_ids = ids
        .iter()
        .map(|&t| token_id("stop_token_ids", t, vocab))
        .collect::<Result<Vec<_>, _>>()?;
    let logprobs = logprobs(p, flavor)?;

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
    if prompt.len().saturating_add(max_tokens.max(1)) > context_length {
        return Err(ApiError::invalid(
            field,
            format!(
                "This model's maximum context length is {context_length} tokens. However, you requested {} tokens ({} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
                prompt.len().saturating_add(max_tokens),
                prompt.len()
            ),
        ));
    }
    let min_tokens = match p.min_tokens {
        None => 0,
        Some(m) if m >= 0 && (m as usize) <= max_tokens => m as usize,
        Some(m) => {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("min_tokens must be between 0 and max_tokens ({max_tokens}), got {m}"),
            ))
        }
    };
    let req = GenerationRequest {
        prompt,
        max_tokens,
        min_tokens,
        sampling: SamplingParams {
            temperature,
            top_p: top_p as f32,
            top_k,
            min_p,
            presence_penalty,
            frequency_penalty,
            repetition_penalty: repetition_penalty as f32,
            logit_bias,
            seed: p.seed.map(|s| s as u64),
        },
        ignore_eos: p.ignore_eos,
        stop,
        stop_token_ids,
        logprobs,
        // Compiled by the caller, off the async workers (`structured_output::constraint`).
        constraint: None,
    };
    Ok((req, n))
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::refuse_unsupported;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn what_vllm_router_adds_is_accepted() {
        // Recorded from vllm-router 0.1.17 (chat, then completions), less the fields
        // CommonParams reads itself.
        let chat = json!({"no_stop_trim": false, "continue_final_message": false,
                          "skip_special_tokens": true, "separate_reasoning": true,
                          "stream_reasoning": true, "return_hidden_states": false,
                          "include_reasoning": true});
        let completion = json!({"echo": false, "no_stop_trim": false,
                                "skip_special_tokens": true, "return_hidden_states": false});
        refuse_unsupported(&fields(chat)).unwrap();
        refuse_unsupported(&fields(completion)).unwrap();
        refuse_unsupported(&fields(json!({"include_reasoning": false, "best_of": 1}))).unwrap();
    }

    #[test]
    fn values_that_would_change_the_output_are_refused_by_name() {
        for (field, value) in [
            ("skip_special_tokens", json!(false)),
            ("echo", json!(true)),
            ("include_reasoning", json!("no")),
            ("best_of", json!(2)),
        ] {
            let mut one = Map::new();
            one.insert(field.to_string(), value.clone());
            let e = refuse_unsupported(&one).unwrap_err();
            let s = e.to_string();
            assert!(s.contains(field) && s.contains(&value.to_string()), "{s}");
        }
        // A long value is not echoed back.
        let tools =
            json!({"tools": [{"type": "function", "function": {"name": "a_rather_long_name"}}]});
        let e = refuse_unsupported(&fields(tools)).unwrap_err().to_string();
        assert!(e.contains("`tools` is not supported"), "{e}");
    }
}
