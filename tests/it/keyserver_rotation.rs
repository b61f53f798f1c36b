//! The key server's self-rotation of its certificate (`[tls] rotate_every`): new
//! certificates with a new key from the key-server CA, on schedule and at start, written
//! over the `[tls]` files and reloaded without dropping a connection; and the
//! configuration errors `--test` names.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keyless_shared::Opcode;
use keyless_tests::keys::KeyAlg;
use keyless_tests::{check_config, has_field, set_tls, Deployment, KeyClient, KeyServer};
use x509_parser::prelude::*;

use crate::support::{assert_ping, handshake_sign_request, ok_payload, DOMAIN};

/// Longest wait for anything the key server does on its own.
const WAIT: Duration = Duration::from_secs(20);
const ROTATED: &str = "key server certificate rotated";

/// A config variant with rotation every `every` by the key-server CA `keyless-certs
/// init` wrote, files polled every 200 ms.
fn rotating(d: &Deployment, name: &str, every: &str) -> Result<PathBuf> {
    d.write_config_variant(name, |t| {
        t.insert("tls_reload_interval".into(), "200ms".into());
        set_tls(t, "rotate_every", every);
        set_tls(t, "ca_cert", "ca/keyserver-ca.crt");
        set_tls(t, "ca_key", "ca/keyserver-ca.key");
    })
}

/// What a test checks of a key-server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    serial: Vec<u8>,
    spki: Vec<u8>,
    /// Subject and SANs, printed.
    names: String,
    not_before: i64,
    not_after: i64,
}

fn seen(der: &[u8]) -> Result<Seen> {
    let (_, c) = X509Certificate::from_der(der).context("parsing the key-server certificate")?;
    let san = c
        .subject_alternative_name()?
        .map(|s| format!("{:?}", s.value.general_names))
        .unwrap_or_default();
    Ok(Seen {
        serial: c.raw_serial().to_vec(),
        spki: c.public_key().raw.to_vec(),
        names: format!("{} {san}", c.subject()),
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
    })
}

fn pem_leaf(path: &Path) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(der.to_vec())
}

/// Whether `der` is signed by the CA certificate in `ca` (PEM).
fn verifies_against(der: &[u8], ca: &Path) -> Result<bool> {
    let ca = openssl::x509::X509::from_pem(&std::fs::read(ca)?)?;
    let cert = openssl::x509::X509::from_der(der)?;
    let key = ca.public_key()?;
    Ok(cert.verify(&key)?)
}

fn rotations_logged(server: &KeyServer) -> usize {
    server.log().lines().filter(|l| l.contains(ROTATED)).count()
}

/// Waits until the log shows `n` rotations.
async fn wait_for_rotations(server: &KeyServer, n: usize) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while rotations_logged(server) < n {
        if Instant::now() >= deadline {
            bail!(
                "{} rotation(s) logged within {WAIT:?}, expected {n}:\n{}",
                rotations_logged(server),
                server.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits until a new connection sees a certificate whose serial is none of `before`.
async fn wait_for_new_certificate(d: &Deployment, before: &[Seen]) -> Result<(KeyClient, Seen)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let client = KeyClient::connect(d).await?;
        let der = client
            .server_certificate()
            .context("no server certificate")?
            .to_vec();
        let now = seen(&der)?;
        if before.iter().all(|b| b.serial != now.serial) {
            return Ok((client, now));
        }
        if Instant::now() >= deadline {
            bail!("new connections still see an old key-server certificate after {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `keyless_tls_rotations_total{result="ok"}` from `/metrics`.
fn rotations_ok(server: &KeyServer) -> Result<u64> {
    let text = server.metrics_text()?;
    let line = text
        .lines()
        .find(|l| l.starts_with("keyless_tls_rotations_total{result=\"ok\"}"))
        .with_context(|| format!("no rotation metric:\n{text}"))?;
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unparsable metric line {line:?}"))
}

async fn sign_ecdsa(d: &Deployment, client: &mut KeyClient) -> Result<()> {
    let key = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let (op, payload) = handshake_sign_request(Opcode::EcdsaSignSha256, key.ski)?;
    let sig = ok_payload(&client.call(op).await?)?;
    ensure!(key.verify(Opcode::EcdsaSignSha256, &payload, &sig)?);
    Ok(())
}

#[tokio::test]
async fn the_key_server_rotates_its_certificate_without_dropping_connections() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let config = rotating(&d, "origin-rotate.toml", "3s")?;
    let out = check_config(&config)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{text}");
    ensure!(
        text.contains("certificate rotation: on, every 3s")
            && text.contains("next rotation due")
            && !text.contains("at start"),
        "{text}"
    );
    let cert_file = d.dir().join("origin/keyserver.crt");
    let key_file = d.dir().join("origin/keyserver.key");
    let ca = d.dir().join("ca/keyserver-ca.crt");
    let original_key = std::fs::read(&key_file)?;
    let original = seen(&pem_leaf(&cert_file)?)?;

    let server = KeyServer::start_with_config(&d, &config)?;
    let mut open = KeyClient::connect(&d).await?;
    ensure!(
        rotations_logged(&server) == 0,
        "rotated before the first client connected"
    );
    let first = seen(open.server_certificate().context("no server certificate")?)?;
    ensure!(
        first == original,
        "the key server started with another certificate"
    );

    let mut history = vec![first];
    for round in 1..=2 {
        wait_for_rotations(&server, round).await?;
        let (mut fresh, now) = wait_for_new_certificate(&d, &history).await?;
        let der = fresh
            .server_certificate()
            .context("no server certificate")?
            .to_vec();
        ensure!(
            history.iter().all(|h| h.spki != now.spki),
            "round {round}: the rotated certificate reuses a key"
        );
        ensure!(
            now.names == original.names,
            "round {round}: names changed: {} -> {}",
            original.names,
            now.names
        );
        ensure!(
            verifies_against(&der, &ca)?,
            "round {round}: not signed by the key-server CA"
        );
        // Valid from a minute ago for twice rotate_every.
        ensure!(
            now.not_after - now.not_before == 60 + 6,
            "round {round}: validity {}s",
            now.not_after - now.not_before
        );
        assert_ping(&mut fresh).await?;
        sign_ecdsa(&d, &mut fresh).await?;
        // The connection from before every rotation is still served.
        assert_ping(&mut open).await?;
        sign_ecdsa(&d, &mut open).await?;
        history.push(now);
    }

    // The files on disk were replaced: a new key, private; a certificate of the CA.
    ensure!(
        std::fs::read(&key_file)? != original_key,
        "key file unchanged"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "key file mode {mode:o}");
    let on_disk = pem_leaf(&cert_file)?;
    ensure!(seen(&on_disk)?.serial != original.serial);
    ensure!(verifies_against(&on_disk, &ca)?);
    ensure!(rotations_ok(&server)? >= 2);
    let line = server.wait_for_log(WAIT, |l| l.contains(ROTATED))?;
    ensure!(
        has_field(&line, "old_serial", &hex::encode(&original.serial))
            || line.contains(&hex::encode(&original.serial)),
        "the rotation log names no old serial: {line}"
    );
    ensure!(line.contains("new_not_after"), "{line}");
    ensure!(
        !server.log().contains("no longer accepted"),
        "a connection was dropped"
    );
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn a_certificate_short_of_half_the_period_is_rotated_at_start() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    // keyless-certs issues the key server 90 days: less than half of 200 days.
    let config = rotating(&d, "origin-rotate-start.toml", "200d")?;
    let out = check_config(&config)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{text}");
    ensure!(text.contains("next rotation due at start"), "{text}");
    let original = seen(&pem_leaf(&d.dir().join("origin/keyserver.crt"))?)?;

    let server = KeyServer::start_with_config(&d, &config)?;
    // Rotated before the listener opened: the first connection sees the new one.
    let mut client = KeyClient::connect(&d).await?;
    let der = client
        .server_certificate()
        .context("no server certificate")?
        .to_vec();
    let now = seen(&der)?;
    ensure!(now.serial != original.serial && now.spki != original.spki);
    ensure!(verifies_against(
        &der,
        &d.dir().join("ca/keyserver-ca.crt")
    )?);
    ensure!(now.not_after - now.not_before == 60 + 400 * 86400);
    assert_ping(&mut client).await?;
    let line = server.wait_for_log(WAIT, |l| l.contains(ROTATED))?;
    ensure!(has_field(&line, "when", "start"), "{line}");
    ensure!(rotations_ok(&server)? == 1);
    // The next one is 200 days away: nothing more happens here.
    tokio::time::sleep(Duration::from_millis(600)).await;
    ensure!(rotations_logged(&server) == 1);
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn rotation_settings_are_checked_by_the_config_test() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let out = check_config(&d.config_path())?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("certificate rotation: off"),
        "{text}"
    );
    let variant = |name: &str, fields: &[(&str, &str)]| {
        d.write_config_variant(name, |t| {
            for (field, value) in fields {
                set_tls(t, field, *value);
            }
        })
    };
    for (name, fields, expect) in [
        (
            "origin-r-noca.toml",
            &[("rotate_every", "24h")][..],
            "needs ca_cert and ca_key",
        ),
        (
            "origin-r-short.toml",
            &[
                ("rotate_every", "500ms"),
                ("ca_cert", "ca/keyserver-ca.crt"),
                ("ca_key", "ca/keyserver-ca.key"),
            ],
            "at least 1s",
        ),
        (
            // The edge CA's key is no key of the key-server CA.
            "origin-r-mismatch.toml",
            &[
                ("rotate_every", "24h"),
                ("ca_cert", "ca/keyserver-ca.crt"),
                ("ca_key", "ca/edge-ca.key"),
            ],
            "does not match",
        ),
        (
            "origin-r-unused.toml",
            &[
                ("ca_cert", "ca/keyserver-ca.crt"),
                ("ca_key", "ca/keyserver-ca.key"),
            ],
            "only used with rotate_every",
        ),
    ] {
        let config = variant(name, fields)?;
        let out = check_config(&config)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(!out.status.success(), "{name} accepted:\n{text}");
        ensure!(text.contains(expect), "{name}: {text}");
    }
    // Another CA than the one that issued the certificate: accepted, with a warning
    // (edges would have to trust it after the first rotation).
    let config = variant(
        "origin-r-other-ca.toml",
        &[
            ("rotate_every", "24h"),
            ("ca_cert", "ca/edge-ca.crt"),
            ("ca_key", "ca/edge-ca.key"),
        ],
    )?;
    let out = check_config(&config)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{text}");
    ensure!(
        text.contains("WARNING") && text.contains("was not issued by [tls] ca_cert"),
        "{text}"
    );
    Ok(())
}
