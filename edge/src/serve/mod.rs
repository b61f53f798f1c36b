//! The client side of the edge: listeners, TLS (through [`crate::tls`]), HTTP/1.1 and
//! h2 connections, and the first step of every request.
//!
//! [`HttpFront`] maps each request to its site by host name, rewrites it into what
//! goes upstream (hop-by-hop fields removed, forwarding fields the edge's own, `Host`
//! = the one host of the request) and hands it to the cache, or straight to the origin
//! client when the cache is off. It is the only layer that knows both.

mod conn;
mod listen;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::cache::Cache;
use crate::config::{IpNetwork, ProxyConfig};
use crate::exchange::{ClientCtx, EdgeBody, Fetch, FetchError};
use crate::metrics::Metrics;
use crate::sites::{Site, Sites};
use crate::upstream::{headers, OriginClient};

pub use conn::serve_connection;
pub(crate) use listen::Listeners;

/// What serves a client connection: its TLS front (https) and its HTTP front, built
/// from one configuration.
pub struct Fronts {
    /// Handshakes of `https` connections.
    pub tls: Arc<crate::tls::TlsFront>,
    /// Requests of every connection.
    pub http: Arc<HttpFront>,
}

/// The fronts new connections get; a reload replaces them while the connections
/// accepted before keep theirs.
pub struct LiveFronts {
    current: std::sync::RwLock<Arc<Fronts>>,
}

impl LiveFronts {
    /// Starts with `fronts`.
    pub fn new(fronts: Fronts) -> LiveFronts {
        LiveFronts {
            current: std::sync::RwLock::new(Arc::new(fronts)),
        }
    }

    /// The current fronts.
    pub fn get(&self) -> Arc<Fronts> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `fronts` current; returns the ones it replaces.
    pub fn replace(&self, fronts: Fronts) -> Arc<Fronts> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *current, Arc::new(fronts))
    }
}

/// Answers client requests: through the cache when it is enabled, else straight from
/// the origin.
pub struct HttpFront {
    sites: Arc<Sites>,
    cache: Option<Arc<Cache>>,
    origin: Arc<OriginClient>,
    /// `[proxy] trusted_proxies`.
    trusted_proxies: Vec<IpNetwork>,
    /// Client connections idle this long are closed.
    idle_timeout: Duration,
    /// Largest request header block accepted from clients.
    max_header_bytes: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for HttpFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFront")
            .field("cache", &self.cache.is_some())
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl HttpFront {
    /// The front of `[proxy]` for `sites`, in front of `cache` (none: off) and `origin`.
    pub fn new(
        proxy: &ProxyConfig,
        sites: Arc<Sites>,
        cache: Option<Arc<Cache>>,
        origin: Arc<OriginClient>,
        metrics: Arc<Metrics>,
    ) -> HttpFront {
        HttpFront {
            sites,
            cache,
            origin,
            trusted_proxies: proxy.trusted_proxies.clone(),
            idle_timeout: proxy.idle_timeout,
            max_header_bytes: proxy.max_header_bytes.get(),
            metrics,
        }
    }

    /// Answers `req` for `site`. `host` is the request's host as
    /// [`crate::sites::normalize`] makes it (no port, no trailing dot, lowercase): the
    /// one host both the cache key and the origin see.
    ///
    /// The request is first rewritten into what goes upstream, so that the cache keys
    /// and varies on exactly the header fields the origin answers.
    async fn handle(
        &self,
        req: Request<Incoming>,
        host: &str,
        site: &Arc<Site>,
        ctx: &ClientCtx,
    ) -> Response<EdgeBody> {
        let req = match self.upstream_request(
            req.map(|b| b.map_err(crate::exchange::BodyError::from).boxed_unsync()),
            host,
            ctx,
        ) {
            Ok(req) => req,
            Err(e) => return e.response(site, ctx),
        };
        match &self.cache {
            Some(cache) => cache.handle(&self.origin, req, host, site, ctx).await,
            None => self.origin.forward(req, site, ctx).await,
        }
    }

    /// The client's request as it goes to the origin: header fields rewritten by
    /// [`headers::prepare_request`], the target in origin-form and `Host: host`.
    fn upstream_request(
        &self,
        req: Request<EdgeBody>,
        host: &str,
        ctx: &ClientCtx,
    ) -> Result<Request<EdgeBody>, FetchError> {
        let (mut parts, body) = req.into_parts();
        let trusted = self
            .trusted_proxies
            .iter()
            .any(|n| n.contains(ctx.client_addr.ip()));
        headers::prepare_request(&mut parts.headers, parts.version, ctx, host, trusted);
        let host = HeaderValue::from_str(host).map_err(|_| FetchError::BadRequest("host"))?;
        parts.headers.insert(header::HOST, host);
        if parts.uri.authority().is_some() {
            let target = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            parts.uri = Uri::from(target);
        }
        Ok(Request::from_parts(parts, body))
    }
}
