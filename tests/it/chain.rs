//! get-certificate-chain (extension opcode 0x40): chains by SNI, exact and wildcard.

use anyhow::{ensure, Result};
use keyless_shared::{ErrorCode, Opcode, Operation};
use keyless_tests::keys::{parse_chain, KeyAlg};
use keyless_tests::{Deployment, KeyClient, KeyServer};

use crate::support::{assert_still_serving, expect_error, ok_payload, DOMAIN};

fn chain_request(sni: &str) -> Operation {
    Operation {
        opcode: Some(Opcode::GetCertificateChain),
        sni: Some(sni.to_owned()),
        ..Operation::default()
    }
}

#[tokio::test]
async fn chain_by_exact_and_wildcard_name() -> Result<()> {
    let d = Deployment::init(&[DOMAIN, "x.org"])?;
    let _server = KeyServer::start(&d)?;
    let mut client = KeyClient::connect(&d).await?;
    for (sni, domain) in [
        (DOMAIN, DOMAIN),
        ("www.example.com", DOMAIN),
        ("WWW.Example.COM", DOMAIN),
        ("x.org", "x.org"),
        ("a.x.org", "x.org"),
    ] {
        let reply = client.call(chain_request(sni)).await?;
        let chain = parse_chain(&ok_payload(&reply)?)?;
        let candidates = [
            d.site_key(domain, KeyAlg::Ecdsa)?,
            d.site_key(domain, KeyAlg::Rsa)?,
        ];
        let key = candidates
            .iter()
            .find(|k| k.chain.first() == chain.first())
            .ok_or_else(|| anyhow::anyhow!("{sni}: the leaf is none of {domain}'s certificates"))?;
        ensure!(
            chain == key.chain,
            "{sni}: chain differs from {:?}",
            key.cert_path
        );
        ensure!(
            reply.ski == Some(key.ski),
            "{sni}: reply SKI {:?} is not the leaf key's {}",
            reply.ski,
            key.ski
        );
    }
    Ok(())
}

#[tokio::test]
async fn chain_for_unknown_name_is_cert_not_found() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let server = KeyServer::start(&d)?;
    let mut client = KeyClient::connect(&d).await?;
    // A wildcard covers one label only, and other domains are unknown.
    for sni in ["unknown.invalid", "a.b.example.com", "example.org", "com"] {
        let reply = client.call(chain_request(sni)).await?;
        expect_error(&reply, ErrorCode::CertNotFound)?;
    }
    assert_still_serving(&d, &server).await
}
