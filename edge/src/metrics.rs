//! Prometheus metrics of the edge (`keyless_edge_` prefix), rendered by the admin
//! listener.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `result` and TLS `version` of a client handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `ok`, `unknown-sni`, `no-sni`, `keyserver-error`, `overloaded` (too many remote
    /// signatures waiting), `failed`, `timeout`.
    pub result: &'static str,
    /// `TLSv1_3`, `TLSv1_2` or `-`.
    pub version: &'static str,
}

/// Key-server operation labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyServerLabels {
    /// Opcode name (`ecdsa-sign-sha256`, `get-certificate-chain`, ...).
    pub op: &'static str,
    /// `ok` or the error (`timeout`, `unavailable`, a protocol error name).
    pub result: &'static str,
}

/// HTTP status class and listener of answered requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Status code, e.g. `200`, `502`.
    pub status: u16,
    /// `https` or `http`.
    pub scheme: &'static str,
}

/// Origin exchange result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    /// `ok`, `connect-error`, `timeout`, `dns-error`, `error`.
    pub result: &'static str,
}

/// The result of an action (`ok`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Cache lookup result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit`, `stale` (served stale), `miss`, `revalidate` (a stored response sent to
    /// the origin for validation), `bypass`.
    pub result: &'static str,
}

/// One key server of a group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    /// The key-server group.
    pub group: String,
    /// Its `host:port` (as configured, or an SRV target's address).
    pub server: String,
}

/// One renewal of the edge's certificate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenewalLabels {
    /// The key-server group.
    pub group: String,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// One key-server group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// The key-server group.
    pub group: String,
}

/// How a handshake resumed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResumptionLabels {
    /// `ticket`, `session-memory` (this edge's session cache) or `session-redis`.
    pub kind: &'static str,
}

/// A session-store operation and its result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionStoreLabels {
    /// `get`, `take`, `put` or `delete`.
    pub op: &'static str,
    /// `hit`, `miss`, `stored`, `timeout`, `error`, `busy`, `no-key`, or why an entry
    /// was refused (`forged`, `unknown-key`, `expired`, `malformed`).
    pub result: &'static str,
}

/// A session-store operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionOpLabels {
    /// `get`, `take`, `put` or `delete`.
    pub op: &'static str,
}

/// The session-ticket key a group's edges seal with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TicketKeyLabels {
    /// The key-server group.
    pub group: String,
    /// The key's id (hex).
    pub id: String,
}

/// Cache tier.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// `memory` or `disk`.
    pub tier: &'static str,
}

fn latency() -> Histogram {
    // 50 µs .. ~13 s
    Histogram::new(exponential_buckets(50e-6, 2.5, 14))
}

/// Every edge metric.
pub struct Metrics {
    registry: Registry,
    /// Client TLS handshakes.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// Handshake duration (accept to established), successful handshakes.
    pub handshake_seconds: Histogram,
    /// Handshakes that resumed a session (no key-server operation).
    pub handshakes_resumed: Counter,
    /// Resumed handshakes by where the session came from.
    pub resumptions: Family<ResumptionLabels, Counter>,
    /// Handshakes that resumed nothing (each made a key-server operation).
    pub handshakes_full: Counter,
    /// Session-store operations against Redis, by result.
    pub session_store_ops: Family<SessionStoreLabels, Counter>,
    /// Session-store round trips to Redis (answered ones).
    pub session_store_seconds: Family<SessionOpLabels, Histogram>,
    /// Age of the ticket key each group seals with.
    pub ticket_key_age: Family<GroupLabels, Gauge>,
    /// 1 for the id of the ticket key each group seals with.
    pub ticket_key: Family<TicketKeyLabels, Gauge>,
    /// Key-server operations.
    pub keyserver_ops: Family<KeyServerLabels, Counter>,
    /// Key-server operation latency.
    pub keyserver_seconds: Family<KeyServerLabels, Histogram>,
    /// Answered client requests.
    pub requests: Family<RequestLabels, Counter>,
    /// Origin response-header latency.
    pub origin_seconds: Family<OriginLabels, Histogram>,
    /// Open client connections.
    pub connections_active: Gauge,
    /// Certificate chains cached.
    pub certs_cached: Gauge,
    /// Remote private-key operations waiting for the key server now.
    pub remote_ops_in_flight: Gauge,
    /// Handshakes refused because `max_concurrent_ops` remote operations were waiting.
    pub remote_ops_rejected: Counter,
    /// 1 while a key server is in use, 0 while it is down or draining.
    pub keyserver_up: Family<ServerLabels, Gauge>,
    /// Heartbeat round trips.
    pub keyserver_probe_seconds: Family<ServerLabels, Histogram>,
    /// The key server's clock minus the edge's, from the last pong.
    pub keyserver_clock_offset: Family<ServerLabels, Gauge<f64, AtomicU64>>,
    /// Servers of each group that are up.
    pub keyserver_group_up: Family<GroupLabels, Gauge>,
    /// Seconds until the edge's certificate towards each group expires.
    pub credential_expiry: Family<GroupLabels, Gauge>,
    /// Renewals of the edge's certificate, by group and result.
    pub credential_renewals: Family<RenewalLabels, Counter>,
    /// Cache lookups by result.
    pub cache_lookups: Family<CacheLabels, Counter>,
    /// Bytes held by each cache tier.
    pub cache_bytes: Family<TierLabels, Gauge>,
    /// Objects held by each cache tier.
    pub cache_objects: Family<TierLabels, Gauge>,
    /// Objects evicted from each tier to respect its byte bound.
    pub cache_evictions: Family<TierLabels, Counter>,
    /// Requests served from another request's origin fetch.
    pub cache_coalesced: Counter,
    /// Responses stored.
    pub cache_stores: Counter,
    /// Objects removed through the purge API.
    pub cache_purged: Counter,
    /// Reads of stored objects that found one, by tier (a disk read includes the file
    /// read and its checksum).
    pub cache_read_seconds: Family<TierLabels, Histogram>,
    /// Body bytes sent to clients from each tier (`memory`, `disk`) and received from
    /// origins (`origin`).
    pub cache_served_bytes: Family<SourceLabels, Counter>,
    /// Reads of one block (1 MiB) of a large object's file, with its checksum.
    pub cache_block_read_seconds: Histogram,
    /// Large objects being written to the disk tier as they stream.
    pub cache_disk_streams: Gauge,
    /// Large objects written to the disk tier as they streamed, by result.
    pub cache_disk_streamed: Family<CacheLabels, Counter>,
    /// Slice fetches from origins and slicing outcomes, by result.
    pub cache_slice_fetches: Family<CacheLabels, Counter>,
    /// Configuration reloads (SIGHUP, `POST /reload`), by result (`ok`, `error`).
    pub config_reloads: Family<ResultLabels, Counter>,
    /// When the running configuration was loaded (start or last successful reload).
    pub config_loaded: Gauge,
}

/// Where served bytes came from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `memory`, `disk` or `origin`.
    pub source: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            handshakes: Family::default(),
            handshake_seconds: latency(),
            handshakes_resumed: Counter::default(),
            resumptions: Family::default(),
            handshakes_full: Counter::default(),
            session_store_ops: Family::default(),
            session_store_seconds: Family::new_with_constructor(latency),
            ticket_key_age: Family::default(),
            ticket_key: Family::default(),
            keyserver_ops: Family::default(),
            keyserver_seconds: Family::new_with_constructor(latency),
            requests: Family::default(),
            origin_seconds: Family::new_with_constructor(latency),
            connections_active: Gauge::default(),
            certs_cached: Gauge::default(),
            remote_ops_in_flight: Gauge::default(),
            remote_ops_rejected: Counter::default(),
            keyserver_up: Family::default(),
            keyserver_probe_seconds: Family::new_with_constructor(latency),
            keyserver_clock_offset: Family::default(),
            keyserver_group_up: Family::default(),
            credential_expiry: Family::default(),
            credential_renewals: Family::default(),
            cache_lookups: Family::default(),
            cache_bytes: Family::default(),
            cache_objects: Family::default(),
            cache_evictions: Family::default(),
            cache_coalesced: Counter::default(),
            cache_stores: Counter::default(),
            cache_purged: Counter::default(),
            cache_read_seconds: Family::new_with_constructor(latency),
            cache_served_bytes: Family::default(),
            cache_block_read_seconds: latency(),
            cache_disk_streams: Gauge::default(),
            cache_disk_streamed: Family::default(),
            cache_slice_fetches: Family::default(),
            config_reloads: Family::default(),
            config_loaded: Gauge::default(),
        };
        // The exposition lists metrics in registration order: keep these calls in order.
        m.register_tls();
        m.register_http();
        m.register_cache();
        m.register_remote_ops();
        m.register_sessions();
        m.register_config();
        m
    }

    /// Configuration reloads.
    fn register_config(&mut self) {
        self.registry.register(
            "keyless_edge_config_reloads",
            "Configuration reloads (SIGHUP, POST /reload) by result: ok, error (the running configuration stays)",
            self.config_reloads.clone(),
        );
        self.registry.register(
            "keyless_edge_config_loaded_timestamp_seconds",
            "When the running configuration was loaded (start or last successful reload), Unix time",
            self.config_loaded.clone(),
        );
    }

    /// Counts a reload; a successful one sets `config_loaded` to now.
    pub fn config_reload(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        if result == "ok" {
            self.config_loaded_now();
        }
    }

    /// Sets `config_loaded` to now.
    pub fn config_loaded_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.config_loaded
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// Session resumption: its kinds, the session store and the ticket keys.
    fn register_sessions(&mut self) {
        let r = &mut self.registry;
        r.register(
            "keyless_edge_resumptions",
            "Resumed handshakes by kind: ticket, session-memory, session-redis",
            self.resumptions.clone(),
        );
        r.register(
            "keyless_edge_handshakes_full",
            "Handshakes that resumed no session (each made a key-server operation)",
            self.handshakes_full.clone(),
        );
        r.register(
            "keyless_edge_session_store_ops",
            "Session-store operations against Redis, by operation and result",
            self.session_store_ops.clone(),
        );
        r.register(
            "keyless_edge_session_store_seconds",
            "Round trips to the session store's Redis",
            self.session_store_seconds.clone(),
        );
        r.register(
            "keyless_edge_ticket_key_age_seconds",
            "Age of the session-ticket key each key-server group seals with",
            self.ticket_key_age.clone(),
        );
        r.register(
            "keyless_edge_ticket_key",
            "1 for the id of the session-ticket key each key-server group seals with",
            self.ticket_key.clone(),
        );
    }

    /// Counts a session-store operation.
    pub fn session_op(&self, op: &'static str, result: &'static str) {
        self.session_store_ops
            .get_or_create(&SessionStoreLabels { op, result })
            .inc();
    }

    /// Handshakes and the key-server operations they make.
    fn register_tls(&mut self) {
        let r = &mut self.registry;
        r.register(
            "keyless_edge_handshakes",
            "Client TLS handshakes by result and version",
            self.handshakes.clone(),
        );
        r.register(
            "keyless_edge_handshake_seconds",
            "Duration of successful client TLS handshakes",
            self.handshake_seconds.clone(),
        );
        r.register(
            "keyless_edge_handshakes_resumed",
            "Client handshakes that resumed a session (ticket or session id): no key-server operation",
            self.handshakes_resumed.clone(),
        );
        r.register(
            "keyless_edge_keyserver_ops",
            "Key-server operations by opcode and result",
            self.keyserver_ops.clone(),
        );
        r.register(
            "keyless_edge_keyserver_seconds",
            "Key-server operation latency",
            self.keyserver_seconds.clone(),
        );
    }

    /// Requests, origin exchanges, connections and the certificate cache.
    fn register_http(&mut self) {
        let r = &mut self.registry;
        r.register(
            "keyless_edge_requests",
            "Client requests answered, by status",
            self.requests.clone(),
        );
        r.register(
            "keyless_edge_origin_seconds",
            "Time to the origin's response headers",
            self.origin_seconds.clone(),
        );
        r.register(
            "keyless_edge_connections_active",
            "Open client connections",
            self.connections_active.clone(),
        );
        r.register(
            "keyless_edge_certificates_cached",
            "Certificate chains in the cache",
            self.certs_cached.clone(),
        );
    }

    /// The HTTP cache.
    fn register_cache(&mut self) {
        let r = &mut self.registry;
        r.register(
            "keyless_edge_cache_lookups",
            "Cache lookups by result",
            self.cache_lookups.clone(),
        );
        r.register(
            "keyless_edge_cache_bytes",
            "Bytes held by each cache tier",
            self.cache_bytes.clone(),
        );
        r.register(
            "keyless_edge_cache_objects",
            "Objects held by each cache tier",
            self.cache_objects.clone(),
        );
        r.register(
            "keyless_edge_cache_evictions",
            "Objects evicted from each cache tier to respect its size",
            self.cache_evictions.clone(),
        );
        r.register(
            "keyless_edge_cache_coalesced",
            "Requests served from a concurrent request's origin fetch",
            self.cache_coalesced.clone(),
        );
        r.register(
            "keyless_edge_cache_stores",
            "Responses stored in the cache",
            self.cache_stores.clone(),
        );
        r.register(
            "keyless_edge_cache_purged",
            "Objects removed through the purge API",
            self.cache_purged.clone(),
        );
        r.register(
            "keyless_edge_cache_read_seconds",
            "Time to read a stored object, by tier (disk: file read and checksum)",
            self.cache_read_seconds.clone(),
        );
        r.register(
            "keyless_edge_cache_served_bytes",
            "Body bytes sent to clients from each cache tier (memory, disk) and received from origins (origin)",
            self.cache_served_bytes.clone(),
        );
        r.register(
            "keyless_edge_cache_disk_block_read_seconds",
            "Time to read and check one block (1 MiB) of a large object on disk",
            self.cache_block_read_seconds.clone(),
        );
        r.register(
            "keyless_edge_cache_disk_streams",
            "Large objects being written to the disk tier as they stream",
            self.cache_disk_streams.clone(),
        );
        r.register(
            "keyless_edge_cache_disk_streamed",
            "Large objects streamed to the disk tier, by result (stored, dropped)",
            self.cache_disk_streamed.clone(),
        );
        r.register(
            "keyless_edge_cache_slice_fetches",
            "Slices fetched from origins (stored, not-stored, error) and slicing outcomes (mismatch: an object changed between slices; unsliceable: a URL answered whole)",
            self.cache_slice_fetches.clone(),
        );
    }

    /// Counts a slice fetch or slicing outcome.
    pub fn slice_fetch(&self, result: &'static str) {
        self.cache_slice_fetches
            .get_or_create(&CacheLabels { result })
            .inc();
    }

    /// The counter of body bytes served from `source`.
    pub fn served_bytes(&self, source: &'static str) -> Counter {
        self.cache_served_bytes
            .get_or_create(&SourceLabels { source })
            .clone()
    }

    /// Back-pressure on remote private-key operations.
    fn register_remote_ops(&mut self) {
        let r = &mut self.registry;
        r.register(
            "keyless_edge_remote_ops_in_flight",
            "Remote private-key operations waiting for the key server",
            self.remote_ops_in_flight.clone(),
        );
        r.register(
            "keyless_edge_remote_ops_rejected",
            "Handshakes refused because too many remote private-key operations were waiting",
            self.remote_ops_rejected.clone(),
        );
        r.register(
            "keyless_edge_keyserver_up",
            "1 while a key server is in use, 0 while it is down or draining",
            self.keyserver_up.clone(),
        );
        r.register(
            "keyless_edge_keyserver_probe_seconds",
            "Round trip of heartbeat pings to each key server",
            self.keyserver_probe_seconds.clone(),
        );
        r.register(
            "keyless_edge_keyserver_clock_offset_seconds",
            "Key server's clock minus the edge's, estimated from the last pong",
            self.keyserver_clock_offset.clone(),
        );
        r.register(
            "keyless_edge_keyserver_group_up",
            "Key servers of each group that are up (0: the group's sites fail closed)",
            self.keyserver_group_up.clone(),
        );
        r.register(
            "keyless_edge_credential_expiry_seconds",
            "Seconds until the edge's certificate towards each key-server group expires",
            self.credential_expiry.clone(),
        );
        r.register(
            "keyless_edge_credential_renewals",
            "Renewals of the edge's certificate, by group and result",
            self.credential_renewals.clone(),
        );
    }

    /// Records one key-server operation.
    pub fn keyserver_op(&self, op: &'static str, result: &'static str, took: Duration) {
        let l = KeyServerLabels { op, result };
        self.keyserver_ops.get_or_create(&l).inc();
        self.keyserver_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// Records one answered request.
    pub fn request(&self, status: u16, scheme: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { status, scheme })
            .inc();
    }

    /// Records one origin exchange.
    pub fn origin(&self, result: &'static str, took: Duration) {
        self.origin_seconds
            .get_or_create(&OriginLabels { result })
            .observe(took.as_secs_f64());
    }

    /// Records one cache lookup.
    pub fn cache_lookup(&self, result: &'static str) {
        self.cache_lookups
            .get_or_create(&CacheLabels { result })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
