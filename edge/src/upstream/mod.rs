//! The origin client: sends requests to site origins over pooled connections
//! (HTTP/1.1, or HTTP/2 when an `https` origin negotiates it) and streams the responses
//! back. Origin host names are resolved by [`Resolver`].
//!
//! [`OriginClient`] implements the [`Fetch`] interface the cache uses; it knows nothing
//! of the cache or of client connections. Failures become [`FetchError`]s.

pub(crate) mod headers;
mod pool;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::{DnsConfig, OriginUrl, ProxyConfig};
use crate::exchange::{request_authority, EdgeBody, Fetch, FetchError, OriginTime};
use crate::metrics::Metrics;
use crate::sites::Site;
use pool::Pool;

pub use crate::dns::Resolver;

/// Why the origin client cannot be set up (at start only).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The resolver of `[dns]` cannot be built.
    #[error("DNS resolver: {0}")]
    Resolver(#[from] crate::dns::ResolverError),
    /// `[proxy] origin_ca` is unusable.
    #[error("origin_ca {path}: {reason}")]
    OriginCa {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS client configuration cannot be built.
    #[error("origin TLS: {0}")]
    Tls(#[source] rustls::Error),
}

/// Sends requests to site origins over pooled connections.
pub struct OriginClient {
    pool: Pool,
    response_header_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for OriginClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginClient")
            .field("response_header_timeout", &self.response_header_timeout)
            .finish_non_exhaustive()
    }
}

impl Fetch for OriginClient {
    /// Records [`Metrics::origin`]; the response carries the origin time.
    async fn fetch(
        &self,
        req: Request<EdgeBody>,
        site: &Site,
    ) -> Result<Response<EdgeBody>, FetchError> {
        let started = Instant::now();
        let result = self.exchange(req, &site.origin).await;
        let took = started.elapsed();
        match result {
            Ok(mut response) => {
                self.metrics.origin("ok", took);
                response.extensions_mut().insert(OriginTime(took));
                Ok(response)
            }
            Err(e) => {
                if !matches!(e, FetchError::BadRequest(_)) {
                    self.metrics.origin(e.metric_result(), took);
                }
                Err(e)
            }
        }
    }
}

impl OriginClient {
    /// The origin client of `[proxy]` and `[dns]`: the resolver, and the origin TLS
    /// trust (system roots plus `origin_ca`). Needs no runtime; connections are made on
    /// first use.
    pub fn new(
        proxy: &ProxyConfig,
        dns: &DnsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<OriginClient, SetupError> {
        let resolver = Resolver::new(dns)?;
        let tls = origin_tls_config(proxy.origin_ca.as_deref())?;
        Ok(OriginClient {
            pool: Pool::new(
                resolver,
                Arc::new(tls),
                proxy.connect_timeout,
                proxy.idle_timeout,
            ),
            response_header_timeout: proxy.response_header_timeout,
            metrics,
        })
    }

    /// Sends `req`, in upstream form, to `origin`.
    async fn exchange(
        &self,
        req: Request<EdgeBody>,
        origin: &OriginUrl,
    ) -> Result<Response<EdgeBody>, FetchError> {
        let client_authority = request_authority(&req);
        let (parts, body) = req.into_parts();
        if parts.method == http::Method::CONNECT {
            return Err(FetchError::BadRequest("CONNECT is not proxied"));
        }
        let path = target_path(origin.path(), parts.uri.path_and_query())
            .ok_or(FetchError::BadRequest("request target is not a path"))?;
        let authority = client_authority.unwrap_or_else(|| origin.authority().clone());
        let mut upstream = Request::from_parts(parts, body);

        let mut conn = self.pool.get(origin).await?;
        let response = loop {
            set_target(
                &mut upstream,
                conn.sender.is_h2(),
                origin,
                &path,
                &authority,
            )?;
            let sent = conn.sender.send(upstream);
            match tokio::time::timeout(self.response_header_timeout, sent).await {
                Err(_) => {
                    return Err(FetchError::ResponseTimeout {
                        origin: origin.key().to_owned(),
                        timeout: self.response_header_timeout,
                    })
                }
                Ok(Ok(response)) => break response,
                Ok(Err(mut e)) => match e.take_message() {
                    // A pooled connection the origin closed meanwhile: the request was
                    // not written, so it goes once more on a fresh connection.
                    Some(req) if conn.reused => {
                        tracing::debug!(origin = %origin.key(), error = %e.error(), "pooled origin connection unusable; reconnecting");
                        upstream = req;
                        conn = self.pool.connect(origin).await?;
                    }
                    _ => {
                        return Err(FetchError::Http {
                            origin: origin.key().to_owned(),
                            source: e.into_error(),
                        })
                    }
                },
            }
        };
        self.pool.release(origin, conn.sender);

        let (mut parts, body) = response.into_parts();
        headers::prepare_response(&mut parts.headers, parts.version);
        // The client side writes its own protocol version.
        parts.version = Version::HTTP_11;
        let received = self.metrics.served_bytes("origin");
        let body = body
            .map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    received.inc_by(data.len() as u64);
                }
                frame
            })
            .map_err(crate::exchange::BodyError::from);
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }
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
    req: &mut Request<EdgeBody>,
    h2: bool,
    origin: &OriginUrl,
    path: &PathAndQuery,
    authority: &Authority,
) -> Result<(), FetchError> {
    if h2 {
        let scheme = if origin.is_tls() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        *req.uri_mut() = Uri::builder()
            .scheme(scheme)
            .authority(authority.clone())
            .path_and_query(path.clone())
            .build()
            .map_err(|_| FetchError::BadRequest("request target"))?;
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
    } else {
        *req.uri_mut() = Uri::from(path.clone());
        *req.version_mut() = Version::HTTP_11;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| FetchError::BadRequest("host"))?;
        req.headers_mut().insert(header::HOST, host);
    }
    Ok(())
}

/// Trust for `https` origins: the system's roots plus `origin_ca` (PEM), offering
/// ALPN h2 and http/1.1.
fn origin_tls_config(origin_ca: Option<&Path>) -> Result<rustls::ClientConfig, SetupError> {
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
        let config_error = |e: &dyn std::fmt::Display| SetupError::OriginCa {
            path: path.to_owned(),
            reason: e.to_string(),
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
        .map_err(SetupError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}
