//! What the layers of a request's way share: the body type, the client connection's
//! context, the edge's own short answers, and the origin-fetch interface ([`Fetch`])
//! through which the cache reaches the origin client without knowing it.
//!
//! A request flows one way: [`crate::serve`] (client connection, TLS/HTTP front) →
//! [`crate::cache`] → [`crate::upstream`] (origin client). Each layer imports only the
//! ones below it and this module.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::sites::Site;

/// Body of requests and responses on their way through the edge: streamed, never
/// buffered whole.
pub type EdgeBody = UnsyncBoxBody<Bytes, BodyError>;

/// Why a body stopped before its end: the peer's transfer failed (hyper), or a stored
/// body could not be read back (the disk tier). The connection carrying it is cut, so
/// that the client sees a truncated transfer, never a short body taken for whole.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// What the edge knows about the client connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct ClientCtx {
    /// The client's address.
    pub client_addr: SocketAddr,
    /// `https` or `http`: the listener the client used.
    pub scheme: &'static str,
    /// The edge address the client connected to.
    pub local_addr: SocketAddr,
}

/// The origin-fetch interface: sends a request, already in the form it goes upstream
/// (hop-by-hop fields removed, the edge's forwarding fields, `Host` set), to a site's
/// origin and returns its response, streaming.
///
/// [`crate::upstream::OriginClient`] implements it over pooled connections; the cache
/// takes any implementation, so that its flow can be driven in-process by a fake.
pub trait Fetch: Send + Sync + 'static {
    /// `req`'s response from `site`'s origin, or why there is none.
    fn fetch(
        &self,
        req: Request<EdgeBody>,
        site: &Site,
    ) -> impl Future<Output = Result<Response<EdgeBody>, FetchError>> + Send;

    /// `req`'s response from `site`'s origin, or the short answer when there is none
    /// ([`FetchError::response`]).
    fn forward(
        &self,
        req: Request<EdgeBody>,
        site: &Site,
        ctx: &ClientCtx,
    ) -> impl Future<Output = Response<EdgeBody>> + Send {
        async move {
            match self.fetch(req, site).await {
                Ok(response) => response,
                Err(e) => e.response(site, ctx),
            }
        }
    }
}

/// Why a request got no response from its origin. Each variant says on which side it
/// failed and whether sending the request again is safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
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

impl From<crate::dns::DnsError> for FetchError {
    fn from(e: crate::dns::DnsError) -> FetchError {
        FetchError::Dns {
            host: e.name,
            reason: e.reason,
        }
    }
}

impl FetchError {
    /// Whether the request certainly did not reach the origin, so sending it again
    /// (to this or another origin address) is safe.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FetchError::Dns { .. }
                | FetchError::Connect { .. }
                | FetchError::ConnectTimeout { .. }
                | FetchError::Tls { .. }
        )
    }

    /// The `result` label of [`crate::metrics::Metrics::origin`].
    pub(crate) fn metric_result(&self) -> &'static str {
        match self {
            FetchError::Dns { .. } => "dns-error",
            FetchError::Connect { .. }
            | FetchError::ConnectTimeout { .. }
            | FetchError::Tls { .. } => "connect-error",
            FetchError::ResponseTimeout { .. } => "timeout",
            FetchError::Http { .. } | FetchError::BadRequest(_) => "error",
        }
    }

    /// The status the client is told (502, 504 or 400).
    pub fn client_status(&self) -> StatusCode {
        self.client_answer().0
    }

    /// What the client is told: a status and a short text naming the failure class.
    fn client_answer(&self) -> (StatusCode, &'static str) {
        match self {
            FetchError::Dns { .. } => (StatusCode::BAD_GATEWAY, "origin host not found\n"),
            FetchError::Connect { .. } => (StatusCode::BAD_GATEWAY, "origin unreachable\n"),
            FetchError::ConnectTimeout { .. } => {
                (StatusCode::BAD_GATEWAY, "origin connection timed out\n")
            }
            FetchError::Tls { .. } => (StatusCode::BAD_GATEWAY, "origin TLS handshake failed\n"),
            FetchError::Http { .. } => (StatusCode::BAD_GATEWAY, "origin connection failed\n"),
            FetchError::ResponseTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "origin response timed out\n")
            }
            FetchError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad request\n"),
        }
    }

    /// The short answer to the client (`502`/`504`/`400`), the details logged: they
    /// never go on the wire.
    pub fn response(&self, site: &Site, ctx: &ClientCtx) -> Response<EdgeBody> {
        tracing::warn!(site = site.name(), client = %ctx.client_addr.ip(), error = %self, "origin request failed");
        let (status, text) = self.client_answer();
        text_response(status, text)
    }
}

/// Time from the start of an origin fetch to the origin's response headers (or the
/// failure), left in the response's extensions for the access log.
#[derive(Clone, Copy, Debug)]
pub struct OriginTime(pub Duration);

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

/// A short `text/plain` answer made by the edge itself.
pub fn text_response(status: StatusCode, text: &'static str) -> Response<EdgeBody> {
    let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An empty body.
pub fn empty() -> EdgeBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body of `b`, in one piece.
pub fn full(b: Bytes) -> EdgeBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}
