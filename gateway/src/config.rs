//! The server's configuration: one typed struct, read from a TOML file, then overridden by
//! `SLUICE_*` environment variables and command-line flags, and validated at start-up
//! with messages that say what to fix.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_engine::backends::device::DeviceChoice;
use sluice_engine::backends::Numerics;
use thiserror::Error;

use crate::sampling_defaults::SamplingDefaults;

/// Problems with the configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Everything `sluice serve` can be told.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub engine: EngineSection,
    /// API keys; with none, only the development key works, and only on loopback.
    pub keys: Vec<KeyConfig>,
    /// A TOML file of more `[[keys]]` entries (a mounted secret, say), added to `keys`
    /// by `Config::read_keys_file`.
    pub keys_file: Option<PathBuf>,
    /// Served models; with none, the default model.
    pub models: Vec<ModelEntry>,
    /// Write prompts and completions to the logs (off: they never appear there).
    pub log_payloads: bool,
    /// `[metrics]`: who may read `/metrics`.
    pub metrics: MetricsSection,
    pub debug: DebugSection,
    /// `[[upstreams]]`: other OpenAI-compatible servers whose models the gateway serves
    /// by forwarding requests (see `crate::upstream`).
    pub upstreams: Vec<crate::upstream::config::UpstreamEntry>,
    /// `[upstream]`: timeouts, health checks and routing between upstream replicas.
    pub upstream: crate::upstream::config::UpstreamSettings,
}

/// `[metrics]`: who may read `GET /metrics` (it names keys and models).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Require `Authorization: Bearer KEY` on `/metrics`: an admin key, or the key of
    /// `key_sha256`. Off: anyone who reaches the port may read it.
    pub require_key: bool,
    /// Hex SHA-256 of a key that may read `/metrics` and nothing else (for Prometheus).
    pub key_sha256: Option<String>,
}

/// `[debug]`: switches for testing the server itself; all off in production.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugSection {
    /// Enables `POST /admin/models/{model}/inject-panic` (admin keys only), which makes
    /// the model's engine loop panic to exercise recovery.
    pub fault_injection: bool,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: IpAddr,
    pub port: u16,
    /// Origins allowed by CORS; empty allows none, `["*"]` any.
    pub cors_origins: Vec<String>,
    /// What models compute on: `auto` (a usable GPU when the build has CUDA, else the
    /// CPU), `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// PEM certificate chain: with `tls_key`, the server speaks HTTPS only (HTTP/2 by
    /// ALPN, or HTTP/1.1), reloading both files when they change or on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            cors_origins: Vec::new(),
            device: DeviceChoice::Auto,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests decoded together, per model.
    pub max_running_requests: usize,
    /// Accepted requests that may wait for a slot, per model; beyond it, 503.
    pub max_waiting_requests: usize,
    /// Tokens one forward step may process (decodes plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Requests in flight across all keys (streams until they end); beyond it, 503.
    pub max_concurrent_requests: usize,
    /// How long streams in flight may take to finish after SIGTERM.
    pub shutdown_grace_seconds: u64,
    /// Events a WebSocket participant's queue holds; a reader further behind is cut off
    /// (close 1013) and gets a snapshot when it rejoins.
    pub ws_send_queue: usize,
    /// Largest WebSocket message accepted (bigger: close 1009).
    pub ws_max_message_bytes: usize,
    /// Sessions with nobody in them expire after this long.
    pub session_idle_seconds: u64,
    /// Most text one collaborative conversation holds, in bytes (`say` is refused past it).
    pub session_max_bytes: usize,
    /// Longest a non-streaming generation may take before it is cancelled with 504
    /// (streams are not cut: their client sees progress and can hang up).
    pub request_timeout_seconds: u64,
    /// Open connections, WebSockets included; one more gets 503 and is closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers; idle keep-alive connections are
    /// closed after it too.
    pub header_read_timeout_seconds: u64,
    /// Time a client has to send a request body once its headers are in (408 after).
    pub body_read_timeout_seconds: u64,
    /// A response write that makes no progress this long (the client stopped reading)
    /// closes the connection and cancels the generation.
    pub write_stall_timeout_seconds: u64,
    /// Time a client has to finish the TLS handshake.
    pub tls_handshake_timeout_seconds: u64,
    /// Streams one HTTP/2 connection may have open at once (advertised to the client).
    pub http2_max_concurrent_streams: u32,
    /// Where the keys' limits (requests and tokens per minute, concurrent streams) are
    /// counted: `memory`, in this process (each replica counts alone), or `redis`,
    /// shared by every replica using the same Redis, with the same accounting.
    pub store: LimitStore,
    /// `store = "redis"`: the server, `redis://[[user]:password@]host[:port][/db]` (or
    /// `unix:///path/to/socket`). Exactly one of this and `redis_url_env`.
    pub redis_url: Option<String>,
    /// `store = "redis"`: the environment variable holding the URL (which may hold a
    /// password, so it need not be in this file).
    pub redis_url_env: Option<String>,
    /// `store = "redis"`: what requests get while Redis cannot be reached.
    pub redis_on_error: RedisOnError,
    /// `store = "redis"`: the prefix of every Redis key Sluice writes.
    pub redis_key_prefix: String,
}

/// Where the keys' limits are counted (`limits.store`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitStore {
    /// In this process: each replica has its own counts.
    #[default]
    Memory,
    /// In Redis: shared by every replica.
    Redis,
}

impl std::str::FromStr for LimitStore {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(LimitStore::Memory),
            "redis" => Ok(LimitStore::Redis),
            _ => Err(format!("expected memory or redis, got {s:?}")),
        }
    }
}

/// What requests get while the Redis limit store cannot be reached
/// (`limits.redis_on_error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisOnError {
    /// Served without the keys' limits (fail open). The default: key limits share
    /// capacity fairly, while the server protects itself with its own limits
    /// (`max_concurrent_requests`, `max_waiting_requests`, `max_connections`), which
    /// still apply; an outage of Redis does not become an outage of the API.
    #[default]
    Allow,
    /// Refused with 503 and Retry-After (fail closed): for keys whose limits are a
    /// hard quota.
    Deny,
}

impl RedisOnError {
    /// The name the configuration uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisOnError::Allow => "allow",
            RedisOnError::Deny => "deny",
        }
    }
}

impl LimitsConfig {
    /// The Redis URL `store = "redis"` uses: `redis_url`, or the value of the variable
    /// `redis_url_env` names; checked, with messages that never show the URL (it may
    /// hold a password).
    pub fn resolve_redis_url(&self) -> Result<String, String> {
        let url = match (&self.redis_url, &self.redis_url_env) {
            (Some(_), Some(_)) => {
                return Err("limits.redis_url and limits.redis_url_env are both set; \
                            give the Redis URL one way"
                    .into())
            }
            (None, None) => {
                return Err(
                    "limits.store is \"redis\" but neither limits.redis_url nor \
                            limits.redis_url_env is set"
                        .into(),
                )
            }
            (Some(url), None) => url.clone(),
            (None, Some(var)) => match std::env::var(var) {
                Ok(url) if !url.trim().is_empty() => url,
                _ => {
                    return Err(format!(
                        "limits.redis_url_env names the environment variable {var:?}, which \
                         is not set (or empty)"
                    ))
                }
            },
        };
        let url = url.trim().to_string();
        let source = if self.redis_url.is_some() {
            "limits.redis_url".to_string()
        } else {
            format!(
                "the Redis URL in ${}",
                self.redis_url_env.as_deref().unwrap_or("")
            )
        };
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("redis" | "valkey" | "unix" | "redis+unix" | "valkey+unix") => {}
            Some("rediss" | "valkeys") => {
                return Err(format!(
                    "{source} uses TLS (rediss://), which this build does not support; use \
                     redis:// on a private network or through a TLS tunnel"
                ))
            }
            Some(other) => {
                return Err(format!(
                    "{source} must start with redis:// (or unix:// for a socket), not {other}://"
                ))
            }
            None => {
                return Err(format!(
                    "{source} must be a URL such as redis://127.0.0.1:6379 (or \
                     unix:///path/to/socket)"
                ))
            }
        }
        use redis::IntoConnectionInfo;
        // Parsed as the client will, so a bad host, port or database is reported here.
        match url.as_str().into_connection_info() {
            Ok(_) => Ok(url),
            // Its messages name the problem, never the URL.
            Err(e) => Err(format!("{source} is not a valid Redis URL: {e}")),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_running_requests: 32,
            max_waiting_requests: 256,
            max_num_batched_tokens: 512,
            max_body_bytes: 4 << 20,
            max_concurrent_requests: 4096,
            shutdown_grace_seconds: 30,
            request_timeout_seconds: 600,
            ws_send_queue: 1024,
            ws_max_message_bytes: 64 << 10,
            session_idle_seconds: 3600,
            session_max_bytes: 1 << 20,
            max_connections: 16384,
            header_read_timeout_seconds: 30,
            body_read_timeout_seconds: 30,
            write_stall_timeout_seconds: 60,
            tls_handshake_timeout_seconds: 10,
            http2_max_concurrent_streams: 256,
            store: LimitStore::Memory,
            redis_url: None,
            redis_url_env: None,
            redis_on_error: RedisOnError::Allow,
            redis_key_prefix: "sluice:".into(),
        }
    }
}

/// `[engine]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Compute threads of the whole process, shared by every model (default: all cores).
    pub threads: Option<usize>,
    /// KV cache capacity per model, in tokens (CPU; on a GPU the KV cache is sized from
    /// `gpu_memory_fraction`).
    pub kv_cache_tokens: usize,
    /// Share of the GPU's free memory the CUDA backend may take (weights, KV cache,
    /// workspace), in (0, 1].
    pub gpu_memory_fraction: f32,
    /// The CPU backend's arithmetic: `int8` (8-bit activations, as llama.cpp) or `f32`.
    pub numerics: Numerics,
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection {
            threads: None,
            // ~1.4 GiB for the default model (f16 storage); pages are only touched when used.
            kv_cache_tokens: 65536,
            gpu_memory_fraction: 0.9,
            numerics: Numerics::Int8,
        }
    }
}

/// One `[[keys]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Names the key in logs and metrics (the key itself is never logged).
    pub name: String,
    /// Hex SHA-256 of the key, as `sluice keys new` prints it.
    pub key_sha256: String,
    pub requests_per_minute: Option<u32>,
    /// Prompt tokens plus `max_tokens` of each request, counted when it is accepted.
    pub tokens_per_minute: Option<u32>,
    pub max_concurrent_streams: Option<u32>,
    /// Models this key may use; all when absent.
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub admin: bool,
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    /// The GGUF file; the default model (fetched when absent) when not given.
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `model` (default: run it) or `synthetic` (its tokenizer only; filler tokens at
    /// `tokens_per_second` per request, for testing clients and the gateway).
    pub engine: Option<String>,
    pub tokens_per_second: Option<f64>,
    /// This model's CPU arithmetic (`int8` or `f32`), over `[engine] numerics`: the same
    /// GGUF may be served twice, fast and reproducible, under two names. GGUF models on
    /// the CPU only.
    pub numerics: Option<Numerics>,
    /// Sampling for requests that leave fields out (before the file's own and the
    /// catalogue's recommendations).
    #[serde(default)]
    pub sampling: SamplingDefaults,
}

/// The 32 bytes of a hex SHA-256 (64 hex characters), if `hex` is one.
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl ModelEntry {
    /// The default model's entry: served when no `[[models]]` are configured.
    pub fn default_model() -> Self {
        ModelEntry {
            name: crate::model_store::DEFAULT_MODEL_NAME.to_string(),
            path: None,
            aliases: Vec::new(),
            engine: None,
            tokens_per_second: None,
            numerics: None,
            sampling: SamplingDefaults::NONE,
        }
    }
}

/// The keys' allow-list entries that name no model in `served`, as start-up problems
/// (such a key would get 403 for that model on every request); `served_list` is what the
/// messages show as served.
pub(crate) fn unserved_allowed_models(
    keys: &[KeyConfig],
    served: &std::collections::HashSet<&str>,
    served_list: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        for m in k.models.iter().flatten() {
            if !served.contains(m.as_str()) {
                problems.push(format!(
                    "keys[{i}] ({}): allows model {m:?}, which is not served; served: {served_list}",
                    k.name
                ));
            }
        }
    }
    problems
}

impl Config {
    /// The models `sluice serve` serves locally: the `[[models]]` entries, or the default
    /// model when there are none and no `[[upstreams]]` either.
    pub fn served_models(&self) -> Vec<ModelEntry> {
        if self.models.is_empty() && self.upstreams.is_empty() {
            vec![ModelEntry::default_model()]
        } else {
            self.models.clone()
        }
    }

    /// Reads `path` (defaults when `None`).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Adds the `[[keys]]` of `keys_file`, if one is named, to `keys` (once: the name is
    /// cleared). The file holds nothing but `[[keys]]` entries.
    pub fn read_keys_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = self.keys_file.take() else {
            return Ok(());
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct KeysFile {
            #[serde(default)]
            keys: Vec<KeyConfig>,
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let file: KeysFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        self.keys.extend(file.keys);
        Ok(())
    }

    /// Every problem at once, so one start-up shows everything to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let l = &self.limits;
        for (name, v) in [
            ("limits.max_running_requests", l.max_running_requests),
            ("limits.max_num_batched_tokens", l.max_num_batched_tokens),
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.max_concurrent_requests", l.max_concurrent_requests),
            ("limits.ws_send_queue", l.ws_send_queue),
            ("limits.ws_max_message_bytes", l.ws_max_message_bytes),
            (
                "limits.request_timeout_seconds",
                l.request_timeout_seconds as usize,
            ),
            ("engine.kv_cache_tokens", self.engine.kv_cache_tokens),
            ("limits.max_connections", l.max_connections),
            ("limits.session_max_bytes", l.session_max_bytes),
            (
                "limits.header_read_timeout_seconds",
                l.header_read_timeout_seconds as usize,
            ),
            (
                "limits.body_read_timeout_seconds",
                l.body_read_timeout_seconds as usize,
            ),
            (
                "limits.write_stall_timeout_seconds",
                l.write_stall_timeout_seconds as usize,
            ),
            (
                "limits.tls_handshake_timeout_seconds",
                l.tls_handshake_timeout_seconds as usize,
            ),
            (
                "limits.http2_max_concurrent_streams",
                l.http2_max_concurrent_streams as usize,
            ),
        ] {
            if v == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        let f = self.engine.gpu_memory_fraction;
        if !(f > 0.0 && f <= 1.0) {
            problems.push(format!(
                "engine.gpu_memory_fraction must be in (0, 1], got {f}"
            ));
        }
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) => problems
                .push("server.tls_cert is set but server.tls_key is not: HTTPS needs both".into()),
            (None, Some(_)) => problems
                .push("server.tls_key is set but server.tls_cert is not: HTTPS needs both".into()),
            _ => {}
        }
        match l.store {
            LimitStore::Redis => {
                if let Err(e) = l.resolve_redis_url() {
                    problems.push(e);
                }
            }
            LimitStore::Memory if l.redis_url.is_some() || l.redis_url_env.is_some() => problems
                .push(
                    "limits.redis_url (or redis_url_env) is set but limits.store is \"memory\": \
                     set store = \"redis\" to share the keys' limits through Redis, or remove it"
                        .into(),
                ),
            LimitStore::Memory => {}
        }
        if self.engine.threads == Some(0) {
            problems.push("engine.threads must be at least 1 (or left out for all cores)".into());
        }
        if self.keys.is_empty() && !self.server.host.is_loopback() {
            problems.push(format!(
                "server.host is {} but no [[keys]] are configured: the development key \
                 sk-sluice-dev only works on a loopback address. Add keys (`sluice keys new \
                 --name NAME` prints an entry) or bind 127.0.0.1",
                self.server.host
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            if k.name.trim().is_empty() {
                problems.push(format!("keys[{i}].name must not be empty"));
            } else if !names.insert(k.name.as_str()) {
                problems.push(format!("keys[{i}].name {:?} is used twice", k.name));
            }
            if k.key_sha256.len() != 64 || !k.key_sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                problems.push(format!(
                    "keys[{i}] ({}): key_sha256 must be 64 hex characters, the SHA-256 of the \
                     key (`sluice keys new` prints it)",
                    k.name
                ));
            } else if !hashes.insert(k.key_sha256.to_ascii_lowercase()) {
                problems.push(format!(
                    "keys[{i}] ({}): the same key is listed twice",
                    k.name
                ));
            }
            for (field, v) in [
                ("requests_per_minute", k.requests_per_minute),
                ("tokens_per_minute", k.tokens_per_minute),
                ("max_concurrent_streams", k.max_concurrent_streams),
            ] {
                if v == Some(0) {
                    problems.push(format!(
                        "keys[{i}] ({}): {field} must be at least 1 (leave it out for no limit)",
                        k.name
                    ));
                }
            }
        }
        let mut model_names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            for p in m.sampling.problems() {
                problems.push(format!("models[{i}] ({}): sampling.{p}", m.name));
            }
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                if n.trim().is_empty() {
                    problems.push(format!("models[{i}]: names and aliases must not be empty"));
                } else if !model_names.insert(n.as_str()) {
                    problems.push(format!("models[{i}]: the name {n:?} is used twice"));
                }
            }
            if let Some(e) = m.engine.as_deref() {
                if e != "model" && e != "synthetic" {
                    problems.push(format!(
                        "models[{i}] ({}): engine must be \"model\" or \"synthetic\", got {e:?}",
                        m.name
                    ));
                }
            }
            if m.tokens_per_second
                .is_some_and(|t| !(t.is_finite() && t > 0.0))
            {
                problems.push(format!(
                    "models[{i}] ({}): tokens_per_second must be positive",
                    m.name
                ));
            }
            if m.numerics.is_some() && m.engine.as_deref() == Some("synthetic") {
                problems.push(format!(
                    "models[{i}] ({}): numerics has no effect on a synthetic engine (no inference)",
                    m.name
                ));
            }
            if let Some(p) = &m.path {
                // A file, or a model of the models folder by name (a fetchable one is
                // fetched when the server starts).
                let resolved = crate::model_store::models_dir()
                    .and_then(|dir| crate::model_store::resolve_model_ref(p, &dir));
                match resolved {
                    Err(e) => problems.push(format!("models[{i}] ({}): {e}", m.name)),
                    Ok(file)
                        if m.numerics.is_some()
                            && sluice_engine::backends::onnx::Manifest::folder_of(file.path())
                                .is_some() =>
                    {
                        problems.push(format!(
                            "models[{i}] ({}): numerics is for GGUF models on the CPU; ONNX Runtime computes an export as it was exported (f32, or int8 activations with --accuracy-level 4)",
                            m.name
                        ));
                    }
                    Ok(_) => {}
                }
            }
        }
        // Allow-lists are checked against what is actually served (the default model
        // when no [[models]] are configured, and --model/--model-name overrides, which
        // replace the entries before validation): a name that matches nothing would
        // refuse every request of that key with 403.
        let served = self.served_models();
        let served_list = served
            .iter()
            .map(|m| {
                if m.aliases.is_empty() {
                    format!("{:?}", m.name)
                } else {
                    format!("{:?} (aliases {:?})", m.name, m.aliases)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut served_names: std::collections::HashSet<&str> = served
            .iter()
            .flat_map(|m| std::iter::once(&m.name).chain(&m.aliases))
            .map(String::as_str)
            .collect();
        // Upstreams' listed models count; discovered ones are checked after discovery
        // (`upstream::config::check_discovered`).
        problems.extend(crate::upstream::config::problems(self));
        let discovery_pending = crate::upstream::config::discovery_pending(self);
        served_names.extend(
            self.upstreams
                .iter()
                .flat_map(|u| u.models.iter().flatten())
                .map(String::as_str),
        );
        for (i, k) in self.keys.iter().enumerate() {
            if k.models.as_ref().is_some_and(Vec::is_empty) {
                problems.push(format!(
                    "keys[{i}] ({}): models = [] allows no model, so every request with this \
                     key would be refused; list models, or leave models out to allow all \
                     (served: {served_list})",
                    k.name
                ));
            }
        }
        if !discovery_pending {
            problems.extend(unserved_allowed_models(
                &self.keys,
                &served_names,
                &served_list,
            ));
        }
        let admin_keys = self.keys.iter().filter(|k| k.admin).count();
        match self.metrics.key_sha256.as_deref() {
            Some(h) if parse_sha256_hex(h).is_none() => problems.push(
                "metrics.key_sha256 must be 64 hex characters, the SHA-256 of the key \
                 (`sluice keys new` prints it)"
                    .into(),
            ),
            Some(h) if hashes.contains(&h.to_ascii_lowercase()) => problems.push(
                "metrics.key_sha256 is also a [[keys]] entry; give Prometheus a key of its \
                 own, which can read /metrics and nothing else"
                    .into(),
            ),
            Some(_) if !self.metrics.require_key => problems.push(
                "metrics.key_sha256 is set but metrics.require_key is false, so /metrics \
                 is open to anyone; set require_key = true"
                    .into(),
            ),
            None if self.metrics.require_key && !self.keys.is_empty() && admin_keys == 0 => {
                problems.push(
                    "metrics.require_key is true but no key may read /metrics: set \
                     metrics.key_sha256 (`sluice keys new --name prometheus`) or give a key \
                     admin = true"
                        .into(),
                )
            }
            _ => {}
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

    fn parse(s: &str) -> Config {
        toml::from_str(s).expect("parses")
    }

    #[test]
    fn the_shipped_config_parses_and_validates() {
        let text = include_str!("../../config/sluice.toml");
        let c = parse(text);
        c.validate().expect("valid");
        assert_eq!(c.server.port, 8080);
    }

    #[test]
    fn a_redis_limit_store_needs_one_valid_url_which_messages_never_show() {
        let problems = |limits: &str| match parse(&format!("[limits]\n{limits}")).validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(p)) => p,
            Err(e) => panic!("{e}"),
        };
        assert!(problems("store = \"redis\"\nredis_url = \"redis://10.0.0.5:6380/2\"").is_empty());
        let c = parse("[limits]\nstore = \"redis\"\nredis_url = \"redis://h\"");
        assert_eq!(c.limits.redis_on_error, RedisOnError::Allow, "the default");
        assert_eq!(c.limits.redis_key_prefix, "sluice:");
        assert_eq!(LimitsConfig::default().store, LimitStore::Memory);
        for (limits, expected) in [
            (
                "store = \"redis\"",
                "neither limits.redis_url nor limits.redis_url_env",
            ),
            (
                "store = \"redis\"\nredis_url = \"redis://h\"\nredis_url_env = \"V\"",
                "both set",
            ),
            (
                "store = \"redis\"\nredis_url = \"http://u:hunter2@h\"",
                "not http://",
            ),
            (
                "store = \"redis\"\nredis_url = \"rediss://u:hunter2@h\"",
                "TLS",
            ),
            (
                "store = \"redis\"\nredis_url = \"hunter2@h:6379\"",
                "must be a URL",
            ),
            (
                "store = \"redis\"\nredis_url = \"redis://:hunter2@h:99999\"",
                "not a valid",
            ),
            (
                "store = \"redis\"\nredis_url_env = \"SLUICE_TEST_NO_SUCH_VARIABLE\"",
                "SLUICE_TEST_NO_SUCH_VARIABLE",
            ),
            ("redis_url = \"redis://h\"", "limits.store is \"memory\""),
        ] {
            let p = problems(limits);
            assert!(p.len() == 1 && p[0].contains(expected), "{limits}: {p:?}");
            assert!(
                !p[0].contains("hunter2"),
                "the URL's password leaked: {p:?}"
            );
        }
        let e = toml::from_str::<Config>("[limits]\nredis_on_error = \"maybe\"\n").unwrap_err();
        assert!(e.to_string().contains("allow"), "{e}");
    }

    #[test]
    fn unknown_fields_are_errors_that_name_them() {
        let e = toml::from_str::<Config>("[limits]\nmax_runing_requests = 4\n").unwrap_err();
        assert!(e.to_string().contains("max_runing_requests"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let c = parse(&format!(
            r#"
            [server]
            host = "0.0.0.0"
            [limits]
            max_running_requests = 0
            [[keys]]
            name = "a"
            key_sha256 = "abc"
            [[keys]]
            name = "a"
            key_sha256 = "{HASH}"
            requests_per_minute = 0
            models = ["nope"]
            [[models]]
            name = "m"
            aliases = ["m"]
            "#
        ));
        let Err(ConfigError::Invalid(p)) = c.validate() else {
            panic!("should be invalid")
        };
        let all = p.join("\n");
        for want in [
            "limits.max_running_requests",
            "key_sha256 must be 64 hex",
            "\"a\" is used twice",
            "requests_per_minute must be at least 1",
            "\"m\" is used twice",
            "allows model \"nope\"",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(!all.contains("loopback"), "keys are configured: {all}");
    }

    /// The shipped file with the commented-out block that starts at `header` switched on.
    fn uncomment_block(text: &str, header: &str) -> String {
        let mut out = String::new();
        let mut on = false;
        for line in text.lines() {
            on = line == header || (on && line.starts_with("# "));
            let line = if on { &line[2..] } else { line };
            out.push_str(&line.replace("<64 hex characters>", HASH));
            out.push('\n');
        }
        out
    }

    fn problems(c: &Config) -> String {
        match c.validate() {
            Err(ConfigError::Invalid(p)) => p.join("\n"),
            other => panic!("should be invalid: {other:?}"),
        }
    }

    #[test]
    fn the_shipped_examples_match_the_models_served() {
        let text = include_str!("../../config/sluice.toml");
        // The key's allow-list names the default model as it is served...
        let with_key = uncomment_block(text, "# [[keys]]");
        let c = parse(&with_key);
        assert_eq!(c.keys.len(), 1, "the example key is there");
        c.validate()
            .expect("the example key is valid against the default model");
        // ...and the [[models]] example, without its file, serves that name too.
        let both = uncomment_block(&with_key, "# [[models]]")
            .lines()
            .filter(|l| !l.starts_with("path ="))
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&both);
        assert_eq!(c.models.len(), 1, "the example model is there");
        c.validate()
            .expect("the example key is valid against the example model");
        // The [metrics] scrape key example, switched on, needs require_key.
        let (head, tail) = text
            .split_once("\n[metrics]\n")
            .expect("a [metrics] section");
        let tail = tail.replacen(
            "# key_sha256 = \"<64 hex characters>\"",
            &format!("key_sha256 = \"{HASH}\""),
            1,
        );
        let c = parse(&format!("{head}\n[metrics]\n{tail}"));
        assert!(
            c.metrics.key_sha256.is_some(),
            "the example scrape key is there"
        );
        let p = problems(&c);
        assert!(p.contains("require_key is false"), "{p}");
        let c = parse(&format!(
            "{head}\n[metrics]\n{}",
            tail.replacen("require_key = false", "require_key = true", 1)
        ));
        c.validate().expect("the scrape key with require_key");
    }

    #[test]
    fn keys_come_from_the_keys_file_and_tls_needs_both_files() {
        let text = include_str!("../../config/sluice.toml");
        // The shipped examples, switched on, land where they belong.
        let mut c = parse(&uncomment_block(
            &uncomment_block(text, "# keys_file = \"/etc/sluice/secrets/keys.toml\""),
            "# tls_cert = \"/etc/sluice/tls/tls.crt\"  # PEM certificate chain, leaf first",
        ));
        assert_eq!(
            c.keys_file.as_deref(),
            Some(Path::new("/etc/sluice/secrets/keys.toml"))
        );
        assert!(c.server.tls_cert.is_some() && c.server.tls_key.is_some());
        let dir = std::env::temp_dir().join(format!("sluice-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys.toml");
        std::fs::write(
            &file,
            format!("[[keys]]\nname = \"from-secret\"\nkey_sha256 = \"{HASH}\"\nadmin = true\n"),
        )
        .unwrap();
        c.keys_file = Some(file.clone());
        c.server.host = IpAddr::from([0, 0, 0, 0]);
        c.read_keys_file().expect("the keys file is read");
        assert_eq!(c.keys.len(), 1);
        assert!(c.keys[0].admin && c.keys_file.is_none());
        c.validate().expect("its keys allow a non-loopback bind");
        // Anything but [[keys]] in it is refused, naming the file.
        std::fs::write(&file, "[server]\nport = 1\n").unwrap();
        c.keys_file = Some(file.clone());
        let e = c.read_keys_file().unwrap_err().to_string();
        assert!(e.contains("keys.toml") && e.contains("server"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        c.server.tls_key = None;
        assert!(problems(&c).contains("tls_key is not"), "{}", problems(&c));
    }

    #[test]
    fn allow_lists_are_checked_against_the_default_model_when_no_models_are_configured() {
        let key = |models: &str| {
            parse(&format!(
                "[[keys]]\nname = \"alice\"\nkey_sha256 = \"{HASH}\"\nmodels = {models}\n"
            ))
        };
        // The audit's case: the base name of the default model is not its served name.
        let p = problems(&key(r#"["SmolLM2-135M-Instruct", "gpt-4"]"#));
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines.len(), 2, "one message per name:\n{p}");
        assert!(
            lines[0].contains(
                "keys[0] (alice): allows model \"SmolLM2-135M-Instruct\", which is not served"
            ) && lines[0].contains("served: \"SmolLM2-135M-Instruct.Q4_1\""),
            "{p}"
        );
        assert!(lines[1].contains("\"gpt-4\""), "{p}");
        key(r#"["SmolLM2-135M-Instruct.Q4_1"]"#)
            .validate()
            .expect("the served name is allowed");
        let p = problems(&key("[]"));
        assert!(p.contains("models = [] allows no model"), "{p}");
    }

    #[test]
    fn model_sampling_defaults_are_read_and_range_checked() {
        let c = parse(
            r#"
            [[models]]
            name = "a"
            sampling = { temperature = 0.3, top_k = 40 }
            [[models]]
            name = "b"
            sampling = { temperature = 3.0, top_p = 0 }
            "#,
        );
        assert_eq!(c.models[0].sampling.temperature, Some(0.3));
        assert_eq!(c.models[0].sampling.top_k, Some(40));
        let p = problems(&c);
        assert!(
            p.contains("models[1] (b): sampling.temperature must be in [0, 2], got 3")
                && p.contains("models[1] (b): sampling.top_p must be in (0, 1], got 0")
                && !p.contains("models[0]"),
            "{p}"
        );
    }

    #[test]
    fn allow_lists_may_name_aliases_and_overrides_replace_the_served_names() {
        let mut c = parse(&format!(
            r#"
            [[keys]]
            name = "bob"
            key_sha256 = "{HASH}"
            models = ["fast", "big"]
            [[models]]
            name = "small"
            aliases = ["fast"]
            [[models]]
            name = "big"
            "#
        ));
        c.validate().expect("a name and an alias");
        // `--model x.gguf --model-name other` replaces the entries before validation.
        c.models = vec![ModelEntry {
            name: "other".into(),
            ..ModelEntry::default_model()
        }];
        let p = problems(&c);
        assert!(
            p.contains("allows model \"fast\", which is not served; served: \"other\"")
                && p.contains("allows model \"big\""),
            "{p}"
        );
        c.models[0].aliases = vec!["fast".into(), "big".into()];
        c.validate().expect("aliases of the override");
    }

    #[test]
    fn numerics_are_read_per_model_and_refused_where_they_mean_nothing() {
        let c = parse("[engine]\nnumerics = \"f32\"\n[[models]]\nname = \"fast\"\nnumerics = \"int8\"\n[[models]]\nname = \"exact\"\n");
        assert_eq!(c.engine.numerics, Numerics::F32);
        assert_eq!(c.models[0].numerics, Some(Numerics::Int8));
        assert_eq!(c.models[1].numerics, None);
        c.validate().expect("numerics on GGUF models");
        let c = parse("[[models]]\nname = \"s\"\nengine = \"synthetic\"\nnumerics = \"f32\"\n");
        assert!(problems(&c).contains("numerics has no effect on a synthetic engine"));
        let dir = std::env::temp_dir().join(format!("sluice-numerics-onnx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), "{}").unwrap();
        let c = parse(&format!(
            "[[models]]\nname = \"o\"\npath = \"{}\"\nnumerics = \"f32\"\n",
            dir.display()
        ));
        assert!(
            problems(&c).contains("numerics is for GGUF models on the CPU"),
            "{}",
            problems(&c)
        );
        let _ = std::fs::remove_dir_all(&dir);
        let e = toml::from_str::<Config>("[engine]\nnumerics = \"fp16\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }

    #[test]
    fn the_metrics_key_is_checked() {
        let base = |m: &str, admin: bool| {
            parse(&format!(
                "[metrics]\n{m}\n[[keys]]\nname = \"a\"\nkey_sha256 = \"{HASH}\"\nadmin = {admin}\n"
            ))
        };
        let other = "a".repeat(64);
        base("require_key = true", true)
            .validate()
            .expect("an admin key may read /metrics");
        base(
            &format!("require_key = true\nkey_sha256 = \"{other}\""),
            false,
        )
        .validate()
        .expect("a scrape key");
        for (m, want) in [
            ("require_key = true", "no key may read /metrics"),
            ("key_sha256 = \"abc\"", "metrics.key_sha256 must be 64 hex"),
            (
                &format!("require_key = true\nkey_sha256 = \"{HASH}\""),
                "also a [[keys]] entry",
            ),
            (&format!("key_sha256 = \"{other}\""), "require_key is false"),
        ] {
            let p = problems(&base(m, false));
            assert!(p.contains(want), "{m}: {p}");
        }
        assert_eq!(parse_sha256_hex(HASH).unwrap()[0], 0xb1);
        assert!(parse_sha256_hex(&"g".repeat(64)).is_none());
    }

    #[test]
    fn a_public_bind_without_keys_is_refused() {
        let c = parse("[server]\nhost = \"0.0.0.0\"\n");
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("loopback") && e.contains("sluice keys new"),
            "{e}"
        );
    }
}
