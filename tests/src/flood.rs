//! Many TLS handshakes at once against the edge, each timed and classified by how it
//! ended: a hostile or unlucky crowd of clients for overload tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{AlertDescription, RootCertStore};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

/// How one handshake ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeEnd {
    /// It completed.
    Established,
    /// The server sent a fatal alert.
    Alert(AlertDescription),
    /// The server closed the connection without an alert (or reset it).
    Closed,
    /// The TCP connection could not be made.
    ConnectFailed,
    /// Still running when the client gave up (after `give_up`).
    Hung,
    /// Any other failure, as text.
    Other(String),
}

/// One handshake's outcome and how long it took.
#[derive(Clone, Debug)]
pub struct HandshakeOutcome {
    /// How it ended.
    pub end: HandshakeEnd,
    /// From the TCP connection being established (the server's clock starts at
    /// accept) to the end; zero if it could not be connected.
    pub elapsed: Duration,
}

/// Outcomes of a flood, in no particular order.
#[derive(Debug)]
pub struct FloodReport {
    /// One per handshake attempted.
    pub outcomes: Vec<HandshakeOutcome>,
}

impl FloodReport {
    /// How many ended as `end`.
    pub fn count(&self, end: &HandshakeEnd) -> usize {
        self.outcomes.iter().filter(|o| &o.end == end).count()
    }

    /// The longest time any handshake took.
    pub fn slowest(&self) -> Duration {
        self.outcomes
            .iter()
            .map(|o| o.elapsed)
            .max()
            .unwrap_or_default()
    }

    /// A one-line summary: counts per kind of end and the slowest.
    pub fn summary(&self) -> String {
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for o in &self.outcomes {
            let k = format!("{:?}", o.end);
            match kinds.iter_mut().find(|(n, _)| *n == k) {
                Some((_, c)) => *c += 1,
                None => kinds.push((k, 1)),
            }
        }
        format!("{kinds:?}, slowest {:?}", self.slowest())
    }
}

/// Starts `n` TLS 1.3 handshakes with `addr` at once (SNI `host`, chain verified against
/// the PEM CA in `ca`) and waits for all of them, each for at most `give_up`.
pub async fn handshake_flood(
    addr: SocketAddr,
    host: &str,
    ca: &Path,
    n: usize,
    give_up: Duration,
) -> Result<FloodReport> {
    let connector = TlsConnector::from(Arc::new(client_config(ca, true)?));
    let name = ServerName::try_from(host.to_owned())?;
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let connector = connector.clone();
        let name = name.clone();
        tasks.spawn(async move {
            // A SYN dropped by a full listen queue is retried after 1 s: not the
            // server's handshake time, so the clock starts once connected.
            let Ok(Ok(tcp)) = tokio::time::timeout(give_up, TcpStream::connect(addr)).await else {
                return HandshakeOutcome {
                    end: HandshakeEnd::ConnectFailed,
                    elapsed: Duration::ZERO,
                };
            };
            let started = Instant::now();
            let end = match tokio::time::timeout(give_up, connector.connect(name, tcp)).await {
                Ok(Ok(_)) => HandshakeEnd::Established,
                Ok(Err(e)) => classify(&e),
                Err(_) => HandshakeEnd::Hung,
            };
            HandshakeOutcome {
                end,
                elapsed: started.elapsed(),
            }
        });
    }
    let mut outcomes = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.context("handshake task")?);
    }
    Ok(FloodReport { outcomes })
}

fn classify(e: &std::io::Error) -> HandshakeEnd {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        if let rustls::Error::AlertReceived(desc) = tls {
            return HandshakeEnd::Alert(*desc);
        }
        return HandshakeEnd::Other(tls.to_string());
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => HandshakeEnd::Closed,
        _ => HandshakeEnd::Other(e.to_string()),
    }
}

/// One handshake of a [`HandshakeLoad`]: the phase it started in, how it ended, when.
#[derive(Clone, Debug)]
pub struct LoadOutcome {
    /// The phase label current when it started.
    pub phase: String,
    /// How it ended.
    pub end: HandshakeEnd,
    /// Its duration from TCP connect.
    pub elapsed: Duration,
    /// When it started.
    pub started: Instant,
}

/// A steady stream of new, full TLS 1.3 handshakes (no resumption, each chain verified)
/// from a thread of its own, labelled by phase, until [`HandshakeLoad::stop`].
pub struct HandshakeLoad {
    phase: Arc<std::sync::Mutex<String>>,
    outcomes: Arc<std::sync::Mutex<Vec<LoadOutcome>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl HandshakeLoad {
    /// Starts `workers` clients, each making one handshake every `1 / per_worker_rate`
    /// seconds (or back to back when slower), giving each up after `give_up`.
    pub fn start(
        addr: SocketAddr,
        host: &str,
        ca: &Path,
        workers: usize,
        per_worker_rate: f64,
        give_up: Duration,
    ) -> Result<HandshakeLoad> {
        let connector = TlsConnector::from(Arc::new(client_config(ca, false)?));
        let name = ServerName::try_from(host.to_owned())?;
        let phase = Arc::new(std::sync::Mutex::new("start".to_owned()));
        let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, o, s) = (phase.clone(), outcomes.clone(), stop.clone());
        let every = Duration::from_secs_f64(1.0 / per_worker_rate);
        let thread = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut tasks = JoinSet::new();
                for _ in 0..workers {
                    let (connector, name) = (connector.clone(), name.clone());
                    let (p, o, s) = (p.clone(), o.clone(), s.clone());
                    tasks.spawn(async move {
                        let mut tick = tokio::time::interval(every);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        while !s.load(std::sync::atomic::Ordering::Relaxed) {
                            tick.tick().await;
                            let phase = p.lock().map(|p| p.clone()).unwrap_or_default();
                            let started = Instant::now();
                            let end = one_handshake(&connector, &name, addr, give_up).await;
                            let outcome = LoadOutcome {
                                phase,
                                end,
                                elapsed: started.elapsed(),
                                started,
                            };
                            if let Ok(mut o) = o.lock() {
                                o.push(outcome);
                            }
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            });
            Ok(())
        });
        Ok(HandshakeLoad {
            phase,
            outcomes,
            stop,
            thread: Some(thread),
        })
    }

    /// Labels the handshakes started from now on.
    pub fn phase(&self, name: &str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = name.to_owned();
        }
    }

    /// The outcomes so far.
    pub fn outcomes(&self) -> Vec<LoadOutcome> {
        self.outcomes.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Stops the clients and returns every outcome.
    pub fn stop(mut self) -> Result<Vec<LoadOutcome>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        }
        Ok(self.outcomes())
    }
}

impl Drop for HandshakeLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counts per phase, in the order phases first appear: `(phase, attempted, failed)`.
pub fn per_phase(outcomes: &[LoadOutcome]) -> Vec<(String, usize, usize)> {
    let mut rows: Vec<(String, usize, usize)> = Vec::new();
    let mut sorted: Vec<&LoadOutcome> = outcomes.iter().collect();
    sorted.sort_by_key(|o| o.started);
    for o in sorted {
        let failed = usize::from(o.end != HandshakeEnd::Established);
        match rows.iter_mut().find(|(p, _, _)| *p == o.phase) {
            Some(row) => {
                row.1 += 1;
                row.2 += failed;
            }
            None => rows.push((o.phase.clone(), 1, failed)),
        }
    }
    rows
}

/// A TLS 1.3 client trusting the PEM CA in `ca`; `resumption` off makes every handshake
/// a full one.
fn client_config(ca: &Path, resumption: bool) -> Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(config)
}

/// One handshake with `addr`, classified.
async fn one_handshake(
    connector: &TlsConnector,
    name: &ServerName<'static>,
    addr: SocketAddr,
    give_up: Duration,
) -> HandshakeEnd {
    let Ok(Ok(tcp)) = tokio::time::timeout(give_up, TcpStream::connect(addr)).await else {
        return HandshakeEnd::ConnectFailed;
    };
    match tokio::time::timeout(give_up, connector.connect(name.clone(), tcp)).await {
        Ok(Ok(_)) => HandshakeEnd::Established,
        Ok(Err(e)) => classify(&e),
        Err(_) => HandshakeEnd::Hung,
    }
}
