//! The key server's rustls configuration: TLS 1.3 and 1.2, client certificates
//! required and verified against the configured edge CA.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::prelude::*;

use crate::config::TlsConfig;

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

pub(crate) fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
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
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| file_err(&tls.client_ca, e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// The identity of an authenticated client: its certificate's CN, else its first DNS
/// SAN, else `unknown`.
pub(crate) fn client_identity(cert: Option<&CertificateDer<'_>>) -> String {
    let Some(cert) = cert else {
        return "unknown".into();
    };
    let Ok((_, parsed)) = X509Certificate::from_der(cert) else {
        return "unknown".into();
    };
    if let Some(cn) = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return cn.to_owned();
    }
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::DNSName(n) = gn {
                return (*n).to_owned();
            }
        }
    }
    "unknown".into()
}
