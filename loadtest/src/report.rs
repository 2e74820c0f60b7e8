//! The results of a run: a JSON-serialisable report and its text table.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::runner::{Endpoint, Load, LoadSpec, Outcome};
use crate::stats::{cdf, Summary};

/// Aggregated results; field names carry their units.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub endpoint: &'static str,
    pub concurrency: Option<usize>,
    /// Closed loop: seconds over which the clients started.
    pub ramp_up_s: Option<f64>,
    pub request_rate: Option<f64>,
    pub burstiness: Option<f64>,
    pub max_tokens: u32,
    pub requests: usize,
    pub completed: usize,
    /// Failed requests by kind: `http_<status>`, `timeout`, `broken_stream`, …
    pub errors: BTreeMap<String, usize>,
    /// The first message seen for each kind of error.
    pub error_examples: BTreeMap<String, String>,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_output_tokens: u64,
    pub ttft_ms: Summary,
    pub itl_ms: Summary,
    pub tpot_ms: Summary,
    pub e2e_ms: Summary,
    /// Completed requests per second that met every SLO given.
    pub goodput_requests_per_s: Option<f64>,
    pub slo_ttft_ms: Option<f64>,
    pub slo_tpot_ms: Option<f64>,
    /// Output tokens finished per one-second window, for throughput-over-time charts.
    pub output_tokens_per_s_timeline: Vec<f64>,
    /// Percentiles 0, 2, …, 100 of TTFT, ITL and end-to-end latency (ms), for CDF charts.
    pub cdf_ms: BTreeMap<String, Vec<f64>>,
}

impl Report {
    pub(crate) fn from_outcomes(spec: &LoadSpec, outs: &[Outcome], duration_s: f64) -> Report {
        let ok: Vec<&Outcome> = outs.iter().filter(|o| o.error.is_none()).collect();
        let mut errors = BTreeMap::new();
        let mut error_examples = BTreeMap::new();
        for o in outs {
            if let Some(e) = &o.error {
                *errors.entry(e.clone()).or_insert(0) += 1;
                if let Some(d) = &o.detail {
                    error_examples.entry(e.clone()).or_insert_with(|| d.clone());
                }
            }
        }
        let ms = |v: Vec<f64>| Summary::of(&v.iter().map(|x| x * 1e3).collect::<Vec<_>>());
        let to_ms = |v: Vec<f64>| v.iter().map(|x| x * 1e3).collect::<Vec<_>>();
        let mut cdf_ms = BTreeMap::new();
        cdf_ms.insert(
            "ttft".into(),
            cdf(&to_ms(ok.iter().filter_map(|o| o.ttft).collect())),
        );
        cdf_ms.insert(
            "itl".into(),
            cdf(&to_ms(
                ok.iter().flat_map(|o| o.itl.iter().copied()).collect(),
            )),
        );
        cdf_ms.insert(
            "e2e".into(),
            cdf(&to_ms(ok.iter().map(|o| o.e2e).collect())),
        );
        let tpot = |o: &Outcome| {
            (o.output_tokens > 1)
                .then(|| (o.e2e - o.ttft.unwrap_or(o.e2e)) / (o.output_tokens - 1) as f64)
        };
        let total_tokens: u64 = ok.iter().map(|o| o.output_tokens).sum();
        let good = (spec.slo.ttft_ms.is_some() || spec.slo.tpot_ms.is_some()).then(|| {
            let n = ok
                .iter()
                .filter(|o| {
                    spec.slo
                        .ttft_ms
                        .is_none_or(|t| o.ttft.is_some_and(|x| x * 1e3 <= t))
                        && spec
                            .slo
                            .tpot_ms
                            .is_none_or(|t| tpot(o).is_none_or(|x| x * 1e3 <= t))
                })
                .count();
            n as f64 / duration_s
        });
        let mut timeline = vec![0f64; duration_s.ceil().max(1.0) as usize];
        for o in &ok {
            let i = (o.ended_at.floor() as usize).min(timeline.len() - 1);
            timeline[i] += o.output_tokens as f64;
        }
        let (concurrency, ramp_up_s, request_rate, burstiness) = match spec.load {
            Load::Closed {
                concurrency,
                ramp_up,
            } => (Some(concurrency), Some(ramp_up.as_secs_f64()), None, None),
            Load::Open { rate, burstiness } => (None, None, Some(rate), Some(burstiness)),
        };
        Report {
            url: spec.url.clone(),
            endpoint: match spec.endpoint {
                Endpoint::Chat => "chat",
                Endpoint::Completions => "completions",
                Endpoint::Ws => "ws",
            },
            concurrency,
            ramp_up_s,
            request_rate,
            burstiness,
            max_tokens: spec.max_tokens,
            requests: outs.len(),
            completed: ok.len(),
            errors,
            error_examples,
            duration_s,
            requests_per_s: ok.len() as f64 / duration_s,
            output_tokens_per_s: total_tokens as f64 / duration_s,
            total_output_tokens: total_tokens,
            ttft_ms: ms(ok.iter().filter_map(|o| o.ttft).collect()),
            itl_ms: ms(ok.iter().flat_map(|o| o.itl.iter().copied()).collect()),
            tpot_ms: ms(ok.iter().filter_map(|o| tpot(o)).collect()),
            e2e_ms: ms(ok.iter().map(|o| o.e2e).collect()),
            goodput_requests_per_s: good,
            slo_ttft_ms: spec.slo.ttft_ms,
            slo_tpot_ms: spec.slo.tpot_ms,
            output_tokens_per_s_timeline: timeline,
            cdf_ms,
        }
    }

    /// A plain-text table of the run.
    pub fn table(&self) -> String {
        let load = match (self.concurrency, self.request_rate) {
            (Some(c), _) => format!("closed loop, concurrency {c}"),
            (_, Some(r)) => format!(
                "open loop, {r} req/s (burstiness {})",
                self.burstiness.unwrap_or(1.0)
            ),
            _ => String::new(),
        };
        let mut s = format!(
            "{} ({}, {load}, max_tokens {})\n",
            self.url, self.endpoint, self.max_tokens
        );
        s += &format!(
            "requests {} ok {} errors {:?} in {:.2} s\n",
            self.requests, self.completed, self.errors, self.duration_s
        );
        for (kind, msg) in &self.error_examples {
            s += &format!("  {kind}: {msg}\n");
        }
        s += &format!(
            "throughput {:.2} req/s, {:.1} output tok/s",
            self.requests_per_s, self.output_tokens_per_s
        );
        if let Some(g) = self.goodput_requests_per_s {
            s += &format!(", goodput {g:.2} req/s");
        }
        s += "\n";
        s += &format!(
            "{:<10}{:>10}{:>10}{:>10}{:>10}{:>10}\n",
            "ms", "mean", "p50", "p90", "p99", "max"
        );
        for (name, m) in [
            ("TTFT", &self.ttft_ms),
            ("ITL", &self.itl_ms),
            ("TPOT", &self.tpot_ms),
            ("E2E", &self.e2e_ms),
        ] {
            s += &format!(
                "{name:<10}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}\n",
                m.mean, m.p50, m.p90, m.p99, m.max
            );
        }
        s
    }
}

/// Two runs side by side with `a / b` ratios.
pub fn compare_table(a: &Report, b: &Report) -> String {
    let rows: [(&str, f64, f64); 6] = [
        ("output tok/s", a.output_tokens_per_s, b.output_tokens_per_s),
        ("req/s", a.requests_per_s, b.requests_per_s),
        ("TTFT p50 ms", a.ttft_ms.p50, b.ttft_ms.p50),
        ("TTFT p99 ms", a.ttft_ms.p99, b.ttft_ms.p99),
        ("ITL p50 ms", a.itl_ms.p50, b.itl_ms.p50),
        ("TPOT mean ms", a.tpot_ms.mean, b.tpot_ms.mean),
    ];
    let mut s = format!("{:<14}{:>14}{:>14}{:>10}\n", "", "first", "second", "ratio");
    for (name, x, y) in rows {
        s += &format!("{name:<14}{x:>14.1}{y:>14.1}{:>9.2}x\n", x / y);
    }
    s += &format!("first: {}\nsecond: {}\n", a.url, b.url);
    s
}
