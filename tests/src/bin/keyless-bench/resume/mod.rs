//! `keyless-bench resume`: handshakes per second through the release edge when clients
//! resume their TLS sessions, against full keyless handshakes (each signed by the key
//! server) in the same run. Three modes, measured in turn (in reverse order every other
//! round), with the load of `edge` (`concurrency` loops of connect, handshake, `GET /`
//! with `Connection: close`, read to the end; `--handshake-only`: `close_notify` instead
//! of the request):
//!
//! - `full`: TLS 1.3 with resumption off in the client, on an edge with the default
//!   `[sessions]`: every handshake is a full keyless one;
//! - `ticket`: TLS 1.3 on the same edge, each loop with a session cache of its own: a
//!   loop's first handshake is full, every later one resumes with a ticket sealed with
//!   the group's keys (the response read brings the tickets);
//! - `session-id`: TLS 1.2 session ids only, on two more edges A and B of the same
//!   deployment with `tickets = false` and one Redis; each loop makes one full
//!   handshake on A, then resumes on B. B's session memory holds a single entry, so
//!   that B finds the sessions in Redis rather than in its own memory (the report shows
//!   where B's resumptions came from).
//!
//! Targets on the 2-core machine: ticket ≥ 3× and session-id ≥ 2× the full rate. The
//! server side of each measurement is the edge(s), the key server and, for session ids,
//! Redis; the test origin answers every connection's request in all three alike.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use keyless_tests::{
    binary, free_addr, http_get, keyserver_ops_ok, metric_sum, Deployment, EdgeConfig, Profile,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, Tls12Resumption, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    DigitallySignedStruct, HandshakeKind, ProtocolVersion, RootCertStore, SignatureScheme,
};
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;

use crate::edge::{print_deployment, release_client_and_build, site_leaf};
use crate::load::{self, Client, Sample, ERROR_PAUSE};
use crate::procs::{find_program, start_edge_stack, EdgeStack, Proc};
use crate::{cpu_seconds, percentile, MEASURING, STOPPED, WARMING, WARMUP};

mod report;
mod setup;
mod visits;

use report::*;
use setup::*;
use visits::*;

/// Ticket resumption must reach this multiple of the full handshake rate.
const TICKET_TARGET: f64 = 3.0;
/// Session-id resumption through Redis must reach this multiple of the full rate.
const SESSION_ID_TARGET: f64 = 2.0;
/// The benchmark site (a `keyless-certs init` domain).
const DOMAIN: &str = "example.com";
/// Log filter of the edges and the key server: no per-request or audit lines, but the
/// line saying that an edge holds its group's ticket keys (sessions are neither
/// ticketed nor sealed for Redis before it).
const LOG_FILTER: &str = "warn,keyless_edge::keyserver::ticket_keys=info";
/// What an edge logs once it holds its group's ticket keys.
const KEYS_IN_USE: &str = "session-ticket keys of the group in use";
/// How long the edges may take to get the ticket keys, and the probes to resume.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Sessions each client loop's cache holds (rustls keeps several TLS 1.3 tickets per
/// server name in one entry).
const CLIENT_SESSIONS: usize = 8;
/// `[sessions] memory_entries` of edge B: one, so that a loop's session is almost
/// never still in B's memory when the loop comes back (other loops' sessions replace
/// it) and B's lookups go to Redis.
const B_MEMORY_ENTRIES: i64 = 1;

#[derive(Args, Clone)]
pub(crate) struct ResumeArgs {
    /// Measurement time per mode (full, ticket, session-id), split evenly over the
    /// rounds; each round's measurement follows a 1 s warm-up.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Measure the modes this many times, in turn (full, ticket, session-id, then the
    /// reverse, ...), so that drifting background load hits them alike.
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// Connections in progress at once (each loop: connect, handshake, GET, close).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Tokio worker threads of the benchmark client.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// The site key the full handshakes are signed with (the clients offer only that
    /// key type's signature schemes, and the edge picks the chain from them): `ecdsa`
    /// (P-256), `rsa` (2048), or `both`, measured one after the other.
    #[arg(long, value_enum, default_value = "both")]
    key: KeyChoice,
    /// Send no request: each connection closes (`close_notify`) right after the
    /// handshake and reads what the server still sends (TLS 1.3 tickets). Shows the
    /// ratios without the HTTP work of each connection (edge and test origin).
    #[arg(long)]
    handshake_only: bool,
}

/// How the client loops of a measurement connect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// TLS 1.3, no resumption.
    Full,
    /// TLS 1.3, resuming with tickets.
    Ticket,
    /// TLS 1.2, resuming by session id (no ticket extension).
    SessionId,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Ticket => "ticket",
            Mode::SessionId => "session-id",
        }
    }

    fn version(self) -> ProtocolVersion {
        match self {
            Mode::Full | Mode::Ticket => ProtocolVersion::TLSv1_3,
            Mode::SessionId => ProtocolVersion::TLSv1_2,
        }
    }

    /// A client config of this mode trusting `trust`; with resumption, its own session
    /// cache.
    fn client_config(self, trust: &Trust) -> Result<Arc<rustls::ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let version = match self {
            Mode::Full | Mode::Ticket => &rustls::version::TLS13,
            Mode::SessionId => &rustls::version::TLS12,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])?
            .dangerous()
            .with_custom_certificate_verifier(trust.verifier.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = match self {
            Mode::Full => Resumption::disabled(),
            Mode::Ticket => Resumption::in_memory_sessions(CLIENT_SESSIONS),
            Mode::SessionId => Resumption::in_memory_sessions(CLIENT_SESSIONS)
                .tls12_resumption(Tls12Resumption::SessionIdOnly),
        };
        Ok(Arc::new(config))
    }
}

/// `--key`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KeyChoice {
    Ecdsa,
    Rsa,
    Both,
}

/// The site key of a measurement.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Ecdsa,
    Rsa,
}

impl Key {
    fn of(choice: KeyChoice) -> &'static [Key] {
        match choice {
            KeyChoice::Ecdsa => &[Key::Ecdsa],
            KeyChoice::Rsa => &[Key::Rsa],
            KeyChoice::Both => &[Key::Ecdsa, Key::Rsa],
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Key::Ecdsa => "ECDSA P-256",
            Key::Rsa => "RSA 2048",
        }
    }

    /// Its files in the deployment's keys directory are `<domain>-<stem>.*`.
    fn stem(self) -> &'static str {
        match self {
            Key::Ecdsa => "ecdsa",
            Key::Rsa => "rsa",
        }
    }

    /// The signature schemes a client offers to get this key's chain.
    fn schemes(self) -> Vec<SignatureScheme> {
        match self {
            Key::Ecdsa => vec![
                SignatureScheme::ECDSA_NISTP256_SHA256,
                SignatureScheme::ECDSA_NISTP384_SHA384,
            ],
            Key::Rsa => vec![
                SignatureScheme::RSA_PSS_SHA256,
                SignatureScheme::RSA_PSS_SHA384,
                SignatureScheme::RSA_PKCS1_SHA256,
            ],
        }
    }
}

/// How the benchmark clients verify the edge: the deployment's site CA, offering only
/// the signature schemes of one key type.
struct Trust {
    verifier: Arc<OfferOnly>,
}

impl Trust {
    fn new(roots: RootCertStore, key: Key) -> Result<Trust> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .context("the site CA as a verifier")?;
        Ok(Trust {
            verifier: Arc::new(OfferOnly {
                inner,
                schemes: key.schemes(),
            }),
        })
    }
}

/// WebPKI verification that offers the server only `schemes`.
#[derive(Debug)]
struct OfferOnly {
    inner: Arc<WebPkiServerVerifier>,
    schemes: Vec<SignatureScheme>,
}

impl ServerCertVerifier for OfferOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// The modes, in the order of odd rounds.
const MODES: [Mode; 3] = [Mode::Full, Mode::Ticket, Mode::SessionId];

/// The measurements of one mode pooled over the rounds, and what the servers counted
/// during them.
struct Run {
    mode: Mode,
    sample: Sample,
    /// Measured connections whose handshake resumed.
    resumed: u64,
    /// Connections completed (warm-ups and first handshakes included), and how many of
    /// them were full handshakes.
    all: u64,
    all_full: u64,
    /// Key-server operations answered (warm-ups included).
    keyserver_ops: u64,
    /// How much each series of the measured edge's `/metrics` grew (warm-ups included).
    edge: BTreeMap<String, f64>,
    /// Indexes (in [`Setup::pids`]) of the processes doing the server work.
    server: Vec<usize>,
    /// Rate and background load (cores used by other processes) of each round.
    rounds: Vec<f64>,
    rounds_other: Vec<f64>,
}

impl Run {
    fn new(mode: Mode, server: Vec<usize>) -> Run {
        Run {
            mode,
            sample: Sample::default(),
            resumed: 0,
            all: 0,
            all_full: 0,
            keyserver_ops: 0,
            edge: BTreeMap::new(),
            server,
            rounds: Vec::new(),
            rounds_other: Vec::new(),
        }
    }

    /// Pools one round into the run.
    fn add(
        &mut self,
        sample: Sample,
        tally: &Tally,
        keyserver_ops: u64,
        edge: BTreeMap<String, f64>,
    ) {
        self.rounds.push(sample.rate());
        self.rounds_other.push(sample.other_cores());
        self.sample.add(sample);
        self.resumed += tally.resumed;
        self.all += tally.all;
        self.all_full += tally.all_full;
        self.keyserver_ops += keyserver_ops;
        for (series, grown) in edge {
            *self.edge.entry(series).or_default() += grown;
        }
    }

    fn resumed_fraction(&self) -> f64 {
        self.resumed as f64 / self.sample.ops.max(1) as f64
    }

    fn server_cpu(&self) -> f64 {
        self.server
            .iter()
            .map(|&i| self.sample.cpu.get(i).copied().unwrap_or(0.0))
            .sum()
    }

    /// How much `series` (`name{labels}` as the edge writes it) of the measured edge
    /// grew.
    fn edge(&self, series: &str) -> f64 {
        self.edge.get(series).copied().unwrap_or(0.0)
    }
}

pub(crate) fn run(args: ResumeArgs) -> Result<bool> {
    ensure!(
        args.seconds > 0 && args.concurrency > 0 && args.rounds > 0 && args.client_threads > 0,
        "--seconds, --concurrency, --rounds and --client-threads must be positive"
    );
    release_client_and_build()?;
    let mut setup = start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()?;
    let ca = setup.deployment.dir().join("client/ca.pem");
    setup.wait_for_ticket_keys()?;
    let mut pass = true;
    for &key in Key::of(args.key) {
        let trust = Trust::new(load::site_roots(&ca)?, key)?;
        pass &= measure_key(&mut setup, &runtime, &args, key, &trust)?;
    }
    for p in &setup.procs {
        p.check_no_panic()?;
    }
    Ok(pass)
}

/// The three modes with the site's `key`: probes, the rounds, the report; the verdict.
fn measure_key(
    setup: &mut Setup,
    runtime: &tokio::runtime::Runtime,
    args: &ResumeArgs,
    key: Key,
    trust: &Trust,
) -> Result<bool> {
    let name = ServerName::try_from(DOMAIN).context("the benchmark site's name")?;
    // The full handshake must be TLS 1.3 over X25519 with the site's chain of `key`,
    // and each resuming mode must resume, or the ratios mean nothing.
    let full_probe = runtime
        .block_on(Client::new(Mode::Full.client_config(trust)?, DOMAIN)?.probe(setup.edge.https))
        .context("probing the edge")?;
    let leaf = site_leaf(&setup.deployment, DOMAIN, key.stem())?;
    full_probe.check("edge", &leaf)?;
    runtime.block_on(probe_resumption(setup, trust, &name))?;
    print_header(args, key);
    let per_round = Duration::from_secs_f64(args.seconds as f64 / args.rounds as f64);
    let pids = setup.pids();
    let mut runs: Vec<Run> = MODES
        .iter()
        .map(|&m| Run::new(m, setup.server_side(m)))
        .collect();
    for round in 0..args.rounds {
        // Modes in order in rounds 1, 3, ..., in reverse in rounds 2, 4, ...
        let mut order: Vec<usize> = (0..runs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let Some(run) = runs.get_mut(i) else {
                continue;
            };
            measure_mode(setup, runtime, args, trust, &name, &pids, per_round, run)?;
        }
        let line: Vec<String> = runs
            .iter()
            .map(|r| format!("{} {:.0}/s", r.mode.name(), r.rounds.last().unwrap_or(&0.0)))
            .collect();
        eprintln!(
            "{} round {}: {}",
            key.describe(),
            round + 1,
            line.join(", ")
        );
    }
    report(setup, &mut runs, key)
}

/// One round of one mode, pooled into `run`.
#[allow(clippy::too_many_arguments)]
fn measure_mode(
    setup: &mut Setup,
    runtime: &tokio::runtime::Runtime,
    args: &ResumeArgs,
    trust: &Trust,
    name: &ServerName<'static>,
    pids: &[u32],
    per_round: Duration,
    run: &mut Run,
) -> Result<()> {
    let mode = run.mode;
    let (prime, measured) = match mode {
        Mode::Full | Mode::Ticket => (None, setup.edge),
        Mode::SessionId => (Some(setup.edge_a.https), setup.edge_b),
    };
    let ops_before = setup.keyserver_ops()?;
    let edge_before = counters(&edge_metrics(measured.admin)?);
    let loops = Loops {
        mode,
        trust,
        name,
        prime,
        addr: measured.https,
        request: !args.handshake_only,
    };
    let (sample, tally) = runtime
        .block_on(loops.measure(args.concurrency, per_round, pids))
        .with_context(|| format!("measuring {}", mode.name()))?;
    setup.check_running()?;
    let ops = setup.keyserver_ops()?.saturating_sub(ops_before);
    let edge_after = counters(&edge_metrics(measured.admin)?);
    let grown = edge_after
        .iter()
        .map(|(k, v)| (k.clone(), v - edge_before.get(k).copied().unwrap_or(0.0)))
        .collect();
    run.add(sample, &tally, ops, grown);
    Ok(())
}

/// What is measured, before a key's table.
fn print_header(args: &ResumeArgs, key: Key) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_connection = if args.handshake_only {
        "no request: close_notify right after the handshake, then read to the end"
    } else {
        "+ one GET / with Connection: close per connection"
    };
    println!();
    println!(
        "keyless-bench resume: resumed handshakes vs full keyless handshakes ({} site key, \
         signed by the key server) through the edge, {per_connection}",
        key.describe()
    );
    println!(
        "  {} connections at once, client threads {}, {cpus} cores; {} s per mode in {} \
         round(s) after a {} s warm-up each; rates and latencies pooled over the rounds \
         (time-weighted mean)",
        args.concurrency,
        args.client_threads,
        args.seconds,
        args.rounds,
        WARMUP.as_secs()
    );
    println!(
        "  full:       TLS 1.3, no resumption in the client, edge with the default \
         [sessions]"
    );
    println!(
        "  ticket:     TLS 1.3 on the same edge, a session cache per client loop: after a \
         loop's first handshake, tickets sealed with the group's keys"
    );
    println!(
        "  session-id: TLS 1.2 session ids only; edges A and B with tickets = false and \
         redis = [one redis-server]; each loop makes one full handshake on A, then resumes \
         on B, measured on B"
    );
    println!(
        "              edge B has memory_entries = {B_MEMORY_ENTRIES}: its own memory \
         almost never holds a loop's session, so its lookups go to Redis"
    );
    println!("  logging: KEYLESS_LOG={LOG_FILTER} for the edges and the key server");
}
