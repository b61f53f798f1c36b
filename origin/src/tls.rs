//! The key server's rustls configuration: TLS 1.3 and 1.2, client certificates
//! required and verified against the configured edge CA (and its CRL, when one is
//! configured), and the identity an edge certificate names.
//!
//! The whole configuration is rebuilt on SIGHUP ([`TlsState`]), so a new CRL or CA
//! applies to new connections at once, and resumption state from before is dropped
//! with the old configuration.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::prelude::*;

use crate::config::{IdentitySource, TlsConfig};

/// Why the TLS identity or client CA could not be used; each names its file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// Subject public key info of the first certificate, as DER.
fn leaf_spki(path: &Path, cert: &CertificateDer<'_>) -> Result<Vec<u8>, TlsError> {
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|e| file_err(path, format!("not a valid certificate: {e}")))?;
    Ok(parsed.public_key().raw.to_vec())
}

/// A built TLS configuration and the client verifier inside it (kept to re-check the
/// certificates of open connections after a reload).
pub(crate) struct TlsState {
    pub(crate) config: Arc<ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
    /// CRLs loaded, for the logs.
    pub(crate) crls: usize,
}

impl TlsState {
    /// Whether `chain` (leaf first) still verifies: chains to the client CA, is
    /// within its validity and is not revoked by the current CRL.
    pub(crate) fn still_valid(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return false;
        };
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_ok()
    }
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("not valid PEM: {e}")))?;
    if crls.is_empty() {
        return Err(file_err(path, "holds no PEM X509 CRL"));
    }
    Ok(crls)
}

pub(crate) fn server_config(tls: &TlsConfig) -> Result<TlsState, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| file_err(&tls.key, format!("no usable PEM private key: {e}")))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| file_err(&tls.key, format!("unsupported key: {e}")))?;
    let cert_spki = leaf_spki(&tls.cert, &chain[0])?;
    match signing_key.public_key() {
        Some(spki) if spki.as_ref() == cert_spki.as_slice() => {}
        Some(_) => {
            return Err(file_err(
                &tls.key,
                format!(
                    "private key does not match the certificate {}",
                    tls.cert.display()
                ),
            ))
        }
        None => {}
    }

    let mut roots = RootCertStore::empty();
    for ca in read_certs(&tls.client_ca)? {
        roots
            .add(ca)
            .map_err(|e| file_err(&tls.client_ca, format!("unusable CA certificate: {e}")))?;
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let mut crls = 0;
    if let Some(path) = &tls.client_crl {
        let list = read_crls(path)?;
        crls = list.len();
        // Edge certificates are issued by the edge CA directly; a certificate the CRLs
        // say nothing about is refused (fail closed), not waved through.
        builder = builder.with_crls(list).only_check_end_entity_revocation();
    }
    let verifier = builder.build().map_err(|e| {
        file_err(
            tls.client_crl.as_deref().unwrap_or(&tls.client_ca),
            format!("client verifier: {e}"),
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)?;
    config.ignore_client_order = true;
    Ok(TlsState {
        config: Arc::new(config),
        verifier,
        crls,
    })
}

/// The identity of an authenticated client, from the one place `source` names: the
/// first DNS SAN of its certificate, or its subject CN. `None` when the certificate
/// has no such field (the connection is then refused).
pub(crate) fn client_identity(
    cert: Option<&CertificateDer<'_>>,
    source: IdentitySource,
) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert?).ok()?;
    match source {
        IdentitySource::Cn => parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        IdentitySource::San => {
            let san = parsed.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|gn| match gn {
                GeneralName::DNSName(n) => Some((*n).to_owned()),
                _ => None,
            })
        }
    }
    .filter(|id| !id.is_empty())
}
