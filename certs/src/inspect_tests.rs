use std::fs;

use anyhow::{anyhow, ensure, Result};
use keyless_shared::{spki_sha256, Ski};
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use time::{Duration, OffsetDateTime};

use super::{describe_pem, run, validity_status};
use crate::testutil::{run_init, TempDir};

/// Runs `inspect` on a file as the binary would, returning its output.
fn inspect(path: &std::path::Path) -> Result<String> {
    let mut out = Vec::new();
    run(path, &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// The `name: value` field of the n-th block of inspect output.
fn field<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}:");
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix(prefix.as_str()))
        .map(str::trim)
        .collect()
}

/// SKI and SPKI SHA-256 computed from a private key PEM with OpenSSL.
fn ids_of_key(pem: &[u8]) -> Result<(String, String)> {
    let spki = PKey::private_key_from_pem(pem)?.public_key_to_der()?;
    let ski = Ski::from_spki_der(&spki).map_err(|e| anyhow!("{e}"))?;
    Ok((ski.to_string(), hex::encode(spki_sha256(&spki))))
}

#[test]
fn prints_the_key_identifiers_of_generated_certificates_and_keys() -> Result<()> {
    let dir = TempDir::new("inspect");
    run_init(dir.path(), &["--domain", "example.com"])?;
    let keys = dir.path().join("origin/keys");

    for (alg, key_type) in [("ecdsa", "ECDSA P-256"), ("rsa", "RSA 2048")] {
        let key_path = keys.join(format!("example.com-{alg}.key"));
        let key_pem = fs::read(&key_path)?;
        let (ski, pin) = ids_of_key(&key_pem)?;

        let cert = inspect(&keys.join(format!("example.com-{alg}.crt")))?;
        ensure!(cert.contains(": certificate"), "{cert}");
        assert_eq!(field(&cert, "SKI"), [ski.as_str()], "{cert}");
        assert_eq!(field(&cert, "SPKI SHA-256"), [pin.as_str()]);
        assert_eq!(field(&cert, "key"), [key_type]);
        assert_eq!(field(&cert, "subject"), ["CN=example.com"]);
        assert_eq!(field(&cert, "issuer"), ["CN=keyless site CA"]);
        assert_eq!(field(&cert, "SANs"), ["DNS:example.com, DNS:*.example.com"]);
        assert_eq!(field(&cert, "ext key usage"), ["serverAuth"]);
        ensure!(
            field(&cert, "SKI extension").is_empty(),
            "SKI extension differs: {cert}"
        );
        let not_after = field(&cert, "not after").concat();
        ensure!(not_after.contains("(valid for 89 days)"), "{not_after}");

        let key = inspect(&key_path)?;
        ensure!(key.contains(": private key (PKCS#8)"), "{key}");
        assert_eq!(field(&key, "SKI"), [ski.as_str()]);
        assert_eq!(field(&key, "SPKI SHA-256"), [pin.as_str()]);
        assert_eq!(field(&key, "key"), [key_type]);
        // No line of the key material makes it into the output.
        let key_text = String::from_utf8(key_pem)?;
        for l in key_text.lines().filter(|l| l.len() > 8) {
            ensure!(!key.contains(l), "inspect printed key material");
        }
    }

    let ks = inspect(&dir.path().join("origin/keyserver.crt"))?;
    assert_eq!(field(&ks, "SANs"), ["DNS:localhost, IP:127.0.0.1, IP:::1"]);
    let ca = inspect(&dir.path().join("ca/edge-ca.crt"))?;
    assert_eq!(field(&ca, "CA"), ["yes"]);
    assert_eq!(field(&ca, "subject"), ["CN=keyless edge CA"]);
    Ok(())
}

#[test]
fn reads_every_private_key_format_and_bundles() -> Result<()> {
    let group = EcGroup::from_curve_name(Nid::SECP384R1)?;
    let ec = EcKey::generate(&group)?;
    let sec1 = ec.private_key_to_pem()?;
    let rsa = Rsa::generate(2048)?;
    let pkcs1 = rsa.private_key_to_pem()?;
    let ed = PKey::generate_ed25519()?;
    let ed_pkcs8 = ed.private_key_to_pem_pkcs8()?;

    for (pem, format, key_type) in [
        (&sec1, "SEC1", "ECDSA P-384"),
        (&pkcs1, "PKCS#1", "RSA 2048"),
        (&ed_pkcs8, "PKCS#8", "Ed25519"),
    ] {
        let text = describe_pem(pem, "k.pem", OffsetDateTime::now_utc())?;
        ensure!(
            text.contains(&format!("k.pem #1: private key ({format})")),
            "{text}"
        );
        assert_eq!(field(&text, "key"), [key_type]);
        let (ski, pin) = ids_of_key(pem)?;
        assert_eq!(field(&text, "SKI"), [ski.as_str()]);
        assert_eq!(field(&text, "SPKI SHA-256"), [pin.as_str()]);
    }

    // A chain file: every block is described, in order.
    let dir = TempDir::new("bundle");
    run_init(dir.path(), &["--domain", "example.com"])?;
    let mut bundle = fs::read(dir.path().join("origin/keys/example.com-ecdsa.crt"))?;
    bundle.extend(fs::read(dir.path().join("ca/site-ca.crt"))?);
    bundle.extend(b"-----BEGIN X509 CRL-----\n-----END X509 CRL-----\n");
    let text = describe_pem(&bundle, "chain.pem", OffsetDateTime::now_utc())?;
    assert_eq!(
        field(&text, "subject"),
        ["CN=example.com", "CN=keyless site CA"]
    );
    ensure!(text.contains("chain.pem #3: X509 CRL (skipped)"), "{text}");
    Ok(())
}

#[test]
fn errors_name_the_file() -> Result<()> {
    let dir = TempDir::new("errors");
    fs::create_dir_all(dir.path())?;

    let missing = dir.path().join("missing.pem");
    let err = inspect(&missing)
        .err()
        .ok_or_else(|| anyhow!("missing file accepted"))?;
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("missing.pem") && msg.contains("cannot read"),
        "{msg}"
    );

    let not_pem = dir.path().join("cert.der");
    fs::write(&not_pem, [0x30, 0x82, 0x01, 0x00, 0xff, 0x00])?;
    let msg = format!(
        "{:#}",
        inspect(&not_pem)
            .err()
            .ok_or_else(|| anyhow!("DER accepted"))?
    );
    ensure!(
        msg.contains("cert.der") && msg.contains("not a PEM file"),
        "{msg}"
    );

    let garbage = dir.path().join("bad.pem");
    fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )?;
    let msg = format!(
        "{:#}",
        inspect(&garbage)
            .err()
            .ok_or_else(|| anyhow!("garbage accepted"))?
    );
    ensure!(
        msg.contains("bad.pem") && msg.contains("not a valid X.509"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn validity_status_says_expired_or_days_left() {
    let now = OffsetDateTime::now_utc();
    let day = Duration::days(1);
    assert_eq!(
        validity_status(now - 10 * day, now + 5 * day + Duration::hours(1), now),
        "valid for 5 days"
    );
    assert_eq!(
        validity_status(now - 10 * day, now - 3 * day, now),
        "expired 3 days ago"
    );
    assert_eq!(
        validity_status(now + 2 * day, now + 9 * day, now),
        "not yet valid: starts in 2 days"
    );
}
