//! The edge as a user meets it: curl and openssl s_client over real TLS to a running
//! `keyless-edge`, whose every handshake signature is made by the key server, in front
//! of a content origin found through a real DNS server.

use anyhow::{ensure, Result};
use keyless_tests::{HttpVersion, TlsVersion};

use crate::edge_support::{
    leaf_key_type, stack, StackBuilder, ORIGIN_HOST, RSA_SITE, SITE, WILDCARD_NAME,
};

/// What curl's `-v` says about the negotiated protocol (`SSL connection using TLSv1.3 /
/// ...`).
fn curl_tls_version(stderr: &str) -> Option<&str> {
    stderr.lines().find_map(|l| {
        let rest = l.split("SSL connection using ").nth(1)?;
        rest.split_whitespace().next()
    })
}

/// Every TLS version × HTTP version pair reaches the origin through the edge.
fn assert_matrix(stack: &crate::edge_support::Stack, host: &str) -> Result<()> {
    for (tls, tls_name) in [
        (TlsVersion::Tls13, "TLSv1.3"),
        (TlsVersion::Tls12, "TLSv1.2"),
    ] {
        for (http, http_name) in [(HttpVersion::Http11, "1.1"), (HttpVersion::Http2, "2")] {
            let out = stack
                .edge
                .curl(host)
                .tls(tls)
                .http(http)
                .arg("-v")
                .get(&stack.url(host, "/"))?;
            out.expect_status(200)?;
            let what = format!("{host} over {tls_name} with HTTP/{http_name}");
            ensure!(
                out.body_text() == stack.origin.greeting(),
                "{what}: body {:?}",
                out.body_text()
            );
            ensure!(
                out.http_version == http_name,
                "{what}: curl used HTTP/{}",
                out.http_version
            );
            ensure!(
                curl_tls_version(&out.stderr) == Some(tls_name),
                "{what}: curl reports {:?}:\n{}",
                curl_tls_version(&out.stderr),
                out.stderr
            );
        }
    }
    Ok(())
}

#[test]
fn curl_reaches_the_origin_over_every_tls_and_http_version() -> Result<()> {
    let s = stack()?;
    assert_matrix(&s, SITE)?;
    // The origin's name was resolved by the test's DNS server, not /etc/hosts.
    ensure!(
        s.dns.was_queried(ORIGIN_HOST),
        "dnsmasq was never asked for {ORIGIN_HOST}; its log:\n{}",
        s.dns.log()
    );
    // Four handshakes, each signed remotely with the ECDSA key.
    s.wait_for_audits("ecdsa-sign-sha256", SITE, 4)?;
    s.edge.assert_no_panic();
    Ok(())
}

#[test]
fn rsa_only_site_is_served_with_remote_rsa_signatures() -> Result<()> {
    let s = StackBuilder::default().rsa_site().start()?;
    assert_matrix(&s, RSA_SITE)?;

    // TLS 1.3 signs with RSA-PSS.
    let out = s.edge.s_client(RSA_SITE).tls(TlsVersion::Tls13).run()?;
    out.expect_verified()?;
    ensure!(
        out.field("Peer signature type").as_deref() == Some("RSA-PSS"),
        "TLS 1.3 to {RSA_SITE}:\n{}",
        out.text()
    );
    ensure!(
        leaf_key_type(&out).as_deref() == Some("rsaEncryption"),
        "leaf key of {RSA_SITE}:\n{}",
        out.stdout
    );
    // TLS 1.2 with a client that only takes PKCS#1 v1.5 signatures.
    let out = s
        .edge
        .s_client(RSA_SITE)
        .tls(TlsVersion::Tls12)
        .sigalgs("RSA+SHA256")
        .run()?;
    out.expect_verified()?;
    ensure!(
        out.field("Peer signature type").as_deref() == Some("RSA")
            && out.protocol().as_deref() == Some("TLSv1.2"),
        "TLS 1.2 PKCS#1 to {RSA_SITE}:\n{}",
        out.text()
    );

    s.wait_for_audits("rsa-pss-sign-sha256", RSA_SITE, 1)?;
    s.wait_for_audits("rsa-sign-sha256", RSA_SITE, 1)?;
    ensure!(
        s.audit_lines("ecdsa-sign-sha256", RSA_SITE).is_empty(),
        "{RSA_SITE} has no ECDSA key, yet ECDSA signatures were audited"
    );
    Ok(())
}

#[test]
fn key_type_follows_the_clients_signature_algorithms() -> Result<()> {
    let s = stack()?;
    // Default client: offers ECDSA, gets the ECDSA chain.
    let out = s.edge.s_client(SITE).run()?;
    out.expect_verified()?;
    ensure!(
        out.field("Peer signature type").as_deref() == Some("ECDSA")
            && leaf_key_type(&out).as_deref() == Some("id-ecPublicKey"),
        "default client:\n{}",
        out.text()
    );
    // A client offering only RSA-PSS gets the same site's RSA chain.
    let out = s.edge.s_client(SITE).sigalgs("RSA-PSS+SHA256").run()?;
    out.expect_verified()?;
    ensure!(
        out.field("Peer signature type").as_deref() == Some("RSA-PSS")
            && leaf_key_type(&out).as_deref() == Some("rsaEncryption"),
        "RSA-PSS-only client:\n{}",
        out.text()
    );
    s.wait_for_audits("ecdsa-sign-sha256", SITE, 1)?;
    s.wait_for_audits("rsa-pss-sign-sha256", SITE, 1)?;
    Ok(())
}

#[test]
fn served_chain_verifies_for_the_name_and_the_wildcard() -> Result<()> {
    let s = stack()?;
    let wildcard = format!("*.{SITE}");
    for (name, version, matched) in [
        (SITE, TlsVersion::Tls13, SITE),
        (SITE, TlsVersion::Tls12, SITE),
        (WILDCARD_NAME, TlsVersion::Tls13, wildcard.as_str()),
        (WILDCARD_NAME, TlsVersion::Tls12, wildcard.as_str()),
    ] {
        let out = s.edge.s_client(name).tls(version).run()?;
        out.expect_verified()?;
        // OpenSSL names the certificate name that matched.
        ensure!(
            out.field("Verified peername").as_deref() == Some(matched),
            "{name}:\n{}",
            out.text()
        );
    }
    // The chain is for the site's names only: verifying it as another name fails.
    let out = s
        .edge
        .s_client(WILDCARD_NAME)
        .verify(&s.edge.client_ca(), "example.org")
        .run()?;
    ensure!(
        !out.verified() && out.exit_code != Some(0),
        "a chain for {SITE} verified as example.org:\n{}",
        out.text()
    );
    // curl to the wildcard name reaches the site's origin.
    let out = s.edge.curl(WILDCARD_NAME).get(&s.url(WILDCARD_NAME, "/"))?;
    out.expect_status(200)?;
    ensure!(out.body_text() == s.origin.greeting());
    Ok(())
}

#[test]
fn key_server_audits_every_handshake_signature() -> Result<()> {
    let s = stack()?;
    for _ in 0..3 {
        s.edge
            .curl(SITE)
            .get(&s.url(SITE, "/"))?
            .expect_status(200)?;
    }
    let lines = s.wait_for_audits("ecdsa-sign-sha256", SITE, 3)?;
    let edge = s.deployment.edge_name();
    ensure!(
        lines
            .iter()
            .all(|l| keyless_tests::has_field(l, "client", edge)),
        "audit lines without client={edge}:\n{}",
        lines.join("\n")
    );
    // The chain was asked for once and then cached.
    let fetches = s.audit_lines("get-certificate-chain", SITE);
    ensure!(
        (1..3).contains(&fetches.len()),
        "expected the chain fetched once (maybe twice), got:\n{}",
        fetches.join("\n")
    );
    Ok(())
}

#[test]
fn origin_sees_host_and_forwarding_headers() -> Result<()> {
    let s = stack()?;
    for http in [HttpVersion::Http11, HttpVersion::Http2] {
        let out = s.edge.curl(SITE).http(http).get(&s.url(SITE, "/echo"))?;
        out.expect_status(200)?;
        let echo = out.body_text().to_ascii_lowercase();
        let header = |name: &str| -> Option<String> {
            echo.lines().find_map(|l| {
                let (k, v) = l.split_once(": ")?;
                (k == name).then(|| v.to_owned())
            })
        };
        let what = format!("{http:?} /echo:\n{echo}");
        ensure!(
            // The host as the cache keys it: no port, no trailing dot, lowercase.
            header("host").as_deref() == Some(SITE),
            "Host not the normalized host; {what}"
        );
        ensure!(
            header("x-forwarded-for").is_some_and(|v| v.contains("127.0.0.1")),
            "{what}"
        );
        ensure!(
            header("x-forwarded-proto").as_deref() == Some("https"),
            "{what}"
        );
        ensure!(
            header("forwarded")
                .is_some_and(|v| v.contains("for=127.0.0.1") && v.contains("proto=https")),
            "{what}"
        );
        ensure!(
            header("via").is_some_and(|v| v.contains("keyless")),
            "{what}"
        );
    }
    Ok(())
}

#[test]
fn bodies_stream_both_ways_intact() -> Result<()> {
    let s = stack()?;
    let n = 3_000_000;
    for http in [HttpVersion::Http11, HttpVersion::Http2] {
        let out = s
            .edge
            .curl(SITE)
            .http(http)
            .get(&s.url(SITE, &format!("/bytes?n={n}")))?;
        out.expect_status(200)?;
        ensure!(
            out.body.len() == n && out.body.iter().all(|b| *b == b'x'),
            "{http:?}: got {} bytes",
            out.body.len()
        );
    }
    let upload = s.deployment.dir().join("upload.bin");
    let data = keyless_tests::keys::random_bytes(1 << 20);
    std::fs::write(&upload, &data)?;
    let expected = format!(
        "{} {}\n",
        data.len(),
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &data))
    );
    for http in [HttpVersion::Http11, HttpVersion::Http2] {
        let out = s
            .edge
            .curl(SITE)
            .http(http)
            .body_file(&upload)
            .get(&s.url(SITE, "/upload"))?;
        out.expect_status(200)?;
        ensure!(
            out.body_text() == expected,
            "{http:?} upload: origin saw {:?}, sent {expected:?}",
            out.body_text()
        );
    }
    Ok(())
}

#[test]
fn plain_http_listener_routes_by_host() -> Result<()> {
    let http = keyless_tests::free_addr()?;
    let s = StackBuilder::default()
        .edit(move |c| c.http_listener(http))
        .start()?;
    let out = keyless_tests::Curl::new(&s.edge.client_ca())
        .resolve(WILDCARD_NAME, http)
        .get(&format!("http://{WILDCARD_NAME}:{}/echo", http.port()))?;
    out.expect_status(200)?;
    let echo = out.body_text().to_ascii_lowercase();
    ensure!(
        echo.contains("x-forwarded-proto: http\n")
            && echo.contains(&format!("host: {WILDCARD_NAME}\n")),
        "plain HTTP /echo:\n{echo}"
    );
    // A Host no site serves is not proxied anywhere.
    let out = keyless_tests::Curl::new(&s.edge.client_ca())
        .resolve("unknown.test", http)
        .get(&format!("http://unknown.test:{}/", http.port()))?;
    ensure!(
        out.exit_code == Some(0) && (400..500).contains(&out.status),
        "unknown Host over plain HTTP: exit {:?}, status {}",
        out.exit_code,
        out.status
    );
    Ok(())
}

#[test]
fn client_without_sni_gets_the_default_site_or_handshake_failure() -> Result<()> {
    let s = StackBuilder::default()
        .edit(|c| c.tls_option("default_site", SITE))
        .start()?;
    let out = keyless_tests::SClient::new(s.edge.https_addr())
        .verify(&s.edge.client_ca(), SITE)
        .run()?;
    out.expect_verified()?;

    // Another edge on the same deployment without a default site.
    let config = keyless_tests::EdgeConfig::new(&s.deployment)?
        .nameserver(s.dns.addr())
        .site(
            &[SITE],
            &format!("http://{ORIGIN_HOST}:{}", s.origin.port()),
        );
    let strict = keyless_tests::Edge::start_with(&s.deployment, &config)?;
    let out = keyless_tests::SClient::new(strict.https_addr()).run()?;
    ensure!(
        !out.handshake_ok() && out.text().contains("alert number 40"),
        "no SNI and no default site: expected alert handshake_failure (40):\n{}",
        out.text()
    );
    strict.wait_for_log(std::time::Duration::from_secs(5), |l| {
        l.contains("WARN") && l.contains("no SNI")
    })?;
    Ok(())
}

#[test]
fn the_edge_prefers_sha256_suites_over_the_clients_aes_256() -> Result<()> {
    let s = stack()?;
    // OpenSSL lists TLS_AES_256_GCM_SHA384 first; the edge's order wins.
    for (version, want) in [
        (TlsVersion::Tls13, "TLS_AES_128_GCM_SHA256"),
        (TlsVersion::Tls12, "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ] {
        let out = s.edge.s_client(SITE).tls(version).run()?;
        out.expect_verified()?;
        let text = out.text();
        ensure!(
            text.contains(&format!("Cipher is {want}")),
            "{version:?}: expected {want}:\n{text}"
        );
    }
    // A client that offers only AES-256-GCM still gets it.
    let out = s
        .edge
        .s_client(SITE)
        .tls(TlsVersion::Tls13)
        .arg("-ciphersuites")
        .arg("TLS_AES_256_GCM_SHA384")
        .run()?;
    out.expect_verified()?;
    ensure!(
        out.text().contains("Cipher is TLS_AES_256_GCM_SHA384"),
        "{}",
        out.text()
    );
    Ok(())
}
