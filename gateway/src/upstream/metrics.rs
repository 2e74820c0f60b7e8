//! The upstream families of `/metrics`, labelled by upstream URL.

use metrics::{counter, describe_counter, describe_gauge, gauge};

/// Attempts to forward a request to an upstream, by upstream, model and outcome.
pub const REQUESTS: &str = "sluice_upstream_requests_total";
/// 1 while an upstream passes its health checks, else 0.
pub const HEALTHY: &str = "sluice_upstream_healthy";
/// Requests the gateway has in flight on an upstream (streams until they end).
pub const IN_FLIGHT: &str = "sluice_upstream_in_flight";

/// Help texts (called with the gateway's own, once the recorder is installed).
pub fn describe() {
    describe_counter!(
        REQUESTS,
        "Requests forwarded to an upstream, by upstream, model and outcome (ok, \
         client_error, server_error, connect_error, timeout, error, stream_error, cancelled)."
    );
    describe_gauge!(
        HEALTHY,
        "Whether an upstream passes its health checks (1) or is skipped (0)."
    );
    describe_gauge!(
        IN_FLIGHT,
        "Requests in flight on an upstream from this gateway (streams until they end)."
    );
}

pub fn attempt_finished(upstream: &str, model: &str, outcome: &'static str) {
    counter!(REQUESTS, "upstream" => upstream.to_string(), "model" => model.to_string(), "outcome" => outcome)
        .increment(1);
}

pub fn set_healthy(upstream: &str, healthy: bool) {
    gauge!(HEALTHY, "upstream" => upstream.to_string()).set(if healthy { 1.0 } else { 0.0 });
}

pub fn set_in_flight(upstream: &str, n: u64) {
    gauge!(IN_FLIGHT, "upstream" => upstream.to_string()).set(n as f64);
}
