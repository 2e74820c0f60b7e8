//! Prometheus exposition of the metrics that the engine and gateway record through the
//! `metrics` facade, served at `GET /metrics`.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics::counter;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sluice_engine::metrics as m;

use crate::state::SharedState;

/// The process-wide recorder, installed on first use (a process has one recorder).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let sizes = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            let histograms: [(&str, &[f64]); 7] = [
                (m::STEP_SECONDS, &LATENCY_BUCKETS),
                (m::STEP_BATCH_SIZE, &sizes),
                (m::STEP_TOKENS, &sizes),
                (m::QUEUE_SECONDS, &LATENCY_BUCKETS),
                (TTFT, &LATENCY_BUCKETS),
                (ITL, &LATENCY_BUCKETS),
                (E2E, &LATENCY_BUCKETS),
            ];
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in histograms {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                    .expect("bucket lists are non-empty");
            }
            match builder.install_recorder() {
                Ok(h) => {
                    m::describe();
                    describe();
                    // Histograms keep every raw sample (one per streamed token) until they
                    // are drained into buckets, which a scrape does; a server nobody
                    // scrapes would grow without bound. Drain them every few seconds.
                    let upkeep = h.clone();
                    let _ = std::thread::Builder::new()
                        .name("sluice-metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(std::time::Duration::from_secs(5));
                            upkeep.run_upkeep();
                        });
                    h
                }
                // Another recorder is already installed (an embedding application's):
                // serve an empty registry rather than fail.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Gives every gateway metric its help text (Prometheus `# HELP`).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        RATE_LIMITED,
        "Requests refused by a key's limits, by key and limit (requests, tokens, streams)."
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by route and status.");
    describe_histogram!(
        TTFT,
        Unit::Seconds,
        "Time from receiving a generation request to its first text."
    );
    describe_histogram!(
        ITL,
        Unit::Seconds,
        "Gaps between consecutive pieces of text of one choice."
    );
    describe_histogram!(
        E2E,
        Unit::Seconds,
        "Time from receiving a generation request to its end."
    );
    describe_counter!(
        PROMPT_TOKENS_BY_KEY,
        "Prompt tokens of finished requests, by key."
    );
    describe_counter!(
        GENERATION_TOKENS_BY_KEY,
        "Generated tokens of finished requests, by key."
    );
    describe_counter!(
        REFUSED,
        "Requests refused because the server was full or shutting down, by reason."
    );
    describe_gauge!(
        HTTP_CONNECTIONS,
        "Open HTTP connections, WebSockets included."
    );
    describe_gauge!(WS_CONNECTIONS, "Open WebSocket connections.");
    describe_counter!(
        CONNECTIONS_SERVED,
        "Connections served, by protocol (http1, h2) and whether over TLS."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed or timed out, by reason."
    );
    describe_counter!(
        TLS_RELOADS,
        "Reloads of the TLS certificate and key, by result (ok, error)."
    );
    describe_gauge!(
        REQUESTS_PREPARING,
        "Requests rendering or tokenizing their prompt, or waiting to."
    );
    crate::upstream::metrics::describe();
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Requests refused by a key's limits, by key name and limit (`requests`, `tokens`,
/// `streams`).
pub const RATE_LIMITED: &str = "sluice_rate_limited_total";

/// Counts one refusal by a key's limits.
pub fn rate_limited(key: &str, limit: &'static str) {
    counter!(RATE_LIMITED, "key" => key.to_string(), "limit" => limit).increment(1);
}

/// HTTP requests, by matched route and status.
pub const HTTP_REQUESTS: &str = "sluice_http_requests_total";
/// Time from receiving a generation request to its first non-empty text.
pub const TTFT: &str = "sluice_time_to_first_token_seconds";
/// Gaps between consecutive non-empty text pieces of one choice.
pub const ITL: &str = "sluice_inter_token_latency_seconds";
/// Time from receiving a generation request to its last event.
pub const E2E: &str = "sluice_request_duration_seconds";
/// Prompt tokens of finished requests, by key name.
pub const PROMPT_TOKENS_BY_KEY: &str = "sluice_key_prompt_tokens_total";
/// Generated tokens of finished requests, by key name.
pub const GENERATION_TOKENS_BY_KEY: &str = "sluice_key_generation_tokens_total";
/// Requests refused because the server was full or shutting down, by reason.
pub const REFUSED: &str = "sluice_requests_refused_total";

/// Latency buckets shared by the request histograms (seconds).
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Middleware: counts every request by route template (not raw path, which would let
/// clients create unbounded label values) and status.
pub async fn count_http(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    counter!(HTTP_REQUESTS, "route" => route, "status" => resp.status().as_u16().to_string())
        .increment(1);
    resp
}

/// One refusal of a request the server could not take.
pub fn refused(reason: &'static str) {
    counter!(REFUSED, "reason" => reason).increment(1);
}

/// Token counts of a finished request, by key.
pub fn tokens_by_key(key: &str, prompt: usize, generated: usize) {
    counter!(PROMPT_TOKENS_BY_KEY, "key" => key.to_string()).increment(prompt as u64);
    counter!(GENERATION_TOKENS_BY_KEY, "key" => key.to_string()).increment(generated as u64);
}

/// Per-request latency bookkeeping for the TTFT, ITL and duration histograms. The
/// histogram handles are resolved once per request, not once per token.
pub struct LatencyTracker {
    ttft: metrics::Histogram,
    itl: metrics::Histogram,
    e2e: metrics::Histogram,
    start: std::time::Instant,
    first: bool,
    last: Vec<Option<std::time::Instant>>,
}

impl LatencyTracker {
    /// Starts the clock for a request of `n` choices on `model`.
    pub fn new(model: &str, n: usize) -> Self {
        let label = || ("model", model.to_string());
        LatencyTracker {
            ttft: metrics::histogram!(TTFT, &[label()]),
            itl: metrics::histogram!(ITL, &[label()]),
            e2e: metrics::histogram!(E2E, &[label()]),
            start: std::time::Instant::now(),
            first: false,
            last: vec![None; n],
        }
    }

    /// A non-empty piece of text for choice `i`.
    pub fn text(&mut self, i: usize) {
        let now = std::time::Instant::now();
        if !self.first {
            self.first = true;
            self.ttft.record((now - self.start).as_secs_f64());
        }
        if let Some(prev) = self.last[i] {
            self.itl.record((now - prev).as_secs_f64());
        }
        self.last[i] = Some(now);
    }

    /// The request is over.
    pub fn done(&self) {
        self.e2e.record(self.start.elapsed().as_secs_f64());
    }
}

/// Open HTTP connections (WebSockets included).
pub const HTTP_CONNECTIONS: &str = "sluice_http_connections";

/// Counts an open TCP connection for as long as hyper serves it.
pub struct HttpConnection;

impl HttpConnection {
    /// One more open connection, until the guard is dropped.
    pub fn open() -> Self {
        metrics::gauge!(HTTP_CONNECTIONS).increment(1.0);
        HttpConnection
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        metrics::gauge!(HTTP_CONNECTIONS).decrement(1.0);
    }
}

/// Connections served, by protocol (`http1`, `h2`) and `tls` (`true`, `false`).
pub const CONNECTIONS_SERVED: &str = "sluice_connections_served_total";

/// Counts one connection handed to the HTTP/1.1 or HTTP/2 server.
pub fn connection_served(protocol: &'static str, tls: bool) {
    counter!(CONNECTIONS_SERVED, "protocol" => protocol, "tls" => if tls { "true" } else { "false" })
        .increment(1);
}

/// TLS handshakes that failed (`error`) or took too long (`timeout`).
pub const TLS_HANDSHAKE_FAILURES: &str = "sluice_tls_handshake_failures_total";

/// Counts one failed TLS handshake.
pub fn tls_handshake_failed(reason: &'static str) {
    counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
}

/// Reloads of the TLS certificate and key, by result (`ok`, `error`).
pub const TLS_RELOADS: &str = "sluice_tls_reloads_total";

/// Counts one reload attempt of the TLS files.
pub fn tls_reload(result: &'static str) {
    counter!(TLS_RELOADS, "result" => result).increment(1);
}

/// Open WebSocket connections.
pub const WS_CONNECTIONS: &str = "sluice_ws_connections";

/// Counts an open WebSocket connection for as long as it lives.
pub struct WsConnection;

impl WsConnection {
    /// One more open connection, until the guard is dropped.
    pub fn open() -> Self {
        metrics::gauge!(WS_CONNECTIONS).increment(1.0);
        WsConnection
    }
}

impl Drop for WsConnection {
    fn drop(&mut self) {
        metrics::gauge!(WS_CONNECTIONS).decrement(1.0);
    }
}

/// Requests rendering or tokenizing their prompt off the runtime, or waiting to
/// (`routes::prepare`).
pub const REQUESTS_PREPARING: &str = "sluice_requests_preparing";

/// Counts one request preparation for as long as it runs or waits.
pub struct Preparing;

impl Preparing {
    /// One more preparation, until the guard is dropped.
    pub fn start() -> Self {
        metrics::gauge!(REQUESTS_PREPARING).increment(1.0);
        Preparing
    }
}

impl Drop for Preparing {
    fn drop(&mut self) {
        metrics::gauge!(REQUESTS_PREPARING).decrement(1.0);
    }
}
