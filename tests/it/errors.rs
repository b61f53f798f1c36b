//! Refused requests: each gets its specific error, is audited, and leaves the key
//! server serving.

use std::time::Duration;

use anyhow::{ensure, Result};
use keyless_shared::{ErrorCode, Opcode, Operation, Ski};
use keyless_tests::keys::{
    digest, install_key, random_bytes, tls12_x25519_signed_message, tls13_server_signed_message,
    KeyAlg, KeyEncoding, KeySpec,
};
use keyless_tests::{add_acl, has_field, Deployment, KeyClient, KeyServer, EDGE_NAME};

use crate::support::{assert_ping, assert_still_serving, expect_error, ok_payload, start, DOMAIN};

const AUDIT_WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn unknown_ski_is_key_not_found() -> Result<()> {
    let (d, server) = start()?;
    let mut client = KeyClient::connect(&d).await?;
    let ski = Ski([0x5a; 20]);
    let reply = client
        .sign(Opcode::EcdsaSignSha256, ski, &[1; 32], None)
        .await?;
    expect_error(&reply, ErrorCode::KeyNotFound)?;
    let line = server.wait_for_log(AUDIT_WAIT, |l| {
        has_field(l, "ski", &ski.to_string()) && has_field(l, "result", "key-not-found")
    })?;
    ensure!(has_field(&line, "client", EDGE_NAME), "audit line: {line}");
    // The connection stays usable after a per-request error.
    assert_ping(&mut client).await?;
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn wrong_digest_length_is_format_error() -> Result<()> {
    let (d, server) = start()?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let mut client = KeyClient::connect(&d).await?;
    for (ski, opcode, len) in [
        (ecdsa.ski, Opcode::EcdsaSignSha256, 31),
        (ecdsa.ski, Opcode::EcdsaSignSha256, 33),
        (ecdsa.ski, Opcode::EcdsaSignSha384, 32),
        (ecdsa.ski, Opcode::EcdsaSignSha1, 0),
        (rsa.ski, Opcode::RsaSignSha256, 20),
        (rsa.ski, Opcode::RsaPssSignSha512, 48),
        (rsa.ski, Opcode::RsaSignMd5Sha1, 32),
    ] {
        let reply = client.sign(opcode, ski, &vec![7; len], None).await?;
        expect_error(&reply, ErrorCode::Format)
            .map_err(|e| e.context(format!("{opcode} with {len} bytes")))?;
    }
    assert_ping(&mut client).await?;
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn op_unsupported_by_key_type_is_bad_opcode() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let ed = install_key(
        &d.keys_dir(),
        "ed.test",
        KeySpec::Ed25519,
        KeyEncoding::Pkcs8,
        &["ed.test"],
    )?;
    let server = KeyServer::start(&d)?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let mut client = KeyClient::connect(&d).await?;
    for (key, opcode) in [
        (&rsa, Opcode::EcdsaSignSha256),
        (&rsa, Opcode::Ed25519Sign),
        (&ecdsa, Opcode::RsaSignSha256),
        (&ecdsa, Opcode::RsaPssSignSha256),
        (&ecdsa, Opcode::RsaDecrypt),
        (&ecdsa, Opcode::Ed25519Sign),
        (&ed, Opcode::EcdsaSignSha256),
        (&ed, Opcode::RsaSignSha256),
    ] {
        let payload = if opcode == Opcode::RsaDecrypt {
            vec![1; 256]
        } else {
            digest(opcode, b"some message")?
        };
        let reply = client.sign(opcode, key.ski, &payload, None).await?;
        expect_error(&reply, ErrorCode::BadOpcode)
            .map_err(|e| e.context(format!("{opcode} on {}", key.stem)))?;
    }
    assert_ping(&mut client).await?;
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn acl_refusal_is_not_authorized_and_audited() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let config = d.write_config_variant("origin-acl.toml", |t| {
        add_acl(t, &format!("{DOMAIN}-ecdsa"), &["edge-2"]);
        add_acl(t, &format!("{DOMAIN}-rsa"), &["edge-2", EDGE_NAME]);
    })?;
    let server = KeyServer::start_with_config(&d, &config)?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let mut client = KeyClient::connect(&d).await?;

    let reply = client
        .sign(Opcode::EcdsaSignSha256, ecdsa.ski, &[3; 32], None)
        .await?;
    expect_error(&reply, ErrorCode::NotAuthorized)?;
    let line = server.wait_for_log(AUDIT_WAIT, |l| {
        has_field(l, "result", "not-authorized") && has_field(l, "ski", &ecdsa.ski.to_string())
    })?;
    ensure!(
        has_field(&line, "client", EDGE_NAME) && has_field(&line, "op", "ecdsa-sign-sha256"),
        "audit line lacks client or op: {line}"
    );

    // A key whose ACL lists this edge, and the same edge's other requests, still work.
    let m = tls13_server_signed_message(&random_bytes(32));
    let signed = digest(Opcode::RsaPssSignSha256, &m)?;
    let reply = client
        .sign(Opcode::RsaPssSignSha256, rsa.ski, &signed, Some(&m))
        .await?;
    let sig = ok_payload(&reply)?;
    ensure!(rsa.verify(Opcode::RsaPssSignSha256, &signed, &sig)?);
    assert_ping(&mut client).await?;
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn policy_refuses_non_handshake_messages() -> Result<()> {
    let (d, server) = start()?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let mut client = KeyClient::connect(&d).await?;

    let junk = b"pay 1000 to mallory".to_vec();
    let tls13 = tls13_server_signed_message(&random_bytes(32));
    let mut wrong_digest = digest(Opcode::EcdsaSignSha256, &tls13)?;
    wrong_digest[0] ^= 1;
    let mut client_context = tls13.clone();
    // "client" instead of "server" CertificateVerify: not what a server signs.
    let at = 64 + b"TLS 1.3, ".len();
    client_context.splice(at..at + 6, b"client".iter().copied());
    let cases = [
        (
            "arbitrary message",
            Opcode::EcdsaSignSha256,
            ecdsa.ski,
            digest(Opcode::EcdsaSignSha256, &junk)?,
            junk.clone(),
        ),
        (
            "digest of another message",
            Opcode::EcdsaSignSha256,
            ecdsa.ski,
            wrong_digest,
            tls13.clone(),
        ),
        (
            "TLS 1.3 client CertificateVerify",
            Opcode::EcdsaSignSha256,
            ecdsa.ski,
            digest(Opcode::EcdsaSignSha256, &client_context)?,
            client_context,
        ),
        (
            "RSA PKCS#1 over a TLS 1.3 CertificateVerify",
            Opcode::RsaSignSha256,
            rsa.ski,
            digest(Opcode::RsaSignSha256, &tls13)?,
            tls13.clone(),
        ),
        (
            "RSA-PSS over an arbitrary message",
            Opcode::RsaPssSignSha256,
            rsa.ski,
            digest(Opcode::RsaPssSignSha256, &junk)?,
            junk.clone(),
        ),
    ];
    for (what, opcode, ski, payload, message) in &cases {
        let reply = client.sign(*opcode, *ski, payload, Some(message)).await?;
        expect_error(&reply, ErrorCode::PolicyRefused).map_err(|e| e.context(*what))?;
    }
    server.wait_for_log(AUDIT_WAIT, |l| {
        has_field(l, "result", "policy-refused") && has_field(l, "client", EDGE_NAME)
    })?;
    assert_ping(&mut client).await?;
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn required_handshake_context_refuses_bare_digests() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let config = d.write_config_variant("origin-strict.toml", |t| {
        t.insert("require_handshake_context".into(), true.into());
    })?;
    let server = KeyServer::start_with_config(&d, &config)?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let mut client = KeyClient::connect(&d).await?;

    for (key, opcode) in [
        (&ecdsa, Opcode::EcdsaSignSha256),
        (&rsa, Opcode::RsaPssSignSha256),
        (&rsa, Opcode::RsaSignSha256),
    ] {
        let reply = client
            .sign(opcode, key.ski, &digest(opcode, b"x")?, None)
            .await?;
        expect_error(&reply, ErrorCode::PolicyRefused)
            .map_err(|e| e.context(format!("bare {opcode}")))?;
    }
    // Raw RSA decrypt cannot be tied to a handshake: refused as well.
    let mut op = Operation::new(Opcode::RsaDecrypt, rsa.rsa_encrypt_pkcs1(b"premaster")?);
    op.ski = Some(rsa.ski);
    expect_error(&client.call(op).await?, ErrorCode::PolicyRefused)
        .map_err(|e| e.context("rsa decrypt"))?;

    // With the handshake message the same keys sign.
    let m = tls13_server_signed_message(&random_bytes(32));
    let signed = digest(Opcode::EcdsaSignSha256, &m)?;
    let reply = client
        .sign(Opcode::EcdsaSignSha256, ecdsa.ski, &signed, Some(&m))
        .await?;
    ensure!(ecdsa.verify(Opcode::EcdsaSignSha256, &signed, &ok_payload(&reply)?)?);
    let m = tls12_x25519_signed_message();
    let signed = digest(Opcode::RsaSignSha256, &m)?;
    let reply = client
        .sign(Opcode::RsaSignSha256, rsa.ski, &signed, Some(&m))
        .await?;
    ensure!(rsa.verify(Opcode::RsaSignSha256, &signed, &ok_payload(&reply)?)?);
    assert_ping(&mut client).await?;
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn successful_ops_are_audited() -> Result<()> {
    let (d, server) = start()?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let mut client = KeyClient::connect(&d).await?;
    let m = tls13_server_signed_message(&random_bytes(32));
    let signed = digest(Opcode::EcdsaSignSha256, &m)?;
    let mut op = keyless_tests::sign_request(Opcode::EcdsaSignSha256, ecdsa.ski, &signed, Some(&m));
    op.sni = Some("www.example.com".into());
    ok_payload(&client.call(op).await?)?;
    let line = server.wait_for_log(AUDIT_WAIT, |l| {
        has_field(l, "op", "ecdsa-sign-sha256") && has_field(l, "result", "ok")
    })?;
    for (k, v) in [
        ("client", EDGE_NAME),
        ("sni", "www.example.com"),
        ("ski", &ecdsa.ski.to_string()),
    ] {
        ensure!(has_field(&line, k, v), "audit line lacks {k}={v}: {line}");
    }
    ensure!(
        line.contains("duration_us="),
        "audit line lacks duration_us: {line}"
    );
    ensure!(
        line.contains("audit"),
        "audit line lacks its target: {line}"
    );
    // No signature input or key material in the log.
    let log = server.log();
    ensure!(
        !log.contains(&hex::encode(&signed)),
        "the digest was logged"
    );
    ensure!(!log.contains(&hex::encode(&m)), "the message was logged");
    Ok(())
}

#[tokio::test]
async fn malformed_requests_get_their_error_and_keep_the_connection() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    // Raw RSA decrypt enabled, so the malformed ciphertexts reach the RSA operation.
    let config = d.write_config_variant("origin-decrypt.toml", |t| {
        keyless_tests::allow_rsa_decrypt(t, &format!("{DOMAIN}-rsa"));
    })?;
    let server = KeyServer::start_with_config(&d, &config)?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let mut client = KeyClient::connect(&d).await?;
    let with_ski = |opcode: Opcode, ski: Ski, payload: Vec<u8>| Operation {
        ski: Some(ski),
        ..Operation::new(opcode, payload)
    };
    let cases = [
        ("no opcode", Operation::default(), ErrorCode::Format),
        (
            "sign without SKI",
            Operation::new(Opcode::EcdsaSignSha256, vec![0u8; 32]),
            ErrorCode::Format,
        ),
        (
            "chain without SNI",
            Operation::new(Opcode::GetCertificateChain, Vec::new()),
            ErrorCode::Format,
        ),
        (
            "unknown opcode",
            with_ski(Opcode::Unknown(0x99), ecdsa.ski, vec![0u8; 32]),
            ErrorCode::BadOpcode,
        ),
        (
            "a response sent as a request",
            Operation::new(Opcode::Response, vec![1]),
            ErrorCode::UnexpectedOpcode,
        ),
        (
            "RSA decrypt of a short ciphertext",
            with_ski(Opcode::RsaDecrypt, rsa.ski, vec![1u8; 255]),
            ErrorCode::Format,
        ),
    ];
    for (what, op, code) in cases {
        let reply = client.call(op).await?;
        expect_error(&reply, code).map_err(|e| e.context(what))?;
    }
    // A ciphertext not below the modulus cannot be decrypted.
    let reply = client
        .call(with_ski(Opcode::RsaDecrypt, rsa.ski, vec![0xff; 256]))
        .await?;
    expect_error(&reply, ErrorCode::Crypto)
        .map_err(|e| e.context("raw RSA of a value above the modulus"))?;
    assert_ping(&mut client).await?;
    assert_still_serving(&d, &server).await
}
