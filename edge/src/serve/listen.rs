//! The client listeners: `https` (TLS through [`TlsFront`], then HTTP) and optional
//! plain `http`, sharing one bound on open connections, each connection a tracked task
//! that finishes its requests when the edge shuts down. Each connection is served by
//! the fronts current when it was accepted ([`LiveFronts`]): a reload changes what new
//! connections get, never a connection in progress.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{serve_connection, HttpFront, LiveFronts};
use crate::exchange::ClientCtx;
use crate::metrics::Metrics;
#[cfg(doc)]
use crate::tls::TlsFront;

/// What every client connection of every listener shares.
#[derive(Clone)]
pub(crate) struct Listeners {
    /// Free connection slots (`[proxy] max_connections`).
    pub(crate) limit: Arc<Semaphore>,
    /// Every connection's task, waited for when draining.
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) fronts: Arc<LiveFronts>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Listeners {
    /// Next client connection, within the connection bound; `None` at shutdown.
    async fn next(
        &self,
        listener: &TcpListener,
    ) -> Option<(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>)> {
        keyless_shared::serve::accept(listener, Some(&self.limit), &self.shutdown).await
    }

    /// Serves `listener` as `https` until shutdown.
    pub(crate) async fn https(self, listener: TcpListener) {
        while let Some((tcp, peer, permit)) = self.next(&listener).await {
            let me = self.clone();
            let fronts = self.fronts.get();
            let local_addr = tcp.local_addr().unwrap_or(peer);
            self.tracker.spawn(async move {
                let _permit = permit;
                let Ok((stream, _site)) = fronts.tls.accept(tcp, peer).await else {
                    return;
                };
                let http = fronts.http.clone();
                drop(fronts);
                me.serve(stream, http, peer, "https", local_addr).await;
            });
        }
    }

    /// Serves `listener` as plain `http` until shutdown.
    pub(crate) async fn http(self, listener: TcpListener) {
        while let Some((tcp, peer, permit)) = self.next(&listener).await {
            let me = self.clone();
            let http = self.fronts.get().http.clone();
            let local_addr = tcp.local_addr().unwrap_or(peer);
            self.tracker.spawn(async move {
                let _permit = permit;
                me.serve(tcp, http, peer, "http", local_addr).await;
            });
        }
    }

    /// Serves HTTP on one client connection, counted in `connections_active`.
    async fn serve<IO>(
        self,
        io: IO,
        front: Arc<HttpFront>,
        client_addr: SocketAddr,
        scheme: &'static str,
        local_addr: SocketAddr,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        self.metrics.connections_active.inc();
        let ctx = ClientCtx {
            client_addr,
            scheme,
            local_addr,
        };
        serve_connection(io, front, ctx, self.shutdown).await;
        self.metrics.connections_active.dec();
    }
}
