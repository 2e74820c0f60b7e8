//! What request handlers share: the served models, the key policy, and the drain flag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_engine::chat_template::ChatTemplate;
use sluice_engine::tokenizer::Tokenizer;
use sluice_engine::Engine;

use crate::auth::{ApiKey, AuthPolicy};
use crate::error::ApiError;

/// One model being served.
pub struct ServedModel {
    pub name: String,
    /// Other names requests may use for it.
    pub aliases: Vec<String>,
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub context_length: usize,
    pub created: u64,
}

/// Shared application state.
pub struct AppState {
    /// The first is the default for requests that name no model.
    pub models: Vec<ServedModel>,
    pub auth: AuthPolicy,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Log prompts and completions (off by default).
    pub log_payloads: bool,
    /// Limit on non-streaming generations.
    pub request_timeout: std::time::Duration,
    /// Collaborative WebSocket sessions.
    pub sessions: crate::sessions::SessionHub,
    /// Largest WebSocket message accepted.
    pub ws_max_message_bytes: usize,
    /// `[debug] fault_injection`: the admin route that panics an engine exists.
    pub fault_injection: bool,
    draining: AtomicBool,
    next_id: AtomicU64,
}

/// Cheap handle passed to handlers.
pub type SharedState = Arc<AppState>;

impl AppState {
    /// State for `models` (at least one) under `auth`.
    pub fn new(models: Vec<ServedModel>, auth: AuthPolicy) -> Self {
        assert!(!models.is_empty(), "at least one model is served");
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        AppState {
            models,
            auth,
            metrics: crate::metrics::handle(),
            log_payloads: false,
            request_timeout: std::time::Duration::from_secs(600),
            sessions: crate::sessions::SessionHub::new(1024, std::time::Duration::from_secs(3600)),
            ws_max_message_bytes: 64 << 10,
            fault_injection: false,
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(seed),
        }
    }

    /// The model a request names (the default one when it names none), if `key` may use it.
    pub fn resolve_model(
        &self,
        name: Option<&str>,
        key: &ApiKey,
    ) -> Result<&ServedModel, ApiError> {
        let m = match name {
            None => &self.models[0],
            Some(n) => self
                .models
                .iter()
                .find(|m| m.name == n || m.aliases.iter().any(|a| a == n))
                .ok_or_else(|| ApiError::ModelNotFound(n.to_string()))?,
        };
        if !key.may_use(&m.name, &m.aliases) {
            return Err(ApiError::ModelNotAllowed(m.name.clone()));
        }
        Ok(m)
    }

    /// Whether every model's engine takes requests (false while one restarts).
    pub fn engines_ready(&self) -> bool {
        self.models.iter().all(|m| m.engine.is_ready())
    }

    /// Stop taking new requests (shutdown has begun).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A fresh response id with the given prefix.
    pub fn new_id(&self, prefix: &str) -> String {
        let n = self
            .next_id
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        format!("{prefix}-{n:016x}")
    }
}

/// Seconds since the epoch, for `created` fields.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
