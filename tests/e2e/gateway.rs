//! The gateway's policy over real sockets: configured keys and model allow-lists, rate
//! limits and their headers, body limits, request ids, readiness and the SIGTERM drain.

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::support::{metric_sum, Server};

/// A fresh key and its `[[keys]]` entry, from `sluice keys new`.
pub(crate) fn new_key(name: &str, extra: &str) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["keys", "new", "--name", name])
        .output()
        .expect("sluice keys new");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("API key (shown only now; store it): "))
        .expect("key line")
        .to_string();
    let entry = &text[text.find("[[keys]]").expect("entry")..];
    assert!(
        !entry.contains(&key),
        "the entry holds the hash, not the key"
    );
    (key, format!("{entry}{extra}\n"))
}

pub(crate) async fn chat(server: &Server, key: &str, body: Value) -> reqwest::Response {
    Server::client()
        .post(format!("{}/v1/chat/completions", server.base))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request")
}

pub(crate) fn hi(extra: Value) -> Value {
    let mut b = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

pub(crate) async fn error_of(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    let v: Value = resp.json().await.expect("error JSON");
    assert!(v["error"]["message"].is_string(), "{v}");
    v
}

#[tokio::test]
async fn configured_keys_replace_the_dev_key_and_limit_models() {
    let (alice, alice_entry) = new_key("alice", "models = [\"small\"]");
    let (bob, bob_entry) = new_key("bob", "");
    let server = Server::with_config(
        &format!(
            "[engine]\nkv_cache_tokens = 4096\n\n[[models]]\nname = \"small\"\npath = \"{{model}}\"\n\
             aliases = [\"smollm\"]\n\n[[models]]\nname = \"other\"\npath = \"{{model}}\"\n\n\
             {alice_entry}\n{bob_entry}"
        ),
        &[],
    );
    let v = error_of(chat(&server, "sk-sluice-dev", hi(json!({}))).await, 401).await;
    assert_eq!(v["error"]["code"], "invalid_api_key");
    // The alias routes to the allowed model; the other model is forbidden for alice.
    assert_eq!(
        chat(&server, &alice, hi(json!({"model": "smollm"})))
            .await
            .status(),
        200
    );
    let v = error_of(
        chat(&server, &alice, hi(json!({"model": "other"}))).await,
        403,
    )
    .await;
    assert_eq!(v["error"]["code"], "model_not_allowed");
    assert_eq!(
        chat(&server, &bob, hi(json!({"model": "other"})))
            .await
            .status(),
        200
    );
    let models = |key: String| {
        let base = server.base.clone();
        async move {
            let v: Value = Server::client()
                .get(format!("{base}/v1/models"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(models(alice.clone()).await, vec!["small"]);
    assert_eq!(models(bob.clone()).await, vec!["small", "other"]);
}

#[tokio::test]
async fn request_and_token_rates_give_429_with_openai_headers() {
    let (key, entry) = new_key(
        "limited",
        "requests_per_minute = 2\ntokens_per_minute = 2000",
    );
    let server = Server::with_config(&entry, &[]);
    let r = chat(&server, &key, hi(json!({}))).await;
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert!(h["x-ratelimit-reset-requests"]
        .to_str()
        .unwrap()
        .ends_with('s'));
    assert_eq!(h["x-ratelimit-limit-tokens"], "2000");
    let remaining: u64 = h["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let usage: Value = r.json().await.unwrap();
    let prompt = usage["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(remaining, 2000 - prompt - 2, "charged prompt + max_tokens");
    // Over the token rate: a request needing the whole budget while part of it is spent.
    let r = chat(&server, &key, hi(json!({"max_tokens": 2000 - prompt}))).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let v = error_of(r, 429).await;
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // The token refusal still counted as a request: the third request is over the rate.
    let r = chat(&server, &key, hi(json!({}))).await;
    assert!(r.headers().contains_key("retry-after"));
    let v = error_of(r, 429).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 requests per minute"),
        "{v}"
    );

    let m = server.metrics().await;
    for line in [
        "sluice_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1".to_string(),
        "sluice_http_requests_total{route=\"/v1/chat/completions\",status=\"429\"} 2".into(),
        "sluice_rate_limited_total{key=\"limited\",limit=\"requests\"} 1".into(),
        "sluice_rate_limited_total{key=\"limited\",limit=\"tokens\"} 1".into(),
        format!("sluice_key_prompt_tokens_total{{key=\"limited\"}} {prompt}"),
        "sluice_key_generation_tokens_total{key=\"limited\"} 2".into(),
        "sluice_time_to_first_token_seconds_count{".into(),
        "sluice_request_queue_seconds_count{model=\"SmolLM2-135M-Instruct.Q4_1\"} 1".into(),
    ] {
        assert!(m.contains(&line), "{line} missing from:\n{m}");
    }
}

#[tokio::test]
async fn concurrent_streams_per_key_are_capped() {
    let (key, entry) = new_key("one-stream", "max_concurrent_streams = 1");
    let server = Server::with_config(&entry, &[]);
    let long = hi(json!({"max_tokens": 400, "ignore_eos": true, "stream": true}));
    let first = chat(&server, &key, long.clone()).await;
    assert_eq!(first.status(), 200);
    let mut body = first.bytes_stream();
    body.next().await.expect("first chunk").unwrap();
    error_of(chat(&server, &key, hi(json!({}))).await, 429).await;
    drop(body);
    // The slot comes back once the first stream is gone.
    let mut ok = false;
    for _ in 0..100 {
        if chat(&server, &key, hi(json!({}))).await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the stream slot was never released");
}

#[tokio::test]
async fn oversized_bodies_are_413_and_request_ids_are_echoed() {
    let model = crate::support::model_path().display().to_string();
    let server = Server::with_config("[limits]\nmax_body_bytes = 2000\n", &["--model", &model]);
    let big = hi(json!({"user": "x".repeat(5000)}));
    let v = error_of(chat(&server, "sk-sluice-dev", big).await, 413).await;
    assert_eq!(v["error"]["code"], "payload_too_large");
    let r = Server::client()
        .get(format!("{}/health", server.base))
        .header("x-request-id", "client-chosen-id")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-chosen-id");
    let r = Server::client()
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"].len(), 36, "a UUID is assigned");
}

#[tokio::test]
async fn prompts_and_keys_stay_out_of_the_logs_unless_payload_logging_is_on() {
    let canary = "zebra-canary-7731";
    for (on, toml) in [(false, ""), (true, "log_payloads = true\n")] {
        let mut server = Server::logs_at("trace", toml);
        let r = chat(
            &server,
            "sk-sluice-dev",
            hi(json!({"messages": [{"role": "user", "content": canary}]})),
        )
        .await;
        assert_eq!(r.status(), 200);
        let _ = r.text().await;
        let logs = server.logs.clone().unwrap();
        server.terminate();
        std::thread::sleep(Duration::from_millis(100));
        let logs = logs.lock().unwrap().clone();
        assert!(
            logs.contains("/v1/chat/completions"),
            "requests are logged:\n{logs}"
        );
        assert_eq!(logs.contains(canary), on, "log_payloads = {on}:\n{logs}");
        assert!(
            !logs.contains("sk-sluice-dev\""),
            "a key reached the logs:\n{logs}"
        );
        assert!(
            !logs.contains("Bearer"),
            "an Authorization header reached the logs"
        );
    }
}

#[tokio::test]
async fn a_full_queue_answers_503_at_once_and_accepted_requests_finish() {
    let server = Server::start(&["--max-running-requests", "1", "--max-waiting-requests", "1"]);
    let long = hi(json!({"max_tokens": 300, "ignore_eos": true, "stream": true}));
    let running = chat(&server, "sk-sluice-dev", long.clone()).await;
    assert_eq!(running.status(), 200);
    let mut running = running.bytes_stream();
    running.next().await.unwrap().unwrap();
    // The role chunk comes before admission: wait until the engine runs the request.
    let t = std::time::Instant::now();
    while metric_sum(&server.metrics().await, "sluice_requests_running", &[]) != Some(1.0) {
        assert!(t.elapsed() < Duration::from_secs(30), "never admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiting = chat(&server, "sk-sluice-dev", long.clone()).await;
    assert_eq!(waiting.status(), 200, "one request may wait");
    let started = std::time::Instant::now();
    let r = chat(&server, "sk-sluice-dev", hi(json!({}))).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    assert_eq!(r.headers()["retry-after"], "1");
    let v = error_of(r, 503).await;
    assert_eq!(v["error"]["code"], "overloaded");
    // Both accepted streams still complete.
    for body in [running.boxed(), waiting.bytes_stream().boxed()] {
        let raw: Vec<u8> = body.map(|c| c.unwrap().to_vec()).concat().await;
        assert!(String::from_utf8(raw)
            .unwrap()
            .ends_with("data: [DONE]\n\n"));
    }
}

#[tokio::test]
async fn a_slow_non_streaming_generation_times_out_with_504_and_is_cancelled() {
    let server = Server::start(&["--request-timeout-seconds", "1"]);
    let started = std::time::Instant::now();
    let r = chat(
        &server,
        "sk-sluice-dev",
        hi(json!({"max_tokens": 5000, "ignore_eos": true})),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let v = error_of(r, 504).await;
    assert_eq!(v["error"]["code"], "timeout");
    // The engine stops working on it.
    let mut freed = false;
    for _ in 0..100 {
        let m = server.metrics().await;
        if metric_sum(&m, "sluice_requests_running", &[]) == Some(0.0)
            && metric_sum(&m, "sluice_kv_cache_usage_ratio", &[]) == Some(0.0)
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "the timed-out request kept running");
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let model = crate::support::model_path().display().to_string();
    let server = Server::with_config(
        "[server]\ncors_origins = [\"https://app.example\"]\n",
        &["--model", &model],
    );
    let preflight = |origin: &'static str| {
        Server::client()
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/chat/completions", server.base),
            )
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let allowed = ok.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn sse_framing_is_exactly_openais() {
    let server = Server::start(&[]);
    let r = chat(
        &server,
        "sk-sluice-dev",
        hi(json!({"max_tokens": 5, "temperature": 0, "stream": true})),
    )
    .await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let raw = r.text().await.unwrap();
    assert!(!raw.contains('\r'), "LF line endings only");
    let events: Vec<&str> = raw.split_inclusive("\n\n").collect();
    assert_eq!(events.last(), Some(&"data: [DONE]\n\n"));
    for e in &events[..events.len() - 1] {
        // One `data:` line per event, no `event:`/`id:` fields, compact JSON.
        let json = e
            .strip_prefix("data: ")
            .and_then(|x| x.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("bad frame {e:?}"));
        assert!(!json.contains('\n'));
        let v: Value = serde_json::from_str(json).unwrap();
        assert_eq!(
            serde_json::to_string(&v).unwrap().len(),
            json.len(),
            "compact JSON"
        );
        assert_eq!(v["object"], "chat.completion.chunk");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    }
    let first: Value = serde_json::from_str(&events[0][6..events[0].len() - 2]).unwrap();
    assert_eq!(
        first["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let last = events[events.len() - 2];
    let last: Value = serde_json::from_str(&last[6..last.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(last["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn requests_beyond_the_in_flight_cap_are_shed_with_503() {
    let server = Server::start(&["--max-concurrent-requests", "1"]);
    let r = chat(
        &server,
        "sk-sluice-dev",
        hi(json!({"max_tokens": 300, "ignore_eos": true, "stream": true})),
    )
    .await;
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    let shed = chat(&server, "sk-sluice-dev", hi(json!({}))).await;
    assert!(shed.headers().contains_key("retry-after"));
    let v = error_of(shed, 503).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight"),
        "{v}"
    );
    // Health checks are never shed.
    let h = Server::client()
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    while body.next().await.is_some() {}
    assert_eq!(
        chat(&server, "sk-sluice-dev", hi(json!({}))).await.status(),
        200
    );
}
