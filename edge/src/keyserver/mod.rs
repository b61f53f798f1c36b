//! Client for Keyless key servers: a small pool of multiplexed mTLS connections per
//! key server, request ids, many requests in flight per connection, one deadline per
//! call (connection set-up, waits for a slot and the reply together), one retry on a
//! fresh connection when a connection breaks, and reconnection with exponential
//! back-off.
//!
//! All key-server I/O and timers run on a small runtime of their own (thread
//! `keyless-ks`), never on the runtime that serves clients: however many handshakes
//! wait for signatures, the key-server connections keep being read and every deadline
//! keeps firing. rustls signs synchronously, so [`KeyServerClient::call_blocking`]
//! hands the request to that runtime and waits on a channel with the deadline.
//!
//! Key servers are tried in the order given (the first healthy one takes the traffic),
//! which is where priorities, weights and probing plug in.

mod conn;
mod identity;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use keyless_shared::{ErrorCode, Operation};
use rustls_pki_types::ServerName;
use tokio::sync::Mutex;

use conn::Conn;

pub use identity::IdentityError;

/// Why a key-server call failed. Every variant says whether a retry elsewhere is safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No key server could be reached (all are down or backing off).
    #[error("no key server reachable: {0}")]
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
    /// The request could not be encoded.
    #[error("request could not be encoded: {0}")]
    Encode(String),
}

impl ClientError {
    /// Whether the same request may be sent again (to this or another key server).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ClientError::Remote(_) | ClientError::Encode(_))
    }
}

/// One key server address.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `host:port` to connect to.
    pub addr: String,
    /// Name to verify the key server's certificate against.
    pub server_name: ServerName<'static>,
}

/// Settings of a [`KeyServerClient`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Key servers, most preferred first.
    pub endpoints: Vec<Endpoint>,
    /// The edge's mTLS identity and the key-server CA.
    pub tls: Arc<rustls::ClientConfig>,
    /// Connections kept per key server. Default 2.
    pub connections_per_server: usize,
    /// Deadline of each call: connection set-up, the wait for a slot and the reply
    /// together (a handshake's own deadline may cut it shorter). Default 2 s.
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
    /// Where each server's state goes (`keyless_edge_keyserver_up`); none: nowhere.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl ClientConfig {
    /// Defaults for `endpoints` with `tls`.
    pub fn new(endpoints: Vec<Endpoint>, tls: Arc<rustls::ClientConfig>) -> ClientConfig {
        ClientConfig {
            endpoints,
            tls,
            connections_per_server: 2,
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            max_in_flight: 512,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            io_threads: 1,
            metrics: None,
        }
    }
}

struct Slot {
    conn: Option<Arc<Conn>>,
    /// No new connection attempt before this instant.
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
}

struct Server {
    endpoint: Endpoint,
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    health: std::sync::Mutex<Health>,
    /// `keyless_edge_keyserver_up` of this server, if exported.
    up: Option<prometheus_client::metrics::gauge::Gauge>,
}

/// Consecutive failed requests after which a key server is passed over.
const FAILURES_TO_DOWN: u32 = 3;
/// How long a server marked down is first passed over; doubles while it keeps failing.
const DOWN_MIN: Duration = Duration::from_secs(1);
/// The longest a server is passed over before a request tries it again.
const DOWN_MAX: Duration = Duration::from_secs(30);

/// What requests have lately shown of a key server (passive health).
#[derive(Debug)]
struct Health {
    /// Requests it failed in a row (no answer, lost connection, overloaded).
    failures: u32,
    /// While in the future, requests go to other servers first; once set, it stays
    /// set until a success (the next failure passes the server over again at once).
    down_until: Option<Instant>,
    /// The next down period.
    down_for: Duration,
}

impl Server {
    /// Whether requests should pass this server over for now.
    fn is_down(&self, now: Instant) -> bool {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.down_until.is_some_and(|t| now < t)
    }

    /// Notes a request's outcome: a server that fails `FAILURES_TO_DOWN` requests in a
    /// row is passed over for a while; one that fails again when its turn comes back is
    /// passed over at once, for twice as long (at most `DOWN_MAX`); one success brings it
    /// back. State changes are logged once each.
    fn record(&self, ok: bool) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            if h.down_until.is_some() {
                tracing::info!(keyserver = %self.endpoint.addr, "key server answers again; back in use");
                self.set_up(true);
            }
            *h = Health::default();
            return;
        }
        h.failures = h.failures.saturating_add(1);
        if h.down_until.is_some() || h.failures >= FAILURES_TO_DOWN {
            if h.down_until.is_none() {
                tracing::warn!(keyserver = %self.endpoint.addr, failures = h.failures, "key server failing requests; passed over while others answer");
                self.set_up(false);
            }
            h.down_until = Some(Instant::now() + h.down_for);
            h.down_for = (h.down_for * 2).min(DOWN_MAX);
        }
    }
}

impl Server {
    fn set_up(&self, up: bool) {
        if let Some(g) = &self.up {
            g.set(i64::from(up));
        }
    }
}

impl Default for Health {
    fn default() -> Health {
        Health {
            failures: 0,
            down_until: None,
            down_for: DOWN_MIN,
        }
    }
}

/// A client for a set of key servers; share it with an `Arc`.
pub struct KeyServerClient {
    pool: Arc<Pool>,
    /// Owned so that dropping the client stops its threads; always `Some` until drop.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Drop for KeyServerClient {
    fn drop(&mut self) {
        // `shutdown_background` may be called from async code, unlike dropping.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl KeyServerClient {
    /// Creates the client and starts its runtime; connections are opened on first use.
    pub fn new(config: ClientConfig) -> std::io::Result<KeyServerClient> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.io_threads.max(1))
            .thread_name("keyless-ks")
            .enable_all()
            .build()?;
        Ok(KeyServerClient {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            pool: Arc::new(Pool::new(config)),
        })
    }

    /// The call's deadline: `deadline`, or without one, room for one attempt per key
    /// server (each attempt is cut to the configured request timeout).
    fn deadline(&self, deadline: Option<Instant>) -> Instant {
        let servers = u32::try_from(self.pool.servers.len().max(1)).unwrap_or(u32::MAX);
        deadline.unwrap_or_else(|| Instant::now() + self.pool.config.request_timeout * servers)
    }

    /// Sends `op` and waits for its reply, by `deadline` at the latest. A protocol error
    /// reply is [`ClientError::Remote`]. A request lost with its connection is sent once
    /// more on a fresh connection; a key server that then fails it, does not answer
    /// within the request timeout or is overloaded is not asked again: the request goes
    /// to the next key server (see [`Pool::call`]).
    pub async fn call(
        &self,
        op: Operation,
        deadline: Option<Instant>,
    ) -> Result<Operation, ClientError> {
        let deadline = self.deadline(deadline);
        let allowed = budget(deadline);
        let pool = self.pool.clone();
        let task = self
            .handle
            .spawn(async move { pool.call(op, deadline).await });
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
        let pool = self.pool.clone();
        self.handle.spawn(async move {
            let _ = tx.send(pool.call(op, deadline).await);
        });
        let wait = || rx.recv_timeout(budget(deadline));
        let received = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            // Outside tokio, or on a current-thread runtime (where `block_in_place`
            // panics): the key-server runtime is separate, so waiting here cannot
            // deadlock it.
            _ => wait(),
        };
        match received {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ClientError::Timeout(allowed)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::ConnectionLost),
        }
    }
}

/// Whether a request that failed with `e` goes to the next key server: the server
/// did not answer (connection lost, timeout) or is overloaded. Other refusals (unknown
/// key, policy) are the same on every server of a group.
fn fails_over(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::ConnectionLost
            | ClientError::Timeout(_)
            | ClientError::Unavailable(_)
            | ClientError::Remote(ErrorCode::Overloaded)
    )
}

/// Time left until `deadline`, for error messages.
fn budget(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// The connections to every key server; lives on the key-server runtime.
struct Pool {
    config: ClientConfig,
    servers: Vec<Server>,
}

impl Pool {
    fn new(config: ClientConfig) -> Pool {
        let servers = config
            .endpoints
            .iter()
            .map(|endpoint| Server {
                endpoint: endpoint.clone(),
                slots: (0..config.connections_per_server.max(1))
                    .map(|_| {
                        Mutex::new(Slot {
                            conn: None,
                            retry_at: None,
                            backoff: config.min_backoff,
                            last_error: None,
                        })
                    })
                    .collect(),
                next: AtomicUsize::new(0),
                health: std::sync::Mutex::new(Health::default()),
                up: config.metrics.as_ref().map(|m| {
                    let gauge = m
                        .keyserver_up
                        .get_or_create(&crate::metrics::ServerLabels {
                            server: endpoint.addr.clone(),
                        })
                        .clone();
                    gauge.set(1);
                    gauge
                }),
            })
            .collect();
        Pool { config, servers }
    }

    /// One call, by `deadline`: failover inside the call. Key servers are tried in order
    /// of preference, each at most once (a connection lost before the reply is retried
    /// once on a fresh connection to the same server first), each attempt cut to the
    /// configured request timeout, so that a key server that dies, hangs or is
    /// overloaded mid-request costs the caller one attempt, not the call.
    async fn call(&self, op: Operation, deadline: Instant) -> Result<Operation, ClientError> {
        // The deadline also covers connecting and waiting for a slot or a lock.
        let allowed = budget(deadline);
        tokio::time::timeout_at(deadline.into(), self.fail_over(op, deadline))
            .await
            .map_err(|_| ClientError::Timeout(allowed))?
    }

    /// The body of [`Pool::call`].
    async fn fail_over(&self, op: Operation, deadline: Instant) -> Result<Operation, ClientError> {
        let mut failed = vec![false; self.servers.len()];
        let mut last = None;
        while Instant::now() < deadline {
            let (server, conn) = match self.connection(&failed).await {
                Ok(found) => found,
                Err(e) => return Err(last.unwrap_or(e)),
            };
            let mut result = self.attempt(&conn, op.clone(), deadline).await;
            if matches!(result, Err(ClientError::ConnectionLost)) {
                tracing::debug!("key server connection lost; retrying once on a fresh connection");
                result = match self.server_conn(&self.servers[server]).await {
                    Ok(conn) => self.attempt(&conn, op.clone(), deadline).await,
                    Err(e) => Err(e),
                };
            }
            let failed_over = matches!(&result, Err(e) if fails_over(e));
            self.servers[server].record(!failed_over);
            match result {
                Err(e) if failed_over => {
                    tracing::debug!(keyserver = %self.servers[server].endpoint.addr, error = %e, "key server failed a request; trying the next one");
                    failed[server] = true;
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or(ClientError::Timeout(Duration::ZERO)))
    }

    /// Sends `op` on `conn` and waits for the reply, within the request timeout and
    /// `deadline`.
    async fn attempt(
        &self,
        conn: &Conn,
        op: Operation,
        deadline: Instant,
    ) -> Result<Operation, ClientError> {
        let until = deadline.min(Instant::now() + self.config.request_timeout);
        let allowed = budget(until);
        let reply = tokio::time::timeout_at(until.into(), conn.call(op))
            .await
            .map_err(|_| ClientError::Timeout(allowed))??;
        match reply.error_code() {
            Some(code) => Err(ClientError::Remote(code)),
            None => Ok(reply),
        }
    }

    /// A live connection to the most preferred reachable key server not marked in
    /// `failed`, with that server's index.
    ///
    /// Servers marked down come last: tried only when no other server is left, so that
    /// a group whose every server is down still recovers on the first answer.
    async fn connection(&self, failed: &[bool]) -> Result<(usize, Arc<Conn>), ClientError> {
        let mut errors = Vec::new();
        let now = Instant::now();
        let (up, down): (Vec<usize>, Vec<usize>) = (0..self.servers.len())
            .filter(|i| !failed.get(*i).copied().unwrap_or(false))
            .partition(|i| !self.servers[*i].is_down(now));
        for i in up.into_iter().chain(down) {
            let server = &self.servers[i];
            match self.server_conn(server).await {
                Ok(c) => return Ok((i, c)),
                Err(ClientError::Unavailable(e)) => errors.push(e),
                Err(e) => return Err(e),
            }
        }
        errors.dedup();
        Err(ClientError::Unavailable(errors.join("; ")))
    }

    /// A live connection to `server`, trying its slots in turn.
    async fn server_conn(&self, server: &Server) -> Result<Arc<Conn>, ClientError> {
        let n = server.slots.len();
        let start = server.next.fetch_add(1, Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let slot = &server.slots[(start + i) % n];
            match self.slot_conn(server, slot).await {
                Ok(c) => return Ok(c),
                Err(e) => errors.push(format!("{}: {e}", server.endpoint.addr)),
            }
        }
        errors.dedup();
        Err(ClientError::Unavailable(errors.join("; ")))
    }

    async fn slot_conn(&self, server: &Server, slot: &Mutex<Slot>) -> Result<Arc<Conn>, String> {
        let mut slot = slot.lock().await;
        if let Some(c) = &slot.conn {
            if c.is_open() {
                return Ok(c.clone());
            }
            slot.conn = None;
        }
        if let Some(at) = slot.retry_at {
            if Instant::now() < at {
                return Err(slot
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "backing off".into()));
            }
        }
        match Conn::connect(&server.endpoint, &self.config).await {
            Ok(c) => {
                tracing::info!(keyserver = %server.endpoint.addr, "connected to key server");
                slot.retry_at = None;
                slot.backoff = self.config.min_backoff;
                slot.last_error = None;
                slot.conn = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                tracing::warn!(keyserver = %server.endpoint.addr, error = %e, backoff = ?slot.backoff, "cannot connect to key server");
                slot.retry_at = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(self.config.max_backoff);
                let e = e.to_string();
                slot.last_error = Some(e.clone());
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        Server {
            endpoint: Endpoint {
                addr: "ks.test:2407".into(),
                server_name: ServerName::try_from("ks.test").unwrap(),
            },
            slots: Vec::new(),
            next: AtomicUsize::new(0),
            health: std::sync::Mutex::new(Health::default()),
            up: None,
        }
    }

    #[test]
    fn three_failures_pass_a_server_over_and_one_success_brings_it_back() {
        let s = server();
        let now = Instant::now();
        s.record(false);
        s.record(false);
        assert!(!s.is_down(Instant::now()), "two failures are not enough");
        s.record(true);
        s.record(false);
        s.record(false);
        assert!(!s.is_down(Instant::now()), "a success resets the count");
        s.record(false);
        assert!(s.is_down(Instant::now()));
        assert!(!s.is_down(now + DOWN_MIN + Duration::from_millis(50)));
        // Failing again when its turn comes: passed over at once, for twice as long.
        s.record(false);
        assert!(s.is_down(Instant::now() + DOWN_MIN + Duration::from_millis(50)));
        s.record(true);
        assert!(!s.is_down(Instant::now()));
        let h = s.health.lock().unwrap();
        assert_eq!((h.failures, h.down_until, h.down_for), (0, None, DOWN_MIN));
    }

    #[test]
    fn down_periods_double_up_to_the_maximum() {
        let s = server();
        for _ in 0..20 {
            s.record(false);
        }
        assert_eq!(s.health.lock().unwrap().down_for, DOWN_MAX);
    }
}
