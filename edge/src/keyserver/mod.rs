//! Client for groups of Keyless key servers.
//!
//! - A **group** is a set of key servers holding the same keys (`[[keyserver.group]]`),
//!   listed statically with priority and weight or discovered through DNS SRV
//!   (`discovery`).
//! - Each **server** has a few multiplexed mTLS connections (request ids, many
//!   requests in flight per connection, reconnection with back-off) and a health state
//!   fed by heartbeat probes (`probe`) and by the requests themselves (`server`).
//! - A **call** picks a server (lowest priority value, then weighted least-loaded),
//!   and fails over inside the call: a server that does not answer, loses the
//!   connection or is overloaded passes the request to the next one within the
//!   caller's deadline (`group`). A group with no server up fails at once.
//!
//! All key-server I/O and timers run on a small runtime of their own (thread
//! `keyless-ks`), never on the runtime that serves clients: however many handshakes
//! wait for signatures, the key-server connections keep being read and every deadline
//! keeps firing. rustls signs synchronously, so [`KeyGroup::call_blocking`] hands the
//! request to that runtime and waits on a channel with the deadline.

mod conn;
mod credential;
mod discovery;
mod group;
mod identity;
mod probe;
mod renewal;
mod server;
mod ticket_keys;

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use keyless_shared::{ErrorCode, Operation};
use rustls_pki_types::ServerName;

use crate::config::{DnsConfig, Protocol};
use crate::side_runtime::{wait_blocking, SideRuntime};
use group::Group;

pub use identity::IdentityError;

/// Why a key-server call failed. Every variant says whether a retry elsewhere is safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The key server could not be reached (connection refused, TLS failed, or backing
    /// off after such a failure).
    #[error("key server unreachable: {0}")]
    Unavailable(String),
    /// The connection broke before the reply came.
    #[error("key server connection lost")]
    ConnectionLost,
    /// The key server did not answer in time.
    #[error("key server did not answer within {0:?}")]
    Timeout(Duration),
    /// The key server answered with a protocol error.
    #[error("key server refused: {0}")]
    Remote(ErrorCode),
    /// Every server of the group is down or draining: the call was not sent.
    #[error("every key server of group {0} is down")]
    GroupDown(String),
    /// The request could not be encoded.
    #[error("request could not be encoded: {0}")]
    Encode(String),
}

impl ClientError {
    /// Whether the same request may be sent again (to this or another key server).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            ClientError::Remote(_) | ClientError::Encode(_) | ClientError::GroupDown(_)
        )
    }
}

/// One key server address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` to connect to.
    pub addr: String,
    /// Name to verify the key server's certificate against.
    pub server_name: ServerName<'static>,
}

/// One key server of a static list or an SRV answer.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// Where it is.
    pub endpoint: Endpoint,
    /// Lower values are preferred.
    pub priority: u16,
    /// Share of requests among servers of one priority.
    pub weight: u16,
}

/// Where a group's servers come from.
#[derive(Clone, Debug)]
pub enum ServerSource {
    /// A fixed list.
    Static(Vec<ServerSpec>),
    /// The SRV records of `_keyless._tcp.<name>`, resolved through `[dns]`.
    Srv {
        /// The name under `_keyless._tcp.`.
        name: String,
        /// Name to check certificates for; default each target's name.
        server_name: Option<String>,
    },
}

/// One group as the client runs it.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    /// Its name (sites' `keyserver_group`).
    pub name: String,
    /// The edge's mTLS identity towards it and its CA.
    pub tls: Arc<rustls::ClientConfig>,
    /// The dialect its servers speak.
    pub protocol: Protocol,
    /// Its servers.
    pub servers: ServerSource,
    /// Renewal of the edge's certificate towards it, if the edge renews it.
    pub renewal: Option<RenewalSpec>,
}

/// How the edge renews its certificate towards a group.
#[derive(Clone, Debug)]
pub struct RenewalSpec {
    /// The group's enrollment API.
    pub server: crate::enroll::EnrollServer,
    /// The files renewed in place.
    pub credential: crate::enroll::Credential,
    /// The group's configuration, to rebuild its mTLS identity from the new files.
    pub group: crate::config::GroupConfig,
}

/// Settings shared by every group.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Connections kept per key server. Default 2.
    pub connections_per_server: usize,
    /// Deadline of each attempt at a server (and of each probe); a handshake's own
    /// deadline may cut it shorter. Default 2 s.
    pub request_timeout: Duration,
    /// Deadline of TCP connect + TLS handshake. Default 2 s.
    pub connect_timeout: Duration,
    /// Requests in flight per connection. Default 512.
    pub max_in_flight: usize,
    /// First reconnection delay after a failure; doubles up to `max_backoff`. Default 100 ms.
    pub min_backoff: Duration,
    /// Longest reconnection delay. Default 5 s.
    pub max_backoff: Duration,
    /// Threads of the key-server runtime. Default 1.
    pub io_threads: usize,
    /// Heartbeat interval. Default 2 s.
    pub probe_interval: Duration,
    /// Longest probe interval of a server that is down. Default 10 s.
    pub probe_max_interval: Duration,
    /// Failures in a row that mark a server down. Default 3.
    pub down_after: u32,
    /// Successful probes in a row that mark it up again. Default 3.
    pub up_after: u32,
    /// Where each server's state goes; none: nowhere.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            connections_per_server: 2,
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            max_in_flight: 512,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            io_threads: 1,
            probe_interval: Duration::from_secs(2),
            probe_max_interval: Duration::from_secs(10),
            down_after: 3,
            up_after: 3,
            metrics: None,
        }
    }
}

/// Settings of a [`KeyServerClient`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Shared by every group.
    pub settings: Settings,
    /// The groups.
    pub groups: Vec<GroupSpec>,
    /// The resolver for SRV groups.
    pub dns: DnsConfig,
}

/// A group's mTLS configuration, replaced when the edge's certificate is renewed.
pub(crate) struct TlsSource(std::sync::RwLock<Arc<rustls::ClientConfig>>);

impl TlsSource {
    fn new(tls: Arc<rustls::ClientConfig>) -> TlsSource {
        TlsSource(std::sync::RwLock::new(tls))
    }

    /// The configuration new connections use.
    fn current(&self) -> Arc<rustls::ClientConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, tls: Arc<rustls::ClientConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = tls;
    }
}

/// The key-server groups, their probes and discovery, on their own runtime.
pub struct KeyServerClient {
    groups: HashMap<String, KeyGroup>,
    /// Group names in configuration order.
    order: Vec<String>,
}

impl KeyServerClient {
    /// Creates the groups, starts the runtime, the probes and SRV discovery;
    /// connections are opened by the first probe or request.
    pub fn new(config: ClientConfig) -> std::io::Result<KeyServerClient> {
        let rt = Arc::new(SideRuntime::new("keyless-ks", config.settings.io_threads)?);
        let settings = Arc::new(config.settings);
        let mut groups = HashMap::new();
        let mut order = Vec::new();
        for spec in config.groups {
            let initial: &[ServerSpec] = match &spec.servers {
                ServerSource::Static(list) => list,
                ServerSource::Srv { .. } => &[],
            };
            let group = Arc::new(Group::new(
                &spec.name,
                spec.protocol,
                spec.tls.clone(),
                settings.clone(),
                initial,
            ));
            let _enter = rt.handle.enter();
            if let ServerSource::Srv { name, server_name } = &spec.servers {
                let resolver = crate::dns::Resolver::new(&config.dns)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                rt.handle.spawn(discovery::run(
                    Arc::downgrade(&group),
                    resolver,
                    discovery::srv_name(name),
                    server_name.clone(),
                ));
            }
            rt.handle
                .spawn(probe::run(Arc::downgrade(&group), settings.probe_interval));
            if spec.protocol == Protocol::Keyless {
                rt.handle.spawn(ticket_keys::run(
                    Arc::downgrade(&group),
                    group.ticketer.clone(),
                ));
            }
            if let Some(renewal) = spec.renewal.clone() {
                rt.handle
                    .spawn(renewal::run(Arc::downgrade(&group), renewal));
            }
            order.push(spec.name.clone());
            groups.insert(
                spec.name,
                KeyGroup {
                    group,
                    rt: rt.clone(),
                },
            );
        }
        Ok(KeyServerClient { groups, order })
    }

    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&KeyGroup> {
        self.groups.get(name)
    }

    /// The groups, in configuration order.
    pub fn groups(&self) -> impl Iterator<Item = &KeyGroup> {
        self.order.iter().filter_map(|n| self.groups.get(n))
    }

    /// Sets the ticket-key gauges: per group, the id and age of the key that seals new
    /// tickets now (a group with none has no series).
    pub fn report_ticket_keys(&self, metrics: &crate::metrics::Metrics) {
        use crate::metrics::{GroupLabels, TicketKeyLabels};
        metrics.ticket_key.clear();
        metrics.ticket_key_age.clear();
        for g in self.groups() {
            if let Some((id, age)) = g.group.ticketer.current() {
                let group = g.name().to_owned();
                metrics
                    .ticket_key
                    .get_or_create(&TicketKeyLabels {
                        group: group.clone(),
                        id: hex::encode(id),
                    })
                    .set(1);
                metrics
                    .ticket_key_age
                    .get_or_create(&GroupLabels { group })
                    .set(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
            }
        }
    }

    /// What `/healthz` reports, one line each: groups with no server up (their sites
    /// fail closed) and edge certificates close to expiry without renewal.
    pub fn problems(&self) -> Vec<String> {
        self.groups().flat_map(|g| g.group.problems()).collect()
    }
}

/// A handle on one group: calls to its key servers. Cheap to clone.
#[derive(Clone)]
pub struct KeyGroup {
    group: Arc<Group>,
    rt: Arc<SideRuntime>,
}

impl std::fmt::Debug for KeyGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyGroup")
            .field("name", &self.group.name)
            .finish_non_exhaustive()
    }
}

impl KeyGroup {
    /// The group's name.
    pub fn name(&self) -> &str {
        &self.group.name
    }

    /// The dialect its servers speak.
    pub fn protocol(&self) -> Protocol {
        self.group.protocol
    }

    /// The group's shared session-ticket keys, once the key servers handed some out.
    pub fn ticketer(&self) -> Option<Arc<crate::tickets::SharedTicketer>> {
        Some(self.group.ticketer.clone()).filter(|t| t.has_keys())
    }

    /// Whether any of its servers may take new requests (one that is only draining
    /// counts when no other can).
    pub fn is_usable(&self) -> bool {
        self.group.takes_requests()
    }

    /// The call's deadline: `deadline`, or without one, room for one attempt per key
    /// server (each attempt is cut to the configured request timeout).
    fn deadline(&self, deadline: Option<Instant>) -> Instant {
        let servers = u32::try_from(self.group.servers().len().max(1)).unwrap_or(u32::MAX);
        let timeout = self.group.request_timeout();
        deadline.unwrap_or_else(|| Instant::now() + timeout * servers)
    }

    /// Sends `op` and waits for its reply, by `deadline` at the latest. A protocol error
    /// reply is [`ClientError::Remote`]. A server that fails the request (no answer in
    /// the request timeout, connection lost twice, overloaded) passes it to the next
    /// one; with no server up, [`ClientError::GroupDown`] at once.
    pub async fn call(
        &self,
        op: Operation,
        deadline: Option<Instant>,
    ) -> Result<Operation, ClientError> {
        let deadline = self.deadline(deadline);
        let allowed = budget(deadline);
        let group = self.group.clone();
        let task = self
            .rt
            .handle
            .spawn(async move { group.call(op, deadline).await });
        match tokio::time::timeout_at(deadline.into(), task).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::ConnectionLost),
            Err(_) => Err(ClientError::Timeout(allowed)),
        }
    }

    /// [`call`](Self::call) for synchronous callers (rustls' `Signer`): the request
    /// runs on the key-server runtime while this thread waits, at most until the
    /// deadline. On a multi-thread tokio runtime the wait is announced with
    /// `block_in_place`, so the runtime moves its other work to another thread; callers
    /// bound how many such waits run at once.
    pub fn call_blocking(
        &self,
        op: Operation,
        deadline: Option<Instant>,
    ) -> Result<Operation, ClientError> {
        let deadline = self.deadline(deadline);
        let allowed = budget(deadline);
        let (tx, rx) = mpsc::sync_channel(1);
        let group = self.group.clone();
        self.rt.handle.spawn(async move {
            let _ = tx.send(group.call(op, deadline).await);
        });
        let received = wait_blocking(|| rx.recv_timeout(budget(deadline)));
        match received {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ClientError::Timeout(allowed)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::ConnectionLost),
        }
    }
}

/// Whether a request that failed with `e` goes to the next key server: the server
/// did not answer (connection lost, timeout), is overloaded, or its key store (an HSM
/// token) is unavailable. Other refusals (unknown key, policy) are the same on every
/// server of a group.
fn fails_over(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::ConnectionLost
            | ClientError::Timeout(_)
            | ClientError::Unavailable(_)
            | ClientError::Remote(ErrorCode::Overloaded | ErrorCode::KeyUnavailable)
    )
}

/// Time left until `deadline`, for error messages.
fn budget(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
