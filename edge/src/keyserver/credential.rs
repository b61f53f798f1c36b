//! The edge's certificate towards a group as renewal and `/healthz` see it: when its
//! lifetime counts from, when renewal is due, and when it is close enough to expiry to
//! report.

use std::path::Path;
use std::time::{Duration, SystemTime};

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
    pub(super) fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
    }

    /// When renewal is due: 2/3 of the lifetime.
    pub(super) fn renew_at(&self) -> SystemTime {
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
