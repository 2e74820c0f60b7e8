//! Turning an engine stream into an OpenAI response: one JSON body, or SSE chunks.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde_json::{json, Value};
use sluice_engine::{Event, FinishReason, RequestStream, Usage};

use crate::api_types::{CommonParams, UsageBody};
use crate::error::ApiError;
use crate::generation::build_request;
use crate::state::{unix_now, AppState, ServedModel};

/// Which OpenAI object family to produce.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Chat,
    Completion,
}

/// Identity of one response.
pub struct ResponseMeta {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub flavor: Flavor,
    pub include_usage: bool,
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

    fn delta_choice(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        match self.flavor {
            Flavor::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Flavor::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

/// The finish reason as OpenAI reports it (a cancelled request has no one to read it).
fn finish_str(r: FinishReason) -> &'static str {
    r.as_str()
}

/// Validates the parameters, submits `prompt` to the model's engine and answers with
/// SSE when the client asked to stream, else with one JSON body.
pub async fn generate(
    state: &AppState,
    model: &ServedModel,
    prompt: Vec<u32>,
    params: &CommonParams,
    flavor: Flavor,
) -> Result<Response, ApiError> {
    let request = build_request(params, prompt, model.context_length)?;
    let stream = model.engine.submit(request)?;
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
    };
    if params.stream {
        Ok(stream_sse(stream, meta))
    } else {
        complete(stream, meta).await
    }
}

/// Collects the whole generation into one response body.
pub async fn complete(mut stream: RequestStream, meta: ResponseMeta) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match stream.recv().await {
            Some(Event::Token { text: t, .. }) => text.push_str(&t),
            Some(Event::Done {
                reason,
                usage,
                error,
            }) => {
                if reason == FinishReason::Error {
                    return Err(ApiError::Internal(
                        error.unwrap_or_else(|| "generation failed".into()),
                    ));
                }
                let usage = UsageBody::from(usage);
                let body = match meta.flavor {
                    Flavor::Chat => json!({
                        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish_str(reason)}],
                        "usage": usage,
                    }),
                    Flavor::Completion => json!({
                        "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                        "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_str(reason)}],
                        "usage": usage,
                    }),
                };
                return Ok(Json(body).into_response());
            }
            None => return Err(ApiError::Internal("the engine dropped the request".into())),
        }
    }
}

enum SseState {
    Start(RequestStream),
    Streaming(RequestStream),
    Finishing(Vec<Bytes>),
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Streams the generation as server-sent events in OpenAI's chunk format, ending with
/// `data: [DONE]`. Dropping the body (client gone) drops the engine stream, which
/// cancels the request.
pub fn stream_sse(stream: RequestStream, meta: ResponseMeta) -> Response {
    let body = stream::unfold(
        (SseState::Start(stream), meta),
        |(state, meta)| async move {
            match state {
                SseState::Start(s) => {
                    // OpenAI's first chat chunk carries the role with empty content.
                    let first = match meta.flavor {
                        Flavor::Chat => Some(sse(
                            &meta.chunk(Some(meta.delta_choice(Some(""), true, None)), None)
                        )),
                        Flavor::Completion => None,
                    };
                    match first {
                        Some(b) => Some((Ok::<_, Infallible>(b), (SseState::Streaming(s), meta))),
                        None => next_event(s, meta).await,
                    }
                }
                SseState::Streaming(s) => next_event(s, meta).await,
                SseState::Finishing(mut pending) => {
                    if pending.is_empty() {
                        return None;
                    }
                    let b = pending.remove(0);
                    Some((Ok(b), (SseState::Finishing(pending), meta)))
                }
            }
        },
    );
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

async fn next_event(
    mut s: RequestStream,
    meta: ResponseMeta,
) -> Option<(Result<Bytes, Infallible>, (SseState, ResponseMeta))> {
    loop {
        match s.recv().await {
            Some(Event::Token { text, .. }) => {
                if text.is_empty() {
                    continue; // mid-character: nothing to show yet
                }
                let b = sse(&meta.chunk(Some(meta.delta_choice(Some(&text), false, None)), None));
                return Some((Ok(b), (SseState::Streaming(s), meta)));
            }
            Some(Event::Done {
                reason,
                usage,
                error,
            }) => {
                let tail = finish_events(&meta, reason, usage, error);
                return Some((
                    Ok(tail[0].clone()),
                    (SseState::Finishing(tail[1..].to_vec()), meta),
                ));
            }
            None => {
                let tail = finish_events(
                    &meta,
                    FinishReason::Error,
                    Usage::default(),
                    Some("the engine dropped the request".into()),
                );
                return Some((
                    Ok(tail[0].clone()),
                    (SseState::Finishing(tail[1..].to_vec()), meta),
                ));
            }
        }
    }
}

/// The closing events: the finish chunk (or an error event), the usage chunk when asked,
/// and `[DONE]`.
fn finish_events(
    meta: &ResponseMeta,
    reason: FinishReason,
    usage: Usage,
    error: Option<String>,
) -> Vec<Bytes> {
    let mut out = Vec::new();
    if reason == FinishReason::Error {
        let e = ApiError::Internal(error.unwrap_or_else(|| "generation failed".into()));
        out.push(sse(&e.body()));
    } else {
        out.push(sse(&meta.chunk(
            Some(meta.delta_choice(None, false, Some(finish_str(reason)))),
            None,
        )));
    }
    if meta.include_usage {
        out.push(sse(&meta.chunk(None, Some(usage.into()))));
    }
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}
