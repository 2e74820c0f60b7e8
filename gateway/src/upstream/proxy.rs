//! Forwarding one request to an upstream: the body as the client sent it, the upstream's
//! key, failover before the answer starts, and the answer relayed as it comes (server-sent
//! events event by event; a stream that breaks ends with an error event).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::{Stream, StreamExt};
use serde_json::Value;

use super::pool::{InFlight, Replica};
use super::tokens::{self, Charge};
use super::{error_chain, routing, UpstreamModel};
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::state::AppState;

/// The generation endpoints forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// One attempt's failure before anything reached the client: try the next replica.
struct Retry {
    outcome: &'static str,
    error: ApiError,
}

/// Forwards `body` (the client's, unchanged) to a replica of `model`, failing over to the
/// next while nothing has been answered. `pin` replaces the prompt's prefix as the
/// affinity key (a WebSocket session's id, so that its turns share one replica's cache).
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    state: &AppState,
    key: &Arc<ApiKey>,
    headers: &HeaderMap,
    body: Bytes,
    request: &Value,
    model: &UpstreamModel,
    endpoint: Endpoint,
    pin: Option<u64>,
) -> Result<Response, ApiError> {
    if !key.may_use(&model.name, &[]) {
        return Err(ApiError::ModelNotAllowed(model.name.clone()));
    }
    let ups = &state.upstreams;
    let (prompt_bytes, affinity) =
        routing::prompt_info(request, ups.settings.affinity_prefix_bytes);
    let client = ups
        .client
        .as_ref()
        .ok_or_else(|| ApiError::Internal("the upstreams have no HTTP client".into()))?;
    let order = ups.order(model, pin.or(affinity));
    // Only a token limit needs the prompt's count before forwarding (the per-key
    // counters take the usage the answer reports); the replica tried first counts it.
    let prompt = match order.first() {
        Some(first) if key.limits.has_token_limit() => {
            tokens::count_prompt(client, first, endpoint, request, prompt_bytes).await
        }
        _ => tokens::estimate(prompt_bytes),
    };
    let mut charge = Charge::new(key.clone(), prompt, tokens::output_budget(request));
    let tokens = crate::rate_limit::charge_tokens(key, charge.charged())
        .await
        .inspect_err(|_| charge.forget())?;
    let streaming = request.get("stream").and_then(Value::as_bool) == Some(true);
    // A non-streaming answer comes whole, so it has the whole request timeout; each
    // attempt of a stream must answer (headers) within the first-byte bound.
    let request_deadline = tokio::time::Instant::now() + state.request_timeout;
    let mut last = ApiError::UpstreamUnavailable(format!("no upstream serves `{}`", model.name));
    let tries = order.len();
    for (i, replica) in order.into_iter().enumerate() {
        let mut attempt = InFlight::start(replica.clone(), &model.name);
        let deadline = if streaming {
            tokio::time::Instant::now() + ups.settings.first_byte_timeout()
        } else {
            request_deadline
        };
        let sent = send(client, &replica, endpoint, headers, body.clone(), deadline).await;
        let resp = match sent {
            Ok(r) if r.status().is_server_error() && i + 1 < tries => {
                attempt.finish("server_error");
                tracing::warn!(upstream = %replica.url, status = %r.status(), "upstream failed before answering; trying another");
                continue;
            }
            Ok(r) => r,
            Err(Retry { outcome, error }) => {
                attempt.finish(outcome);
                tracing::warn!(upstream = %replica.url, outcome, error = %error, "upstream failed before answering");
                if outcome == "timeout" && !streaming {
                    // The whole request's time is spent: another replica would have none.
                    return Err(ApiError::Timeout(state.request_timeout.as_secs()));
                }
                last = error;
                continue;
            }
        };
        let idle = ups.settings.first_byte_timeout();
        let mut out = relay(resp, attempt, charge, request_deadline, idle).await?;
        if let Some(t) = tokens {
            crate::rate_limit::set_headers(out.headers_mut(), "tokens", &t);
        }
        return Ok(out);
    }
    // Nothing was generated: the whole charge comes back.
    charge.refund_all();
    Err(last)
}

/// Sends the request to one replica and waits for its response headers.
async fn send(
    client: &reqwest::Client,
    replica: &Replica,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Bytes,
    deadline: tokio::time::Instant,
) -> Result<reqwest::Response, Retry> {
    let mut req = client
        .post(format!("{}{}", replica.url, endpoint.path()))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(k) = &replica.api_key {
        req = req.bearer_auth(k);
    }
    if let Some(id) = headers.get(REQUEST_ID) {
        req = req.header(REQUEST_ID, id);
    }
    match tokio::time::timeout_at(deadline, req.send()).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => {
            let connect = e.is_connect();
            if connect {
                // Refused or unreachable: skip it until a health check passes.
                replica.set_healthy(false);
            }
            Err(Retry {
                outcome: if connect { "connect_error" } else { "error" },
                error: ApiError::UpstreamUnavailable(format!(
                    "upstream {}: {}",
                    replica.url,
                    error_chain(&e)
                )),
            })
        }
        Err(_) => Err(Retry {
            outcome: "timeout",
            error: ApiError::UpstreamUnavailable(format!(
                "upstream {} did not answer in time",
                replica.url
            )),
        }),
    }
}

/// The upstream's answer to the client: its status and content type (and `cache-control`,
/// `retry-after`). Event streams are relayed as they come; anything else is read whole
/// first (a body that breaks becomes a clean 502).
async fn relay(
    resp: reqwest::Response,
    mut attempt: InFlight,
    mut charge: Charge,
    deadline: tokio::time::Instant,
    idle: Duration,
) -> Result<Response, ApiError> {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::RETRY_AFTER,
    ] {
        if let Some(v) = resp.headers().get(name.as_str()) {
            if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                headers.insert(name, v);
            }
        }
    }
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let outcome = match status.as_u16() {
        200..=399 => "ok",
        400..=499 => "client_error",
        _ => "server_error",
    };
    let body = if is_sse {
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        let url = attempt.replica().url.clone();
        let relay = Relay::new(resp.bytes_stream(), attempt, outcome, idle, url);
        Body::from_stream(relay.settling(charge).into_stream())
    } else {
        let bytes = match tokio::time::timeout_at(deadline, resp.bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                attempt.finish("stream_error");
                return Err(ApiError::UpstreamFailed(format!(
                    "upstream {} broke off its answer: {}",
                    attempt.replica().url,
                    error_chain(&e)
                )));
            }
            Err(_) => {
                attempt.finish("timeout");
                return Err(ApiError::UpstreamFailed(format!(
                    "upstream {} did not finish its answer in time",
                    attempt.replica().url
                )));
            }
        };
        attempt.finish(outcome);
        if status.is_success() {
            let usage = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| tokens::usage_of(&v));
            charge.settle(usage);
        } else {
            // An error answer generated nothing.
            charge.refund_all();
        }
        Body::from(bytes)
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    Ok(out)
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Relays an upstream event stream whole event by whole event: what arrives is passed on
/// at once up to its last complete event, so an upstream that breaks mid-event never
/// leaves half an event before the error event. Dropping it (client gone) drops the
/// upstream response, which closes that connection and cancels the upstream request.
struct Relay {
    upstream: ByteStream,
    pending: Vec<u8>,
    attempt: InFlight,
    outcome: &'static str,
    idle: Duration,
    url: String,
    done: bool,
    /// The request's charge, settled with the usage an event reports (when the client
    /// asked for it: `stream_options.include_usage`) once the stream has ended.
    charge: Option<Charge>,
    usage: Option<(usize, usize)>,
}

impl Relay {
    fn new(
        upstream: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
        attempt: InFlight,
        outcome: &'static str,
        idle: Duration,
        url: String,
    ) -> Self {
        Relay {
            upstream: Box::pin(upstream),
            pending: Vec::new(),
            attempt,
            outcome,
            idle,
            url,
            done: false,
            charge: None,
            usage: None,
        }
    }

    fn settling(mut self, charge: Charge) -> Self {
        self.charge = Some(charge);
        self
    }

    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut r| async move {
            let out = r.next_piece().await?;
            Some((Ok(out), r))
        })
    }

    async fn next_piece(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        loop {
            let why = match tokio::time::timeout(self.idle, self.upstream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    // The common case, whole events in one chunk, passes on without a copy.
                    let events: Bytes = if self.pending.is_empty()
                        && !chunk.is_empty()
                        && complete_events(&chunk) == chunk.len()
                    {
                        chunk
                    } else {
                        self.pending.extend_from_slice(&chunk);
                        match complete_events(&self.pending) {
                            0 => continue,
                            n => {
                                let rest = self.pending.split_off(n);
                                std::mem::replace(&mut self.pending, rest).into()
                            }
                        }
                    };
                    if let Some(u) = tokens::usage_in_event(&events) {
                        self.usage = Some(u);
                    }
                    return Some(events);
                }
                Ok(None) => {
                    self.done = true;
                    self.attempt.finish(self.outcome);
                    if let Some(c) = &mut self.charge {
                        c.settle(self.usage);
                    }
                    return (!self.pending.is_empty())
                        .then(|| std::mem::take(&mut self.pending).into());
                }
                Ok(Some(Err(e))) => error_chain(&e),
                Err(_) => format!("no data for {} s", self.idle.as_secs()),
            };
            // Broken mid-way: drop the partial event, say why, end the stream.
            self.done = true;
            self.attempt.finish("stream_error");
            tracing::warn!(upstream = %self.url, error = %why, "upstream stream broke off");
            let err = ApiError::UpstreamFailed(format!(
                "upstream {} broke off the stream: {why}",
                self.url
            ));
            let mut out = format!("data: {}\n\n", err.body()).into_bytes();
            out.extend_from_slice(b"data: [DONE]\n\n");
            return Some(out.into());
        }
    }
}

/// Bytes of `buf` up to the end of its last complete event (a blank line: `\n\n`, or
/// `\n\r\n`), 0 when none is complete.
fn complete_events(buf: &[u8]) -> usize {
    (1..buf.len())
        .rev()
        .find(|&i| {
            buf[i] == b'\n'
                && (buf[i - 1] == b'\n' || (i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n'))
        })
        .map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn events_are_cut_at_their_last_blank_line() {
        assert_eq!(complete_events(b""), 0);
        assert_eq!(complete_events(b"data: {}\n"), 0);
        assert_eq!(complete_events(b"data: a\n\ndata: b"), 9);
        assert_eq!(complete_events(b"data: a\n\ndata: b\n\n"), 18);
        assert_eq!(complete_events(b"data: a\r\n\r\nx"), 11);
    }

    #[tokio::test]
    async fn a_broken_stream_ends_with_an_error_event() {
        let r = Arc::new(Replica::new("http://x:1".into(), None, vec!["m".into()]));
        let chunks: Vec<reqwest::Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"b\"")),
            Ok(Bytes::from_static(b":2}\n\ndata: {\"half")),
        ];
        // A stream that then stalls: the idle bound ends it.
        let upstream = futures_util::stream::iter(chunks).chain(futures_util::stream::pending());
        let relay = Relay::new(
            upstream,
            InFlight::start(r.clone(), "m"),
            "ok",
            Duration::from_millis(50),
            "http://x:1".into(),
        );
        let got: Vec<Bytes> = relay.into_stream().map(|b| b.unwrap()).collect().await;
        let text: String = got.iter().map(|b| String::from_utf8_lossy(b)).collect();
        assert!(
            text.starts_with("data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: {\"error\":"),
            "{text}"
        );
        assert!(
            !text.contains("half") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
        assert_eq!(r.load(), 0, "no longer in flight");
    }
}
