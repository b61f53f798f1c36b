//! HTTP proxy from clients to site origins.
//!
//! [`serve_connection`] serves one client connection (HTTP/1.1 or HTTP/2, after TLS or
//! in plain text), maps each request to its site by host name and hands it to
//! [`Proxy::forward`], which sends it to the site's origin over a pooled connection
//! (HTTP/1.1, or HTTP/2 when an `https` origin negotiates it) and streams the
//! response back. Origin host names are resolved by [`Resolver`].
//!
//! Failures on the origin side become short `502`/`504` answers naming the failure
//! class; the details go to the log, never on the wire.

mod dns;
mod headers;
mod pool;
mod serve;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::cache::Cache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::sites::Site;
use pool::{Origin, Pool};

pub use dns::Resolver;
pub use serve::serve_connection;

/// Body of proxied requests and responses: streamed, never buffered whole.
pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// What the proxy knows about the client connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct ClientCtx {
    /// The client's address.
    pub client_addr: SocketAddr,
    /// `https` or `http`: the listener the client used.
    pub scheme: &'static str,
    /// The edge address the client connected to.
    pub local_addr: SocketAddr,
}

/// Why a request could not be proxied. Each variant says on which side it failed and
/// whether sending the request again is safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The proxy cannot be set up (origin CA, DNS or TLS configuration); at start only.
    #[error("proxy configuration: {0}")]
    Config(String),
    /// The origin's host name did not resolve. Nothing was sent; retry is safe.
    #[error("origin host {host} did not resolve: {reason}")]
    Dns {
        /// The origin host.
        host: String,
        /// The resolver's answer.
        reason: String,
    },
    /// No address of the origin accepted a connection. Nothing was sent; retry is safe.
    #[error("origin {origin} unreachable: {source}")]
    Connect {
        /// `scheme://host:port` of the origin.
        origin: String,
        /// The last address's error.
        source: std::io::Error,
    },
    /// Connecting (TCP, TLS or HTTP/2 handshake) took longer than `connect_timeout`.
    /// Nothing was sent; retry is safe.
    #[error("connecting to origin {origin} timed out")]
    ConnectTimeout {
        /// `scheme://host:port` of the origin.
        origin: String,
    },
    /// The TLS handshake with the origin failed (e.g. its certificate is not trusted).
    /// Nothing was sent; retry is safe.
    #[error("TLS with origin {origin} failed: {source}")]
    Tls {
        /// `scheme://host:port` of the origin.
        origin: String,
        /// What rustls reported.
        source: std::io::Error,
    },
    /// The HTTP exchange with the origin failed. The origin may have seen the request;
    /// a retry is safe only for idempotent requests.
    #[error("HTTP exchange with origin {origin} failed: {source}")]
    Http {
        /// `scheme://host:port` of the origin.
        origin: String,
        /// What hyper reported.
        source: hyper::Error,
    },
    /// The origin sent no response headers within `response_header_timeout`. It may
    /// still be processing the request; a retry is safe only for idempotent requests.
    #[error("origin {origin} sent no response headers within {timeout:?}")]
    ResponseTimeout {
        /// `scheme://host:port` of the origin.
        origin: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The client's request cannot be expressed towards the origin (request target,
    /// host). Retrying the same request fails the same way.
    #[error("request cannot be forwarded: {0}")]
    BadRequest(&'static str),
}

impl ProxyError {
    /// Whether the request certainly did not reach the origin, so sending it again
    /// (to this or another origin address) is safe.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::Dns { .. }
                | ProxyError::Connect { .. }
                | ProxyError::ConnectTimeout { .. }
                | ProxyError::Tls { .. }
        )
    }

    /// The `result` label of [`Metrics::origin`].
    fn metric_result(&self) -> &'static str {
        match self {
            ProxyError::Dns { .. } => "dns-error",
            ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::Tls { .. } => "connect-error",
            ProxyError::ResponseTimeout { .. } => "timeout",
            ProxyError::Config(_) | ProxyError::Http { .. } | ProxyError::BadRequest(_) => "error",
        }
    }

    /// The status the client is told (502, 504 or 400).
    pub fn client_status(&self) -> StatusCode {
        self.client_answer().0
    }

    /// What the client is told: a status and a short text naming the failure class.
    fn client_answer(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::Dns { .. } => (StatusCode::BAD_GATEWAY, "origin host not found\n"),
            ProxyError::Connect { .. } => (StatusCode::BAD_GATEWAY, "origin unreachable\n"),
            ProxyError::ConnectTimeout { .. } => {
                (StatusCode::BAD_GATEWAY, "origin connection timed out\n")
            }
            ProxyError::Tls { .. } => (StatusCode::BAD_GATEWAY, "origin TLS handshake failed\n"),
            ProxyError::Http { .. } | ProxyError::Config(_) => {
                (StatusCode::BAD_GATEWAY, "origin connection failed\n")
            }
            ProxyError::ResponseTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "origin response timed out\n")
            }
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad request\n"),
        }
    }
}

/// Time from the start of [`Proxy::forward`] to the origin's response headers (or the
/// failure), left in the response's extensions for the access log.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OriginTime(pub(crate) Duration);

/// Sends client requests to site origins over pooled connections.
pub struct Proxy {
    pool: Pool,
    response_header_timeout: Duration,
    /// Client connections idle this long are closed.
    pub(crate) idle_timeout: Duration,
    /// Largest request header block accepted from clients.
    pub(crate) max_header_bytes: usize,
    pub(crate) metrics: Arc<Metrics>,
    /// The HTTP cache; `None` when `[cache] enabled = false`.
    cache: Option<Arc<Cache>>,
    /// `[proxy] trusted_proxies`.
    trusted_proxies: Vec<crate::config::IpNetwork>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("response_header_timeout", &self.response_header_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Sets up the resolver of `[dns]` and the origin TLS trust (system roots plus
    /// `proxy.origin_ca`). Needs no runtime; connections are made on first use.
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        cache: Option<Arc<Cache>>,
    ) -> Result<Proxy, ProxyError> {
        let resolver = Resolver::new(&config.dns)?;
        let tls = origin_tls_config(config.proxy.origin_ca.as_deref())?;
        let p = &config.proxy;
        Ok(Proxy {
            pool: Pool::new(resolver, Arc::new(tls), p.connect_timeout, p.idle_timeout),
            response_header_timeout: p.response_header_timeout,
            idle_timeout: p.idle_timeout,
            max_header_bytes: p.max_header_bytes.get(),
            metrics,
            cache,
            trusted_proxies: p.trusted_proxies.clone(),
        })
    }

    /// The cache, if enabled.
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }

    /// Answers `req` for `site`: through the cache when it is enabled, else straight
    /// from the origin. `host` is the request's host as [`crate::sites::normalize`]
    /// makes it (no port, no trailing dot, lowercase): the one host both the cache
    /// key and the origin see.
    ///
    /// The request is first rewritten into what goes upstream (hop-by-hop fields
    /// removed, forwarding fields the edge's own, `Host` = `host`), so that the cache
    /// keys and varies on exactly the header fields the origin answers.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        host: &str,
        site: &Arc<Site>,
        ctx: &ClientCtx,
    ) -> Response<ProxyBody> {
        let req = match self.upstream_request(req.map(BodyExt::boxed_unsync), host, ctx) {
            Ok(req) => req,
            Err(e) => return self.error_response(&e, site, ctx),
        };
        match &self.cache {
            Some(cache) => crate::cache::flow::handle(self, cache, req, host, site, ctx).await,
            None => self.forward(req, site, ctx).await,
        }
    }

    /// The client's request as it goes to the origin: header fields rewritten by
    /// [`headers::prepare_request`], the target in origin-form and `Host: host`.
    fn upstream_request(
        &self,
        req: Request<ProxyBody>,
        host: &str,
        ctx: &ClientCtx,
    ) -> Result<Request<ProxyBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let trusted = self
            .trusted_proxies
            .iter()
            .any(|n| n.contains(ctx.client_addr.ip()));
        headers::prepare_request(&mut parts.headers, parts.version, ctx, host, trusted);
        let host = HeaderValue::from_str(host).map_err(|_| ProxyError::BadRequest("host"))?;
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

    /// Sends `req` to `site`'s origin and returns its response (streaming), or a short
    /// `502`/`504`/`400` answer when that fails. Records [`Metrics::origin`].
    pub async fn forward(
        &self,
        req: Request<ProxyBody>,
        site: &Site,
        ctx: &ClientCtx,
    ) -> Response<ProxyBody> {
        match self.fetch(req, site).await {
            Ok(response) => response,
            Err(e) => self.error_response(&e, site, ctx),
        }
    }

    /// Sends `req` to `site`'s origin: its response (streaming) or why it failed.
    /// Records [`Metrics::origin`]; the response carries the origin time.
    pub async fn fetch(
        &self,
        req: Request<ProxyBody>,
        site: &Site,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let started = Instant::now();
        let result = self.exchange(req, site).await;
        let took = started.elapsed();
        match result {
            Ok(mut response) => {
                self.metrics.origin("ok", took);
                response.extensions_mut().insert(OriginTime(took));
                Ok(response)
            }
            Err(e) => {
                if !matches!(e, ProxyError::BadRequest(_)) {
                    self.metrics.origin(e.metric_result(), took);
                }
                Err(e)
            }
        }
    }

    /// The short answer to the client for an origin failure, logged.
    pub fn error_response(
        &self,
        e: &ProxyError,
        site: &Site,
        ctx: &ClientCtx,
    ) -> Response<ProxyBody> {
        tracing::warn!(site = site.name(), client = %ctx.client_addr.ip(), error = %e, "origin request failed");
        let (status, text) = e.client_answer();
        text_response(status, text)
    }

    /// Sends `req`, already rewritten by [`Proxy::upstream_request`], to the origin.
    async fn exchange(
        &self,
        req: Request<ProxyBody>,
        site: &Site,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let origin = Origin::from_uri(&site.origin).ok_or(ProxyError::Config(
            "site origin is not an http(s) URL".into(),
        ))?;
        let client_authority = request_authority(&req);
        let (parts, body) = req.into_parts();
        if parts.method == http::Method::CONNECT {
            return Err(ProxyError::BadRequest("CONNECT is not proxied"));
        }
        let path = target_path(site.origin.path(), parts.uri.path_and_query())
            .ok_or(ProxyError::BadRequest("request target is not a path"))?;
        let authority = match &client_authority {
            Some(a) => a.clone(),
            None => origin
                .authority
                .parse::<Authority>()
                .map_err(|_| ProxyError::BadRequest("origin authority"))?,
        };
        let mut upstream = Request::from_parts(parts, body);

        let mut conn = self.pool.get(&origin).await?;
        let response = loop {
            set_target(
                &mut upstream,
                conn.sender.is_h2(),
                &origin,
                &path,
                &authority,
            )?;
            let sent = conn.sender.send(upstream);
            match tokio::time::timeout(self.response_header_timeout, sent).await {
                Err(_) => {
                    return Err(ProxyError::ResponseTimeout {
                        origin: origin.key,
                        timeout: self.response_header_timeout,
                    })
                }
                Ok(Ok(response)) => break response,
                Ok(Err(mut e)) => match e.take_message() {
                    // A pooled connection the origin closed meanwhile: the request was
                    // not written, so it goes once more on a fresh connection.
                    Some(req) if conn.reused => {
                        tracing::debug!(origin = %origin.key, error = %e.error(), "pooled origin connection unusable; reconnecting");
                        upstream = req;
                        conn = self.pool.connect(&origin).await?;
                    }
                    _ => {
                        return Err(ProxyError::Http {
                            origin: origin.key,
                            source: e.into_error(),
                        })
                    }
                },
            }
        };
        self.pool.release(&origin, conn.sender);

        let (mut parts, body) = response.into_parts();
        headers::prepare_response(&mut parts.headers, parts.version);
        // The client side writes its own protocol version.
        parts.version = Version::HTTP_11;
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }
}

/// The authority the client asked for: the request URI's (HTTP/2, or an absolute-form
/// HTTP/1.1 target), else the `Host` header; `None` when absent or not a valid
/// `host[:port]` (user info is refused).
pub(crate) fn request_authority<B>(req: &Request<B>) -> Option<Authority> {
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => Authority::try_from(req.headers().get(header::HOST)?.as_bytes()).ok()?,
    };
    (!authority.as_str().contains('@')).then_some(authority)
}

/// The origin's path prefix (if not `/`) followed by the client's path and query.
fn target_path(prefix: &str, client: Option<&PathAndQuery>) -> Option<PathAndQuery> {
    let client = client.map_or("/", PathAndQuery::as_str);
    if !client.starts_with('/') {
        return None;
    }
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return client.parse().ok();
    }
    format!("{prefix}{client}").parse().ok()
}

/// Sets the request target and `Host` for the connection's protocol: origin-form and a
/// `Host` header on HTTP/1.1, an absolute URI (`:authority`) and no `Host` on HTTP/2.
fn set_target(
    req: &mut Request<ProxyBody>,
    h2: bool,
    origin: &Origin,
    path: &PathAndQuery,
    authority: &Authority,
) -> Result<(), ProxyError> {
    if h2 {
        let scheme = if origin.key.starts_with("https:") {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        *req.uri_mut() = Uri::builder()
            .scheme(scheme)
            .authority(authority.clone())
            .path_and_query(path.clone())
            .build()
            .map_err(|_| ProxyError::BadRequest("request target"))?;
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
    } else {
        *req.uri_mut() = Uri::from(path.clone());
        *req.version_mut() = Version::HTTP_11;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ProxyError::BadRequest("host"))?;
        req.headers_mut().insert(header::HOST, host);
    }
    Ok(())
}

/// A short `text/plain` answer made by the edge itself.
pub(crate) fn text_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Trust for `https` origins: the system's roots plus `origin_ca` (PEM), offering
/// ALPN h2 and http/1.1.
fn origin_tls_config(origin_ca: Option<&Path>) -> Result<rustls::ClientConfig, ProxyError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    if let Some(first) = native.errors.first() {
        tracing::warn!(errors = native.errors.len(), first = %first, "some system CA certificates could not be loaded");
    }
    let (_added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "system CA certificates rustls cannot use");
    }
    if let Some(path) = origin_ca {
        let config_error = |e: &dyn std::fmt::Display| {
            ProxyError::Config(format!("origin_ca {}: {e}", path.display()))
        };
        let mut added = 0usize;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| config_error(&e))? {
            roots
                .add(cert.map_err(|e| config_error(&e))?)
                .map_err(|e| config_error(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(config_error(&"no certificate in file"));
        }
    }
    if roots.is_empty() {
        tracing::warn!("no CA certificates for origins: https origins will fail");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Config(format!("origin TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}
