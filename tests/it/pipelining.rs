//! Many requests in flight on one connection: every one answered once, with its id.

use std::collections::HashMap;

use anyhow::{bail, ensure, Result};
use keyless_shared::{Opcode, Operation};
use keyless_tests::keys::{digest, tls13_server_signed_message, KeyAlg};
use keyless_tests::{sign_request, ClientOptions, KeyClient, TlsVersion};

use crate::support::{assert_ping, ok_payload, start, DOMAIN};

const REQUESTS: usize = 1000;

#[tokio::test]
async fn thousand_pipelined_requests_answered_by_id() -> Result<()> {
    let (d, server) = start()?;
    let key = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        let mut client = ClientOptions::new(&d).version(version).connect().await?;
        // Pings carry their index; signs sign a handshake message made from it.
        let mut ops = Vec::with_capacity(REQUESTS);
        for i in 0..REQUESTS {
            let tag = format!("request {i}").into_bytes();
            ops.push(if i % 2 == 0 {
                Operation::new(Opcode::Ping, tag)
            } else {
                let message = tls13_server_signed_message(&digest(Opcode::EcdsaSignSha256, &tag)?);
                sign_request(
                    Opcode::EcdsaSignSha256,
                    key.ski,
                    &digest(Opcode::EcdsaSignSha256, &message)?,
                    Some(&message),
                )
            });
        }
        let (ids, replies) = client.pipeline(ops.clone()).await?;
        ensure!(replies.len() == REQUESTS);
        let mut by_id: HashMap<u32, Operation> = HashMap::new();
        for reply in replies {
            if by_id.insert(reply.id, reply.op).is_some() {
                bail!("two replies with id {}", reply.id);
            }
        }
        for (i, (id, request)) in ids.iter().zip(&ops).enumerate() {
            let Some(reply) = by_id.get(id) else {
                bail!("no reply for request {i} (id {id})");
            };
            if request.opcode == Some(Opcode::Ping) {
                ensure!(
                    reply.opcode == Some(Opcode::Pong) && reply.payload() == request.payload(),
                    "request {i}: bad pong {reply:?}"
                );
            } else {
                let sig = ok_payload(reply)?;
                ensure!(
                    key.verify(Opcode::EcdsaSignSha256, request.payload(), &sig)?,
                    "request {i}: signature does not verify"
                );
            }
        }
        // The connection is still in order afterwards.
        assert_ping(&mut client).await?;
    }
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn replies_are_matched_by_id_across_interleaved_calls() -> Result<()> {
    let (d, _server) = start()?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let mut client = KeyClient::connect(&d).await?;
    // A slow RSA sign, then a ping, in one write: whichever reply comes first, each id
    // gets its own.
    let message = tls13_server_signed_message(&[0x51; 32]);
    let signed = digest(Opcode::RsaPssSignSha256, &message)?;
    let ids = client
        .send_many(vec![
            sign_request(Opcode::RsaPssSignSha256, rsa.ski, &signed, Some(&message)),
            Operation::new(Opcode::Ping, b"fast".to_vec()),
        ])
        .await?;
    let [sig_reply, pong] = <[Operation; 2]>::try_from(client.collect(&ids).await?)
        .map_err(|r| anyhow::anyhow!("expected 2 replies, got {r:?}"))?;
    ensure!(pong.opcode == Some(Opcode::Pong) && pong.payload() == b"fast");
    let sig = ok_payload(&sig_reply)?;
    ensure!(rsa.verify(Opcode::RsaPssSignSha256, &signed, &sig)?);
    // And one at a time, the ping overtaking the sign.
    let sign_id = client
        .send(sign_request(
            Opcode::RsaPssSignSha256,
            rsa.ski,
            &signed,
            Some(&message),
        ))
        .await?;
    let ping_id = client
        .send(Operation::new(Opcode::Ping, b"fast".to_vec()))
        .await?;
    let pong = client.recv_id(ping_id).await?;
    ensure!(pong.opcode == Some(Opcode::Pong) && pong.payload() == b"fast");
    let sig = ok_payload(&client.recv_id(sign_id).await?)?;
    ensure!(rsa.verify(Opcode::RsaPssSignSha256, &signed, &sig)?);
    Ok(())
}
