//! Keeping a value (a semaphore permit) alive exactly as long as a response body.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::response::Response;
use hyper::body::{Frame, SizeHint};

/// Returns `resp` with `guard` attached to its body: dropped after the last chunk is sent,
/// or when the client goes away, not when the handler returns (an SSE stream outlives it).
///
/// The wrapper is transparent: it forwards the body's frames, size hint and end, so a
/// JSON body keeps its `Content-Length` instead of being re-sent chunked (a wrapper
/// that turned the body into a stream of chunks would lose the size).
pub fn hold_until_body_ends<T: Send + Sync + Unpin + 'static>(
    resp: Response,
    guard: T,
) -> Response {
    let (parts, inner) = resp.into_parts();
    Response::from_parts(
        parts,
        Body::new(Guarded {
            inner,
            guard: Some(guard),
        }),
    )
}

/// A body that holds `guard` until its last frame has been taken (or it is dropped).
struct Guarded<T> {
    inner: Body,
    guard: Option<T>,
}

impl<T: Unpin> HttpBody for Guarded<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_size_is_kept_and_the_guard_lives_until_the_body_ends() {
        let guard = Arc::new(());
        let resp = hold_until_body_ends(Response::new(Body::from("{\"a\":1}")), guard.clone());
        let body = resp.into_body();
        assert_eq!(body.size_hint().exact(), Some(7), "Content-Length survives");
        assert_eq!(Arc::strong_count(&guard), 2, "held while the body lives");
        let bytes = axum::body::to_bytes(body, 100).await.unwrap();
        assert_eq!(&bytes[..], b"{\"a\":1}");
        assert_eq!(Arc::strong_count(&guard), 1, "released with the body");

        // A streamed body keeps the guard until its last chunk has been taken.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let resp = hold_until_body_ends(Response::new(Body::from_stream(stream)), guard.clone());
        let mut body = resp.into_body();
        tx.send(Ok(Bytes::from_static(b"x"))).await.unwrap();
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(frame.unwrap().unwrap().is_data());
        assert_eq!(Arc::strong_count(&guard), 2, "held mid-stream");
        drop(tx);
        let end = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(end.is_none());
        assert_eq!(
            Arc::strong_count(&guard),
            1,
            "released at the end of the stream"
        );
    }
}
