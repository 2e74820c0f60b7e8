//! Accepting TCP connections: a bound on how many are open, timeouts that free the
//! ones slow or idle clients hold, and graceful shutdown.
//!
//! - At most `max_connections` are open (WebSockets included, for their whole life).
//!   One more is answered at once with a 503 in OpenAI's error format and
//!   `Retry-After: 1`, then closed; at most `MAX_REFUSING` such answers are in flight,
//!   beyond that extra connections are closed unanswered.
//! - A client has `header_read_timeout` to send a request's headers, and an idle
//!   keep-alive connection is closed after the same time (slowloris).
//! - A write that makes no progress for `write_stall_timeout` (the client stopped
//!   reading) closes the connection; the response body is dropped, which cancels its
//!   engine request.
//! - Header section at most `MAX_HEADER_BYTES` (hyper answers 431 beyond it).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::error::ApiError;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Refusals of connections over the limit being written at once.
const MAX_REFUSING: usize = 256;
/// How long a refused connection may keep sending before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Bounds on connections, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_stall_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets
/// every open HTTP connection finish its response and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES);
    // Each connection task holds a receiver: when all are dropped, every connection is
    // closed.
    let (open_tx, open_rx) = watch::channel(());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::metrics::refused("max_connections");
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                tokio::spawn(refuse(tcp, p));
            }
            continue;
        };
        let io = TokioIo::new(GuardedStream::new(tcp, slot, limits.write_stall_timeout));
        let svc = TowerToHyperService::new(app.clone());
        let conn = http.serve_connection(io, svc).with_upgrades();
        let (mut stop, open) = (stop_rx.clone(), open_rx.clone());
        tokio::spawn(async move {
            let _open = crate::metrics::HttpConnection::open();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    // Finish the response in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(open);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse(mut tcp: TcpStream, _permit: OwnedSemaphorePermit) {
    let body = ApiError::Overloaded("too many open connections".into())
        .body()
        .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let answer = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await?;
        // Read what the client sends until it closes: closing with unread data would
        // reset the connection and could destroy the answer before it is read.
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
}

/// A connection's stream that holds its connection slot and fails writes that stall.
struct GuardedStream<T> {
    tcp: T,
    _slot: OwnedSemaphorePermit,
    stall_limit: Duration,
    /// Running while a write is pending.
    stall: Option<Pin<Box<Sleep>>>,
}

impl<T> GuardedStream<T> {
    fn new(tcp: T, slot: OwnedSemaphorePermit, stall_limit: Duration) -> Self {
        GuardedStream {
            tcp,
            _slot: slot,
            stall_limit,
            stall: None,
        }
    }

    /// Passes a ready write result through; on pending, fails once the stall limit has
    /// passed since the write first blocked.
    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stall = None;
            return r;
        }
        let limit = self.stall_limit;
        let timer = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedStream<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedStream<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.tcp).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_the_peer_never_reads_fails_after_the_stall_limit() {
        let limit = Duration::from_millis(300);
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut s = GuardedStream::new(ours, slot, limit);
        // A slow reader that keeps making progress is fine: each read resets the clock.
        let reader = tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(limit / 3).await;
                theirs.read_exact(&mut [0; 64]).await.unwrap();
            }
            theirs // stops reading but stays connected
        });
        for _ in 0..6 {
            s.write_all(&[1; 64]).await.unwrap();
        }
        s.write_all(&[1; 64]).await.unwrap(); // fills the pipe
        let _theirs = reader.await.unwrap();
        let started = std::time::Instant::now();
        let e = s.write_all(&[1; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= limit, "{:?}", started.elapsed());
    }
}
