//! API keys: who may call, which models they may use, and their limits.
//!
//! Keys are compared by their SHA-256 in constant time against every configured entry, so
//! neither a key nor which entry matched leaks through timing, and only hashes are kept.
//! The middleware puts the caller's [`ApiKey`] into the request's extensions; logs and
//! metrics name a key by its `name`, never by its value.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::KeyConfig;
use crate::error::ApiError;
use crate::rate_limit::{self, KeyLimits};
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
                        limits: KeyLimits::from_config(k),
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

/// Middleware: identify the caller by `Authorization: Bearer KEY`, count the request
/// against the key's request rate, hold one of its stream slots for as long as the
/// response body lives, and add the `x-ratelimit-*-requests` headers.
pub async fn require_key(
    State(state): State<SharedState>,
    mut req: Request,
    next: Next,
) -> Response {
    let key = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let key = match key {
        None => return ApiError::MissingApiKey.into_response(),
        Some(k) => match state.auth.find(k) {
            None => return ApiError::InvalidApiKey.into_response(),
            Some(k) => k,
        },
    };
    if state.is_draining() {
        crate::metrics::refused("draining");
        return ApiError::Draining.into_response();
    }
    let requests = match key.limits.take_request() {
        Ok(s) => s,
        Err(e) => {
            crate::metrics::rate_limited(&key.name, "requests");
            return e.into_response();
        }
    };
    let slot = match key.limits.take_stream() {
        Ok(s) => s,
        Err(e) => {
            crate::metrics::rate_limited(&key.name, "streams");
            return e.into_response();
        }
    };
    req.extensions_mut().insert(key);
    let resp = next.run(req).await;
    let (mut parts, body) = resp.into_parts();
    if let Some(s) = requests {
        rate_limit::set_headers(&mut parts.headers, "requests", &s);
    }
    // The slot is released when the body is dropped: after the last SSE event, or when
    // the client goes away.
    let body = axum::body::Body::from_stream(futures_util::StreamExt::map(
        body.into_data_stream(),
        move |chunk| {
            let _held = &slot;
            chunk
        },
    ));
    Response::from_parts(parts, body)
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
