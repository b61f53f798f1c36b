//! Renewal of the edge's certificate towards a group (`shared/ENROLL.md`): at 2/3 of
//! its lifetime the edge asks the group's enrollment API for a new certificate over a
//! new key pair, authenticated by the current one; the files are replaced and new
//! key-server connections use the new identity while the open ones finish and close.
//! A failed renewal is retried with back-off (logged, counted); `/healthz` reports the
//! group once less than a sixth of the lifetime is left.

use std::sync::Weak;
use std::time::{Duration, SystemTime};

use super::credential::{read_times, CredentialTimes};
use super::group::Group;
use super::RenewalSpec;
use crate::metrics::{GroupLabels, RenewalLabels};

/// How often the credential file is looked at (its expiry gauge refreshed).
const TICK: Duration = Duration::from_secs(1);
/// First retry delay after a failed renewal; doubles up to a tenth of the lifetime.
const MIN_RETRY: Duration = Duration::from_secs(1);

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
