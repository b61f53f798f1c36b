//! Issuing an edge certificate from a CSR: nothing the CSR asks for is copied but its
//! public key. The group's CA decides the subject (CN = edge id), the SANs (DNS = edge
//! id, URI = the group URI), the usages (clientAuth), the serial (random) and the
//! validity (now − 1 min to now + `cert_lifetime`).

use std::time::Duration;

use ::time::OffsetDateTime;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::prelude::*;

use crate::tls::{group_uri, GroupState};

/// Backdating of `notBefore`, for peers whose clock is a little behind.
pub(crate) const BACKDATE: Duration = Duration::from_secs(60);

/// An issued certificate.
#[derive(Debug)]
pub(crate) struct Issued {
    pub(crate) pem: String,
    /// Serial, hex.
    pub(crate) serial: String,
    /// `notAfter`, seconds since the Unix epoch.
    pub(crate) not_after: u64,
}

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum IssueError {
    #[error("group {0} has no ca_key: it cannot issue certificates")]
    NoCaKey(String),
    #[error("the system random number generator failed")]
    Random,
    #[error("edge id is not a valid DNS name")]
    EdgeId,
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Whether the names a CSR asks for (subject CN, DNS SANs) are all `edge_id`, with the
/// CN present. A CSR that does not parse is not judged here (`bad-csr` follows).
pub(crate) fn csr_names_only(der: &[u8], edge_id: &str) -> bool {
    let Ok((_, csr)) = X509CertificationRequest::from_der(der) else {
        return true;
    };
    let subject = &csr.certification_request_info.subject;
    let cns: Vec<Option<&str>> = subject
        .iter_common_name()
        .map(|cn| cn.as_str().ok())
        .collect();
    if cns.is_empty() || cns.iter().any(|cn| *cn != Some(edge_id)) {
        return false;
    }
    let Some(extensions) = csr.requested_extensions() else {
        return true;
    };
    for ext in extensions {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for gn in &san.general_names {
                if let GeneralName::DNSName(n) = gn {
                    if *n != edge_id {
                        return false;
                    }
                }
            }
        }
    }
    true
}

/// Parses the CSR and verifies its signature with its own key.
pub(crate) fn parse_csr(der: &[u8]) -> Result<CertificateSigningRequestParams, rcgen::Error> {
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
}

/// Issues the certificate of `edge_id` in `group` for the CSR's public key.
pub(crate) fn issue(
    group: &GroupState,
    edge_id: &str,
    csr: &CertificateSigningRequestParams,
) -> Result<Issued, IssueError> {
    let issuer = group
        .issuer
        .as_ref()
        .ok_or_else(|| IssueError::NoCaKey(group.config.name.clone()))?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, edge_id);
    params.distinguished_name = dn;
    let dns = edge_id
        .to_owned()
        .try_into()
        .map_err(|_| IssueError::EdgeId)?;
    let uri = group_uri(&group.config.name, edge_id)
        .try_into()
        .map_err(|_| IssueError::EdgeId)?;
    params.subject_alt_names = vec![SanType::DnsName(dns), SanType::URI(uri)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    let (serial, serial_hex) = random_serial().ok_or(IssueError::Random)?;
    params.serial_number = Some(serial);
    params.not_before = now - BACKDATE;
    params.not_after = now + group.config.cert_lifetime;
    let cert = params.signed_by(&csr.public_key, issuer)?;
    Ok(Issued {
        pem: cert.pem(),
        serial: serial_hex,
        not_after: u64::try_from(params.not_after.unix_timestamp()).unwrap_or(0),
    })
}

/// A random 16-byte certificate serial and its hex; `None` when the system random
/// number generator fails.
pub(crate) fn random_serial() -> Option<(SerialNumber, String)> {
    let mut serial = [0u8; 16];
    SystemRandom::new().fill(&mut serial).ok()?;
    // Top bit clear: the DER INTEGER stays positive at 16 bytes.
    serial[0] &= 0x7f;
    Some((SerialNumber::from_slice(&serial), hex::encode(serial)))
}
