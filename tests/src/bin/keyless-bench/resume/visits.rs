//! The client loops of a measurement: returning visitors, each with a session cache of
//! its own, and what they counted.

use super::*;

/// What one connection saw.
#[derive(Debug)]
pub(super) struct Visit {
    /// Connect start to handshake done.
    pub(super) handshake: Duration,
    pub(super) resumed: bool,
    pub(super) version: Option<ProtocolVersion>,
}

/// One client: a session cache of its own (one returning visitor) and what each of its
/// connections does after the handshake.
pub(super) struct Visitor {
    pub(super) connector: TlsConnector,
    pub(super) name: ServerName<'static>,
    /// `GET /` and its checked response; else close right after the handshake.
    pub(super) request: bool,
}

impl Visitor {
    pub(super) fn new(
        mode: Mode,
        trust: &Trust,
        name: &ServerName<'static>,
        request: bool,
    ) -> Result<Visitor> {
        Ok(Visitor {
            connector: TlsConnector::from(mode.client_config(trust)?),
            name: name.clone(),
            request,
        })
    }

    /// One connection within [`load::ITERATION_TIMEOUT`]: connect, handshake (offering
    /// the session the cache holds, if any), `GET /` and the checked response read to
    /// the end, or (without `request`) `close_notify` and whatever the server still
    /// sends read to the end. Either way TLS 1.3 tickets reach the cache.
    pub(super) async fn visit(&self, addr: SocketAddr) -> Result<Visit, String> {
        let once = async {
            let (mut tls, handshake) = load::handshake(&self.connector, &self.name, addr).await?;
            let (_, conn) = tls.get_ref();
            let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
            let version = conn.protocol_version();
            if self.request {
                load::send_request(&mut tls, addr).await?;
            } else {
                tls.shutdown()
                    .await
                    .map_err(|e| format!("closing the connection to {addr}: {e}"))?;
            }
            let response = load::read_response(&mut tls)
                .await
                .map_err(|e| format!("{addr}: {e:#}"))?;
            if self.request {
                load::check_response(&response)?;
            }
            Ok(Visit {
                handshake,
                resumed,
                version,
            })
        };
        tokio::time::timeout(load::ITERATION_TIMEOUT, once)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no response from {addr} within {:?}",
                    load::ITERATION_TIMEOUT
                ))
            })
    }
}

/// The client loops of one measurement.
pub(super) struct Loops<'a> {
    pub(super) mode: Mode,
    pub(super) trust: &'a Trust,
    pub(super) name: &'a ServerName<'static>,
    /// Where each loop makes its first handshake (its session), if not on `addr`.
    pub(super) prime: Option<SocketAddr>,
    /// Where the measured handshakes go.
    pub(super) addr: SocketAddr,
    /// Each connection sends `GET /` (else it closes after the handshake).
    pub(super) request: bool,
}

/// Phase and first failure, shared by the loops of a measurement.
pub(super) struct Shared {
    pub(super) phase: AtomicU8,
    pub(super) first_error: Mutex<Option<String>>,
}

impl Shared {
    pub(super) fn failed(&self, e: String) {
        self.first_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_or_insert(e);
    }
}

/// What one loop counted.
#[derive(Default)]
pub(super) struct Tally {
    /// Handshake latency of each measured connection, µs.
    pub(super) latencies_us: Vec<u32>,
    /// Measured connections completed, of them resumed, and failed.
    pub(super) ok: u64,
    pub(super) resumed: u64,
    pub(super) errors: u64,
    /// Connections completed in the whole run (warm-up and first handshakes included),
    /// and how many were full handshakes.
    pub(super) all: u64,
    pub(super) all_full: u64,
}

impl Tally {
    pub(super) fn add(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.ok += other.ok;
        self.resumed += other.resumed;
        self.errors += other.errors;
        self.all += other.all;
        self.all_full += other.all_full;
    }

    pub(super) fn completed(&mut self, visit: &Visit, measuring: bool) {
        self.all += 1;
        if !visit.resumed {
            self.all_full += 1;
        }
        if measuring {
            self.ok += 1;
            if visit.resumed {
                self.resumed += 1;
            }
            self.latencies_us
                .push(u32::try_from(visit.handshake.as_micros()).unwrap_or(u32::MAX));
        }
    }
}

impl Loops<'_> {
    /// Runs `concurrency` loops: warm-up, then `duration` measured. CPU seconds of each
    /// of `pids` are sampled at the start and end of the measured part.
    pub(super) async fn measure(
        &self,
        concurrency: usize,
        duration: Duration,
        pids: &[u32],
    ) -> Result<(Sample, Tally)> {
        // One config per loop: a session cache per loop, as each loop is one visitor.
        let visitors = (0..concurrency)
            .map(|_| Visitor::new(self.mode, self.trust, self.name, self.request))
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(WARMING),
            first_error: Mutex::new(None),
        });
        let loops: Vec<_> = visitors
            .into_iter()
            .map(|v| {
                tokio::spawn(run_loop(
                    v,
                    self.prime,
                    self.addr,
                    self.mode.version(),
                    shared.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(WARMUP).await;
        let busy0 = load::machine_busy_seconds();
        let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
        shared.phase.store(MEASURING, Ordering::SeqCst);
        let t0 = Instant::now();
        tokio::time::sleep(duration).await;
        shared.phase.store(STOPPED, Ordering::SeqCst);
        let secs = t0.elapsed().as_secs_f64();
        let cpu1: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
        let busy1 = load::machine_busy_seconds();
        let mut tally = Tally::default();
        for l in loops {
            tally.add(l.await.context("a load task panicked")?);
        }
        let first_error = shared
            .first_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let sample = Sample {
            ops: tally.ok,
            secs,
            errors: tally.errors,
            first_error,
            latencies_us: std::mem::take(&mut tally.latencies_us),
            cpu: cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).collect(),
            machine_busy: busy1 - busy0,
        };
        Ok((sample, tally))
    }
}

/// One client loop: its first handshake on `prime` (when given), then connections to
/// `addr` until stopped, each offering the session the loop's cache holds.
pub(super) async fn run_loop(
    visitor: Visitor,
    prime: Option<SocketAddr>,
    addr: SocketAddr,
    version: ProtocolVersion,
    shared: Arc<Shared>,
) -> Tally {
    let mut tally = Tally::default();
    if let Some(first) = prime {
        while shared.phase.load(Ordering::Relaxed) != STOPPED {
            match visitor.visit(first).await {
                Ok(v) => {
                    tally.completed(&v, false);
                    break;
                }
                Err(e) => {
                    shared.failed(e);
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
        }
    }
    while shared.phase.load(Ordering::Relaxed) != STOPPED {
        let result = visitor.visit(addr).await.and_then(|v| match v.version {
            Some(got) if got == version => Ok(v),
            got => Err(format!("negotiated {got:?}, expected {version:?}")),
        });
        // Only connections that end inside the measured window count.
        let measuring = shared.phase.load(Ordering::Relaxed) == MEASURING;
        match result {
            Ok(v) => tally.completed(&v, measuring),
            Err(e) => {
                if measuring {
                    tally.errors += 1;
                }
                shared.failed(e);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    tally
}

/// The Prometheus text of an edge's `/metrics`.
pub(super) fn edge_metrics(admin: SocketAddr) -> Result<String> {
    let (status, body) = http_get(admin, "/metrics")?;
    ensure!(status == 200, "edge /metrics on {admin} answered {status}");
    Ok(body)
}

pub(super) fn resumptions(metrics: &str, kind: &str) -> f64 {
    metric_sum(metrics, "keyless_edge_resumptions_total", &[("kind", kind)])
}

/// Every sample of a Prometheus text by series (`name{labels}` as written).
pub(super) fn counters(metrics: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}
