//! The tokens a forwarded request costs its key: the prompt counted by the upstream's
//! own `POST /tokenize` (vLLM's and Sluice's) where it has one, else estimated from the
//! prompt's bytes; charged with `max_tokens` per choice on admission, as local requests
//! are; then settled against the usage the upstream reports in its answer.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::pool::Replica;
use super::proxy::Endpoint;
use crate::auth::ApiKey;

/// How long the gateway waits for an upstream's `/tokenize` before estimating instead.
const TOKENIZE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a replica has `/tokenize`, as far as the gateway has learned (0 until known).
#[derive(Default)]
pub struct TokenizeSupport(AtomicU8);

const HAS_IT: u8 = 1;
const LACKS_IT: u8 = 2;

impl TokenizeSupport {
    fn lacks_it(&self) -> bool {
        self.0.load(Ordering::Relaxed) == LACKS_IT
    }

    fn learned(&self, has_it: bool) {
        self.0
            .store(if has_it { HAS_IT } else { LACKS_IT }, Ordering::Relaxed);
    }
}

/// The request's `max_tokens` (or `max_completion_tokens`) times its `n` and its number
/// of prompts (a completion's `prompt` may be a list), when it sets one: what admission
/// charges on top of the prompt.
pub fn output_budget(request: &Value) -> Option<usize> {
    let int = |k: &str| request.get(k).and_then(Value::as_u64);
    let max_tokens = int("max_tokens").or_else(|| int("max_completion_tokens"))?;
    let n = int("n").unwrap_or(1).max(1);
    let prompts = match request.get("prompt") {
        Some(Value::Array(items)) if items.iter().all(|p| p.is_string() || p.is_array()) => {
            items.len().max(1) as u64
        }
        _ => 1,
    };
    let total = max_tokens.saturating_mul(n).saturating_mul(prompts);
    Some(usize::try_from(total).unwrap_or(usize::MAX))
}

/// An estimate of a prompt of `bytes` bytes: 4 bytes a token, rounded up.
pub fn estimate(bytes: usize) -> usize {
    bytes.div_ceil(4)
}

/// Counts the prompt of `request` (for `model`, forwarded to `endpoint`): with
/// `replica`'s `/tokenize` when it has one, else estimated from `prompt_bytes`. Tool
/// definitions, which `/tokenize` does not take, are added as an estimate.
pub async fn count_prompt(
    client: &reqwest::Client,
    replica: &Replica,
    endpoint: Endpoint,
    request: &Value,
    prompt_bytes: usize,
) -> usize {
    let estimated = estimate(prompt_bytes);
    let extra = request
        .get("tools")
        .filter(|t| !t.is_null())
        .map_or(0, |t| estimate(t.to_string().len()));
    let body = match tokenize_body(endpoint, request) {
        Tokenize::Ask(body) => body,
        Tokenize::Known(tokens) => return tokens + extra,
        Tokenize::Estimate => return estimated,
    };
    if replica.tokenize.lacks_it() {
        return estimated;
    }
    let mut req = client
        .post(format!("{}/tokenize", replica.url))
        .json(&body)
        .timeout(TOKENIZE_TIMEOUT);
    if let Some(k) = &replica.api_key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(upstream = %replica.url, error = %super::error_chain(&e), "tokenize failed; estimating");
            return estimated;
        }
    };
    match resp.status().as_u16() {
        200 => {}
        // No such route: remembered, so that it is not asked again.
        404 | 405 | 501 => {
            tracing::info!(upstream = %replica.url, status = resp.status().as_u16(), "the upstream has no /tokenize: prompt tokens are estimated (bytes / 4) and settled by its reported usage");
            replica.tokenize.learned(false);
            return estimated;
        }
        _ => return estimated,
    }
    let counted = resp.json::<Value>().await.ok().and_then(|v| {
        v.get("count").and_then(Value::as_u64).or_else(|| {
            v.get("tokens")
                .and_then(Value::as_array)
                .map(|t| t.len() as u64)
        })
    });
    match counted.and_then(|c| usize::try_from(c).ok()) {
        Some(tokens) => {
            replica.tokenize.learned(true);
            tokens + extra
        }
        None => estimated,
    }
}

/// What counting a prompt takes.
#[derive(Debug, PartialEq)]
enum Tokenize {
    /// A `/tokenize` call with this body.
    Ask(Value),
    /// Nothing: the prompt is token ids.
    Known(usize),
    /// Not one call: estimate.
    Estimate,
}

fn tokenize_body(endpoint: Endpoint, request: &Value) -> Tokenize {
    let mut body = Map::new();
    if let Some(m) = request.get("model").filter(|m| m.is_string()) {
        body.insert("model".into(), m.clone());
    }
    match endpoint {
        Endpoint::Chat => match request.get("messages") {
            Some(m @ Value::Array(_)) => {
                body.insert("messages".into(), m.clone());
                // As the generation renders it: with the assistant's turn opened.
                let opened = request.get("add_generation_prompt").cloned();
                body.insert(
                    "add_generation_prompt".into(),
                    opened.unwrap_or(json!(true)),
                );
                Tokenize::Ask(Value::Object(body))
            }
            _ => Tokenize::Estimate,
        },
        Endpoint::Completions => match request.get("prompt") {
            Some(p @ Value::String(_)) => {
                body.insert("prompt".into(), p.clone());
                Tokenize::Ask(Value::Object(body))
            }
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
                Tokenize::Known(items.len())
            }
            Some(Value::Array(items)) if items.iter().all(Value::is_array) => {
                Tokenize::Known(items.iter().filter_map(Value::as_array).map(Vec::len).sum())
            }
            _ => Tokenize::Estimate,
        },
    }
}

/// The usage an answer reports: `(prompt_tokens, completion_tokens)`.
pub fn usage_of(answer: &Value) -> Option<(usize, usize)> {
    let u = answer.get("usage")?;
    let get = |k: &str| {
        u.get(k)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
    };
    Some((get("prompt_tokens")?, get("completion_tokens").unwrap_or(0)))
}

/// The usage in one server-sent event (`data: {...}`), if it carries one.
pub fn usage_in_event(event: &[u8]) -> Option<(usize, usize)> {
    // Most events carry no usage: skip them without parsing.
    let text = std::str::from_utf8(event).ok()?;
    if !text.contains("\"usage\"") {
        return None;
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find_map(|v| usage_of(&v))
}

/// What a forwarded request was charged on admission, settled once its answer is done.
pub struct Charge {
    key: Arc<ApiKey>,
    /// The tokens charged.
    charged: usize,
    /// `max_tokens` × `n`, when the request set it: charged whatever was generated, as
    /// for local requests.
    output_budget: Option<usize>,
    settled: bool,
}

impl Charge {
    pub fn new(key: Arc<ApiKey>, prompt_tokens: usize, output_budget: Option<usize>) -> Self {
        Charge {
            key,
            charged: prompt_tokens + output_budget.unwrap_or(0),
            output_budget,
            settled: false,
        }
    }

    /// The tokens charged on admission.
    pub fn charged(&self) -> usize {
        self.charged
    }

    /// The charge was refused: nothing to settle.
    pub fn forget(&mut self) {
        self.settled = true;
    }

    /// Gives the whole charge back: the upstream answered with an error, or none
    /// answered, so nothing was generated.
    pub fn refund_all(&mut self) {
        if !std::mem::replace(&mut self.settled, true) {
            self.key.limits.settle_tokens(self.charged, 0);
        }
    }

    /// Settles the charge with the usage the upstream reported: the prompt at its
    /// reported size, plus `max_tokens` × `n` when set, else the tokens generated. The
    /// difference is given back or charged (a key can then owe more than its minute's
    /// budget: it waits longer). Counts the tokens in the per-key counters.
    pub fn settle(&mut self, usage: Option<(usize, usize)>) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let Some((prompt, completion)) = usage else {
            return;
        };
        crate::metrics::tokens_by_key(&self.key.name, prompt, completion);
        let owed = prompt + self.output_budget.unwrap_or(completion);
        self.key.limits.settle_tokens(self.charged, owed);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        // An answer that ended without usage (a stream that did not ask for it, or one
        // cut off) keeps its admission charge.
        self.settle(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_counted_by_tokenize_or_from_their_ids() {
        let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(
            tokenize_body(Endpoint::Chat, &chat),
            Tokenize::Ask(
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                  "add_generation_prompt": true})
            )
        );
        let text = json!({"model": "m", "prompt": "once"});
        assert_eq!(
            tokenize_body(Endpoint::Completions, &text),
            Tokenize::Ask(json!({"model": "m", "prompt": "once"}))
        );
        let ids = json!({"prompt": [1, 2, 3]});
        assert_eq!(
            tokenize_body(Endpoint::Completions, &ids),
            Tokenize::Known(3)
        );
        let batches = json!({"prompt": [[1, 2], [3]]});
        assert_eq!(
            tokenize_body(Endpoint::Completions, &batches),
            Tokenize::Known(3)
        );
        let strings = json!({"prompt": ["a", "b"]});
        assert_eq!(
            tokenize_body(Endpoint::Completions, &strings),
            Tokenize::Estimate
        );
    }

    #[test]
    fn budgets_and_estimates() {
        assert_eq!(output_budget(&json!({})), None);
        assert_eq!(output_budget(&json!({"max_tokens": 10, "n": 2})), Some(20));
        let two = json!({"max_tokens": 3, "prompt": ["a", "b"]});
        assert_eq!(output_budget(&two), Some(6));
        assert_eq!(
            output_budget(&json!({"max_tokens": 3, "prompt": [1, 2]})),
            Some(3)
        );
        assert_eq!(output_budget(&json!({"max_completion_tokens": 5})), Some(5));
        assert_eq!(estimate(9), 3);
        assert_eq!(estimate(0), 0);
    }

    #[test]
    fn usage_is_found_in_answers_and_events() {
        let a = json!({"usage": {"prompt_tokens": 7, "completion_tokens": 3}});
        assert_eq!(usage_of(&a), Some((7, 3)));
        assert_eq!(usage_of(&json!({"usage": null})), None);
        let ev = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n";
        assert_eq!(usage_in_event(ev), Some((5, 2)));
        assert_eq!(
            usage_in_event(b"data: {\"choices\":[{\"delta\":{}}]}\n\n"),
            None
        );
        assert_eq!(usage_in_event(b"data: [DONE]\n\n"), None);
    }
}
