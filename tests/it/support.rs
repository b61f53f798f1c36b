//! Helpers shared by the test modules.

use anyhow::{ensure, Context, Result};
use keyless_shared::{ErrorCode, Opcode, Operation};
use keyless_tests::{set_permissive, Deployment, KeyClient, KeyServer};

/// The domain every test deployment gets.
pub(crate) const DOMAIN: &str = "example.com";

/// A fresh deployment for [`DOMAIN`] and a key server running on it.
pub(crate) fn start() -> Result<(Deployment, KeyServer)> {
    let deployment = Deployment::init(&[DOMAIN])?;
    let server = KeyServer::start(&deployment)?;
    Ok((deployment, server))
}

/// Like [`start`], with the strict signing policy off (`require_handshake_context =
/// false`), for tests of the reference protocol's bare-digest operations.
pub(crate) fn start_permissive() -> Result<(Deployment, KeyServer)> {
    let deployment = Deployment::init(&[DOMAIN])?;
    let config = deployment.write_config_variant("origin-permissive.toml", set_permissive)?;
    let server = KeyServer::start_with_config(&deployment, &config)?;
    Ok((deployment, server))
}

/// A sign request as our edge sends it: the digest of a fresh TLS 1.3 CertificateVerify
/// input as payload (the input itself for Ed25519), and the input in tag 0x40.
/// Returns the request and the payload (what the signature verifies over).
pub(crate) fn handshake_sign_request(
    opcode: Opcode,
    ski: keyless_shared::Ski,
) -> Result<(Operation, Vec<u8>)> {
    let message =
        keyless_tests::keys::tls13_server_signed_message(&keyless_tests::keys::random_bytes(32));
    let payload = keyless_tests::keys::digest(opcode, &message)?;
    Ok((
        keyless_tests::sign_request(opcode, ski, &payload, Some(&message)),
        payload,
    ))
}

/// Checks that `reply` is a successful response and returns its payload.
pub(crate) fn ok_payload(reply: &Operation) -> Result<Vec<u8>> {
    ensure!(
        reply.opcode == Some(Opcode::Response),
        "expected a response, got {:?} (error {:?})",
        reply.opcode,
        reply.error_code()
    );
    Ok(reply.payload().to_vec())
}

/// Checks that `reply` is the error `code`.
pub(crate) fn expect_error(reply: &Operation, code: ErrorCode) -> Result<()> {
    ensure!(
        reply.opcode == Some(Opcode::Error) && reply.error_code() == Some(code),
        "expected error {code}, got {:?} with payload {:02x?}",
        reply.opcode,
        reply.payload()
    );
    Ok(())
}

/// Pings on `client` and checks the echo.
pub(crate) async fn assert_ping(client: &mut KeyClient) -> Result<()> {
    let payload = keyless_tests::keys::random_bytes(16);
    let pong = client.ping(&payload).await.context("ping")?;
    ensure!(
        pong.opcode == Some(Opcode::Pong) && pong.payload() == payload.as_slice(),
        "bad pong: {pong:?}"
    );
    Ok(())
}

/// The key server still accepts a new connection and answers a ping on it, and has not
/// panicked.
pub(crate) async fn assert_still_serving(
    deployment: &Deployment,
    server: &KeyServer,
) -> Result<()> {
    let mut client = KeyClient::connect(deployment)
        .await
        .context("new connection after the failure")?;
    assert_ping(&mut client).await?;
    server.assert_no_panic();
    Ok(())
}
