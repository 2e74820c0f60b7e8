//! Client errors: the server's OpenAI error object when it sent one.

use serde::Deserialize;
use thiserror::Error;

/// OpenAI's `{"error": {...}}` object.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ApiErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Everything a call can fail with.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The server answered with an error (status 0 when it arrived inside a stream).
    #[error("server error {status}: {}", .error.message)]
    Api { status: u16, error: ApiErrorBody },
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("unexpected response: {0}")]
    Protocol(String),
    #[error("WebSocket: {0}")]
    WebSocket(String),
}

impl ClientError {
    /// The server's error code (`invalid_api_key`, `model_not_found`, …), if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { error, .. } => error.code.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status of a server error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct ErrorEnvelope {
    pub error: ApiErrorBody,
}

/// Turns an error response's body into `ClientError::Api`.
pub(crate) fn from_body(status: u16, body: &str) -> ClientError {
    match serde_json::from_str::<ErrorEnvelope>(body) {
        Ok(e) => ClientError::Api {
            status,
            error: e.error,
        },
        Err(_) => ClientError::Api {
            status,
            error: ApiErrorBody {
                message: body.chars().take(500).collect(),
                kind: None,
                param: None,
                code: None,
            },
        },
    }
}
