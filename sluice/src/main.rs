//! The `sluice` binary: one subcommand per module, composing the gateway, the engine, the
//! client and the load tester (which the server itself does not link).

mod bench;
mod bench_device;
mod chat;
mod check;
mod export_onnx;
mod keys;
mod loadtest;
mod model;
mod serve;
mod soak;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice", version, about = "A streaming LLM inference gateway")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the OpenAI-compatible API.
    Serve(serve::ServeArgs),
    /// Manage model files.
    Model {
        #[command(subcommand)]
        action: model::ModelCmd,
    },
    /// Measure prefill and decode speed, against llama.cpp when it is installed.
    Bench(bench::BenchArgs),
    /// Chat in the terminal (or join a collaborative session) with a running server.
    Chat(chat::ChatArgs),
    /// Load-test any OpenAI-compatible server (TTFT, ITL, TPOT, throughput, goodput).
    Loadtest(loadtest::LoadtestArgs),
    /// Run a long mixed load (streams, WebSockets, cancellations, bad requests) against a
    /// server and check nothing is lost or leaked.
    Soak(soak::SoakArgs),
    /// Check that two runtimes, files or kernel sets give the same greedy output.
    Check {
        #[command(subcommand)]
        action: check::CheckCmd,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        action: keys::KeysCmd,
    },
}

/// Errors end the process with one line on stderr (`error: ...` with its causes), never
/// a backtrace: they are expected failures (a missing model, a bad config), not bugs.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let multi_thread = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match cli.command {
        Cmd::Serve(args) => multi_thread()?.block_on(serve::run_cli(args)),
        Cmd::Model { action } => model::run_cli(action),
        Cmd::Bench(args) => bench::run_cli(args),
        Cmd::Loadtest(args) => multi_thread()?.block_on(loadtest::run_cli(args)),
        Cmd::Soak(args) => multi_thread()?.block_on(soak::run_cli(args)),
        // A terminal chat is one connection: one thread is plenty.
        Cmd::Chat(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(chat::run_cli(args)),
        Cmd::Keys { action } => keys::run_cli(action),
        Cmd::Check { action } => check::run_cli(action),
    }
}
