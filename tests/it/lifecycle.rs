//! Operating the key server: SIGHUP reload, SIGTERM shutdown, metrics.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use keyless_shared::{ErrorCode, Opcode, Operation};
use keyless_tests::keys::{
    digest, install_key, tls13_server_signed_message, KeyAlg, KeyEncoding, KeySpec, SiteKey,
};
use keyless_tests::{KeyClient, Signal};

use crate::support::{assert_ping, expect_error, ok_payload, start, DOMAIN};

const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// Signs with `key` over `client` (a handshake message, as an edge sends it) and
/// returns the reply.
async fn try_sign(client: &mut KeyClient, key: &SiteKey) -> Result<Operation> {
    let message =
        tls13_server_signed_message(&digest(Opcode::EcdsaSignSha256, key.stem.as_bytes())?);
    let signed = digest(Opcode::EcdsaSignSha256, &message)?;
    let reply = client
        .sign(Opcode::EcdsaSignSha256, key.ski, &signed, Some(&message))
        .await?;
    if reply.opcode == Some(Opcode::Response) {
        ensure!(
            key.verify(Opcode::EcdsaSignSha256, &signed, reply.payload())?,
            "{}: signature does not verify",
            key.stem
        );
    }
    Ok(reply)
}

/// Polls until `key` signs on `client` (the reload is asynchronous to the signal).
async fn wait_until_signs(client: &mut KeyClient, key: &SiteKey) -> Result<()> {
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        let reply = try_sign(client, key).await?;
        if reply.opcode == Some(Opcode::Response) {
            return Ok(());
        }
        expect_error(&reply, ErrorCode::KeyNotFound)?;
        if Instant::now() >= deadline {
            bail!("{} still unknown {RELOAD_WAIT:?} after SIGHUP", key.stem);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn new_key_stem(n: u32) -> String {
    format!("new{n}.example.net-ecdsa")
}

fn new_key(d: &keyless_tests::Deployment, n: u32) -> Result<SiteKey> {
    let name = format!("new{n}.example.net");
    install_key(
        &d.keys_dir(),
        &new_key_stem(n),
        KeySpec::EcP256,
        KeyEncoding::Pkcs8,
        &[&name],
    )
}

#[tokio::test]
async fn sighup_loads_a_new_key_for_open_connections() -> Result<()> {
    let (d, server) = start()?;
    let old = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let mut client = KeyClient::connect(&d).await?;
    ok_payload(&try_sign(&mut client, &old).await?)?;

    // Made outside the keys dir, then copied in, as an operator would.
    let staging = keyless_tests::unique_temp_dir("staging")?;
    std::fs::create_dir_all(&staging)?;
    let stem = new_key_stem(1);
    let fresh = install_key(
        &staging,
        &stem,
        KeySpec::EcP256,
        KeyEncoding::Pkcs8,
        &["new1.example.net"],
    )?;
    expect_error(
        &try_sign(&mut client, &fresh).await?,
        ErrorCode::KeyNotFound,
    )?;
    for ext in ["crt", "key"] {
        std::fs::copy(
            staging.join(format!("{stem}.{ext}")),
            d.keys_dir().join(format!("{stem}.{ext}")),
        )?;
    }
    std::fs::remove_dir_all(&staging)?;
    server.signal(Signal::Hup)?;
    wait_until_signs(&mut client, &fresh).await?;
    // Old keys still there, and a new connection sees the new key too.
    ok_payload(&try_sign(&mut client, &old).await?)?;
    let mut other = KeyClient::connect(&d).await?;
    ok_payload(&try_sign(&mut other, &fresh).await?)?;
    let metrics = server.metrics_text()?;
    ensure!(
        metrics.lines().any(|l| l == "keyless_keys_loaded 3"),
        "keyless_keys_loaded is not 3 after the reload:\n{metrics}"
    );
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn sighup_with_a_bad_file_keeps_the_old_keys() -> Result<()> {
    let (d, mut server) = start()?;
    let old = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let mut client = KeyClient::connect(&d).await?;

    // A valid new key alongside a garbage key file: the reload must not half-apply.
    let pending = new_key(&d, 2)?;
    std::fs::write(
        d.keys_dir().join("broken.key"),
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )?;
    server.signal(Signal::Hup)?;
    server.wait_for_log(RELOAD_WAIT, |l| l.contains("broken.key"))?;
    ensure!(server.is_running(), "the key server died on a bad reload");
    ok_payload(&try_sign(&mut client, &old).await?)?;
    expect_error(
        &try_sign(&mut client, &pending).await?,
        ErrorCode::KeyNotFound,
    )?;
    assert_ping(&mut client).await?;

    // Once the bad file is gone, the next reload applies.
    std::fs::remove_file(d.keys_dir().join("broken.key"))?;
    server.signal(Signal::Hup)?;
    wait_until_signs(&mut client, &pending).await?;
    ok_payload(&try_sign(&mut client, &old).await?)?;
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn sigterm_exits_zero() -> Result<()> {
    let (d, mut server) = start()?;
    let mut client = KeyClient::connect(&d).await?;
    assert_ping(&mut client).await?;
    // An idle edge connection stays open during the shutdown.
    server.signal(Signal::Term)?;
    let status = server.wait_exit(Duration::from_secs(20))?;
    ensure!(
        status.success(),
        "keyless-origin exited with {status} on SIGTERM; log:\n{}",
        server.log()
    );
    server.assert_no_panic();
    // And it really stopped listening.
    ensure!(
        std::net::TcpStream::connect(d.listen()).is_err(),
        "still accepting after exit"
    );
    Ok(())
}

#[tokio::test]
async fn metrics_count_operations() -> Result<()> {
    let (d, server) = start()?;
    let key = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let mut client = KeyClient::connect(&d).await?;
    for _ in 0..3 {
        ok_payload(&try_sign(&mut client, &key).await?)?;
    }
    assert_ping(&mut client).await?;
    let unknown = Operation {
        ski: Some(keyless_shared::Ski([9; 20])),
        ..Operation::new(Opcode::EcdsaSignSha256, vec![0u8; 32])
    };
    expect_error(&client.call(unknown).await?, ErrorCode::KeyNotFound)?;

    let text = server.metrics_text()?;
    let count = |opcode: &str, result: &str| -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with("keyless_ops_total{"))
            .find(|l| {
                l.contains(&format!("opcode=\"{opcode}\""))
                    && l.contains(&format!("result=\"{result}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    ensure!(
        count("ecdsa-sign-sha256", "ok") == Some(3.0),
        "no keyless_ops_total for 3 ECDSA signs:\n{text}"
    );
    ensure!(
        count("ecdsa-sign-sha256", "key-not-found") == Some(1.0),
        "no keyless_ops_total for the refused sign:\n{text}"
    );
    for name in [
        "keyless_op_queue_seconds",
        "keyless_op_exec_seconds",
        "keyless_connections_active",
        "keyless_keys_loaded",
        "keyless_certificate_expiry_timestamp_seconds",
    ] {
        ensure!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    let keys_loaded = text
        .lines()
        .find(|l| l.starts_with("keyless_keys_loaded"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    ensure!(
        keys_loaded == Some(2.0),
        "keyless_keys_loaded is {keys_loaded:?}, not 2"
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_answers_requests_in_flight() -> Result<()> {
    let (d, mut server) = start()?;
    let key = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let mut client = KeyClient::connect(&d).await?;
    let message = tls13_server_signed_message(&[0xd7; 32]);
    let signed = digest(Opcode::RsaPssSignSha256, &message)?;
    let mut ids = Vec::new();
    for _ in 0..32 {
        ids.push(
            client
                .send(keyless_tests::sign_request(
                    Opcode::RsaPssSignSha256,
                    key.ski,
                    &signed,
                    Some(&message),
                ))
                .await?,
        );
    }
    // Let the key server read them, then ask it to stop while they are being signed.
    let first = client.recv().await?;
    server.signal(Signal::Term)?;
    // The drain's go-away (id 0) comes among the replies; every request is answered, and
    // the key server waits for the edge to close (keyserver_drain.rs has the details).
    let mut replies = vec![first];
    let mut go_away = false;
    while replies.len() < ids.len() || !go_away {
        let msg = client.recv().await?;
        if msg.id == 0 {
            ensure!(
                !go_away && msg.op.opcode == Some(Opcode::GoAway),
                "id 0 is not the one go-away: {msg:?}"
            );
            go_away = true;
        } else {
            replies.push(msg);
        }
    }
    drop(client);
    for reply in &replies {
        ensure!(ids.contains(&reply.id), "reply to unknown id {}", reply.id);
        ensure!(key.verify(Opcode::RsaPssSignSha256, &signed, &ok_payload(&reply.op)?)?);
    }
    let status = server.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "exit status {status} after draining");
    server.assert_no_panic();
    Ok(())
}
