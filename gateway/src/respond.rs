//! Turning engine streams into an OpenAI response: one JSON body, or SSE chunks.
//!
//! A request with `n` choices is `n` engine requests (sharing the prompt's KV blocks
//! through the prefix cache) whose events are merged here, tagged by choice index.
//!
//! Streaming is the hot path (one chunk per token per stream): every chunk of a response
//! repeats its id, object, created and model, so that part is rendered once per request
//! ([`ChunkTemplate`]), and each token's chunk is that prefix, the choice index, the text
//! escaped once and a constant suffix: one buffer and a copy, no JSON tree. The SSE
//! body is a hand-written [`HttpBody`] that polls the engine streams directly.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper::body::Frame;
use serde_json::{json, Value};
use sluice_engine::text::tokenizer::Tokenizer;
use sluice_engine::{Event, FinishReason, GenerationRequest, RequestStream, TokenLogprobs, Usage};

use crate::api_types::{CommonParams, UsageBody};
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::generation::build_request;
use crate::state::{unix_now, AppState, ServedModel};
use crate::tools::{CallDelta, CallParser, ToolSpec};

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
    /// Chat with tools: calls are parsed out of each choice's text.
    tools: Option<Arc<ToolSpec>>,
}

impl ResponseMeta {
    /// A parser for choice `i`'s calls, when the response has tools.
    fn call_parser(&self, i: usize) -> Option<CallParser> {
        let base = self.id.rsplit('-').next().unwrap_or_default();
        self.tools
            .as_ref()
            .map(|t| CallParser::new(t, &format!("{base}{i}_")))
    }
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
            // OpenAI's schema has `refusal` (null: we never refuse) beside `content`.
            Flavor::Chat => json!({"content": std::mem::take(&mut self.content), "refusal": null}),
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

/// The engine streams of a response's choices, polled as one.
pub(crate) struct Choices {
    streams: Vec<RequestStream>,
    /// Choices whose `Done` has arrived: their streams are not polled again.
    done: Vec<bool>,
    /// Where the next poll starts, so that a busy choice cannot starve the others.
    next: usize,
}

impl Choices {
    pub(crate) fn new(streams: Vec<RequestStream>) -> Self {
        Choices {
            done: vec![false; streams.len()],
            streams,
            next: 0,
        }
    }

    /// The next event of any choice, tagged with its index; `None` when a stream ended
    /// without its `Done` (the engine dropped the request) or every choice is done.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<(usize, Event)>> {
        let n = self.streams.len();
        if self.done.iter().all(|&d| d) {
            return Poll::Ready(None);
        }
        for k in 0..n {
            let i = (self.next + k) % n;
            if self.done[i] {
                continue;
            }
            match self.streams[i].poll_recv(cx) {
                Poll::Ready(Some(ev)) => {
                    self.done[i] = matches!(ev, Event::Done { .. });
                    self.next = (i + 1) % n;
                    return Poll::Ready(Some((i, ev)));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    pub(crate) async fn next(&mut self) -> Option<(usize, Event)> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// Sums the usage of the choices: the prompt counts once, as OpenAI counts it.
fn add_usage(total: &mut Usage, u: Usage) {
    total.prompt_tokens = u.prompt_tokens;
    total.cached_tokens = total.cached_tokens.max(u.cached_tokens);
    total.completion_tokens += u.completion_tokens;
}

/// A request accepted and submitted: its engine streams and what answering needs.
pub(crate) struct Submitted {
    /// One per choice.
    pub streams: Vec<RequestStream>,
    /// Prompt tokens (for logging).
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub logprobs: bool,
    /// The key's token budget after the charge, for the rate-limit headers.
    pub tokens: Option<crate::rate_limit::BudgetState>,
}

/// The engine request `params` ask for on `prompt`, and its number of choices: every
/// parameter validated and the output constraint compiled (`tools`, when they require
/// a call, decide it). What generation, WebSocket sessions and render share.
pub(crate) async fn plan(
    state: &AppState,
    model: &ServedModel,
    prompt: Vec<u32>,
    params: &CommonParams,
    flavor: Flavor,
    tools: Option<&ToolSpec>,
) -> Result<(GenerationRequest, usize), ApiError> {
    let (mut request, n) = build_request(
        params,
        flavor,
        prompt,
        model.context_length,
        model.tokenizer.vocab_size(),
        &model.sampling,
    )?;
    let tool_format = tools.and_then(|t| t.output_format());
    request.constraint = match tool_format {
        Some(format) => {
            if let Some((_, field)) = crate::structured_output::output_format(params)? {
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "`{field}` cannot constrain the output while tool_choice requires a call"
                    ),
                ));
            }
            Some(crate::structured_output::compile(state, model, format, "tools").await?)
        }
        None => crate::structured_output::constraint(state, model, params).await?,
    };
    Ok((request, n))
}

/// [`plan`]s the request, charges the key and submits it to the model's engine once
/// per choice.
pub(crate) async fn start(
    state: &AppState,
    key: &ApiKey,
    model: &ServedModel,
    prompt: Vec<u32>,
    params: &CommonParams,
    flavor: Flavor,
    tools: Option<&ToolSpec>,
) -> Result<Submitted, ApiError> {
    let (request, n) = plan(state, model, prompt, params, flavor, tools).await?;
    let charged = request.prompt.len() + n * request.max_tokens;
    let tokens = crate::rate_limit::charge_tokens(key, charged).await?;
    let streams = submit(model, &request, n).inspect_err(|_| key.limits.refund_tokens(charged))?;
    Ok(Submitted {
        streams,
        max_tokens: request.max_tokens,
        logprobs: request.logprobs.is_some(),
        prompt: request.prompt,
        tokens,
    })
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
    tools: Option<Arc<ToolSpec>>,
) -> Result<Response, ApiError> {
    let tools = tools.filter(|t| t.active());
    let sub = start(state, key, model, prompt, params, flavor, tools.as_deref()).await?;
    let n = sub.streams.len();
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
        tools,
    };
    if state.log_payloads {
        let prompt = model.tokenizer.decode(&sub.prompt, true);
        tracing::info!(id = %meta.id, key = %key.name, model = %model.name, prompt = %prompt, "request payload");
    }
    let logprobs = sub.logprobs;
    let mut resp = if params.stream {
        stream_sse(Choices::new(sub.streams), logprobs, meta)
    } else {
        // Dropping the engine streams on timeout cancels the generation.
        tokio::time::timeout(
            state.request_timeout,
            complete(Choices::new(sub.streams), n, logprobs, meta),
        )
        .await
        .map_err(|_| ApiError::Timeout(state.request_timeout.as_secs()))??
    };
    if let Some(t) = sub.tokens {
        crate::rate_limit::set_headers(resp.headers_mut(), "tokens", &t);
    }
    Ok(resp)
}

/// Submits `request` once per choice to `model`'s engine, with distinct but reproducible
/// seeds. On failure the streams submitted so far are dropped, which cancels them.
pub(crate) fn submit(
    model: &ServedModel,
    request: &GenerationRequest,
    n: usize,
) -> Result<Vec<RequestStream>, ApiError> {
    (0..n)
        .map(|i| {
            let mut r = request.clone();
            r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i as u64));
            model.engine.submit(r).map_err(|e| {
                if matches!(e, sluice_engine::EngineError::QueueFull(_)) {
                    crate::metrics::refused("queue_full");
                }
                ApiError::from(e)
            })
        })
        .collect()
}

/// Collects every choice into one response body.
async fn complete(
    mut events: Choices,
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
            let mut reason = finish[i].map(finish_str);
            match meta.flavor {
                Flavor::Chat => {
                    let mut message =
                        json!({"role": "assistant", "content": text[i], "refusal": null});
                    if let Some(mut parser) = meta.call_parser(i) {
                        let mut deltas = Vec::new();
                        parser.push(&text[i], &mut deltas);
                        parser.finish(&mut deltas);
                        let (content, calls) = crate::tools::collect(deltas);
                        message["content"] = json!(content);
                        if !calls.is_empty() {
                            message["tool_calls"] = json!(calls);
                            if finish[i] == Some(FinishReason::Stop) {
                                reason = Some("tool_calls");
                            }
                        }
                    }
                    json!({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
                }
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

/// Appends `s` as a JSON string: quoted and escaped exactly as serde_json writes it.
fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail, and a string always serializes.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// What one chunk's choice says besides its index.
#[derive(Clone, Copy)]
enum Delta<'a> {
    /// Chat's first chunk of a choice: the role, with empty content (and `refusal: null`,
    /// as OpenAI sends it).
    Role,
    /// The next piece of text.
    Text(&'a str),
    /// The end of the choice, with its reason.
    Finish(&'a str),
}

/// The parts of a response's SSE chunks that never change, rendered once per request,
/// in OpenAI's field order.
struct ChunkTemplate {
    flavor: Flavor,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"choices":[`
    head: Vec<u8>,
    /// Closes the choices and the chunk: `]`, `,"usage":null` with `include_usage`
    /// (OpenAI sends it on every chunk but the last), `}` and the event's blank line.
    tail: &'static [u8],
}

impl ChunkTemplate {
    fn new(id: &str, model: &str, created: u64, flavor: Flavor, include_usage: bool) -> Self {
        let object = match flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Completion => "text_completion",
        };
        let mut head = Vec::with_capacity(96 + id.len() + model.len());
        head.extend_from_slice(b"data: {\"id\":");
        push_json_str(&mut head, id);
        head.extend_from_slice(b",\"object\":\"");
        head.extend_from_slice(object.as_bytes());
        head.extend_from_slice(b"\",\"created\":");
        head.extend_from_slice(created.to_string().as_bytes());
        head.extend_from_slice(b",\"model\":");
        push_json_str(&mut head, model);
        head.extend_from_slice(b",\"choices\":[");
        ChunkTemplate {
            flavor,
            head,
            tail: if include_usage {
                b"],\"usage\":null}\n\n"
            } else {
                b"]}\n\n"
            },
        }
    }

    /// One event with one choice; `logprobs` `None` is JSON `null`.
    fn choice(&self, index: usize, delta: Delta<'_>, logprobs: Option<&Value>) -> Bytes {
        let text_len = match delta {
            Delta::Text(t) => t.len(),
            _ => 0,
        };
        let mut b = Vec::with_capacity(self.head.len() + text_len + 96);
        b.extend_from_slice(&self.head);
        b.extend_from_slice(b"{\"index\":");
        // Writing into a Vec cannot fail.
        let _ = write!(b, "{index}");
        match (self.flavor, &delta) {
            (Flavor::Chat, Delta::Role) => {
                b.extend_from_slice(
                    b",\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}",
                );
            }
            (Flavor::Chat, Delta::Text(t)) => {
                b.extend_from_slice(b",\"delta\":{\"content\":");
                push_json_str(&mut b, t);
                b.push(b'}');
            }
            (Flavor::Chat, Delta::Finish(_)) => b.extend_from_slice(b",\"delta\":{}"),
            (Flavor::Completion, Delta::Text(t)) => {
                b.extend_from_slice(b",\"text\":");
                push_json_str(&mut b, t);
            }
            (Flavor::Completion, Delta::Role | Delta::Finish(_)) => {
                b.extend_from_slice(b",\"text\":\"\"");
            }
        }
        b.extend_from_slice(b",\"logprobs\":");
        match logprobs {
            None => b.extend_from_slice(b"null"),
            // A Value always serializes (its numbers are finite: see `finite`).
            Some(v) => {
                let _ = serde_json::to_writer(&mut b, v);
            }
        }
        b.extend_from_slice(b",\"finish_reason\":");
        match delta {
            Delta::Finish(reason) => push_json_str(&mut b, reason),
            _ => b.extend_from_slice(b"null"),
        }
        b.push(b'}');
        b.extend_from_slice(self.tail);
        Bytes::from(b)
    }

    /// One event with one choice given as a JSON tree (tool-call deltas: not the hot
    /// path).
    fn raw_choice(&self, choice: &Value) -> Bytes {
        let mut b = Vec::with_capacity(self.head.len() + 160);
        b.extend_from_slice(&self.head);
        // A Value always serializes (its numbers are finite).
        let _ = serde_json::to_writer(&mut b, choice);
        b.extend_from_slice(self.tail);
        Bytes::from(b)
    }

    /// The last event with `include_usage`: no choices, the whole request's usage.
    fn usage(&self, usage: &UsageBody) -> Bytes {
        let mut b = Vec::with_capacity(self.head.len() + 160);
        b.extend_from_slice(&self.head);
        b.extend_from_slice(b"],\"usage\":");
        // Plain integers always serialize.
        let _ = serde_json::to_writer(&mut b, usage);
        b.extend_from_slice(b"}\n\n");
        Bytes::from(b)
    }
}

/// An error event's bytes.
fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The SSE body: its state between polls.
struct SseState {
    /// The texts so far, kept only when payload logging is on.
    texts: Option<Vec<String>>,
    events: Choices,
    meta: ResponseMeta,
    chunks: ChunkTemplate,
    n: usize,
    logprobs: bool,
    lps: Vec<LogprobsAcc>,
    done: usize,
    usage: Usage,
    out: VecDeque<Bytes>,
    finished: bool,
    /// Chat with tools: each choice's call parser.
    calls: Option<Vec<CallParser>>,
}

impl SseState {
    /// Queues the chunk of one content or tool-call delta of choice `i`.
    fn push_delta(&mut self, i: usize, d: CallDelta) {
        let lp = self.logprobs_value(i);
        let chunk = match d {
            CallDelta::Content(t) => self.chunks.choice(i, Delta::Text(&t), lp.as_ref()),
            CallDelta::Start { index, id, name } => self.chunks.raw_choice(&json!({
                "index": i,
                "delta": {"tool_calls": [{"index": index, "id": id, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]},
                "logprobs": lp, "finish_reason": null,
            })),
            CallDelta::Arguments { index, piece } => self.chunks.raw_choice(&json!({
                "index": i,
                "delta": {"tool_calls": [{"index": index, "function": {"arguments": piece}}]},
                "logprobs": lp, "finish_reason": null,
            })),
        };
        self.out.push_back(chunk);
    }

    fn logprobs_value(&mut self, i: usize) -> Option<Value> {
        self.logprobs.then(|| self.lps[i].take(self.meta.flavor))
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
                if let Some(parsers) = &mut self.calls {
                    let mut deltas = Vec::new();
                    parsers[i].push(&text, &mut deltas);
                    for d in deltas {
                        self.push_delta(i, d);
                    }
                    return;
                }
                let lp = self.logprobs_value(i);
                let chunk = self.chunks.choice(i, Delta::Text(&text), lp.as_ref());
                self.out.push_back(chunk);
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
                let mut finish = finish_str(reason);
                if let Some(parsers) = &mut self.calls {
                    let mut deltas = Vec::new();
                    parsers[i].finish(&mut deltas);
                    if parsers[i].calls() > 0 && reason == FinishReason::Stop {
                        finish = "tool_calls";
                    }
                    for d in deltas {
                        self.push_delta(i, d);
                    }
                }
                let lp = self.logprobs_value(i);
                let chunk = self.chunks.choice(i, Delta::Finish(finish), lp.as_ref());
                self.out.push_back(chunk);
                self.done += 1;
                if self.done == self.n {
                    self.meta.finished(&self.usage);
                    if let Some(t) = &self.texts {
                        self.meta.log_completion(t);
                    }
                    if self.meta.include_usage {
                        let u = self.chunks.usage(&self.usage.into());
                        self.out.push_back(u);
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

impl HttpBody for SseState {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let st = &mut *self;
        loop {
            if let Some(b) = st.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if st.finished {
                return Poll::Ready(None);
            }
            let ev = ready!(st.events.poll_next(cx));
            st.on_event(ev);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.out.is_empty()
    }
}

/// Streams the generation as server-sent events in OpenAI's chunk format, ending with
/// `data: [DONE]`. Dropping the body (client gone) drops the engine streams, which
/// cancels the requests.
fn stream_sse(events: Choices, logprobs: bool, meta: ResponseMeta) -> Response {
    let n = events.streams.len();
    let mut st = SseState {
        texts: meta
            .log_payloads_for
            .is_some()
            .then(|| vec![String::new(); n]),
        events,
        chunks: ChunkTemplate::new(
            &meta.id,
            &meta.model,
            meta.created,
            meta.flavor,
            meta.include_usage,
        ),
        n,
        logprobs,
        lps: (0..n).map(|_| LogprobsAcc::default()).collect(),
        done: 0,
        usage: Usage::default(),
        out: VecDeque::new(),
        finished: false,
        calls: meta
            .tools
            .is_some()
            .then(|| (0..n).filter_map(|i| meta.call_parser(i)).collect()),
        meta,
    };
    if st.meta.flavor == Flavor::Chat {
        // OpenAI's first chunk of each chat choice carries the role with empty content.
        for i in 0..n {
            let c = st.chunks.choice(i, Delta::Role, None);
            st.out.push_back(c);
        }
    }
    sse_response(Body::new(st))
}

/// `body` as a server-sent-event stream: its content type, and no caching or proxy
/// buffering on the way.
pub(crate) fn sse_response(body: Body) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk as a JSON tree, built field by field the way the gateway built every chunk
    /// before the template: the reference the template's bytes must equal.
    fn reference(
        flavor: Flavor,
        include_usage: bool,
        index: usize,
        delta: &Delta<'_>,
        logprobs: Option<&Value>,
    ) -> Value {
        let (object, choice) = match flavor {
            Flavor::Chat => {
                let d = match delta {
                    Delta::Role => json!({"role": "assistant", "content": "", "refusal": null}),
                    Delta::Text(t) => json!({"content": t}),
                    Delta::Finish(_) => json!({}),
                };
                ("chat.completion.chunk", json!({"index": index, "delta": d}))
            }
            Flavor::Completion => {
                let t = match delta {
                    Delta::Text(t) => *t,
                    _ => "",
                };
                ("text_completion", json!({"index": index, "text": t}))
            }
        };
        let mut choice = choice;
        choice["logprobs"] = logprobs.cloned().unwrap_or(Value::Null);
        choice["finish_reason"] = match delta {
            Delta::Finish(r) => json!(r),
            _ => Value::Null,
        };
        let mut v = json!({
            "id": "chatcmpl-\"odd\"\\id", "object": object, "created": 1_700_000_000u64,
            "model": "m/ü\"1", "choices": [choice],
        });
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The JSON of one SSE event, checking its framing: one `data:` line, compact JSON.
    fn payload(chunk: &Bytes) -> (String, Value) {
        let s = std::str::from_utf8(chunk).expect("UTF-8");
        let json = s
            .strip_prefix("data: ")
            .and_then(|x| x.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("bad frame {s:?}"));
        assert!(!json.contains('\n') && !json.contains('\r'), "{json:?}");
        let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(
            serde_json::to_string(&v).unwrap().len(),
            json.len(),
            "compact"
        );
        (json.to_string(), v)
    }

    const TEXTS: [&str; 10] = [
        " plain",
        "",
        "say \"hi\" \\ back\\",
        "line\nbreak\ttab\rreturn",
        "\u{0}\u{1}\u{8}\u{c}\u{1f}\u{7f}",
        "héllo 世界 🌊",
        "</script><!--",
        "\u{2028}\u{2029}\u{feff}",
        "{\"content\":null}",
        "\\u0000",
    ];

    #[test]
    fn template_chunks_equal_the_json_tree_for_any_text() {
        let logprobs = json!({"content": [{"token": "\"x\n", "logprob": -0.25, "bytes": [34, 120, 10],
                                           "top_logprobs": [{"token": "é", "logprob": -9999.0, "bytes": [195, 169]}]}]});
        for flavor in [Flavor::Chat, Flavor::Completion] {
            for include_usage in [false, true] {
                let t = ChunkTemplate::new(
                    "chatcmpl-\"odd\"\\id",
                    "m/ü\"1",
                    1_700_000_000,
                    flavor,
                    include_usage,
                );
                let mut deltas: Vec<Delta<'_>> = TEXTS.iter().map(|t| Delta::Text(t)).collect();
                deltas.extend([Delta::Role, Delta::Finish("length"), Delta::Finish("stop")]);
                for (k, d) in deltas.iter().enumerate() {
                    for lp in [None, Some(&logprobs)] {
                        let index = k % 17;
                        let chunk = t.choice(index, *d, lp);
                        let (raw, v) = payload(&chunk);
                        assert_eq!(v, reference(flavor, include_usage, index, d, lp), "{raw}");
                        // OpenAI's field order.
                        let at = |k: &str| raw.find(&format!("\"{k}\":")).unwrap();
                        assert!(at("id") < at("object") && at("object") < at("created"));
                        assert!(at("created") < at("model") && at("model") < at("choices"));
                        if let Delta::Text(x) = d {
                            let field = if flavor == Flavor::Chat {
                                &v["choices"][0]["delta"]["content"]
                            } else {
                                &v["choices"][0]["text"]
                            };
                            assert_eq!(field.as_str(), Some(*x), "the text survives");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_usage_chunk_has_no_choices_and_the_whole_usage() {
        let t = ChunkTemplate::new("cmpl-1", "m", 7, Flavor::Completion, true);
        let usage = UsageBody::from(Usage {
            prompt_tokens: 5,
            completion_tokens: 3,
            cached_tokens: 2,
        });
        let (_, v) = payload(&t.usage(&usage));
        assert_eq!(
            v,
            json!({"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                   "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                   "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2}}})
        );
    }
}
