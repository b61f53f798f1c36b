//! One key server of a group: its connections (a few multiplexed mTLS connections,
//! reopened with back-off), its requests in flight, and its health as probes and
//! requests show it.
//!
//! Health is one small state machine per server: `down_after` failures in a row
//! (probes or requests: no answer, lost connection, overloaded) mark it down;
//! `up_after` successful probes in a row mark it up again. A server that says it is
//! draining (a go-away, or a pong with the draining flag) is out of use at once; a
//! go-away also makes its next probe due (on a new connection), and the first pong without the
//! draining flag puts it back in use (it comes from a process that serves: the
//! successor of a zero-downtime upgrade, or a restarted key server). While every
//! server of a group is draining, they still take requests, on new connections (see
//! `group::pick`). Down servers are probed with back-off. Each change is
//! logged once and exported (`keyless_edge_keyserver_up{group,server}`).

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use keyless_shared::{Opcode, Operation};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Mutex;

use super::conn::Conn;
use super::{ClientError, Endpoint, ServerSpec, Settings, TlsSource};
use crate::metrics::{Metrics, ServerLabels};

/// A clock offset change smaller than this is not logged again.
const OFFSET_LOG_STEP_MS: i64 = 500;
/// Failed probes in a row after which a down server's probe interval starts doubling:
/// a short outage (under about this many intervals) is noticed over within one
/// interval plus `up_after` probes; a server gone for long is probed less often.
const BACKOFF_AFTER_PROBES: u32 = 10;

struct Slot {
    conn: Option<Arc<Conn>>,
    /// No new connection attempt before this instant (requests; probes ignore it).
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
}

/// What probes and requests have lately shown of a server.
#[derive(Debug)]
struct Health {
    up: bool,
    draining: bool,
    /// Failures in a row (probes and requests).
    failures: u32,
    /// Successful probes in a row while down or draining.
    successes: u32,
    /// Failed probes in a row.
    probe_failures: u32,
    /// When the next probe is due, and the current probe interval (doubles while the
    /// server is down and its probes fail).
    next_probe: Instant,
    probe_every: Duration,
    /// Last logged clock offset, ms.
    logged_offset: Option<i64>,
}

/// Exported state of one server.
struct ServerMetrics {
    up: Gauge,
    probe_seconds: Histogram,
    clock_offset: Gauge<f64, std::sync::atomic::AtomicU64>,
    metrics: Arc<Metrics>,
    labels: ServerLabels,
}

pub(super) struct Server {
    pub(super) endpoint: Endpoint,
    group: Arc<str>,
    priority: AtomicU16,
    weight: AtomicU16,
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    /// Requests sent and not yet answered.
    outstanding: AtomicUsize,
    health: std::sync::Mutex<Health>,
    metrics: Option<ServerMetrics>,
    settings: Arc<Settings>,
    /// The group's current mTLS configuration (replaced when the edge's certificate
    /// is renewed).
    tls: Arc<TlsSource>,
    me: Weak<Server>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server removed from its group (SRV change) leaves no stale series behind.
        if let Some(m) = &self.metrics {
            m.metrics.keyserver_up.remove(&m.labels);
            m.metrics.keyserver_probe_seconds.remove(&m.labels);
            m.metrics.keyserver_clock_offset.remove(&m.labels);
        }
    }
}

/// Decrements a server's outstanding count when a request ends, however it ends.
pub(super) struct Outstanding<'a>(&'a AtomicUsize);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Server {
    pub(super) fn new(
        spec: &ServerSpec,
        group: Arc<str>,
        settings: Arc<Settings>,
        tls: Arc<TlsSource>,
    ) -> Arc<Server> {
        let metrics = settings.metrics.as_ref().map(|m| {
            let labels = ServerLabels {
                group: group.to_string(),
                server: spec.endpoint.addr.clone(),
            };
            let up = m.keyserver_up.get_or_create(&labels).clone();
            up.set(1);
            ServerMetrics {
                up,
                probe_seconds: m.keyserver_probe_seconds.get_or_create(&labels).clone(),
                clock_offset: m.keyserver_clock_offset.get_or_create(&labels).clone(),
                metrics: m.clone(),
                labels,
            }
        });
        Arc::new_cyclic(|me| Server {
            endpoint: spec.endpoint.clone(),
            group,
            priority: AtomicU16::new(spec.priority),
            weight: AtomicU16::new(spec.weight),
            slots: (0..settings.connections_per_server.max(1))
                .map(|_| {
                    Mutex::new(Slot {
                        conn: None,
                        retry_at: None,
                        backoff: settings.min_backoff,
                        last_error: None,
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            health: std::sync::Mutex::new(Health {
                up: true,
                draining: false,
                failures: 0,
                successes: 0,
                probe_failures: 0,
                next_probe: Instant::now(),
                probe_every: settings.probe_interval,
                logged_offset: None,
            }),
            metrics,
            tls,
            settings,
            me: me.clone(),
        })
    }

    /// Takes the priority and weight of a new SRV answer.
    pub(super) fn update(&self, spec: &ServerSpec) {
        self.priority.store(spec.priority, Ordering::Relaxed);
        self.weight.store(spec.weight, Ordering::Relaxed);
    }

    pub(super) fn priority(&self) -> u16 {
        self.priority.load(Ordering::Relaxed)
    }

    /// The weight used for selection: zero counts as one (RFC 2782 gives weight-0
    /// targets a small share, not none).
    pub(super) fn weight(&self) -> u64 {
        u64::from(self.weight.load(Ordering::Relaxed).max(1))
    }

    pub(super) fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed) as u64
    }

    /// Counts one request outstanding until the guard drops.
    pub(super) fn hold(&self) -> Outstanding<'_> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(&self.outstanding)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether new requests may go to this server.
    pub(super) fn usable(&self) -> bool {
        let h = self.health();
        h.up && !h.draining
    }

    /// Whether it is up but said it drains: a last resort for new requests, which go
    /// on new connections (to its successor, after an upgrade).
    pub(super) fn only_draining(&self) -> bool {
        let h = self.health();
        h.up && h.draining
    }

    fn set_gauge(&self, up: bool) {
        if let Some(m) = &self.metrics {
            m.up.set(i64::from(up));
        }
    }

    /// A failed probe or request. Returns whether the server just went down.
    pub(super) fn on_failure(&self, what: &str, error: &ClientError) -> bool {
        let mut h = self.health();
        h.failures = h.failures.saturating_add(1);
        h.successes = 0;
        if h.up && h.failures >= self.settings.down_after {
            h.up = false;
            drop(h);
            tracing::warn!(group = %self.group, keyserver = %self.endpoint.addr, failures = self.settings.down_after, last = what, error = %error, "key server down; no new requests until it answers probes again");
            self.set_gauge(false);
            return true;
        }
        false
    }

    /// A request answered (any reply but overloaded).
    pub(super) fn on_request_ok(&self) {
        let mut h = self.health();
        if h.up {
            h.failures = 0;
        }
    }

    /// A pong. `draining` is the key server's own flag.
    fn on_probe_ok(&self, draining: bool) {
        if draining {
            self.on_draining("pong");
            return;
        }
        let mut h = self.health();
        h.failures = 0;
        h.probe_failures = 0;
        if h.up && !h.draining {
            return;
        }
        if h.up {
            // Only draining, never failing: this pong comes from a process that serves.
            h.draining = false;
            h.successes = 0;
            drop(h);
            tracing::info!(group = %self.group, keyserver = %self.endpoint.addr, "key server answers without draining (a new process); back in use");
            self.set_gauge(true);
            return;
        }
        h.successes += 1;
        if h.successes >= self.settings.up_after {
            h.up = true;
            h.draining = false;
            h.successes = 0;
            drop(h);
            tracing::info!(group = %self.group, keyserver = %self.endpoint.addr, probes = self.settings.up_after, "key server up; back in use");
            self.set_gauge(true);
        }
    }

    /// The key server said it is draining: no new requests from now on; those in
    /// flight finish on their connections.
    pub(super) fn on_draining(&self, how: &str) {
        let mut h = self.health();
        h.successes = 0;
        if !h.draining {
            h.draining = true;
            drop(h);
            tracing::info!(group = %self.group, keyserver = %self.endpoint.addr, signal = how, "key server draining; no new requests to it");
            self.set_gauge(false);
        }
    }

    /// Makes the next probe due now (the heartbeat takes it at its next tick).
    fn probe_soon(&self) {
        self.health().next_probe = Instant::now();
    }

    /// Whether a probe is due at `now`; if so, schedules the next one.
    pub(super) fn probe_due(&self, now: Instant) -> bool {
        let mut h = self.health();
        if now < h.next_probe {
            return false;
        }
        let interval = self.settings.probe_interval;
        h.probe_every = if !h.up && h.probe_failures >= BACKOFF_AFTER_PROBES {
            // Down for a while and still failing: back off, up to the maximum.
            (h.probe_every * 2).min(self.settings.probe_max_interval)
        } else {
            interval
        };
        // Never two probes of one server at once.
        h.next_probe = now + h.probe_every.max(self.probe_timeout());
        true
    }

    /// How long a ping may take: the request timeout, at most the probe interval
    /// (at least 1 s). A key server answers pings without queueing them behind work.
    fn probe_timeout(&self) -> Duration {
        let s = &self.settings;
        s.request_timeout
            .min(s.probe_interval.max(Duration::from_secs(1)))
    }

    /// Sends one heartbeat ping and notes the outcome: round trip, clock offset,
    /// draining flag, health.
    pub(super) async fn probe(&self) {
        let nonce = fastrand::u64(..).to_be_bytes();
        let started = Instant::now();
        let sent_wall = SystemTime::now();
        let result = async {
            let conn = self.conn(true).await?;
            let op = Operation::new(Opcode::Ping, nonce.to_vec());
            let timeout = self.probe_timeout();
            let reply = tokio::time::timeout(timeout, conn.call(op))
                .await
                .map_err(|_| ClientError::Timeout(timeout))??;
            if reply.opcode != Some(Opcode::Pong) || reply.payload() != nonce {
                return Err(ClientError::Remote(
                    reply
                        .error_code()
                        .unwrap_or(keyless_shared::ErrorCode::Format),
                ));
            }
            Ok(reply)
        }
        .await;
        let rtt = started.elapsed();
        match result {
            Ok(pong) => {
                if let Some(m) = &self.metrics {
                    m.probe_seconds.observe(rtt.as_secs_f64());
                }
                if let Some(t) = pong.server_time {
                    self.clock_offset(t, sent_wall, rtt);
                }
                self.on_probe_ok(pong.draining);
            }
            Err(e) => {
                tracing::debug!(group = %self.group, keyserver = %self.endpoint.addr, error = %e, "probe failed");
                {
                    let mut h = self.health();
                    h.probe_failures = h.probe_failures.saturating_add(1);
                }
                self.on_failure("probe", &e);
            }
        }
    }

    /// Notes the key server's clock: offset = server time − the midpoint of the probe.
    fn clock_offset(&self, server_ms: u64, sent: SystemTime, rtt: Duration) {
        let Ok(sent) = sent.duration_since(SystemTime::UNIX_EPOCH) else {
            return;
        };
        let midpoint = sent + rtt / 2;
        let offset_ms = i64::try_from(server_ms).unwrap_or(i64::MAX)
            - i64::try_from(midpoint.as_millis()).unwrap_or(i64::MAX);
        if let Some(m) = &self.metrics {
            m.clock_offset.set(offset_ms as f64 / 1000.0);
        }
        let mut h = self.health();
        let changed = h
            .logged_offset
            .is_none_or(|last| (last - offset_ms).abs() >= OFFSET_LOG_STEP_MS);
        if changed {
            h.logged_offset = Some(offset_ms);
            drop(h);
            tracing::info!(group = %self.group, keyserver = %self.endpoint.addr, offset_ms, "key server clock offset");
        }
    }

    /// One request to this server within the request timeout and `deadline`: a
    /// connection lost before the reply is retried once on a fresh connection. The
    /// outcome feeds the server's health.
    pub(super) async fn request(
        &self,
        op: Operation,
        deadline: Instant,
    ) -> Result<Operation, ClientError> {
        let _outstanding = self.hold();
        let mut result = match self.conn(false).await {
            Ok(conn) => self.attempt(&conn, op.clone(), deadline).await,
            Err(e) => Err(e),
        };
        if matches!(result, Err(ClientError::ConnectionLost)) {
            tracing::debug!(keyserver = %self.endpoint.addr, "key server connection lost; retrying once on a fresh connection");
            result = match self.conn(false).await {
                Ok(conn) => self.attempt(&conn, op, deadline).await,
                Err(e) => Err(e),
            };
        }
        match &result {
            Err(e) if super::fails_over(e) => {
                self.on_failure("request", e);
            }
            _ => self.on_request_ok(),
        }
        result
    }

    async fn attempt(
        &self,
        conn: &Conn,
        op: Operation,
        deadline: Instant,
    ) -> Result<Operation, ClientError> {
        let until = deadline.min(Instant::now() + self.settings.request_timeout);
        let allowed = super::budget(until);
        let reply = tokio::time::timeout_at(until.into(), conn.call(op))
            .await
            .map_err(|_| ClientError::Timeout(allowed))??;
        match reply.error_code() {
            Some(code) => Err(ClientError::Remote(code)),
            None => Ok(reply),
        }
    }

    /// Lets every open connection finish what it has in flight and close: new requests
    /// open new connections (with the group's current identity).
    pub(super) async fn retire_connections(&self) {
        for slot in &self.slots {
            if let Some(conn) = slot.lock().await.conn.take() {
                conn.retire();
            }
        }
    }

    /// A live connection, trying the slots in turn. `probe`: ignore the reconnection
    /// back-off (probes are paced by their own schedule).
    async fn conn(&self, probe: bool) -> Result<Arc<Conn>, ClientError> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            match self.slot_conn(&self.slots[(start + i) % n], probe).await {
                Ok(c) => return Ok(c),
                Err(e) => errors.push(format!("{}: {e}", self.endpoint.addr)),
            }
        }
        errors.dedup();
        Err(ClientError::Unavailable(errors.join("; ")))
    }

    async fn slot_conn(&self, slot: &Mutex<Slot>, probe: bool) -> Result<Arc<Conn>, String> {
        let mut slot = slot.lock().await;
        if let Some(c) = &slot.conn {
            if c.is_open() {
                return Ok(c.clone());
            }
            slot.conn = None;
        }
        if let Some(at) = slot.retry_at {
            if !probe && Instant::now() < at {
                return Err(slot
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "backing off".into()));
            }
        }
        let me = self.me.clone();
        let on_go_away = move || {
            if let Some(server) = me.upgrade() {
                server.on_draining("go-away");
                // On a new connection: a successor (an upgrade) says it serves.
                server.probe_soon();
            }
        };
        let tls = self.tls.current();
        match Conn::connect(&self.endpoint, &tls, &self.settings, Box::new(on_go_away)).await {
            Ok(c) => {
                tracing::info!(group = %self.group, keyserver = %self.endpoint.addr, "connected to key server");
                slot.retry_at = None;
                slot.backoff = self.settings.min_backoff;
                slot.last_error = None;
                slot.conn = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                tracing::debug!(group = %self.group, keyserver = %self.endpoint.addr, error = %e, backoff = ?slot.backoff, "cannot connect to key server");
                slot.retry_at = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(self.settings.max_backoff);
                let e = e.to_string();
                slot.last_error = Some(e.clone());
                Err(e)
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rustls_pki_types::ServerName;

    pub(crate) fn server(priority: u16, weight: u16) -> Arc<Server> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let spec = ServerSpec {
            endpoint: Endpoint {
                addr: format!("ks{priority}-{weight}.test:2407"),
                server_name: ServerName::try_from("ks.test").unwrap(),
            },
            priority,
            weight,
        };
        Server::new(
            &spec,
            "g".into(),
            Arc::new(Settings::default()),
            Arc::new(TlsSource::new(Arc::new(tls))),
        )
    }

    fn timeout() -> ClientError {
        ClientError::Timeout(Duration::from_secs(1))
    }

    #[test]
    fn down_after_n_failures_up_after_m_probes() {
        let s = server(10, 1);
        assert!(s.usable());
        s.on_failure("request", &timeout());
        s.on_failure("probe", &timeout());
        assert!(s.usable(), "two failures are not enough");
        s.on_request_ok();
        s.on_failure("probe", &timeout());
        s.on_failure("probe", &timeout());
        assert!(s.usable(), "a success resets the count");
        assert!(s.on_failure("probe", &timeout()), "the third in a row");
        assert!(!s.usable());
        s.on_probe_ok(false);
        s.on_probe_ok(false);
        assert!(!s.usable(), "failback waits for M probes, not the first");
        s.on_failure("probe", &timeout());
        s.on_probe_ok(false);
        s.on_probe_ok(false);
        assert!(!s.usable(), "a failure restarts the count");
        s.on_probe_ok(false);
        assert!(s.usable());
    }

    #[test]
    fn draining_is_out_of_use_at_once_and_back_at_the_first_plain_pong() {
        let s = server(10, 1);
        s.on_draining("go-away");
        assert!(!s.usable());
        assert!(s.only_draining());
        s.on_probe_ok(true);
        assert!(!s.usable());
        s.on_probe_ok(false);
        assert!(s.usable());
        assert!(!s.only_draining());
    }

    #[test]
    fn a_draining_server_that_then_fails_needs_m_plain_pongs() {
        let s = server(10, 1);
        s.on_draining("go-away");
        for _ in 0..3 {
            s.on_failure("probe", &timeout());
        }
        assert!(!s.usable() && !s.only_draining());
        s.on_probe_ok(false);
        s.on_probe_ok(false);
        assert!(!s.usable());
        s.on_probe_ok(false);
        assert!(s.usable());
    }

    #[test]
    fn down_servers_are_probed_with_back_off() {
        let s = server(10, 1);
        let now = Instant::now();
        assert!(s.probe_due(now));
        assert!(!s.probe_due(now + Duration::from_millis(10)));
        for _ in 0..10 {
            s.on_failure("probe", &timeout());
        }
        s.health().probe_failures = BACKOFF_AFTER_PROBES;
        let mut at = now;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            let next = s.health().next_probe;
            gaps.push(next - at);
            at = next;
            assert!(s.probe_due(at));
        }
        let max = Settings::default().probe_max_interval;
        assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "{gaps:?}");
        assert_eq!(*gaps.last().unwrap(), max, "{gaps:?}");
    }
}
