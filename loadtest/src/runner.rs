//! Running the load: closed loop (N clients back to back) or open loop (arrivals at a
//! rate, each request on its own), and timing every streamed request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use sluice_client::{
    ChatMessage, ChatRequest, Client, ClientError, CompletionRequest, Sampling, SessionEvent,
};

use crate::arrivals::Arrivals;
use crate::report::Report;

/// Which API the load uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    /// Collaborative sessions over the WebSocket: each request joins a fresh session,
    /// says the prompt and generates; timed from `generate` to the token events.
    Ws,
}

/// How requests are issued.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// `concurrency` clients, each sending its next request when the last one ends.
    /// Client `i` starts at `ramp_up × i / concurrency` (all at once when zero), so that
    /// many streams can be measured without every connection arriving at one instant.
    Closed {
        concurrency: usize,
        ramp_up: Duration,
    },
    /// Arrivals at `rate` per second (Poisson, or gamma gaps with `burstiness` ≠ 1).
    Open { rate: f64, burstiness: f64 },
}

/// Service-level objectives for goodput: a request counts when it meets all that are set.
#[derive(Debug, Clone, Copy, Default)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

/// Everything about one load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: String,
    pub api_key: Option<String>,
    pub model: Option<String>,
    pub endpoint: Endpoint,
    pub load: Load,
    /// Stop after this many requests (and/or after `duration`).
    pub requests: Option<usize>,
    pub duration: Option<Duration>,
    pub max_tokens: u32,
    /// Sampling temperature sent with every request; `None` sends none (the server's
    /// default, which for OpenAI-compatible servers is 1).
    pub temperature: Option<f32>,
    /// Nucleus mass sent with every request; `None` sends none.
    pub top_p: Option<f32>,
    /// Other body fields sent with every request (`--extra-body`, as vLLM's benchmark
    /// has it): `response_format`, `top_k`, …
    pub extra_body: serde_json::Map<String, serde_json::Value>,
    pub prompts: Vec<String>,
    pub slo: Slo,
    /// A request taking longer than this counts as a `timeout` error.
    pub timeout: Duration,
    /// Print progress to stderr.
    pub progress: bool,
}

/// Distinct session names across the process.
static SESSION: AtomicUsize = AtomicUsize::new(0);

/// What one request measured (seconds).
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    pub error: Option<String>,
    /// The error's message, for the report's examples.
    pub detail: Option<String>,
    pub ttft: Option<f64>,
    pub itl: Vec<f64>,
    pub e2e: f64,
    pub output_tokens: u64,
    /// When it ended, from the start of the run.
    pub ended_at: f64,
}

fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Api { status: 0, .. } => "stream_error".into(),
        ClientError::Api { status, .. } => format!("http_{status}"),
        ClientError::Http(e) if e.is_timeout() => "timeout".into(),
        ClientError::Http(e) if e.is_connect() => "connect".into(),
        ClientError::Http(_) | ClientError::Protocol(_) => "broken_stream".into(),
        ClientError::WebSocket(_) => "websocket".into(),
    }
}

/// Sends one streamed request and times it.
async fn one(client: &Client, spec: &LoadSpec, prompt: &str, run_start: Instant) -> Outcome {
    let sampling = Sampling {
        model: spec.model.clone(),
        max_tokens: Some(spec.max_tokens),
        temperature: spec.temperature,
        top_p: spec.top_p,
        ignore_eos: true,
        extra: spec.extra_body.clone(),
        ..Sampling::default()
    };
    let start = Instant::now();
    let mut out = Outcome::default();
    let mut last: Option<Instant> = None;
    let mut on_text = |text: &str, out: &mut Outcome| {
        if text.is_empty() {
            return;
        }
        let now = Instant::now();
        match last {
            None => out.ttft = Some((now - start).as_secs_f64()),
            Some(prev) => out.itl.push((now - prev).as_secs_f64()),
        }
        last = Some(now);
    };
    let work = async {
        match spec.endpoint {
            Endpoint::Chat => {
                let req = ChatRequest {
                    messages: vec![ChatMessage::user(prompt)],
                    sampling,
                };
                let mut s = client.chat_stream(&req).await?;
                while let Some(c) = s.next().await {
                    let c = c?;
                    on_text(c.text(), &mut out);
                    if let Some(u) = c.usage {
                        out.output_tokens = u.completion_tokens;
                    }
                }
            }
            Endpoint::Completions => {
                let mut sampling = sampling;
                sampling
                    .extra
                    .insert("stream_options".into(), json!({"include_usage": true}));
                let req = CompletionRequest {
                    prompt: prompt.to_string(),
                    sampling,
                };
                let mut s = client.completion_stream(&req).await?;
                while let Some(c) = s.next().await {
                    let c = c?;
                    on_text(c.text(), &mut out);
                    if let Some(u) = c.usage {
                        out.output_tokens = u.completion_tokens;
                    }
                }
            }
            Endpoint::Ws => {
                let session = format!("loadtest-{}", SESSION.fetch_add(1, Ordering::Relaxed));
                let mut ws = client.join_session(&session, "loadtest").await?;
                ws.say(prompt).await?;
                ws.generate(&sampling).await?;
                loop {
                    match ws.next_event().await? {
                        None => return Err(ClientError::WebSocket("closed mid-generation".into())),
                        Some(SessionEvent::Token { text, .. }) => on_text(&text, &mut out),
                        Some(SessionEvent::GenerationDone {
                            finish_reason,
                            usage,
                            ..
                        }) => {
                            if finish_reason == "error" {
                                return Err(ClientError::WebSocket("generation failed".into()));
                            }
                            out.output_tokens = usage["completion_tokens"].as_u64().unwrap_or(0);
                            break;
                        }
                        Some(SessionEvent::Error { code, message }) => {
                            return Err(ClientError::Api {
                                status: 0,
                                error: sluice_client::ApiErrorBody {
                                    message,
                                    kind: None,
                                    param: None,
                                    code: Some(code),
                                },
                            })
                        }
                        Some(_) => {}
                    }
                }
                let _ = ws.leave().await;
            }
        }
        Ok::<(), ClientError>(())
    };
    let result = tokio::time::timeout(spec.timeout, work).await;
    (out.error, out.detail) = match result {
        Err(_) => (
            Some("timeout".into()),
            Some(format!("no end after {:?}", spec.timeout)),
        ),
        Ok(Err(e)) => (Some(error_kind(&e)), Some(e.to_string())),
        Ok(Ok(())) if out.output_tokens == 0 => (
            Some("no_usage".into()),
            Some("the stream carried no usage with completion tokens".into()),
        ),
        Ok(Ok(())) => (None, None),
    };
    out.e2e = start.elapsed().as_secs_f64();
    out.ended_at = run_start.elapsed().as_secs_f64();
    out
}

/// Runs the load and summarises it.
pub async fn run(spec: &LoadSpec) -> Report {
    // A fresh connection per request: reusing pooled keep-alive connections races with
    // servers that close idle ones (llama-server does), which would count as errors of
    // the server under test. On loopback a connect costs well under a millisecond, the
    // same for every server.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default();
    let client = Client::with_http(&spec.url, spec.api_key.clone(), http);
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::new()));
    let tokens = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let issued = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = spec.duration.map(|d| start + d);
    // Claims the next request slot, or says the run is over.
    let claim = {
        let issued = issued.clone();
        let limit = spec.requests;
        move || -> Option<usize> {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            let i = issued.fetch_add(1, Ordering::Relaxed);
            if limit.is_some_and(|l| i >= l) {
                return None;
            }
            Some(i)
        }
    };
    // A progress bar with live throughput (on a terminal only; see `LoadSpec::progress`).
    let progress = spec.progress.then(|| {
        let bar = match spec.requests {
            Some(n) => indicatif::ProgressBar::new(n as u64),
            None => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} requests  {msg}  {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let (results, tokens, b) = (results.clone(), tokens.clone(), bar.clone());
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let done = results.lock().map(|r| r.len()).unwrap_or(0);
                let secs = start.elapsed().as_secs_f64().max(1e-9);
                b.set_position(done as u64);
                b.set_message(format!(
                    "{:.0} output tok/s",
                    tokens.load(Ordering::Relaxed) as f64 / secs
                ));
            }
        });
        (bar, ticker)
    });
    let record =
        |o: Outcome, results: &Mutex<Vec<Outcome>>, tokens: &std::sync::atomic::AtomicU64| {
            tokens.fetch_add(o.output_tokens, Ordering::Relaxed);
            if let Ok(mut r) = results.lock() {
                r.push(o);
            }
        };
    match spec.load {
        Load::Closed {
            concurrency,
            ramp_up,
        } => {
            let mut workers = Vec::new();
            let clients = concurrency.max(1);
            for k in 0..clients {
                let starts_at = start + ramp_up.mul_f64(k as f64 / clients as f64);
                let (client, spec, results, tokens, claim) = (
                    client.clone(),
                    spec.clone(),
                    results.clone(),
                    tokens.clone(),
                    claim.clone(),
                );
                workers.push(tokio::spawn(async move {
                    tokio::time::sleep_until(starts_at.into()).await;
                    while let Some(i) = claim() {
                        let prompt = &spec.prompts[i % spec.prompts.len()];
                        let o = one(&client, &spec, prompt, start).await;
                        record(o, &results, &tokens);
                    }
                }));
            }
            for w in workers {
                let _ = w.await;
            }
        }
        Load::Open { rate, burstiness } => {
            let mut arrivals = Arrivals::new(rate, burstiness, 42);
            let mut tasks = Vec::new();
            let mut next_at = start;
            while let Some(i) = claim() {
                tokio::time::sleep_until(next_at.into()).await;
                let (client, spec, results, tokens) = (
                    client.clone(),
                    spec.clone(),
                    results.clone(),
                    tokens.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let prompt = &spec.prompts[i % spec.prompts.len()];
                    let o = one(&client, &spec, prompt, start).await;
                    record(o, &results, &tokens);
                }));
                next_at += Duration::from_secs_f64(arrivals.next_gap());
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    if let Some((bar, ticker)) = progress {
        ticker.abort();
        bar.finish_and_clear();
    }
    let outcomes = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    Report::from_outcomes(spec, &outcomes, start.elapsed().as_secs_f64())
}
