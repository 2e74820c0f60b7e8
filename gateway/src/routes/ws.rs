//! `GET /v1/ws`: WebSocket connections to collaborative sessions (protocol in
//! docs/websocket.md).
//!
//! Each connection has two tasks: this reader, which handles the client's messages, and a
//! writer, which drains the connection's bounded event queue into the socket and pings.
//! Generations run in their own task and feed the session, which fans events out.
//!
//! A generation passes the same checks as an HTTP chat completion, through the same code
//! and in the same order: the server's bound on requests in flight, shutdown, the key's
//! request rate and concurrent streams, model and parameters, the key's token rate and
//! the engine's queue. A refusal is the HTTP answer's error as an `error` event: the same
//! code, message and status. An upstream model's turn is forwarded as a streamed chat
//! completion (`crate::upstream::session_turn`) after the same first checks.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sluice_engine::{Event, RequestStream};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::api_types::{CommonParams, InMessage};
use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::load_shed::InFlight;
use crate::respond::Flavor;
use crate::sessions::{Membership, Refusal, Session};
use crate::state::SharedState;
use crate::ws_protocol::{ClientMessage, ProtocolError};

/// Browsers cannot set headers on a WebSocket: they authenticate with a first message.
const AUTH_DEADLINE: Duration = Duration::from_secs(5);
const PING_EVERY: Duration = Duration::from_secs(20);
/// A write that cannot complete in this long means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Close codes (RFC 6455).
const CLOSE_POLICY: u16 = 1008;
const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TRY_LATER: u16 = 1013;

/// Upgrades to a WebSocket. A key in `Authorization` is checked here (401 before the
/// upgrade when wrong); without one, the first message must be `auth`.
pub async fn ws_upgrade(
    State(state): State<SharedState>,
    Extension(in_flight): Extension<InFlight>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if state.is_draining() {
        return ApiError::Draining.into_response();
    }
    let key = match headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        None => None,
        Some(k) => match state.auth.find(k.trim()) {
            Some(k) => Some(k),
            None => return ApiError::InvalidApiKey.into_response(),
        },
    };
    let max = state.ws_max_message_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection(state, in_flight, socket, key))
}

/// What the reader asks the writer to do besides sending events.
enum Control {
    Close(u16, &'static str),
}

fn event_text(v: &Value) -> Arc<str> {
    v.to_string().into()
}

fn error_event(code: &str, message: impl std::fmt::Display) -> Arc<str> {
    event_text(&json!({"type": "error", "code": code, "message": message.to_string()}))
}

/// The `error` event for what HTTP answers with `e` (mapped in `error.rs`): the same
/// `code` (its `type` where the HTTP error has no code), `message` and `status`.
fn api_error_event(e: &ApiError) -> Arc<str> {
    let body = e.body();
    let err = &body["error"];
    let code = err["code"]
        .as_str()
        .or_else(|| err["type"].as_str())
        .unwrap_or("error");
    event_text(&json!({
        "type": "error", "code": code, "message": err["message"], "status": e.status().as_u16(),
    }))
}

/// Why a client message was refused.
enum Refused {
    /// By the session protocol: an `error` event with this code and message.
    Protocol(&'static str, String),
    /// By the API's checks, as HTTP would refuse it.
    Api(ApiError),
}

impl From<ApiError> for Refused {
    fn from(e: ApiError) -> Self {
        Refused::Api(e)
    }
}

async fn writer(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut events: mpsc::Receiver<Arc<str>>,
    mut control: mpsc::Receiver<Control>,
    kick: Arc<Notify>,
) {
    let close = |code: u16, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        let msg = tokio::select! {
            biased;
            _ = kick.notified() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close(CLOSE_TRY_LATER, "too slow: rejoin for a snapshot"))).await;
                return;
            }
            c = control.recv() => match c {
                Some(Control::Close(code, reason)) => {
                    // Events queued before the close still go out first.
                    while let Ok(t) = events.try_recv() {
                        let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(t.as_ref().into()))).await;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close(code, reason))).await;
                    return;
                }
                None => return,
            },
            e = events.recv() => match e {
                Some(t) => Message::Text(t.as_ref().into()),
                None => return,
            },
            _ = ping.tick() => Message::Ping(Vec::new().into()),
        };
        // A peer that stopped reading blocks the send once the socket buffers are full;
        // being cut off ends that wait too (the socket is dropped: no close frame can
        // get through a full buffer anyway).
        tokio::select! {
            biased;
            _ = kick.notified() => return,
            r = tokio::time::timeout(WRITE_TIMEOUT, sink.send(msg)) => {
                if !matches!(r, Ok(Ok(()))) {
                    return;
                }
            }
        }
    }
}

/// One connection: authenticate, then serve the client's messages until it leaves.
async fn connection(
    state: SharedState,
    in_flight: InFlight,
    socket: WebSocket,
    mut key: Option<Arc<ApiKey>>,
) {
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel::<Arc<str>>(state.sessions.send_queue);
    let (ctl_tx, ctl_rx) = mpsc::channel::<Control>(1);
    let kick = Arc::new(Notify::new());
    let mut writer = tokio::spawn(writer(sink, rx, ctl_rx, kick.clone()));
    let mut writer_done = false;
    let conn = state.sessions.connection_id();
    let _open = crate::metrics::WsConnection::open();
    let mut membership = Membership::new(conn, tx.clone(), kick.clone());
    let deadline = tokio::time::Instant::now() + AUTH_DEADLINE;
    let close = |code, reason| {
        let _ = ctl_tx.try_send(Control::Close(code, reason));
    };
    // Replies to this client go through the same queue as session events, so they keep
    // their order; a client too slow for its own replies is cut off like any other.
    let reply = |text: Arc<str>| {
        if tx.try_send(text).is_err() {
            kick.notify_one();
        }
    };
    loop {
        let authed = key.is_some();
        let next = tokio::select! {
            // The writer ends when the connection is cut off or broken: stop reading too.
            _ = &mut writer => {
                writer_done = true;
                break;
            }
            // Until authenticated, the first message must come before the deadline.
            m = tokio::time::timeout_at(
                if authed { tokio::time::Instant::now() + Duration::from_secs(86_400) } else { deadline },
                stream.next(),
            ) => match m {
                Ok(m) => m,
                Err(_) if authed => continue, // a quiet day; pings keep the socket alive
                Err(_) => {
                    reply(error_event("unauthenticated", "send {\"type\":\"auth\",\"api_key\":\"...\"} within 5 s"));
                    close(CLOSE_POLICY, "authentication timed out");
                    break;
                }
            },
        };
        let text = match next {
            None | Some(Ok(Message::Close(_))) => break,
            Some(Err(e)) => {
                // The only read error a live client can cause is an oversized message.
                let too_big = e.to_string().to_lowercase().contains("too long")
                    || e.to_string().to_lowercase().contains("too big");
                if too_big {
                    close(CLOSE_TOO_BIG, "message too big");
                }
                break;
            }
            Some(Ok(Message::Binary(_))) => {
                reply(error_event(
                    "unsupported_data",
                    "binary frames are not supported; send JSON text",
                ));
                close(CLOSE_UNSUPPORTED, "binary frames are not supported");
                break;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(t))) => t,
        };
        let msg = ClientMessage::parse(text.as_str());
        let Some(k) = key.clone() else {
            match msg {
                Ok(ClientMessage::Auth { api_key }) => match state.auth.find(&api_key) {
                    Some(found) => {
                        key = Some(found);
                        reply(event_text(&json!({"type": "authenticated"})));
                    }
                    None => {
                        reply(error_event(
                            "invalid_api_key",
                            "Incorrect API key provided.",
                        ));
                        close(CLOSE_POLICY, "invalid API key");
                        break;
                    }
                },
                Err(e @ ProtocolError::NotAnObject) => reply(error_event(e.code(), e)),
                _ => {
                    reply(error_event(
                        "unauthenticated",
                        "authenticate first: {\"type\":\"auth\",\"api_key\":\"...\"}",
                    ));
                    close(CLOSE_POLICY, "not authenticated");
                    break;
                }
            }
            continue;
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                reply(error_event(e.code(), &e));
                continue;
            }
        };
        let p = |code: &'static str, message: String| Err(Refused::Protocol(code, message));
        let result: Result<(), Refused> = match msg {
            ClientMessage::Auth { .. } => p("bad_request", "already authenticated".into()),
            ClientMessage::Join { session, user } => {
                match membership.join(&state.sessions, &session, user) {
                    Ok(()) => Ok(()),
                    Err(r) => p(r.code(), "the server holds too many sessions".into()),
                }
            }
            ClientMessage::Leave => {
                membership.leave();
                Ok(())
            }
            ClientMessage::Say { content } => match membership.current() {
                Some((s, user)) => match s.say(user, &content) {
                    Ok(()) => Ok(()),
                    Err(r) => p(
                        r.code(),
                        format!("the conversation holds at most {} bytes", s.max_bytes),
                    ),
                },
                None => p("not_joined", "join a session first".into()),
            },
            ClientMessage::Generate(params) => match membership.current() {
                Some((s, user)) => generate(&state, &in_flight, &k, s, user, *params).await,
                None => p("not_joined", "join a session first".into()),
            },
            ClientMessage::Cancel => match membership.current() {
                Some((s, _)) => match s.cancel() {
                    Ok(()) => Ok(()),
                    Err(r) => p(r.code(), "no generation is running".into()),
                },
                None => p("not_joined", "join a session first".into()),
            },
        };
        match result {
            Ok(()) => {}
            Err(Refused::Protocol(code, message)) => reply(error_event(code, message)),
            Err(Refused::Api(e)) => reply(api_error_event(&e)),
        }
    }
    // Leave now rather than at the end of the function: the writer may take 2 s below.
    drop(membership);
    drop(tx);
    drop(ctl_tx);
    if !writer_done {
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
        writer.abort();
    }
}

/// Starts a generation from the session's conversation, with chat-completion parameters,
/// after the checks an HTTP chat completion passes (see the module doc), in its order.
async fn generate(
    state: &SharedState,
    in_flight: &InFlight,
    key: &Arc<ApiKey>,
    s: &Arc<Session>,
    user: &str,
    params: CommonParams,
) -> Result<(), Refused> {
    let busy = || {
        Refused::Protocol(
            Refusal::Busy.code(),
            "a generation is already running in this session".into(),
        )
    };
    if s.is_busy() {
        return Err(busy());
    }
    let transcript = s.transcript();
    if !transcript.iter().any(|(role, _)| role == "user") {
        return Err(Refused::Protocol(
            Refusal::EmptyConversation.code(),
            "say something before generating".into(),
        ));
    }
    // What the HTTP layers check, in their order: load shedding, shutdown, key limits.
    let place = in_flight.enter()?;
    if state.is_draining() {
        crate::metrics::refused("draining");
        return Err(ApiError::Draining.into());
    }
    let admission = crate::rate_limit::admit(key).await?;
    if let Some(up) = crate::upstream::model_for(state, params.model.as_deref()) {
        // An upstream's model: the conversation goes there as a streamed chat completion.
        use crate::upstream::session_turn::{self, TurnRefused};
        if !key.may_use(&up.name, &[]) {
            return Err(ApiError::ModelNotAllowed(up.name.clone()).into());
        }
        let request = session_turn::request_body(&up.name, transcript, &params);
        let resp = session_turn::open(state, key, &s.id, up, &request)
            .await
            .map_err(|r| match r {
                TurnRefused::Api(e) => Refused::Api(e),
                TurnRefused::Upstream { status, message } => Refused::Protocol(
                    "upstream_refused",
                    format!("the model's server refused the turn ({status}): {message}"),
                ),
            })?;
        let id = state.new_id("gen");
        let (cancel_tx, cancel_rx) = oneshot::channel();
        // Dropping `resp` on refusal cancels the upstream request.
        s.start_generation(&id, user, cancel_tx)
            .map_err(|r| match r {
                Refusal::Busy => busy(),
                r => Refused::Protocol(r.code(), "say something before generating".into()),
            })?;
        let s2 = s.clone();
        tokio::spawn(async move {
            session_turn::drive(s2, resp, cancel_rx).await;
            drop((place, admission));
        });
        return Ok(());
    }
    // Then what the chat handler does. Rendering and tokenizing the conversation (up to
    // `limits.session_max_bytes`) runs off the runtime workers, as for HTTP.
    let index = state.resolve_model_index(params.model.as_deref(), key)?;
    let messages: Vec<InMessage> = transcript
        .into_iter()
        .map(|(role, content)| InMessage {
            role,
            content: Some(Value::String(content)),
            tool_calls: None,
            tool_call_id: None,
        })
        .collect();
    let prompt = super::chat_prompt_prepared(state, index, messages, true).await?;
    let model = &state.models[index];
    let (request, _) =
        crate::respond::plan(state, model, prompt, &params, Flavor::Chat, None).await?;
    let charged = request.prompt.len() + request.max_tokens;
    crate::rate_limit::charge_tokens(key, charged).await?;
    let prompt_tokens = request.prompt.len();
    let stream = crate::respond::submit(model, &request, 1)
        .inspect_err(|_| key.limits.refund_tokens(charged))?
        .pop()
        .ok_or_else(|| ApiError::Internal("no engine request was submitted".into()))?;
    let id = state.new_id("gen");
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let (s2, name) = (s.clone(), key.name.clone());
    // Dropping `stream` on refusal cancels the engine request.
    s.start_generation(&id, user, cancel_tx).map_err(|r| {
        // Refused after the charge (another member's generation won the race).
        key.limits.refund_tokens(charged);
        match r {
            Refusal::Busy => busy(),
            r => Refused::Protocol(r.code(), "say something before generating".into()),
        }
    })?;
    tokio::spawn(async move {
        drive(s2, stream, cancel_rx, prompt_tokens, name).await;
        // The generation held its place in flight and its key's stream slot until now.
        drop((place, admission));
    });
    Ok(())
}

/// Feeds a generation's events into its session until it ends or is cancelled.
async fn drive(
    session: Arc<Session>,
    mut stream: RequestStream,
    mut cancel: oneshot::Receiver<()>,
    prompt_tokens: usize,
    key_name: String,
) {
    loop {
        tokio::select! {
            biased;
            _ = &mut cancel => {
                drop(stream); // cancels the engine request
                session.finish_generation("cancelled", prompt_tokens, None);
                return;
            }
            ev = stream.recv() => match ev {
                Some(Event::Token { text, .. }) => session.token(&text),
                Some(Event::Done { reason, usage, .. }) => {
                    crate::metrics::tokens_by_key(&key_name, usage.prompt_tokens, usage.completion_tokens);
                    session.finish_generation(reason.as_str(), usage.prompt_tokens, Some(usage.completion_tokens));
                    return;
                }
                None => {
                    session.finish_generation("error", prompt_tokens, None);
                    return;
                }
            },
        }
    }
}
