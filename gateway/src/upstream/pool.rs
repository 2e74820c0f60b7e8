//! The upstream replicas: what each serves, whether it is healthy, and how loaded it is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::metrics;

/// One upstream server.
pub struct Replica {
    /// Its root URL, without a trailing `/`.
    pub url: String,
    /// What the gateway sends it as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// The models it serves.
    pub models: Vec<String>,
    /// A hash of `url`, its identity for rendezvous hashing.
    pub id: u64,
    healthy: AtomicBool,
    in_flight: AtomicU64,
    /// Requests running or waiting on it that are not this gateway's (its own
    /// `vllm:num_requests_running` + `vllm:num_requests_waiting` at the last check, less
    /// what this gateway had in flight on it then).
    external: AtomicU64,
    /// Whether it answers `POST /tokenize` (learned from the first tries).
    pub tokenize: super::tokens::TokenizeSupport,
}

impl Replica {
    pub fn new(url: String, api_key: Option<String>, models: Vec<String>) -> Self {
        let id = super::routing::fnv1a(url.as_bytes());
        metrics::set_healthy(&url, true);
        metrics::set_in_flight(&url, 0);
        Replica {
            url,
            api_key,
            models,
            id,
            healthy: AtomicBool::new(true),
            in_flight: AtomicU64::new(0),
            external: AtomicU64::new(0),
            tokenize: Default::default(),
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    /// Requests on it now, as far as the gateway knows: its own in flight plus others'.
    pub fn load(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed) + self.external.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Marks it (un)healthy: after a failed health check, or at once when a request
    /// cannot connect to it.
    pub fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            if healthy {
                tracing::info!(upstream = %self.url, "upstream is healthy again");
            } else {
                tracing::warn!(upstream = %self.url, "upstream is unhealthy; skipped until it passes a health check");
            }
        }
        metrics::set_healthy(&self.url, healthy);
    }

    /// Reads its `/ready` (health; `/health` for servers without `/ready`, such as
    /// vLLM) and `/metrics` (queue) once.
    pub async fn check(&self, client: &reqwest::Client, timeout: Duration) {
        let ours_before = self.in_flight.load(Ordering::Relaxed);
        let status = |path: &'static str| async move {
            self.get(client, path)
                .timeout(timeout)
                .send()
                .await
                .map(|r| r.status())
                .ok()
        };
        let ready = match status("/ready").await {
            Some(s) if s == reqwest::StatusCode::NOT_FOUND => {
                status("/health").await.is_some_and(|s| s.is_success())
            }
            s => s.is_some_and(|s| s.is_success()),
        };
        self.set_healthy(ready);
        if !ready {
            return;
        }
        // The queue is a hint: an upstream that does not export it (or refuses this key
        // on /metrics) is balanced on this gateway's own count only.
        let text = match self.get(client, "/metrics").timeout(timeout).send().await {
            Ok(r) if r.status().is_success() => r.text().await.ok(),
            _ => None,
        };
        let queued = text.as_deref().and_then(|t| {
            let running = metric_sum(t, "vllm:num_requests_running")?;
            let waiting = metric_sum(t, "vllm:num_requests_waiting").unwrap_or(0.0);
            Some((running + waiting).max(0.0) as u64)
        });
        // Ours may have changed while it was asked: the larger count errs towards
        // under-counting the others (which only weakens the hint).
        let ours = ours_before.max(self.in_flight.load(Ordering::Relaxed));
        self.external
            .store(queued.unwrap_or(0).saturating_sub(ours), Ordering::Relaxed);
    }

    fn get(&self, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        let req = client.get(format!("{}{path}", self.url));
        match &self.api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }
}

/// Holds one request's place in flight on a replica and counts its outcome when dropped
/// (`cancelled` unless [`InFlight::finish`] said otherwise).
pub struct InFlight {
    replica: Arc<Replica>,
    model: String,
    outcome: Option<&'static str>,
}

impl InFlight {
    pub fn start(replica: Arc<Replica>, model: &str) -> Self {
        let n = replica.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::set_in_flight(&replica.url, n);
        InFlight {
            replica,
            model: model.to_string(),
            outcome: None,
        }
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Records how the attempt ended (the first call counts).
    pub fn finish(&mut self, outcome: &'static str) {
        self.outcome.get_or_insert(outcome);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let n = self.replica.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::set_in_flight(&self.replica.url, n);
        metrics::attempt_finished(
            &self.replica.url,
            &self.model,
            self.outcome.unwrap_or("cancelled"),
        );
    }
}

/// Checks every replica every `every`, for the life of the process.
pub fn spawn_health_checks(replicas: Vec<Arc<Replica>>, client: reqwest::Client, every: Duration) {
    let timeout = every.max(Duration::from_secs(2));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            futures_util::future::join_all(replicas.iter().map(|r| r.check(&client, timeout)))
                .await;
        }
    });
}

/// The sum of a Prometheus family's samples (every label set), if it has any.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit_once('}')
            .map_or(rest, |(_, v)| v)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_families_are_summed_over_labels() {
        let text = "# HELP vllm:num_requests_running x\n\
                    vllm:num_requests_running{model_name=\"a\"} 3\n\
                    vllm:num_requests_running{model_name=\"b\"} 2\n\
                    vllm:num_requests_running_other 7\n\
                    vllm:num_requests_waiting 1\n";
        assert_eq!(metric_sum(text, "vllm:num_requests_running"), Some(5.0));
        assert_eq!(metric_sum(text, "vllm:num_requests_waiting"), Some(1.0));
        assert_eq!(metric_sum(text, "vllm:kv_cache_usage_perc"), None);
    }

    #[test]
    fn in_flight_is_counted_until_dropped() {
        let r = Arc::new(Replica::new("http://x:1".into(), None, vec!["m".into()]));
        let a = InFlight::start(r.clone(), "m");
        let mut b = InFlight::start(r.clone(), "m");
        assert_eq!(r.load(), 2);
        b.finish("ok");
        drop(a);
        drop(b);
        assert_eq!(r.load(), 0);
    }
}
