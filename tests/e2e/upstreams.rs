//! `sluice serve` as a gateway in front of other servers (`[[upstreams]]`): two synthetic
//! engines, each accepting only the gateway's key, behind a gateway that runs no model.
//! Requests are forwarded unchanged and answered as the engines answer; streams are
//! spread over both engines, long shared prefixes stay on one, a killed engine's new
//! requests fail over and its running stream ends with an error event, and a client
//! that hangs up cancels the engine's request.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::support::{metric_sum, Server};

/// Writes `toml` to a fresh file (not `Server::config_file`, which would fetch the
/// default model to fill in `{model}`: nothing here needs one).
fn config(toml: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "sluice-upstreams-{}-{}.toml",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&path, toml).expect("writing the config");
    path
}

/// A synthetic engine serving `m1` at `tps` tokens per second to `key_hash`'s key only.
fn engine(key_hash: &str, tps: u32, level: Option<&str>) -> Server {
    let path = config(&format!(
        "[[keys]]\nname = \"gateway\"\nkey_sha256 = \"{key_hash}\"\n\n\
         [[models]]\nname = \"m1\"\nengine = \"synthetic\"\ntokens_per_second = {tps}\n"
    ));
    Server::spawn_env(&["--config", path.to_str().unwrap()], level, &[])
}

struct Setup {
    engines: Vec<Option<Server>>,
    gateway: Server,
    client_key: String,
    upstream_key: String,
    started_in: Duration,
}

/// Two engines and a gateway in front of them; the first engine's key is in the
/// gateway's config, the second's comes from an environment variable. The gateway
/// discovers their models.
fn setup(tps: u32, engine_level: Option<&str>) -> Setup {
    let (upstream_key, upstream_hash) = sluice_gateway::auth::new_key();
    let (client_key, client_hash) = sluice_gateway::auth::new_key();
    let a = engine(&upstream_hash, tps, engine_level);
    let b = engine(&upstream_hash, tps, engine_level);
    let path = config(&format!(
        "[upstream]\nhealth_check_seconds = 1\nconnect_timeout_seconds = 2\n\n\
         [[keys]]\nname = \"client\"\nkey_sha256 = \"{client_hash}\"\n\n\
         [[upstreams]]\nurl = \"{}\"\napi_key = \"{upstream_key}\"\n\n\
         [[upstreams]]\nurl = \"{}/\"\napi_key_env = \"SLUICE_TEST_UPSTREAM_KEY\"\n",
        a.base, b.base
    ));
    let t = Instant::now();
    let gateway = Server::spawn_env(
        &["--config", path.to_str().unwrap()],
        None,
        &[("SLUICE_TEST_UPSTREAM_KEY", &upstream_key)],
    );
    Setup {
        engines: vec![Some(a), Some(b)],
        gateway,
        client_key,
        upstream_key,
        started_in: t.elapsed(),
    }
}

impl Setup {
    fn engine(&self, i: usize) -> &Server {
        self.engines[i].as_ref().expect("a running engine")
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        Server::client()
            .post(format!("{}{path}", self.gateway.base))
            .bearer_auth(&self.client_key)
            .json(&body)
            .send()
            .await
            .expect("request to the gateway")
    }

    /// Chat requests each engine has answered so far (the synthetic engine does not
    /// count finished requests; its HTTP layer does).
    async fn finished(&self) -> Vec<f64> {
        let mut out = Vec::new();
        for e in self.engines.iter().flatten() {
            let m = e.metrics().await;
            let route = [("route", "/v1/chat/completions"), ("status", "200")];
            out.push(metric_sum(&m, "sluice_http_requests_total", &route).unwrap_or(0.0));
        }
        out
    }

    /// A long streamed chat through the gateway, read until its first 3 events: the
    /// rest of its body and what was read.
    async fn long_stream_begun(
        &self,
    ) -> (
        impl futures_util::Stream<Item = reqwest::Result<Vec<u8>>> + Unpin,
        String,
    ) {
        let r = self
            .post(
                "/v1/chat/completions",
                chat("Tell me a long story", 2000, true),
            )
            .await;
        assert_eq!(r.status(), 200);
        let mut body = Box::pin(r.bytes_stream().map(|c| c.map(|b| b.to_vec())));
        let mut seen = String::new();
        while events(&seen).len() < 3 {
            seen.push_str(&String::from_utf8_lossy(
                &body.next().await.unwrap().unwrap(),
            ));
        }
        (body, seen)
    }

    /// Requests each engine is running now.
    async fn running(&self) -> Vec<f64> {
        let mut out = Vec::new();
        for e in self.engines.iter().flatten() {
            let m = e.metrics().await;
            out.push(metric_sum(&m, "sluice_requests_running", &[]).unwrap_or(0.0));
        }
        out
    }
}

/// The `data:` payloads of an SSE body, in order.
pub(crate) fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn chat(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": "m1", "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "stream": stream})
}

/// Time to the first SSE event carrying text, for a streamed completion at `base`.
async fn ttft(base: &str, key: &str) -> Duration {
    let t = Instant::now();
    let resp = Server::client()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "m1", "prompt": "Hello there", "max_tokens": 2, "stream": true}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(c) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&c.expect("body")));
        if buf.contains("\"text\"") {
            break;
        }
    }
    let took = t.elapsed();
    while body.next().await.is_some() {}
    took
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test]
async fn a_gateway_forwards_to_upstreams_balances_and_keeps_prefixes_together() {
    let s = setup(
        200,
        Some("warn,tower_http=debug,sluice_gateway::server=info"),
    );
    // No model was loaded or fetched: the gateway is up at once and runs no engine.
    assert!(s.started_in < Duration::from_secs(10), "{:?}", s.started_in);
    let gm = s.gateway.metrics().await;
    assert_eq!(
        metric_sum(&gm, "sluice_requests_running", &[]),
        None,
        "{gm}"
    );
    let models = s.gateway.get_json("/v1/models", &s.client_key).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["m1"], "{models}");
    let one = s.gateway.get_json("/v1/models/m1", &s.client_key).await;
    assert_eq!(one["id"], "m1", "{one}");
    // With no local model, a request naming none goes to the (first) upstream model.
    let r = s
        .post(
            "/v1/completions",
            json!({"prompt": "Once", "max_tokens": 2}),
        )
        .await;
    assert_eq!(r.status(), 200);
    // The engines take only the upstream key: the client's own key is refused there, so
    // the requests below prove the gateway sends its key, not the client's.
    let direct = Server::client()
        .post(format!("{}/v1/chat/completions", s.engine(0).base))
        .bearer_auth(&s.client_key)
        .json(&chat("hi", 2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401);

    // Non-streamed chat and completion, with the request id passed on.
    let r = Server::client()
        .post(format!("{}/v1/chat/completions", s.gateway.base))
        .bearer_auth(&s.client_key)
        .header("x-request-id", "upstream-test-request-id")
        .json(&chat("Hello", 5, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    let r = s
        .post(
            "/v1/completions",
            json!({"model": "m1", "prompt": "Once", "max_tokens": 3}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion", "{v}");
    // Streamed: chunk by chunk, ending with [DONE].
    for (path, body) in [
        ("/v1/chat/completions", chat("Hello", 6, true)),
        (
            "/v1/completions",
            json!({"model": "m1", "prompt": "Once", "max_tokens": 6, "stream": true}),
        ),
    ] {
        let r = s.post(path, body).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let ev = events(&r.text().await.unwrap());
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
        assert!(ev.len() >= 7, "{path}: {ev:?}");
    }
    // A field the gateway knows nothing of goes to the engine, whose refusal comes back
    // as it answered it.
    let mut odd = chat("Hello", 2, false);
    odd["frobnicate"] = json!(3);
    let r = s.post("/v1/chat/completions", odd).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "frobnicate", "{v}");
    let mut refused = 0.0;
    for e in s.engines.iter().flatten() {
        refused += metric_sum(
            &e.metrics().await,
            "sluice_http_requests_total",
            &[("route", "/v1/chat/completions"), ("status", "400")],
        )
        .unwrap_or(0.0);
    }
    assert_eq!(refused, 1.0, "the engine refused it, not the gateway");

    // 16 concurrent streams over two equal engines land on both.
    let before = s.finished().await;
    let streams = (0..16).map(|i| {
        let s = &s;
        async move {
            let r = s
                .post(
                    "/v1/chat/completions",
                    chat(&format!("question {i}"), 30, true),
                )
                .await;
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        }
    });
    futures_util::future::join_all(streams).await;
    let after = s.finished().await;
    let spread: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(spread.iter().sum::<f64>(), 16.0, "{spread:?}");
    assert!(
        spread.iter().all(|&n| n >= 6.0),
        "16 streams split {spread:?}"
    );

    // Requests sharing a long prefix, one after another, stay on one engine.
    let system = "You are a careful assistant for the harbour authority. ".repeat(40);
    let before = s.finished().await;
    for i in 0..6 {
        let body = json!({"model": "m1", "max_tokens": 2, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": format!("Question number {i}?")}]});
        let r = s.post("/v1/chat/completions", body).await;
        assert_eq!(r.status(), 200);
    }
    let after = s.finished().await;
    let spread: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(
        spread.contains(&6.0) && spread.contains(&0.0),
        "a shared prefix split {spread:?}"
    );

    // The gateway's hop: time to first token through it and directly, over N requests.
    let n = 50;
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    for _ in 0..n {
        direct.push(ttft(&s.engine(0).base, &s.upstream_key).await);
        via.push(ttft(&s.gateway.base, &s.client_key).await);
    }
    direct.sort();
    via.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "TTFT over {n} streamed completions (synthetic engine, 200 tokens/s): direct p50 {:.2} ms \
         p99 {:.2} ms (min {:.2}, max {:.2}); through the gateway p50 {:.2} ms p99 {:.2} ms \
         (min {:.2}, max {:.2})",
        ms(percentile(&direct, 0.5)),
        ms(percentile(&direct, 0.99)),
        ms(direct[0]),
        ms(direct[n - 1]),
        ms(percentile(&via, 0.5)),
        ms(percentile(&via, 0.99)),
        ms(via[0]),
        ms(via[n - 1]),
    );

    // The gateway's own families.
    let gm = s.gateway.metrics().await;
    let ok = metric_sum(
        &gm,
        "sluice_upstream_requests_total",
        &[("model", "m1"), ("outcome", "ok")],
    );
    assert!(ok.is_some_and(|n| n >= 25.0), "{gm}");
    assert_eq!(
        metric_sum(&gm, "sluice_upstream_healthy", &[]),
        Some(2.0),
        "{gm}"
    );
    assert_eq!(
        metric_sum(&gm, "sluice_upstream_in_flight", &[]),
        Some(0.0),
        "{gm}"
    );
    assert!(gm.contains("# HELP sluice_upstream_requests_total"), "{gm}");
    // The request id went upstream with the request (the engines log request spans).
    let logs: String = s
        .engines
        .iter()
        .flatten()
        .map(|e| e.logs.as_ref().unwrap().lock().unwrap().clone())
        .collect();
    assert!(
        logs.contains("upstream-test-request-id"),
        "the engines' logs:\n{logs}"
    );
}

#[tokio::test]
async fn killing_an_upstream_fails_over_and_ends_its_streams_and_hangups_cancel() {
    let mut s = setup(50, None);
    // A client that hangs up cancels the engine's request at once.
    let (body, _) = s.long_stream_begun().await;
    assert_eq!(s.running().await.iter().sum::<f64>(), 1.0);
    drop(body);
    let t = Instant::now();
    while s.running().await.iter().sum::<f64>() > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the engine kept running it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("a hang-up reached the engine in {:?}", t.elapsed());
    let gm = s.gateway.metrics().await;
    assert_eq!(
        metric_sum(&gm, "sluice_upstream_in_flight", &[]),
        Some(0.0),
        "{gm}"
    );
    assert_eq!(
        metric_sum(
            &gm,
            "sluice_upstream_requests_total",
            &[("outcome", "cancelled")]
        ),
        Some(1.0),
        "{gm}"
    );

    // A stream running on an engine that dies ends with an error event, promptly.
    let (mut body, mut seen) = s.long_stream_begun().await;
    let running = s.running().await;
    let victim = running
        .iter()
        .position(|&n| n == 1.0)
        .expect("one engine runs it");
    let dead_url = s.engine(victim).base.clone();
    drop(s.engines[victim].take()); // SIGKILL
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(c) = body.next().await {
            match c {
                Ok(c) => seen.push_str(&String::from_utf8_lossy(&c)),
                Err(e) => panic!("the stream should end cleanly: {e}"),
            }
        }
    })
    .await;
    assert!(rest.is_ok(), "the stream hung after its engine died");
    let ev = events(&seen);
    let error = ev
        .iter()
        .rev()
        .nth(1)
        .map(|e| serde_json::from_str::<Value>(e).unwrap());
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    assert_eq!(
        error.as_ref().map(|e| e["error"]["code"].clone()),
        Some(json!("upstream_error")),
        "{ev:?}"
    );

    // New requests go to the other engine: no error reaches the client, even for the
    // first one, sent before any health check noticed.
    for i in 0..4 {
        let r = s
            .post(
                "/v1/chat/completions",
                chat(&format!("q{i}"), 3, i % 2 == 0),
            )
            .await;
        assert_eq!(r.status(), 200, "request {i}");
        let text = r.text().await.unwrap();
        assert!(!text.contains("\"error\""), "{text}");
    }
    let gm = s.gateway.metrics().await;
    assert_eq!(
        metric_sum(&gm, "sluice_upstream_healthy", &[("upstream", &dead_url)]),
        Some(0.0),
        "{gm}"
    );
    assert_eq!(
        metric_sum(
            &gm,
            "sluice_upstream_requests_total",
            &[("outcome", "stream_error")]
        ),
        Some(1.0),
        "{gm}"
    );

    // The gateway stays ready while one replica serves; with none, /ready says so.
    let ready = || async {
        let r = Server::client()
            .get(format!("{}/ready", s.gateway.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (status, body) = ready().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["models"], json!(["m1"]), "{body}");
    let other = 1 - victim;
    drop(s.engines[other].take());
    let t = Instant::now();
    loop {
        let (status, body) = ready().await;
        if status == 503 {
            assert_eq!(body["status"], "upstreams_unreachable", "{body}");
            assert_eq!(body["models"], json!(["m1"]), "{body}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "/ready stayed {status} with no upstream: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = s
        .post("/v1/chat/completions", chat("anyone?", 3, false))
        .await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable", "{v}");
}

#[tokio::test]
async fn an_upstream_answering_5xx_before_any_byte_is_replaced_by_another() {
    let (upstream_key, upstream_hash) = sluice_gateway::auth::new_key();
    // The first engine takes one request at a time: a second gets 503 at once.
    let busy_cfg = config(&format!(
        "[limits]\nmax_concurrent_requests = 1\n\n\
         [[keys]]\nname = \"gateway\"\nkey_sha256 = \"{upstream_hash}\"\n\n\
         [[models]]\nname = \"m1\"\nengine = \"synthetic\"\ntokens_per_second = 50\n"
    ));
    let busy = Server::spawn_env(&["--config", busy_cfg.to_str().unwrap()], None, &[]);
    let idle = engine(&upstream_hash, 200, None);
    // Health checks (and so the engines' own queue reports) only at start-up: the
    // gateway does not know the first engine is full.
    let path = config(&format!(
        "[upstream]\nhealth_check_seconds = 600\n\n\
         [[upstreams]]\nurl = \"{}\"\napi_key = \"{upstream_key}\"\nmodels = [\"m1\"]\n\n\
         [[upstreams]]\nurl = \"{}\"\napi_key = \"{upstream_key}\"\nmodels = [\"m1\"]\n",
        busy.base, idle.base
    ));
    let gateway = Server::spawn_env(&["--config", path.to_str().unwrap()], None, &[]);
    // Fill the first engine directly.
    let hog = Server::client()
        .post(format!("{}/v1/completions", busy.base))
        .bearer_auth(&upstream_key)
        .json(&json!({"model": "m1", "prompt": "x", "max_tokens": 500, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(hog.status(), 200);
    // Ties are taken in turn, so some of these try the full engine first: none fails.
    for i in 0..4 {
        let r = Server::client()
            .post(format!("{}/v1/chat/completions", gateway.base))
            .bearer_auth("sk-sluice-dev")
            .json(&chat(&format!("q{i}"), 2, i % 2 == 1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        r.text().await.unwrap();
    }
    let gm = gateway.metrics().await;
    let failed_over = metric_sum(
        &gm,
        "sluice_upstream_requests_total",
        &[("upstream", &busy.base), ("outcome", "server_error")],
    );
    assert!(failed_over.is_some_and(|n| n >= 1.0), "{gm}");
    assert_eq!(
        metric_sum(
            &gm,
            "sluice_upstream_requests_total",
            &[("upstream", &idle.base), ("outcome", "ok")]
        ),
        Some(4.0),
        "{gm}"
    );
    drop(hog);
}

#[tokio::test]
async fn token_limits_count_upstream_prompts_with_their_tokenize_and_settle_by_usage() {
    let (upstream_key, upstream_hash) = sluice_gateway::auth::new_key();
    let (client_key, client_hash) = sluice_gateway::auth::new_key();
    let engine = engine(&upstream_hash, 500, None);
    let tpm = 12_000u64;
    let path = config(&format!(
        "[[keys]]\nname = \"metered\"\nkey_sha256 = \"{client_hash}\"\ntokens_per_minute = {tpm}\n\n\
         [[upstreams]]\nurl = \"{}\"\napi_key = \"{upstream_key}\"\n",
        engine.base
    ));
    let gateway = Server::spawn_env(&["--config", path.to_str().unwrap()], None, &[]);
    let text =
        "The harbour master counts the boats that come in before the tide turns. ".repeat(25);
    let messages = json!([{"role": "user", "content": text}]);
    // What the engine itself counts for this conversation.
    let counted: Value = Server::client()
        .post(format!("{}/tokenize", engine.base))
        .bearer_auth(&upstream_key)
        .json(&json!({"model": "m1", "messages": messages}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let prompt = counted["count"].as_u64().expect("a count");
    let estimate = (text.len() as u64).div_ceil(4);
    assert!(
        prompt.abs_diff(estimate) > 20,
        "the test needs a prompt whose count differs from the estimate: {prompt} vs {estimate}"
    );
    let post = |body: Value| {
        let req = Server::client()
            .post(format!("{}/v1/chat/completions", gateway.base))
            .bearer_auth(&client_key)
            .json(&body);
        async move { req.send().await.expect("request to the gateway") }
    };
    let remaining = |r: &reqwest::Response| -> u64 {
        r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    println!("the prompt: {prompt} tokens by the engine's count, {estimate} estimated");
    let started = Instant::now();
    // A full budget, charged the engine's count plus max_tokens: exactly.
    let r = post(json!({"model": "m1", "messages": messages, "max_tokens": 5})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        remaining(&r),
        tpm - (prompt + 5),
        "charged by the engine's /tokenize count ({prompt}), not the estimate ({estimate})"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(prompt), "{v}");
    // A request the engine refuses costs nothing: its charge comes back.
    let r =
        post(json!({"model": "m1", "messages": messages, "max_tokens": 5, "frobnicate": 1})).await;
    assert_eq!(r.status(), 400);
    let r = post(json!({"model": "m1", "messages": messages, "max_tokens": 5})).await;
    assert_eq!(r.status(), 200);
    let refill = (started.elapsed().as_secs_f64() * tpm as f64 / 60.0).ceil() as u64 + 1;
    let left = remaining(&r);
    assert!(
        left >= tpm - 2 * (prompt + 5) && left <= tpm - 2 * (prompt + 5) + refill,
        "two charges of {} and a refund: {left} left of {tpm} (refill {refill})",
        prompt + 5
    );
    // A stream that asks for usage reports it in its last chunk: read there too.
    let r = post(
        json!({"model": "m1", "messages": messages, "max_tokens": 4, "stream": true,
                        "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let ev = events(&r.text().await.unwrap());
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    // The usage that came back reaches the key's counters.
    let m = gateway.metrics().await;
    let by_key = |name: &str| metric_sum(&m, name, &[("key", "metered")]);
    assert_eq!(
        by_key("sluice_key_prompt_tokens_total"),
        Some(3.0 * prompt as f64),
        "{m}"
    );
    assert_eq!(
        by_key("sluice_key_generation_tokens_total"),
        Some(14.0),
        "{m}"
    );
}

#[tokio::test]
async fn a_websocket_session_on_an_upstream_model_keeps_its_turns_on_one_replica() {
    use crate::websocket::{connect, is, send, until};
    let s = setup(400, None);
    // Authenticated by the upgrade's header: no event to wait for.
    let mut ws = connect(&s.gateway, Some(&s.client_key)).await;
    send(
        &mut ws,
        json!({"type": "join", "session": "harbour", "user": "ann"}),
    )
    .await;
    let before = s.finished().await;
    for turn in 0..4 {
        send(
            &mut ws,
            json!({"type": "say", "content": format!("Turn {turn}, go on.")}),
        )
        .await;
        send(
            &mut ws,
            json!({"type": "generate", "model": "m1", "max_tokens": 6}),
        )
        .await;
        let events = until(&mut ws, is("generation_done")).await;
        let done = events.last().unwrap();
        assert_eq!(done["finish_reason"], "length", "{events:?}");
        assert_eq!(done["usage"]["completion_tokens"], 6, "{events:?}");
        assert!(
            done["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 0,
            "{events:?}"
        );
        let text: String = events
            .iter()
            .filter(|e| e["type"] == "token")
            .filter_map(|e| e["text"].as_str())
            .collect();
        assert!(!text.is_empty(), "{events:?}");
    }
    // Every turn went to the replica the session's id picks.
    let after = s.finished().await;
    let spread: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(
        spread.contains(&4.0) && spread.contains(&0.0),
        "a session's turns split {spread:?}"
    );
    // A parameter the upstream refuses comes back to the one who asked, as an error.
    send(&mut ws, json!({"type": "say", "content": "once more"})).await;
    send(
        &mut ws,
        json!({"type": "generate", "model": "m1", "max_tokens": 6, "frobnicate": 1}),
    )
    .await;
    let events = until(&mut ws, is("error")).await;
    let err = events.last().unwrap();
    assert_eq!(err["code"], "upstream_refused", "{err}");
    assert!(
        err["message"].as_str().unwrap_or("").contains("frobnicate"),
        "{err}"
    );
    // Cancelling a long turn stops it on the engine.
    send(
        &mut ws,
        json!({"type": "generate", "model": "m1", "max_tokens": 4000}),
    )
    .await;
    until(&mut ws, is("token")).await;
    send(&mut ws, json!({"type": "cancel"})).await;
    let events = until(&mut ws, is("generation_done")).await;
    assert_eq!(
        events.last().unwrap()["finish_reason"],
        "cancelled",
        "{events:?}"
    );
    let t = Instant::now();
    while s.running().await.iter().sum::<f64>() > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the engine kept running a cancelled turn"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_shared_prefix_lands_on_one_real_engine_whose_prefix_cache_serves_it() {
    let model = crate::support::model_path();
    let (upstream_key, upstream_hash) = sluice_gateway::auth::new_key();
    let (client_key, client_hash) = sluice_gateway::auth::new_key();
    let engine_config = config(&format!(
        "[[keys]]\nname = \"gateway\"\nkey_sha256 = \"{upstream_hash}\"\n\n\
         [[models]]\nname = \"m1\"\npath = \"{}\"\n",
        model.display()
    ));
    let engine_args = [
        "--config",
        engine_config.to_str().unwrap(),
        "--threads",
        "1",
    ];
    let engines = [
        Server::spawn_env(&engine_args, None, &[]),
        Server::spawn_env(&engine_args, None, &[]),
    ];
    let gateway_config = config(&format!(
        "[[keys]]\nname = \"client\"\nkey_sha256 = \"{client_hash}\"\n\n\
         [[upstreams]]\nurl = \"{}\"\napi_key = \"{upstream_key}\"\n\n\
         [[upstreams]]\nurl = \"{}\"\napi_key = \"{upstream_key}\"\n",
        engines[0].base, engines[1].base
    ));
    let gateway = Server::spawn_env(&["--config", gateway_config.to_str().unwrap()], None, &[]);
    let system = "You are the harbour authority's assistant: answer about tides, berths, \
                  pilots and fees, briefly and politely. "
        .repeat(12);
    for i in 0..6 {
        let r = Server::client()
            .post(format!("{}/v1/chat/completions", gateway.base))
            .bearer_auth(&client_key)
            .json(
                &json!({"model": "m1", "max_tokens": 2, "temperature": 0, "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": format!("Question {i}: when is high tide?")}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let mut seen = Vec::new();
    for e in &engines {
        let m = e.metrics().await;
        let prompts = metric_sum(&m, "sluice_prompt_tokens_total", &[]).unwrap_or(0.0);
        let hit = metric_sum(&m, "sluice_prefix_cache_hit_ratio", &[]).unwrap_or(0.0);
        seen.push((prompts, hit));
    }
    println!("per engine (prompt tokens, prefix cache hit ratio): {seen:?}");
    let busy: Vec<&(f64, f64)> = seen.iter().filter(|(p, _)| *p > 0.0).collect();
    assert_eq!(
        busy.len(),
        1,
        "the shared prefix split over the engines: {seen:?}"
    );
    assert!(
        busy[0].1 > 0.5,
        "the engine that served all six hit its prefix cache for only {:.2} of the prompt tokens",
        busy[0].1
    );
}
