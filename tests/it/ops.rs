//! Every operation the key types support, each result verified with the public key of
//! the certificate.

use anyhow::{ensure, Context, Result};
use keyless_shared::{Opcode, Operation};
use keyless_tests::keys::{
    digest, install_key, random_bytes, tls12_x25519_signed_message, tls13_server_signed_message,
    KeyAlg, KeyEncoding, KeySpec, SiteKey,
};
use keyless_tests::{
    allow_rsa_decrypt, set_permissive, ClientOptions, Deployment, KeyClient, KeyServer, TlsVersion,
};
use ring::signature as rs;
use rustls::ProtocolVersion;

use crate::support::{assert_ping, ok_payload, start, start_permissive, DOMAIN};

/// Signs a random message's digest with every opcode `key` supports and verifies each
/// signature. Bare digests (the reference protocol): the key server must run with
/// `require_handshake_context = false`.
async fn sign_all(client: &mut KeyClient, key: &SiteKey) -> Result<()> {
    let opcodes = key.sign_opcodes();
    ensure!(!opcodes.is_empty(), "{}: no sign opcodes", key.stem);
    for opcode in opcodes {
        let message = random_bytes(100);
        let signed = digest(opcode, &message)?;
        let reply = client
            .sign(opcode, key.ski, &signed, None)
            .await
            .with_context(|| format!("{} {opcode}", key.stem))?;
        let sig = ok_payload(&reply).with_context(|| format!("{} {opcode}", key.stem))?;
        ensure!(
            key.verify(opcode, &signed, &sig)?,
            "{} {opcode}: signature does not verify",
            key.stem
        );
    }
    Ok(())
}

#[tokio::test]
async fn ping_echoes_over_tls13_and_tls12() -> Result<()> {
    let (d, _server) = start()?;
    for (version, expect) in [
        (TlsVersion::Tls13, ProtocolVersion::TLSv1_3),
        (TlsVersion::Tls12, ProtocolVersion::TLSv1_2),
    ] {
        let mut client = ClientOptions::new(&d).version(version).connect().await?;
        ensure!(client.protocol_version() == Some(expect));
        assert_ping(&mut client).await?;
        // An empty ping too.
        let pong = client.ping(b"").await?;
        ensure!(pong.opcode == Some(Opcode::Pong) && pong.payload().is_empty());
    }
    Ok(())
}

#[tokio::test]
async fn ecdsa_p256_every_sign_op() -> Result<()> {
    let (d, _server) = start_permissive()?;
    let key = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    ensure!(key.bits() == 256);
    let mut client = KeyClient::connect(&d).await?;
    sign_all(&mut client, &key).await?;
    // The same over TLS 1.2.
    let mut client = ClientOptions::new(&d)
        .version(TlsVersion::Tls12)
        .connect()
        .await?;
    sign_all(&mut client, &key).await
}

#[tokio::test]
async fn rsa_2048_every_pkcs1_and_pss_sign_op() -> Result<()> {
    let (d, _server) = start_permissive()?;
    let key = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    ensure!(key.bits() == 2048);
    let ops = key.sign_opcodes();
    for expected in [
        Opcode::RsaSignMd5Sha1,
        Opcode::RsaSignSha1,
        Opcode::RsaSignSha224,
        Opcode::RsaSignSha256,
        Opcode::RsaSignSha384,
        Opcode::RsaSignSha512,
        Opcode::RsaPssSignSha256,
        Opcode::RsaPssSignSha384,
        Opcode::RsaPssSignSha512,
    ] {
        ensure!(ops.contains(&expected), "{expected} not covered");
    }
    let mut client = KeyClient::connect(&d).await?;
    sign_all(&mut client, &key).await
}

#[tokio::test]
async fn extra_key_types_and_encodings() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let dir = d.keys_dir();
    // Installed before the server starts; each with its own names.
    let keys = [
        install_key(
            &dir,
            "ed.test-ed25519",
            KeySpec::Ed25519,
            KeyEncoding::Pkcs8,
            &["ed.test"],
        )?,
        install_key(
            &dir,
            "p384.test-sec1",
            KeySpec::EcP384,
            KeyEncoding::Traditional,
            &["p384.test"],
        )?,
        install_key(
            &dir,
            "p384.test-pkcs8",
            KeySpec::EcP384,
            KeyEncoding::Pkcs8,
            &["p384b.test"],
        )?,
        install_key(
            &dir,
            "p256.test-sec1",
            KeySpec::EcP256,
            KeyEncoding::Traditional,
            &["p256.test"],
        )?,
        install_key(
            &dir,
            "rsa4096.test-pkcs1",
            KeySpec::Rsa(4096),
            KeyEncoding::Traditional,
            &["rsa4096.test"],
        )?,
        install_key(
            &dir,
            "rsa2048.test-pkcs1",
            KeySpec::Rsa(2048),
            KeyEncoding::Traditional,
            &["rsa2048.test"],
        )?,
    ];
    for (stem, header) in [
        ("p384.test-sec1", "BEGIN EC PRIVATE KEY"),
        ("rsa4096.test-pkcs1", "BEGIN RSA PRIVATE KEY"),
        ("ed.test-ed25519", "BEGIN PRIVATE KEY"),
    ] {
        let pem = std::fs::read_to_string(dir.join(format!("{stem}.key")))?;
        ensure!(pem.contains(header), "{stem} is not {header}");
    }
    let config = d.write_config_variant("origin-permissive.toml", set_permissive)?;
    let _server = KeyServer::start_with_config(&d, &config)?;
    let mut client = KeyClient::connect(&d).await?;
    for key in &keys {
        sign_all(&mut client, key).await?;
    }
    Ok(())
}

#[tokio::test]
async fn rsa_decrypt_round_trip() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let rsa4096 = install_key(
        &d.keys_dir(),
        "big.test-rsa",
        KeySpec::Rsa(4096),
        KeyEncoding::Traditional,
        &["big.test"],
    )?;
    // Raw RSA decrypt is off unless enabled per key.
    let config = d.write_config_variant("origin-decrypt.toml", |t| {
        allow_rsa_decrypt(t, &format!("{DOMAIN}-rsa"));
        allow_rsa_decrypt(t, "big.test-rsa");
    })?;
    let _server = KeyServer::start_with_config(&d, &config)?;
    let mut client = KeyClient::connect(&d).await?;
    for key in [d.site_key(DOMAIN, KeyAlg::Rsa)?, rsa4096] {
        // A TLS RSA key exchange premaster secret: version ‖ 46 random bytes.
        let mut premaster = vec![0x03, 0x03];
        premaster.extend(random_bytes(46));
        let ciphertext = key.rsa_encrypt_pkcs1(&premaster)?;
        let modulus_len = (key.bits() / 8) as usize;
        ensure!(ciphertext.len() == modulus_len);
        let mut op = Operation::new(Opcode::RsaDecrypt, ciphertext);
        op.ski = Some(key.ski);
        let plain = ok_payload(&client.call(op).await?)?;
        ensure!(
            plain.len() == modulus_len,
            "raw RSA output is {} bytes, not the modulus length {modulus_len}",
            plain.len()
        );
        // EM = 00 ‖ 02 ‖ nonzero padding ‖ 00 ‖ message.
        ensure!(
            plain.starts_with(&[0x00, 0x02]),
            "not PKCS#1 type 2: {plain:02x?}"
        );
        ensure!(
            plain.ends_with(&premaster),
            "plaintext does not end with the message"
        );
        let sep = plain.len() - premaster.len() - 1;
        ensure!(plain.get(sep) == Some(&0));
        ensure!(plain
            .get(2..sep)
            .is_some_and(|pad| pad.iter().all(|b| *b != 0)));
    }
    Ok(())
}

/// Requests that carry the whole message (tag 0x40) as an edge sends them, each
/// signature verified by `ring` over that message.
#[tokio::test]
async fn sign_with_handshake_message_verifies_with_ring() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let ed = install_key(
        &d.keys_dir(),
        "ed.test",
        KeySpec::Ed25519,
        KeyEncoding::Pkcs8,
        &["ed.test"],
    )?;
    let _server = KeyServer::start(&d)?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let tls13 = || tls13_server_signed_message(&random_bytes(32));
    let tls13_384 = || tls13_server_signed_message(&random_bytes(48));
    let cases: Vec<(
        &SiteKey,
        Opcode,
        Vec<u8>,
        &'static dyn rs::VerificationAlgorithm,
    )> = vec![
        (
            &ecdsa,
            Opcode::EcdsaSignSha256,
            tls13(),
            &rs::ECDSA_P256_SHA256_ASN1,
        ),
        (
            &ecdsa,
            Opcode::EcdsaSignSha384,
            tls13_384(),
            &rs::ECDSA_P256_SHA384_ASN1,
        ),
        (
            &ecdsa,
            Opcode::EcdsaSignSha256,
            tls12_x25519_signed_message(),
            &rs::ECDSA_P256_SHA256_ASN1,
        ),
        (
            &rsa,
            Opcode::RsaPssSignSha256,
            tls13(),
            &rs::RSA_PSS_2048_8192_SHA256,
        ),
        (
            &rsa,
            Opcode::RsaPssSignSha384,
            tls13(),
            &rs::RSA_PSS_2048_8192_SHA384,
        ),
        (
            &rsa,
            Opcode::RsaPssSignSha512,
            tls13(),
            &rs::RSA_PSS_2048_8192_SHA512,
        ),
        (
            &rsa,
            Opcode::RsaSignSha256,
            tls12_x25519_signed_message(),
            &rs::RSA_PKCS1_2048_8192_SHA256,
        ),
        (
            &rsa,
            Opcode::RsaSignSha384,
            tls12_x25519_signed_message(),
            &rs::RSA_PKCS1_2048_8192_SHA384,
        ),
        (&ed, Opcode::Ed25519Sign, tls13(), &rs::ED25519),
    ];
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        let mut client = ClientOptions::new(&d).version(version).connect().await?;
        for (key, opcode, message, alg) in &cases {
            let payload = digest(*opcode, message)?;
            let reply = client
                .sign(*opcode, key.ski, &payload, Some(message))
                .await?;
            let sig = ok_payload(&reply).with_context(|| format!("{} {opcode}", key.stem))?;
            ensure!(
                key.verify_message_ring(*alg, message, &sig),
                "{} {opcode}: ring rejects the signature",
                key.stem
            );
        }
    }
    Ok(())
}
