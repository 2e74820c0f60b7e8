//! Server-sent events as OpenAI streams them: `data: {json}` events ending with
//! `data: [DONE]`; an `{"error": ...}` event inside the stream becomes an error item.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use crate::error::{ClientError, ErrorEnvelope};

/// A stream of typed SSE chunks; it ends after `[DONE]`.
pub struct EventStream<T> {
    body: BoxStream<'static, Result<bytes::Bytes, reqwest::Error>>,
    buf: Vec<u8>,
    ready: VecDeque<Result<T, ClientError>>,
    done: bool,
    _t: PhantomData<T>,
}

impl<T: DeserializeOwned> EventStream<T> {
    pub(crate) fn new(resp: reqwest::Response) -> Self {
        EventStream {
            body: resp.bytes_stream().boxed(),
            buf: Vec::new(),
            ready: VecDeque::new(),
            done: false,
            _t: PhantomData,
        }
    }

    /// Moves every complete event in the buffer to `ready`.
    fn parse_events(&mut self) {
        while let Some(end) = find(&self.buf, b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue; // comments, `event:` and `id:` fields
                };
                let data = data.trim_start();
                if data == "[DONE]" {
                    self.done = true;
                    return;
                }
                let item = match serde_json::from_str::<ErrorEnvelope>(data) {
                    Ok(e) => Err(ClientError::Api {
                        status: 0,
                        error: e.error,
                    }),
                    Err(_) => serde_json::from_str::<T>(data)
                        .map_err(|e| ClientError::Protocol(format!("bad chunk {data:?}: {e}"))),
                };
                self.ready.push_back(item);
            }
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

impl<T: DeserializeOwned + Unpin> Stream for EventStream<T> {
    type Item = Result<T, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Poll::Ready(Some(item));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.body.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(b))) => {
                    self.buf.extend_from_slice(&b);
                    self.parse_events();
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(ClientError::Protocol(
                        "the stream ended without [DONE]".into(),
                    ))));
                }
            }
        }
    }
}
