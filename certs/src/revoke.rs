//! `keyless-certs revoke`: a CRL of the edge CA listing revoked edge certificates.
//!
//! The key server reads it as `[tls] client_crl` and re-reads it on SIGHUP, so an edge
//! whose certificate (or key) was stolen is refused from the next reload on. Entries of
//! an existing CRL at `--crl` are kept, so revocations accumulate; with no certificate
//! given the CRL is only re-issued (fresh `thisUpdate`/`nextUpdate`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ::time::{Duration, OffsetDateTime};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, PublicKeyData, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use x509_parser::prelude::*;
use zeroize::Zeroizing;

/// Arguments of `keyless-certs revoke`.
#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    /// A deployment written by `init`: defaults --ca-cert to DIR/ca/edge-ca.crt,
    /// --ca-key to DIR/ca/edge-ca.key and --crl to DIR/origin/edge-ca.crl.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// The CA certificate that issued the certificates (PEM).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM); it signs the CRL.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca_key: Option<PathBuf>,
    /// The CRL to write (PEM); revocations already in it are kept.
    #[arg(long, value_name = "FILE")]
    pub(crate) crl: Option<PathBuf>,
    /// Days until the CRL's nextUpdate.
    #[arg(long, value_name = "DAYS", default_value_t = 30, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) valid_days: u16,
    /// Certificates to revoke (PEM files; the first certificate of each).
    #[arg(value_name = "CERT")]
    pub(crate) certs: Vec<PathBuf>,
}

struct Paths {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    crl: PathBuf,
}

fn paths(args: &RevokeArgs) -> Result<Paths> {
    let pick = |given: &Option<PathBuf>, rel: &str, flag: &str| -> Result<PathBuf> {
        match (given, &args.dir) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(dir)) => Ok(dir.join(rel)),
            (None, None) => bail!("give --{flag} or --dir"),
        }
    };
    Ok(Paths {
        ca_cert: pick(&args.ca_cert, "ca/edge-ca.crt", "ca-cert")?,
        ca_key: pick(&args.ca_key, "ca/edge-ca.key", "ca-key")?,
        crl: pick(&args.crl, "origin/edge-ca.crl", "crl")?,
    })
}

fn first_pem(path: &Path, label: &str) -> Result<Vec<u8>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    for pem in Pem::iter_from_buffer(&data) {
        let pem = pem.with_context(|| format!("{}: not valid PEM", path.display()))?;
        if pem.label == label {
            return Ok(pem.contents);
        }
    }
    bail!("{}: no PEM {label}", path.display())
}

/// Runs `revoke`, printing what the CRL lists.
pub(crate) fn run(args: &RevokeArgs, out: &mut impl Write) -> Result<()> {
    let paths = paths(args)?;
    let ca_der = first_pem(&paths.ca_cert, "CERTIFICATE")?;
    let (_, ca) = X509Certificate::from_der(&ca_der)
        .with_context(|| format!("{}: not a certificate", paths.ca_cert.display()))?;
    let key = ca_key(&paths, &ca)?;
    let now = OffsetDateTime::now_utc();

    let mut revoked = Revocations::default();
    if paths.crl.exists() {
        revoked.keep_existing(&paths, &ca)?;
    }
    for path in &args.certs {
        revoked.revoke(path, &paths, &ca, now)?;
    }

    let issuer = Issuer::from_ca_cert_der(&ca_der.as_slice().into(), key)
        .with_context(|| format!("{}: unusable as CRL issuer", paths.ca_cert.display()))?;
    // The CRL number only has to grow: seconds since the epoch do.
    let number = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(i64::from(args.valid_days)),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked.0,
        key_identifier_method: KeyIdMethod::PreSpecified(
            keyless_shared::Ski::from_public_key_bits(&ca.public_key().subject_public_key.data)
                .0
                .to_vec(),
        ),
    };
    let crl = params
        .signed_by(&issuer)
        .context("signing the CRL")?
        .pem()
        .context("encoding the CRL")?;
    write_replacing(&paths.crl, &crl)?;
    print_crl(out, &paths.crl, &params.revoked_certs, args.valid_days)
}

/// The CA's private key, checked to be the key of `ca`.
fn ca_key(paths: &Paths, ca: &X509Certificate<'_>) -> Result<KeyPair> {
    let key_pem = Zeroizing::new(
        fs::read_to_string(&paths.ca_key)
            .with_context(|| format!("reading {}", paths.ca_key.display()))?,
    );
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{}: not a usable private key", paths.ca_key.display()))?;
    if key.subject_public_key_info() != ca.public_key().raw {
        bail!(
            "{} is not the key of {}",
            paths.ca_key.display(),
            paths.ca_cert.display()
        );
    }
    Ok(key)
}

/// The entries of the new CRL, each serial once (the first time and reason it was
/// listed with).
#[derive(Default)]
struct Revocations(Vec<RevokedCertParams>);

impl Revocations {
    fn list(&mut self, serial: &[u8], time: OffsetDateTime, reason: Option<RevocationReason>) {
        if !self.0.iter().any(|r| r.serial_number.as_ref() == serial) {
            self.0.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: time,
                reason_code: reason,
                invalidity_date: None,
            });
        }
    }

    /// Keeps the entries of the CRL at `paths.crl`, which `ca` must have issued.
    fn keep_existing(&mut self, paths: &Paths, ca: &X509Certificate<'_>) -> Result<()> {
        let der = first_pem(&paths.crl, "X509 CRL")?;
        let (_, crl) =
            parse_x509_crl(&der).with_context(|| format!("{}: not a CRL", paths.crl.display()))?;
        if crl.issuer().as_raw() != ca.subject().as_raw() {
            bail!(
                "{} was not issued by {}",
                paths.crl.display(),
                paths.ca_cert.display()
            );
        }
        for entry in crl.iter_revoked_certificates() {
            let time = entry.revocation_date.to_datetime();
            self.list(entry.raw_serial(), time, None);
        }
        Ok(())
    }

    /// Lists the certificate of `path` (as key compromise, at `now`); `ca` must have
    /// issued it.
    fn revoke(
        &mut self,
        path: &Path,
        paths: &Paths,
        ca: &X509Certificate<'_>,
        now: OffsetDateTime,
    ) -> Result<()> {
        let der = first_pem(path, "CERTIFICATE")?;
        let (_, cert) = X509Certificate::from_der(&der)
            .with_context(|| format!("{}: not a certificate", path.display()))?;
        if cert.issuer().as_raw() != ca.subject().as_raw()
            || cert.verify_signature(Some(ca.public_key())).is_err()
        {
            bail!(
                "{} was not issued by {}",
                path.display(),
                paths.ca_cert.display()
            );
        }
        self.list(
            cert.raw_serial(),
            now,
            Some(RevocationReason::KeyCompromise),
        );
        Ok(())
    }
}

fn print_crl(
    out: &mut impl Write,
    crl: &Path,
    revoked: &[RevokedCertParams],
    valid_days: u16,
) -> Result<()> {
    writeln!(
        out,
        "wrote {}: {} revoked certificate(s), next update in {} days",
        crl.display(),
        revoked.len(),
        valid_days
    )?;
    for r in revoked {
        writeln!(out, "  serial {}", hex::encode(r.serial_number.as_ref()))?;
    }
    writeln!(
        out,
        "point the key server's [tls] client_crl at it and send it SIGHUP"
    )?;
    Ok(())
}

/// Writes `contents` to a temporary file beside `path` and renames it over `path`, so a
/// key server reloading meanwhile reads the old CRL or the new one, never half of one.
fn write_replacing(path: &Path, contents: &str) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{run_init, TempDir};

    fn revoke(dir: &Path, certs: &[&Path]) -> Result<String> {
        let args = RevokeArgs {
            dir: Some(dir.to_owned()),
            ca_cert: None,
            ca_key: None,
            crl: None,
            valid_days: 30,
            certs: certs.iter().map(|p| p.to_path_buf()).collect(),
        };
        let mut out = Vec::new();
        run(&args, &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    fn crl_serials(dir: &Path) -> Result<Vec<Vec<u8>>> {
        let der = first_pem(&dir.join("origin/edge-ca.crl"), "X509 CRL")?;
        let (_, crl) = parse_x509_crl(&der).map_err(|e| anyhow!("{e}"))?;
        let ca_der = first_pem(&dir.join("ca/edge-ca.crt"), "CERTIFICATE")?;
        let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| anyhow!("{e}"))?;
        crl.verify_signature(ca.public_key())
            .map_err(|e| anyhow!("CRL signature: {e}"))?;
        Ok(crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect())
    }

    #[test]
    fn revokes_the_edge_certificate_and_keeps_earlier_entries() -> Result<()> {
        let tmp = TempDir::new("revoke");
        let dir = tmp.path();
        run_init(dir, &["--domain", "example.com"])?;
        // An empty CRL first, as an operator would configure before any revocation.
        revoke(dir, &[])?;
        assert!(crl_serials(dir)?.is_empty());

        let edge = dir.join("edge/edge.crt");
        let printed = revoke(dir, &[&edge])?;
        let der = first_pem(&edge, "CERTIFICATE")?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| anyhow!("{e}"))?;
        let serial = cert.raw_serial().to_vec();
        assert_eq!(crl_serials(dir)?, vec![serial.clone()]);
        assert!(printed.contains(&hex::encode(&serial)), "{printed}");

        // Re-issuing keeps the entry, and revoking twice lists it once.
        revoke(dir, &[&edge])?;
        revoke(dir, &[])?;
        assert_eq!(crl_serials(dir)?, vec![serial]);
        Ok(())
    }

    #[test]
    fn refuses_a_certificate_of_another_ca() -> Result<()> {
        let tmp = TempDir::new("revoke-other");
        let dir = tmp.path();
        run_init(dir, &["--domain", "example.com"])?;
        // The key server's certificate is issued by the key-server CA, not the edge CA.
        let err = revoke(dir, &[&dir.join("origin/keyserver.crt")])
            .err()
            .ok_or_else(|| anyhow!("a foreign certificate was revoked"))?;
        assert!(err.to_string().contains("not issued by"), "{err}");
        Ok(())
    }
}
