//! `POST /v1/responses` (OpenAI's Responses API), `GET` and `DELETE
//! /v1/responses/{id}`: generation as chat completions do it, answered as response
//! objects or the typed event stream (`response.created` … `response.output_text.delta`
//! … `response.completed`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use sluice_engine::{Event, FinishReason, Usage};

use crate::api_types::InMessage;
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::extract::OpenAiJson;
use crate::metrics::LatencyTracker;
use crate::respond::{sse_response, start, Choices, Flavor};
use crate::response_store::StoredResponse;
use crate::responses::{usage, Change, Item, Output, ResponseHead, ResponsesRequest};
use crate::state::{unix_now, SharedState};
use crate::tools::{CallDelta, CallParser, ToolSpec};

/// What turns generated text into output items: the call parser when tools are on.
struct Builder {
    parser: Option<CallParser>,
    out: Output,
    /// Item ids: `msg_…` / `fc_…` from the response id and a counter.
    base: String,
    next_item: usize,
}

impl Builder {
    fn new(tools: Option<&ToolSpec>, response_id: &str) -> Self {
        let base = response_id.trim_start_matches("resp_").to_string();
        Builder {
            parser: tools.map(|t| CallParser::new(t, &base)),
            out: Output::default(),
            base,
            next_item: 0,
        }
    }

    fn apply(&mut self, deltas: Vec<CallDelta>) -> Vec<Change> {
        let mut changes = Vec::new();
        for d in deltas {
            let (base, next) = (&self.base, &mut self.next_item);
            changes.extend(self.out.apply(d, |kind| {
                *next += 1;
                format!("{kind}_{base}{next}")
            }));
        }
        changes
    }

    /// Generated text.
    fn push(&mut self, text: &str) -> Vec<Change> {
        let deltas = match &mut self.parser {
            Some(p) => {
                let mut d = Vec::new();
                p.push(text, &mut d);
                d
            }
            None => vec![CallDelta::Content(text.to_string())],
        };
        self.apply(deltas)
    }

    /// The end of the text.
    fn finish(&mut self) -> Vec<Change> {
        let mut d = Vec::new();
        if let Some(p) = &mut self.parser {
            p.finish(&mut d);
        }
        self.apply(d)
    }
}

/// What is stored once a response completes.
struct ToStore {
    state: SharedState,
    key: String,
    conversation: Vec<InMessage>,
}

impl ToStore {
    fn store(self, head: &ResponseHead, response: &Value, out: &Output) {
        let mut conversation = self.conversation;
        conversation.extend(out.messages());
        self.state.responses.put(
            head.id.clone(),
            StoredResponse::new(&self.key, response.clone(), conversation),
        );
    }
}

/// Creates a response.
pub async fn create_response(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    OpenAiJson(body): OpenAiJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    let req = ResponsesRequest::parse(body)?;
    let mut params = req.params;
    let index = state.resolve_model_index(params.model.as_deref(), &key)?;
    // The stored conversation continues (its instructions do not carry over, as
    // OpenAI's do not).
    let mut conversation = Vec::new();
    if let Some(prev) = &req.previous_response_id {
        let stored = state.responses.get(prev, &key.name).ok_or_else(|| {
            ApiError::invalid(
                "previous_response_id",
                format!("Previous response with id '{prev}' not found."),
            )
        })?;
        conversation = stored.conversation;
    }
    conversation.extend(req.input);
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    if let Some(i) = &req.instructions {
        messages.push(InMessage {
            role: "system".into(),
            content: Some(Value::String(i.clone())),
            tool_calls: None,
            tool_call_id: None,
        });
    }
    messages.extend(conversation.iter().cloned());
    let (messages, tools) = crate::tools::take_tools(&mut params.rest, messages)?;
    let tools = tools.filter(|t| t.active());
    let prompt = super::chat_prompt_prepared(&state, index, messages, true).await?;
    let model = &state.models[index];
    let sub = start(
        &state,
        &key,
        model,
        prompt,
        &params,
        Flavor::Chat,
        tools.as_deref(),
    )
    .await?;
    let mut echo = req.echo;
    echo.insert("max_output_tokens".into(), json!(sub.max_tokens));
    let head = ResponseHead {
        id: state.new_id("resp").replace('-', "_"),
        model: model.name.clone(),
        created_at: unix_now(),
        store: req.store,
        echo,
    };
    let store = req.store.then(|| ToStore {
        state: state.clone(),
        key: key.name.clone(),
        conversation,
    });
    let builder = Builder::new(tools.as_deref(), &head.id);
    let latency = LatencyTracker::new(&model.name, 1);
    let choices = Choices::new(sub.streams);
    let run = Run {
        choices,
        builder,
        head,
        latency,
        key: key.name.clone(),
        store,
    };
    let mut resp = if params.stream {
        run.stream()
    } else {
        tokio::time::timeout(state.request_timeout, run.complete())
            .await
            .map_err(|_| ApiError::Timeout(state.request_timeout.as_secs()))??
    };
    if let Some(t) = sub.tokens {
        crate::rate_limit::set_headers(resp.headers_mut(), "tokens", &t);
    }
    Ok(resp)
}

/// One response being generated.
struct Run {
    choices: Choices,
    builder: Builder,
    head: ResponseHead,
    latency: LatencyTracker,
    key: String,
    store: Option<ToStore>,
}

impl Run {
    /// The end: metrics, the final object, storing it.
    fn done(&mut self, u: Usage, reason: FinishReason) -> Value {
        self.latency.done();
        crate::metrics::tokens_by_key(&self.key, u.prompt_tokens, u.completion_tokens);
        let incomplete = reason == FinishReason::Length;
        let status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        // Items cut by max_output_tokens are incomplete, as the response is.
        let output = self.builder.out.json(status);
        let r = self
            .head
            .object(status, &output, Some(usage(&u)), incomplete);
        if let Some(s) = self.store.take() {
            s.store(&self.head, &r, &self.builder.out);
        }
        r
    }

    async fn complete(mut self) -> Result<Response, ApiError> {
        loop {
            match self.choices.next().await {
                Some((_, Event::Token { text, .. })) => {
                    if !text.is_empty() {
                        self.latency.text(0);
                        self.builder.push(&text);
                    }
                }
                Some((
                    _,
                    Event::Done {
                        reason,
                        usage,
                        error,
                    },
                )) => {
                    if reason == FinishReason::Error {
                        return Err(ApiError::Internal(
                            error.unwrap_or_else(|| "generation failed".into()),
                        ));
                    }
                    self.builder.finish();
                    return Ok(Json(self.done(usage, reason)).into_response());
                }
                None => return Err(ApiError::Internal("the engine dropped the request".into())),
            }
        }
    }

    /// The typed event stream. Dropping it (client gone) cancels the generation.
    fn stream(self) -> Response {
        let first = Events::new().begin(&self.head);
        let body = futures_util::stream::unfold(
            Some((self, Events::new_after(&first))),
            |st| async move {
                let (mut run, mut ev) = st?;
                let out = match run.choices.next().await {
                    Some((_, Event::Token { text, .. })) => {
                        if text.is_empty() {
                            Vec::new()
                        } else {
                            run.latency.text(0);
                            let changes = run.builder.push(&text);
                            ev.changes(&run.builder.out, changes)
                        }
                    }
                    Some((
                        _,
                        Event::Done {
                            reason,
                            usage,
                            error,
                        },
                    )) => {
                        let mut out;
                        if reason == FinishReason::Error {
                            out = ev.failed(
                                &run.head,
                                error.unwrap_or_else(|| "generation failed".into()),
                            );
                        } else {
                            let changes = run.builder.finish();
                            out = ev.changes(&run.builder.out, changes);
                            let status = if reason == FinishReason::Length {
                                "incomplete"
                            } else {
                                "completed"
                            };
                            out.extend(ev.close_items(&run.builder.out, status));
                            let r = run.done(usage, reason);
                            out.push(ev.event(
                                if reason == FinishReason::Length {
                                    "response.incomplete"
                                } else {
                                    "response.completed"
                                },
                                json!({"response": r}),
                            ));
                        }
                        return Some((futures_util::stream::iter(out), None));
                    }
                    None => {
                        let out = ev.failed(&run.head, "the engine dropped the request".into());
                        return Some((futures_util::stream::iter(out), None));
                    }
                };
                Some((futures_util::stream::iter(out), Some((run, ev))))
            },
        )
        .flatten();
        let all = futures_util::stream::iter(first.bytes).chain(body);
        sse_response(Body::from_stream(all.map(Ok::<Bytes, Infallible>)))
    }
}

/// The stream's events, numbered.
struct Events {
    seq: u64,
    bytes: Vec<Bytes>,
}

impl Events {
    fn new() -> Self {
        Events {
            seq: 0,
            bytes: Vec::new(),
        }
    }

    /// Numbering on from where `prev` stopped.
    fn new_after(prev: &Events) -> Self {
        Events {
            seq: prev.seq,
            bytes: Vec::new(),
        }
    }

    fn event(&mut self, ty: &str, data: Value) -> Bytes {
        // OpenAI's order: the type first.
        let mut m = Map::new();
        m.insert("type".into(), json!(ty));
        if let Value::Object(fields) = data {
            m.extend(fields);
        }
        m.insert("sequence_number".into(), json!(self.seq));
        self.seq += 1;
        Bytes::from(format!("event: {ty}\ndata: {}\n\n", Value::Object(m)))
    }

    /// `response.created` and `response.in_progress`.
    fn begin(mut self, head: &ResponseHead) -> Self {
        let r = head.object("in_progress", &[], None, false);
        let a = self.event("response.created", json!({"response": r}));
        let b = self.event("response.in_progress", json!({"response": r}));
        self.bytes = vec![a, b];
        self
    }

    /// The events of output changes.
    fn changes(&mut self, out: &Output, changes: Vec<Change>) -> Vec<Bytes> {
        let mut v = Vec::new();
        for c in changes {
            match c {
                Change::MessageOpened(at) => {
                    let item = &out.items[at];
                    let id = item_id(item);
                    v.push(self.event(
                        "response.output_item.added",
                        json!({"output_index": at, "item": Item::Message { id: id.clone(), text: String::new() }.json("in_progress")}),
                    ));
                    v.push(self.event(
                        "response.content_part.added",
                        json!({"item_id": id, "output_index": at, "content_index": 0,
                               "part": {"type": "output_text", "text": "", "annotations": []}}),
                    ));
                }
                Change::Text(at, delta) => v.push(self.event(
                    "response.output_text.delta",
                    json!({"item_id": item_id(&out.items[at]), "output_index": at,
                           "content_index": 0, "delta": delta, "logprobs": []}),
                )),
                Change::CallOpened(at) => {
                    let mut item = out.items[at].json("in_progress");
                    item["arguments"] = json!("");
                    v.push(self.event(
                        "response.output_item.added",
                        json!({"output_index": at, "item": item}),
                    ));
                }
                Change::Arguments(at, delta) => v.push(self.event(
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id(&out.items[at]), "output_index": at, "delta": delta}),
                )),
            }
        }
        v
    }

    /// Every item's closing events, in order.
    fn close_items(&mut self, out: &Output, status: &str) -> Vec<Bytes> {
        let mut v = Vec::new();
        for (at, item) in out.items.iter().enumerate() {
            let id = item_id(item);
            match item {
                Item::Message { text, .. } => {
                    v.push(self.event(
                        "response.output_text.done",
                        json!({"item_id": id, "output_index": at, "content_index": 0,
                               "text": text, "logprobs": []}),
                    ));
                    v.push(self.event(
                        "response.content_part.done",
                        json!({"item_id": id, "output_index": at, "content_index": 0,
                               "part": {"type": "output_text", "text": text, "annotations": []}}),
                    ));
                }
                Item::Call { arguments, .. } => v.push(self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": at, "arguments": arguments}),
                )),
            }
            v.push(self.event(
                "response.output_item.done",
                json!({"output_index": at, "item": item.json(status)}),
            ));
        }
        v
    }

    /// `response.failed` after an engine failure mid-stream.
    fn failed(&mut self, head: &ResponseHead, message: String) -> Vec<Bytes> {
        let mut r = head.object("failed", &[], None, false);
        r["error"] = json!({"code": "server_error", "message": message});
        vec![self.event("response.failed", json!({"response": r}))]
    }
}

fn item_id(item: &Item) -> String {
    match item {
        Item::Message { id, .. } | Item::Call { id, .. } => id.clone(),
    }
}

/// A stored response, to the key that created it.
pub async fn retrieve_response(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state
        .responses
        .get(&id, &key.name)
        .map(|r| Json(r.response))
        .ok_or(ApiError::ResponseNotFound(id))
}

/// Deletes a stored response.
pub async fn delete_response(
    State(state): State<SharedState>,
    Extension(key): Extension<Arc<ApiKey>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if state.responses.delete(&id, &key.name) {
        Ok(Json(
            json!({"id": id, "object": "response.deleted", "deleted": true}),
        ))
    } else {
        Err(ApiError::ResponseNotFound(id))
    }
}
