//! Renewal of the edge's certificate towards a group (`shared/ENROLL.md`): at 2/3 of
//! its lifetime the edge asks the group's enrollment API for a new certificate over a
//! new key pair, authenticated by the current one; the files are replaced and new
//! key-server connections use the new identity while the open ones finish and close.
//! A failed renewal is retried with back-off (logged, counted); `/healthz` reports the
//! group once less than a sixth of the lifetime is left.

use std::path::Path;
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use super::group::Group;
use super::RenewalSpec;
use crate::metrics::{GroupLabels, RenewalLabels};

/// How often the credential file is looked at (its expiry gauge refreshed).
const TICK: Duration = Duration::from_secs(1);
/// First retry delay after a failed renewal; doubles up to a tenth of the lifetime.
const MIN_RETRY: Duration = Duration::from_secs(1);

/// The validity of the current certificate and whom it names.
#[derive(Clone, Debug)]
pub(super) struct CredentialTimes {
    /// When the lifetime counts from: the later of the certificate's not-before and
    /// the time its file was written. Issuers backdate not-before (ours by a minute)
    /// for clock skew; counted from there, a short-lived certificate would look
    /// two-thirds gone the moment it arrives.
    pub(super) not_before: SystemTime,
    pub(super) not_after: SystemTime,
    pub(super) edge_id: String,
}

impl CredentialTimes {
    fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
    }

    /// When renewal is due: 2/3 of the lifetime.
    fn renew_at(&self) -> SystemTime {
        self.not_before + self.lifetime() * 2 / 3
    }

    /// Why `/healthz` should report the group: less than a sixth of the lifetime left.
    pub(super) fn problem(&self, group: &str, now: SystemTime) -> Option<String> {
        let left = self.not_after.duration_since(now).unwrap_or(Duration::ZERO);
        (left < self.lifetime() / 6).then(|| {
            format!(
                "degraded: the edge's certificate for key-server group {group} expires in {}s and has not been renewed",
                left.as_secs()
            )
        })
    }
}

/// Reads the validity and the edge id (subject CN) of the first certificate in `path`.
pub(super) fn read_times(path: &Path) -> Result<CredentialTimes, String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("{}: not a certificate: {e}", path.display()))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let edge_id = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| format!("{}: the certificate has no subject CN", path.display()))?
        .to_owned();
    let written = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let not_after = at(cert.validity().not_after.timestamp());
    Ok(CredentialTimes {
        not_before: at(cert.validity().not_before.timestamp())
            .max(written)
            .min(not_after),
        not_after,
        edge_id,
    })
}

/// Keeps `group`'s credential renewed until the group is dropped.
pub(super) async fn run(group: Weak<Group>, spec: RenewalSpec) {
    let mut retry = MIN_RETRY;
    let mut next_attempt = SystemTime::UNIX_EPOCH;
    loop {
        let Some(g) = group.upgrade() else { return };
        let times = match read_times(&spec.credential.cert) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(group = %g.name, error = %e, "cannot read the edge's certificate; renewal waits");
                drop(g);
                tokio::time::sleep(TICK * 10).await;
                continue;
            }
        };
        g.set_credential(times.clone());
        export_expiry(&g, &times);
        let now = SystemTime::now();
        if now < times.renew_at() || now < next_attempt {
            drop(g);
            tokio::time::sleep(TICK).await;
            continue;
        }
        match crate::enroll::renew(&spec.server, &spec.credential, &times.edge_id).await {
            Ok(answer) => match super::identity::tls_config(&spec.group) {
                Ok(tls) => {
                    g.set_tls(tls).await;
                    retry = MIN_RETRY;
                    count(&g, "ok");
                    tracing::info!(group = %g.name, edge = %answer.edge_id, not_after = answer.not_after, "edge certificate renewed; new key-server connections use it");
                }
                Err(e) => {
                    count(&g, "error");
                    tracing::error!(group = %g.name, error = %e, "renewed certificate written but unusable");
                }
            },
            Err(e) => {
                count(&g, "error");
                let left = times
                    .not_after
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO);
                tracing::warn!(group = %g.name, error = %e, retry = ?retry, expires_in = ?left, "edge certificate renewal failed; retrying");
                next_attempt = now + retry;
                retry = (retry * 2).min((times.lifetime() / 10).max(MIN_RETRY));
            }
        }
    }
}

fn export_expiry(g: &Group, times: &CredentialTimes) {
    if let Some(m) = g.metrics() {
        let left = match times.not_after.duration_since(SystemTime::now()) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        m.credential_expiry
            .get_or_create(&GroupLabels {
                group: g.name.to_string(),
            })
            .set(left);
    }
}

fn count(g: &Group, result: &'static str) {
    if let Some(m) = g.metrics() {
        m.credential_renewals
            .get_or_create(&RenewalLabels {
                group: g.name.to_string(),
                result,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_come_from_the_certificate_and_healthz_speaks_in_the_last_sixth() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["edge-7".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edge-7");
        // Valid from long before the file is written (2020) to far after (2100): the
        // lifetime counts from the writing.
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2100, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.crt");
        std::fs::write(&path, cert.pem()).unwrap();

        let written = std::fs::metadata(&path).unwrap().modified().unwrap();
        let t = read_times(&path).unwrap();
        assert_eq!(t.edge_id, "edge-7");
        assert_eq!(t.not_before, written);
        let life = t.lifetime();
        assert_eq!(t.renew_at(), t.not_before + life * 2 / 3);
        assert!(t.problem("g", t.not_before + life * 2 / 3).is_none());
        let p = t.problem("g", t.not_after - life / 12).unwrap();
        assert!(p.contains("group g") && p.contains("expires in"), "{p}");
        assert!(t.problem("g", t.not_after + life).is_some(), "expired");
        std::fs::write(&path, "not a certificate").unwrap();
        assert!(read_times(&path).is_err());
    }
}
