//! Collaborative sessions over real WebSockets: shared order, late-join snapshots,
//! busy and cancel, authentication, malformed frames and slow readers.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::gateway::{chat, error_of, hi, new_key};
use crate::support::Server;

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub(crate) async fn connect(server: &Server, key: Option<&str>) -> Ws {
    let url = server.base.replacen("http://", "ws://", 1) + "/v1/ws";
    let mut req = url.into_client_request().unwrap();
    if let Some(k) = key {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {k}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect")
        .0
}

pub(crate) async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next JSON event (pings skipped); `None` when the connection closed.
async fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("no event for 60 s")
        {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(other)) => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Events up to and including the first one `stop` accepts.
pub(crate) async fn until(ws: &mut Ws, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(v) = next(ws).await {
        let done = stop(&v);
        out.push(v);
        if done {
            return out;
        }
    }
    panic!("connection closed before the awaited event; got {out:?}")
}

/// The close code the server ends the connection with.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("no close")
        {
            Some(Ok(Message::Close(f))) => return f.map(|f| f.code.into()),
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return None,
        }
    }
}

pub(crate) fn is(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["type"] == kind
}

fn tokens(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

const KEY: &str = "sk-sluice-dev";

#[tokio::test]
async fn three_clients_share_one_session_in_the_same_order() {
    let server = Server::start(&[]);
    let (mut a, mut b) = (
        connect(&server, Some(KEY)).await,
        connect(&server, Some(KEY)).await,
    );
    send(
        &mut a,
        json!({"type": "join", "session": "room", "user": "ann"}),
    )
    .await;
    let snap = until(&mut a, is("session")).await;
    assert_eq!(snap[0]["participants"], json!(["ann"]));
    send(
        &mut b,
        json!({"type": "join", "session": "room", "user": "bob"}),
    )
    .await;
    until(&mut b, is("session")).await;
    until(&mut a, |v| {
        v["type"] == "participant_joined" && v["user"] == "bob"
    })
    .await;
    send(
        &mut a,
        json!({"type": "say", "content": "Tell me about the sea."}),
    )
    .await;
    send(
        &mut b,
        json!({"type": "generate", "max_tokens": 40, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    // Ann sees a few tokens, then Cy joins mid-generation.
    let mut seen_a = until(&mut a, is("generation_started")).await;
    seen_a.extend(until(&mut a, is("token")).await);
    let mut c = connect(&server, Some(KEY)).await;
    send(
        &mut c,
        json!({"type": "join", "session": "room", "user": "cy"}),
    )
    .await;
    let seen_c = until(&mut c, is("generation_done")).await;
    seen_a.extend(until(&mut a, is("generation_done")).await);
    let seen_b = until(&mut b, is("generation_done")).await;

    // Ann and Bob saw the same events from the message on, Cy's arrival included.
    let from = |evs: &[Value]| -> Vec<Value> {
        let i = evs.iter().position(|e| e["type"] == "message").unwrap();
        evs[i..].to_vec()
    };
    assert_eq!(from(&seen_a), from(&seen_b));
    let full = tokens(&seen_a);
    assert!(!full.is_empty());
    // Cy: snapshot text + the tokens after it = the whole generation.
    assert_eq!(seen_c[0]["type"], "session");
    let partial = seen_c[0]["generation"]["text"]
        .as_str()
        .expect("joined mid-generation");
    assert_eq!(format!("{partial}{}", tokens(&seen_c)), full);
    let done = seen_c.last().unwrap();
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["completion_tokens"], 40);
    // The reply is now part of the session.
    let mut d = connect(&server, Some(KEY)).await;
    send(
        &mut d,
        json!({"type": "join", "session": "room", "user": "dee"}),
    )
    .await;
    let snap = until(&mut d, is("session")).await;
    let msgs = snap[0]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["content"], full.as_str());
}

#[tokio::test]
async fn one_generation_at_a_time_and_anyone_may_cancel() {
    let server = Server::start(&[]);
    let (mut a, mut b) = (
        connect(&server, Some(KEY)).await,
        connect(&server, Some(KEY)).await,
    );
    for (ws, user) in [(&mut a, "ann"), (&mut b, "bob")] {
        send(ws, json!({"type": "join", "session": "s", "user": user})).await;
        until(ws, is("session")).await;
    }
    send(&mut a, json!({"type": "generate", "max_tokens": 5})).await;
    let e = until(&mut a, is("error")).await;
    assert_eq!(e.last().unwrap()["code"], "empty_conversation");
    send(
        &mut a,
        json!({"type": "say", "content": "Count to a thousand."}),
    )
    .await;
    send(
        &mut a,
        json!({"type": "generate", "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;
    until(&mut a, is("token")).await;
    send(&mut b, json!({"type": "generate", "max_tokens": 5})).await;
    let e = until(&mut b, is("error")).await;
    assert_eq!(e.last().unwrap()["code"], "busy");
    send(&mut b, json!({"type": "cancel"})).await;
    for ws in [&mut a, &mut b] {
        let done = until(ws, is("generation_done")).await;
        let done = done.last().unwrap();
        assert_eq!(done["finish_reason"], "cancelled");
        assert!(done["usage"]["completion_tokens"].as_u64().unwrap() < 2000);
    }
    send(&mut b, json!({"type": "cancel"})).await;
    assert_eq!(
        until(&mut b, is("error")).await.last().unwrap()["code"],
        "no_generation"
    );
    // A new generation can start once the old one is gone.
    send(
        &mut b,
        json!({"type": "generate", "max_tokens": 3, "temperature": 0}),
    )
    .await;
    let done = until(&mut b, is("generation_done")).await;
    assert_eq!(done.last().unwrap()["finish_reason"], "length");
}

#[tokio::test]
async fn browsers_authenticate_with_a_first_message_and_bad_input_is_refused() {
    let server = Server::start(&[]);
    // A key in the header is checked before the upgrade.
    let url = server.base.replacen("http://", "ws://", 1) + "/v1/ws";
    let mut req = url.clone().into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", "Bearer sk-wrong".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");

    let mut ws = connect(&server, None).await;
    send(&mut ws, json!({"type": "auth", "api_key": KEY})).await;
    assert_eq!(next(&mut ws).await.unwrap()["type"], "authenticated");
    ws.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(next(&mut ws).await.unwrap()["code"], "bad_request");
    send(&mut ws, json!({"type": "dance"})).await;
    assert_eq!(next(&mut ws).await.unwrap()["code"], "unknown_type");
    send(&mut ws, json!({"type": "say", "content": "hi"})).await;
    assert_eq!(next(&mut ws).await.unwrap()["code"], "not_joined");
    send(&mut ws, json!({"type": "join", "session": "", "user": "x"})).await;
    assert_eq!(next(&mut ws).await.unwrap()["code"], "bad_request");
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1003));

    let mut ws = connect(&server, None).await;
    send(&mut ws, json!({"type": "auth", "api_key": "sk-wrong"})).await;
    assert_eq!(next(&mut ws).await.unwrap()["code"], "invalid_api_key");
    assert_eq!(close_code(&mut ws).await, Some(1008));

    let mut ws = connect(&server, None).await;
    send(
        &mut ws,
        json!({"type": "join", "session": "s", "user": "x"}),
    )
    .await;
    assert_eq!(next(&mut ws).await.unwrap()["code"], "unauthenticated");
    assert_eq!(close_code(&mut ws).await, Some(1008));

    let mut ws = connect(&server, Some(KEY)).await;
    let huge = json!({"type": "say", "content": "x".repeat(100_000)});
    let _ = ws.send(Message::Text(huge.to_string().into())).await;
    assert_eq!(close_code(&mut ws).await, Some(1009));
}

#[tokio::test]
async fn a_client_that_never_authenticates_is_closed_after_five_seconds() {
    let server = Server::start(&[]);
    // Timed from before the connection, so the server's clock (started at the upgrade)
    // cannot have run longer than ours however slowly the handshake went.
    let started = std::time::Instant::now();
    let mut ws = connect(&server, None).await;
    assert_eq!(next(&mut ws).await.unwrap()["code"], "unauthenticated");
    assert_eq!(close_code(&mut ws).await, Some(1008));
    // Not before the deadline (how long after it depends on how busy the machine is; the
    // codes above say that it was the deadline that closed it).
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(5), "{waited:?}");
}

#[tokio::test]
async fn a_slow_reader_is_cut_off_and_loses_nothing_on_rejoin() {
    let model = crate::support::model_path().display().to_string();
    // Big enough a conversation that the socket buffers fill before it is full.
    let server = Server::with_config(
        "[limits]\nws_send_queue = 4\nsession_max_bytes = 100000000\n",
        &["--model", &model],
    );
    let (mut fast, mut slow) = (
        connect(&server, Some(KEY)).await,
        connect(&server, Some(KEY)).await,
    );
    send(
        &mut fast,
        json!({"type": "join", "session": "s", "user": "fast"}),
    )
    .await;
    until(&mut fast, is("session")).await;
    send(
        &mut slow,
        json!({"type": "join", "session": "s", "user": "slow"}),
    )
    .await;
    // `slow` stops reading. Big messages fill the socket buffers, then its queue.
    let big = "y".repeat(60_000);
    let mut left = false;
    for i in 0..400 {
        send(
            &mut fast,
            json!({"type": "say", "content": format!("{i}{big}")}),
        )
        .await;
        // Keep reading our own copy so `fast` is never the slow one.
        let evs = until(&mut fast, |v| v["type"] == "message").await;
        if evs
            .iter()
            .any(|e| e["type"] == "participant_left" && e["user"] == "slow")
        {
            left = true;
            break;
        }
    }
    assert!(left, "the slow reader was never cut off");
    // Its connection ends (the server stops writing to it).
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(30), slow.next()).await {}
    // Rejoining gives a snapshot with every message said so far.
    let said = {
        send(&mut fast, json!({"type": "say", "content": "last"})).await;
        until(&mut fast, |v| {
            v["type"] == "message" && v["content"] == "last"
        })
        .await;
        let mut again = connect(&server, Some(KEY)).await;
        send(
            &mut again,
            json!({"type": "join", "session": "s", "user": "slow"}),
        )
        .await;
        until(&mut again, is("session")).await.pop().unwrap()
    };
    let msgs = said["messages"].as_array().unwrap();
    assert_eq!(msgs.last().unwrap()["content"], "last");
    assert!(msgs.len() >= 2);
}

/// Joins a fresh session on `ws` as `user` and says something, ready to generate.
async fn ready_to_generate(ws: &mut Ws, session: &str) {
    send(ws, json!({"type": "join", "session": session, "user": "u"})).await;
    until(ws, is("session")).await;
    send(
        ws,
        json!({"type": "say", "content": "Count to a thousand."}),
    )
    .await;
    until(ws, is("message")).await;
}

/// A long generation: it holds its places until cancelled.
fn long_generation() -> Value {
    json!({"type": "generate", "max_tokens": 2000, "ignore_eos": true})
}

/// The error event a `generate` on `ws` gets.
async fn refused_generation(ws: &mut Ws) -> Value {
    send(ws, json!({"type": "generate", "max_tokens": 4})).await;
    let evs = until(ws, |v| {
        v["type"] == "error" || v["type"] == "generation_started"
    })
    .await;
    evs.last().unwrap().clone()
}

#[tokio::test]
async fn websocket_generations_and_http_requests_share_the_in_flight_bound() {
    let server = Server::start(&[
        "--engine",
        "synthetic",
        "--tokens-per-second",
        "50",
        "--max-concurrent-requests",
        "1",
    ]);
    let mut ws = connect(&server, Some(KEY)).await;
    ready_to_generate(&mut ws, "bound").await;
    // A WebSocket generation holds the last place: HTTP is shed with 503.
    send(&mut ws, long_generation()).await;
    until(&mut ws, is("token")).await;
    let shed = error_of(chat(&server, KEY, hi(json!({}))).await, 503).await;
    assert!(
        shed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight"),
        "{shed}"
    );
    send(&mut ws, json!({"type": "cancel"})).await;
    until(&mut ws, is("generation_done")).await;
    // The place comes back when the generation ends; then an HTTP stream holds it.
    let mut held = None;
    for _ in 0..500 {
        let r = chat(
            &server,
            KEY,
            hi(json!({"max_tokens": 2000, "ignore_eos": true, "stream": true})),
        )
        .await;
        if r.status() == 200 {
            held = Some(r.bytes_stream());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut held = held.expect("the WebSocket generation never gave its place back");
    held.next().await.unwrap().unwrap();
    // ... and the WebSocket generation is refused exactly as HTTP was.
    let e = refused_generation(&mut ws).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], shed["error"]["code"]);
    assert_eq!(e["message"], shed["error"]["message"]);
    assert_eq!(e["status"], 503);
    // Once the HTTP stream is gone, the WebSocket may generate again.
    drop(held);
    let mut started = false;
    for _ in 0..500 {
        let e = refused_generation(&mut ws).await;
        if e["type"] == "generation_started" {
            started = true;
            break;
        }
        assert_eq!(e["code"], "overloaded", "{e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started, "the HTTP stream never gave its place back");
    let done = until(&mut ws, is("generation_done")).await;
    assert_eq!(done.last().unwrap()["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn a_limited_key_is_refused_over_websocket_as_over_http() {
    let model = crate::support::model_path().display().to_string();
    let (one_stream, a) = new_key("one-stream", "max_concurrent_streams = 1");
    let (one_request, b) = new_key("one-request", "requests_per_minute = 1");
    let (few_tokens, c) = new_key("few-tokens", "tokens_per_minute = 100");
    let server = Server::with_config(
        &format!("{a}\n{b}\n{c}"),
        &[
            "--model",
            &model,
            "--engine",
            "synthetic",
            "--tokens-per-second",
            "50",
        ],
    );

    // Concurrent streams: an HTTP stream holds the key's only one.
    let r = chat(
        &server,
        &one_stream,
        hi(json!({"max_tokens": 2000, "ignore_eos": true, "stream": true})),
    )
    .await;
    let mut held = r.bytes_stream();
    held.next().await.unwrap().unwrap();
    let http = error_of(chat(&server, &one_stream, hi(json!({}))).await, 429).await;
    let mut ws = connect(&server, Some(&one_stream)).await;
    ready_to_generate(&mut ws, "streams").await;
    let e = refused_generation(&mut ws).await;
    assert_eq!(e["code"], "rate_limit_exceeded", "{e}");
    assert_eq!(e["code"], http["error"]["code"]);
    assert_eq!(e["message"], http["error"]["message"]);
    assert_eq!(e["status"], 429);
    drop(held);

    // Request rate: the second request in a minute is refused on either side, with the
    // same message up to the wait it names.
    assert_eq!(
        chat(&server, &one_request, hi(json!({}))).await.status(),
        200
    );
    let http = error_of(chat(&server, &one_request, hi(json!({}))).await, 429).await;
    let mut ws = connect(&server, Some(&one_request)).await;
    ready_to_generate(&mut ws, "requests").await;
    let e = refused_generation(&mut ws).await;
    assert_eq!(e["code"], http["error"]["code"], "{e}");
    assert_eq!(e["status"], 429);
    let before_wait = |v: &Value| {
        v.as_str()
            .unwrap()
            .split("Retry in")
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        before_wait(&e["message"]),
        before_wait(&http["error"]["message"])
    );
    assert!(
        before_wait(&e["message"]).contains("1 requests per minute"),
        "{e}"
    );

    // Token rate: a generation larger than the whole budget is the same 400 on both.
    let http = error_of(
        chat(&server, &few_tokens, hi(json!({"max_tokens": 500}))).await,
        400,
    )
    .await;
    let mut ws = connect(&server, Some(&few_tokens)).await;
    ready_to_generate(&mut ws, "tokens").await;
    send(&mut ws, json!({"type": "generate", "max_tokens": 500})).await;
    let e = until(&mut ws, is("error")).await.pop().unwrap();
    assert_eq!(e["code"], "invalid_request_error", "{e}");
    assert_eq!(e["status"], 400);
    assert!(http["error"]["code"].is_null());
    assert_eq!(
        e["message"].as_str().unwrap().split(" tokens").nth(1),
        http["error"]["message"]
            .as_str()
            .unwrap()
            .split(" tokens")
            .nth(1)
    );
}
