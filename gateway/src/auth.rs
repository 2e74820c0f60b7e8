//! API key checks.
//!
//! Keys are compared by their SHA-256 in constant time, so neither the key nor its
//! length leaks through timing, and only hashes are kept in memory.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::SharedState;

/// The development key accepted when no keys are configured on a loopback bind.
pub const DEV_KEY: &str = "sk-sluice-dev";

/// Which keys the server accepts.
#[derive(Clone)]
pub struct AuthPolicy {
    key_hashes: Vec<[u8; 32]>,
}

impl AuthPolicy {
    /// Accept exactly the keys with these SHA-256 digests.
    pub fn with_key_hashes(key_hashes: Vec<[u8; 32]>) -> Self {
        AuthPolicy { key_hashes }
    }

    /// Only the development key.
    pub fn dev_key_only() -> Self {
        Self::with_key_hashes(vec![sha256(DEV_KEY)])
    }

    /// Whether `key` is accepted.
    pub fn accepts(&self, key: &str) -> bool {
        let h = sha256(key);
        // Check every entry so the time does not depend on which one matches.
        self.key_hashes
            .iter()
            .fold(false, |ok, k| ok | bool::from(k.ct_eq(&h)))
    }
}

/// SHA-256 of a key.
pub fn sha256(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Middleware: refuse requests without an accepted `Authorization: Bearer` key.
pub async fn require_key(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match key {
        None => ApiError::MissingApiKey.into_response(),
        Some(k) if !state.auth.accepts(k) => ApiError::InvalidApiKey.into_response(),
        Some(_) => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_policy_accepts_only_the_dev_key() {
        let p = AuthPolicy::dev_key_only();
        assert!(p.accepts(DEV_KEY));
        assert!(!p.accepts("sk-sluice-dev2"));
        assert!(!p.accepts(""));
    }
}
