//! Self-rotation of the key server's own TLS certificate (`[tls] rotate_every`).
//!
//! On schedule the key server issues itself a new certificate: a new ECDSA P-256 key,
//! the subject and SANs of the current certificate, valid from a minute ago for twice
//! `rotate_every` (so an edge that has not reconnected since the last rotation still
//! sees a valid certificate), signed by the key-server CA of `[tls] ca_cert`/`ca_key`.
//! The key, then the certificate, are written over `[tls] key`/`cert` (temporary file,
//! fsync, rename; the key with mode 0600). The caller then reloads the TLS
//! configuration as for any change on disk (`watch`).
//!
//! The next rotation is due `rotate_every` after the last one (or the start), or
//! earlier when the certificate on disk has less than half of `rotate_every` left:
//! after a long stop, or when a certificate was put in place by hand.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::time::OffsetDateTime;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::*;
use zeroize::Zeroizing;

use crate::config::{RotationConfig, TlsConfig};
use crate::enroll::issue::{random_serial, BACKDATE};
use crate::state::replace_file;
use crate::tls::{load_issuer, read_certs, TlsError};

/// Mode of the key file written; the certificate is public.
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
/// Longest wait before a failed rotation is tried again.
const RETRY: Duration = Duration::from_secs(60);

/// Why the key server could not rotate its certificate. Nothing was written unless the
/// error is a write error (then the key may have been replaced before the certificate:
/// the reload that follows fails and the running identity is kept).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum RotateError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("issuing the key server's new certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("the system random number generator failed")]
    Random,
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> RotateError {
    RotateError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Serial and end of validity of a certificate, for the schedule and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// Serial, hex.
    pub(crate) serial: String,
    pub(crate) not_after: SystemTime,
}

/// A completed rotation: the certificate replaced and its successor.
#[derive(Clone, Debug)]
pub(crate) struct Rotated {
    pub(crate) old: CertInfo,
    pub(crate) new: CertInfo,
}

/// What `--test` and the start report about rotation.
#[derive(Clone, Debug)]
pub(crate) struct Status {
    pub(crate) current: CertInfo,
    /// Whether the current certificate's signature verifies with the CA's key. When not,
    /// the first rotation changes the CA the edges must trust for this key server.
    pub(crate) issued_by_ca: bool,
}

/// The rotation of `[tls] cert`/`key`, as configured.
#[derive(Clone, Debug)]
pub(crate) struct Rotation {
    config: RotationConfig,
    cert: PathBuf,
    key: PathBuf,
}

impl Rotation {
    /// The rotation `[tls]` asks for; `None` without `rotate_every`.
    pub(crate) fn new(tls: &TlsConfig) -> Option<Rotation> {
        Some(Rotation {
            config: tls.rotation()?,
            cert: tls.cert.clone(),
            key: tls.key.clone(),
        })
    }

    pub(crate) fn every(&self) -> Duration {
        self.config.every
    }

    pub(crate) fn ca_cert(&self) -> &Path {
        &self.config.ca_cert
    }

    /// The files a rotation replaces, key first (the order they are written in).
    pub(crate) fn files(&self) -> [&Path; 2] {
        [&self.key, &self.cert]
    }

    /// Loads the CA (its key must match its certificate) and reads the current
    /// certificate: what a rotation needs, checked without writing anything.
    pub(crate) fn check(&self) -> Result<Status, RotateError> {
        let (ca, _) = self.load_ca()?;
        let (der, current) = self.current()?;
        Ok(Status {
            current,
            issued_by_ca: signed_by(&der, &ca),
        })
    }

    /// When the next rotation is due: `rotate_every` after `since` (the last rotation,
    /// or the start), or earlier if then `current` would have less than half of
    /// `rotate_every` left.
    pub(crate) fn due(&self, since: SystemTime, current: &CertInfo) -> SystemTime {
        let every = self.config.every;
        let by_schedule = since.checked_add(every).unwrap_or(since);
        let by_expiry = current
            .not_after
            .checked_sub(every / 2)
            .unwrap_or(UNIX_EPOCH);
        by_schedule.min(by_expiry)
    }

    /// Wait after a failed rotation before the next try.
    pub(crate) fn retry_after(&self) -> Duration {
        self.config.every.min(RETRY)
    }

    /// Serial and end of validity of the certificate now in `[tls] cert`.
    pub(crate) fn current_info(&self) -> Result<CertInfo, RotateError> {
        Ok(self.current()?.1)
    }

    /// Issues the key server a new certificate and writes it with its key over the
    /// `[tls]` files. Blocking: call from a blocking thread in async code.
    pub(crate) fn rotate(&self) -> Result<Rotated, RotateError> {
        let (_, issuer) = self.load_ca()?;
        let (der, old) = self.current()?;
        let (_, current) = X509Certificate::from_der(&der)
            .map_err(|e| file_err(&self.cert, format!("not a valid certificate: {e}")))?;
        let mut params = self.params(&current)?;
        let (serial, serial_hex) = random_serial().ok_or(RotateError::Random)?;
        params.serial_number = Some(serial);
        let now = OffsetDateTime::now_utc();
        let lifetime = self
            .config
            .every
            .checked_mul(2)
            .and_then(|d| ::time::Duration::try_from(d).ok())
            .and_then(|d| now.checked_add(d))
            .ok_or_else(|| file_err(&self.config.ca_cert, "rotate_every is too long"))?;
        params.not_before = now - BACKDATE;
        params.not_after = lifetime;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &issuer)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        // Key first: until the certificate follows, the pair does not match and a
        // rebuild keeps the running identity.
        replace_file(&self.key, key_pem.as_bytes(), KEY_MODE)
            .map_err(|(path, e)| file_err(&path, format!("cannot write: {e}")))?;
        replace_file(&self.cert, cert.pem().as_bytes(), CERT_MODE)
            .map_err(|(path, e)| file_err(&path, format!("cannot write: {e}")))?;
        Ok(Rotated {
            old,
            new: CertInfo {
                serial: serial_hex,
                not_after: system_time(lifetime.unix_timestamp()),
            },
        })
    }

    /// The CA certificate and its signing key, read anew (a CA replaced on disk is used
    /// from the next rotation on).
    fn load_ca(&self) -> Result<(CertificateDer<'static>, Issuer<'static, KeyPair>), RotateError> {
        let certs = read_certs(&self.config.ca_cert)?;
        // `read_certs` refuses a file without a certificate.
        let ca = certs
            .into_iter()
            .next()
            .ok_or_else(|| file_err(&self.config.ca_cert, "holds no PEM certificate"))?;
        let issuer = load_issuer("[tls]", &self.config.ca_cert, &self.config.ca_key, &ca)?;
        Ok((ca, issuer))
    }

    /// The leaf of `[tls] cert`, DER, with its serial and end of validity.
    fn current(&self) -> Result<(CertificateDer<'static>, CertInfo), RotateError> {
        let leaf = read_certs(&self.cert)?
            .into_iter()
            .next()
            .ok_or_else(|| file_err(&self.cert, "holds no PEM certificate"))?;
        let (_, parsed) = X509Certificate::from_der(&leaf)
            .map_err(|e| file_err(&self.cert, format!("not a valid certificate: {e}")))?;
        let info = CertInfo {
            serial: hex::encode(parsed.raw_serial()),
            not_after: system_time(parsed.validity().not_after.timestamp()),
        };
        Ok((leaf, info))
    }

    /// The current certificate's subject, SANs and extended key usages on a new
    /// end-entity certificate.
    fn params(&self, current: &X509Certificate<'_>) -> Result<CertificateParams, RotateError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(current.subject())
            .map_err(|m| file_err(&self.cert, format!("subject: {m}")))?;
        if let Some(san) = current
            .subject_alternative_name()
            .map_err(|e| file_err(&self.cert, format!("subject alternative names: {e}")))?
        {
            for name in &san.value.general_names {
                params.subject_alt_names.push(
                    san_type(name).map_err(|m| {
                        file_err(&self.cert, format!("subject alternative name: {m}"))
                    })?,
                );
            }
        }
        let eku = current.extended_key_usage().ok().flatten().map(|e| e.value);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if eku.is_some_and(|e| e.client_auth) {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

fn system_time(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0))
}

/// Whether the signature of `cert` verifies with the public key of `ca`.
fn signed_by(cert: &[u8], ca: &[u8]) -> bool {
    let (Ok(cert), Ok(ca)) = (
        openssl::x509::X509::from_der(cert),
        openssl::x509::X509::from_der(ca),
    ) else {
        return false;
    };
    ca.public_key()
        .and_then(|key| cert.verify(&key))
        .unwrap_or(false)
}

/// A subject name as rcgen writes it, attribute by attribute with the same string types.
fn subject(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for attr in name.iter_attributes() {
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or("an attribute type that does not fit in 64-bit arcs")?
            .collect();
        let value = attr.attr_value();
        let text = std::str::from_utf8(value.data)
            .map_err(|_| format!("attribute {} is not text", attr.attr_type()))?;
        let value = match value.header.tag() {
            Tag::PrintableString => DnValue::PrintableString(
                text.try_into()
                    .map_err(|_| format!("attribute {} is no PrintableString", attr.attr_type()))?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                text.try_into()
                    .map_err(|_| format!("attribute {} is no IA5String", attr.attr_type()))?,
            ),
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            other => {
                return Err(format!(
                    "attribute {} has a string type ({other:?}) rotation does not copy",
                    attr.attr_type()
                ))
            }
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

/// A subject alternative name as rcgen writes it.
fn san_type(name: &GeneralName<'_>) -> Result<SanType, String> {
    Ok(match name {
        GeneralName::DNSName(n) => SanType::DnsName(
            (*n).try_into()
                .map_err(|_| format!("DNS name {n:?} is not IA5"))?,
        ),
        GeneralName::URI(u) => SanType::URI(
            (*u).try_into()
                .map_err(|_| format!("URI {u:?} is not IA5"))?,
        ),
        GeneralName::RFC822Name(m) => SanType::Rfc822Name(
            (*m).try_into()
                .map_err(|_| format!("e-mail address {m:?} is not IA5"))?,
        ),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(bytes);
                SanType::IpAddress(std::net::IpAddr::from(a))
            }
            16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(bytes);
                SanType::IpAddress(std::net::IpAddr::from(a))
            }
            n => return Err(format!("an IP address of {n} bytes")),
        },
        other => return Err(format!("{other:?} is a kind rotation does not copy")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use rcgen::BasicConstraints;
    use rustls::pki_types::pem::PemObject;

    fn ca(name: &str) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        (params.self_signed(&key).unwrap().pem(), key)
    }

    /// A key-server certificate from `ca`: CN and DNS SAN `localhost`, IP SANs
    /// 127.0.0.1 and ::1, a URI; written with its key into a fresh directory.
    fn setup(name: &str) -> (PathBuf, Rotation, String) {
        let dir =
            std::env::temp_dir().join(format!("keyless-rotate-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (ca_pem, ca_key) = ca("ks CA");
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "localhost");
        dn.push(DnType::OrganizationName, "keyless");
        params.distinguished_name = dn;
        params.subject_alt_names.extend([
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
            SanType::URI("https://ks.example/".try_into().unwrap()),
        ]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("ks.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("ks.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.crt"), &ca_pem).unwrap();
        std::fs::write(dir.join("ca.key"), ca_key_pem).unwrap();
        let rotation = Rotation {
            config: RotationConfig {
                every: Duration::from_secs(3600),
                ca_cert: dir.join("ca.crt"),
                ca_key: dir.join("ca.key"),
            },
            cert: dir.join("ks.crt"),
            key: dir.join("ks.key"),
        };
        (dir, rotation, ca_pem)
    }

    fn parse(path: &Path) -> (Vec<u8>, String) {
        let der = read_certs(path).unwrap().remove(0).to_vec();
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        let names = format!(
            "{} {:?}",
            c.subject(),
            c.subject_alternative_name().unwrap().unwrap().value
        );
        (der, names)
    }

    #[test]
    fn a_rotation_keeps_the_names_and_changes_key_serial_and_validity() {
        let (dir, rotation, ca_pem) = setup("names");
        let status = rotation.check().unwrap();
        assert!(status.issued_by_ca);
        let (old_der, old_names) = parse(&dir.join("ks.crt"));
        let old_key = std::fs::read_to_string(dir.join("ks.key")).unwrap();

        let before = SystemTime::now();
        let rotated = rotation.rotate().unwrap();
        assert_eq!(rotated.old, status.current);
        assert_ne!(rotated.new.serial, rotated.old.serial);
        let (new_der, new_names) = parse(&dir.join("ks.crt"));
        assert_eq!(new_names, old_names);
        assert_ne!(new_der, old_der);
        assert_ne!(
            std::fs::read_to_string(dir.join("ks.key")).unwrap(),
            old_key
        );
        let mode = std::fs::metadata(dir.join("ks.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(rotation.current_info().unwrap(), rotated.new);

        let (_, c) = X509Certificate::from_der(&new_der).unwrap();
        let not_before = system_time(c.validity().not_before.timestamp());
        let not_after = system_time(c.validity().not_after.timestamp());
        let slack = Duration::from_secs(5);
        assert!(not_before + BACKDATE <= before + slack && not_before + BACKDATE + slack >= before);
        let lifetime = not_after.duration_since(not_before).unwrap();
        assert!(lifetime.abs_diff(Duration::from_secs(7200) + BACKDATE) <= slack);
        assert!(!c.is_ca());
        let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
        assert!(signed_by(&new_der, &ca_der));
        // The new certificate is the old one's successor: the next rotation is an
        // hour away.
        let due = rotation.due(before, &rotated.new);
        assert_eq!(due, before + Duration::from_secs(3600));
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
    }

    #[test]
    fn a_certificate_short_of_half_the_period_is_due_now() {
        let (_, rotation, _) = setup("due");
        let now = SystemTime::now();
        let info = |left: u64| CertInfo {
            serial: "01".into(),
            not_after: now + Duration::from_secs(left),
        };
        assert_eq!(
            rotation.due(now, &info(100 * 3600)),
            now + Duration::from_secs(3600)
        );
        assert!(rotation.due(now, &info(1700)) <= now);
        assert_eq!(
            rotation.due(now, &info(2000)),
            now + Duration::from_secs(200)
        );
        assert_eq!(rotation.retry_after(), Duration::from_secs(60));
    }

    #[test]
    fn a_ca_key_of_another_ca_is_refused_and_nothing_is_written() {
        let (dir, rotation, _) = setup("mismatch");
        let (_, other) = ca("other");
        std::fs::write(dir.join("ca.key"), other.serialize_pem()).unwrap();
        let before = std::fs::read(dir.join("ks.crt")).unwrap();
        let err = rotation.check().unwrap_err().to_string();
        assert!(
            err.contains("does not match") && err.contains("ca.key"),
            "{err}"
        );
        assert!(rotation.rotate().is_err());
        assert_eq!(std::fs::read(dir.join("ks.crt")).unwrap(), before);
    }
}
