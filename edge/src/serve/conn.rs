//! Serving one client connection: HTTP/1.1 or HTTP/2 (detected from the preface, so it
//! works after ALPN and in plain text), each request mapped to its site by host name
//! and forwarded, one access-log line per request, and the connection closed when it
//! has been idle for `idle_timeout` or when the edge shuts down (gracefully: requests
//! in flight finish).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::HttpFront;
use crate::exchange::{request_authority, text_response, ClientCtx, EdgeBody, OriginTime};

/// Longest wait for a request's header block (and, on HTTP/1.1, for the next request
/// of a kept-alive connection); shorter when `idle_timeout` is.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// hyper's smallest HTTP/1 read buffer.
const MIN_HEADER_BUF: usize = 8192;
/// How long a connection that has not sent its first request yet may still send it
/// once the edge stops (a drain or an upgrade): a client that just connected gets its
/// request answered rather than the connection closed under it.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Serves HTTP on the client connection `io` until the client closes it, it stays idle
/// for `idle_timeout`, or `shutdown` is cancelled (then requests in flight finish).
///
/// Requests go to the site named by their host (`:authority`, or `Host` without
/// port). A request that names no host gets `400`: the host keys the cache and goes
/// to the origin, so it is never guessed (the TLS SNI's site is not used for that).
/// Unknown hosts get `421 Misdirected Request` on https and `404` on http.
pub async fn serve_connection<IO>(
    io: IO,
    front: Arc<HttpFront>,
    ctx: ClientCtx,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_timeout = front.idle_timeout;
    let max_header_bytes = front.max_header_bytes;
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Tracked {
        io,
        clock: clock.clone(),
    });
    let state = Arc::new(ConnState {
        front,
        ctx,
        in_flight: AtomicUsize::new(0),
        first_request: tokio::sync::Notify::new(),
        requests: AtomicUsize::new(0),
    });
    let service = {
        let state = state.clone();
        service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(state.handle(req).await) }
        })
    };

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT.min(idle_timeout))
        .max_buf_size(max_header_bytes.max(MIN_HEADER_BUF))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);

    // Set once the connection is asked to finish (idle or shutdown); if it then makes
    // no progress for another idle period (a client that stopped reading), it is
    // dropped.
    let mut closing_since: Option<Instant> = None;
    // Set when the edge stops before the connection's first request: it is closed once
    // that request came in (and is answered), or at this instant.
    let mut first_request_by: Option<Instant> = None;
    loop {
        if state.in_flight.load(Ordering::Relaxed) > 0 {
            // Waiting for an origin is not the client's idleness.
            clock.touch();
        }
        let quiet_from = match closing_since {
            Some(t) => t.max(clock.last()),
            None => clock.last(),
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(client = %ctx.client_addr, error = %e, "client connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if closing_since.is_none() && first_request_by.is_none() => {
                if state.requests.load(Ordering::Acquire) == 0 {
                    first_request_by = Some(Instant::now() + FIRST_REQUEST_GRACE);
                    continue;
                }
                conn.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
            () = wait_first_request(&state, first_request_by), if closing_since.is_none() && first_request_by.is_some() => {
                conn.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
            () = tokio::time::sleep_until(quiet_from + idle_timeout) => {
                if state.in_flight.load(Ordering::Relaxed) > 0 || clock.last() > quiet_from {
                    continue;
                }
                if closing_since.is_some() {
                    tracing::debug!(client = %ctx.client_addr, "client connection stalled while closing; dropped");
                    return;
                }
                conn.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
        }
    }
}

/// Until the connection's first request came in, or `by`.
async fn wait_first_request(state: &ConnState, by: Option<Instant>) {
    let Some(by) = by else {
        return std::future::pending().await;
    };
    let first = state.first_request.notified();
    if state.requests.load(Ordering::Acquire) > 0 {
        return;
    }
    tokio::select! {
        () = first => {}
        () = tokio::time::sleep_until(by) => {}
    }
}

/// What every request of one connection shares.
struct ConnState {
    front: Arc<HttpFront>,
    ctx: ClientCtx,
    /// Requests waiting for their response headers.
    in_flight: AtomicUsize,
    /// Requests received so far.
    requests: AtomicUsize,
    /// Woken by the first request.
    first_request: tokio::sync::Notify,
}

/// Counts a request in [`ConnState::in_flight`] until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a AtomicUsize) -> InFlight<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnState {
    async fn handle(&self, req: Request<Incoming>) -> Response<EdgeBody> {
        let in_flight = InFlight::enter(&self.in_flight);
        if self.requests.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first_request.notify_one();
        }
        let started = Instant::now();
        let method = req.method().clone();
        // Only the access log needs a copy of the path.
        let path = tracing::enabled!(target: "access", tracing::Level::INFO)
            .then(|| req.uri().path().to_owned());
        // The one host of the request, as the cache keys it and the origin gets it.
        let named =
            req.uri().authority().is_some() || req.headers().contains_key(http::header::HOST);
        let host = request_authority(&req)
            .map(|a| crate::sites::normalize(a.host()))
            .filter(|h| !h.is_empty());
        let several_hosts = req
            .headers()
            .get_all(http::header::HOST)
            .iter()
            .nth(1)
            .is_some();

        let site = host
            .as_deref()
            .and_then(|h| self.front.sites.lookup(h).cloned());
        let response = if !named {
            text_response(StatusCode::BAD_REQUEST, "request names no host\n")
        } else if host.is_none() || several_hosts {
            text_response(StatusCode::BAD_REQUEST, "invalid Host header\n")
        } else if method == Method::CONNECT {
            text_response(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n")
        } else if let (Some(site), Some(host)) = (site, host.as_deref()) {
            self.front.handle(req, host, &site, &self.ctx).await
        } else if self.ctx.scheme == "https" {
            text_response(
                StatusCode::MISDIRECTED_REQUEST,
                "this edge does not serve that host\n",
            )
        } else {
            text_response(
                StatusCode::NOT_FOUND,
                "this edge does not serve that host\n",
            )
        };
        drop(in_flight);

        let status = response.status().as_u16();
        self.front.metrics.request(status, self.ctx.scheme);
        let origin_ms = response
            .extensions()
            .get::<OriginTime>()
            .map(|t| millis(t.0));
        tracing::info!(
            target: "access",
            client = %self.ctx.client_addr.ip(),
            method = %method,
            // Chosen by the client: escaped so that they cannot forge log lines or fields.
            host = %keyless_shared::log_safe(host.as_deref().unwrap_or("-")),
            path = %keyless_shared::log_safe(path.as_deref().unwrap_or("-")),
            status,
            bytes = %Dash(response.body().size_hint().exact()),
            duration_ms = millis(started.elapsed()),
            origin_ms = %Dash(origin_ms),
            cache = response
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            "request"
        );
        response
    }
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A value or `-` in logs.
struct Dash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Dash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// When the connection last moved a byte.
struct Clock {
    base: Instant,
    /// Milliseconds after `base`.
    last_ms: AtomicU64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The client stream, noting in a [`Clock`] each time bytes move.
struct Tracked<IO> {
    io: IO,
    clock: Arc<Clock>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.touch();
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
