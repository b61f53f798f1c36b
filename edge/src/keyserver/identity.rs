//! The client settings of `[keyserver]` and, for each group, the edge's side of the
//! mTLS channel: the CA that key-server certificates chain to, the edge's client
//! certificate and key, and the name each server is checked for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{ClientConfig, Endpoint, GroupSpec, RenewalSpec, ServerSource, ServerSpec, Settings};
use crate::config::{DnsConfig, GroupConfig, GroupServers, KeyServerConfig};
use crate::enroll::{Credential, EnrollServer};

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
    /// The client settings of `[keyserver]`: each group's servers and mTLS identity
    /// (read from its files now), timeouts, probes and connections.
    pub fn from_config(
        ks: &KeyServerConfig,
        dns: &DnsConfig,
    ) -> Result<ClientConfig, IdentityError> {
        let settings = Settings {
            connections_per_server: ks.connections.get(),
            request_timeout: ks.timeout,
            connect_timeout: ks.connect_timeout,
            probe_interval: ks.probe_interval,
            probe_max_interval: ks.probe_max_interval,
            down_after: ks.down_after.get(),
            up_after: ks.up_after.get(),
            ..Settings::default()
        };
        let groups = ks
            .groups
            .iter()
            .map(group_spec)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ClientConfig {
            settings,
            groups,
            dns: dns.clone(),
        })
    }

    /// Servers listed statically, over every group (SRV groups count none).
    pub fn static_servers(&self) -> usize {
        self.groups
            .iter()
            .map(|g| match &g.servers {
                ServerSource::Static(list) => list.len(),
                ServerSource::Srv { .. } => 0,
            })
            .sum()
    }
}

fn group_spec(g: &GroupConfig) -> Result<GroupSpec, IdentityError> {
    let servers = match g.source() {
        GroupServers::Static { servers } => ServerSource::Static(
            servers
                .iter()
                .map(|s| {
                    let name = g.server_name.as_deref().unwrap_or(s.addr.host());
                    let server_name = ServerName::try_from(name.to_owned())
                        .map_err(|_| IdentityError::ServerName(name.to_owned()))?;
                    Ok(ServerSpec {
                        endpoint: Endpoint {
                            addr: s.addr.as_str().to_owned(),
                            server_name,
                        },
                        priority: s.priority,
                        weight: s.weight,
                    })
                })
                .collect::<Result<Vec<_>, IdentityError>>()?,
        ),
        GroupServers::Srv { srv } => {
            if let Some(name) = &g.server_name {
                ServerName::try_from(name.clone())
                    .map_err(|_| IdentityError::ServerName(name.clone()))?;
            }
            ServerSource::Srv {
                name: srv.to_owned(),
                server_name: g.server_name.clone(),
            }
        }
    };
    let renewal = match &g.enroll {
        None => None,
        Some(addr) => {
            let name = g.server_name.as_deref().unwrap_or(addr.host());
            Some(RenewalSpec {
                server: EnrollServer {
                    addr: addr.as_str().to_owned(),
                    server_name: ServerName::try_from(name.to_owned())
                        .map_err(|_| IdentityError::ServerName(name.to_owned()))?,
                    ca: g.ca.clone(),
                },
                credential: Credential {
                    cert: g.cert.clone(),
                    key: g.key.clone(),
                },
                group: g.clone(),
            })
        }
    };
    Ok(GroupSpec {
        name: g.name.clone(),
        tls: tls_config(g)?,
        protocol: g.protocol,
        servers,
        renewal,
    })
}

/// The edge's mTLS client configuration towards a group's key servers (TLS 1.3 only).
pub(super) fn tls_config(ks: &GroupConfig) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
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
pub(crate) fn certificates(
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
