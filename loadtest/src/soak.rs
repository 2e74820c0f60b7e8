//! Soak test: a long mixed load against one server, checking that nothing is lost,
//! reordered or leaked.
//!
//! Workers loop over a weighted mix: greedy streamed and non-streamed chats (their text
//! must equal the reference answer for the prompt, computed alone at the start),
//! sampled streamed completions, WebSocket sessions (a one-message session's greedy
//! reply is the same chat, so it must match too), cancellations at a random point of a
//! stream, and malformed requests (which must get their 4xx). The server's resident
//! memory is sampled from /proc while it runs; at the end the engine must be idle with
//! its KV cache empty.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use sluice_client::{Client, Sampling, SessionEvent};

/// What to soak and for how long.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub url: String,
    pub api_key: Option<String>,
    pub duration: Duration,
    pub concurrency: usize,
    /// The server's process id, to sample its resident memory.
    pub server_pid: Option<u32>,
    /// Tokens per greedy answer.
    pub max_tokens: u32,
}

/// Resident memory of the server, in KiB, at three points of the run, and how much of
/// its KV cache had been written by then (the cache's pages are touched lazily, so
/// resident memory grows with it until the whole cache has been used once; that is
/// the cache filling, not a leak).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MemorySamples {
    /// After warm-up (the first tenth of the run).
    pub after_warmup_kib: u64,
    pub middle_kib: u64,
    pub end_kib: u64,
    pub kv_touched_after_warmup_kib: u64,
    pub kv_touched_middle_kib: u64,
    pub kv_touched_end_kib: u64,
    /// Growth of resident memory from after warm-up to the end, in percent.
    pub growth_percent: f64,
    /// The same, not counting the KV cache's written pages: what a leak would show in.
    pub growth_excluding_kv_cache_percent: f64,
}

/// What a soak run saw.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub seconds: f64,
    pub concurrency: usize,
    /// Finished operations by kind (`chat_stream`, `ws_session`, `cancel`, ...).
    pub served: BTreeMap<String, u64>,
    /// Outcomes that were not a success, by kind (`http_503`, `bad_request_400`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Outcomes that must never happen (a 5xx, a greedy answer that differs, a cut
    /// stream), with an example each.
    pub failures: BTreeMap<String, String>,
    /// Greedy answers compared with their reference.
    pub greedy_checked: u64,
    pub memory: Option<MemorySamples>,
    /// `sluice_kv_cache_usage_ratio` once the load stopped and the engine went idle
    /// (summed over the served models, as is `running_at_end`).
    pub kv_usage_at_end: Option<f64>,
    pub running_at_end: Option<f64>,
}

impl SoakReport {
    /// Whether the run met every requirement: no failure, memory growth under 10%,
    /// the engine idle and its cache empty at the end.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
            && self
                .memory
                .is_none_or(|m| m.growth_excluding_kv_cache_percent < 10.0)
            && self.kv_usage_at_end == Some(0.0)
            && self.running_at_end == Some(0.0)
    }
}

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about rivers.",
    "Explain what a CPU cache is in two sentences.",
    "List three uses for a paperclip.",
    "What is 12 times 12?",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Name a famous painting and its painter.",
];

/// Malformed bodies and the status each must get.
const BAD: [(&str, u16); 5] = [
    ("{\"messages\": [", 400),
    (
        "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":1000}",
        400,
    ),
    (
        "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":-3}",
        400,
    ),
    ("{\"messages\":[]}", 400),
    (
        "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}",
        400,
    ),
];

#[derive(Default)]
struct Tally {
    served: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    failures: BTreeMap<String, String>,
    greedy_checked: u64,
}

impl Tally {
    fn served(&mut self, kind: &str) {
        *self.served.entry(kind.into()).or_default() += 1;
    }
    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }
    fn failure(&mut self, kind: &str, example: String) {
        *self.errors.entry(kind.into()).or_default() += 1;
        self.failures.entry(kind.into()).or_insert(example);
    }
}

struct Shared {
    spec: SoakSpec,
    http: reqwest::Client,
    client: Client,
    reference: Vec<String>,
    tally: Mutex<Tally>,
}

impl Shared {
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.post(format!("{}{path}", self.spec.url));
        if let Some(k) = &self.spec.api_key {
            r = r.bearer_auth(k);
        }
        r
    }

    fn greedy_body(&self, prompt: usize, stream: bool) -> Value {
        json!({"messages": [{"role": "user", "content": PROMPTS[prompt]}],
               "max_tokens": self.spec.max_tokens, "temperature": 0, "stream": stream})
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a refusal the server may give under load (429, 503) or flags anything
    /// else.
    fn http_error(&self, what: &str, status: u16, body: String) {
        match status {
            429 | 503 => self.tally().error(format!("http_{status}")),
            _ => self.tally().failure(
                &format!("{what}_http_{status}"),
                body.chars().take(300).collect(),
            ),
        }
    }

    fn check_greedy(&self, what: &str, prompt: usize, text: &str) {
        let mut t = self.tally();
        t.greedy_checked += 1;
        if text != self.reference[prompt] {
            t.failure(
                &format!("{what}_differs"),
                format!("prompt {prompt}: {text:?} != {:?}", self.reference[prompt]),
            );
        } else {
            t.served(what);
        }
    }
}

/// Text of a chat completion stream, or why it failed.
async fn read_chat_stream(
    resp: reqwest::Response,
    stop_after: Option<usize>,
) -> Result<String, String> {
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut text = String::new();
    let mut pieces = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("transport: {e}"))?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            let data = event.trim().strip_prefix("data: ").unwrap_or("");
            if data == "[DONE]" {
                return Ok(text);
            }
            let v: Value = serde_json::from_str(data).map_err(|_| format!("bad event {data:?}"))?;
            if v.get("error").is_some() {
                return Err(format!("error event {v}"));
            }
            let c = &v["choices"][0];
            if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
                text.push_str(t);
                pieces += 1;
                if stop_after.is_some_and(|n| pieces >= n) {
                    return Ok(text);
                }
            }
        }
    }
    Err("the stream ended without [DONE]".into())
}

async fn chat_stream(s: &Shared, rng: &mut StdRng) {
    let p = rng.random_range(0..PROMPTS.len());
    match s
        .post("/v1/chat/completions")
        .json(&s.greedy_body(p, true))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => match read_chat_stream(r, None).await {
            Ok(text) => s.check_greedy("chat_stream", p, &text),
            Err(e) => s.tally().failure("chat_stream_broken", e),
        },
        Ok(r) => {
            let st = r.status().as_u16();
            s.http_error("chat_stream", st, r.text().await.unwrap_or_default());
        }
        Err(e) => s.tally().failure("transport", e.to_string()),
    }
}

async fn chat_once(s: &Shared, rng: &mut StdRng) {
    let p = rng.random_range(0..PROMPTS.len());
    match s
        .post("/v1/chat/completions")
        .json(&s.greedy_body(p, false))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
            Ok(v) => {
                let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
                s.check_greedy("chat", p, text);
            }
            Err(e) => s.tally().failure("chat_bad_body", e.to_string()),
        },
        Ok(r) => {
            let st = r.status().as_u16();
            s.http_error("chat", st, r.text().await.unwrap_or_default());
        }
        Err(e) => s.tally().failure("transport", e.to_string()),
    }
}

async fn sampled_completion(s: &Shared, rng: &mut StdRng) {
    let body = json!({"prompt": PROMPTS[rng.random_range(0..PROMPTS.len())],
                      "max_tokens": s.spec.max_tokens, "temperature": 0.9,
                      "seed": rng.random::<u32>(), "stream": true});
    match s.post("/v1/completions").json(&body).send().await {
        Ok(r) if r.status().is_success() => match read_chat_stream(r, None).await {
            Ok(_) => s.tally().served("completion_stream"),
            Err(e) => s.tally().failure("completion_stream_broken", e),
        },
        Ok(r) => {
            let st = r.status().as_u16();
            s.http_error("completion", st, r.text().await.unwrap_or_default());
        }
        Err(e) => s.tally().failure("transport", e.to_string()),
    }
}

async fn cancel_midway(s: &Shared, rng: &mut StdRng) {
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                      "max_tokens": 400, "ignore_eos": true, "stream": true});
    let after = rng.random_range(1..=20);
    match s.post("/v1/chat/completions").json(&body).send().await {
        Ok(r) if r.status().is_success() => match read_chat_stream(r, Some(after)).await {
            // Dropping the response here hangs up mid-stream.
            Ok(_) => s.tally().served("cancel"),
            Err(e) => s.tally().failure("cancel_broken", e),
        },
        Ok(r) => {
            let st = r.status().as_u16();
            s.http_error("cancel", st, r.text().await.unwrap_or_default());
        }
        Err(e) => s.tally().failure("transport", e.to_string()),
    }
}

async fn bad_request(s: &Shared, rng: &mut StdRng) {
    let (body, want) = BAD[rng.random_range(0..BAD.len())];
    match s
        .post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => {
            let st = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            let is_error_object = serde_json::from_str::<Value>(&text)
                .is_ok_and(|v| v["error"]["message"].is_string());
            if st == want && is_error_object {
                s.tally().error(format!("bad_request_{st}"));
                s.tally().served("bad_request");
            } else {
                s.tally().failure(
                    "bad_request_wrong_answer",
                    format!("{st} for {body}: {text}"),
                );
            }
        }
        Err(e) => s.tally().failure("transport", e.to_string()),
    }
}

async fn ws_session(s: &Shared, rng: &mut StdRng, worker: usize, n: u64) {
    let p = rng.random_range(0..PROMPTS.len());
    let name = format!("soak-{worker}-{n}");
    let session = match s.client.join_session(&name, "soaker").await {
        Ok(c) => c,
        Err(e) => return s.tally().failure("ws_connect", e.to_string()),
    };
    let (mut tx, mut events) = session.split();
    let sampling = Sampling {
        max_tokens: Some(s.spec.max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    };
    if let Err(e) = tx.say(PROMPTS[p]).await {
        return s.tally().failure("ws_send", e.to_string());
    }
    if let Err(e) = tx.generate(&sampling).await {
        return s.tally().failure("ws_send", e.to_string());
    }
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), events.next_event()).await;
        match ev {
            Ok(Ok(Some(SessionEvent::Token { text: t, .. }))) => text.push_str(&t),
            Ok(Ok(Some(SessionEvent::GenerationDone { finish_reason, .. }))) => {
                if finish_reason == "error" {
                    s.tally().failure("ws_generation_error", text);
                } else {
                    s.check_greedy("ws_session", p, &text);
                }
                break;
            }
            Ok(Ok(Some(SessionEvent::Error { code, message }))) => {
                if code == "overloaded" || code == "rate_limit_exceeded" {
                    s.tally().error(format!("ws_{code}"));
                } else {
                    s.tally().failure("ws_error", format!("{code}: {message}"));
                }
                break;
            }
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) | Ok(Err(_)) => {
                s.tally().failure("ws_closed", format!("after {text:?}"));
                break;
            }
            Err(_) => {
                s.tally().failure("ws_timeout", text);
                break;
            }
        }
    }
    let _ = tx.leave().await;
}

/// Resident memory of process `pid` in KiB, from /proc (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn gauge(s: &Shared, name: &str) -> Option<f64> {
    let text = s
        .http
        .get(format!("{}/metrics", s.spec.url))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    // Engine metrics are per model: the server's total.
    metric_sum(&text, name, &[])
}

/// The value of series `name` (labels included, as written) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse().ok())
}

/// The sum of the series of metric `name` whose labels include every `(label, value)` of
/// `labels` (every series of `name` when empty), in Prometheus text; `None` when no
/// series matches. E.g. `sluice_requests_running` over all models, or
/// `sluice_requests_finished_total` with `[("reason", "cancelled")]`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (family, have) = match series.split_once('{') {
            Some((f, rest)) => (f, parse_labels(rest.strip_suffix('}').unwrap_or(rest))),
            None => (series, Vec::new()),
        };
        if family != name
            || !labels
                .iter()
                .all(|&(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
        {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// `a="x",b="y\"z"` as pairs, escapes undone.
fn parse_labels(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some((key, rest)) = s.split_once("=\"") {
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, e)) => value.push(e),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_string(), value));
        s = &rest[end..];
    }
    out
}

async fn kv_touched_kib(s: &Shared) -> u64 {
    gauge(s, "sluice_kv_cache_touched_bytes")
        .await
        .map_or(0, |b| b as u64 / 1024)
}

/// Runs the soak and reports what it saw; `progress` is called about every 10 s with
/// the seconds elapsed and the operations served so far.
pub async fn soak(spec: SoakSpec, progress: impl Fn(f64, u64)) -> Result<SoakReport, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| e.to_string())?;
    let client = Client::with_http(&spec.url, spec.api_key.clone(), http.clone());
    let mut shared = Shared {
        spec: spec.clone(),
        http,
        client,
        reference: Vec::new(),
        tally: Mutex::new(Tally::default()),
    };
    // The reference answers, each computed alone.
    for p in 0..PROMPTS.len() {
        let r = shared
            .post("/v1/chat/completions")
            .json(&shared.greedy_body(p, false))
            .send()
            .await
            .map_err(|e| format!("reference request: {e}"))?;
        let v: Value = r
            .json()
            .await
            .map_err(|e| format!("reference answer: {e}"))?;
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| format!("reference answer has no text: {v}"))?;
        shared.reference.push(text.to_string());
    }
    let shared = Arc::new(shared);
    let started = Instant::now();
    let end = started + spec.duration;
    let mut workers = Vec::new();
    for w in 0..spec.concurrency {
        let s = shared.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w as u64 * 7919 + 1);
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                match rng.random_range(0..100) {
                    0..35 => chat_stream(&s, &mut rng).await,
                    35..55 => chat_once(&s, &mut rng).await,
                    55..65 => sampled_completion(&s, &mut rng).await,
                    65..75 => ws_session(&s, &mut rng, w, n).await,
                    75..90 => cancel_midway(&s, &mut rng).await,
                    _ => bad_request(&s, &mut rng).await,
                }
            }
        }));
    }
    // Memory: after warm-up, in the middle, at the end.
    let mut memory = spec.server_pid.map(|_| MemorySamples::default());
    let (warm_at, middle_at) = (spec.duration / 10, spec.duration / 2);
    let mut next_progress = Duration::from_secs(10);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = started.elapsed();
        if let (Some(pid), Some(m)) = (spec.server_pid, memory.as_mut()) {
            if m.after_warmup_kib == 0 && t >= warm_at {
                m.after_warmup_kib = rss_kib(pid).unwrap_or(0);
                m.kv_touched_after_warmup_kib = kv_touched_kib(&shared).await;
            }
            if m.middle_kib == 0 && t >= middle_at {
                m.middle_kib = rss_kib(pid).unwrap_or(0);
                m.kv_touched_middle_kib = kv_touched_kib(&shared).await;
            }
        }
        if t >= next_progress {
            let served = shared.tally().served.values().sum();
            progress(t.as_secs_f64(), served);
            next_progress += Duration::from_secs(10);
        }
    }
    for w in workers {
        let _ = w.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Let the engine notice the last hang-ups, then read its state.
    let idle_by = Instant::now() + Duration::from_secs(30);
    let (mut running, mut kv) = (None, None);
    while Instant::now() < idle_by {
        running = gauge(&shared, "sluice_requests_running").await;
        kv = gauge(&shared, "sluice_kv_cache_usage_ratio").await;
        if running == Some(0.0) && kv == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let (Some(pid), Some(m)) = (spec.server_pid, memory.as_mut()) {
        m.end_kib = rss_kib(pid).unwrap_or(0);
        m.kv_touched_end_kib = kv_touched_kib(&shared).await;
        if m.after_warmup_kib > 0 {
            let growth = |from: u64, to: u64| (to as f64 - from as f64) / from as f64 * 100.0;
            m.growth_percent = growth(m.after_warmup_kib, m.end_kib);
            m.growth_excluding_kv_cache_percent = growth(
                m.after_warmup_kib
                    .saturating_sub(m.kv_touched_after_warmup_kib),
                m.end_kib.saturating_sub(m.kv_touched_end_kib),
            );
        }
    }
    let t = shared.tally();
    Ok(SoakReport {
        seconds,
        concurrency: spec.concurrency,
        served: t.served.clone(),
        errors: t.errors.clone(),
        failures: t.failures.clone(),
        greedy_checked: t.greedy_checked,
        memory,
        kv_usage_at_end: kv,
        running_at_end: running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_the_matching_series() {
        let text = "# HELP x\n\
                    sluice_requests_running{model=\"a\"} 2\n\
                    sluice_requests_running{model=\"b\"} 3\n\
                    sluice_requests_running_other 7\n\
                    sluice_requests_finished_total{model=\"a\",reason=\"cancelled\"} 1\n\
                    sluice_requests_finished_total{model=\"b\",reason=\"cancelled\"} 4\n\
                    sluice_requests_finished_total{model=\"b\",reason=\"stop\"} 9\n\
                    sluice_http_requests_total{route=\"/v1/x\",status=\"200\"} 5\n\
                    odd{v=\"q\\\"x,y\"} 6\n";
        assert_eq!(metric_sum(text, "sluice_requests_running", &[]), Some(5.0));
        let m = [("model", "b")];
        assert_eq!(metric_sum(text, "sluice_requests_running", &m), Some(3.0));
        let cancelled = [("reason", "cancelled")];
        assert_eq!(
            metric_sum(text, "sluice_requests_finished_total", &cancelled),
            Some(5.0)
        );
        let both = [("model", "b"), ("reason", "stop")];
        assert_eq!(
            metric_sum(text, "sluice_requests_finished_total", &both),
            Some(9.0)
        );
        assert_eq!(metric_sum(text, "sluice_requests_waiting", &[]), None);
        assert_eq!(metric_sum(text, "odd", &[("v", "q\"x,y")]), Some(6.0));
    }
}
