//! The server's configuration: one typed struct, read from a TOML file, then overridden by
//! `SLUICE_*` environment variables and command-line flags, and validated at start-up
//! with messages that say what to fix.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

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
    /// Served models; with none, the default model.
    pub models: Vec<ModelEntry>,
    /// Write prompts and completions to the logs (off: they never appear there).
    pub log_payloads: bool,
    pub debug: DebugSection,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            cors_origins: Vec::new(),
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
        }
    }
}

/// `[engine]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Compute threads per model (default: all cores).
    pub threads: Option<usize>,
    /// KV cache capacity per model, in tokens.
    pub kv_cache_tokens: usize,
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection {
            threads: None,
            // ~3 GiB for the default model (f32 storage); pages are only touched when used.
            kv_cache_tokens: 65536,
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
}

impl Config {
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
        ] {
            if v == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
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
            if let Some(p) = &m.path {
                if !p.is_file() {
                    problems.push(format!(
                        "models[{i}] ({}): model file {} does not exist",
                        m.name,
                        p.display()
                    ));
                }
            }
        }
        for (i, k) in self.keys.iter().enumerate() {
            for m in k.models.iter().flatten() {
                if !self.models.is_empty() && !model_names.contains(m.as_str()) {
                    problems.push(format!(
                        "keys[{i}] ({}): allows model {m:?}, which no [[models]] entry names",
                        k.name
                    ));
                }
            }
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
