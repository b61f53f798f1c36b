//! Issue 7 at the key server: secure defaults (strict signing policy, no raw RSA
//! decrypt, ACL on get-certificate-chain), bounded resources against hostile clients
//! (idle TCP floods, clients that never read), client identity and revocation, and
//! process hygiene.

use std::net::TcpStream as StdTcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures_util::SinkExt;
use keyless_shared::{ErrorCode, Message, Opcode, Operation, Ski};
use keyless_tests::keys::{
    digest, install_key, random_bytes, tls12_x25519_signed_message, tls13_server_signed_message,
    KeyAlg, KeyEncoding, KeySpec,
};
use keyless_tests::{
    add_acl, allow_rsa_decrypt, certs_bin, check_config, set_default_acl, set_permissive, set_tls,
    sign_request, ClientError, ClientOptions, Deployment, KeyClient, KeyServer, Signal, EDGE_NAME,
};
use ring::signature as rs;

use crate::support::{
    assert_ping, assert_still_serving, expect_error, handshake_sign_request, ok_payload, start,
    DOMAIN,
};

const LOG_WAIT: Duration = Duration::from_secs(10);

fn decrypt_request(key: &keyless_tests::keys::SiteKey, premaster: &[u8]) -> Result<Operation> {
    let mut op = Operation::new(Opcode::RsaDecrypt, key.rsa_encrypt_pkcs1(premaster)?);
    op.ski = Some(key.ski);
    Ok(op)
}

fn premaster() -> Vec<u8> {
    let mut p = vec![0x03, 0x03];
    p.extend(random_bytes(46));
    p
}

#[tokio::test]
async fn bare_digest_and_rsa_decrypt_refused_by_default_allowed_when_configured() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let bare = digest(Opcode::EcdsaSignSha256, b"anything at all")?;

    // What keyless-certs init writes: strict, no decrypt.
    {
        let out = check_config(&d.config_path())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(out.status.success(), "--test failed: {text}");
        ensure!(
            text.contains("require_handshake_context = true") && !text.contains("WARNING"),
            "--test output of the default config: {text}"
        );
        let server = KeyServer::start(&d)?;
        let mut client = KeyClient::connect(&d).await?;
        let reply = client
            .sign(Opcode::EcdsaSignSha256, ecdsa.ski, &bare, None)
            .await?;
        expect_error(&reply, ErrorCode::PolicyRefused).context("bare digest, default")?;
        let reply = client.call(decrypt_request(&rsa, &premaster())?).await?;
        expect_error(&reply, ErrorCode::PolicyRefused).context("RSA decrypt, default")?;
        server.wait_for_log(LOG_WAIT, |l| {
            l.contains("raw RSA decrypt is not enabled") && l.contains(&rsa.ski.to_string())
        })?;
        // The handshake signatures an edge asks for still work.
        let (op, payload) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
        let sig = ok_payload(&client.call(op).await?)?;
        ensure!(ecdsa.verify(Opcode::EcdsaSignSha256, &payload, &sig)?);
        ensure!(
            !server.log().contains("signing oracle"),
            "the default config logs the permissive warning"
        );
    }

    // Strict mode with decrypt enabled for the RSA key: decrypt works (it can never
    // carry a handshake message), bare digests stay refused.
    {
        let config = d.write_config_variant("origin-decrypt.toml", |t| {
            allow_rsa_decrypt(t, &format!("{DOMAIN}-rsa"));
        })?;
        let out = check_config(&config)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            text.contains("WARNING: raw RSA decrypt enabled for example.com-rsa"),
            "--test does not warn about decrypt: {text}"
        );
        let _server = KeyServer::start_with_config(&d, &config)?;
        let mut client = KeyClient::connect(&d).await?;
        let secret = premaster();
        let plain = ok_payload(&client.call(decrypt_request(&rsa, &secret)?).await?)?;
        ensure!(plain.starts_with(&[0, 2]) && plain.ends_with(&secret));
        let reply = client
            .sign(Opcode::EcdsaSignSha256, ecdsa.ski, &bare, None)
            .await?;
        expect_error(&reply, ErrorCode::PolicyRefused).context("bare digest, strict")?;
        // Decrypt with a "handshake message" attached cannot be checked: refused.
        let mut op = decrypt_request(&rsa, &secret)?;
        op.signed_message = Some(tls13_server_signed_message(&[1; 32]).into());
        expect_error(&client.call(op).await?, ErrorCode::PolicyRefused)?;
    }

    // Permissive mode: bare digests signed, loudly; decrypt still per key.
    {
        let config = d.write_config_variant("origin-permissive.toml", set_permissive)?;
        let out = check_config(&config)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            text.contains("WARNING: require_handshake_context = false")
                && text.contains("signing oracle"),
            "--test does not warn about permissive mode: {text}"
        );
        let server = KeyServer::start_with_config(&d, &config)?;
        let line = server.wait_for_log(LOG_WAIT, |l| l.contains("signing oracle"))?;
        ensure!(line.contains("WARN"), "not a warning: {line}");
        let mut client = KeyClient::connect(&d).await?;
        let sig = ok_payload(
            &client
                .sign(Opcode::EcdsaSignSha256, ecdsa.ski, &bare, None)
                .await?,
        )?;
        ensure!(ecdsa.verify(Opcode::EcdsaSignSha256, &bare, &sig)?);
        let reply = client.call(decrypt_request(&rsa, &premaster())?).await?;
        expect_error(&reply, ErrorCode::PolicyRefused).context("RSA decrypt, permissive")?;
    }
    Ok(())
}

#[tokio::test]
async fn strict_mode_signs_ed25519_with_the_handshake_message_only() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let ed = install_key(
        &d.keys_dir(),
        "ed.test",
        KeySpec::Ed25519,
        KeyEncoding::Pkcs8,
        &["ed.test"],
    )?;
    let server = KeyServer::start(&d)?;
    let mut client = KeyClient::connect(&d).await?;
    // As the edge sends it: payload = the message = tag 0x40.
    for message in [
        tls13_server_signed_message(&random_bytes(32)),
        tls13_server_signed_message(&random_bytes(48)),
        tls12_x25519_signed_message(),
    ] {
        let reply = client
            .sign(Opcode::Ed25519Sign, ed.ski, &message, Some(&message))
            .await?;
        let sig = ok_payload(&reply)?;
        ensure!(ed.verify_message_ring(&rs::ED25519, &message, &sig));
    }
    let tls13 = tls13_server_signed_message(&random_bytes(32));
    let junk = b"transfer 1000 to mallory".to_vec();
    for (what, payload, tag) in [
        ("bare handshake message", tls13.clone(), None),
        ("bare arbitrary message", junk.clone(), None),
        (
            "arbitrary message in the tag",
            junk.clone(),
            Some(junk.clone()),
        ),
        (
            "payload other than the tag",
            junk.clone(),
            Some(tls13.clone()),
        ),
    ] {
        let reply = client
            .sign(Opcode::Ed25519Sign, ed.ski, &payload, tag.as_deref())
            .await?;
        expect_error(&reply, ErrorCode::PolicyRefused).context(what)?;
    }
    assert_still_serving(&d, &server).await
}

fn chain_request(sni: &str) -> Operation {
    Operation {
        opcode: Some(Opcode::GetCertificateChain),
        sni: Some(sni.to_owned()),
        ..Operation::default()
    }
}

#[tokio::test]
async fn acl_applies_to_certificate_chain_and_deny_by_default() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;

    // The ECDSA key (preferred by default) is another edge's: the chain of the RSA key,
    // which this edge may use, is the answer.
    {
        let config = d.write_config_variant("origin-acl1.toml", |t| {
            add_acl(t, &format!("{DOMAIN}-ecdsa"), &["edge-2"]);
        })?;
        let _server = KeyServer::start_with_config(&d, &config)?;
        let mut client = KeyClient::connect(&d).await?;
        let reply = client.call(chain_request(DOMAIN)).await?;
        ok_payload(&reply)?;
        ensure!(
            reply.ski == Some(rsa.ski),
            "chain for a key the edge may not use: {:?}",
            reply.ski
        );
        // Asking for ECDSA first does not get it either; asking for ECDSA only is refused.
        let mut req = chain_request(DOMAIN);
        req.payload = Some(vec![2u8, 1].into());
        let reply = client.call(req).await?;
        ensure!(
            reply.ski == Some(rsa.ski),
            "ECDSA, RSA preference: {reply:?}"
        );
        let mut req = chain_request(DOMAIN);
        req.payload = Some(vec![2u8].into());
        expect_error(&client.call(req).await?, ErrorCode::NotAuthorized)
            .context("ECDSA-only preference")?;
    }
    // Both keys are another edge's: not-authorized (and the edge learns no chain).
    {
        let config = d.write_config_variant("origin-acl2.toml", |t| {
            add_acl(t, &format!("{DOMAIN}-ecdsa"), &["edge-2"]);
            add_acl(t, &format!("{DOMAIN}-rsa"), &["edge-2"]);
        })?;
        let server = KeyServer::start_with_config(&d, &config)?;
        let mut client = KeyClient::connect(&d).await?;
        expect_error(
            &client.call(chain_request("www.example.com")).await?,
            ErrorCode::NotAuthorized,
        )?;
        server.wait_for_log(LOG_WAIT, |l| {
            l.contains("certificate chain refused by key ACL") && l.contains(EDGE_NAME)
        })?;
    }
    // Deny by default: only keys with an ACL entry naming this edge are usable.
    {
        let config = d.write_config_variant("origin-deny.toml", |t| {
            set_default_acl(t, "deny");
            add_acl(t, &format!("{DOMAIN}-rsa"), &[EDGE_NAME]);
        })?;
        let _server = KeyServer::start_with_config(&d, &config)?;
        let mut client = KeyClient::connect(&d).await?;
        let reply = client.call(chain_request(DOMAIN)).await?;
        ensure!(reply.ski == Some(rsa.ski), "deny by default: {reply:?}");
        let (op, _) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
        expect_error(&client.call(op).await?, ErrorCode::NotAuthorized)?;
        let (op, payload) = handshake_sign_request(Opcode::RsaPssSignSha256, rsa.ski)?;
        let sig = ok_payload(&client.call(op).await?)?;
        ensure!(rsa.verify(Opcode::RsaPssSignSha256, &payload, &sig)?);
    }
    // Deny by default with no entries: nothing at all.
    {
        let config = d.write_config_variant("origin-deny-all.toml", |t| {
            set_default_acl(t, "deny");
        })?;
        let _server = KeyServer::start_with_config(&d, &config)?;
        let mut client = KeyClient::connect(&d).await?;
        expect_error(
            &client.call(chain_request(DOMAIN)).await?,
            ErrorCode::NotAuthorized,
        )?;
        let (op, _) = handshake_sign_request(Opcode::RsaPssSignSha256, rsa.ski)?;
        expect_error(&client.call(op).await?, ErrorCode::NotAuthorized)?;
        assert_ping(&mut client).await?;
    }
    Ok(())
}

/// Opens `n` plain TCP connections that never send a byte.
fn idle_flood(addr: std::net::SocketAddr, n: usize) -> Result<Vec<StdTcpStream>> {
    (0..n)
        .map(|i| {
            StdTcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("idle connection {i}"))
        })
        .collect()
}

/// Connects as the edge and pings; returns how long that took.
async fn timed_connect_and_ping(d: &Deployment) -> Result<Duration> {
    let started = Instant::now();
    let mut client = ClientOptions::new(d)
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .context("the edge could not connect during the flood")?;
    assert_ping(&mut client).await?;
    Ok(started.elapsed())
}

#[tokio::test]
async fn idle_tcp_flood_does_not_lock_edges_out() -> Result<()> {
    let (d, server) = start()?;
    let flood = idle_flood(d.listen(), 400)?;
    // Let the key server accept them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took = timed_connect_and_ping(&d).await?;
    ensure!(
        took < Duration::from_secs(1),
        "connect + ping took {took:?} behind 400 idle TCP connections"
    );
    let metrics = server.metrics_text()?;
    ensure!(
        metrics.contains("keyless_connections_total{result=\"handshake-evicted\"}"),
        "no evicted handshakes counted:\n{metrics}"
    );
    let handshaking = metrics
        .lines()
        .find(|l| l.starts_with("keyless_connections_handshaking "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    ensure!(
        handshaking.is_some_and(|n| n <= 256.0),
        "pending handshakes over the budget: {handshaking:?}"
    );
    drop(flood);
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn max_connections_counts_authenticated_connections_only() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let config = d.write_config_variant("origin-one.toml", |t| {
        t.insert("max_connections".into(), 1.into());
        t.insert("max_unauthenticated_connections".into(), 8.into());
    })?;
    let server = KeyServer::start_with_config(&d, &config)?;
    let _flood = idle_flood(d.listen(), 50)?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut edge = ClientOptions::new(&d)
        .timeout(Duration::from_secs(3))
        .connect()
        .await?;
    assert_ping(&mut edge).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(1),
        "the one authenticated slot was not free behind idle connections: {:?}",
        started.elapsed()
    );
    // A second authenticated connection is over the limit: closed, not queued.
    let mut second = ClientOptions::new(&d)
        .timeout(Duration::from_secs(3))
        .connect()
        .await?;
    match second.ping(b"over the limit").await {
        Err(e) if e.is_closed() => {}
        other => bail!("second connection over max_connections = 1: {other:?}"),
    }
    server.wait_for_log(LOG_WAIT, |l| l.contains("max_connections reached"))?;
    // The first one is unaffected.
    assert_ping(&mut edge).await?;
    Ok(())
}

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// Connects and writes up to `n` requests made by `op` without ever reading a reply,
/// until the key server stops taking them (a write blocked for 2 s) or a write fails,
/// while `watcher` (another edge) pings every 100 ms. Returns the requests written,
/// the hog's connection (still open) and the watcher's worst ping time.
async fn hog(
    d: &Deployment,
    n: usize,
    op: impl Fn(usize) -> Operation + Send + 'static,
    watcher: &mut KeyClient,
) -> Result<(
    usize,
    keyless_tests::Reader,
    keyless_tests::Writer,
    Duration,
)> {
    let (reader, mut writer) = KeyClient::connect(d).await?.into_parts();
    let write = tokio::spawn(async move {
        let mut sent = 0usize;
        for i in 0..n {
            let msg = Message {
                id: i as u32,
                op: op(i),
            };
            match tokio::time::timeout(
                Duration::from_secs(2),
                SinkExt::<Message>::feed(&mut writer, msg),
            )
            .await
            {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            SinkExt::<Message>::flush(&mut writer),
        )
        .await;
        (sent, writer)
    });
    let mut worst = Duration::ZERO;
    while !write.is_finished() {
        let started = Instant::now();
        assert_ping(watcher).await?;
        worst = worst.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, writer) = write.await?;
    Ok((sent, reader, writer, worst))
}

#[tokio::test]
async fn client_that_never_reads_does_not_grow_memory() -> Result<()> {
    const REQUESTS: usize = 200_000;
    const BOUND_KIB: u64 = 64 * 1024;
    let d = Deployment::init(&[DOMAIN])?;
    let config = d.write_config_variant("origin-stall.toml", |t| {
        t.insert("stall_timeout".into(), "3s".into());
    })?;
    let server = KeyServer::start_with_config(&d, &config)?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let mut watcher = KeyClient::connect(&d).await?;
    assert_ping(&mut watcher).await?;
    let before = vm_rss_kib(server.pid())?;

    // 1. Requests answered with an error (unknown key): error replies count against the
    // in-flight bound too, so the key server stops reading after that many.
    let unknown = sign_request(Opcode::EcdsaSignSha256, Ski([7; 20]), &[0; 32], None);
    let (sent_errors, r1, w1, worst1) =
        hog(&d, REQUESTS, move |_| unknown.clone(), &mut watcher).await?;
    let after_errors = vm_rss_kib(server.pid())?;

    // 2. Replies as large as they get (pings echoing 16 KiB), errors and signatures.
    let big = random_bytes(16 * 1024);
    let (sign, _) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
    let unknown = sign_request(Opcode::EcdsaSignSha256, Ski([7; 20]), &[0; 32], None);
    let (sent_mixed, r2, w2, worst2) = hog(
        &d,
        REQUESTS,
        move |i| match i % 3 {
            0 => Operation::new(Opcode::Ping, big.clone()),
            1 => unknown.clone(),
            _ => sign.clone(),
        },
        &mut watcher,
    )
    .await?;
    let during = vm_rss_kib(server.pid())?;
    let worst = worst1.max(worst2);
    eprintln!(
        "requests written before the key server stopped reading: {sent_errors} (errors), \
         {sent_mixed} (mixed); VmRSS {before} KiB -> {after_errors} KiB -> {during} KiB; \
         worst ping of another edge {worst:?}"
    );
    ensure!(
        sent_errors < REQUESTS / 4,
        "the key server read {sent_errors} requests from a client that reads no replies"
    );
    ensure!(
        during < before + BOUND_KIB,
        "VmRSS grew from {before} KiB to {during} KiB"
    );
    ensure!(
        worst < Duration::from_millis(500),
        "another edge's ping took {worst:?}"
    );
    // The key server gives up on those connections (stall_timeout) instead of holding
    // their replies forever.
    server.wait_for_log(Duration::from_secs(15), |l| {
        l.contains("edge does not read its replies")
            || l.contains("stalled: no in-flight slot freed")
    })?;
    drop((r1, w1, r2, w2));
    assert_ping(&mut watcher).await?;
    let after = vm_rss_kib(server.pid())?;
    ensure!(after < before + BOUND_KIB, "VmRSS {after} KiB at the end");
    assert_still_serving(&d, &server).await
}

fn run_certs(args: &[&str], dir: &Path) -> Result<String> {
    let out = Command::new(certs_bin()?)
        .arg("revoke")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "keyless-certs revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn revoked_edge_certificate_is_refused_after_reload() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    // An empty CRL first, as an operator sets it up.
    run_certs(&[], d.dir())?;
    let config = d.write_config_variant("origin-crl.toml", |t| {
        set_tls(t, "client_crl", "origin/edge-ca.crl");
    })?;
    let server = KeyServer::start_with_config(&d, &config)?;
    let mut open = KeyClient::connect(&d).await?;
    assert_ping(&mut open)
        .await
        .context("accepted before revocation")?;

    let edge_cert = d.edge_identity().0;
    let printed = run_certs(&[&edge_cert.to_string_lossy()], d.dir())?;
    ensure!(printed.contains("1 revoked"), "{printed}");
    server.signal(Signal::Hup)?;
    server.wait_for_log(LOG_WAIT, |l| {
        l.contains("TLS configuration reloaded") && l.contains("client_crls=1")
    })?;

    // New connections with the revoked certificate get no service...
    for attempt in 0..2 {
        match ClientOptions::new(&d).connect().await {
            Err(ClientError::Handshake(_)) => {}
            Err(e) => bail!("attempt {attempt}: unexpected error {e}"),
            Ok(mut client) => match client.ping(b"revoked").await {
                Err(e) if e.is_closed() => {}
                other => bail!("attempt {attempt}: a revoked edge was served: {other:?}"),
            },
        }
    }
    // ...and the connection opened before the reload is closed.
    ensure!(
        open.expect_closed().await.is_ok(),
        "the revoked edge's open connection stayed open"
    );
    server.wait_for_log(LOG_WAIT, |l| l.contains("no longer accepted after reload"))?;
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn identity_is_the_first_dns_san_unless_cn_is_configured() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let (cert, key) = issue_edge_cert(&d, "cn-name", &["san-name", "second-san"])?;
    let options = ClientOptions::new(&d).identity(Some((cert, key)));
    for (name, identity, allowed) in [
        ("origin-san.toml", None, "san-name"),
        ("origin-cn.toml", Some("cn"), "cn-name"),
    ] {
        let config = d.write_config_variant(name, |t| {
            if let Some(identity) = identity {
                set_tls(t, "identity", identity);
            }
            add_acl(t, &format!("{DOMAIN}-ecdsa"), &[allowed]);
        })?;
        let server = KeyServer::start_with_config(&d, &config)?;
        let mut client = options.connect().await?;
        let (op, payload) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
        let sig = ok_payload(&client.call(op).await?).context(name)?;
        ensure!(ecdsa.verify(Opcode::EcdsaSignSha256, &payload, &sig)?);
        // The deployment's own edge is not in the ACL.
        let mut edge = KeyClient::connect(&d).await?;
        let (op, _) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
        expect_error(&edge.call(op).await?, ErrorCode::NotAuthorized)?;
        server.wait_for_log(LOG_WAIT, |l| {
            l.contains("edge connected") && l.contains(&format!("client={allowed}"))
        })?;
        drop(server);
    }
    Ok(())
}

/// An edge certificate from the deployment's edge CA with distinct CN and DNS SANs.
fn issue_edge_cert(
    d: &Deployment,
    cn: &str,
    sans: &[&str],
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::x509::extension::{ExtendedKeyUsage, SubjectAlternativeName};
    use openssl::x509::X509;

    let ca = X509::from_pem(&std::fs::read(d.dir().join("ca/edge-ca.crt"))?)?;
    let ca_key = PKey::private_key_from_pem(&std::fs::read(d.dir().join("ca/edge-ca.key"))?)?;
    let key = keyless_tests::keys::generate_key(KeySpec::EcP256)?;
    let mut b = keyless_tests::keys::cert_builder(&key, cn, Some(ca.subject_name()), 2)?;
    let mut san = SubjectAlternativeName::new();
    for s in sans {
        san.dns(s);
    }
    let san = san.build(&b.x509v3_context(Some(&ca), None))?;
    b.append_extension(san)?;
    b.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
    b.sign(&ca_key, MessageDigest::sha256())?;
    let cert = b.build();
    let cert_path = d.dir().join(format!("edge/{cn}.crt"));
    let key_path = d.dir().join(format!("edge/{cn}.key"));
    std::fs::write(&cert_path, cert.to_pem()?)?;
    std::fs::write(&key_path, key.private_key_to_pem_pkcs8()?)?;
    Ok((cert_path, key_path))
}

/// Checks `/proc/PID/limits`: "Max core file size  0  0  bytes".
fn assert_core_dumps_disabled(pid: u32, what: &str) -> Result<()> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .context("no core limit in /proc/PID/limits")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    ensure!(
        fields.get(4) == Some(&"0") && fields.get(5) == Some(&"0"),
        "{what}: core dumps not disabled: {line}"
    );
    Ok(())
}

#[tokio::test]
async fn key_server_and_edge_processes_have_core_dumps_disabled() -> Result<()> {
    let (d, server) = start()?;
    assert_core_dumps_disabled(server.pid(), "keyless-origin")?;
    let config = keyless_tests::EdgeConfig::new(&d)?.site(&[DOMAIN], "http://origin.invalid:8000");
    let edge = keyless_tests::Edge::start_with(&d, &config)?;
    assert_core_dumps_disabled(edge.pid(), "keyless-edge")
}

#[tokio::test]
async fn config_test_names_a_bad_crl_and_refuses_unknown_switch_values() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let missing = d.write_config_variant("origin-nocrl.toml", |t| {
        set_tls(t, "client_crl", "origin/no-such.crl");
    })?;
    let out = check_config(&missing)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success() && text.contains("no-such.crl"),
        "--test with a missing CRL: {text}"
    );
    for (name, edit) in [
        ("origin-badid.toml", ("identity", "email")),
        ("origin-badacl.toml", ("default_acl", "maybe")),
    ] {
        let config = d.write_config_variant(name, |t| {
            if edit.0 == "identity" {
                set_tls(t, edit.0, edit.1);
            } else {
                set_default_acl(t, edit.1);
            }
        })?;
        let out = check_config(&config)?;
        ensure!(
            !out.status.success(),
            "--test accepted {} = {}",
            edit.0,
            edit.1
        );
    }
    Ok(())
}

#[tokio::test]
async fn network_supplied_sni_cannot_forge_audit_lines() -> Result<()> {
    let (d, server) = start()?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let mut client = KeyClient::connect(&d).await?;
    let (mut op, _) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
    op.sni = Some("x.example\nFORGED audit: client=mallory result=ok".into());
    ok_payload(&client.call(op).await?)?;
    let line = server.wait_for_log(LOG_WAIT, |l| l.contains("x.example"))?;
    ensure!(
        line.contains(r#"sni="x.example\nFORGED audit: client=mallory result=ok""#),
        "SNI not escaped: {line}"
    );
    ensure!(
        !server.log().lines().any(|l| l.starts_with("FORGED")),
        "a forged line reached the log"
    );
    Ok(())
}

#[tokio::test]
async fn worker_queue_is_bounded_and_answers_overloaded_fast() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let config = d.write_config_variant("origin-queue.toml", |t| {
        t.insert("workers".into(), 1.into());
        t.insert("queue_size".into(), 8.into());
        t.insert("queue_deadline".into(), "300ms".into());
    })?;
    let server = KeyServer::start_with_config(&d, &config)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let mut client = KeyClient::connect(&d).await?;
    // Far more RSA signs at once than one worker does within the deadline.
    const N: usize = 400;
    let mut ops = Vec::with_capacity(N);
    let mut payloads = std::collections::HashMap::new();
    for _ in 0..N {
        let (op, payload) = handshake_sign_request(Opcode::RsaPssSignSha256, rsa.ski)?;
        ops.push(op);
        payloads.insert(ops.len() - 1, payload);
    }
    let started = Instant::now();
    let (ids, replies) = client.pipeline(ops).await?;
    let took = started.elapsed();
    let (mut signed, mut overloaded) = (0, 0);
    for reply in &replies {
        let i = ids
            .iter()
            .position(|id| *id == reply.id)
            .context("reply to an unknown id")?;
        match reply.op.opcode {
            Some(Opcode::Response) => {
                let payload = payloads.get(&i).context("payload")?;
                ensure!(rsa.verify(Opcode::RsaPssSignSha256, payload, reply.op.payload())?);
                signed += 1;
            }
            _ => {
                expect_error(&reply.op, ErrorCode::Overloaded)?;
                overloaded += 1;
            }
        }
    }
    eprintln!("{N} pipelined RSA signs: {signed} signed, {overloaded} overloaded, in {took:?}");
    ensure!(
        signed > 0 && overloaded > 0,
        "{signed} signed, {overloaded} overloaded"
    );
    // Every request was answered, and not after a long wait: the excess failed fast.
    ensure!(took < Duration::from_secs(5), "answers took {took:?}");
    let metrics = server.metrics_text()?;
    ensure!(
        metrics.contains("keyless_queue_dropped_total{reason=\"full\"}")
            || metrics.contains("keyless_queue_dropped_total{reason=\"predicted-late\"}"),
        "no queue refusals counted:\n{metrics}"
    );

    assert_ping(&mut client).await?;
    assert_still_serving(&d, &server).await?;
    drop(client);
    drop(server);

    // Jobs of a connection that went away are not performed: a long queue with a long
    // deadline, filled, then the connection closed.
    let config = d.write_config_variant("origin-queue-long.toml", |t| {
        t.insert("workers".into(), 1.into());
        t.insert("queue_size".into(), 1000.into());
        t.insert("queue_deadline".into(), "60s".into());
    })?;
    let server = KeyServer::start_with_config(&d, &config)?;
    let mut gone = KeyClient::connect(&d).await?;
    let mut ops = Vec::new();
    for _ in 0..500 {
        ops.push(handshake_sign_request(Opcode::RsaPssSignSha256, rsa.ski)?.0);
    }
    let first = gone.send_many(ops).await?;
    // Once the first answer is back the rest is queued; then the edge goes away.
    gone.recv_id(first[0]).await?;
    drop(gone);
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let metrics = server.metrics_text()?;
        if metrics.contains("keyless_queue_dropped_total{reason=\"requester-gone\"}") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no job of a closed connection was skipped:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = KeyClient::connect(&d).await?;
    assert_ping(&mut client).await?;
    assert_still_serving(&d, &server).await
}
