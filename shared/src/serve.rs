//! Listener plumbing both binaries share: the accept loop with its connection bound,
//! shutdown and back-off, and the small HTTP/1 server of the admin and metrics ports.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Pause after a failed accept: EMFILE and friends persist for a while, and retrying
/// at once would spin on them.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// An admin client has this long to send its request headers.
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An admin connection is closed after this long, whatever it is doing.
pub const ADMIN_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// An accepted connection: the socket (`TCP_NODELAY` set), the peer, and the
/// connection-limit permit to hold for as long as the connection lives (`None` when
/// [`accept`] was given no limit).
pub type Accepted = (TcpStream, SocketAddr, Option<OwnedSemaphorePermit>);

/// The next connection of `listener`; `None` once `shutdown` is cancelled (or `limit`
/// is closed).
///
/// With a `limit`, a permit is taken *before* accepting, so at the bound new
/// connections wait in the kernel's backlog instead of being accepted and dropped.
/// Accept errors are logged and retried after [`ACCEPT_BACKOFF`].
pub async fn accept(
    listener: &TcpListener,
    limit: Option<&Arc<Semaphore>>,
    shutdown: &CancellationToken,
) -> Option<Accepted> {
    loop {
        let permit = match limit {
            Some(limit) => tokio::select! {
                p = limit.clone().acquire_owned() => Some(p.ok()?),
                () = shutdown.cancelled() => return None,
            },
            None => None,
        };
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    // Replies are written whole; Nagle would only delay their last segment.
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, peer, permit));
                }
                Err(e) => {
                    let listen = listener.local_addr().ok();
                    tracing::warn!(listener = ?listen, error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            () = shutdown.cancelled() => return None,
        }
    }
}

/// Serves HTTP/1 on `listener` until `shutdown`: each request goes to `handler` with the
/// peer's address. Connections get [`ADMIN_HEADER_READ_TIMEOUT`] for their headers and
/// live [`ADMIN_CONNECTION_TIMEOUT`] at most; they are not counted nor drained, which
/// suits an admin or metrics port, not client traffic.
pub async fn serve_admin<H, F>(listener: TcpListener, shutdown: CancellationToken, handler: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    while let Some((stream, peer, _)) = accept(&listener, None, &shutdown).await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let reply = handler(req, peer);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if tokio::time::timeout(ADMIN_CONNECTION_TIMEOUT, conn)
                .await
                .is_err()
            {
                tracing::debug!(%peer, "admin: connection timed out");
            }
        });
    }
}

/// A `text/plain` response (the Prometheus text exposition type, which also suits
/// the short messages of admin endpoints).
pub fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// Whether the bearer token `given` is `expected`, in constant time (both are hashed
/// first, so that neither their bytes nor their lengths show in the timing).
pub fn token_matches(expected: &str, given: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let a = ring::digest::digest(&ring::digest::SHA256, expected.as_bytes());
    let b = ring::digest::digest(&ring::digest::SHA256, given);
    bool::from(a.as_ref().ct_eq(b.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches("secret-token", b"secret-token"));
        assert!(!token_matches("secret-token", b"secret-tokeN"));
        assert!(!token_matches("secret-token", b"secret-token "));
        assert!(!token_matches("secret-token", b""));
    }

    #[tokio::test]
    async fn accept_holds_the_limit_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = Arc::new(Semaphore::new(1));
        let shutdown = CancellationToken::new();

        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (tcp, _, permit) = accept(&listener, Some(&limit), &shutdown).await.unwrap();
        assert!(tcp.nodelay().unwrap());
        assert!(permit.is_some());
        assert_eq!(limit.available_permits(), 0);

        // At the bound the next connection is not accepted until the permit returns.
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_millis(100),
            accept(&listener, Some(&limit), &shutdown),
        )
        .await;
        assert!(waiting.is_err(), "accepted over the limit");
        drop(permit);
        let (_, _, permit) = accept(&listener, Some(&limit), &shutdown).await.unwrap();
        assert!(permit.is_some());

        // Shutdown ends a wait for a permit and a wait for a connection.
        shutdown.cancel();
        assert!(accept(&listener, Some(&limit), &shutdown).await.is_none());
        assert!(accept(&listener, None, &shutdown).await.is_none());
    }

    #[tokio::test]
    async fn admin_server_answers_with_the_handler_and_the_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_admin(
            listener,
            shutdown.clone(),
            |req: Request<Incoming>, peer: SocketAddr| async move {
                let body = format!("{} {}\n", req.uri().path(), peer.ip());
                text_response(StatusCode::IM_A_TEAPOT, body)
            },
        ));

        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 418 "), "{reply}");
        assert!(
            reply.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{reply}"
        );
        assert!(reply.ends_with("/x 127.0.0.1\n"), "{reply}");

        shutdown.cancel();
        server.await.unwrap();
    }
}
