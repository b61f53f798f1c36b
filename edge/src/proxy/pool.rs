//! Connections to origins: resolution through [`Resolver`], TCP connect to each
//! address in turn, TLS (SNI = origin host, ALPN h2 / http/1.1) for `https` origins,
//! and a pool per origin: idle HTTP/1.1 connections (most recently used first) and
//! one shared HTTP/2 connection, both closed after the idle timeout.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::{ProxyBody, ProxyError, Resolver};

/// Idle HTTP/1.1 connections kept per origin; more are closed when they fall idle.
const MAX_IDLE_PER_ORIGIN: usize = 64;
/// Resolved addresses tried per connection attempt, bounding its total time.
const MAX_ADDRS_TRIED: usize = 4;

/// Where a site's origin is, parsed from its URL.
#[derive(Debug)]
pub(crate) struct Origin {
    /// `scheme://host:port`: the pool key, and the origin's name in errors.
    pub(crate) key: String,
    /// Host as written in the URL (IPv6 in brackets).
    host: String,
    port: u16,
    tls: bool,
    /// The URL's authority, the `Host` sent when the client named none.
    pub(crate) authority: String,
}

impl Origin {
    /// `None` unless `uri` is an `http` or `https` URL with a host (which the
    /// configuration has checked).
    pub(crate) fn from_uri(uri: &Uri) -> Option<Origin> {
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return None,
        };
        let host = uri.host()?.to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let scheme = if tls { "https" } else { "http" };
        Some(Origin {
            key: format!("{scheme}://{host}:{port}"),
            authority: uri
                .authority()
                .map_or_else(|| host.clone(), |a| a.to_string()),
            host,
            port,
            tls,
        })
    }

    /// The host without IPv6 brackets, for TLS server names.
    fn bare_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }
}

/// A connection's request sender.
pub(crate) enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

type SendResult = Result<Response<Incoming>, TrySendError<Request<ProxyBody>>>;

impl Sender {
    pub(crate) fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }

    /// Sends `req`; when the connection turns out to be unusable before the request
    /// was written, the error gives the request back.
    pub(crate) fn send(
        &mut self,
        req: Request<ProxyBody>,
    ) -> impl Future<Output = SendResult> + Send + use<> {
        match self {
            Sender::H1(s) => Either::Left(s.try_send_request(req)),
            Sender::H2(s) => Either::Right(s.try_send_request(req)),
        }
    }
}

/// A connection taken from the pool or just made.
pub(crate) struct Conn {
    pub(crate) sender: Sender,
    /// Whether it has served requests before (and so may have been closed by the
    /// origin meanwhile).
    pub(crate) reused: bool,
}

#[derive(Default)]
struct Idle {
    h2: Option<Shared>,
    /// With the time each fell idle; the most recent last.
    h1: Vec<(Instant, http1::SendRequest<ProxyBody>)>,
}

struct Shared {
    sender: http2::SendRequest<ProxyBody>,
    last_used: Instant,
}

type IdleMap = Mutex<HashMap<String, Idle>>;

/// Origin connections of one [`super::Proxy`].
pub(crate) struct Pool {
    resolver: Resolver,
    tls: TlsConnector,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Arc<IdleMap>,
    sweeper_started: AtomicBool,
}

/// Locks `m`; a panic elsewhere while holding it leaves a map that is still valid.
fn lock(m: &IdleMap) -> MutexGuard<'_, HashMap<String, Idle>> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    pub(crate) fn new(
        resolver: Resolver,
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Pool {
        Pool {
            resolver,
            tls: TlsConnector::from(tls),
            connect_timeout,
            idle_timeout,
            idle: Arc::default(),
            sweeper_started: AtomicBool::new(false),
        }
    }

    /// An idle connection to `origin`, or a new one.
    pub(crate) async fn get(&self, origin: &Origin) -> Result<Conn, ProxyError> {
        self.start_sweeper();
        if let Some(sender) = self.take_idle(origin) {
            return Ok(Conn {
                sender,
                reused: true,
            });
        }
        self.connect(origin).await
    }

    fn take_idle(&self, origin: &Origin) -> Option<Sender> {
        let mut map = lock(&self.idle);
        let idle = map.get_mut(&origin.key)?;
        if let Some(shared) = &mut idle.h2 {
            if !shared.sender.is_closed() {
                shared.last_used = Instant::now();
                return Some(Sender::H2(shared.sender.clone()));
            }
            idle.h2 = None;
        }
        while let Some((since, sender)) = idle.h1.pop() {
            if since.elapsed() < self.idle_timeout && sender.is_ready() {
                return Some(Sender::H1(sender));
            }
        }
        None
    }

    /// Gives an HTTP/1.1 connection back once its response has been read to the end
    /// (if the response is abandoned, hyper closes the connection and it is dropped).
    /// HTTP/2 connections stay shared in the pool and need nothing.
    pub(crate) fn release(&self, origin: &Origin, sender: Sender) {
        let Sender::H1(mut sender) = sender else {
            return;
        };
        let idle = Arc::downgrade(&self.idle);
        let key = origin.key.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Some(idle) = idle.upgrade() else { return };
            let mut map = lock(&idle);
            let list = &mut map.entry(key).or_default().h1;
            if list.len() < MAX_IDLE_PER_ORIGIN {
                list.push((Instant::now(), sender));
            }
        });
    }

    /// Closes idle connections past the idle timeout, every half timeout, for as
    /// long as the pool exists.
    fn start_sweeper(&self) {
        if self.sweeper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let idle: Weak<IdleMap> = Arc::downgrade(&self.idle);
        let max_idle = self.idle_timeout;
        let period = (max_idle / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(idle) = idle.upgrade() else { return };
                let mut map = lock(&idle);
                map.retain(|_, entry| {
                    entry
                        .h1
                        .retain(|(since, s)| since.elapsed() < max_idle && !s.is_closed());
                    if entry
                        .h2
                        .as_ref()
                        .is_some_and(|s| s.sender.is_closed() || s.last_used.elapsed() >= max_idle)
                    {
                        entry.h2 = None;
                    }
                    entry.h2.is_some() || !entry.h1.is_empty()
                });
            }
        });
    }

    /// A new connection to `origin`; an HTTP/2 one also becomes its shared one.
    pub(crate) async fn connect(&self, origin: &Origin) -> Result<Conn, ProxyError> {
        let addrs = self.resolver.resolve(&origin.host, origin.port).await?;
        let tcp = self.connect_tcp(origin, &addrs).await?;
        let sender = if origin.tls {
            let name = ServerName::try_from(origin.bare_host().to_owned()).map_err(|e| {
                ProxyError::Tls {
                    origin: origin.key.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                }
            })?;
            let stream = match timeout(self.connect_timeout, self.tls.connect(name, tcp)).await {
                Err(_) => {
                    return Err(ProxyError::ConnectTimeout {
                        origin: origin.key.clone(),
                    })
                }
                Ok(Err(source)) => {
                    return Err(ProxyError::Tls {
                        origin: origin.key.clone(),
                        source,
                    })
                }
                Ok(Ok(stream)) => stream,
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            self.handshake(TokioIo::new(stream), h2, origin).await?
        } else {
            self.handshake(TokioIo::new(tcp), false, origin).await?
        };
        if let Sender::H2(s) = &sender {
            lock(&self.idle).entry(origin.key.clone()).or_default().h2 = Some(Shared {
                sender: s.clone(),
                last_used: Instant::now(),
            });
        }
        Ok(Conn {
            sender,
            reused: false,
        })
    }

    async fn connect_tcp(
        &self,
        origin: &Origin,
        addrs: &[SocketAddr],
    ) -> Result<TcpStream, ProxyError> {
        let mut last_error = None;
        for addr in addrs.iter().take(MAX_ADDRS_TRIED) {
            match timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%addr, error = %e, "TCP_NODELAY not set");
                    }
                    return Ok(stream);
                }
                Ok(Err(source)) => {
                    tracing::debug!(origin = %origin.key, %addr, error = %source, "origin connect failed");
                    last_error = Some(ProxyError::Connect {
                        origin: origin.key.clone(),
                        source,
                    });
                }
                Err(_) => {
                    tracing::debug!(origin = %origin.key, %addr, "origin connect timed out");
                    last_error = Some(ProxyError::ConnectTimeout {
                        origin: origin.key.clone(),
                    });
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ProxyError::Dns {
            host: origin.host.clone(),
            reason: "no addresses".into(),
        }))
    }

    async fn handshake<T>(&self, io: T, h2: bool, origin: &Origin) -> Result<Sender, ProxyError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let failed = |source| ProxyError::Http {
            origin: origin.key.clone(),
            source,
        };
        let timed_out = |_| ProxyError::ConnectTimeout {
            origin: origin.key.clone(),
        };
        if h2 {
            let (sender, conn) = timeout(
                self.connect_timeout,
                http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io),
            )
            .await
            .map_err(timed_out)?
            .map_err(failed)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "origin HTTP/2 connection ended with an error");
                }
            });
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = timeout(self.connect_timeout, http1::Builder::new().handshake(io))
                .await
                .map_err(timed_out)?
                .map_err(failed)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "origin HTTP/1.1 connection ended with an error");
                }
            });
            Ok(Sender::H1(sender))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_with_default_ports() {
        let o = Origin::from_uri(&"https://Origin.example".parse().unwrap()).unwrap();
        assert_eq!(o.key, "https://origin.example:443");
        assert!(o.tls);
        let o = Origin::from_uri(&"http://[::1]:8080/base".parse().unwrap()).unwrap();
        assert_eq!(o.key, "http://[::1]:8080");
        assert_eq!(o.bare_host(), "::1");
        assert_eq!(o.authority, "[::1]:8080");
        assert!(Origin::from_uri(&"/relative".parse().unwrap()).is_none());
        assert!(Origin::from_uri(&"ftp://x/".parse().unwrap()).is_none());
    }
}
