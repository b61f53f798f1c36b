//! Prometheus metrics of the key server (`keyless_` prefix) and the HTTP endpoint that
//! serves them with a health check.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use keyless_shared::serve::{serve_admin, text_response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the metrics read of a PKCS#11 token (implemented by the PKCS#11 store).
pub(crate) trait TokenHealth: Send + Sync {
    /// The token's URI without its PIN source.
    fn name(&self) -> String;
    /// Whether the token answers operations now.
    fn available(&self) -> bool;
}

/// A loaded key's certificate, for `keyless_cert_expiry_timestamp_seconds`.
pub(crate) struct CertExpiry {
    pub(crate) key: String,
    pub(crate) ski: String,
    pub(crate) not_after: i64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpLabels {
    pub(crate) opcode: &'static str,
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpcodeLabel {
    pub(crate) opcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EnrollLabels {
    pub(crate) op: &'static str,
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TokenLabel {
    /// The token's URI without its PIN source.
    pub(crate) token: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CertLabels {
    pub(crate) key: String,
    pub(crate) ski: String,
}

/// Registers `metric` under `name` and returns it (a handle to the same metric).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

fn histogram() -> Histogram {
    // 1 µs .. ~4 s
    Histogram::new(exponential_buckets(1e-6, 4.0, 12))
}

pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) ops: Family<OpLabels, Counter>,
    pub(crate) queue_seconds: Family<OpcodeLabel, Histogram>,
    pub(crate) exec_seconds: Family<OpcodeLabel, Histogram>,
    pub(crate) connections: Family<ResultLabel, Counter>,
    pub(crate) connections_active: Gauge,
    pub(crate) connections_handshaking: Gauge,
    pub(crate) queue_dropped: Family<ReasonLabel, Counter>,
    pub(crate) keys_loaded: Gauge,
    pub(crate) cert_expiry: Family<CertLabels, Gauge<i64, AtomicI64>>,
    pub(crate) reloads: Family<ResultLabel, Counter>,
    pub(crate) frame_errors: Counter<u64, AtomicU64>,
    pub(crate) draining: Gauge,
    pub(crate) enrollments: Family<EnrollLabels, Counter>,
    pub(crate) tls_reloads: Family<ResultLabel, Counter>,
    pub(crate) tls_rotations: Family<ResultLabel, Counter>,
    /// Whether each PKCS#11 token of the keystore answers (1) or is in its reopen
    /// back-off (0); set when metrics are read.
    pub(crate) token_up: Family<TokenLabel, Gauge>,
    /// The keystore's tokens, for `token_up`.
    tokens: std::sync::Mutex<Vec<std::sync::Weak<dyn TokenHealth>>>,
}

use std::sync::atomic::AtomicI64;

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut r = Registry::default();
        // Each field is registered as it is built; `registry` moves in last.
        Metrics {
            ops: register(
                &mut r,
                "keyless_ops",
                "Operations answered, by opcode and result (ok or the protocol error name)",
                Family::<OpLabels, Counter>::default(),
            ),
            queue_seconds: register(
                &mut r,
                "keyless_op_queue_seconds",
                "Time a private-key operation waited for a worker",
                Family::<OpcodeLabel, Histogram>::new_with_constructor(histogram as fn() -> Histogram),
            ),
            exec_seconds: register(
                &mut r,
                "keyless_op_exec_seconds",
                "Time a private-key operation took on a worker",
                Family::<OpcodeLabel, Histogram>::new_with_constructor(histogram as fn() -> Histogram),
            ),
            connections: register(
                &mut r,
                "keyless_connections",
                "Edge connections, by outcome of their set-up (accepted, handshake-failed, handshake-timeout, handshake-evicted, no-identity, unknown-group, bad-group, over-limit, revoked)",
                Family::<ResultLabel, Counter>::default(),
            ),
            connections_active: register(
                &mut r,
                "keyless_connections_active",
                "Edge connections open now",
                Gauge::default(),
            ),
            connections_handshaking: register(
                &mut r,
                "keyless_connections_handshaking",
                "Connections accepted whose TLS handshake has not finished",
                Gauge::default(),
            ),
            queue_dropped: register(
                &mut r,
                "keyless_queue_dropped",
                "Private-key operations not performed, by reason (full, predicted-late, deadline, requester-gone, token-timeout, token-down)",
                Family::<ReasonLabel, Counter>::default(),
            ),
            keys_loaded: register(
                &mut r,
                "keyless_keys_loaded",
                "Site keys in the keystore",
                Gauge::default(),
            ),
            cert_expiry: register(
                &mut r,
                "keyless_certificate_expiry_timestamp_seconds",
                "notAfter of each site certificate, seconds since the epoch",
                Family::<CertLabels, Gauge<i64, AtomicI64>>::default(),
            ),
            reloads: register(
                &mut r,
                "keyless_reloads",
                "Keystore reloads, by result",
                Family::<ResultLabel, Counter>::default(),
            ),
            frame_errors: register(
                &mut r,
                "keyless_frame_errors",
                "Connections closed for a malformed frame",
                Counter::default(),
            ),
            draining: register(
                &mut r,
                "keyless_draining",
                "1 while the key server drains after SIGTERM (go-away sent, no new connections), else 0",
                Gauge::default(),
            ),
            enrollments: register(
                &mut r,
                "keyless_enrollments",
                "Enrollment API answers, by operation (enroll, reenroll) and result (ok or the ENROLL.md error code)",
                Family::<EnrollLabels, Counter>::default(),
            ),
            tls_reloads: register(
                &mut r,
                "keyless_tls_reloads",
                "TLS configuration rebuilds after a file changed on disk, by result",
                Family::<ResultLabel, Counter>::default(),
            ),
            tls_rotations: register(
                &mut r,
                "keyless_tls_rotations",
                "Rotations of the key server's own certificate ([tls] rotate_every), by result",
                Family::<ResultLabel, Counter>::default(),
            ),
            token_up: register(
                &mut r,
                "keyless_token_up",
                "Whether each PKCS#11 token answers (1) or is unavailable, its keys answering key-unavailable (0)",
                Family::<TokenLabel, Gauge>::default(),
            ),
            tokens: std::sync::Mutex::new(Vec::new()),
            registry: r,
        }
    }

    /// Records the state of a newly installed keystore: how many keys, its tokens and
    /// its certificates.
    pub(crate) fn keystore(
        &self,
        keys: usize,
        tokens: Vec<std::sync::Weak<dyn TokenHealth>>,
        certs: impl IntoIterator<Item = CertExpiry>,
    ) {
        self.keys_loaded.set(keys as i64);
        self.token_up.clear();
        *self.tokens.lock().unwrap_or_else(|p| p.into_inner()) = tokens;
        self.cert_expiry.clear();
        for c in certs {
            self.cert_expiry
                .get_or_create(&CertLabels {
                    key: c.key,
                    ski: c.ski,
                })
                .set(c.not_after);
        }
    }

    pub(crate) fn op(&self, opcode: &'static str, result: &'static str) {
        self.ops.get_or_create(&OpLabels { opcode, result }).inc();
    }

    pub(crate) fn queue_dropped(&self, reason: &'static str) {
        self.queue_dropped
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub(crate) fn enrollment(&self, op: &'static str, result: &'static str) {
        self.enrollments
            .get_or_create(&EnrollLabels { op, result })
            .inc();
    }

    pub(crate) fn connection(&self, result: &'static str) {
        self.connections
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub(crate) fn timing(&self, opcode: &'static str, queue: Duration, exec: Duration) {
        let l = OpcodeLabel { opcode };
        self.queue_seconds
            .get_or_create(&l)
            .observe(queue.as_secs_f64());
        self.exec_seconds
            .get_or_create(&l)
            .observe(exec.as_secs_f64());
    }

    fn render(&self) -> String {
        for token in self
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(std::sync::Weak::upgrade)
        {
            self.token_up
                .get_or_create(&TokenLabel {
                    token: token.name(),
                })
                .set(i64::from(token.available()));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `GET /metrics` and `GET /healthz` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    serve_admin(listener, shutdown, move |req: Request<Incoming>, _peer| {
        let (status, body) = match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => (StatusCode::OK, metrics.render()),
            // A draining key server tells load balancers to send nothing new.
            (&Method::GET, "/healthz") if metrics.draining.get() == 1 => {
                (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned())
            }
            (&Method::GET, "/healthz") => (StatusCode::OK, "ok\n".to_owned()),
            _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
        };
        std::future::ready(text_response(status, body))
    })
    .await;
}
