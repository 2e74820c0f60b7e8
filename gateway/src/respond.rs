//! Turning engine streams into an OpenAI response: one JSON body, or SSE chunks.
//!
//! A request with `n` choices is `n` engine requests (sharing the prompt's KV blocks
//! through the prefix cache) whose events are merged here, tagged by choice index.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use serde_json::{json, Value};
use sluice_engine::tokenizer::Tokenizer;
use sluice_engine::{Event, FinishReason, RequestStream, TokenLogprobs, Usage};

use crate::api_types::{CommonParams, UsageBody};
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::generation::build_request;
use crate::state::{unix_now, AppState, ServedModel};

/// Which OpenAI object family to produce.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Flavor {
    Chat,
    Completion,
}

/// Identity of one response.
struct ResponseMeta {
    id: String,
    model: String,
    created: u64,
    flavor: Flavor,
    include_usage: bool,
    tokenizer: Arc<Tokenizer>,
    /// Set only with `log_payloads = true`: the key's name, for logging completions.
    log_payloads_for: Option<String>,
    key_name: String,
    latency: crate::metrics::LatencyTracker,
}

impl ResponseMeta {
    /// Records the finished request's latency and tokens.
    fn finished(&self, usage: &Usage) {
        self.latency.done();
        crate::metrics::tokens_by_key(&self.key_name, usage.prompt_tokens, usage.completion_tokens);
    }

    /// Logs the generated texts when payload logging is on (it is off by default).
    fn log_completion(&self, texts: &[String]) {
        if let Some(key) = &self.log_payloads_for {
            tracing::info!(id = %self.id, key = %key, completion = ?texts, "completion payload");
        }
    }
}

/// Log-probabilities cannot be -inf in JSON; vLLM reports this floor instead.
fn finite(lp: f32) -> f32 {
    lp.max(-9999.0)
}

impl ResponseMeta {
    fn chunk(&self, choice: Option<Value>, usage: Option<UsageBody>) -> Value {
        let object = match self.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choice.map_or_else(Vec::new, |c| vec![c]),
        });
        if self.include_usage {
            v["usage"] = serde_json::to_value(usage).unwrap_or(Value::Null);
        }
        v
    }

    fn delta_choice(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        logprobs: Value,
        finish: Option<&str>,
    ) -> Value {
        match self.flavor {
            Flavor::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Flavor::Completion => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let b = self.tokenizer.token_bytes(id).to_vec();
        (String::from_utf8_lossy(&b).into_owned(), b)
    }
}

/// One choice's log-probabilities, kept in the shape its flavor reports.
#[derive(Default)]
struct LogprobsAcc {
    /// Chat: `content` entries.
    content: Vec<Value>,
    /// Completions: the parallel arrays.
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    offset: usize,
}

impl LogprobsAcc {
    fn push(&mut self, meta: &ResponseMeta, id: u32, lp: &TokenLogprobs) {
        let (text, bytes) = meta.token_text(id);
        match meta.flavor {
            Flavor::Chat => {
                let top: Vec<Value> = lp
                    .top
                    .iter()
                    .map(|&(t, l)| {
                        let (s, b) = meta.token_text(t);
                        json!({"token": s, "logprob": finite(l), "bytes": b})
                    })
                    .collect();
                self.content.push(json!({
                    "token": text, "logprob": finite(lp.logprob), "bytes": bytes, "top_logprobs": top,
                }));
            }
            Flavor::Completion => {
                let top: serde_json::Map<String, Value> = lp
                    .top
                    .iter()
                    .map(|&(t, l)| (meta.token_text(t).0, json!(finite(l))))
                    .collect();
                self.text_offset.push(json!(self.offset));
                self.offset += text.chars().count();
                self.tokens.push(json!(text));
                self.token_logprobs.push(json!(finite(lp.logprob)));
                self.top_logprobs.push(Value::Object(top));
            }
        }
    }

    /// The accumulated entries as a `logprobs` value, emptying the accumulator's
    /// per-chunk lists (the running text offset is kept).
    fn take(&mut self, flavor: Flavor) -> Value {
        match flavor {
            Flavor::Chat => json!({"content": std::mem::take(&mut self.content)}),
            Flavor::Completion => json!({
                "tokens": std::mem::take(&mut self.tokens),
                "token_logprobs": std::mem::take(&mut self.token_logprobs),
                "top_logprobs": std::mem::take(&mut self.top_logprobs),
                "text_offset": std::mem::take(&mut self.text_offset),
            }),
        }
    }
}

/// The finish reason as OpenAI reports it.
fn finish_str(r: FinishReason) -> &'static str {
    r.as_str()
}

type Merged = SelectAll<BoxStream<'static, (usize, Event)>>;

fn merge(streams: Vec<RequestStream>) -> Merged {
    stream::select_all(streams.into_iter().enumerate().map(|(i, s)| {
        stream::unfold(s, move |mut s| async move {
            s.recv().await.map(|e| ((i, e), s))
        })
        .boxed()
    }))
}

/// Sums the usage of the choices: the prompt counts once, as OpenAI counts it.
fn add_usage(total: &mut Usage, u: Usage) {
    total.prompt_tokens = u.prompt_tokens;
    total.cached_tokens = total.cached_tokens.max(u.cached_tokens);
    total.completion_tokens += u.completion_tokens;
}

/// Validates the parameters, submits `prompt` to the model's engine (once per choice)
/// and answers with SSE when the client asked to stream, else with one JSON body.
pub async fn generate(
    state: &AppState,
    key: &ApiKey,
    model: &ServedModel,
    prompt: Vec<u32>,
    params: &CommonParams,
    flavor: Flavor,
) -> Result<Response, ApiError> {
    let (request, n) = build_request(
        params,
        flavor,
        prompt,
        model.context_length,
        model.tokenizer.vocab_size(),
    )?;
    let charged = request.prompt.len() + n * request.max_tokens;
    let tokens = key.limits.take_tokens(charged).inspect_err(|e| {
        if matches!(e, ApiError::RateLimited { .. }) {
            crate::metrics::rate_limited(&key.name, "tokens");
        }
    })?;
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut r = request.clone();
        // Distinct but reproducible choices under one seed.
        r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i as u64));
        // On failure the streams submitted so far are dropped, which cancels them.
        let stream = model.engine.submit(r).inspect_err(|e| {
            if matches!(e, sluice_engine::EngineError::QueueFull(_)) {
                crate::metrics::refused("queue_full");
            }
        })?;
        streams.push(stream);
    }
    let meta = ResponseMeta {
        id: state.new_id(match flavor {
            Flavor::Chat => "chatcmpl",
            Flavor::Completion => "cmpl",
        }),
        model: model.name.clone(),
        created: unix_now(),
        flavor,
        include_usage: params
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        tokenizer: model.tokenizer.clone(),
        log_payloads_for: state.log_payloads.then(|| key.name.clone()),
        key_name: key.name.clone(),
        latency: crate::metrics::LatencyTracker::new(&model.name, n),
    };
    if state.log_payloads {
        let prompt = model.tokenizer.decode(&request.prompt, true);
        tracing::info!(id = %meta.id, key = %key.name, model = %model.name, prompt = %prompt, "request payload");
    }
    let logprobs = request.logprobs.is_some();
    let mut resp = if params.stream {
        stream_sse(merge(streams), n, logprobs, meta)
    } else {
        // Dropping the engine streams on timeout cancels the generation.
        tokio::time::timeout(
            state.request_timeout,
            complete(merge(streams), n, logprobs, meta),
        )
        .await
        .map_err(|_| ApiError::Timeout(state.request_timeout.as_secs()))??
    };
    if let Some(t) = tokens {
        crate::rate_limit::set_headers(resp.headers_mut(), "tokens", &t);
    }
    Ok(resp)
}

/// Collects every choice into one response body.
async fn complete(
    mut events: Merged,
    n: usize,
    logprobs: bool,
    mut meta: ResponseMeta,
) -> Result<Response, ApiError> {
    let mut text = vec![String::new(); n];
    let mut lps: Vec<LogprobsAcc> = (0..n).map(|_| LogprobsAcc::default()).collect();
    let mut finish = vec![None; n];
    let mut usage = Usage::default();
    while finish.iter().any(Option::is_none) {
        match events.next().await {
            Some((
                i,
                Event::Token {
                    id,
                    text: t,
                    logprobs: lp,
                },
            )) => {
                if !t.is_empty() {
                    meta.latency.text(i);
                }
                text[i].push_str(&t);
                if let Some(lp) = lp {
                    lps[i].push(&meta, id, &lp);
                }
            }
            Some((
                i,
                Event::Done {
                    reason,
                    usage: u,
                    error,
                },
            )) => {
                if reason == FinishReason::Error {
                    return Err(ApiError::Internal(
                        error.unwrap_or_else(|| "generation failed".into()),
                    ));
                }
                add_usage(&mut usage, u);
                finish[i] = Some(reason);
            }
            None => return Err(ApiError::Internal("the engine dropped the request".into())),
        }
    }
    meta.finished(&usage);
    meta.log_completion(&text);
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let lp = if logprobs {
                lps[i].take(meta.flavor)
            } else {
                Value::Null
            };
            let reason = finish[i].map(finish_str);
            match meta.flavor {
                Flavor::Chat => json!({
                    "index": i, "message": {"role": "assistant", "content": text[i]},
                    "logprobs": lp, "finish_reason": reason,
                }),
                Flavor::Completion => json!({
                    "index": i, "text": text[i], "logprobs": lp, "finish_reason": reason,
                }),
            }
        })
        .collect();
    let object = match meta.flavor {
        Flavor::Chat => "chat.completion",
        Flavor::Completion => "text_completion",
    };
    Ok(Json(json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": choices, "usage": UsageBody::from(usage),
    }))
    .into_response())
}

/// The SSE body's state between polls.
struct SseState {
    /// The texts so far, kept only when payload logging is on.
    texts: Option<Vec<String>>,
    events: Merged,
    meta: ResponseMeta,
    n: usize,
    logprobs: bool,
    lps: Vec<LogprobsAcc>,
    done: usize,
    usage: Usage,
    out: VecDeque<Bytes>,
    finished: bool,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl SseState {
    fn logprobs_value(&mut self, i: usize) -> Value {
        if self.logprobs {
            self.lps[i].take(self.meta.flavor)
        } else {
            Value::Null
        }
    }

    /// Queues the chunks one engine event produces (possibly none).
    fn on_event(&mut self, ev: Option<(usize, Event)>) {
        match ev {
            Some((i, Event::Token { id, text, logprobs })) => {
                if let Some(t) = &mut self.texts {
                    t[i].push_str(&text);
                }
                if let Some(lp) = logprobs {
                    self.lps[i].push(&self.meta, id, &lp);
                }
                if text.is_empty() {
                    return; // mid-character or a possible stop string: nothing to show yet
                }
                self.meta.latency.text(i);
                let lp = self.logprobs_value(i);
                let c = self.meta.delta_choice(i, Some(&text), false, lp, None);
                self.out.push_back(sse(&self.meta.chunk(Some(c), None)));
            }
            Some((
                i,
                Event::Done {
                    reason,
                    usage,
                    error,
                },
            )) => {
                if reason == FinishReason::Error {
                    return self.fail(error.unwrap_or_else(|| "generation failed".into()));
                }
                add_usage(&mut self.usage, usage);
                let lp = self.logprobs_value(i);
                let c = self
                    .meta
                    .delta_choice(i, None, false, lp, Some(finish_str(reason)));
                self.out.push_back(sse(&self.meta.chunk(Some(c), None)));
                self.done += 1;
                if self.done == self.n {
                    self.meta.finished(&self.usage);
                    if let Some(t) = &self.texts {
                        self.meta.log_completion(t);
                    }
                    if self.meta.include_usage {
                        let u = Some(self.usage.into());
                        self.out.push_back(sse(&self.meta.chunk(None, u)));
                    }
                    self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.finished = true;
                }
            }
            None => self.fail("the engine dropped the request".into()),
        }
    }

    /// An error after the stream started: an error event, then `[DONE]`. The other
    /// choices' engine requests are cancelled when the stream is dropped.
    fn fail(&mut self, message: String) {
        self.out.push_back(sse(&ApiError::Internal(message).body()));
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.finished = true;
    }
}

/// Streams the generation as server-sent events in OpenAI's chunk format, ending with
/// `data: [DONE]`. Dropping the body (client gone) drops the engine streams, which
/// cancels the requests.
fn stream_sse(events: Merged, n: usize, logprobs: bool, meta: ResponseMeta) -> Response {
    let mut st = SseState {
        texts: meta
            .log_payloads_for
            .is_some()
            .then(|| vec![String::new(); n]),
        events,
        n,
        logprobs,
        lps: (0..n).map(|_| LogprobsAcc::default()).collect(),
        done: 0,
        usage: Usage::default(),
        out: VecDeque::new(),
        finished: false,
        meta,
    };
    if st.meta.flavor == Flavor::Chat {
        // OpenAI's first chunk of each chat choice carries the role with empty content.
        for i in 0..n {
            let c = st.meta.delta_choice(i, Some(""), true, Value::Null, None);
            st.out.push_back(sse(&st.meta.chunk(Some(c), None)));
        }
    }
    let body = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.out.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(b), st));
            }
            if st.finished {
                return None;
            }
            let ev = st.events.next().await;
            st.on_event(ev);
        }
    });
    let mut resp = Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
