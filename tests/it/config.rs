//! `keyless-origin --config PATH --test`: validates and exits.

use anyhow::{ensure, Result};
use keyless_tests::{check_config, Deployment};

use crate::support::DOMAIN;

fn stderr_and_stdout(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

#[tokio::test]
async fn init_output_is_valid() -> Result<()> {
    let d = Deployment::init(&[DOMAIN, "x.org"])?;
    let out = check_config(&d.config_path())?;
    ensure!(
        out.status.success(),
        "--test failed on keyless-certs init output:\n{}",
        stderr_and_stdout(&out)
    );
    Ok(())
}

#[tokio::test]
async fn missing_certificate_file_is_named() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let config = d.write_config_variant("origin-missing.toml", |t| {
        if let Some(toml::Value::Table(tls)) = t.get_mut("tls") {
            tls.insert("cert".into(), "origin/no-such-keyserver.crt".into());
        }
    })?;
    let out = check_config(&config)?;
    let text = stderr_and_stdout(&out);
    ensure!(
        !out.status.success(),
        "--test accepted a missing cert file:\n{text}"
    );
    ensure!(
        text.contains("no-such-keyserver.crt"),
        "the error does not name the missing file:\n{text}"
    );
    Ok(())
}

#[tokio::test]
async fn keyserver_key_cert_mismatch_is_named() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    // The edge's key is a valid key, but not the key of the key server's certificate.
    std::fs::copy(
        d.dir().join("edge/edge.key"),
        d.dir().join("origin/other.key"),
    )?;
    let config = d.write_config_variant("origin-mismatch.toml", |t| {
        if let Some(toml::Value::Table(tls)) = t.get_mut("tls") {
            tls.insert("key".into(), "origin/other.key".into());
        }
    })?;
    let out = check_config(&config)?;
    let text = stderr_and_stdout(&out);
    ensure!(
        !out.status.success(),
        "--test accepted a key that does not match its cert:\n{text}"
    );
    ensure!(
        text.contains("other.key") || text.contains("keyserver.crt"),
        "the error names neither the key nor the certificate file:\n{text}"
    );
    Ok(())
}

#[tokio::test]
async fn unusable_site_key_file_is_named() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    std::fs::write(
        d.keys_dir().join("garbage.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )?;
    let out = check_config(&d.config_path())?;
    let text = stderr_and_stdout(&out);
    ensure!(
        !out.status.success(),
        "--test accepted an unusable key file:\n{text}"
    );
    ensure!(
        text.contains("garbage.key"),
        "the error does not name the file:\n{text}"
    );
    Ok(())
}

#[tokio::test]
async fn unknown_config_key_is_refused() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let config = d.write_config_variant("origin-typo.toml", |t| {
        t.insert("lisen".into(), "127.0.0.1:1".into());
    })?;
    let out = check_config(&config)?;
    let text = stderr_and_stdout(&out);
    ensure!(
        !out.status.success(),
        "--test accepted an unknown key:\n{text}"
    );
    ensure!(
        text.contains("lisen"),
        "the error does not name the unknown key:\n{text}"
    );
    Ok(())
}
