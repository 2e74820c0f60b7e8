//! `sluice serve`: loads the configured models into engines and serves the gateway's
//! OpenAI-compatible API until a shutdown signal, then drains.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_engine::backends::cpu::thread_pool::ThreadPool;
use sluice_engine::backends::device::{self, Device, DeviceChoice};
use sluice_engine::backends::onnx::{Manifest, OnnxRuntime};
use sluice_engine::backends::{self, Numerics, RuntimeOptions};
use sluice_engine::config::ModelConfig;
use sluice_engine::structured::GrammarCompiler;
use sluice_engine::text::chat_template::{self, ChatTemplate};
use sluice_engine::text::tokenizer::Tokenizer;
use sluice_engine::{Engine, EngineConfig};
use sluice_gateway::auth::AuthPolicy;
use sluice_gateway::config::{Config, EngineSection, LimitStore, ModelEntry};
use sluice_gateway::sampling_defaults::SamplingDefaults;
use sluice_gateway::state::{unix_now, AppState, MetricsAccess, ServedModel};
use sluice_gateway::tls::{CertStore, TlsFiles};
use sluice_gateway::upstream::Upstreams;
use sluice_gateway::{model_store, server};
use tracing::{info, warn};

use crate::model::resolve_model;

/// How long connections get to write their last events once the shutdown's grace period
/// is over and the engines have failed what still ran.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// `sluice serve` options: each overrides its configuration-file value.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (documented example: config/sluice.toml).
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to bind [config: server.host; default 127.0.0.1].
    #[arg(long, env = "SLUICE_HOST")]
    host: Option<IpAddr>,
    /// Port to bind, 0 picks a free one [config: server.port; default 8080].
    #[arg(long, env = "SLUICE_PORT")]
    port: Option<u16>,
    /// Serve this GGUF file instead of the configured models.
    #[arg(long, env = "SLUICE_MODEL")]
    model: Option<PathBuf>,
    /// Name clients use in `model` for --model; defaults to the file name without `.gguf`.
    #[arg(long, env = "SLUICE_MODEL_NAME")]
    model_name: Option<String>,
    /// Compute threads of the whole process, shared by all models [config: engine.threads;
    /// default all cores].
    #[arg(long, env = "SLUICE_THREADS")]
    threads: Option<usize>,
    /// Requests decoded together [config: limits.max_running_requests].
    #[arg(long, env = "SLUICE_MAX_RUNNING_REQUESTS")]
    max_running_requests: Option<usize>,
    /// Requests that may wait for a slot before new ones get 503 [config: limits.max_waiting_requests].
    #[arg(long, env = "SLUICE_MAX_WAITING_REQUESTS")]
    max_waiting_requests: Option<usize>,
    /// Tokens per forward step [config: limits.max_num_batched_tokens].
    #[arg(long, env = "SLUICE_MAX_NUM_BATCHED_TOKENS")]
    max_num_batched_tokens: Option<usize>,
    /// KV cache capacity per model in tokens [config: engine.kv_cache_tokens].
    #[arg(long, env = "SLUICE_KV_CACHE_TOKENS")]
    kv_cache_tokens: Option<usize>,
    /// What models compute on: auto, cpu or cuda [config: server.device; default auto:
    /// a usable GPU when this build has CUDA, else the CPU].
    #[arg(long, env = "SLUICE_DEVICE")]
    device: Option<DeviceChoice>,
    /// The CPU backend's arithmetic: int8 (8-bit activations, as llama.cpp; fast) or f32
    /// (reproducible across runtimes and kernel sets; slower) [config: engine.numerics].
    #[arg(long, env = "SLUICE_NUMERICS")]
    numerics: Option<Numerics>,
    /// CUDA: share of the GPU's free memory for weights, KV cache and workspace
    /// [config: engine.gpu_memory_fraction; default 0.9].
    #[arg(long, env = "SLUICE_GPU_MEMORY_FRACTION")]
    gpu_memory_fraction: Option<f32>,
    /// Seconds streams may take to finish after SIGTERM [config: limits.shutdown_grace_seconds].
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE_SECONDS")]
    shutdown_grace_seconds: Option<u64>,
    /// `model` (inference) or `synthetic` (filler tokens at --tokens-per-second, no model
    /// compute: for testing clients and measuring the gateway).
    #[arg(long, env = "SLUICE_ENGINE")]
    engine: Option<String>,
    /// Pace of the synthetic engine, per request [default 50].
    #[arg(long, env = "SLUICE_TOKENS_PER_SECOND")]
    tokens_per_second: Option<f64>,
    /// Requests in flight before new ones get 503 [config: limits.max_concurrent_requests].
    #[arg(long, env = "SLUICE_MAX_CONCURRENT_REQUESTS")]
    max_concurrent_requests: Option<usize>,
    /// Seconds a non-streaming generation may take before 504 [config: limits.request_timeout_seconds].
    #[arg(long, env = "SLUICE_REQUEST_TIMEOUT_SECONDS")]
    request_timeout_seconds: Option<u64>,
    /// Open connections before new ones get 503 [config: limits.max_connections].
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// A TOML file of more `[[keys]]` entries, e.g. a mounted secret [config: keys_file].
    #[arg(long, env = "SLUICE_KEYS_FILE")]
    keys_file: Option<PathBuf>,
    /// Where the keys' limits are counted: memory (this process) or redis (shared by
    /// every replica; needs a Redis URL) [config: limits.store; default memory].
    #[arg(long, env = "SLUICE_LIMIT_STORE")]
    limit_store: Option<LimitStore>,
    /// Redis for --limit-store redis, redis://[[user]:password@]host[:port][/db]
    /// [config: limits.redis_url or limits.redis_url_env].
    #[arg(long, env = "SLUICE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// PEM certificate chain: serve HTTPS (HTTP/2 or HTTP/1.1), reloaded when it changes
    /// [config: server.tls_cert; needs --tls-key].
    #[arg(long, env = "SLUICE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [config: server.tls_key].
    #[arg(long, env = "SLUICE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Check the configuration (file, keys file, TLS files, variables and flags) and
    /// exit: 0 and one line when it is valid, else every problem. Loads no model.
    #[arg(long)]
    check_config: bool,
}

impl ServeArgs {
    /// The configuration file's values with the flags (and their variables) on top.
    fn config(&self) -> Result<Config> {
        let mut c = Config::load(self.config.as_deref())?;
        if let Some(h) = self.host {
            c.server.host = h;
        }
        if let Some(p) = self.port {
            c.server.port = p;
        }
        if self.threads.is_some() {
            c.engine.threads = self.threads;
        }
        let l = &mut c.limits;
        for (dst, src) in [
            (&mut l.max_running_requests, self.max_running_requests),
            (&mut l.max_waiting_requests, self.max_waiting_requests),
            (&mut l.max_num_batched_tokens, self.max_num_batched_tokens),
            (&mut c.engine.kv_cache_tokens, self.kv_cache_tokens),
            (&mut l.max_connections, self.max_connections),
        ] {
            if let Some(v) = src {
                *dst = v;
            }
        }
        if let Some(d) = self.device {
            c.server.device = d;
        }
        if let Some(n) = self.numerics {
            c.engine.numerics = n;
        }
        if let Some(f) = self.gpu_memory_fraction {
            c.engine.gpu_memory_fraction = f;
        }
        if let Some(g) = self.shutdown_grace_seconds {
            c.limits.shutdown_grace_seconds = g;
        }
        if let Some(m) = self.max_concurrent_requests {
            c.limits.max_concurrent_requests = m;
        }
        if let Some(t) = self.request_timeout_seconds {
            c.limits.request_timeout_seconds = t;
        }
        if self.keys_file.is_some() {
            c.keys_file = self.keys_file.clone();
        }
        if let Some(s) = self.limit_store {
            c.limits.store = s;
        }
        if self.redis_url.is_some() {
            // Replaces the configured URL, whichever way it was given.
            c.limits.redis_url = self.redis_url.clone();
            c.limits.redis_url_env = None;
        }
        if self.tls_cert.is_some() {
            c.server.tls_cert = self.tls_cert.clone();
        }
        if self.tls_key.is_some() {
            c.server.tls_key = self.tls_key.clone();
        }
        c.read_keys_file()?;
        if self.model.is_some() || self.model_name.is_some() {
            let name = self.model_name.clone().unwrap_or_else(|| {
                self.model
                    .as_deref()
                    .map_or_else(|| model_store::DEFAULT_MODEL_NAME.to_string(), served_name)
            });
            c.models = vec![ModelEntry {
                name,
                path: self.model.clone(),
                aliases: Vec::new(),
                engine: None,
                tokens_per_second: None,
                numerics: None,
                sampling: SamplingDefaults::NONE,
            }];
        }
        if self.engine.is_some() || self.tokens_per_second.is_some() {
            if c.models.is_empty() {
                c.models.push(ModelEntry::default_model());
            }
            for m in &mut c.models {
                if self.engine.is_some() {
                    m.engine = self.engine.clone();
                }
                if self.tokens_per_second.is_some() {
                    m.tokens_per_second = self.tokens_per_second;
                }
            }
        }
        c.validate()?;
        Ok(c)
    }
}

/// The name `--model ARG` is served under: the stem of the file it resolves to (a path,
/// or a model of the models folder by name: `gemma-3-270m` → `gemma-3-270m-q4_k_m`).
fn served_name(arg: &std::path::Path) -> String {
    model_store::models_dir()
        .and_then(|dir| model_store::resolve_model_ref(arg, &dir))
        .map_or_else(
            // Not resolvable: loading will say why; name it after the argument.
            |_| {
                arg.file_stem()
                    .map_or("model".into(), |s| s.to_string_lossy().into_owned())
            },
            |r| r.served_name(),
        )
}

/// Compute threads when none are configured: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How a served model generates.
enum Backend {
    /// Our inference engine on the GGUF's weights, on the runtime `backends::load` picks
    /// (computing on the process's pool).
    Model {
        runtime: RuntimeOptions,
        device: Device,
    },
    /// No inference: filler tokens at this many per second per request.
    Synthetic { tokens_per_second: f64 },
}

/// Loads a served model from its GGUF file; with no file (the synthetic engine only), on
/// the built-in byte-level vocabulary.
fn load_served_model(
    path: Option<&std::path::Path>,
    name: String,
    aliases: Vec<String>,
    sampling: SamplingDefaults,
    backend: Backend,
    cfg: EngineConfig,
) -> Result<ServedModel> {
    let shown = path.map_or_else(
        || "the built-in vocabulary".to_string(),
        |p| p.display().to_string(),
    );
    // An exported ONNX model's folder: its tokenizer and template are in the metadata-only
    // `tokenizer.gguf` beside `model.onnx`.
    let onnx = path.and_then(Manifest::folder_of);
    let manifest = onnx.as_deref().map(Manifest::read).transpose()?;
    let gguf_path = onnx.as_ref().map(|d| d.join("tokenizer.gguf"));
    let gguf_path = gguf_path.as_deref().or(path);
    let file = Arc::new(match gguf_path {
        Some(p) => {
            sluice_engine::gguf::GgufFile::open(p).with_context(|| format!("loading {shown}"))?
        }
        None => model_store::synthetic_vocabulary()?,
    });
    let tokenizer = Arc::new(Tokenizer::load(&file, gguf_path)?);
    // Per field: the config's, the file's own recommendation, the catalogue's preset
    // (for an export, its source file's).
    let source = manifest
        .as_ref()
        .map(|m| std::path::PathBuf::from(&m.source_file));
    let sampling = sampling.or(SamplingDefaults::from_gguf(&file)).or(source
        .as_deref()
        .or(path)
        .map_or(SamplingDefaults::NONE, model_store::catalogue_sampling));
    if sampling != SamplingDefaults::NONE {
        info!(model = %name, defaults = %serde_json::to_string(&sampling).unwrap_or_default(), "default sampling for requests that leave it out");
    }
    // The file's own template; else, for architectures that have one turn format
    // (Gemma), the built-in template llama.cpp also falls back to.
    let arch = file
        .meta("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let template = match file
        .meta("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .or_else(|| chat_template::builtin_template(arch))
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
    // Without a file only the synthetic engine runs: its context length is the default
    // model's, its vocabulary the built-in one.
    let mcfg = match &manifest {
        Some(_) => None,
        None => path.map(|_| ModelConfig::from_gguf(&file)).transpose()?,
    };
    let (context_length, vocab_size) = match (&mcfg, &manifest) {
        (Some(m), _) => (m.context_length, m.vocab_size),
        (None, Some(m)) => (m.context_length, m.vocab_size),
        (None, None) => (
            model_store::SYNTHETIC_CONTEXT_LENGTH,
            tokenizer.vocab_size(),
        ),
    };
    let engine = match (backend, mcfg, onnx.zip(manifest)) {
        (
            Backend::Model {
                runtime: opts,
                device,
            },
            _,
            Some((dir, manifest)),
        ) => {
            if device.backend() != "cpu" {
                bail!(
                    "{shown} is an ONNX export: it runs on ONNX Runtime's CPU provider, not \
                     --device {}",
                    device.backend()
                );
            }
            let library = model_store::fetch_onnx_runtime(&model_store::models_dir()?)?;
            let env = backends::onnx::library::init(&library)?;
            let info = format!(
                "source {}, {} layers",
                manifest.source_file, manifest.n_layers
            );
            let runtime = OnnxRuntime::load(
                &env,
                &dir,
                manifest,
                opts.pool.threads(),
                opts.kv_cache_tokens,
            )
            .with_context(|| format!("loading {shown}"))?;
            info!(model = %name, export = %info, context_length, library = %library.display(), "ONNX model loaded");
            Engine::start(
                Box::new(runtime),
                tokenizer.clone(),
                EngineConfig {
                    name: name.clone(),
                    ..cfg
                },
            )?
        }
        (Backend::Model { .. }, None, None) => bail!("the inference engine needs a model file"),
        (
            Backend::Model {
                runtime: opts,
                device,
            },
            Some(mcfg),
            None,
        ) => {
            let runtime = backends::load_on(&device, file, &opts)
                .with_context(|| format!("loading {shown}"))?;
            info!(model = %name, arch = %mcfg.architecture, layers = mcfg.n_layers, context_length, kernels = %runtime.info().device, threads = opts.pool.threads(), "model loaded");
            Engine::start(
                runtime,
                tokenizer.clone(),
                EngineConfig {
                    name: name.clone(),
                    ..cfg
                },
            )?
        }
        (Backend::Synthetic { tokens_per_second }, _, _) => {
            info!(model = %name, tokens_per_second, vocabulary = %shown, "synthetic engine: no inference, filler tokens at a fixed pace");
            // No compute limits the batch: every accepted request runs at once.
            let cfg = EngineConfig {
                name: name.clone(),
                max_running_requests: usize::MAX,
                ..cfg
            };
            Engine::start_synthetic(context_length, vocab_size, tokens_per_second, cfg)?
        }
    };
    Ok(ServedModel {
        name,
        aliases,
        engine,
        grammars: Arc::new(GrammarCompiler::new(tokenizer.clone())),
        sampling,
        tokenizer,
        template,
        context_length,
        created: unix_now(),
    })
}

/// Loads the model at `path` (a GGUF file, or an ONNX export's folder) on `device`
/// (CPU: on `threads` compute threads) with the default limits, for tools that drive the
/// engine directly.
pub fn load_model(
    path: &std::path::Path,
    threads: usize,
    device: DeviceChoice,
    numerics: Numerics,
) -> Result<ServedModel> {
    let (device, _) = device::resolve(device, EngineSection::default().gpu_memory_fraction)?;
    let runtime = RuntimeOptions {
        pool: Arc::new(ThreadPool::new(threads).context("starting the compute threads")?),
        kv_cache_tokens: RuntimeOptions::DEFAULT_KV_CACHE_TOKENS,
        numerics,
    };
    let name = served_name(path);
    load_served_model(
        Some(path),
        name.clone(),
        Vec::new(),
        SamplingDefaults::NONE,
        Backend::Model { runtime, device },
        EngineConfig {
            name,
            ..EngineConfig::default()
        },
    )
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

/// The certificate store when HTTPS is configured; a bad file stops start-up here.
fn tls_store(config: &Config) -> Result<Option<Arc<CertStore>>> {
    match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(CertStore::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })?)),
        _ => Ok(None),
    }
}

/// Loads the configured models and serves them until SIGTERM/SIGINT, then drains.
pub async fn run_cli(args: ServeArgs) -> Result<()> {
    let config = args.config()?;
    let tls = tls_store(&config)?;
    if args.check_config {
        println!(
            "configuration is valid: {} key(s), {} model(s), {} upstream(s), {}",
            config.keys.len(),
            config.served_models().len(),
            config.upstreams.len(),
            if tls.is_some() { "HTTPS" } else { "HTTP" }
        );
        return Ok(());
    }
    // Upstreams first: their models are discovered (and checked against the local ones
    // and the keys' allow-lists) before any local model is fetched or loaded.
    let upstreams = if config.upstreams.is_empty() {
        Upstreams::none()
    } else {
        let u = Upstreams::start(&config.upstreams, &config.upstream).await?;
        sluice_gateway::upstream::config::check_discovered(&config, &u.model_names())?;
        u
    };
    // Before any model is fetched or loaded: `--device cuda` where it cannot run stops
    // here, in one line.
    let (device, why) = device::resolve(config.server.device, config.engine.gpu_memory_fraction)?;
    info!(device = device.backend(), reason = %why, "compute device");
    let threads = config.engine.threads.unwrap_or_else(default_threads);
    let engine_cfg = EngineConfig {
        name: String::new(), // each model's own, below
        max_running_requests: config.limits.max_running_requests,
        max_waiting_requests: config.limits.max_waiting_requests,
        max_num_batched_tokens: config.limits.max_num_batched_tokens,
    };
    let entries = config.served_models();
    // One compute pool for every model: `threads` is the process's budget, and engines
    // take turns on it step by step (see `ThreadPool::lease`).
    let mut pool: Option<Arc<ThreadPool>> = None;
    let mut models = Vec::with_capacity(entries.len());
    for e in entries {
        let backend = match e.engine.as_deref() {
            Some("synthetic") => Backend::Synthetic {
                tokens_per_second: e.tokens_per_second.unwrap_or(50.0),
            },
            _ => Backend::Model {
                device: device.clone(),
                runtime: RuntimeOptions {
                    pool: match &pool {
                        Some(p) => p.clone(),
                        None => pool
                            .insert(Arc::new(
                                ThreadPool::new(threads).context("starting the compute threads")?,
                            ))
                            .clone(),
                    },
                    kv_cache_tokens: config.engine.kv_cache_tokens,
                    numerics: e.numerics.unwrap_or(config.engine.numerics),
                },
            },
        };
        // The synthetic engine needs a vocabulary, not weights: a model file only when
        // one is named, never a download.
        let path = match (e.path, &backend) {
            (None, Backend::Synthetic { .. }) => None,
            (p, _) => Some(resolve_model(p)?),
        };
        models.push(load_served_model(
            path.as_deref(),
            e.name,
            e.aliases,
            e.sampling,
            backend,
            engine_cfg.clone(),
        )?);
    }
    let auth = if config.keys.is_empty() {
        AuthPolicy::dev_key_only()
    } else {
        // With `limits.store = "redis"`, the keys' counts are shared by every replica.
        let store = match config.limits.store {
            LimitStore::Memory => None,
            LimitStore::Redis => {
                Some(sluice_gateway::rate_limit::RedisStore::connect(&config.limits).await?)
            }
        };
        AuthPolicy::with_limit_store(&config.keys, store.as_ref())
    };
    let mut state = AppState::new(models, auth);
    state.upstreams = upstreams;
    state.log_payloads = config.log_payloads;
    state.request_timeout = Duration::from_secs(config.limits.request_timeout_seconds);
    state.sessions = sluice_gateway::sessions::SessionHub::new(
        config.limits.ws_send_queue,
        Duration::from_secs(config.limits.session_idle_seconds),
    );
    state.ws_max_message_bytes = config.limits.ws_max_message_bytes;
    state.sessions.max_conversation_bytes = config.limits.session_max_bytes;
    state.fault_injection = config.debug.fault_injection;
    if config.metrics.require_key {
        state.metrics_access = MetricsAccess::Key {
            scrape_key_sha256: config
                .metrics
                .key_sha256
                .as_deref()
                .and_then(sluice_gateway::config::parse_sha256_hex),
        };
    }
    if state.fault_injection {
        warn!("fault injection is on ([debug] fault_injection): admin keys can make engines panic or stop");
    }
    let state = Arc::new(state);
    let sweeper = state.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(30));
        loop {
            every.tick().await;
            sweeper.sessions.expire_idle();
        }
    });
    let (host, port) = (config.server.host, config.server.port);
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, port))
        .await
        .with_context(|| format!("binding {host}:{port}"))?;
    let addr = listener.local_addr()?;
    if config.keys.is_empty() {
        info!(%addr, "listening; no API keys configured, so the development key sk-sluice-dev is accepted");
    } else {
        info!(%addr, keys = config.keys.len(), "listening");
    }
    let acceptor = match &tls {
        Some(store) => {
            store.watch();
            Some(store.acceptor()?)
        }
        None => None,
    };
    // Printed plainly so scripts and tests can find the port when binding port 0.
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("sluice listening on {scheme}://{addr}");

    // On SIGTERM/SIGINT: /ready turns false and new requests get 503, the listener
    // closes, and streams in flight get `shutdown_grace_seconds` to finish.
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let signal = async move {
        shutdown_signal().await;
        st.start_draining();
        let _ = drain_tx.send(());
    };
    let grace = Duration::from_secs(config.limits.shutdown_grace_seconds);
    let server = server::serve(
        listener,
        state.clone(),
        config.server.clone(),
        config.limits.clone(),
        acceptor,
        signal,
    );
    tokio::pin!(server);
    let grace_over = tokio::select! {
        r = &mut server => {
            r?;
            false
        }
        _ = async {
            if drain_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            warn!(seconds = grace.as_secs(), "grace period over; failing the requests still running");
            true
        }
    };
    let engines: Vec<Engine> = state.models.iter().map(|m| m.engine.clone()).collect();
    if grace_over {
        // The grace period is a hard limit: what still runs ends now with an error event
        // (HTTP streams and WebSocket generations alike), instead of the join below
        // waiting for it.
        for e in &engines {
            e.abort("the server is shutting down and its grace period is over; retry on another replica");
        }
        // Let the connections write those last events and close (the server returns
        // once all have), but not for long: clients that do not read are cut.
        if tokio::time::timeout(FINAL_FLUSH, &mut server)
            .await
            .is_err()
        {
            warn!("connections still open after the final flush; closing them");
        }
    }
    // Joining the engine threads blocks: not on a runtime worker.
    tokio::task::spawn_blocking(move || engines.iter().for_each(Engine::shutdown))
        .await
        .context("stopping the engines")?;
    info!("stopped");
    Ok(())
}
