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
            let step_seconds = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            let sizes = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(m::STEP_SECONDS.into()), &step_seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(m::STEP_BATCH_SIZE.into()), &sizes)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(m::STEP_TOKENS.into()), &sizes)
                })
                .expect("bucket lists are non-empty");
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is already installed (an embedding application's):
                // serve an empty registry rather than fail.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
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
