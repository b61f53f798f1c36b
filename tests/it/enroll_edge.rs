//! An edge joining a key-server group with `keyless-edge enroll` and keeping its
//! short-lived certificate renewed, with the real binaries: the operator's three
//! commands, refusals that write nothing, renewal under a steady stream of new
//! handshakes, and the old certificate refused once it has expired.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use keyless_tests::enroll::create_token;
use keyless_tests::{edge_bin, per_phase, ClientOptions, Deployment, EdgeConfig, HandshakeEnd};

use crate::edge_support::{Stack, StackBuilder, SITE};

/// The group `keyless-certs init --enroll` configures.
const GROUP: &str = "default";

/// `keyless-edge enroll` for `id` with the token in `token_file`, into `out`.
fn enroll(d: &Deployment, id: &str, token_file: &Path, out: &Path) -> Result<Output> {
    let server = d
        .enroll_addr()
        .context("the deployment has no enrollment API")?;
    let mut cmd = Command::new(edge_bin()?);
    cmd.arg("enroll")
        .args(["--server", &server.to_string()])
        .arg("--ca")
        .arg(d.keyserver_ca())
        .args(["--server-name", "localhost", "--id", id])
        .arg("--token-file")
        .arg(token_file)
        .arg("--out")
        .arg(out)
        .env("NO_COLOR", "1");
    keyless_tests::run_with_timeout(cmd, Duration::from_secs(30))
}

/// A token for `GROUP` valid for `ttl`, written to a file in the deployment.
fn token_file(d: &Deployment, name: &str, ttl: &str) -> Result<PathBuf> {
    let token = create_token(&d.config_path(), GROUP, ttl, None)?;
    let path = d.dir().join(name);
    std::fs::write(&path, token.to_text())?;
    Ok(path)
}

/// The edge's `[[keyserver.group]]` for the credential in `out`, renewing it at
/// `enroll` if given.
fn enrolled_group(
    c: EdgeConfig,
    keyserver: SocketAddr,
    out: &Path,
    enroll: Option<SocketAddr>,
) -> EdgeConfig {
    let path = |f: &str| out.join(f).display().to_string();
    let c = c
        .group(GROUP, &[(keyserver, 10, 1)])
        .group_option("ca", path("keyserver-ca.crt"))
        .group_option("cert", path("edge.crt"))
        .group_option("key", path("edge.key"));
    match enroll {
        Some(addr) => c.group_option("enroll", addr.to_string()),
        None => c,
    }
}

#[test]
fn add_an_edge_with_three_commands() -> Result<()> {
    let backends = StackBuilder::default().enroll().backends()?;
    let d = &backends.deployment;
    // 1. On the key server: a one-time token.
    let token = token_file(d, "token", "1h")?;
    // 2. On the edge: enroll.
    let out = d.dir().join("enrolled");
    let run = enroll(d, "edge-9", &token, &out)?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    ensure!(
        run.status.success(),
        "keyless-edge enroll failed: {}{stdout}",
        String::from_utf8_lossy(&run.stderr)
    );
    ensure!(
        stdout.contains("[[keyserver.group]]")
            && stdout.contains(&format!("name = \"{GROUP}\""))
            && stdout.contains("enroll = "),
        "the lines to add are missing:\n{stdout}"
    );
    let mode = std::fs::metadata(out.join("edge.key"))?
        .permissions()
        .mode()
        & 0o777;
    ensure!(mode == 0o600, "edge.key has mode {mode:o}");
    for f in ["edge.crt", "keyserver-ca.crt", "edge-ca.crt"] {
        ensure!(out.join(f).is_file(), "{f} was not written");
    }
    // The token is single use: a second enrollment is refused and writes nothing.
    let again = d.dir().join("again");
    let run = enroll(d, "edge-10", &token, &again)?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    ensure!(
        !run.status.success() && stderr.contains("token-used"),
        "a used token: exit {:?}, {stderr}",
        run.status.code()
    );
    ensure!(!again.join("edge.key").exists(), "a refusal wrote a key");

    // 3. Start the edge with the written credential: it serves over TLS 1.3.
    let keyserver = backends.keyserver.addr();
    let s = backends.with_edge(|c| enrolled_group(c, keyserver, &out, None))?;
    s.edge
        .curl(SITE)
        .tls(keyless_tests::TlsVersion::Tls13)
        .get(&s.url(SITE, "/"))?
        .expect_status(200)?;
    let audits = s.wait_for_audits("ecdsa-sign-sha256", SITE, 1)?;
    ensure!(
        audits.iter().all(|l| l.contains("edge-9")),
        "the key server should see the enrolled identity edge-9:\n{}",
        audits.join("\n")
    );
    Ok(())
}

/// A stack whose key server issues certificates living `lifetime` seconds, and an edge
/// credential enrolled as `id` (in the returned directory); the edge not started yet.
fn enrolled_backends(lifetime: u64, id: &str) -> Result<(crate::edge_support::Backends, PathBuf)> {
    let backends = StackBuilder::default()
        .enroll()
        .backends_with_origin_config(move |t| {
            let groups = t.get_mut("group").and_then(|g| g.as_array_mut());
            for g in groups
                .into_iter()
                .flatten()
                .filter_map(|g| g.as_table_mut())
            {
                g.insert("cert_lifetime".into(), format!("{lifetime}s").into());
            }
        })?;
    let d = &backends.deployment;
    let token = token_file(d, "token", "1h")?;
    let out = d.dir().join("enrolled");
    let run = enroll(d, id, &token, &out)?;
    ensure!(
        run.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    Ok((backends, out))
}

/// Certificates issued in the renewal test live this long.
const LIFETIME_S: u64 = 9;

#[test]
fn renewal_under_load_costs_no_handshake_and_the_old_certificate_expires() -> Result<()> {
    let (backends, out) = enrolled_backends(LIFETIME_S, "edge-r")?;
    let d = &backends.deployment;
    let enrolled_at = Instant::now();
    // Keep the first credential to try it after it has expired.
    let first = (d.dir().join("first.crt"), d.dir().join("first.key"));
    std::fs::copy(out.join("edge.crt"), &first.0)?;
    std::fs::copy(out.join("edge.key"), &first.1)?;

    let keyserver = backends.keyserver.addr();
    let enroll_addr = d.enroll_addr();
    let s = backends.with_edge(|c| {
        enrolled_group(c, keyserver, &out, enroll_addr).keyserver_option("timeout", "1s")
    })?;
    let d = &s.deployment;
    let load = s.handshake_load(2, 25.0)?;
    load.phase("renewing");
    let renewed = |s: &Stack| {
        s.edge
            .log()
            .lines()
            .filter(|l| l.contains("edge certificate renewed"))
            .count()
    };
    let limit = Duration::from_secs(LIFETIME_S * 3);
    while renewed(&s) < 2 {
        ensure!(
            enrolled_at.elapsed() < limit,
            "fewer than two renewals within {limit:?}; edge log:\n{}",
            s.edge.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = load.stop()?;
    for (phase, attempted, failed) in per_phase(&outcomes) {
        eprintln!(
            "{phase}: {attempted} handshakes, {failed} failed; {} renewals",
            renewed(&s)
        );
    }
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| o.end != HandshakeEnd::Established)
        .map(|o| format!("{:?}", o.end))
        .collect();
    ensure!(
        failed.is_empty() && outcomes.len() > 100,
        "{} of {} handshakes failed across the renewals: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    let metrics = s.edge.metrics_text()?;
    ensure!(
        keyless_tests::metric_sum(
            &metrics,
            "keyless_edge_credential_renewals_total",
            &[("result", "ok")]
        ) >= 2.0,
        "renewals not counted:\n{metrics}"
    );

    // The first certificate stops working by itself once it has expired.
    let expired = enrolled_at + Duration::from_secs(LIFETIME_S + 2);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    let options = ClientOptions::new(d).identity(Some(first));
    let refused = tokio::runtime::Runtime::new()?.block_on(async {
        match options.connect().await {
            Err(_) => true,
            // TLS 1.3: the server may reject the client certificate after the client
            // has finished; the first read then fails.
            Ok(mut client) => client.ping(b"expired?").await.is_err(),
        }
    });
    ensure!(refused, "the expired first certificate still works");
    s.edge.assert_no_panic();
    Ok(())
}

#[test]
fn key_server_certificate_replaced_under_edge_load_costs_no_handshake() -> Result<()> {
    use keyless_tests::enroll::{replace_file, TestCa};
    let s = StackBuilder::default().start()?;
    s.edge.s_client(SITE).run()?.expect_verified()?;
    let load = s.handshake_load(2, 25.0)?;
    load.phase("replaced");
    std::thread::sleep(Duration::from_millis(500));

    // A new certificate from the key-server CA, written over the old one (key first).
    let dir = s.deployment.dir();
    let ca = TestCa::load(dir, "keyserver-ca")?;
    let (cert, key) = ca.issue(&["localhost"], None, true)?;
    replace_file(&dir.join("origin/keyserver.key"), &key)?;
    replace_file(&dir.join("origin/keyserver.crt"), &cert)?;
    s.keyserver.wait_for_log(Duration::from_secs(15), |l| {
        l.contains("TLS configuration reloaded")
    })?;
    std::thread::sleep(Duration::from_secs(1));

    // New connections present the new certificate ...
    use rustls::pki_types::pem::PemObject;
    let new = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes())?;
    let seen = tokio::runtime::Runtime::new()?.block_on(async {
        let client = keyless_tests::KeyClient::connect(&s.deployment).await?;
        anyhow::Ok(client.server_certificate().map(<[u8]>::to_vec))
    })?;
    ensure!(
        seen.as_deref() == Some(new.as_ref()),
        "a new connection still sees the old key-server certificate"
    );
    // ... and a second edge, connecting now, serves with it.
    let config = EdgeConfig::new(&s.deployment)?
        .nameserver(s.dns.addr())
        .site(
            &[SITE],
            &format!(
                "http://{}:{}",
                crate::edge_support::ORIGIN_HOST,
                s.origin.port()
            ),
        );
    let second = keyless_tests::Edge::start_with(&s.deployment, &config)?;
    second
        .curl(SITE)
        .get(&second.url(SITE, "/"))?
        .expect_status(200)?;

    let outcomes = load.stop()?;
    let failed = outcomes
        .iter()
        .filter(|o| o.end != HandshakeEnd::Established)
        .count();
    eprintln!(
        "{} handshakes across the replacement, {failed} failed",
        outcomes.len()
    );
    ensure!(
        failed == 0 && outcomes.len() > 50,
        "{failed} of {} handshakes failed while the key server's certificate was replaced",
        outcomes.len()
    );
    Ok(())
}

#[test]
fn a_failing_renewal_is_retried_counted_and_reported_before_expiry() -> Result<()> {
    const LIFETIME: u64 = 6;
    let (backends, out) = enrolled_backends(LIFETIME, "edge-f")?;
    let enrolled_at = Instant::now();
    // Renewal points at a port where nothing listens: every attempt fails.
    let nowhere = keyless_tests::free_addr()?;
    let keyserver = backends.keyserver.addr();
    let s = backends.with_edge(|c| enrolled_group(c, keyserver, &out, Some(nowhere)))?;

    // Before expiry, /healthz names the group's credential.
    let (status, body) = loop {
        let (status, body) = s.edge.healthz()?;
        if status == 503 && body.contains("certificate for key-server group default") {
            break (status, body);
        }
        ensure!(
            enrolled_at.elapsed() < Duration::from_secs(LIFETIME),
            "/healthz said {status} {body:?} until the certificate expired"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        enrolled_at.elapsed() < Duration::from_secs(LIFETIME),
        "{status} {body}"
    );
    // Each failure is logged and retried (every second at first).
    let retried = Instant::now();
    while s
        .edge
        .log()
        .lines()
        .filter(|l| l.contains("edge certificate renewal failed"))
        .count()
        < 2
    {
        ensure!(
            retried.elapsed() < Duration::from_secs(5),
            "expected retried renewals in the log:\n{}",
            s.edge.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = s.edge.metrics_text()?;
    ensure!(
        keyless_tests::metric_sum(
            &metrics,
            "keyless_edge_credential_renewals_total",
            &[("result", "error")]
        ) >= 2.0,
        "failed renewals not counted:\n{metrics}"
    );
    ensure!(
        metrics.contains("keyless_edge_credential_expiry_seconds{group=\"default\"}"),
        "no expiry gauge:\n{metrics}"
    );
    Ok(())
}
