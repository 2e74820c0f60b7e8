//! A JSON body extractor whose rejections are OpenAI error objects.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
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

/// A JSON request body as bytes, with [`OpenAiJson`]'s checks (content type, size,
/// arrival time) but not yet parsed: the generation handlers look at `model` first to
/// forward upstream models' requests unchanged, and parse the rest with [`parse_json`].
pub struct RawJson(pub Bytes);

/// Whether the request says its body is JSON (`application/json` or `application/*+json`,
/// as `axum::Json` accepts).
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or_default().trim();
    let mime = mime.to_ascii_lowercase();
    match mime.split_once('/') {
        Some(("application", sub)) => sub == "json" || sub.ends_with("+json"),
        _ => false,
    }
}

impl<S: Send + Sync> FromRequest<S> for RawJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = req
            .extensions()
            .get::<BodyReadTimeout>()
            .map_or(Duration::from_secs(30), |t| t.0);
        let read = tokio::time::timeout(limit, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::BodyTimeout(limit.as_secs()))?;
        match read {
            Ok(b) => Ok(RawJson(b)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge)
            }
            Err(rejection) => Err(ApiError::InvalidRequest {
                message: rejection.body_text(),
                param: None,
            }),
        }
    }
}

/// Parses a [`RawJson`] body as `T`, with the errors [`OpenAiJson`] gives.
pub fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    Json::<T>::from_bytes(body)
        .map(|Json(v)| v)
        .map_err(|rejection| ApiError::InvalidRequest {
            message: rejection.body_text(),
            param: None,
        })
}
