//! The handshake load of `edge`: `concurrency` loops, each making a new TCP connection,
//! a full TLS 1.3 handshake (no resumption), one `GET /` with `Connection: close`, and
//! reading the response to the end; the same for the edge and for the reference.
//! `failover` runs its own loops over [`Client::connection`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::{cpu_seconds, MEASURING, STOPPED, WARMING, WARMUP};

/// The one request of each connection.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n";
/// What the test origin answers to `GET /`.
pub(crate) const EXPECTED_BODY: &str = "hello from origin";
/// Deadline of one connection (connect, handshake, request, response).
pub(crate) const ITERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed iteration, so a dead server is not hammered in a hot loop.
pub(crate) const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// The benchmark client's TLS: ring, TLS 1.3 only, ALPN http/1.1, the deployment's
/// site CA as the only root, and no resumption (every handshake is a full one, so the
/// server signs each time).
pub(crate) fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let roots = site_roots(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The certificates of the PEM file `ca` (the deployment's site CA) as trust anchors.
pub(crate) fn site_roots(ca: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("{}: {e}", ca.display()))?
    {
        roots
            .add(cert)
            .map_err(|e| anyhow!("{}: unusable CA certificate: {e}", ca.display()))?;
    }
    Ok(roots)
}

/// The client side of one benchmark target.
#[derive(Clone)]
pub(crate) struct Client {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl Client {
    pub(crate) fn new(config: Arc<rustls::ClientConfig>, server_name: &str) -> Result<Client> {
        Ok(Client {
            connector: TlsConnector::from(config),
            server_name: ServerName::try_from(server_name.to_owned())
                .with_context(|| format!("server name {server_name:?}"))?,
        })
    }

    /// One checked connection: what the server presented and answered.
    pub(crate) async fn probe(&self, addr: SocketAddr) -> Result<Probe> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let mut tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .with_context(|| format!("TLS handshake with {addr}"))?;
        let (_, conn) = tls.get_ref();
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .context("the server presented no certificate")?
            .as_ref()
            .to_vec();
        let version = conn.protocol_version();
        let kx = conn.negotiated_key_exchange_group().map(|g| g.name());
        let alpn = conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        tls.write_all(REQUEST).await?;
        tls.flush().await?;
        let response = read_response(&mut tls).await?;
        Ok(Probe {
            leaf,
            version,
            kx,
            alpn,
            response: String::from_utf8_lossy(&response).into_owned(),
        })
    }

    /// Runs the load against `addr`: warm-up, then `duration` measured. CPU seconds of
    /// each of `pids` are sampled at the start and end of the measured part.
    pub(crate) async fn measure(
        &self,
        addr: SocketAddr,
        concurrency: usize,
        duration: Duration,
        pids: &[u32],
    ) -> Result<Sample> {
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(WARMING),
            completed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        });
        let loops: Vec<_> = (0..concurrency)
            .map(|_| tokio::spawn(self.clone().run_loop(addr, shared.clone())))
            .collect();
        tokio::time::sleep(WARMUP).await;
        let busy0 = machine_busy_seconds();
        let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
        shared.phase.store(MEASURING, Ordering::SeqCst);
        let t0 = Instant::now();
        tokio::time::sleep(duration).await;
        shared.phase.store(STOPPED, Ordering::SeqCst);
        let secs = t0.elapsed().as_secs_f64();
        let cpu1: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
        let busy1 = machine_busy_seconds();
        let mut latencies_us = Vec::new();
        for l in loops {
            latencies_us.extend(l.await.context("a load task panicked")?);
        }
        let first_error = shared
            .first_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        Ok(Sample {
            ops: shared.completed.load(Ordering::SeqCst),
            secs,
            errors: shared.errors.load(Ordering::SeqCst),
            first_error,
            latencies_us,
            cpu: cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).collect(),
            machine_busy: busy1 - busy0,
        })
    }

    /// One connection loop; returns the handshake latencies (µs) measured.
    async fn run_loop(self, addr: SocketAddr, shared: Arc<Shared>) -> Vec<u32> {
        let mut latencies = Vec::new();
        while shared.phase.load(Ordering::Relaxed) != STOPPED {
            let result = self.connection(addr).await;
            // Only iterations that end inside the measured window count.
            let measuring = shared.phase.load(Ordering::Relaxed) == MEASURING;
            match result {
                Ok(handshake) => {
                    if measuring {
                        shared.completed.fetch_add(1, Ordering::Relaxed);
                        latencies.push(u32::try_from(handshake.as_micros()).unwrap_or(u32::MAX));
                    }
                }
                Err(e) => {
                    if measuring {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    shared
                        .first_error
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .get_or_insert(e);
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
        }
        latencies
    }

    /// One connection (connect, full handshake, `GET /`, the checked response) within
    /// [`ITERATION_TIMEOUT`]; returns the handshake latency (connect start to handshake
    /// done), or what failed.
    pub(crate) async fn connection(&self, addr: SocketAddr) -> Result<Duration, String> {
        tokio::time::timeout(ITERATION_TIMEOUT, self.once(addr))
            .await
            .unwrap_or_else(|_| Err(format!("no response within {ITERATION_TIMEOUT:?}")))
    }

    /// One connection; returns the handshake latency (connect start to handshake done).
    async fn once(&self, addr: SocketAddr) -> Result<Duration, String> {
        let (mut tls, handshake) = handshake(&self.connector, &self.server_name, addr).await?;
        send_request(&mut tls, addr).await?;
        let response = read_response(&mut tls)
            .await
            .map_err(|e| format!("{e:#}"))?;
        check_response(&response)?;
        Ok(handshake)
    }
}

/// A new TCP connection to `addr` (no Nagle) and its TLS handshake as `name`; the
/// stream and the time from connect start to handshake done.
pub(crate) async fn handshake(
    connector: &TlsConnector,
    name: &ServerName<'static>,
    addr: SocketAddr,
) -> Result<(TlsStream<TcpStream>, Duration), String> {
    let t0 = Instant::now();
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = connector
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    Ok((tls, t0.elapsed()))
}

/// Sends [`REQUEST`] on `tls`.
pub(crate) async fn send_request(
    tls: &mut TlsStream<TcpStream>,
    addr: SocketAddr,
) -> Result<(), String> {
    let sent = async {
        tls.write_all(REQUEST).await?;
        tls.flush().await
    };
    sent.await
        .map_err(|e| format!("sending the request to {addr}: {e}"))
}

/// Reads to the end of the stream. A close without `close_notify` after some data
/// counts as the end (the response is checked separately).
pub(crate) async fn read_response<S: AsyncReadExt + Unpin>(stream: &mut S) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    match stream.read_to_end(&mut buf).await {
        Ok(_) => Ok(buf),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => Ok(buf),
        Err(e) => Err(anyhow!("reading the response: {e}")),
    }
}

pub(crate) fn check_response(response: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(response);
    if text.starts_with("HTTP/1.1 200") && text.contains(EXPECTED_BODY) {
        return Ok(());
    }
    let head: String = text.chars().take(200).collect();
    Err(format!("unexpected response: {head:?}"))
}

/// What one checked connection saw.
pub(crate) struct Probe {
    /// DER of the leaf certificate the server presented.
    pub(crate) leaf: Vec<u8>,
    pub(crate) version: Option<rustls::ProtocolVersion>,
    pub(crate) kx: Option<rustls::NamedGroup>,
    pub(crate) alpn: Option<String>,
    pub(crate) response: String,
}

impl Probe {
    /// Fails unless this was TLS 1.3 over X25519 with `leaf` and the origin's answer.
    pub(crate) fn check(&self, target: &str, leaf: &[u8]) -> Result<()> {
        ensure!(
            self.version == Some(rustls::ProtocolVersion::TLSv1_3),
            "{target}: negotiated {:?}, not TLS 1.3",
            self.version
        );
        ensure!(
            self.kx == Some(rustls::NamedGroup::X25519),
            "{target}: key exchange {:?}, not X25519",
            self.kx
        );
        ensure!(
            self.leaf == leaf,
            "{target}: the certificate presented is not the site's ECDSA P-256 certificate"
        );
        check_response(self.response.as_bytes()).map_err(|e| anyhow!("{target}: {e}"))
    }
}

struct Shared {
    phase: AtomicU8,
    completed: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// One measurement of one target.
#[derive(Default)]
pub(crate) struct Sample {
    /// Connections completed (handshake, request, checked response) while measuring.
    pub(crate) ops: u64,
    pub(crate) secs: f64,
    /// Failed connections while measuring.
    pub(crate) errors: u64,
    /// The first failure seen (warm-up included).
    pub(crate) first_error: Option<String>,
    /// Handshake latency of each completed connection, µs.
    pub(crate) latencies_us: Vec<u32>,
    /// CPU seconds used by each of the pids asked for while measuring.
    pub(crate) cpu: Vec<f64>,
    /// CPU seconds used on the whole machine while measuring.
    pub(crate) machine_busy: f64,
}

impl Sample {
    pub(crate) fn rate(&self) -> f64 {
        self.ops as f64 / self.secs.max(f64::MIN_POSITIVE)
    }

    /// Pools `other` into `self` (the rate becomes the time-weighted mean).
    pub(crate) fn add(&mut self, other: Sample) {
        self.ops += other.ops;
        self.secs += other.secs;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies_us.extend(other.latencies_us);
        if self.cpu.len() < other.cpu.len() {
            self.cpu.resize(other.cpu.len(), 0.0);
        }
        for (a, b) in self.cpu.iter_mut().zip(other.cpu) {
            *a += b;
        }
        self.machine_busy += other.machine_busy;
    }

    /// Cores used by processes other than the pids sampled (background load).
    pub(crate) fn other_cores(&self) -> f64 {
        (self.machine_busy - self.cpu.iter().sum::<f64>()).max(0.0)
            / self.secs.max(f64::MIN_POSITIVE)
    }
}

/// CPU seconds the whole machine has been busy (Linux `/proc/stat`; 0 elsewhere).
pub(crate) fn machine_busy_seconds() -> f64 {
    // USER_HZ is 100 on every Linux ABI this runs on.
    const TICKS_PER_SEC: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal ...: all but idle and iowait
    // (guest time is already inside user).
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let busy: f64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy / TICKS_PER_SEC
}
