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
    #[error("This API key may not use the model `{0}`.")]
    ModelNotAllowed(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: std::time::Duration,
    },
    #[error("The server is shutting down and takes no new requests.")]
    Draining,
    #[error(
        "The generation took longer than {0} s and was cancelled; stream it, or lower max_tokens."
    )]
    Timeout(u64),
    #[error("The request body is larger than this server's limit (limits.max_body_bytes).")]
    PayloadTooLarge,
    #[error("This operation needs an admin key.")]
    AdminOnly,
    #[error("The request body did not arrive within {0} s.")]
    BodyTimeout(u64),
    #[error("Request bodies must be JSON: send 'Content-Type: application/json'.")]
    UnsupportedMediaType,
    #[error("Method {0} is not allowed on {1}.")]
    MethodNotAllowed(String, String),
    #[error("Unknown route {0}.")]
    RouteNotFound(String),
    #[error("No response found with id '{0}'.")]
    ResponseNotFound(String),
    #[error("The server is overloaded: {0}. Retry shortly.")]
    Overloaded(String),
    #[error("Internal error: {0}")]
    Internal(String),
    /// No upstream replica of the model could take the request (none reachable, all
    /// refused or timed out before answering).
    #[error("The model's upstream servers are unavailable: {0}. Retry shortly.")]
    UpstreamUnavailable(String),
    /// An upstream answered, then failed before its answer was complete.
    #[error("The model's upstream server failed: {0}")]
    UpstreamFailed(String),
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
            ApiError::ModelNotFound(_)
            | ApiError::RouteNotFound(_)
            | ApiError::ResponseNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::ModelNotAllowed(_) | ApiError::AdminOnly => StatusCode::FORBIDDEN,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed(..) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Overloaded(_) | ApiError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::UpstreamUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
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
            ApiError::ResponseNotFound(_) => (
                "invalid_request_error",
                Some("not_found"),
                Some("response_id".to_string()),
            ),
            ApiError::ModelNotAllowed(_) => (
                "permission_error",
                Some("model_not_allowed"),
                Some("model".to_string()),
            ),
            ApiError::AdminOnly => ("permission_error", Some("admin_required"), None),
            ApiError::BodyTimeout(_) => ("invalid_request_error", Some("body_timeout"), None),
            ApiError::MethodNotAllowed(..) => {
                ("invalid_request_error", Some("method_not_allowed"), None)
            }
            ApiError::UnsupportedMediaType => (
                "invalid_request_error",
                Some("unsupported_media_type"),
                None,
            ),
            ApiError::RateLimited { .. } => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            ApiError::PayloadTooLarge => ("invalid_request_error", Some("payload_too_large"), None),
            ApiError::Draining => ("server_error", Some("shutting_down"), None),
            ApiError::Timeout(_) => ("server_error", Some("timeout"), None),
            ApiError::Overloaded(_) => ("server_error", Some("overloaded"), None),
            ApiError::Internal(_) => ("server_error", Some("internal_error"), None),
            ApiError::UpstreamUnavailable(_) => {
                ("server_error", Some("upstream_unavailable"), None)
            }
            ApiError::UpstreamFailed(_) => ("server_error", Some("upstream_error"), None),
        };
        json!({"error": {"message": self.to_string(), "type": ty, "param": param, "code": code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull(_) | EngineError::Stopped | EngineError::Restarting => {
                ApiError::Overloaded(e.to_string())
            }
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
            EngineError::StructuredOutputUnsupported(_) => ApiError::InvalidRequest {
                message: e.to_string(),
                param: Some("response_format".into()),
            },
            EngineError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            // Whole seconds, rounded up: retrying earlier would only be refused again.
            ApiError::RateLimited { retry_after, .. } => {
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0))
            }
            ApiError::Draining => Some(5),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        let mut resp = (status, axum::Json(self.body())).into_response();
        if let Some(s) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
