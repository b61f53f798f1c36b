//! Key generation and certificate profiles for the loopback PKI.
//!
//! Owns the shape of everything `init` issues: the three CAs, the site leaves the key
//! server holds keys for, the key server's TLS certificate and the edge's client
//! certificate. Subject key identifiers use RFC 5280 method 1 (SHA-1 of the public key
//! bits), the same [`Ski`] the Keyless protocol names keys by, so the SKI extension of a
//! site certificate is exactly what an edge sends to the key server.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, Context, Result};
use keyless_shared::Ski;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

/// CA certificates live ten years: they are offline material for a loopback deployment.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Site and key-server certificates: the usual 90 days of an ACME-issued certificate.
const SERVER_VALIDITY: Duration = Duration::days(90);
/// Edge client certificates are short-lived; edges are re-enrolled, not trusted forever.
const CLIENT_VALIDITY: Duration = Duration::days(30);
/// Backdating absorbs clock skew between the machine that issues and the one that verifies.
const BACKDATE: Duration = Duration::hours(1);
/// RSA modulus size for the RSA site key.
const RSA_BITS: u32 = 2048;

/// Public key algorithm of a generated site key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyAlg {
    EcdsaP256,
    Rsa2048,
}

impl KeyAlg {
    /// The suffix in `<domain>-<suffix>.key`; the key server's file naming depends on it.
    pub(crate) fn file_suffix(self) -> &'static str {
        match self {
            KeyAlg::EcdsaP256 => "ecdsa",
            KeyAlg::Rsa2048 => "rsa",
        }
    }
}

/// A freshly generated key pair that certificates are issued for.
pub(crate) struct SubjectKey {
    /// PKCS#8 PEM of the private key; wiped from memory on drop.
    private_pem: Zeroizing<String>,
    public: SubjectPublicKeyInfo,
    spki_der: Vec<u8>,
}

impl SubjectKey {
    /// Generates a key of the given algorithm.
    pub(crate) fn generate(alg: KeyAlg) -> Result<SubjectKey> {
        match alg {
            KeyAlg::EcdsaP256 => {
                let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                    .context("generating an ECDSA P-256 key")?;
                SubjectKey::from_key_pair(&pair)
            }
            KeyAlg::Rsa2048 => {
                // rcgen's ring backend cannot generate RSA keys; OpenSSL can.
                let rsa = Rsa::generate(RSA_BITS).context("generating an RSA-2048 key")?;
                let pkey = PKey::from_rsa(rsa).context("wrapping the RSA key")?;
                let pem = Zeroizing::new(
                    pkey.private_key_to_pem_pkcs8()
                        .context("encoding the RSA key as PKCS#8")?,
                );
                let private_pem = Zeroizing::new(
                    String::from_utf8(pem.to_vec()).context("OpenSSL wrote a non-UTF-8 PEM")?,
                );
                let spki_der = pkey
                    .public_key_to_der()
                    .context("encoding the RSA public key")?;
                SubjectKey::new(private_pem, spki_der)
            }
        }
    }

    fn from_key_pair(pair: &KeyPair) -> Result<SubjectKey> {
        SubjectKey::new(
            Zeroizing::new(pair.serialize_pem()),
            pair.subject_public_key_info(),
        )
    }

    fn new(private_pem: Zeroizing<String>, spki_der: Vec<u8>) -> Result<SubjectKey> {
        let public = SubjectPublicKeyInfo::from_der(&spki_der).context("unusable public key")?;
        Ok(SubjectKey {
            private_pem,
            public,
            spki_der,
        })
    }

    /// PKCS#8 PEM of the private key.
    pub(crate) fn private_pem(&self) -> &str {
        &self.private_pem
    }

    /// DER `SubjectPublicKeyInfo`.
    pub(crate) fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }
}

/// An issued certificate.
pub(crate) struct IssuedCert {
    pub(crate) pem: String,
}

impl From<rcgen::Certificate> for IssuedCert {
    fn from(cert: rcgen::Certificate) -> IssuedCert {
        IssuedCert { pem: cert.pem() }
    }
}

/// A self-signed CA with the key that signs for it.
pub(crate) struct Ca {
    /// PKCS#8 PEM of the CA key; wiped from memory on drop.
    pub(crate) key_pem: Zeroizing<String>,
    pub(crate) cert: IssuedCert,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Generates an ECDSA P-256 key and a self-signed CA certificate named `common_name`.
    pub(crate) fn generate(common_name: &str) -> Result<Ca> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .with_context(|| format!("generating the key of {common_name}"))?;
        let mut params = base_params(common_name, CA_VALIDITY, &key.subject_public_key_info())?;
        // Path length 0: these CAs sign leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params
            .self_signed(&key)
            .with_context(|| format!("self-signing {common_name}"))?;
        Ok(Ca {
            key_pem: Zeroizing::new(key.serialize_pem()),
            cert: cert.into(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Issues a TLS server certificate for a site: CN `domain`, SANs `domain` and
    /// `*.domain`.
    pub(crate) fn issue_site(
        &self,
        domain: &str,
        key: &SubjectKey,
        alg: KeyAlg,
    ) -> Result<IssuedCert> {
        let mut params = leaf_params(domain, SERVER_VALIDITY, key)?;
        params.subject_alt_names = vec![dns_san(domain)?, dns_san(&format!("*.{domain}"))?];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = match alg {
            KeyAlg::EcdsaP256 => vec![KeyUsagePurpose::DigitalSignature],
            // The protocol offers RSA decryption (TLS 1.2 RSA key exchange) as well.
            KeyAlg::Rsa2048 => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
        };
        self.sign(&params, key, domain)
    }

    /// Issues the key server's TLS certificate: valid for `localhost`, 127.0.0.1 and ::1.
    pub(crate) fn issue_keyserver(&self, key: &SubjectKey) -> Result<IssuedCert> {
        let mut params = leaf_params("localhost", SERVER_VALIDITY, key)?;
        params.subject_alt_names = vec![
            dns_san("localhost")?,
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(&params, key, "the key server")
    }

    /// Issues an edge's TLS client certificate: CN and DNS SAN `edge_name`.
    pub(crate) fn issue_edge(&self, edge_name: &str, key: &SubjectKey) -> Result<IssuedCert> {
        let mut params = leaf_params(edge_name, CLIENT_VALIDITY, key)?;
        params.subject_alt_names = vec![dns_san(edge_name)?];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(&params, key, edge_name)
    }

    fn sign(&self, params: &CertificateParams, key: &SubjectKey, what: &str) -> Result<IssuedCert> {
        let cert = params
            .signed_by(&key.public, &self.issuer)
            .with_context(|| format!("issuing the certificate of {what}"))?;
        Ok(cert.into())
    }
}

/// Parameters every certificate shares: CN, validity from an hour ago, random serial and
/// a method-1 SKI.
fn base_params(
    common_name: &str,
    valid_for: Duration,
    spki_der: &[u8],
) -> Result<CertificateParams> {
    let now = OffsetDateTime::now_utc();
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, common_name);
    let ski = Ski::from_spki_der(spki_der).context("unparsable public key")?;

    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name;
    params.not_before = now - BACKDATE;
    params.not_after = now + valid_for;
    params.serial_number = Some(random_serial()?);
    params.key_identifier_method = KeyIdMethod::PreSpecified(ski.0.to_vec());
    Ok(params)
}

fn leaf_params(
    common_name: &str,
    valid_for: Duration,
    key: &SubjectKey,
) -> Result<CertificateParams> {
    let mut params = base_params(common_name, valid_for, key.spki_der())?;
    // ExplicitNoCa (rather than NoCa) makes rcgen write the SKI extension and a
    // `CA:FALSE` basic constraint.
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn dns_san(name: &str) -> Result<SanType> {
    let ia5 = name
        .to_owned()
        .try_into()
        .with_context(|| format!("{name:?} is not a valid DNS name"))?;
    Ok(SanType::DnsName(ia5))
}

/// 128 random bits with the top bit clear, so the DER INTEGER stays positive.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        // `Unspecified` says nothing more (and is no `std::error::Error`): no cause lost.
        .map_err(|_| anyhow!("the system random number generator failed"))?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}
