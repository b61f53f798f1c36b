//! Certificate rotation. The key server's own (`[tls] rotate_every`): new certificates
//! with a new key from the key-server CA, on schedule and at start, written over the
//! `[tls]` files and reloaded without dropping a connection, and the configuration
//! errors `--test` names. A group's CA (`previous_ca_certs`, ENROLL.md "CA rotation"):
//! edges of the old CA served until it is dropped on SIGHUP, enrollment from the new.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keyless_shared::Opcode;
use keyless_tests::enroll::{create_token, TestCa};
use keyless_tests::keys::KeyAlg;
use keyless_tests::{
    check_config, has_field, set_tls, ClientOptions, Deployment, EnrollClient, KeyClient,
    KeyServer, Signal, Tamper,
};
use x509_parser::prelude::*;

use crate::enroll_keyserver::{connection_refused, group_mut};
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
        let (ok, text) = keyless_tests::check_config_text(&config)?;
        ensure!(!ok, "{name} accepted:\n{text}");
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

/// Whether the certificate PEM `cert` is signed by the CA certificate PEM `ca`.
fn issued_by(cert: &str, ca: &str) -> Result<bool> {
    let cert = openssl::x509::X509::from_pem(cert.as_bytes())?;
    let ca = openssl::x509::X509::from_pem(ca.as_bytes())?;
    let key = ca.public_key()?;
    Ok(cert.verify(&key)?)
}

/// Group `default` in the middle of a CA rotation: its current CA is `new-edge-ca`,
/// and the CA `keyless-certs init` made is still trusted as a previous CA while
/// `keep_old`.
fn rotating_group_ca(keep_old: bool) -> impl FnOnce(&mut toml::Table) {
    move |t: &mut toml::Table| {
        t.insert("tls_reload_interval".into(), "200ms".into());
        if let Some(g) = group_mut(t, "default") {
            g.insert("ca_cert".into(), "origin/new-edge-ca.crt".into());
            g.insert("ca_key".into(), "origin/new-edge-ca.key".into());
            let previous = if keep_old {
                vec!["origin/edge-ca.crt".into()]
            } else {
                Vec::new()
            };
            g.insert("previous_ca_certs".into(), toml::Value::Array(previous));
        }
    }
}

#[tokio::test]
async fn a_group_ca_rotation_keeps_old_edges_until_the_old_ca_is_dropped() -> Result<()> {
    let d = Deployment::init_enroll(&[DOMAIN])?;
    let old = TestCa::load(d.dir(), "edge-ca")?;
    let new = TestCa::generate("new edge CA")?;
    std::fs::write(d.dir().join("origin/new-edge-ca.crt"), &new.cert_pem)?;
    std::fs::write(d.dir().join("origin/new-edge-ca.key"), &new.key_pem)?;
    let config = d.write_config_variant("origin-ca-rotation.toml", rotating_group_ca(true))?;
    let out = check_config(&config)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("(+1 previous)"),
        "{text}"
    );
    let server = KeyServer::start_with_config(&d, &config)?;
    let api = EnrollClient::new(
        d.enroll_addr().context("no enrollment address")?,
        &d.keyserver_ca(),
    );

    // An edge certificate of the previous CA, with the group URI the issuer writes: served.
    let old_identity = old.issue_client(
        &d.dir().join("old-ca-edges"),
        "e-old",
        "e-old",
        Some("keyless://group/default/edge/e-old"),
    )?;
    let old_options = ClientOptions::new(&d).identity(Some(old_identity));
    let mut old_open = old_options.connect().await?;
    assert_ping(&mut old_open).await?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let (op, payload) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
    let sig = ok_payload(&old_open.call(op).await?)?;
    ensure!(ecdsa.verify(Opcode::EcdsaSignSha256, &payload, &sig)?);

    // Enrollment now issues from the new CA, and hands out both CAs, new first.
    let token = create_token(&config, "default", "1h", None)?;
    let attempt = api.enroll(&token, "e-new", &Tamper::default()).await?;
    let response = attempt.response()?;
    ensure!(
        issued_by(&response.certificate, &new.cert_pem)?,
        "not issued by the new CA"
    );
    ensure!(
        !issued_by(&response.certificate, &old.cert_pem)?,
        "issued by the old CA"
    );
    ensure!(
        response.ca_bundle == format!("{}{}", new.cert_pem, old.cert_pem),
        "ca_bundle:\n{}",
        response.ca_bundle
    );
    let new_identity = attempt.write_identity(&d.dir().join("enrolled"), "e-new")?;
    let new_options = ClientOptions::new(&d).identity(Some(new_identity.clone()));
    let mut new_open = new_options.connect().await?;
    assert_ping(&mut new_open).await?;
    let (op, _) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
    ok_payload(&new_open.call(op).await?)?;

    // The rotation ends: the old CA leaves previous_ca_certs, applied on SIGHUP.
    d.write_config_variant("origin-ca-rotation.toml", rotating_group_ca(false))?;
    server.signal(Signal::Hup)?;
    server.wait_for_log(WAIT, |l| {
        l.contains("TLS configuration reloaded") && !l.contains("files changed")
    })?;
    // The old CA's edge: its open connection is closed, a new one refused.
    ensure!(
        old_open.expect_closed().await.is_ok(),
        "the old CA's edge kept its connection"
    );
    ensure!(
        connection_refused(&old_options).await?,
        "an edge of the dropped CA was served"
    );
    // The new CA's edges keep working: the open connection, a new one, renewal.
    assert_ping(&mut new_open).await?;
    let (op, _) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
    ok_payload(&new_open.call(op).await?)?;
    assert_ping(&mut new_options.connect().await?).await?;
    let renewed = api
        .reenroll(Some(&new_identity), "e-new", &Tamper::default())
        .await?
        .response()?;
    ensure!(issued_by(&renewed.certificate, &new.cert_pem)?);
    ensure!(renewed.ca_bundle == new.cert_pem, "{}", renewed.ca_bundle);
    ensure!(api.cacerts("default").await?.text() == new.cert_pem);
    server.assert_no_panic();
    Ok(())
}
