//! Keeping a value (a semaphore permit) alive exactly as long as a response body.

use axum::body::Body;
use axum::response::Response;
use futures_util::StreamExt;

/// Returns `resp` with `guard` attached to its body: dropped after the last chunk is sent,
/// or when the client goes away, not when the handler returns (an SSE stream outlives it).
pub fn hold_until_body_ends<T: Send + Sync + 'static>(resp: Response, guard: T) -> Response {
    let (parts, body) = resp.into_parts();
    let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _held = &guard;
        chunk
    }));
    Response::from_parts(parts, body)
}
