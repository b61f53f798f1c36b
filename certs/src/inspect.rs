//! `keyless-certs inspect`: what a PEM file holds, in the terms keyless uses.
//!
//! For certificates: names, validity, key and the two key identifiers an operator
//! compares across machines, the protocol's SKI and the SPKI SHA-256 pin. For private
//! keys (PKCS#8, SEC1 or PKCS#1): the key and the same identifiers, computed from its
//! public half. Private key material is never printed.

use std::fmt::Write as _;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use keyless_shared::{spki_sha256, Ski};
use openssl::ec::EcKey;
use openssl::nid::Nid;
use openssl::pkey::{HasPublic, Id, PKey, PKeyRef};
use openssl::rsa::Rsa;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;
use zeroize::Zeroizing;

/// Prints a description of every certificate and key in the PEM file at `path`.
pub(crate) fn run(path: &Path, out: &mut impl Write) -> Result<()> {
    // The file may hold a private key: wipe our copy when done.
    let data =
        Zeroizing::new(fs::read(path).with_context(|| format!("cannot read {}", path.display()))?);
    let text = describe_pem(
        &data,
        &path.display().to_string(),
        OffsetDateTime::now_utc(),
    )?;
    out.write_all(text.as_bytes())
        .context("writing the description")
}

/// Describes every PEM block of `data`; `name` is the file name used in messages.
pub(crate) fn describe_pem(data: &[u8], name: &str, now: OffsetDateTime) -> Result<String> {
    let mut text = String::new();
    let mut blocks = 0usize;
    for (i, block) in Pem::iter_from_buffer(data).enumerate() {
        let n = i + 1;
        let block = block.with_context(|| format!("{name}: PEM block {n} is malformed"))?;
        let contents = Zeroizing::new(block.contents);
        blocks += 1;
        if !text.is_empty() {
            text.push('\n');
        }
        let heading = format!("{name} #{n}");
        let described = match block.label.as_str() {
            "CERTIFICATE" => describe_cert(&contents, &heading, now, &mut text),
            "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY" => {
                describe_private_key(&block.label, &contents, &heading, &mut text)
            }
            "PUBLIC KEY" => describe_public_key(&contents, &heading, &mut text),
            "ENCRYPTED PRIVATE KEY" => {
                line(
                    &mut text,
                    &format!("{heading}: encrypted private key (not decrypted)"),
                );
                Ok(())
            }
            other => {
                line(&mut text, &format!("{heading}: {other} (skipped)"));
                Ok(())
            }
        };
        described.with_context(|| format!("{name}: PEM block {n} ({})", block.label))?;
    }
    if blocks == 0 {
        bail!("{name} is not a PEM file: it has no -----BEGIN ...----- block");
    }
    Ok(text)
}

fn describe_cert(der: &[u8], heading: &str, now: OffsetDateTime, text: &mut String) -> Result<()> {
    let (_, cert) = X509Certificate::from_der(der).context("not a valid X.509 certificate")?;
    line(text, &format!("{heading}: certificate"));
    field(text, "subject", &cert.subject().to_string());
    field(text, "SANs", &sans(&cert)?);
    field(text, "issuer", &cert.issuer().to_string());
    field(text, "serial", &hex::encode(cert.raw_serial()));

    let not_before = cert.validity().not_before.to_datetime();
    let not_after = cert.validity().not_after.to_datetime();
    field(text, "not before", &rfc3339(not_before));
    field(
        text,
        "not after",
        &format!(
            "{} ({})",
            rfc3339(not_after),
            validity_status(not_before, not_after, now)
        ),
    );

    let ca = cert
        .basic_constraints()
        .context("bad basic constraints")?
        .is_some_and(|bc| bc.value.ca);
    field(text, "CA", if ca { "yes" } else { "no" });
    if let Some(ku) = cert.key_usage().context("bad key usage")? {
        field(text, "key usage", &ku.value.to_string());
    }
    if let Some(eku) = cert
        .extended_key_usage()
        .context("bad extended key usage")?
    {
        let e = eku.value;
        let mut names: Vec<String> = [
            (e.server_auth, "serverAuth"),
            (e.client_auth, "clientAuth"),
            (e.code_signing, "codeSigning"),
            (e.email_protection, "emailProtection"),
            (e.time_stamping, "timeStamping"),
            (e.ocsp_signing, "OCSPSigning"),
            (e.any, "any"),
        ]
        .into_iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| name.to_owned())
        .collect();
        names.extend(e.other.iter().map(|oid| oid.to_id_string()));
        field(text, "ext key usage", &names.join(", "));
    }

    let spki_der = cert.public_key().raw;
    field(text, "key", &public_key_type_of_spki(spki_der));
    let ski = key_ids(spki_der, text)?;
    let ext_ski = cert
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
            _ => None,
        });
    match ext_ski {
        Some(ext) if ext != ski.0.as_slice() => field(
            text,
            "SKI extension",
            &format!(
                "{} (differs from the key's SKI, which keyless uses)",
                hex::encode(ext)
            ),
        ),
        Some(_) => {}
        None => field(text, "SKI extension", "none"),
    }
    Ok(())
}

fn describe_private_key(label: &str, der: &[u8], heading: &str, text: &mut String) -> Result<()> {
    let (format, pkey) = match label {
        "EC PRIVATE KEY" => (
            "SEC1",
            EcKey::private_key_from_der(der)
                .and_then(PKey::from_ec_key)
                .context("not a valid SEC1 EC private key")?,
        ),
        "RSA PRIVATE KEY" => (
            "PKCS#1",
            Rsa::private_key_from_der(der)
                .and_then(PKey::from_rsa)
                .context("not a valid PKCS#1 RSA private key")?,
        ),
        _ => (
            "PKCS#8",
            PKey::private_key_from_pkcs8(der).context("not a valid PKCS#8 private key")?,
        ),
    };
    line(text, &format!("{heading}: private key ({format})"));
    field(text, "key", &key_type(&pkey));
    let spki_der = pkey
        .public_key_to_der()
        .context("cannot derive the public key")?;
    key_ids(&spki_der, text)?;
    Ok(())
}

fn describe_public_key(der: &[u8], heading: &str, text: &mut String) -> Result<()> {
    line(text, &format!("{heading}: public key"));
    field(text, "key", &public_key_type_of_spki(der));
    key_ids(der, text)?;
    Ok(())
}

/// Prints the SKI and SPKI SHA-256 of a DER `SubjectPublicKeyInfo`; returns the SKI.
fn key_ids(spki_der: &[u8], text: &mut String) -> Result<Ski> {
    let ski = Ski::from_spki_der(spki_der).context("unparsable public key")?;
    field(text, "SKI", &ski.to_string());
    field(text, "SPKI SHA-256", &hex::encode(spki_sha256(spki_der)));
    Ok(ski)
}

fn public_key_type_of_spki(spki_der: &[u8]) -> String {
    match PKey::public_key_from_der(spki_der) {
        Ok(pkey) => key_type(&pkey),
        // OpenSSL does not know every algorithm; name it by OID instead of failing.
        Err(_) => match x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der) {
            Ok((_, spki)) => format!("unknown ({})", spki.algorithm.algorithm.to_id_string()),
            Err(_) => "unknown".to_owned(),
        },
    }
}

/// "ECDSA P-256", "RSA 2048", "Ed25519", ...
fn key_type<T: HasPublic>(pkey: &PKeyRef<T>) -> String {
    match pkey.id() {
        Id::RSA => format!("RSA {}", pkey.bits()),
        Id::EC => {
            let curve = pkey
                .ec_key()
                .ok()
                .and_then(|ec| ec.group().curve_name())
                .map(|nid| match nid {
                    Nid::X9_62_PRIME256V1 => "P-256".to_owned(),
                    Nid::SECP384R1 => "P-384".to_owned(),
                    Nid::SECP521R1 => "P-521".to_owned(),
                    other => other.short_name().unwrap_or("unnamed curve").to_owned(),
                })
                .unwrap_or_else(|| format!("{}-bit explicit curve", pkey.bits()));
            format!("ECDSA {curve}")
        }
        Id::ED25519 => "Ed25519".to_owned(),
        Id::ED448 => "Ed448".to_owned(),
        Id::DSA => format!("DSA {}", pkey.bits()),
        other => format!(
            "unknown (OpenSSL id {}, {} bits)",
            other.as_raw(),
            pkey.bits()
        ),
    }
}

fn sans(cert: &X509Certificate<'_>) -> Result<String> {
    let Some(san) = cert
        .subject_alternative_name()
        .context("bad subject alternative name")?
    else {
        return Ok("none".to_owned());
    };
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress(bytes) => match ip_from_bytes(bytes) {
                Some(ip) => format!("IP:{ip}"),
                None => format!("IP:<{} bytes>", bytes.len()),
            },
            GeneralName::RFC822Name(e) => format!("email:{e}"),
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DirectoryName(dn) => format!("DirName:{dn}"),
            other => format!("{other:?}"),
        })
        .collect();
    Ok(names.join(", "))
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
}

/// "valid for N days", "expired N days ago" or "not yet valid".
pub(crate) fn validity_status(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> String {
    if now < not_before {
        format!(
            "not yet valid: starts in {} days",
            (not_before - now).whole_days()
        )
    } else if now > not_after {
        format!("expired {} days ago", (now - not_after).whole_days())
    } else {
        format!("valid for {} days", (not_after - now).whole_days())
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn line(text: &mut String, s: &str) {
    text.push_str(s);
    text.push('\n');
}

fn field(text: &mut String, name: &str, value: &str) {
    // Writing into a String cannot fail.
    let _ = writeln!(text, "  {:<14} {value}", format!("{name}:"));
}

#[cfg(test)]
#[path = "inspect_tests.rs"]
mod tests;
