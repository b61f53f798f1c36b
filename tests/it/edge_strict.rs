//! Handshakes through the edge against a key server in its default, strict mode (it
//! signs only checked TLS handshake messages): every key type and signature family the
//! edge uses is accepted, Ed25519 included.

use anyhow::{ensure, Result};
use keyless_tests::{SClient, TlsVersion};

use crate::edge_support::{leaf_key_type, StackBuilder, ED25519_SITE, SITE};

#[test]
fn strict_key_server_signs_every_key_type_through_the_edge() -> Result<()> {
    let s = StackBuilder::default().ed25519_site().start()?;
    let origin_toml = s.deployment.config_text()?;
    ensure!(
        !origin_toml.contains("require_handshake_context = false"),
        "the deployment's key server is not in strict mode:\n{origin_toml}"
    );
    // (name, TLS version, client signature algorithms, expected key-server opcode)
    let cases = [
        (SITE, TlsVersion::Tls13, "ECDSA+SHA256", "ecdsa-sign-sha256"),
        (
            SITE,
            TlsVersion::Tls13,
            "RSA-PSS+SHA256",
            "rsa-pss-sign-sha256",
        ),
        (SITE, TlsVersion::Tls12, "RSA+SHA256", "rsa-sign-sha256"),
        (SITE, TlsVersion::Tls12, "ECDSA+SHA256", "ecdsa-sign-sha256"),
        (ED25519_SITE, TlsVersion::Tls13, "ed25519", "ed25519-sign"),
        (ED25519_SITE, TlsVersion::Tls12, "ed25519", "ed25519-sign"),
    ];
    for (n, (name, version, sigalgs, op)) in cases.into_iter().enumerate() {
        let before = s.audit_lines(op, name).len();
        // The Ed25519 site's certificate is self-signed: it is its own CA.
        let ca = match name == ED25519_SITE {
            true => s
                .deployment
                .keys_dir()
                .join(format!("{ED25519_SITE}-ed25519.crt")),
            false => s.edge.client_ca(),
        };
        let out = SClient::new(s.edge.https_addr())
            .servername(name)
            .verify(&ca, name)
            .tls(version)
            .sigalgs(sigalgs)
            .run()?;
        let text = out.text();
        ensure!(
            out.handshake_ok(),
            "case {n}: {name} {version:?} {sigalgs}: handshake failed:\n{text}\nkey server log:\n{}",
            s.keyserver.log()
        );
        out.expect_verified()?;
        if name == ED25519_SITE {
            ensure!(
                leaf_key_type(&out).as_deref() == Some("ED25519"),
                "case {n}: expected an Ed25519 leaf:\n{text}"
            );
        }
        s.wait_for_audits(op, name, before + 1)?;
    }
    let log = s.keyserver.log();
    ensure!(
        !log.contains("policy-refused"),
        "the strict key server refused something the edge sent:\n{log}"
    );
    s.edge.assert_no_panic();
    Ok(())
}
