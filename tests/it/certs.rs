//! What `keyless-certs init` hands out: the edge side holds no site key.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use keyless_tests::keys::KeyAlg;
use keyless_tests::{certs_bin, Deployment};
use openssl::pkey::PKey;

use crate::support::DOMAIN;

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            files_under(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Base64 lines of a PEM body (the encoded key, without the armour).
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn edge_files_hold_no_site_key() -> Result<()> {
    let d = Deployment::init(&[DOMAIN, "x.org"])?;
    let site_keys = d.site_key_files()?;
    ensure!(
        site_keys.len() == 4,
        "expected 4 site keys, found {site_keys:?}"
    );

    let mut edge_files = Vec::new();
    files_under(&d.edge_dir(), &mut edge_files)?;
    let edge_toml = d.dir().join("edge.toml");
    if edge_toml.exists() {
        edge_files.push(edge_toml);
    }
    ensure!(!edge_files.is_empty());

    for key_path in &site_keys {
        let pem = std::fs::read_to_string(key_path)?;
        let key = PKey::private_key_from_pem(pem.as_bytes())
            .with_context(|| format!("parsing {}", key_path.display()))?;
        // The key in every form it could be copied as.
        let mut needles: Vec<Vec<u8>> =
            vec![key.private_key_to_der()?, key.private_key_to_pkcs8()?];
        needles.extend(pem_body_lines(&pem).into_iter().map(String::into_bytes));
        let stem = key_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned());
        for file in &edge_files {
            let contents = std::fs::read(file)?;
            for needle in &needles {
                ensure!(
                    !contents
                        .windows(needle.len())
                        .any(|w| w == needle.as_slice()),
                    "{} contains (part of) site key {}",
                    file.display(),
                    key_path.display()
                );
            }
            if let Some(stem) = &stem {
                let text = String::from_utf8_lossy(&contents);
                ensure!(
                    !text.contains(&format!("{stem}.key")),
                    "{} refers to the site key file {stem}.key",
                    file.display()
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn inspect_shows_the_protocol_ski() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    for alg in [KeyAlg::Ecdsa, KeyAlg::Rsa] {
        let key = d.site_key(DOMAIN, alg)?;
        let out = Command::new(certs_bin()?)
            .arg("inspect")
            .arg(&key.cert_path)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "inspect failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ski_line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("SKI:"))
            .with_context(|| format!("no SKI line in:\n{text}"))?;
        let shown: String = ski_line.trim().chars().filter(|c| *c != ':').collect();
        ensure!(
            shown.eq_ignore_ascii_case(&key.ski.to_string()),
            "inspect shows SKI {shown}, the protocol SKI of {} is {}",
            key.cert_path.display(),
            key.ski
        );
    }
    Ok(())
}
