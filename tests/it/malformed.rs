//! Malformed frames close only the connection that sent them: the key server may answer
//! with an error first, never panics, and keeps serving its other connections.

use anyhow::{ensure, Context, Result};
use keyless_shared::{ErrorCode, Opcode};
use keyless_tests::KeyClient;

use crate::support::{assert_ping, assert_still_serving, start};

/// A frame with the given header fields and raw TLV items.
fn frame(major: u8, id: u32, items: &[(u8, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, value) in items {
        body.push(*tag);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    with_header(major, id, body.len() as u16, &body)
}

fn with_header(major: u8, id: u32, len: u16, body: &[u8]) -> Vec<u8> {
    let mut out = vec![major, 0];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Deterministic noise (xorshift), so a failure can be replayed.
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// Sends `bytes` on a fresh connection while another connection is open, and checks
/// that only the first is closed (after error replies at most) and that the key server
/// keeps working without panicking.
async fn check_closes_only_that_connection(
    bytes: &[u8],
    expect_error: Option<ErrorCode>,
) -> Result<()> {
    let (d, server) = start()?;
    let mut bystander = KeyClient::connect(&d).await?;
    assert_ping(&mut bystander).await?;

    let mut victim = KeyClient::connect(&d).await?;
    assert_ping(&mut victim).await?;
    // The write may fail if the key server closes early: what matters is what follows.
    let _ = victim.send_raw(bytes).await;
    let before_close = victim
        .expect_closed()
        .await
        .context("the key server kept the connection open after a malformed frame")?;
    for msg in &before_close {
        ensure!(
            msg.op.opcode == Some(Opcode::Error),
            "only error replies may precede the close, got {msg:?}"
        );
    }
    if let (Some(code), Some(first)) = (expect_error, before_close.first()) {
        ensure!(
            first.op.error_code() == Some(code),
            "expected error {code}, got {:?}",
            first.op
        );
    }

    assert_ping(&mut bystander)
        .await
        .context("the other connection broke")?;
    assert_still_serving(&d, &server).await
}

#[tokio::test]
async fn item_longer_than_frame() -> Result<()> {
    // One payload item announcing 9 bytes in a 4-byte body.
    let bytes = with_header(1, 7, 4, &[0x12, 0x00, 0x09, 0x00]);
    check_closes_only_that_connection(&bytes, Some(ErrorCode::Format)).await
}

#[tokio::test]
async fn truncated_item_header() -> Result<()> {
    let bytes = with_header(1, 8, 2, &[0x11, 0x00]);
    check_closes_only_that_connection(&bytes, Some(ErrorCode::Format)).await
}

#[tokio::test]
async fn duplicate_known_tag() -> Result<()> {
    let bytes = frame(1, 9, &[(0x11, &[0xF1]), (0x12, b"a"), (0x11, &[0xF1])]);
    check_closes_only_that_connection(&bytes, Some(ErrorCode::Format)).await
}

#[tokio::test]
async fn item_of_wrong_size() -> Result<()> {
    // A 19-byte SKI and a 2-byte opcode.
    let bytes = frame(
        1,
        10,
        &[(0x11, &[0x15]), (0x04, &[0u8; 19]), (0x12, &[0u8; 32])],
    );
    check_closes_only_that_connection(&bytes, Some(ErrorCode::Format)).await?;
    let bytes = frame(1, 11, &[(0x11, &[0xF1, 0xF1])]);
    check_closes_only_that_connection(&bytes, Some(ErrorCode::Format)).await
}

#[tokio::test]
async fn max_size_body_of_garbage() -> Result<()> {
    // 0x80 never names a known tag, so the first item's length decides: it must run past
    // the end of the body.
    let mut body = garbage(usize::from(u16::MAX), 0x5eed_0001);
    body[0] = 0x80;
    body[1] = 0xff;
    body[2] = 0xff;
    let bytes = with_header(1, 12, u16::MAX, &body);
    check_closes_only_that_connection(&bytes, Some(ErrorCode::Format)).await
}

#[tokio::test]
async fn pure_garbage() -> Result<()> {
    let mut bytes = garbage(4096, 0x5eed_0002);
    // Not a version-1 header.
    bytes[0] = 0x17;
    check_closes_only_that_connection(&bytes, None).await
}

#[tokio::test]
async fn wrong_major_version() -> Result<()> {
    let mut bytes = frame(2, 13, &[(0x11, &[0xF1]), (0x12, b"hi")]);
    bytes.extend(frame(2, 14, &[(0x11, &[0xF1])]));
    check_closes_only_that_connection(&bytes, Some(ErrorCode::VersionMismatch)).await
}

#[tokio::test]
async fn plaintext_instead_of_tls() -> Result<()> {
    // A Keyless frame sent without TLS: the handshake fails and nothing else does.
    use std::io::{Read, Write};
    let (d, server) = start()?;
    let mut tcp = std::net::TcpStream::connect(d.listen())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    tcp.write_all(&frame(1, 1, &[(0x11, &[0xF1])]))?;
    let mut sink = Vec::new();
    // Reads until the key server closes (an alert may come first); a reset is fine too.
    let _ = tcp.read_to_end(&mut sink);
    assert_still_serving(&d, &server).await
}
