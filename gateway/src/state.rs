//! What request handlers share: the served model and its engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_engine::chat_template::ChatTemplate;
use sluice_engine::tokenizer::Tokenizer;
use sluice_engine::Engine;

use crate::error::ApiError;

/// One model being served.
pub struct ServedModel {
    pub name: String,
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub context_length: usize,
    pub created: u64,
}

/// Shared application state.
pub struct AppState {
    pub model: ServedModel,
    pub auth: crate::auth::AuthPolicy,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    next_id: AtomicU64,
}

/// Cheap handle passed to handlers.
pub type SharedState = Arc<AppState>;

impl AppState {
    /// State for `model` under `auth`.
    pub fn new(model: ServedModel, auth: crate::auth::AuthPolicy) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        AppState {
            model,
            auth,
            metrics: crate::metrics::handle(),
            next_id: AtomicU64::new(seed),
        }
    }

    /// The model a request names (any name resolves when omitted).
    pub fn resolve_model(&self, name: Option<&str>) -> Result<&ServedModel, ApiError> {
        match name {
            None => Ok(&self.model),
            Some(n) if n == self.model.name => Ok(&self.model),
            Some(n) => Err(ApiError::ModelNotFound(n.to_string())),
        }
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
