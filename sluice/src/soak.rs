//! `sluice soak`: command-line front of the soak test in `sluice-loadtest`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_loadtest::soak::{soak, SoakSpec};

/// `sluice soak` options.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// Server to soak.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Tokens per greedy answer.
    #[arg(long, default_value_t = 48)]
    max_tokens: u32,
    /// The server's process id, to sample its resident memory (same machine only).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Where to write report.json.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
}

/// Runs the soak; fails (exit 1) unless every requirement held.
pub async fn run_cli(a: SoakArgs) -> Result<()> {
    if !(a.duration.is_finite() && a.duration > 0.0) || a.concurrency == 0 {
        bail!("--duration and --concurrency must be positive");
    }
    let spec = SoakSpec {
        url: a.url.trim_end_matches('/').to_string(),
        api_key: a
            .api_key
            .or_else(|| Some(sluice_gateway::auth::DEV_KEY.into())),
        duration: Duration::from_secs_f64(a.duration),
        concurrency: a.concurrency,
        server_pid: a.server_pid,
        max_tokens: a.max_tokens,
    };
    eprintln!(
        "soaking {} for {:.0} s with {} clients",
        spec.url, a.duration, spec.concurrency
    );
    let report = soak(spec, |t, served| {
        eprintln!("  {t:>5.0} s: {served} operations")
    })
    .await
    .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let path = a.out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("report: {}", path.display());
    if !report.passed() {
        bail!("the soak failed: see failures, memory growth and KV usage above");
    }
    println!("soak passed");
    Ok(())
}
