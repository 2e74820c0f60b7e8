//! A JSON body extractor whose rejections are OpenAI error objects.

use std::time::Duration;

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// How long a client may take to send a request body; the router puts it into every
/// request's extensions (`limits.body_read_timeout_seconds`).
#[derive(Debug, Clone, Copy)]
pub struct BodyReadTimeout(pub Duration);

/// Like `axum::Json`, but a bad body becomes a 4xx in OpenAI's format: 400 for JSON that
/// does not parse or fit, 413 over the size limit, 415 without a JSON content type, 408
/// for a body that does not arrive in time.
pub struct OpenAiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyReadTimeout>()
            .map_or(Duration::from_secs(30), |t| t.0);
        let parsed = tokio::time::timeout(limit, Json::<T>::from_request(req, state))
            .await
            .map_err(|_| ApiError::BodyTimeout(limit.as_secs()))?;
        match parsed {
            Ok(Json(v)) => Ok(OpenAiJson(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge)
            }
            Err(rejection) if rejection.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Err(ApiError::UnsupportedMediaType)
            }
            Err(rejection) => Err(ApiError::InvalidRequest {
                message: rejection.body_text(),
                param: None,
            }),
        }
    }
}
