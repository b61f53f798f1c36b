//! SRV discovery of a group's servers: `_keyless._tcp.<name>` gives priority, weight,
//! port and target; each target's first address (A/AAAA, IPv4 first) is connected to
//! and its certificate checked for the group's `server_name` or the target name. The
//! answer is used until its TTL expires, then resolved again; a failed resolution
//! keeps the last good answer and is retried with back-off.

use std::sync::Weak;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;

use super::group::Group;
use super::{Endpoint, ServerSpec};
use crate::dns::{DnsError, Resolver};

/// Shortest time an answer is used (a TTL of 0 would re-resolve in a loop).
const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest wait before a failed resolution is retried.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The SRV owner name of a group's `srv` setting.
pub(super) fn srv_name(name: &str) -> String {
    format!("_keyless._tcp.{}", name.trim_end_matches('.'))
}

/// Resolves `name`'s servers for `group` until the group is dropped.
pub(super) async fn run(
    group: Weak<Group>,
    resolver: Resolver,
    name: String,
    server_name: Option<String>,
) {
    let mut retry = MIN_TTL;
    loop {
        let found = resolve(&resolver, &name, server_name.as_deref()).await;
        let Some(g) = group.upgrade() else { return };
        let wait = match found {
            Ok((specs, valid_until)) => {
                retry = MIN_TTL;
                let addrs: Vec<String> = specs
                    .iter()
                    .map(|s| {
                        format!(
                            "{} (priority {}, weight {})",
                            s.endpoint.addr, s.priority, s.weight
                        )
                    })
                    .collect();
                if g.set_servers(&specs) {
                    tracing::info!(group = %g.name, srv = %name, servers = ?addrs, "key servers discovered");
                } else {
                    tracing::debug!(group = %g.name, srv = %name, servers = ?addrs, "key servers unchanged");
                }
                valid_until
                    .saturating_duration_since(Instant::now())
                    .max(MIN_TTL)
            }
            Err(e) => {
                let known = g.servers().len();
                tracing::warn!(group = %g.name, srv = %name, error = %e, known, retry = ?retry, "SRV resolution failed; keeping the last good answer");
                let wait = retry;
                retry = (retry * 2).min(MAX_RETRY);
                wait
            }
        };
        drop(g);
        tokio::time::sleep(wait).await;
    }
}

/// The servers named by the SRV records of `name`, and until when the answer holds.
pub(super) async fn resolve(
    resolver: &Resolver,
    name: &str,
    server_name: Option<&str>,
) -> Result<(Vec<ServerSpec>, Instant), DnsError> {
    let (targets, valid_until) = resolver.srv(name).await?;
    let mut specs = Vec::with_capacity(targets.len());
    let mut errors = Vec::new();
    for t in targets {
        let addr = match resolver.resolve(&t.target, t.port).await {
            Ok(addrs) => addrs[0],
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        let cert_name = server_name.unwrap_or(&t.target);
        let Ok(server_name) = ServerName::try_from(cert_name.to_owned()) else {
            errors.push(format!("{cert_name:?} is not a valid server name"));
            continue;
        };
        specs.push(ServerSpec {
            endpoint: Endpoint {
                addr: addr.to_string(),
                server_name,
            },
            priority: t.priority,
            weight: t.weight,
        });
    }
    if specs.is_empty() {
        return Err(DnsError {
            name: name.to_owned(),
            reason: format!("no SRV target resolved: {}", errors.join("; ")),
        });
    }
    Ok((specs, valid_until))
}
