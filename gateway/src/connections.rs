//! Accepting TCP connections: TLS when configured, HTTP/1.1 or HTTP/2, a bound on how many
//! are open, timeouts that free the ones slow or idle clients hold, and graceful shutdown.
//!
//! - The protocol: over TLS, what ALPN agreed (`h2`, else HTTP/1.1); in plaintext, HTTP/2
//!   when the client opens with HTTP/2's preface (h2c with prior knowledge, for internal
//!   hops), else HTTP/1.1. HTTP/1.1's `Upgrade: h2c` is not offered.
//! - At most `max_connections` are open (WebSockets included, for their whole life).
//!   One more is answered at once with a 503 in OpenAI's error format and
//!   `Retry-After: 1`, then closed (over TLS it is closed unanswered: answering would
//!   cost a handshake); at most `MAX_REFUSING` such answers are in flight, beyond that
//!   extra connections are closed unanswered.
//! - A TLS handshake has `tls_handshake_timeout` to finish.
//! - A client has `header_read_timeout` to send its first bytes and, in HTTP/1.1, a
//!   request's headers; an idle keep-alive connection (HTTP/2: one with no stream open)
//!   is closed after the same time (slowloris).
//! - An HTTP/2 connection carries at most `http2_max_concurrent_streams` streams at once.
//! - A write that makes no progress for `write_stall_timeout` (the client stopped
//!   reading) closes the connection; the response body is dropped, which cancels its
//!   engine request.
//! - Header section at most `MAX_HEADER_BYTES` (HTTP/1.1: 431 beyond it; HTTP/2: the
//!   advertised header list size).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use http_body_util::BodyExt;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::error::ApiError;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Refusals of connections over the limit being written at once.
const MAX_REFUSING: usize = 256;
/// How long a refused connection may keep sending before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// What an HTTP/2 client sends first (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bounds on connections, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_stall_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
}

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    H2,
}

/// The HTTP/1.1 and HTTP/2 servers' settings, shared by every connection.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` resolves, then stops
/// accepting, lets every open connection finish its responses and returns when all are
/// closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let builders = Arc::new(Builders { http1, http2 });
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
            if tls.is_none() {
                if let Ok(p) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(refuse(tcp, p));
                }
            }
            continue;
        };
        let conn = Conn {
            app: app.clone(),
            builders: builders.clone(),
            limits,
            slot,
            stop: stop_rx.clone(),
        };
        let (tls, open) = (tls.clone(), open_rx.clone());
        tokio::spawn(async move {
            let _open = crate::metrics::HttpConnection::open();
            match tls {
                Some(acceptor) => conn.serve_tls(tcp, acceptor).await,
                None => conn.serve_plain(tcp).await,
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

/// Serves a hyper connection (HTTP/1.1 or HTTP/2: two types with the same methods) until
/// it ends, or until `close` resolves: then lets the responses in flight finish (HTTP/2:
/// GOAWAY) and closes. `close` yields how long that may take at most (`None`: as long as
/// the responses take; the drain's grace period bounds it).
macro_rules! drive {
    ($conn:expr, $close:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            linger = $close => {
                conn.as_mut().graceful_shutdown();
                match linger {
                    Some(limit) => {
                        let _ = tokio::time::timeout(limit, conn).await;
                    }
                    None => {
                        let _ = conn.await;
                    }
                }
            }
        }
    }};
}

/// One accepted connection, before it knows its protocol.
struct Conn {
    app: Router,
    builders: Arc<Builders>,
    limits: ConnectionLimits,
    slot: OwnedSemaphorePermit,
    stop: watch::Receiver<bool>,
}

impl Conn {
    async fn serve_tls(self, tcp: TcpStream, acceptor: TlsAcceptor) {
        let stream =
            match tokio::time::timeout(self.limits.tls_handshake_timeout, acceptor.accept(tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    crate::metrics::tls_handshake_failed("error");
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    crate::metrics::tls_handshake_failed("timeout");
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            };
        let protocol = if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
            Protocol::H2
        } else {
            Protocol::Http1
        };
        self.serve(stream, protocol, true).await;
    }

    async fn serve_plain(self, mut tcp: TcpStream) {
        // A client that connects and sends nothing is let go like a slow header.
        let (first, protocol) =
            match tokio::time::timeout(self.limits.header_read_timeout, sniff(&mut tcp)).await {
                Ok(Ok(r)) => r,
                _ => return,
            };
        self.serve(Prefixed::new(first, tcp), protocol, false).await;
    }

    async fn serve<T>(self, io: T, protocol: Protocol, tls: bool)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(GuardedStream::new(
            io,
            self.slot,
            self.limits.write_stall_timeout,
        ));
        let mut stop = self.stop;
        let stopping = async move {
            let _ = stop.wait_for(|s| *s).await;
            None
        };
        match protocol {
            Protocol::Http1 => {
                crate::metrics::connection_served("http1", tls);
                let svc = TowerToHyperService::new(self.app);
                let conn = self
                    .builders
                    .http1
                    .serve_connection(io, svc)
                    .with_upgrades();
                drive!(conn, stopping);
            }
            Protocol::H2 => {
                crate::metrics::connection_served("h2", tls);
                let activity = Arc::new(Activity::new());
                let app = self.app;
                let tracked = activity.clone();
                let svc = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let stream = tracked.begin();
                    let app = app.clone();
                    async move {
                        let res = app.oneshot(req.map(Body::new)).await?;
                        // The stream counts as open until its body is done with.
                        Ok::<_, std::convert::Infallible>(res.map(|b| {
                            Body::new(b.map_frame(move |f| {
                                let _open = &stream;
                                f
                            }))
                        }))
                    }
                });
                let conn = self
                    .builders
                    .http2
                    .serve_connection(io, TowerToHyperService::new(svc));
                let limit = self.limits.header_read_timeout;
                let idle = activity.idle_for_at_least(limit);
                drive!(conn, async move {
                    tokio::select! {
                        linger = stopping => linger,
                        // No stream is open: a client that does not answer GOAWAY's
                        // ping is not waited for longer than it may stay idle.
                        _ = idle => Some(limit),
                    }
                });
            }
        }
    }
}

/// Streams open on an HTTP/2 connection, and since when it has had none.
struct Activity {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// One open stream, until dropped.
struct OpenStream(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Activity {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::SeqCst);
        OpenStream(self.clone())
    }

    /// Resolves once the connection has had no stream open for `limit`.
    async fn idle_for_at_least(self: Arc<Self>, limit: Duration) {
        let tick = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
            if self.open.load(Ordering::SeqCst) == 0 && since.elapsed() >= limit {
                return;
            }
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        *since = Instant::now();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads a plaintext connection's first bytes: HTTP/2's preface, or anything else
/// (HTTP/1.1). Returns what was read, to be read again by the server.
async fn sniff(tcp: &mut TcpStream) -> io::Result<(Vec<u8>, Protocol)> {
    let mut first = Vec::with_capacity(1024);
    loop {
        if tcp.read_buf(&mut first).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = first.len().min(H2_PREFACE.len());
        if first[..n] != H2_PREFACE[..n] {
            return Ok((first, Protocol::Http1));
        }
        if n == H2_PREFACE.len() {
            return Ok((first, Protocol::H2));
        }
    }
}

/// A stream whose first reads return bytes already taken from it.
struct Prefixed<T> {
    first: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    fn new(first: Vec<u8>, inner: T) -> Self {
        Prefixed {
            first,
            at: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.first.len() {
            let n = buf.remaining().min(self.first.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            if self.at == self.first.len() {
                self.first = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
