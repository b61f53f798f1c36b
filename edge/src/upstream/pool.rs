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
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::Resolver;
use crate::config::OriginUrl;
use crate::exchange::{EdgeBody, FetchError};

/// Idle HTTP/1.1 connections kept per origin; more are closed when they fall idle.
const MAX_IDLE_PER_ORIGIN: usize = 64;
/// Resolved addresses tried per connection attempt, bounding its total time.
const MAX_ADDRS_TRIED: usize = 4;

/// A connection's request sender.
pub(crate) enum Sender {
    H1(http1::SendRequest<EdgeBody>),
    H2(http2::SendRequest<EdgeBody>),
}

type SendResult = Result<Response<Incoming>, TrySendError<Request<EdgeBody>>>;

impl Sender {
    pub(crate) fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }

    /// Sends `req`; when the connection turns out to be unusable before the request
    /// was written, the error gives the request back.
    pub(crate) fn send(
        &mut self,
        req: Request<EdgeBody>,
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
    h1: Vec<(Instant, http1::SendRequest<EdgeBody>)>,
}

struct Shared {
    sender: http2::SendRequest<EdgeBody>,
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
    pub(crate) async fn get(&self, origin: &OriginUrl) -> Result<Conn, FetchError> {
        self.start_sweeper();
        if let Some(sender) = self.take_idle(origin) {
            return Ok(Conn {
                sender,
                reused: true,
            });
        }
        self.connect(origin).await
    }

    fn take_idle(&self, origin: &OriginUrl) -> Option<Sender> {
        let mut map = lock(&self.idle);
        let idle = map.get_mut(origin.key())?;
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
    pub(crate) fn release(&self, origin: &OriginUrl, sender: Sender) {
        let Sender::H1(mut sender) = sender else {
            return;
        };
        let idle = Arc::downgrade(&self.idle);
        let key = origin.key().to_owned();
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
    pub(crate) async fn connect(&self, origin: &OriginUrl) -> Result<Conn, FetchError> {
        let addrs = self.resolver.resolve(origin.host(), origin.port()).await?;
        let tcp = self.connect_tcp(origin, &addrs).await?;
        let sender = if origin.is_tls() {
            let name = ServerName::try_from(origin.bare_host().to_owned()).map_err(|e| {
                FetchError::Tls {
                    origin: origin.key().to_owned(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                }
            })?;
            let stream = match timeout(self.connect_timeout, self.tls.connect(name, tcp)).await {
                Err(_) => {
                    return Err(FetchError::ConnectTimeout {
                        origin: origin.key().to_owned(),
                    })
                }
                Ok(Err(source)) => {
                    return Err(FetchError::Tls {
                        origin: origin.key().to_owned(),
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
            lock(&self.idle)
                .entry(origin.key().to_owned())
                .or_default()
                .h2 = Some(Shared {
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
        origin: &OriginUrl,
        addrs: &[SocketAddr],
    ) -> Result<TcpStream, FetchError> {
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
                    tracing::debug!(origin = %origin.key(), %addr, error = %source, "origin connect failed");
                    last_error = Some(FetchError::Connect {
                        origin: origin.key().to_owned(),
                        source,
                    });
                }
                Err(_) => {
                    tracing::debug!(origin = %origin.key(), %addr, "origin connect timed out");
                    last_error = Some(FetchError::ConnectTimeout {
                        origin: origin.key().to_owned(),
                    });
                }
            }
        }
        Err(last_error.unwrap_or_else(|| FetchError::Dns {
            host: origin.host().to_owned(),
            reason: "no addresses".into(),
        }))
    }

    async fn handshake<T>(&self, io: T, h2: bool, origin: &OriginUrl) -> Result<Sender, FetchError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let failed = |source| FetchError::Http {
            origin: origin.key().to_owned(),
            source,
        };
        let timed_out = |_| FetchError::ConnectTimeout {
            origin: origin.key().to_owned(),
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
