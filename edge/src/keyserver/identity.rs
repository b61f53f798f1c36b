//! The edge's side of the mTLS channel to key servers, from `[keyserver]`: the CA that
//! key-server certificates chain to, the edge's client certificate and key, and the
//! name each server is checked for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{ClientConfig, Endpoint};
use crate::config::KeyServerConfig;

/// Why `[keyserver]` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A PEM file cannot be read or parsed.
    #[error("{}: cannot read {what}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// The cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{}: holds no certificate", .0.display())]
    Empty(PathBuf),
    /// The CA certificate is unusable.
    #[error("{}: unusable CA certificate", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// What rustls reported.
        #[source]
        source: rustls::Error,
    },
    /// The edge's certificate and key do not make an identity.
    #[error("{} / {}: unusable edge identity", cert.display(), key.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls reported.
        #[source]
        source: rustls::Error,
    },
    /// A key server's name is not a valid TLS server name.
    #[error("key server name {0:?} is not a valid server name")]
    ServerName(String),
}

impl ClientConfig {
    /// The client settings of `[keyserver]`: endpoints, the mTLS identity (read from
    /// its files now), timeouts and connections.
    pub fn from_config(ks: &KeyServerConfig) -> Result<ClientConfig, IdentityError> {
        let endpoints = ks
            .servers
            .iter()
            .map(|addr| {
                let name = ks.server_name.as_deref().unwrap_or(addr.host());
                let server_name = ServerName::try_from(name.to_owned())
                    .map_err(|_| IdentityError::ServerName(name.to_owned()))?;
                Ok(Endpoint {
                    addr: addr.as_str().to_owned(),
                    server_name,
                })
            })
            .collect::<Result<Vec<_>, IdentityError>>()?;
        let mut config = ClientConfig::new(endpoints, tls_config(ks)?);
        config.connections_per_server = ks.connections.get();
        config.request_timeout = ks.timeout;
        config.connect_timeout = ks.connect_timeout;
        Ok(config)
    }
}

/// The edge's mTLS client configuration towards key servers (TLS 1.3 only).
fn tls_config(ks: &KeyServerConfig) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(&ks.ca, "key-server CA")? {
        roots.add(ca).map_err(|source| IdentityError::Ca {
            path: ks.ca.clone(),
            source,
        })?;
    }
    let chain = certificates(&ks.cert, "edge certificate")?;
    let key = PrivateKeyDer::from_pem_file(&ks.key).map_err(|source| IdentityError::Read {
        path: ks.key.clone(),
        what: "edge key",
        source,
    })?;
    let identity = |source| IdentityError::Identity {
        cert: ks.cert.clone(),
        key: ks.key.clone(),
        source,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(identity)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(identity)?;
    Ok(Arc::new(config))
}

/// The certificates of a PEM file (at least one).
fn certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| IdentityError::Read {
            path: path.to_owned(),
            what,
            source,
        })?;
    if certs.is_empty() {
        return Err(IdentityError::Empty(path.to_owned()));
    }
    Ok(certs)
}
