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
    // 60 tokens a minute: one comes back a second, so the refusal below holds for half
    // a minute after the first request, however slow the machine.
    let (key, entry) = new_key("limited", "requests_per_minute = 2\ntokens_per_minute = 60");
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
    assert_eq!(h["x-ratelimit-limit-tokens"], "60");
    let remaining: u64 = h["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let usage: Value = r.json().await.unwrap();
    let prompt = usage["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(remaining, 60 - prompt - 2, "charged prompt + max_tokens");
    // Over the token rate: a request needing the whole budget while part of it is spent.
    let r = chat(&server, &key, hi(json!({"max_tokens": 60 - prompt}))).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    // The 429 says what is left of each budget, as OpenAI's do: this request was counted
    // (no request left), and fewer tokens are left than it needed.
    let h = r.headers().clone();
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert_eq!(h["x-ratelimit-limit-tokens"], "60");
    let left: u64 = h["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((remaining..60).contains(&left), "{left} tokens left");
    for reset in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        assert!(h[reset].to_str().unwrap().ends_with('s'), "{reset}");
    }
    let v = error_of(r, 429).await;
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // The token refusal still counted as a request: the third request is over the rate.
    let r = chat(&server, &key, hi(json!({}))).await;
    assert!(r.headers().contains_key("retry-after"));
    let h = r.headers().clone();
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let reset = h["x-ratelimit-reset-requests"].to_str().unwrap();
    let reset: f64 = reset.strip_suffix('s').unwrap().parse().unwrap();
    assert!(reset > 0.0 && reset <= 60.0, "{reset}");
    assert_eq!(h["x-ratelimit-limit-tokens"], "60");
    assert!(h.contains_key("x-ratelimit-remaining-tokens"));
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
    let long = hi(json!({"max_tokens": 100, "ignore_eos": true, "stream": true}));
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
    let r = chat(&server, "sk-sluice-dev", hi(json!({}))).await;
    // Refused at once, not queued: the answer came before the running request (100
    // tokens) finished, whatever the machine's speed.
    let m = server.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "sluice_requests_finished_total",
            &[("reason", "length")]
        )
        .unwrap_or(0.0),
        0.0,
        "the refusal waited for the running request:\n{m}"
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
    let r = chat(
        &server,
        "sk-sluice-dev",
        hi(json!({"max_tokens": 5000, "ignore_eos": true})),
    )
    .await;
    let v = error_of(r, 504).await;
    assert_eq!(v["error"]["code"], "timeout");
    // The engine stops working on it: cut short, before its 5,000 tokens (how long those
    // would take depends on the machine; that the request never finished does not). The
    // gauges read 0 before the engine has even started, so wait for the cancellation.
    let mut freed = false;
    for _ in 0..1500 {
        let m = server.metrics().await;
        if metric_sum(
            &m,
            "sluice_requests_finished_total",
            &[("reason", "cancelled")],
        ) == Some(1.0)
            && metric_sum(&m, "sluice_requests_running", &[]) == Some(0.0)
            && metric_sum(&m, "sluice_kv_cache_usage_ratio", &[]) == Some(0.0)
        {
            assert!(!m.contains("reason=\"length\""), "{m}");
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
        json!({"role": "assistant", "content": "", "refusal": null})
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
        hi(json!({"max_tokens": 100, "ignore_eos": true, "stream": true})),
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

#[tokio::test]
async fn json_answers_carry_a_content_length_and_are_not_chunked() {
    let server = Server::start(&["--engine", "synthetic", "--tokens-per-second", "1000"]);
    let check = |r: &reqwest::Response, what: &str| {
        let h = r.headers();
        assert!(
            h.get("transfer-encoding").is_none(),
            "{what} went out chunked: {h:?}"
        );
        h.get("content-length")
            .unwrap_or_else(|| panic!("{what} has no Content-Length: {h:?}"))
            .to_str()
            .unwrap()
            .parse::<usize>()
            .unwrap()
    };
    // A generation, a refusal and a listing: every JSON answer of the protected routes
    // (which the load-shedding and rate-limit layers wrap) has its length.
    for (what, r) in [
        (
            "a completion",
            chat(&server, "sk-sluice-dev", hi(json!({}))).await,
        ),
        (
            "a 400",
            chat(&server, "sk-sluice-dev", hi(json!({"temperature": 9}))).await,
        ),
        (
            "/v1/models",
            Server::client()
                .get(format!("{}/v1/models", server.base))
                .bearer_auth("sk-sluice-dev")
                .send()
                .await
                .unwrap(),
        ),
    ] {
        let len = check(&r, what);
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), len, "{what}");
        serde_json::from_slice::<Value>(&body).expect("JSON");
    }
}

/// Whether `json` has no whitespace outside its strings. (Re-serializing the parsed
/// value is no test for this with logprobs: serde_json's default float parsing may be off
/// by an ulp, which can change a number's digits.)
fn compact(json: &str) -> bool {
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') | (false, _, '"') => in_string = !in_string,
            (false, _, ' ' | '\n' | '\r' | '\t') => return false,
            _ => {}
        }
    }
    !in_string
}

/// The `data:` payloads of an SSE body, checking its framing; `[DONE]` required last.
fn sse_payloads(raw: &str) -> Vec<Value> {
    let events: Vec<&str> = raw.split_inclusive("\n\n").collect();
    assert_eq!(events.last(), Some(&"data: [DONE]\n\n"), "{raw}");
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            let json = e
                .strip_prefix("data: ")
                .and_then(|x| x.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("bad frame {e:?}"));
            assert!(compact(json), "whitespace between tokens: {json}");
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
        })
        .collect()
}

#[tokio::test]
async fn streamed_logprobs_choices_and_usage_equal_the_non_streamed_answer() {
    let server = Server::start(&[]);
    let post = |path: &'static str, body: Value| {
        let base = server.base.clone();
        async move {
            let r = Server::client()
                .post(format!("{base}{path}"))
                .bearer_auth("sk-sluice-dev")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    // Quotes, newlines and non-ASCII are likely in code; greedy, so both choices agree.
    let chat_req = json!({"messages": [{"role": "user", "content": "Write a Python print of \"héllo\" on two lines."}],
                          "max_tokens": 24, "temperature": 0, "ignore_eos": true, "n": 2,
                          "logprobs": true, "top_logprobs": 2});
    let whole: Value =
        serde_json::from_str(&post("/v1/chat/completions", chat_req.clone()).await).unwrap();
    let mut s = chat_req.clone();
    s["stream"] = json!(true);
    s["stream_options"] = json!({"include_usage": true});
    let chunks = sse_payloads(&post("/v1/chat/completions", s).await);
    let mut texts = vec![String::new(); 2];
    let mut lps = vec![Vec::new(); 2];
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(c["usage"].is_null() && c.get("usage").is_some(), "{c}");
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if let Some(content) = choice["logprobs"]["content"].as_array() {
            lps[i].extend(content.iter().cloned());
        }
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage["usage"][k], whole["usage"][k], "{k}");
    }
    for i in 0..2 {
        let want = &whole["choices"][i];
        assert_eq!(texts[i], want["message"]["content"].as_str().unwrap());
        let want_lps = want["logprobs"]["content"].as_array().unwrap();
        assert_eq!(lps[i].len(), want_lps.len(), "one entry per token");
        for (got, want) in lps[i].iter().zip(want_lps) {
            assert_eq!(got["token"], want["token"]);
            assert_eq!(got["bytes"], want["bytes"]);
            let (a, b) = (
                got["logprob"].as_f64().unwrap(),
                want["logprob"].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-3, "{got} vs {want}");
        }
    }

    // Completions: the parallel arrays, offsets continuing across chunks.
    let cmpl = json!({"prompt": "The word \"café\" means", "max_tokens": 12, "temperature": 0,
                      "ignore_eos": true, "logprobs": 1});
    let whole: Value = serde_json::from_str(&post("/v1/completions", cmpl.clone()).await).unwrap();
    let mut s = cmpl;
    s["stream"] = json!(true);
    let chunks = sse_payloads(&post("/v1/completions", s).await);
    let (mut text, mut tokens, mut offsets) = (String::new(), Vec::new(), Vec::new());
    for c in &chunks {
        assert_eq!(c["object"], "text_completion");
        assert!(c.get("usage").is_none(), "no usage without include_usage");
        let choice = &c["choices"][0];
        text.push_str(choice["text"].as_str().unwrap());
        tokens.extend(
            choice["logprobs"]["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .cloned(),
        );
        offsets.extend(
            choice["logprobs"]["text_offset"]
                .as_array()
                .unwrap()
                .iter()
                .cloned(),
        );
    }
    let want = &whole["choices"][0];
    assert_eq!(text, want["text"].as_str().unwrap());
    assert_eq!(&Value::from(tokens), &want["logprobs"]["tokens"]);
    assert_eq!(&Value::from(offsets), &want["logprobs"]["text_offset"]);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}
