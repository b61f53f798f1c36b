//! A group of key servers that hold the same keys: which server takes a request
//! (lowest priority value first; within a priority, two weighted random choices and
//! the less loaded of the two by outstanding requests per weight), failover inside a
//! call, and the server list that SRV discovery replaces.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use keyless_shared::Operation;

use super::credential::CredentialTimes;
use super::server::Server;
use super::{budget, fails_over, ClientError, ServerSpec, Settings, TlsSource};
use crate::config::Protocol;

pub(super) struct Group {
    pub(super) name: Arc<str>,
    pub(super) protocol: Protocol,
    pub(super) tls: Arc<TlsSource>,
    settings: Arc<Settings>,
    servers: RwLock<Arc<[Arc<Server>]>>,
    /// The edge's certificate towards this group, when it is renewed by the edge.
    credential: std::sync::Mutex<Option<CredentialTimes>>,
    /// Session-ticket keys shared by the group's edges (filled by `ticket_keys`).
    pub(super) ticketer: Arc<crate::tickets::SharedTicketer>,
}

impl Group {
    pub(super) fn new(
        name: &str,
        protocol: Protocol,
        tls: Arc<rustls::ClientConfig>,
        settings: Arc<Settings>,
        specs: &[ServerSpec],
    ) -> Group {
        let group = Group {
            name: name.into(),
            protocol,
            tls: Arc::new(TlsSource::new(tls)),
            settings,
            servers: RwLock::new(Arc::from(Vec::new())),
            credential: std::sync::Mutex::new(None),
            ticketer: Arc::default(),
        };
        group.set_servers(specs);
        group
    }

    /// The current servers.
    pub(super) fn servers(&self) -> Arc<[Arc<Server>]> {
        self.servers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the server list: a server already known (same address and name) keeps
    /// its connections and health and takes the new priority and weight; the others
    /// are new. Returns whether the set of addresses changed.
    pub(super) fn set_servers(&self, specs: &[ServerSpec]) -> bool {
        let old = self.servers();
        let same = |s: &Server, spec: &ServerSpec| {
            s.endpoint.addr == spec.endpoint.addr
                && s.endpoint.server_name == spec.endpoint.server_name
        };
        let mut changed = old.len() != specs.len();
        let new: Vec<Arc<Server>> = specs
            .iter()
            .map(|spec| match old.iter().find(|s| same(s, spec)) {
                Some(s) => {
                    s.update(spec);
                    s.clone()
                }
                None => {
                    changed = true;
                    Server::new(
                        spec,
                        self.name.clone(),
                        self.settings.clone(),
                        self.tls.clone(),
                    )
                }
            })
            .collect();
        *self.servers.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(new);
        self.update_gauge();
        changed
    }

    /// Uses `tls` for new connections from now on; open ones finish what they have in
    /// flight and close.
    pub(super) async fn set_tls(&self, tls: Arc<rustls::ClientConfig>) {
        self.tls.replace(tls);
        for server in self.servers().iter() {
            server.retire_connections().await;
        }
    }

    /// Notes the validity of the edge's current certificate towards this group.
    pub(super) fn set_credential(&self, times: CredentialTimes) {
        *self.credential.lock().unwrap_or_else(|p| p.into_inner()) = Some(times);
    }

    /// Why `/healthz` should report this group, if it should: no server up, or the
    /// edge's certificate close to expiry without renewal.
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.usable() {
            problems.push(format!(
                "degraded: key-server group {} has no server up; its sites refuse new handshakes",
                self.name
            ));
        }
        let credential = self.credential.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = credential
            .as_ref()
            .and_then(|c| c.problem(&self.name, std::time::SystemTime::now()))
        {
            problems.push(p);
        }
        problems
    }

    /// Where the group's state is exported, if anywhere.
    pub(super) fn metrics(&self) -> Option<&Arc<crate::metrics::Metrics>> {
        self.settings.metrics.as_ref()
    }

    /// The deadline of one attempt at a server.
    pub(super) fn request_timeout(&self) -> std::time::Duration {
        self.settings.request_timeout
    }

    /// Whether any server may take new requests; none: the group's sites fail closed.
    pub(super) fn usable(&self) -> bool {
        self.servers().iter().any(|s| s.usable())
    }

    /// Whether a new request has a server to go to: a usable one, or else one that is
    /// only draining (see [`pick`]).
    pub(super) fn takes_requests(&self) -> bool {
        self.servers()
            .iter()
            .any(|s| s.usable() || s.only_draining())
    }

    /// Exports how many servers are up.
    pub(super) fn update_gauge(&self) {
        if let Some(m) = &self.settings.metrics {
            let up = self.servers().iter().filter(|s| s.usable()).count();
            m.keyserver_group_up
                .get_or_create(&crate::metrics::GroupLabels {
                    group: self.name.to_string(),
                })
                .set(i64::try_from(up).unwrap_or(i64::MAX));
        }
    }

    /// One call, by `deadline`, with failover inside the call: each usable server is
    /// tried at most once, in the order [`pick`] gives; a server that does not answer,
    /// loses the connection (after one retry on a fresh connection) or is overloaded
    /// passes the request on. With no usable server left the call fails at once.
    pub(super) async fn call(
        &self,
        op: Operation,
        deadline: Instant,
    ) -> Result<Operation, ClientError> {
        let allowed = budget(deadline);
        tokio::time::timeout_at(deadline.into(), self.fail_over(op, deadline))
            .await
            .map_err(|_| ClientError::Timeout(allowed))?
    }

    async fn fail_over(&self, op: Operation, deadline: Instant) -> Result<Operation, ClientError> {
        let mut tried: Vec<Arc<Server>> = Vec::new();
        let mut last = None;
        loop {
            let servers = self.servers();
            let Some(server) = pick(&servers, &tried) else {
                return Err(last.unwrap_or_else(|| ClientError::GroupDown(self.name.to_string())));
            };
            let result = server.request(op.clone(), deadline).await;
            match result {
                Err(e) if fails_over(&e) => {
                    tracing::debug!(group = %self.name, keyserver = %server.endpoint.addr, error = %e, "key server failed a request; trying the next one");
                    self.update_gauge();
                    last = Some(e);
                    tried.push(server);
                }
                other => return other,
            }
        }
    }
}

/// The server for a new request among the usable ones not in `tried`: the lowest
/// priority value; within it, two weighted random draws, and the one with fewer
/// outstanding requests per weight (the first on a tie). At equal load this is a plain
/// weighted choice; under load it steers away from a slow or busy server.
///
/// When no usable server is left, the servers that are only draining are the
/// candidates: a draining key server refuses no request in flight, and a new
/// connection to its address reaches its successor after an upgrade (a window of a
/// few milliseconds until a probe says so), or fails at once after a plain drain.
pub(super) fn pick(servers: &[Arc<Server>], tried: &[Arc<Server>]) -> Option<Arc<Server>> {
    let untried = |s: &&Arc<Server>| !tried.iter().any(|t| Arc::ptr_eq(t, s));
    let mut candidates: Vec<&Arc<Server>> = servers
        .iter()
        .filter(|s| s.usable())
        .filter(untried)
        .collect();
    if candidates.is_empty() {
        candidates = servers
            .iter()
            .filter(|s| s.only_draining())
            .filter(untried)
            .collect();
    }
    let best = candidates.iter().map(|s| s.priority()).min()?;
    let tier: Vec<&Arc<Server>> = candidates
        .into_iter()
        .filter(|s| s.priority() == best)
        .collect();
    if let [only] = tier[..] {
        return Some(only.clone());
    }
    let total: u64 = tier.iter().map(|s| s.weight()).sum();
    let draw = || {
        let mut r = fastrand::u64(0..total);
        for s in &tier {
            if r < s.weight() {
                return *s;
            }
            r -= s.weight();
        }
        tier[tier.len() - 1]
    };
    let (a, b) = (draw(), draw());
    // a.outstanding / a.weight <= b.outstanding / b.weight, without division.
    let a_lighter = a.outstanding() * b.weight() <= b.outstanding() * a.weight();
    Some(if a_lighter { a } else { b }.clone())
}

#[cfg(test)]
mod tests {
    use super::super::server::tests::server;
    use super::*;

    #[test]
    fn lowest_priority_value_first_then_the_next() {
        let servers: Vec<Arc<Server>> = vec![server(20, 1), server(10, 1), server(10, 1)];
        for _ in 0..50 {
            assert_eq!(pick(&servers, &[]).unwrap().priority(), 10);
        }
        let tried = [servers[1].clone(), servers[2].clone()];
        assert!(Arc::ptr_eq(&pick(&servers, &tried).unwrap(), &servers[0]));
        let all = [servers[0].clone(), servers[1].clone(), servers[2].clone()];
        assert!(pick(&servers, &all).is_none());
    }

    #[test]
    fn weights_share_requests_at_equal_load() {
        let servers: Vec<Arc<Server>> = vec![server(10, 3), server(10, 1)];
        let n = 20_000;
        let heavy = (0..n)
            .filter(|_| Arc::ptr_eq(&pick(&servers, &[]).unwrap(), &servers[0]))
            .count();
        let share = heavy as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }

    #[test]
    fn outstanding_requests_steer_away() {
        let servers: Vec<Arc<Server>> = vec![server(10, 1), server(10, 1)];
        // Make server 0 busy: 10 requests outstanding.
        let busy = &servers[0];
        let guards: Vec<_> = (0..10).map(|_| busy.hold()).collect();
        let n = 2000;
        let to_busy = (0..n)
            .filter(|_| Arc::ptr_eq(&pick(&servers, &[]).unwrap(), busy))
            .count();
        // Only when both draws hit the busy server: about a quarter.
        assert!(to_busy < n * 35 / 100, "{to_busy}");
        drop(guards);
    }
}
