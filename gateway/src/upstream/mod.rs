//! Upstreams: other OpenAI-compatible servers (`[[upstreams]]`) whose models this gateway
//! serves by forwarding chat and completion requests to them, unchanged, with its own key
//! for each. Replicas serving the same model share its traffic (`routing`), are
//! health-checked (`pool`), and a replica that fails before answering is replaced by
//! another (`proxy`).

pub mod config;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod routing;
pub mod session_turn;
pub mod tokens;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};
use thiserror::Error;

use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::state::AppState;
use config::{UpstreamEntry, UpstreamSettings};
use pool::Replica;
pub use proxy::Endpoint;

/// Why the upstreams could not be set up at start-up.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("upstream {url}: {message}")]
    Upstream { url: String, message: String },
    #[error("cannot build the upstreams' HTTP client: {0}")]
    Client(String),
}

/// A model served by upstreams.
pub struct UpstreamModel {
    pub name: String,
    /// Its `/v1/models` object (the first replica's, as it listed it).
    pub object: Value,
    /// The replicas serving it (indices into `Upstreams::replicas`).
    replicas: Vec<usize>,
}

/// Every upstream replica and the models they serve.
#[derive(Default)]
pub struct Upstreams {
    replicas: Vec<Arc<Replica>>,
    models: Vec<UpstreamModel>,
    settings: UpstreamSettings,
    client: Option<reqwest::Client>,
    turn: AtomicUsize,
}

impl Upstreams {
    /// No upstreams: every model is local.
    pub fn none() -> Self {
        Upstreams::default()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Builds the replicas, asks those without listed models for theirs (`GET
    /// /v1/models`), checks every one's health once, and starts the periodic checks.
    pub async fn start(
        entries: &[UpstreamEntry],
        settings: &UpstreamSettings,
    ) -> Result<Upstreams, StartError> {
        // The gauges below need the recorder.
        let _ = crate::metrics::handle();
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout())
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StartError::Client(e.to_string()))?;
        let mut replicas = Vec::new();
        let mut objects: Vec<(String, Value)> = Vec::new();
        for e in entries {
            let url = e.base().to_string();
            let fail = |message: String| StartError::Upstream {
                url: url.clone(),
                message,
            };
            let api_key = e.resolve_api_key().map_err(fail)?;
            let models = match &e.models {
                Some(list) => {
                    for m in list {
                        objects.push((
                            m.clone(),
                            json!({"id": m, "object": "model", "created": crate::state::unix_now(), "owned_by": "upstream"}),
                        ));
                    }
                    list.clone()
                }
                None => {
                    let listed = discover(&client, &url, api_key.as_deref(), settings)
                        .await
                        .map_err(|m| {
                            fail(format!(
                                "cannot list its models (GET /v1/models): {m}; start it first, \
                                 or list its models in [[upstreams]] models"
                            ))
                        })?;
                    let names = listed.iter().map(|(n, _)| n.clone()).collect();
                    objects.extend(listed);
                    names
                }
            };
            tracing::info!(upstream = %url, models = ?models, "upstream");
            replicas.push(Arc::new(Replica::new(url, api_key, models)));
        }
        let mut models: Vec<UpstreamModel> = Vec::new();
        for (name, object) in objects {
            if models.iter().any(|m| m.name == name) {
                continue;
            }
            let serving = (0..replicas.len())
                .filter(|&i| replicas[i].serves(&name))
                .collect();
            models.push(UpstreamModel {
                name,
                object,
                replicas: serving,
            });
        }
        let timeout = settings.health_check_interval().max(Duration::from_secs(2));
        futures_util::future::join_all(replicas.iter().map(|r| r.check(&client, timeout))).await;
        pool::spawn_health_checks(
            replicas.clone(),
            client.clone(),
            settings.health_check_interval(),
        );
        Ok(Upstreams {
            replicas,
            models,
            settings: settings.clone(),
            client: Some(client),
            turn: AtomicUsize::new(0),
        })
    }

    /// Every upstream model's name.
    pub fn model_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }

    pub fn find(&self, name: &str) -> Option<&UpstreamModel> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The upstream models with no healthy replica now.
    pub fn unreachable_models(&self) -> Vec<&str> {
        self.models
            .iter()
            .filter(|m| !m.replicas.iter().any(|&i| self.replicas[i].is_healthy()))
            .map(|m| m.name.as_str())
            .collect()
    }

    /// The `/v1/models` objects of the upstream models `key` may use.
    pub fn model_objects(&self, key: &ApiKey) -> Vec<Value> {
        self.models
            .iter()
            .filter(|m| key.may_use(&m.name, &[]))
            .map(|m| m.object.clone())
            .collect()
    }

    /// `model`'s replicas in the order to try them.
    fn order(&self, model: &UpstreamModel, affinity: Option<u64>) -> Vec<Arc<Replica>> {
        let reps: Vec<&Arc<Replica>> = model.replicas.iter().map(|&i| &self.replicas[i]).collect();
        let cands: Vec<routing::Candidate> = reps
            .iter()
            .map(|r| routing::Candidate {
                load: r.load(),
                healthy: r.is_healthy(),
                id: r.id,
            })
            .collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        routing::order(&cands, affinity, self.settings.affinity_slack, turn)
            .into_iter()
            .map(|i| reps[i].clone())
            .collect()
    }
}

/// Asks one upstream for its models: `(id, object)` pairs.
async fn discover(
    client: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
    settings: &UpstreamSettings,
) -> Result<Vec<(String, Value)>, String> {
    let mut req = client
        .get(format!("{url}/v1/models"))
        .timeout(settings.connect_timeout() + Duration::from_secs(10));
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| error_chain(&e))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(format!("answered {status}: {}", body.trim()));
    }
    let list: Value = resp.json().await.map_err(|e| e.to_string())?;
    let data = list
        .get("data")
        .and_then(Value::as_array)
        .ok_or("the answer has no `data` list")?;
    let models: Vec<(String, Value)> = data
        .iter()
        .filter_map(|o| Some((o.get("id")?.as_str()?.to_string(), o.clone())))
        .collect();
    if models.is_empty() {
        return Err("it lists no model".into());
    }
    Ok(models)
}

/// An error with its causes (reqwest's own message is often just "error sending request").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// For the chat and completion handlers: forwards the request when its `model` is an
/// upstream's (or it names none and no model is local); `None` when it is for a local
/// model, or is not a JSON object with a string `model` (the typed parse then answers).
pub async fn dispatch(
    state: &AppState,
    key: &Arc<ApiKey>,
    headers: &HeaderMap,
    body: &Bytes,
    endpoint: Endpoint,
) -> Option<Result<Response, ApiError>> {
    if state.upstreams.is_empty() {
        return None;
    }
    let request: Value = serde_json::from_slice(body).ok()?;
    let model = match request.get("model") {
        Some(Value::String(name)) => model_for(state, Some(name))?,
        None | Some(Value::Null) => model_for(state, None)?,
        _ => return None,
    };
    let body = body.clone();
    Some(proxy::forward(state, key, headers, body, &request, model, endpoint, None).await)
}

/// The upstream model a request naming `model` (or none) goes to; `None` when a local
/// model serves it, or no model has that name.
pub fn model_for<'a>(state: &'a AppState, model: Option<&str>) -> Option<&'a UpstreamModel> {
    let ups = &state.upstreams;
    match model {
        Some(name) => {
            let local = state
                .models
                .iter()
                .any(|m| m.name == name || m.aliases.iter().any(|a| a == name));
            if local {
                None
            } else {
                ups.find(name)
            }
        }
        None if state.models.is_empty() => ups.models.first(),
        None => None,
    }
}
