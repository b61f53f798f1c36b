//! Many TLS handshakes at once against the edge, each timed and classified by how it
//! ended: a hostile or unlucky crowd of clients for overload tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{AlertDescription, RootCertStore};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

/// How one handshake ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeEnd {
    /// It completed.
    Established,
    /// The server sent a fatal alert.
    Alert(AlertDescription),
    /// The server closed the connection without an alert (or reset it).
    Closed,
    /// The TCP connection could not be made.
    ConnectFailed,
    /// Still running when the client gave up (after `give_up`).
    Hung,
    /// Any other failure, as text.
    Other(String),
}

/// One handshake's outcome and how long it took.
#[derive(Clone, Debug)]
pub struct HandshakeOutcome {
    /// How it ended.
    pub end: HandshakeEnd,
    /// From the TCP connection being established (the server's clock starts at
    /// accept) to the end; zero if it could not be connected.
    pub elapsed: Duration,
}

/// Outcomes of a flood, in no particular order.
#[derive(Debug)]
pub struct FloodReport {
    /// One per handshake attempted.
    pub outcomes: Vec<HandshakeOutcome>,
}

impl FloodReport {
    /// How many ended as `end`.
    pub fn count(&self, end: &HandshakeEnd) -> usize {
        self.outcomes.iter().filter(|o| &o.end == end).count()
    }

    /// The longest time any handshake took.
    pub fn slowest(&self) -> Duration {
        self.outcomes
            .iter()
            .map(|o| o.elapsed)
            .max()
            .unwrap_or_default()
    }

    /// A one-line summary: counts per kind of end and the slowest.
    pub fn summary(&self) -> String {
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for o in &self.outcomes {
            let k = format!("{:?}", o.end);
            match kinds.iter_mut().find(|(n, _)| *n == k) {
                Some((_, c)) => *c += 1,
                None => kinds.push((k, 1)),
            }
        }
        format!("{kinds:?}, slowest {:?}", self.slowest())
    }
}

/// Starts `n` TLS 1.3 handshakes with `addr` at once (SNI `host`, chain verified against
/// the PEM CA in `ca`) and waits for all of them, each for at most `give_up`.
pub async fn handshake_flood(
    addr: SocketAddr,
    host: &str,
    ca: &Path,
    n: usize,
    give_up: Duration,
) -> Result<FloodReport> {
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(host.to_owned())?;
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let connector = connector.clone();
        let name = name.clone();
        tasks.spawn(async move {
            // A SYN dropped by a full listen queue is retried after 1 s: not the
            // server's handshake time, so the clock starts once connected.
            let Ok(Ok(tcp)) = tokio::time::timeout(give_up, TcpStream::connect(addr)).await else {
                return HandshakeOutcome {
                    end: HandshakeEnd::ConnectFailed,
                    elapsed: Duration::ZERO,
                };
            };
            let started = Instant::now();
            let end = match tokio::time::timeout(give_up, connector.connect(name, tcp)).await {
                Ok(Ok(_)) => HandshakeEnd::Established,
                Ok(Err(e)) => classify(&e),
                Err(_) => HandshakeEnd::Hung,
            };
            HandshakeOutcome {
                end,
                elapsed: started.elapsed(),
            }
        });
    }
    let mut outcomes = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.context("handshake task")?);
    }
    Ok(FloodReport { outcomes })
}

fn classify(e: &std::io::Error) -> HandshakeEnd {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        if let rustls::Error::AlertReceived(desc) = tls {
            return HandshakeEnd::Alert(*desc);
        }
        return HandshakeEnd::Other(tls.to_string());
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => HandshakeEnd::Closed,
        _ => HandshakeEnd::Other(e.to_string()),
    }
}
