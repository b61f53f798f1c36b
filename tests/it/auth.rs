//! Mutual TLS: clients without a certificate, or with one from another CA, get no
//! service, and the key server keeps serving the real edge.

use anyhow::{bail, Result};
use keyless_tests::{ClientError, ClientOptions, Deployment, TlsVersion};

use crate::support::{assert_still_serving, start, DOMAIN};

/// Connects with `options` and expects the handshake to fail or the first request to
/// get no reply (with TLS 1.3 the client finishes its side of the handshake before the
/// key server has checked its certificate).
async fn expect_refused(options: ClientOptions) -> Result<()> {
    let mut client = match options.connect().await {
        Err(ClientError::Handshake(_)) => return Ok(()),
        Err(e) => bail!("unexpected connect error: {e}"),
        Ok(client) => client,
    };
    match client.ping(b"anyone there?").await {
        Ok(reply) => bail!("the key server answered an unauthenticated client: {reply:?}"),
        Err(e) if e.is_closed() => Ok(()),
        Err(e) => bail!("expected the connection to be closed, got {e}"),
    }
}

#[tokio::test]
async fn missing_client_certificate_is_refused() -> Result<()> {
    let (d, server) = start()?;
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        expect_refused(ClientOptions::new(&d).identity(None).version(version)).await?;
    }
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() -> Result<()> {
    let (d, server) = start()?;
    // Another deployment's edge: same name, same layout, different edge CA.
    let other = Deployment::init(&[DOMAIN])?;
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        expect_refused(
            ClientOptions::new(&d)
                .identity(Some(other.edge_identity()))
                .version(version),
        )
        .await?;
    }
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn key_server_certificate_is_checked_by_the_client() -> Result<()> {
    // The edge refuses a key server whose certificate does not chain to its CA: the
    // other deployment's key-server CA does not vouch for this key server.
    let (d, server) = start()?;
    let other = Deployment::init(&[DOMAIN])?;
    let mut options = ClientOptions::new(&d);
    options.roots = other.keyserver_ca();
    match options.connect().await {
        Err(ClientError::Handshake(_)) => {}
        res => bail!("expected a handshake failure, got {res:?}"),
    }
    assert_still_serving(&d, &server).await
}
