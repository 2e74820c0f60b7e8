//! API errors and their one mapping to HTTP status and OpenAI's error object.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_engine::EngineError;
use thiserror::Error;

/// Everything a request can fail with, as the client sees it.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")]
    MissingApiKey,
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("Unknown route {0}.")]
    RouteNotFound(String),
    #[error("The server is overloaded: {0}. Retry shortly.")]
    Overloaded(String),
    #[error("Internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming the offending parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::MissingApiKey | ApiError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `{"error": {...}}` body.
    pub fn body(&self) -> serde_json::Value {
        let (ty, code, param) = match self {
            ApiError::InvalidRequest { param, .. } => {
                ("invalid_request_error", None, param.clone())
            }
            ApiError::MissingApiKey => ("invalid_request_error", Some("missing_api_key"), None),
            ApiError::InvalidApiKey => ("invalid_request_error", Some("invalid_api_key"), None),
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".to_string()),
            ),
            ApiError::RouteNotFound(_) => ("invalid_request_error", Some("not_found"), None),
            ApiError::Overloaded(_) => ("server_error", Some("overloaded"), None),
            ApiError::Internal(_) => ("server_error", Some("internal_error"), None),
        };
        json!({"error": {"message": self.to_string(), "type": ty, "param": param, "code": code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull(_) | EngineError::Stopped => ApiError::Overloaded(e.to_string()),
            EngineError::ContextLengthExceeded { .. } | EngineError::ExceedsKvCache { .. } => {
                ApiError::InvalidRequest {
                    message: e.to_string(),
                    param: Some("messages".into()),
                }
            }
            EngineError::EmptyPrompt | EngineError::InvalidToken(_) => ApiError::InvalidRequest {
                message: e.to_string(),
                param: Some("prompt".into()),
            },
            EngineError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
