//! The key server's rustls configurations and the edge groups behind them.
//!
//! - The Keyless listener: TLS 1.3 and 1.2, client certificates required. A certificate
//!   with the URI SAN `keyless://group/<G>/edge/<ID>` must chain to group G's CA
//!   (current or previous) and its edge must not be revoked (`revoked.json`); one
//!   without it is of the implicit group and must chain to `[tls] client_ca` (and pass
//!   its CRL, when one is configured). [`EdgeVerifier`] makes that choice inside the
//!   handshake, so a certificate of one group's CA cannot pass as another group's.
//! - The enrollment listener: the same identity, client certificates optional and, when
//!   given, checked against the group CAs only (revocation is answered by the API).
//!
//! Everything is rebuilt on SIGHUP or when a file changes ([`TlsState`]), so a new CRL,
//! CA or revocation applies to new connections at once, and resumption state from
//! before is dropped with the old configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{Issuer, KeyPair, PublicKeyData};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use x509_parser::prelude::*;
use zeroize::Zeroizing;

use crate::config::{Config, GroupConfig, IdentitySource};
use crate::state::{RevokedSet, StateDir};

/// Prefix of the URI SAN that names an edge's group and id.
pub(crate) const GROUP_URI_PREFIX: &str = "keyless://group/";

/// Why the TLS identity or client CA could not be used; each names its file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

/// An edge group as the running key server holds it: its configuration, its CA
/// certificates (current first), the verifier made of them and, when the key server may
/// enroll for it, the CA's signing key.
pub(crate) struct GroupState {
    pub(crate) config: GroupConfig,
    /// The CA certificates, PEM: the `ca_bundle` of enrollment answers and `cacerts`.
    pub(crate) ca_pem: String,
    /// The CA key with the current CA certificate; `None` without `ca_key`.
    pub(crate) issuer: Option<Issuer<'static, KeyPair>>,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// Both listeners' configurations, built together from the same files.
pub(crate) struct TlsState {
    /// The configuration this state was built from: `origin.toml` as loaded at start,
    /// with the `[[group]]`s of the latest SIGHUP. Later rebuilds start from it.
    pub(crate) config: Arc<Config>,
    /// The Keyless listener.
    pub(crate) keyless: Arc<ServerConfig>,
    /// The enrollment listener.
    pub(crate) enroll_config: Arc<ServerConfig>,
    verifier: Arc<EdgeVerifier>,
    pub(crate) groups: BTreeMap<String, Arc<GroupState>>,
    /// Revoked edges, as read with the rest.
    pub(crate) revoked: Arc<RevokedSet>,
    /// CRLs loaded, for the logs.
    pub(crate) crls: usize,
}

impl TlsState {
    /// Whether `chain` (leaf first) is still accepted on the Keyless listener: chains to
    /// its group's CA (or the client CA), is within its validity, is not revoked by the
    /// current CRL and its edge not by `revoked.json`.
    pub(crate) fn still_valid(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return false;
        };
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_ok()
    }

    pub(crate) fn group(&self, name: &str) -> Option<&Arc<GroupState>> {
        self.groups.get(name)
    }
}

/// The group and id an edge certificate names in its URI SAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EdgeName {
    pub(crate) group: String,
    pub(crate) edge_id: String,
}

/// Reads `keyless://group/<G>/edge/<ID>` from a certificate: `Ok(None)` without such
/// a URI SAN (the implicit group), `Err` when it is malformed, given twice, or the
/// certificate does not parse.
pub(crate) fn edge_name(cert: &CertificateDer<'_>) -> Result<Option<EdgeName>, String> {
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let Some(san) = parsed
        .subject_alternative_name()
        .map_err(|e| format!("unparsable subject alternative names: {e}"))?
    else {
        return Ok(None);
    };
    let mut found = None;
    for gn in &san.value.general_names {
        let GeneralName::URI(uri) = gn else { continue };
        let Some(rest) = uri.strip_prefix(GROUP_URI_PREFIX) else {
            continue;
        };
        if found.is_some() {
            return Err("more than one keyless://group/ URI".into());
        }
        let mut parts = rest.split('/');
        let (Some(group), Some("edge"), Some(edge_id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "malformed group URI {:?}",
                keyless_shared::log_safe(uri)
            ));
        };
        if group.is_empty() || edge_id.is_empty() {
            return Err(format!(
                "malformed group URI {:?}",
                keyless_shared::log_safe(uri)
            ));
        }
        found = Some(EdgeName {
            group: group.to_owned(),
            edge_id: edge_id.to_owned(),
        });
    }
    Ok(found)
}

/// The group URI an issued certificate carries.
pub(crate) fn group_uri(group: &str, edge_id: &str) -> String {
    format!("{GROUP_URI_PREFIX}{group}/edge/{edge_id}")
}

/// A refusal with a message that names the reason (it ends in the handshake log).
fn refused(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        std::io::Error::other(message),
    ))))
}

/// Client certificate verification by group (see the module docs).
#[derive(Debug)]
pub(crate) struct EdgeVerifier {
    /// `[tls] client_ca` (with its CRL): certificates without a group URI.
    implicit: Option<Arc<dyn ClientCertVerifier>>,
    groups: BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    /// Checked on the Keyless listener; `None` on the enrollment listener, whose API
    /// answers a revoked edge itself.
    revoked: Option<Arc<RevokedSet>>,
    mandatory: bool,
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for GroupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupState")
            .field("name", &self.config.name)
            .field("can_issue", &self.issuer.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for EdgeVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let name = edge_name(end_entity).map_err(refused)?;
        let Some(EdgeName { group, edge_id }) = name else {
            let Some(implicit) = &self.implicit else {
                return Err(refused(
                    "certificate names no group (keyless://group/ URI) and no [tls] client_ca is configured".into(),
                ));
            };
            return implicit.verify_client_cert(end_entity, intermediates, now);
        };
        let Some(verifier) = self.groups.get(&group) else {
            return Err(refused(format!(
                "certificate names group {:?}, which is not configured",
                keyless_shared::log_safe(&group)
            )));
        };
        verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| {
                refused(format!(
                    "certificate of edge {:?} names group {group:?} but does not verify against the group's CA: {e}",
                    keyless_shared::log_safe(&edge_id)
                ))
            })?;
        if self
            .revoked
            .as_ref()
            .is_some_and(|r| r.contains(&group, &edge_id))
        {
            return Err(refused(format!(
                "edge {:?} of group {group:?} is revoked (revoked.json)",
                keyless_shared::log_safe(&edge_id)
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
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

fn roots(paths: &[&Path]) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), TlsError> {
    let mut roots = RootCertStore::empty();
    let mut all = Vec::new();
    for path in paths {
        for ca in read_certs(path)? {
            roots
                .add(ca.clone())
                .map_err(|e| file_err(path, format!("unusable CA certificate: {e}")))?;
            all.push(ca);
        }
    }
    Ok((roots, all))
}

/// A CA's signing key, checked against its certificate `ca` (read from `ca_path`);
/// `what` names the CA's owner in the error (`group eu`, `[tls]`).
pub(crate) fn load_issuer(
    what: &str,
    ca_path: &Path,
    key_path: &Path,
    ca: &CertificateDer<'_>,
) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let pem = Zeroizing::new(
        std::fs::read_to_string(key_path)
            .map_err(|e| file_err(key_path, format!("cannot read: {e}")))?,
    );
    let key = KeyPair::from_pem(&pem)
        .map_err(|e| file_err(key_path, format!("no usable PEM private key: {e}")))?;
    let ca_spki = leaf_spki(ca_path, ca)?;
    if key.subject_public_key_info() != ca_spki {
        return Err(file_err(
            key_path,
            format!(
                "{what}: CA key does not match the CA certificate {}",
                ca_path.display()
            ),
        ));
    }
    Issuer::from_ca_cert_der(ca, key)
        .map_err(|e| file_err(ca_path, format!("unusable CA certificate: {e}")))
}

fn group_state(
    group: &GroupConfig,
    provider: &Arc<CryptoProvider>,
) -> Result<GroupState, TlsError> {
    let paths: Vec<&Path> = group.files_certs().collect();
    let (roots, certs) = roots(&paths)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| {
            file_err(
                &group.ca_cert,
                format!("group {}: client verifier: {e}", group.name),
            )
        })?;
    let current = read_certs(&group.ca_cert)?;
    let issuer = match &group.ca_key {
        Some(key) => Some(load_issuer(
            &format!("group {}", group.name),
            &group.ca_cert,
            key,
            &current[0],
        )?),
        None => None,
    };
    let mut ca_pem = String::new();
    for cert in &certs {
        ca_pem.push_str(&pem_cert(cert));
    }
    Ok(GroupState {
        config: group.clone(),
        ca_pem,
        issuer,
        verifier,
    })
}

/// A certificate as PEM.
pub(crate) fn pem_cert(der: &[u8]) -> String {
    let b64 = openssl::base64::encode_block(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Builds both listeners' configurations from the files `config` names, and reads
/// `revoked.json`. Any file that fails fails the whole build, so a reload never
/// half-applies.
/// The key server's certificate chain and key, checked to belong together.
fn own_identity(
    tls: &crate::config::TlsConfig,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = read_certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| file_err(&tls.key, format!("no usable PEM private key: {e}")))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| file_err(&tls.key, format!("unsupported key: {e}")))?;
    let cert_spki = leaf_spki(&tls.cert, &chain[0])?;
    match signing_key.public_key() {
        Some(spki) if spki.as_ref() != cert_spki.as_slice() => Err(file_err(
            &tls.key,
            format!(
                "private key does not match the certificate {}",
                tls.cert.display()
            ),
        )),
        _ => Ok((chain, key)),
    }
}

/// The verifier of `[tls] client_ca` (certificates without a group), with its CRLs,
/// and how many CRLs it holds.
fn implicit_verifier(
    tls: &crate::config::TlsConfig,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<(Option<Arc<dyn ClientCertVerifier>>, usize), TlsError> {
    let Some(client_ca) = &tls.client_ca else {
        return Ok((None, 0));
    };
    let mut crls = 0;
    let (roots, _) = roots(&[client_ca])?;
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if let Some(path) = &tls.client_crl {
        let list = read_crls(path)?;
        crls = list.len();
        // Edge certificates are issued by the edge CA directly; a certificate the
        // CRLs say nothing about is refused (fail closed), not waved through.
        builder = builder.with_crls(list).only_check_end_entity_revocation();
    }
    let verifier = builder.build().map_err(|e| {
        file_err(
            tls.client_crl.as_deref().unwrap_or(client_ca),
            format!("client verifier: {e}"),
        )
    })?;
    Ok((Some(verifier), crls))
}

pub(crate) fn build(config: &Arc<Config>) -> Result<TlsState, TlsError> {
    let tls = &config.tls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = own_identity(tls, &provider)?;
    let (implicit, crls) = implicit_verifier(tls, &provider)?;
    let mut groups = BTreeMap::new();
    for group in &config.groups {
        groups.insert(group.name.clone(), Arc::new(group_state(group, &provider)?));
    }
    let revoked = Arc::new(StateDir::new(&config.state_dir).revoked_set()?);

    let mut hints: Vec<DistinguishedName> = Vec::new();
    let inner = implicit.iter().chain(groups.values().map(|g| &g.verifier));
    for v in inner {
        for h in v.root_hint_subjects() {
            if !hints.iter().any(|x| x.as_ref() == h.as_ref()) {
                hints.push(h.clone());
            }
        }
    }
    let group_verifiers: BTreeMap<String, Arc<dyn ClientCertVerifier>> = groups
        .iter()
        .map(|(name, g)| (name.clone(), g.verifier.clone()))
        .collect();
    let algorithms = provider.signature_verification_algorithms;
    let verifier = Arc::new(EdgeVerifier {
        implicit,
        groups: group_verifiers.clone(),
        revoked: Some(revoked.clone()),
        mandatory: true,
        hints: hints.clone(),
        algorithms,
    });
    let enroll_verifier = Arc::new(EdgeVerifier {
        implicit: None,
        groups: group_verifiers,
        revoked: None,
        mandatory: false,
        hints,
        algorithms,
    });

    let mut keyless = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain.clone(), key.clone_key())?;
    keyless.ignore_client_order = true;
    let mut enroll = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(enroll_verifier)
        .with_single_cert(chain, key)?;
    enroll.ignore_client_order = true;
    enroll.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsState {
        config: config.clone(),
        keyless: Arc::new(keyless),
        enroll_config: Arc::new(enroll),
        verifier,
        groups,
        revoked,
        crls,
    })
}

/// Every file [`build`] reads, for change detection.
pub(crate) fn watched_files(config: &Config) -> Vec<PathBuf> {
    let tls = &config.tls;
    let mut files = vec![tls.cert.clone(), tls.key.clone()];
    files.extend(tls.client_ca.iter().cloned());
    files.extend(tls.client_crl.iter().cloned());
    for g in &config.groups {
        files.extend(g.files().map(Path::to_owned));
    }
    files.push(StateDir::new(&config.state_dir).path(crate::state::REVOKED_FILE));
    files
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, SanType, PKCS_ECDSA_P256_SHA256};

    fn cert_with_uris(uris: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(vec!["edge-1".to_owned()]).expect("params");
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("IA5")));
        }
        params.self_signed(&key).expect("cert").der().clone()
    }

    #[test]
    fn group_uris_name_the_group_and_the_edge() {
        let name = edge_name(&cert_with_uris(&[
            "https://example.com/",
            &group_uri("eu", "edge-1"),
        ]))
        .expect("parses");
        assert_eq!(
            name,
            Some(EdgeName {
                group: "eu".into(),
                edge_id: "edge-1".into()
            })
        );
        assert_eq!(edge_name(&cert_with_uris(&[])).expect("parses"), None);
        assert_eq!(
            edge_name(&cert_with_uris(&["https://x/"])).expect("parses"),
            None
        );
        for bad in [
            &["keyless://group/eu"][..],
            &["keyless://group/eu/edge/"],
            &["keyless://group//edge/e"],
            &["keyless://group/eu/node/e"],
            &["keyless://group/eu/edge/e/more"],
            &["keyless://group/eu/edge/a", "keyless://group/us/edge/a"],
        ] {
            assert!(edge_name(&cert_with_uris(bad)).is_err(), "{bad:?}");
        }
        assert!(edge_name(&CertificateDer::from(vec![0x30, 0x00])).is_err());
    }
}
