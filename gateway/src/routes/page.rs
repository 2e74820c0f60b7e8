//! `GET /`: the browser chat page, built into the binary (no CDN, no build step).

use axum::http::header;
use axum::response::{Html, IntoResponse};

const PAGE: &str = include_str!("../../assets/index.html");

/// The page: chat over SSE, or a shared session over the WebSocket.
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            // Everything the page needs is inline or on this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
            ),
        ],
        Html(PAGE),
    )
}
