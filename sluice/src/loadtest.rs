//! `sluice loadtest`: command-line front of the `sluice-loadtest` harness.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_loadtest::{
    builtin_prompts, compare_table, load_prompts, run, Endpoint, Load, LoadSpec, Report, Slo,
};

/// `sluice loadtest` options.
#[derive(clap::Args)]
pub struct LoadtestArgs {
    /// Server to load (any OpenAI-compatible one).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// `chat`, `completions`, or `ws` (collaborative WebSocket sessions).
    #[arg(long, default_value = "chat")]
    endpoint: String,
    /// Closed loop: this many clients, each sending its next request when one ends.
    #[arg(long, default_value_t = 1, conflicts_with = "rate")]
    concurrency: usize,
    /// Closed loop: start the clients evenly over this many seconds instead of at once.
    #[arg(long, default_value_t = 0.0, conflicts_with = "rate")]
    ramp_up: f64,
    /// Open loop: requests per second (Poisson arrivals).
    #[arg(long)]
    rate: Option<f64>,
    /// Gamma shape of the arrival gaps (1 = Poisson, < 1 burstier).
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Requests to send (default 100, or unlimited with --duration).
    #[arg(long)]
    requests: Option<usize>,
    /// Stop issuing requests after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Output tokens per request (sent with ignore_eos, so every server does the same work).
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sampling temperature sent with every request, or `default` to send none (the
    /// server's default; OpenAI's is 1). Benchmarks compare servers at 0 (greedy).
    #[arg(long, default_value = "0")]
    temperature: String,
    /// `top_p` sent with every request (none when absent).
    #[arg(long)]
    top_p: Option<f32>,
    /// A JSON object of other fields sent with every request, e.g.
    /// '{"response_format": {"type": "json_object"}}'.
    #[arg(long)]
    extra_body: Option<String>,
    /// JSONL prompts ({"prompt": ...}, {"messages": [...]}, or strings); default: built in.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Closed-loop concurrency sweep, e.g. 1,4,16,64.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// SLOs for goodput, e.g. ttft=500,tpot=50 (milliseconds).
    #[arg(long)]
    slo: Option<String>,
    /// Write report.json, report.html (charts as inline SVG) and, for sweeps, the
    /// charts as .svg files here.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Name of the server in reports (default: its URL).
    #[arg(long)]
    name: Option<String>,
    /// Name of the --compare server in reports.
    #[arg(long)]
    compare_name: Option<String>,
    /// Run the same load against this second server afterwards and compare.
    #[arg(long)]
    compare: Option<String>,
    #[arg(long)]
    compare_key: Option<String>,
    /// Seconds before a request counts as a timeout.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    #[arg(long)]
    no_progress: bool,
}

fn parse_slo(s: &str) -> Result<Slo> {
    let mut slo = Slo::default();
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .context("--slo takes ttft=MS,tpot=MS")?;
        let v: f64 = v
            .parse()
            .with_context(|| format!("--slo {k}: {v} is not a number"))?;
        match k.trim() {
            "ttft" => slo.ttft_ms = Some(v),
            "tpot" => slo.tpot_ms = Some(v),
            other => bail!("--slo: unknown objective {other:?} (ttft, tpot)"),
        }
    }
    Ok(slo)
}

/// Runs the load test(s) and prints the tables.
pub async fn run_cli(a: LoadtestArgs) -> Result<()> {
    let endpoint = match a.endpoint.as_str() {
        "chat" => Endpoint::Chat,
        "completions" => Endpoint::Completions,
        "ws" => Endpoint::Ws,
        other => bail!("--endpoint {other:?}: use chat, completions or ws"),
    };
    let prompts = match &a.prompts {
        Some(p) => load_prompts(p).map_err(anyhow::Error::msg)?,
        None => builtin_prompts(),
    };
    let slo = a
        .slo
        .as_deref()
        .map(parse_slo)
        .transpose()?
        .unwrap_or_default();
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if a.rate.is_some_and(|r| !positive(r)) || !positive(a.burstiness) {
        bail!("--rate and --burstiness must be positive");
    }
    if !(a.ramp_up.is_finite() && a.ramp_up >= 0.0) {
        bail!("--ramp-up must be a number of seconds, 0 or more");
    }
    let temperature = match a.temperature.as_str() {
        "default" => None,
        t => Some(
            t.parse::<f32>()
                .ok()
                .filter(|t| t.is_finite() && *t >= 0.0)
                .context("--temperature takes a number >= 0 or `default`")?,
        ),
    };
    if a.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        bail!("--top-p must be in (0, 1]");
    }
    let extra_body = match &a.extra_body {
        None => serde_json::Map::new(),
        Some(s) => match serde_json::from_str(s) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => bail!("--extra-body takes a JSON object"),
        },
    };
    let duration = a.duration.map(Duration::from_secs_f64);
    let requests = a
        .requests
        .or(if duration.is_some() { None } else { Some(100) });
    let base = LoadSpec {
        url: a.url.clone(),
        api_key: a.api_key.clone(),
        model: a.model.clone(),
        endpoint,
        load: match a.rate {
            Some(rate) => Load::Open {
                rate,
                burstiness: a.burstiness,
            },
            None => Load::Closed {
                concurrency: a.concurrency,
                ramp_up: Duration::from_secs_f64(a.ramp_up),
            },
        },
        requests,
        duration,
        max_tokens: a.max_tokens,
        temperature,
        top_p: a.top_p,
        extra_body,
        prompts,
        slo,
        timeout: Duration::from_secs_f64(a.timeout),
        progress: !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let specs: Vec<LoadSpec> = if a.sweep.is_empty() {
        vec![base]
    } else {
        a.sweep
            .iter()
            .map(|&c| LoadSpec {
                load: Load::Closed {
                    concurrency: c,
                    ramp_up: Duration::from_secs_f64(a.ramp_up),
                },
                // Enough requests for every client to finish a few.
                requests: base.requests.map(|r| r.max(c * 2)),
                ..base.clone()
            })
            .collect()
    };
    let mut runs: Vec<Report> = Vec::new();
    let mut compared: Vec<Report> = Vec::new();
    for spec in &specs {
        let r = run(spec).await;
        println!("{}", r.table());
        if let Some(url2) = &a.compare {
            let other = LoadSpec {
                url: url2.clone(),
                api_key: a.compare_key.clone().or(a.api_key.clone()),
                ..spec.clone()
            };
            let r2 = run(&other).await;
            println!("{}", r2.table());
            println!("{}", compare_table(&r, &r2));
            compared.push(r2);
        }
        runs.push(r);
    }
    if let Some(dir) = &a.output {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = a.name.clone().unwrap_or_else(|| a.url.clone());
        let name2 = a
            .compare_name
            .clone()
            .or(a.compare.clone())
            .unwrap_or_default();
        let body = serde_json::json!({
            "name": name, "runs": runs, "compare_name": name2, "compare": compared,
        });
        let path = dir.join("report.json");
        std::fs::write(&path, serde_json::to_string_pretty(&body)?)?;
        let mut groups = vec![(name, runs)];
        if !compared.is_empty() {
            groups.push((name2, compared));
        }
        std::fs::write(
            dir.join("report.html"),
            sluice_loadtest::html::render("Sluice load test", &groups),
        )?;
        for (file, svg) in sluice_loadtest::html::sweep_charts(&groups) {
            std::fs::write(dir.join(file), svg)?;
        }
        println!("wrote {} and report.html", path.display());
    }
    Ok(())
}
