//! A TLS client that keeps its sessions and offers them again, to whichever edge it
//! connects to next: one [`ResumeClient`] is one returning visitor.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::client::{Resumption, Tls12Resumption};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, RootCertStore, StreamOwned};

use crate::TlsVersion;

/// How the client resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeBy {
    /// Session tickets (TLS 1.3 tickets, or TLS 1.2 tickets with session ids).
    Tickets,
    /// TLS 1.2 session ids only: the client sends no ticket extension.
    SessionId,
}

/// One client with its own session cache.
#[derive(Clone, Debug)]
pub struct ResumeClient {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    host: String,
}

impl ResumeClient {
    /// A client of `site` trusting the PEM CA `ca`, speaking only `version`.
    pub fn new(ca: &Path, site: &str, version: TlsVersion, by: ResumeBy) -> Result<ResumeClient> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match version {
            TlsVersion::Tls12 => &[&rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = Resumption::in_memory_sessions(8).tls12_resumption(match by {
            ResumeBy::Tickets => Tls12Resumption::SessionIdOrTickets,
            ResumeBy::SessionId => Tls12Resumption::SessionIdOnly,
        });
        Ok(ResumeClient {
            config: Arc::new(config),
            name: ServerName::try_from(site.to_owned())?,
            host: site.to_owned(),
        })
    }

    /// Connects to `addr`, offering the session it holds, if any, sends `GET /` and
    /// reads the answer (which also brings TLS 1.3 tickets). Whether the handshake
    /// resumed.
    pub fn visit(&self, addr: SocketAddr) -> Result<bool> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
        let conn = ClientConnection::new(self.config.clone(), self.name.clone())?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .with_context(|| format!("handshake with {addr}"))?;
        }
        let resumed = tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        write!(
            tls,
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.host
        )?;
        let mut answer = Vec::new();
        match tls.read_to_end(&mut answer) {
            Ok(_) => {}
            // Some servers close without close_notify after `Connection: close`.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e).context("reading the answer"),
        }
        anyhow::ensure!(
            answer.starts_with(b"HTTP/1.1 200"),
            "unexpected answer: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
        Ok(resumed)
    }
}
