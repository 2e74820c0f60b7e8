//! `sluice check consistency`: the same prompts run greedily through two runtimes (a GGUF
//! on the native engine and its ONNX export, two files), or through one model two ways
//! (`scalar`: its scalar kernels instead of SIMD; `batched`: each request inside a batch
//! of 16 others; `cuda`: on the CUDA backend), token by token, with the size of every
//! difference.
//!
//! Each side runs in its own process (`sluice check run`, hidden): kernel choice is
//! process-wide, and one side's memory is gone before the other loads. A side prints,
//! per prompt, the greedy tokens with their top-20 log-probabilities; the comparison
//! works on those (log-probabilities are the logits shifted per step, so their
//! differences are the logit differences up to that shift).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_engine::backends::device::DeviceChoice;
use sluice_engine::backends::Numerics;
use sluice_engine::sampling::SamplingParams;
use sluice_engine::{Event, GenerationRequest};
use sluice_gateway::api_types::InMessage;

/// Alternatives recorded per step.
const TOP: usize = 20;
/// Other requests around each one in `batched` mode.
const BATCH_OTHERS: usize = 16;

/// The built-in prompts: everyday chat.
const PROMPTS: [&str; 8] = [
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence.",
    "Tell me a fun fact about cats.",
    "How do I boil an egg?",
    "Give me a synonym for happy.",
    "What is 12 times 7?",
];

/// `sluice check` actions.
#[derive(clap::Subcommand)]
pub enum CheckCmd {
    /// Run the same prompts greedily through two runtimes, files or kernel sets and
    /// report where and by how much they differ; exit 1 when a divergence is not a
    /// near-tie.
    Consistency(ConsistencyArgs),
    /// Check the CUDA backend on this machine's GPU: every kernel against a CPU
    /// reference on random inputs, and the whole forward pass of every architecture
    /// against the CPU's; exit 1 when any check fails.
    Cuda(CudaCheckArgs),
    /// One side of a check (internal).
    #[command(hide = true)]
    Run(RunArgs),
}

/// `sluice check cuda` options.
#[derive(clap::Args)]
pub struct CudaCheckArgs {
    /// Also write the report (one row per check) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `sluice check consistency` options.
#[derive(clap::Args)]
pub struct ConsistencyArgs {
    /// The model: a GGUF file, an ONNX export's folder, or a fetchable model's name
    /// [default: the default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// A second model file or export, or `scalar` (the same model on the scalar
    /// kernels), `batched` (the same model, each request among 16 others) or `cuda`
    /// (the same model on the CUDA backend).
    #[arg(long)]
    against: String,
    /// The device both sides run on (but `--against cuda`'s second side): cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// JSONL prompts, one `{"messages": [...]}` or `{"prompt": "..."}` per line
    /// [default: 8 built-in chat prompts].
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// A divergence is a near-tie when the second side's token is at most this many
    /// nats below the first side's in the first side's log-probabilities.
    #[arg(long, default_value_t = 0.15)]
    tolerance: f64,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Compute threads per side [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// The native CPU engine's arithmetic on both sides: int8 (8-bit activations, as
    /// llama.cpp) or f32 (see README: reproducible across runtimes and kernel sets).
    #[arg(long, default_value = "int8")]
    numerics: Numerics,
}

/// One side's options (internal).
#[derive(clap::Args)]
pub struct RunArgs {
    #[arg(long)]
    model: PathBuf,
    /// The prompts as a JSON list of `{"messages"}` / `{"prompt"}` objects.
    #[arg(long)]
    prompts: PathBuf,
    #[arg(long)]
    steps: usize,
    #[arg(long)]
    batched: bool,
    #[arg(long)]
    threads: usize,
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    #[arg(long, default_value = "int8")]
    numerics: Numerics,
}

/// One prompt's greedy run: each step's token and its top alternatives.
#[derive(Serialize, Deserialize)]
struct Run {
    tokens: Vec<u32>,
    texts: Vec<String>,
    /// Per step: (token, logprob) of the top alternatives, best first.
    top: Vec<Vec<(u32, f32)>>,
    /// Per step: the chosen token's logprob.
    logprob: Vec<f32>,
}

/// Runs a `sluice check` action.
pub fn run_cli(cmd: CheckCmd) -> Result<()> {
    match cmd {
        CheckCmd::Consistency(a) => consistency(a),
        CheckCmd::Run(a) => side(a),
        CheckCmd::Cuda(a) => cuda_self_check(a),
    }
}

/// `sluice check cuda`: the engine's CUDA self-check, as a table (and JSON when asked).
/// It needs no Rust toolchain on the GPU machine, only this binary.
#[cfg(feature = "cuda")]
fn cuda_self_check(a: CudaCheckArgs) -> Result<()> {
    use sluice_engine::backends::cuda::{probe, selfcheck};
    // Probe first, so that a machine without a GPU gets one line saying what is missing.
    let info = probe().map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!("checking the CUDA backend on {}", info.describe());
    let report = selfcheck::run().map_err(|e| anyhow::anyhow!("CUDA self-check: {e}"))?;
    print!("{}", report.table());
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.passed() {
        bail!(
            "{} of {} CUDA checks failed on {}",
            report.failures(),
            report.checks.len(),
            report.device
        );
    }
    println!(
        "all {} CUDA checks passed on {}",
        report.checks.len(),
        report.device
    );
    Ok(())
}

/// `sluice check cuda` in a build without the backend: the subcommand exists (so the
/// GPU machine's scripts get a clear answer) and says how to get it.
#[cfg(not(feature = "cuda"))]
fn cuda_self_check(_: CudaCheckArgs) -> Result<()> {
    bail!(
        "this sluice was built without CUDA support \
         (build it with `cargo build --release --features cuda`)"
    )
}

fn load_prompts(path: Option<&Path>) -> Result<Vec<Value>> {
    let Some(path) = path else {
        return Ok(PROMPTS
            .iter()
            .map(|p| json!({"messages": [{"role": "user", "content": p}]}))
            .collect());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        if v.get("messages").is_none() && !v.get("prompt").is_some_and(Value::is_string) {
            bail!(
                "{}:{}: each line needs \"messages\" or a \"prompt\" string",
                path.display(),
                i + 1
            );
        }
        out.push(v);
    }
    if out.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(out)
}

/// The label of one prompt, for the report.
fn label(p: &Value) -> String {
    let text = p["prompt"].as_str().map(str::to_string).unwrap_or_else(|| {
        p["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string()
    });
    let short: String = text.chars().take(40).collect();
    format!("{short:?}")
}

fn consistency(a: ConsistencyArgs) -> Result<()> {
    let model = crate::model::resolve_model(a.model.clone())?;
    let prompts = load_prompts(a.prompts.as_deref())?;
    let threads = a.threads.unwrap_or_else(crate::serve::default_threads);
    let list = std::env::temp_dir().join(format!("sluice-check-{}.json", std::process::id()));
    std::fs::write(&list, serde_json::to_string(&prompts)?)?;
    let (b_model, b_env, b_batched, b_device, b_name) = match a.against.as_str() {
        "scalar" => (
            model.clone(),
            Some("SLUICE_FORCE_SCALAR"),
            false,
            a.device,
            "scalar kernels".into(),
        ),
        "batched" => (
            model.clone(),
            None,
            true,
            a.device,
            format!("batched among {BATCH_OTHERS}"),
        ),
        "cuda" => (
            model.clone(),
            None,
            false,
            DeviceChoice::Cuda,
            "the CUDA backend".into(),
        ),
        other => {
            let p = crate::model::resolve_model(Some(PathBuf::from(other)))?;
            let name = p.display().to_string();
            (p, None, false, a.device, name)
        }
    };
    // A device that cannot run here fails now, in one line, not after the first side.
    for d in [a.device, b_device] {
        sluice_engine::backends::device::resolve(d, 0.9)?;
    }
    let run_side =
        |m: &Path, env: Option<&str>, batched: bool, device: DeviceChoice| -> Result<Vec<Run>> {
            let mut c = Command::new(std::env::current_exe()?);
            c.args(["check", "run", "--model"])
                .arg(m)
                .arg("--prompts")
                .arg(&list)
                .args([
                    "--steps",
                    &a.steps.to_string(),
                    "--threads",
                    &threads.to_string(),
                    "--device",
                    &device.to_string(),
                    "--numerics",
                    &a.numerics.to_string(),
                ])
                .env("SLUICE_LOG", "warn");
            if batched {
                c.arg("--batched");
            }
            if let Some(v) = env {
                c.env(v, "1");
            }
            let out = c.output().context("running a check side")?;
            if !out.status.success() {
                bail!(
                    "running {} failed: {}",
                    m.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            serde_json::from_slice(&out.stdout).context("reading a check side's output")
        };
    let first = run_side(&model, None, false, a.device)?;
    let second = run_side(&b_model, b_env, b_batched, b_device)?;
    let _ = std::fs::remove_file(&list);
    let a_name = model.display().to_string();
    println!(
        "A: {a_name}\nB: {b_name}\n{} prompts, {} greedy tokens each; native CPU numerics {}",
        prompts.len(),
        a.steps,
        a.numerics
    );
    let mut rows = Vec::new();
    let (mut identical, mut failures, mut max_gap, mut max_diff) = (0, 0, 0.0f64, 0.0f64);
    for ((p, x), y) in prompts.iter().zip(&first).zip(&second) {
        let n = x.tokens.len().min(y.tokens.len());
        let split = (0..n).find(|&i| x.tokens[i] != y.tokens[i]);
        let same = split.unwrap_or(n);
        // Logprob differences at the steps both sides took alike, over the tokens both
        // list among their top alternatives.
        let mut diff = 0.0f64;
        for i in 0..same {
            for &(t, l) in &x.top[i] {
                if let Some(&(_, m)) = y.top[i].iter().find(|(u, _)| *u == t) {
                    diff = diff.max(f64::from((l - m).abs()));
                }
            }
        }
        max_diff = max_diff.max(diff);
        let (line, gap, near) = match split {
            None => {
                identical += 1;
                (
                    format!(
                        "{} of {} tokens identical; max |Δ logprob| {diff:.4}",
                        same, n
                    ),
                    None,
                    true,
                )
            }
            Some(i) => {
                let theirs = y.tokens[i];
                let gap = x.top[i]
                    .iter()
                    .find(|(t, _)| *t == theirs)
                    .map(|&(_, l)| f64::from(x.logprob[i] - l));
                let near = gap.is_some_and(|g| g <= a.tolerance);
                if !near {
                    failures += 1;
                }
                if let Some(g) = gap {
                    max_gap = max_gap.max(g);
                }
                (
                    format!(
                        "{same} tokens identical, then A {:?} vs B {:?}: {} ({}); max |Δ logprob| before {diff:.4}",
                        x.texts[i],
                        y.texts[i],
                        gap.map_or(format!("B's token is not in A's top {TOP}"), |g| format!(
                            "{g:.4} nats apart in A's logprobs"
                        )),
                        if near { "a near-tie" } else { "NOT a near-tie" }
                    ),
                    gap,
                    near,
                )
            }
        };
        println!("  {}: {line}", label(p));
        rows.push(
            json!({"prompt": label(p), "identical_tokens": same, "tokens": n,
                         "diverges_at": split, "gap_nats": gap, "near_tie": near,
                         "max_abs_logprob_diff": diff}),
        );
    }
    println!(
        "{identical} of {} prompts identical over {} tokens; largest divergence gap {max_gap:.4} nats (tolerance {}); max |Δ logprob| {max_diff:.4}",
        prompts.len(),
        a.steps,
        a.tolerance
    );
    if let Some(path) = &a.json {
        let report = json!({"a": a_name, "b": b_name, "steps": a.steps, "tolerance": a.tolerance,
                            "numerics": a.numerics.to_string(),
                            "identical": identical, "prompts": rows,
                            "max_gap_nats": max_gap, "max_abs_logprob_diff": max_diff});
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if failures > 0 {
        bail!(
            "{failures} divergence(s) above {} nats: not near-ties",
            a.tolerance
        );
    }
    Ok(())
}

/// One side: greedy runs of every prompt, as JSON on stdout.
fn side(a: RunArgs) -> Result<()> {
    let prompts: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&a.prompts)?)?;
    let model = crate::serve::load_model(&a.model, a.threads, a.device, a.numerics)?;
    let greedy = |prompt: Vec<u32>, logprobs: bool| GenerationRequest {
        prompt,
        max_tokens: a.steps,
        ignore_eos: true,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        logprobs: logprobs.then_some(TOP),
        ..GenerationRequest::default()
    };
    let tokenize = |p: &Value| -> Result<Vec<u32>> {
        if let Some(text) = p["prompt"].as_str() {
            return Ok(model.tokenizer.encode(text, true)?);
        }
        let messages: Vec<InMessage> = serde_json::from_value(p["messages"].clone())?;
        sluice_gateway::routes::chat_prompt(&model, &messages, true)
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let all: Vec<Vec<u32>> = prompts.iter().map(tokenize).collect::<Result<_>>()?;
    let mut runs = Vec::new();
    for (i, prompt) in all.iter().enumerate() {
        // Batched: the others are the other prompts (cycled) at temperature 1, started
        // with it, so that its rows share every step with different sequences.
        let others: Vec<_> = if a.batched {
            (1..=BATCH_OTHERS)
                .map(|k| {
                    let mut r = greedy(all[(i + k) % all.len()].clone(), false);
                    r.sampling.temperature = 1.0;
                    r.sampling.seed = Some(k as u64);
                    model.engine.submit(r)
                })
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let mut stream = model.engine.submit(greedy(prompt.clone(), true))?;
        let mut run = Run {
            tokens: Vec::new(),
            texts: Vec::new(),
            top: Vec::new(),
            logprob: Vec::new(),
        };
        while let Some(ev) = stream.blocking_recv() {
            match ev {
                Event::Token { id, logprobs, .. } => {
                    let lp = logprobs.context("the engine returned no logprobs")?;
                    run.tokens.push(id);
                    run.texts
                        .push(String::from_utf8_lossy(model.tokenizer.token_bytes(id)).into());
                    run.logprob.push(lp.logprob);
                    run.top.push(lp.top);
                }
                Event::Done { error: Some(e), .. } => bail!("generation failed: {e}"),
                Event::Done { .. } => break,
            }
        }
        drop(others);
        runs.push(run);
    }
    println!("{}", serde_json::to_string(&runs)?);
    Ok(())
}
