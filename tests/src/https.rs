//! An HTTPS/1.1 keep-alive connection to the edge from inside the test process, for
//! timing requests on one established connection (curl opens a new one per run).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// A response on a [`KeepAliveClient`].
#[derive(Clone, Debug)]
pub struct KeepAliveResponse {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Bytes,
    /// From sending the request to the end of the body.
    pub elapsed: Duration,
}

/// One TLS connection to the edge carrying HTTP/1.1 requests one after another.
#[derive(Debug)]
pub struct KeepAliveClient {
    sender: SendRequest<Empty<Bytes>>,
    host: String,
    connection: JoinHandle<()>,
}

impl KeepAliveClient {
    /// Connects to `addr`, sends SNI `host`, verifies the chain for `host` against the
    /// CA in `ca` (PEM) and offers ALPN `http/1.1`.
    pub async fn connect(addr: SocketAddr, host: &str, ca: &Path) -> Result<KeepAliveClient> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(host.to_owned())?;
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the edge at {addr}"))?;
        tcp.set_nodelay(true)?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with the edge at {addr} for {host}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP/1.1 handshake")?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(KeepAliveClient {
            sender,
            host: host.to_owned(),
            connection,
        })
    }

    /// `GET path` on the connection; the whole body is read.
    pub async fn get(&mut self, path: &str) -> Result<KeepAliveResponse> {
        let started = Instant::now();
        self.sender
            .ready()
            .await
            .context("the edge connection is closed")?;
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, &self.host)
            .body(Empty::new())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the body of GET {path}"))?
            .to_bytes();
        Ok(KeepAliveResponse {
            status,
            body,
            elapsed: started.elapsed(),
        })
    }

    /// Fails unless `GET path` answers `status`.
    pub async fn expect(&mut self, path: &str, status: u16) -> Result<KeepAliveResponse> {
        let response = self.get(path).await?;
        if response.status != status {
            bail!(
                "GET {path}: expected {status}, got {}: {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            );
        }
        Ok(response)
    }
}

impl Drop for KeepAliveClient {
    fn drop(&mut self) {
        self.connection.abort();
    }
}
