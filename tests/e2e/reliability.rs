//! Hostile input, slow clients, faults and overload against the real binary (the
//! figures and how to rerun everything are in RELIABILITY.md).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::gateway::{chat, error_of, hi, new_key};
use crate::support::{metric, metric_sum, Server};
use crate::websocket::{connect, is, send, until};

const KEY: &str = "sk-sluice-dev";

/// Sends `request` on a fresh connection and reads until the server closes it.
async fn raw(server: &Server, request: &[u8]) -> (u16, String, String) {
    let addr = server.base.trim_start_matches("http://").to_string();
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // The server may answer (413, 408) before it has read everything: keep writing
    // in the background, and keep whatever arrived if the connection is then reset.
    let request = request.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        wr
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the server answers and closes");
    writer.abort();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head.to_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_string(), body)
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn post(path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        r.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    r.push_str("\r\n");
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn assert_error_object(body: &str, what: &str) -> Value {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|_| panic!("{what}: the error body is not JSON: {body:?}"));
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty())
            && e["type"].is_string()
            && e.get("param").is_some()
            && e.get("code").is_some(),
        "{what}: not an OpenAI error object: {body}"
    );
    v
}

/// What a malformed request is, where it goes, its content type, body and the status
/// it must get.
type Case<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, u16);

#[tokio::test]
async fn malformed_requests_get_a_4xx_openai_error_and_the_server_keeps_serving() {
    let server = Server::start(&[]);
    let chat_path = "/v1/chat/completions";
    let j = Some("application/json");
    let msg = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string().into_bytes()
    };
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let long_prompt = json!({"prompt": "word ".repeat(9000), "max_tokens": 4});
    let many_bias: serde_json::Map<String, Value> =
        (0..2000).map(|i| (i.to_string(), json!(1))).collect();
    let cases: Vec<Case> = vec![
        ("bad JSON", chat_path, j, b"{\"messages\": [".to_vec(), 400),
        ("empty body", chat_path, j, Vec::new(), 400),
        ("null body", chat_path, j, b"null".to_vec(), 400),
        ("messages not a list", chat_path, j, br#"{"messages":"hi"}"#.to_vec(), 400),
        ("NaN", chat_path, j, br#"{"messages":[{"role":"user","content":"x"}],"temperature":NaN}"#.to_vec(), 400),
        ("deep nesting", chat_path, j, format!(r#"{{"messages":{deep}}}"#).into_bytes(), 400),
        ("invalid UTF-8", chat_path, j, b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(), 400),
        ("lone surrogate", chat_path, j, br#"{"messages":[{"role":"user","content":"\ud800"}]}"#.to_vec(), 400),
        ("duplicate field", chat_path, j, br#"{"messages":[{"role":"user","content":"x"}],"n":1,"n":2}"#.to_vec(), 400),
        ("max_tokens 1e30", chat_path, j, msg(json!({"max_tokens": 1e30})), 400),
        ("max_tokens as text", chat_path, j, msg(json!({"max_tokens": "10"})), 400),
        ("max_tokens negative", chat_path, j, msg(json!({"max_tokens": -5})), 400),
        ("max_tokens past the context", chat_path, j, msg(json!({"max_tokens": 10_000_000})), 400),
        ("n = 1000", chat_path, j, msg(json!({"n": 1000})), 400),
        ("100 stop strings", chat_path, j, msg(json!({"stop": vec!["x"; 100]})), 400),
        ("a 10 KB stop string", chat_path, j, msg(json!({"stop": "y".repeat(10_000)})), 400),
        ("2000 logit_bias entries", chat_path, j, msg(json!({"logit_bias": many_bias})), 400),
        ("logit_bias out of range", chat_path, j, msg(json!({"logit_bias": {"5": 1e9}})), 400),
        ("logit_bias key not an id", chat_path, j, msg(json!({"logit_bias": {"five": 1}})), 400),
        ("temperature -1", chat_path, j, msg(json!({"temperature": -1})), 400),
        ("top_logprobs 1000", chat_path, j, msg(json!({"logprobs": true, "top_logprobs": 1000})), 400),
        ("empty messages", chat_path, j, br#"{"messages":[]}"#.to_vec(), 400),
        ("unknown role", chat_path, j, br#"{"messages":[{"role":"narrator","content":"x"}]}"#.to_vec(), 400),
        ("image content", chat_path, j, br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#.to_vec(), 400),
        ("unsupported field", chat_path, j, msg(json!({"tools": [{"type": "function"}]})), 400),
        ("prompt longer than the context", "/v1/completions", j, long_prompt.to_string().into_bytes(), 400),
        ("token id outside the vocabulary", "/v1/completions", j, br#"{"prompt":[99999999],"max_tokens":1}"#.to_vec(), 400),
        ("negative token id", "/v1/completions", j, br#"{"prompt":[-1],"max_tokens":1}"#.to_vec(), 400),
        ("empty prompt", "/v1/completions", j, br#"{"prompt":"","max_tokens":1}"#.to_vec(), 400),
        ("tokenize garbage", "/tokenize", j, b"\x00\x01".to_vec(), 400),
        ("5 MiB body", chat_path, j, vec![b' '; 5 << 20], 413),
        ("no content type", chat_path, None, msg(json!({})), 415),
        ("text/plain", chat_path, Some("text/plain"), msg(json!({})), 415),
        ("unknown route", "/v1/engines", j, msg(json!({})), 404),
    ];
    for (what, path, ct, body, want) in cases {
        let (status, _, resp) = raw(&server, &post(path, ct, &body)).await;
        assert_eq!(status, want, "{what}: {resp}");
        assert_error_object(&resp, what);
    }
    // Wrong method: 405, still an OpenAI error.
    let (status, _, resp) = raw(
        &server,
        b"GET /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405, "{resp}");
    assert_error_object(&resp, "GET on a POST route");
    // A request head over 64 KiB is refused by the HTTP layer itself (431, no body).
    let big_header = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nX-Junk: {}\r\nConnection: close\r\n\r\n",
        "j".repeat(100_000)
    );
    let (status, _, _) = raw(&server, big_header.as_bytes()).await;
    assert_eq!(status, 431);
    // Nothing above hurt the server.
    let r = chat(&server, KEY, hi(json!({"max_tokens": 4}))).await;
    assert_eq!(r.status(), 200);
    assert!(server
        .metrics()
        .await
        .contains("sluice_http_requests_total"));
    let m = server.metrics().await;
    assert!(
        !m.lines()
            .any(|l| l.starts_with("sluice_http_requests_total") && l.contains("status=\"5")),
        "a malformed request got a 5xx:\n{m}"
    );
}

#[tokio::test]
async fn every_route_refuses_bad_keys_model_allow_lists_hold_and_admin_routes_need_admin() {
    let (user, user_entry) = new_key("user", "models = [\"a\"]");
    let (ops, ops_entry) = new_key("ops", "admin = true");
    let toml = format!(
        "[[models]]\nname = \"a\"\npath = \"{{model}}\"\n[[models]]\nname = \"b\"\npath = \"{{model}}\"\n{user_entry}{ops_entry}"
    );
    let mut server = Server::with_config_logs(&toml, "trace");
    let client = Server::client();
    let canary = "sk-wrong-canary-4417";
    let routes: [(&str, &str, Value); 6] = [
        ("POST", "/v1/chat/completions", hi(json!({}))),
        (
            "POST",
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 1}),
        ),
        ("GET", "/v1/models", Value::Null),
        ("POST", "/tokenize", json!({"prompt": "x"})),
        ("POST", "/detokenize", json!({"tokens": [1]})),
        ("GET", "/admin/models", Value::Null),
    ];
    for (method, path, body) in &routes {
        for (auth, code) in [
            (None, "missing_api_key"),
            (Some(format!("Bearer {canary}")), "invalid_api_key"),
            (Some(format!("Basic {canary}")), "missing_api_key"),
            (Some("Bearer ".to_string()), "missing_api_key"),
        ] {
            let mut req = client.request(method.parse().unwrap(), format!("{}{path}", server.base));
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            if !body.is_null() {
                req = req.json(body);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {text}");
            let v = assert_error_object(&text, path);
            assert_eq!(v["error"]["code"], code, "{method} {path} with {auth:?}");
            assert!(!text.contains(canary), "a key was echoed: {text}");
        }
    }
    // The WebSocket checks a key in the header before upgrading.
    let url = server.base.replacen("http://", "ws://", 1) + "/v1/ws";
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {canary}").parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");

    // The user key reaches model a only, on every route that names a model.
    let post_as = |key: &str, path: &str, body: Value| {
        client
            .post(format!("{}{path}", server.base))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    for (path, body) in [
        ("/v1/chat/completions", hi(json!({"model": "b"}))),
        (
            "/v1/completions",
            json!({"model": "b", "prompt": "x", "max_tokens": 1}),
        ),
        ("/tokenize", json!({"model": "b", "prompt": "x"})),
    ] {
        let v = error_of(post_as(&user, path, body.clone()).await.unwrap(), 403).await;
        assert_eq!(v["error"]["code"], "model_not_allowed", "{path}");
        let mut ok = body.clone();
        ok["model"] = json!("a");
        assert_eq!(
            post_as(&user, path, ok).await.unwrap().status(),
            200,
            "{path}"
        );
    }
    let get_json = |path: &str, key: &str| {
        client
            .get(format!("{}{path}", server.base))
            .bearer_auth(key)
            .send()
    };
    let models: Value = get_json("/v1/models", &user)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    let mut ws = connect(&server, Some(&user)).await;
    for m in [
        json!({"type": "join", "session": "s", "user": "u"}),
        json!({"type": "say", "content": "hi"}),
        json!({"type": "generate", "model": "b", "max_tokens": 2}),
    ] {
        send(&mut ws, m).await;
    }
    let events = until(&mut ws, is("error")).await;
    assert_eq!(events.last().unwrap()["code"], "model_not_allowed");

    // Admin routes: 403 for the user key, 200 for the admin key; fault injection is
    // not even routed unless configured.
    let r = get_json("/admin/models", &user).await.unwrap();
    assert_eq!(error_of(r, 403).await["error"]["code"], "admin_required");
    let engines: Value = get_json("/admin/models", &ops)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(engines["data"].as_array().unwrap().len(), 2);
    assert_eq!(engines["data"][0]["ready"], true);
    // What computes the model: the CPU runtime, and the kernel set it runs.
    assert_eq!(engines["data"][0]["backend"], "cpu");
    assert!(!engines["data"][0]["device"].as_str().unwrap().is_empty());
    let r = client
        .post(format!("{}/admin/models/a/inject-panic", server.base))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r, 404).await["error"]["code"], "not_found");

    // No key, right or wrong, reached the logs, even at trace level; nor did a prompt.
    let logs = server.logs.clone().unwrap();
    server.terminate();
    std::thread::sleep(Duration::from_millis(100));
    let logs = logs.lock().unwrap().clone();
    assert!(
        logs.contains("/admin/models"),
        "requests are logged:\n{logs}"
    );
    for secret in [user.as_str(), ops.as_str(), canary] {
        assert!(!logs.contains(secret), "{secret} reached the logs");
    }
}

#[tokio::test]
async fn slow_clients_time_out_and_connections_are_bounded() {
    let server = Server::with_config(
        // The stalled clients below must still hold their slots when the seventh comes:
        // a header timeout of a few seconds leaves a busy machine the time to get there.
        "[limits]\nmax_connections = 6\nheader_read_timeout_seconds = 3\nbody_read_timeout_seconds = 1\n[[models]]\nname = \"m\"\npath = \"{model}\"\n",
        &[],
    );
    let addr = server.base.trim_start_matches("http://").to_string();
    // Six clients each send half a request head and stall (slowloris).
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A seventh connection is over the limit: answered with 503, not queued (a queued one
    // would be served once a stalled client is cut off).
    let (status, head, body) = raw(
        &server,
        b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503, "{head}");
    assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
    assert_eq!(
        assert_error_object(&body, "over the limit")["error"]["code"],
        "overloaded"
    );
    // The stalled clients are cut off after the header timeout, freeing their slots.
    for mut s in stalled {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "a slowloris connection was never closed");
    }
    let (status, _, _) = raw(
        &server,
        b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    // A body that stops arriving: 408 after the body timeout.
    let mut half = post(
        "/v1/chat/completions",
        Some("application/json"),
        &[b' '; 100],
    );
    half.truncate(half.len() - 90);
    let (status, _, body) = raw(&server, &half).await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(
        assert_error_object(&body, "stalled body")["error"]["code"],
        "body_timeout"
    );
    // An idle keep-alive connection is closed after the same timeout.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "an idle keep-alive connection stayed open");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn an_engine_panic_fails_requests_in_flight_and_the_engine_restarts() {
    let (user, user_entry) = new_key("user", "");
    let (ops, ops_entry) = new_key("ops", "admin = true");
    let server = Server::with_config(
        &format!("[debug]\nfault_injection = true\n[[models]]\nname = \"m\"\npath = \"{{model}}\"\n{user_entry}{ops_entry}"),
        &[],
    );
    let client = Server::client();
    let greedy = hi(json!({"max_tokens": 24, "temperature": 0}));
    let answer = |r: Value| {
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = answer(
        chat(&server, &user, greedy.clone())
            .await
            .json()
            .await
            .unwrap(),
    );

    let resp = chat(
        &server,
        &user,
        hi(json!({"max_tokens": 4000, "ignore_eos": true, "stream": true})),
    )
    .await;
    let mut stream = resp.bytes_stream();
    let mut raw_sse = String::new();
    while raw_sse.matches("\"content\"").count() < 3 {
        raw_sse.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    let inject = |key: String| {
        client
            .post(format!("{}/admin/models/m/inject-panic", server.base))
            .bearer_auth(key)
            .send()
    };
    let r = inject(user.clone()).await.unwrap();
    assert_eq!(error_of(r, 403).await["error"]["code"], "admin_required");
    assert_eq!(inject(ops.clone()).await.unwrap().status(), 202);
    // /ready turns 503 while the engine restarts, then 200 again.
    let mut saw = Vec::new();
    let t = Instant::now();
    loop {
        let r = client
            .get(format!("{}/ready", server.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if saw.last() != Some(&status) {
            if status == 503 {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["status"], "engine_restarting", "{v}");
                // Restarting is not down: the process stays healthy.
                let h = client
                    .get(format!("{}/health", server.base))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(h.status(), 200);
            }
            saw.push(status);
        }
        if saw == [200, 503, 200] || saw == [503, 200] {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "/ready went {saw:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The stream in flight ended with an error event, not silence.
    while let Some(c) = stream.next().await {
        raw_sse.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    assert!(
        raw_sse.contains("\"error\"") && raw_sse.contains("restarted"),
        "{raw_sse}"
    );
    assert!(raw_sse.ends_with("data: [DONE]\n\n"));
    let m = server.metrics().await;
    let restarts = [("model", "m")];
    assert_eq!(
        metric_sum(&m, "sluice_engine_restarts_total", &restarts),
        Some(1.0),
        "{m}"
    );
    // Serving resumes, with the same greedy text as before the panic.
    let after = answer(chat(&server, &user, greedy).await.json().await.unwrap());
    assert_eq!(after, before);
    server.wait_until_idle().await;
}

async fn cancelled(server: &Server) -> f64 {
    metric_sum(
        &server.metrics().await,
        "sluice_requests_finished_total",
        &[("reason", "cancelled")],
    )
    .unwrap_or(0.0)
}

/// Waits until the engine has cancelled `n` requests in all, then until it is idle.
async fn wait_cancelled(server: &Server, n: f64, what: &str) {
    let t = Instant::now();
    while cancelled(server).await < n {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what}: never cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.wait_until_idle().await;
    assert_eq!(cancelled(server).await, n, "{what}");
}

#[tokio::test]
async fn disconnects_at_every_stage_free_everything() {
    let server = Server::start(&[]);
    let addr = server.base.trim_start_matches("http://").to_string();
    let long_chat = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "Tell me a long story. ".repeat(150)}],
               "max_tokens": 2000, "ignore_eos": true, "stream": stream})
        .to_string()
        .into_bytes()
    };
    // Before the head is complete, and in the middle of a body.
    for partial in [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthoriz".to_vec(),
        {
            let mut p = post(
                "/v1/chat/completions",
                Some("application/json"),
                &long_chat(true),
            );
            p.truncate(p.len() - 100);
            p
        },
    ] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&partial).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
        server.wait_until_idle().await;
    }
    // Whole requests whose client leaves during prefill (a ~1,000-token prompt),
    // mid-stream, and while waiting for a non-streamed answer: each is cancelled.
    for (stream, wait_for_tokens) in [(true, 0), (true, 5), (false, 0)] {
        let before = cancelled(&server).await;
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&post(
            "/v1/chat/completions",
            Some("application/json"),
            &long_chat(stream),
        ))
        .await
        .unwrap();
        if wait_for_tokens > 0 {
            let mut seen = String::new();
            let mut buf = [0u8; 4096];
            while seen.matches("\"content\"").count() < wait_for_tokens {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        } else {
            // Long enough for the engine to take the request, not to prefill it.
            let t = Instant::now();
            while metric_sum(&server.metrics().await, "sluice_requests_running", &[]) != Some(1.0) {
                assert!(t.elapsed() < Duration::from_secs(30), "never admitted");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        drop(s);
        wait_cancelled(
            &server,
            before + 1.0,
            &format!("stream={stream} tokens={wait_for_tokens}"),
        )
        .await;
    }
    // The only participant of a session hangs up during its generation.
    let before = cancelled(&server).await;
    let mut ws = connect(&server, Some(KEY)).await;
    for m in [
        json!({"type": "join", "session": "lonely", "user": "u"}),
        json!({"type": "say", "content": "Tell me a long story."}),
        json!({"type": "generate", "max_tokens": 2000, "ignore_eos": true}),
    ] {
        send(&mut ws, m).await;
    }
    until(&mut ws, is("token")).await;
    drop(ws);
    wait_cancelled(&server, before + 1.0, "websocket").await;
    // Every connection above is closed on the server's side too (the one left is
    // the metrics request's own).
    let t = Instant::now();
    loop {
        let m = server.metrics().await;
        let open = metric(&m, "sluice_http_connections").unwrap_or(0.0);
        if open <= 1.0 && metric(&m, "sluice_ws_connections").unwrap_or(0.0) == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "connections left open:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_burst_far_above_capacity_is_refused_fast_and_accepted_requests_finish() {
    let server = Server::start(&["--max-running-requests", "4", "--max-waiting-requests", "4"]);
    let rss_before = server.rss_kib();
    let client = Server::client();
    let burst = 160;
    let tasks: Vec<_> = (0..burst)
        .map(|i| {
            let (client, base) = (client.clone(), server.base.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let r = client
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(KEY)
                    .json(
                        &json!({"messages": [{"role": "user", "content": format!("Count to {i}.")}],
                                  "max_tokens": 16, "ignore_eos": true}),
                    )
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").cloned();
                let body: Value = r.json().await.unwrap();
                (status, retry, body, started.elapsed())
            })
        })
        .collect();
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        let (status, retry, body, took) = t.await.unwrap();
        match status {
            200 => {
                assert_eq!(body["usage"]["completion_tokens"], 16, "{body}");
                ok.push(took);
            }
            503 => {
                assert_eq!(retry.unwrap(), "1");
                assert_eq!(body["error"]["code"], "overloaded", "{body}");
                refused.push(took);
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ok.len() + refused.len(), burst);
    // At least the waiting queue's worth plus the one running when the burst hit.
    assert!(
        ok.len() >= 5 && !refused.is_empty(),
        "{} ok, {} refused",
        ok.len(),
        refused.len()
    );
    // Refusals do not wait for the engine: the slowest one came back before the
    // slowest accepted request finished.
    assert!(refused.iter().max() < ok.iter().max());
    server.wait_until_idle().await;
    let grown_mib = server.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 200,
        "resident memory grew {grown_mib} MiB over one burst"
    );
}

#[tokio::test]
async fn sigterm_under_load_loses_no_stream_and_exits_cleanly() {
    // The grace period is what this test checks is honoured, not how long it is: make it
    // long enough that a machine busy with the rest of the suite still finishes the
    // streams (the default 30 s is not, on 2 loaded cores). The logs come back on failure.
    let mut server = Server::logs_at("info", "[limits]\nshutdown_grace_seconds = 600\n");
    let logs = server.logs.clone().expect("captured logs");
    let log_tail = move || {
        let l = logs.lock().unwrap();
        let from = l.len().saturating_sub(4000);
        let from = (from..l.len())
            .find(|&i| l.is_char_boundary(i))
            .unwrap_or(l.len());
        l[from..].to_string()
    };
    let mut streams = Vec::new();
    for i in 0..6 {
        let r = chat(
            &server,
            KEY,
            json!({"messages": [{"role": "user", "content": format!("Story number {i}")}],
                   "max_tokens": 150, "ignore_eos": true, "stream": true}),
        )
        .await;
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let first = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
        streams.push((first, body));
    }
    let code = tokio::task::spawn_blocking(move || server.terminate());
    for (mut raw_sse, mut body) in streams {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.unwrap_or_else(|e| panic!("{e}; server log: {}", log_tail()));
            raw_sse.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        assert!(
            raw_sse.ends_with("data: [DONE]\n\n"),
            "a stream was cut: {raw_sse}\nserver log: {}",
            log_tail()
        );
        let finish = raw_sse.matches("\"finish_reason\":\"length\"").count();
        assert_eq!(finish, 1, "{raw_sse}");
        assert!(raw_sse.matches("\"content\":").count() > 140);
    }
    assert_eq!(
        code.await.unwrap(),
        Some(0),
        "exit status after the drain; server log: {}",
        log_tail()
    );
}

#[tokio::test]
async fn the_shutdown_grace_period_is_a_hard_limit() {
    // 10 tokens a second for 1000 tokens: 100 s if it were let finish; the grace is 1 s.
    let mut server = Server::with_config(
        "[limits]\nshutdown_grace_seconds = 1\n\
         [[models]]\nname = \"slow\"\nengine = \"synthetic\"\ntokens_per_second = 10\n",
        &[],
    );
    let r = chat(
        &server,
        KEY,
        json!({"messages": [{"role": "user", "content": "go on"}],
               "max_tokens": 1000, "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut raw_sse = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    let started = std::time::Instant::now();
    let code = tokio::task::spawn_blocking(move || server.terminate());
    while let Some(chunk) = body.next().await {
        raw_sse.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let took = started.elapsed();
    assert!(
        raw_sse.contains("grace period is over") && raw_sse.ends_with("data: [DONE]\n\n"),
        "the stream should end with an error event, then [DONE]: {raw_sse}"
    );
    assert_eq!(code.await.unwrap(), Some(0));
    assert!(
        took < std::time::Duration::from_secs(20),
        "the stream ran {took:?} past SIGTERM with a 1 s grace period"
    );
}

#[tokio::test]
async fn an_engine_down_for_good_turns_health_503_and_the_admin_view_says_which() {
    let (ops, ops_entry) = new_key("ops", "admin = true");
    let server = Server::with_config(
        &format!(
            "[debug]\nfault_injection = true\n\
             [[models]]\nname = \"a\"\nengine = \"synthetic\"\ntokens_per_second = 100\n\
             [[models]]\nname = \"b\"\nengine = \"synthetic\"\n{ops_entry}"
        ),
        &[],
    );
    let client = Server::client();
    let get = |path: &str| {
        client
            .get(format!("{}{path}", server.base))
            .bearer_auth(&ops)
            .send()
    };
    let states = || async {
        let v: Value = get("/admin/models").await.unwrap().json().await.unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_string(),
                    m["state"].as_str().unwrap().to_string(),
                    m["ready"].as_bool().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let r = get("/health").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        states().await,
        [
            ("a".into(), "ready".into(), true),
            ("b".into(), "ready".into(), true)
        ]
    );
    // A stream in flight when the engine stops still gets every token.
    let resp = chat(
        &server,
        &ops,
        hi(json!({"model": "a", "max_tokens": 30, "stream": true})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut raw_sse = String::new();
    while !raw_sse.contains("\"content\"") {
        raw_sse.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    let r = client
        .post(format!("{}/admin/models/a/inject-stop", server.base))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    while let Some(c) = stream.next().await {
        raw_sse.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    assert!(
        raw_sse.contains("\"finish_reason\":\"length\""),
        "{raw_sse}"
    );
    // Once its loop thread has exited, /health is 503 and names the model: only a
    // restart of the process brings it back.
    let t = Instant::now();
    let health = loop {
        let r = get("/health").await.unwrap();
        if r.status() == 503 {
            break r.json::<Value>().await.unwrap();
        }
        assert_eq!(r.status(), 200);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "/health stayed 200 with engine a down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(health, json!({"status": "engine_down", "models": ["a"]}));
    let r = get("/ready").await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"status": "engine_down", "models": ["a"]})
    );
    assert_eq!(
        states().await,
        [
            ("a".into(), "down".into(), false),
            ("b".into(), "ready".into(), true)
        ]
    );
    // Requests for the dead model are refused with 503; the other model serves.
    let r = chat(&server, &ops, hi(json!({"model": "a"}))).await;
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_of(r, 503).await["error"]["code"], "overloaded");
    assert_eq!(
        chat(&server, &ops, hi(json!({"model": "b"})))
            .await
            .status(),
        200
    );
}

/// About `bytes` of prose-like text: pseudo-random words, so that the tokenizer's
/// word cache cannot shortcut the work as it would on one sentence repeated.
fn prose(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 16);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    while out.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for i in 0..(2 + x % 8) {
            out.push((b'a' + ((x >> (8 + 5 * i)) % 26) as u8) as char);
        }
        out.push_str(if x.is_multiple_of(13) { ". " } else { " " });
    }
    out.truncate(bytes);
    out
}

#[tokio::test]
async fn prompts_near_the_body_limit_do_not_stall_other_connections() {
    // One runtime worker: were prompts rendered and tokenized on it, nothing else could
    // be answered while they are.
    let model = crate::support::model_path();
    let server = Server::spawn_env(
        &["--model", model.to_str().unwrap()],
        None,
        &[("TOKIO_WORKER_THREADS", "1")],
    );
    // Just under the 4 MiB body limit once wrapped in JSON.
    let text = prose((4 << 20) - (4 << 10));
    let large = 2;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..large {
        let (base, done, text) = (server.base.clone(), done.clone(), text.clone());
        tasks.push(tokio::spawn(async move {
            let (path, body) = if i % 2 == 0 {
                ("/v1/completions", json!({"prompt": text, "max_tokens": 1}))
            } else {
                (
                    "/v1/chat/completions",
                    json!({"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
                )
            };
            let r = Server::client()
                .post(format!("{base}{path}"))
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (path, r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    // While the server's own gauge says prompts are being prepared, the one worker
    // answers /health and serves a whole new stream.
    let mut answered_while_busy = 0;
    while answered_while_busy < 3 && done.load(std::sync::atomic::Ordering::SeqCst) < large {
        let m = server.metrics().await;
        if metric(&m, "sluice_requests_preparing").unwrap_or(0.0) < 1.0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let r = Server::client()
            .get(format!("{}/health", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let resp = chat(
            &server,
            KEY,
            hi(json!({"max_tokens": 6, "ignore_eos": true, "stream": true})),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let sse = resp.text().await.unwrap();
        assert!(
            sse.contains("\"content\"") && sse.ends_with("data: [DONE]\n\n"),
            "{sse}"
        );
        answered_while_busy += 1;
    }
    assert!(
        answered_while_busy > 0,
        "the server answered nothing while it tokenized the large prompts"
    );
    // The large prompts still get their error, mapped as before: too long for the model.
    for t in tasks {
        let (path, status, body) = t.await.unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        let v = assert_error_object(&body, path);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("maximum context length is 8192"),
            "{path}: {body}"
        );
    }
    server.wait_until_idle().await;
}
