//! The invariant: no site private key, in any form, is in the edge's files, config,
//! logs or memory — checked on a running edge after real ECDSA and RSA handshakes.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use keyless_tests::memscan::{find_in_bytes, scan_process_memory, secret_needles, Needle};
use keyless_tests::{HttpVersion, TlsVersion};

use crate::edge_support::{StackBuilder, RSA_SITE, SITE, WILDCARD_NAME};

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(files_under(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

#[test]
fn no_site_key_in_edge_files_logs_or_memory() -> Result<()> {
    let s = StackBuilder::default().rsa_site().start()?;

    // Real handshakes of every kind: ECDSA and RSA keys, TLS 1.3 and 1.2, PSS and
    // PKCS#1, through curl and openssl.
    for (host, tls, http) in [
        (SITE, TlsVersion::Tls13, HttpVersion::Http2),
        (SITE, TlsVersion::Tls12, HttpVersion::Http11),
        (WILDCARD_NAME, TlsVersion::Tls13, HttpVersion::Http11),
        (RSA_SITE, TlsVersion::Tls13, HttpVersion::Http2),
        (RSA_SITE, TlsVersion::Tls12, HttpVersion::Http11),
    ] {
        s.edge
            .curl(host)
            .tls(tls)
            .http(http)
            .get(&s.url(host, "/"))?
            .expect_status(200)?;
    }
    s.edge
        .s_client(SITE)
        .sigalgs("RSA-PSS+SHA256")
        .run()?
        .expect_verified()?;
    s.edge
        .s_client(RSA_SITE)
        .tls(TlsVersion::Tls12)
        .sigalgs("RSA+SHA256")
        .run()?
        .expect_verified()?;
    s.wait_for_audits("ecdsa-sign-sha256", SITE, 2)?;
    s.wait_for_audits("ecdsa-sign-sha256", WILDCARD_NAME, 1)?;
    s.wait_for_audits("rsa-pss-sign-sha256", SITE, 1)?;
    s.wait_for_audits("rsa-pss-sign-sha256", RSA_SITE, 1)?;
    s.wait_for_audits("rsa-sign-sha256", RSA_SITE, 1)?;

    let key_files = s.deployment.site_key_files()?;
    ensure!(
        key_files.len() == 3,
        "expected 3 site keys (two of {SITE}, one of {RSA_SITE}), found {key_files:?}"
    );
    let mut secrets: Vec<Needle> = Vec::new();
    for key in &key_files {
        secrets.extend(secret_needles(key)?);
    }

    // Files: everything the edge holds, its configs and its logs.
    let dir = s.deployment.dir();
    let mut edge_files = files_under(&s.deployment.edge_dir())?;
    edge_files.push(dir.join("edge.toml"));
    edge_files.push(s.edge.config_path().to_owned());
    edge_files.push(s.edge.log_path().to_owned());
    for file in &edge_files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let found = find_in_bytes(&bytes, &secrets);
        ensure!(
            found.is_empty(),
            "{} holds site key material: {found:?}",
            file.display()
        );
    }

    // Memory. First prove the scan can see what must be there: the chains the edge
    // served (from the key server) and the edge's own mTLS client key, a secret of the
    // same kind and encoding as a site's ECDSA key.
    let served = [
        s.deployment
            .site_key(SITE, keyless_tests::keys::KeyAlg::Ecdsa)?,
        s.deployment
            .site_key(SITE, keyless_tests::keys::KeyAlg::Rsa)?,
        s.deployment
            .site_key(RSA_SITE, keyless_tests::keys::KeyAlg::Rsa)?,
    ];
    let mut controls = Vec::new();
    for key in &served {
        let leaf = key.chain.first().context("empty chain")?.clone();
        controls.push(Needle::new(
            format!("{}: leaf certificate DER", key.stem),
            leaf,
        )?);
    }
    let (_, edge_key) = s.deployment.edge_identity();
    // rustls/ring holds it as d·R mod n in little-endian limbs.
    let edge_secret = secret_needles(&edge_key)?
        .into_iter()
        .find(|n| n.name.contains("Montgomery form (little-endian)"))
        .context("no Montgomery-form needle for the edge key")?;
    controls.push(edge_secret.clone());

    let mut needles = controls.clone();
    needles.extend(secrets.iter().cloned());
    let started = std::time::Instant::now();
    let scan = scan_process_memory(s.edge.pid(), &needles)?;
    eprintln!(
        "scanned {} bytes in {} mappings of keyless-edge ({} unreadable) for {} needles in \
         {:?}; hits: {:?}",
        scan.bytes,
        scan.regions,
        scan.unreadable,
        needles.len(),
        started.elapsed(),
        scan.hits.iter().map(|h| &h.needle).collect::<Vec<_>>()
    );
    for control in &controls {
        ensure!(
            scan.found(&control.name),
            "the scan did not find {}, which the edge must hold: the scan is blind",
            control.name
        );
    }
    let leaks: Vec<_> = scan
        .hits
        .iter()
        .filter(|h| secrets.iter().any(|n| n.name == h.needle))
        .collect();
    ensure!(
        leaks.is_empty(),
        "site key material in keyless-edge's memory: {leaks:#?}"
    );
    Ok(())
}
