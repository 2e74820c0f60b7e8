//! API keys: who may call, which models they may use, and their limits.
//!
//! Keys are compared by their SHA-256 in constant time against every configured entry, so
//! neither a key nor which entry matched leaks through timing, and only hashes are kept.
//! The middleware puts the caller's [`ApiKey`] into the request's extensions; logs and
//! metrics name a key by its `name`, never by its value.

use std::sync::Arc;

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::header::AUTHORIZATION;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use crate::config::KeyConfig;
use crate::error::ApiError;
use crate::rate_limit::{KeyLimits, RedisStore};
use crate::state::SharedState;

/// The development key accepted when no keys are configured on a loopback bind.
pub const DEV_KEY: &str = "sk-sluice-dev";

/// One accepted key.
pub struct ApiKey {
    pub name: String,
    hash: [u8; 32],
    /// Models this key may use; all when `None`.
    pub models: Option<Vec<String>>,
    pub admin: bool,
    pub limits: KeyLimits,
}

impl ApiKey {
    /// Whether this key may use the model called `name` (or one of `aliases`).
    pub fn may_use(&self, name: &str, aliases: &[String]) -> bool {
        self.models.as_ref().is_none_or(|allowed| {
            allowed
                .iter()
                .any(|m| m == name || aliases.iter().any(|a| a == m))
        })
    }
}

/// Which keys the server accepts.
pub struct AuthPolicy {
    keys: Vec<Arc<ApiKey>>,
}

impl AuthPolicy {
    /// The configured keys (hashes already validated as 64 hex characters).
    pub fn from_config(keys: &[KeyConfig]) -> Self {
        AuthPolicy::with_limit_store(keys, None)
    }

    /// The configured keys, their limits counted in `store` when given (Redis: shared
    /// by every replica), else in this process.
    pub fn with_limit_store(keys: &[KeyConfig], store: Option<&RedisStore>) -> Self {
        AuthPolicy {
            keys: keys
                .iter()
                .map(|k| {
                    let mut hash = [0u8; 32];
                    for (i, b) in hash.iter_mut().enumerate() {
                        *b = u8::from_str_radix(&k.key_sha256[2 * i..2 * i + 2], 16).unwrap_or(0);
                    }
                    Arc::new(ApiKey {
                        name: k.name.clone(),
                        hash,
                        models: k.models.clone(),
                        admin: k.admin,
                        limits: KeyLimits::with_store(k, store),
                    })
                })
                .collect(),
        }
    }

    /// Only the development key, without limits.
    pub fn dev_key_only() -> Self {
        AuthPolicy {
            keys: vec![Arc::new(ApiKey {
                name: "dev".into(),
                hash: sha256(DEV_KEY),
                models: None,
                admin: true,
                limits: KeyLimits::unlimited(),
            })],
        }
    }

    /// The entry for `key`, if accepted.
    pub fn find(&self, key: &str) -> Option<Arc<ApiKey>> {
        let h = sha256(key);
        // Compare with every entry so the time does not depend on which one matches.
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.hash.ct_eq(&h)) {
                found = Some(k.clone());
            }
        }
        found
    }
}

/// SHA-256 of a key.
pub fn sha256(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh random key (`sk-sluice-` and 40 hex characters) and its hex SHA-256.
pub fn new_key() -> (String, String) {
    let mut bytes = [0u8; 20];
    rand::rngs::StdRng::from_os_rng().fill_bytes(&mut bytes);
    let key = format!("sk-sluice-{}", hex(&bytes));
    let hash = hex(&sha256(&key));
    (key, hash)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Layer that identifies the caller by `Authorization: Bearer KEY` and puts its
/// [`ApiKey`] into the request's extensions; a missing or unknown key is a 401, and once
/// shutdown has begun every request is a 503.
#[derive(Clone)]
pub struct ApiKeyLayer {
    state: SharedState,
}

impl ApiKeyLayer {
    /// Checks keys against `state`'s policy.
    pub fn new(state: SharedState) -> Self {
        ApiKeyLayer { state }
    }
}

impl<S> Layer<S> for ApiKeyLayer {
    type Service = ApiKeyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyService {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The service [`ApiKeyLayer`] wraps around a route.
#[derive(Clone)]
pub struct ApiKeyService<S> {
    inner: S,
    state: SharedState,
}

impl<S> Service<Request> for ApiKeyService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let key = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let refusal = match key.map(|k| self.state.auth.find(k)) {
            None => Some(ApiError::MissingApiKey),
            Some(None) => Some(ApiError::InvalidApiKey),
            Some(Some(_)) if self.state.is_draining() => {
                crate::metrics::refused("draining");
                Some(ApiError::Draining)
            }
            Some(Some(k)) => {
                req.extensions_mut().insert(k);
                None
            }
        };
        // The clone that was polled ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            match refusal {
                Some(e) => Ok(e.into_response()),
                None => inner.call(req).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_policy_accepts_only_the_dev_key() {
        let p = AuthPolicy::dev_key_only();
        assert_eq!(p.find(DEV_KEY).unwrap().name, "dev");
        assert!(p.find("sk-sluice-dev2").is_none());
        assert!(p.find("").is_none());
    }

    #[test]
    fn configured_keys_are_found_by_their_hash_and_carry_their_allow_list() {
        let (key, hash) = new_key();
        assert!(key.starts_with("sk-sluice-") && key.len() == 50);
        let p = AuthPolicy::from_config(&[KeyConfig {
            name: "alice".into(),
            key_sha256: hash,
            requests_per_minute: None,
            tokens_per_minute: None,
            max_concurrent_streams: None,
            models: Some(vec!["small".into()]),
            admin: false,
        }]);
        let k = p.find(&key).expect("accepted");
        assert_eq!(k.name, "alice");
        assert!(k.may_use("small", &[]));
        assert!(k.may_use("big", &["small".into()]));
        assert!(!k.may_use("big", &[]));
        assert!(
            p.find(DEV_KEY).is_none(),
            "configured keys turn the dev key off"
        );
    }
}
