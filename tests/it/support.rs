//! Helpers shared by the test modules.

use anyhow::{ensure, Context, Result};
use keyless_shared::{ErrorCode, Opcode, Operation};
use keyless_tests::{Deployment, KeyClient, KeyServer};

/// The domain every test deployment gets.
pub(crate) const DOMAIN: &str = "example.com";

/// A fresh deployment for [`DOMAIN`] and a key server running on it.
pub(crate) fn start() -> Result<(Deployment, KeyServer)> {
    let deployment = Deployment::init(&[DOMAIN])?;
    let server = KeyServer::start(&deployment)?;
    Ok((deployment, server))
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
