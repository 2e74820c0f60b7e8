//! What request handlers share: the served models, the key policy, and the drain flag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_engine::structured::GrammarCompiler;
use sluice_engine::text::chat_template::ChatTemplate;
use sluice_engine::text::tokenizer::Tokenizer;
use sluice_engine::Engine;

use crate::auth::{ApiKey, AuthPolicy};
use crate::error::ApiError;
use crate::sampling_defaults::SamplingDefaults;

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
    /// Compiles structured-output formats for this model's vocabulary.
    pub grammars: Arc<GrammarCompiler>,
    /// What requests that leave sampling fields out get.
    pub sampling: SamplingDefaults,
}

/// What a model's engine is doing, as `/health`, `/ready` and `/admin/models` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineState {
    /// Taking requests.
    Ready,
    /// Its loop panicked and restarts after a back-off; requests get 503 meanwhile.
    Restarting,
    /// Its loop thread has exited for good (its supervisor gave up, or it was stopped):
    /// only a restart of the process brings it back.
    Down,
}

impl EngineState {
    /// The name the health and admin routes use.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Ready => "ready",
            EngineState::Restarting => "restarting",
            EngineState::Down => "down",
        }
    }
}

impl ServedModel {
    /// Its engine's state now.
    pub fn state(&self) -> EngineState {
        if !self.engine.is_alive() {
            EngineState::Down
        } else if !self.engine.is_ready() {
            EngineState::Restarting
        } else {
            EngineState::Ready
        }
    }
}

/// Who may read `GET /metrics`.
#[derive(Debug, Clone, Default)]
pub enum MetricsAccess {
    /// Anyone who reaches the port.
    #[default]
    Open,
    /// An admin key, or the scrape-only key with this SHA-256.
    Key { scrape_key_sha256: Option<[u8; 32]> },
}

/// Shared application state.
pub struct AppState {
    /// The first is the default for requests that name no model. Empty when every
    /// model is an upstream's.
    pub models: Vec<ServedModel>,
    /// `[[upstreams]]`: other servers whose models requests are forwarded to.
    pub upstreams: crate::upstream::Upstreams,
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
    /// `[debug] fault_injection`: the admin routes that panic or stop an engine exist.
    pub fault_injection: bool,
    /// `[metrics]`: who may read `/metrics`.
    pub metrics_access: MetricsAccess,
    /// Bounds request preparation (chat-template rendering and tokenizing bodies of up
    /// to `limits.max_body_bytes`) on tokio's blocking pool; see `routes::prepare`.
    pub preparation: crate::routes::Preparation,
    /// Responses-API responses kept for `previous_response_id` and retrieval.
    pub responses: crate::response_store::ResponseStore,
    draining: AtomicBool,
    next_id: AtomicU64,
}

/// Bytes of stored Responses-API responses kept (oldest dropped first beyond it).
pub const RESPONSE_STORE_BYTES: usize = 64 << 20;

/// Cheap handle passed to handlers.
pub type SharedState = Arc<AppState>;

impl AppState {
    /// State for `models` under `auth` (no upstreams: set `upstreams` after).
    pub fn new(models: Vec<ServedModel>, auth: AuthPolicy) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        AppState {
            models,
            upstreams: crate::upstream::Upstreams::none(),
            auth,
            metrics: crate::metrics::handle(),
            log_payloads: false,
            request_timeout: std::time::Duration::from_secs(600),
            sessions: crate::sessions::SessionHub::new(1024, std::time::Duration::from_secs(3600)),
            ws_max_message_bytes: 64 << 10,
            fault_injection: false,
            metrics_access: MetricsAccess::Open,
            preparation: crate::routes::Preparation::new(),
            responses: crate::response_store::ResponseStore::new(RESPONSE_STORE_BYTES),
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
        self.resolve_model_index(name, key).map(|i| &self.models[i])
    }

    /// Like [`AppState::resolve_model`], the model's index in `models`, for work that
    /// moves off the runtime with the state.
    pub fn resolve_model_index(&self, name: Option<&str>, key: &ApiKey) -> Result<usize, ApiError> {
        let i = match name {
            None if self.models.is_empty() => {
                return Err(ApiError::invalid(
                    "model",
                    "name a model: this server runs none itself (its models are upstream \
                     servers', which serve /v1/chat/completions and /v1/completions)",
                ))
            }
            None => 0,
            Some(n) => self
                .models
                .iter()
                .position(|m| m.name == n || m.aliases.iter().any(|a| a == n))
                .ok_or_else(|| ApiError::ModelNotFound(n.to_string()))?,
        };
        let m = &self.models[i];
        if !key.may_use(&m.name, &m.aliases) {
            return Err(ApiError::ModelNotAllowed(m.name.clone()));
        }
        Ok(i)
    }

    /// The names of the models whose engine is in `state`.
    pub fn models_in(&self, state: EngineState) -> Vec<&str> {
        self.models
            .iter()
            .filter(|m| m.state() == state)
            .map(|m| m.name.as_str())
            .collect()
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
