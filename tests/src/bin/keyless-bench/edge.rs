//! `keyless-bench edge`: full TLS 1.3 handshakes per second through the release edge,
//! whose ECDSA P-256 signatures the release key server makes, against the reference
//! server (`reference.rs`) holding the same key locally, in the same run. Both answer
//! the same request by forwarding it to the same test origin.
//!
//! Target: the edge reaches ≥ 0.75 of the reference's rate. The edge's CPU is counted
//! together with the key servers' (they do the edge's signing).
//!
//! `--keyservers N` puts N key servers of the same deployment in the edge's one
//! `[[keyserver.group]]`, all of the same priority and weight, so the edge balances
//! between them; the report then says how their operations split.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use keyless_shared::Opcode;
use keyless_tests::{
    ensure_built, free_addr, http_get, keyserver_ops_ok, target_dir, workspace_root, Deployment,
    Profile,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::load::{self, Client, Sample};
use crate::percentile;
use crate::procs::{start_edge_stack, EdgeStack, Proc};

/// The edge must reach this fraction of the reference's handshake rate.
const TARGET: f64 = 0.75;
/// The benchmark site (a `keyless-certs init` domain).
const DOMAIN: &str = "example.com";
/// The `--diagnose` references: name, log file, `--sign-via`.
const DIAGNOSTICS: [(&str, &str, &str); 2] = [
    (
        "ref:thread+bip",
        "reference-thread-bip.log",
        "thread-block-in-place",
    ),
    (
        "ref:thread-block",
        "reference-thread-blocking.log",
        "thread-blocking",
    ),
];
/// Log filter of the edge and the key server: no per-request or audit lines.
const LOG_FILTER: &str = "warn";

#[derive(Args, Clone)]
pub(crate) struct EdgeArgs {
    /// Measurement time per side (edge, reference), split evenly over the rounds; each
    /// round's measurement follows a 1 s warm-up.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Connections in progress at once (each loop: connect, handshake, GET, close).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Alternate edge and reference this many times (order edge, reference, then
    /// reference, edge, ...), so drifting background load hits both sides alike.
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// Tokio worker threads of the benchmark client.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Worker threads of the reference server; default one per core, like the edge.
    #[arg(long)]
    reference_threads: Option<usize>,
    /// Also measure (outside the verdict) two more references whose signatures a
    /// signer thread makes: one waiting in `block_in_place` + `block_on` like the
    /// edge's remote signer, one blocking its worker thread.
    #[arg(long)]
    diagnose: bool,
    /// Key servers of the same deployment in the edge's one key-server group, all of
    /// the same priority and weight (the edge balances between them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    keyservers: u8,
    /// Exit non-zero when the ratio misses its target.
    #[arg(long)]
    strict: bool,
}

/// One server under load.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Indexes (in [`Setup::pids`]) of the processes doing this target's work.
    server: Vec<usize>,
    sample: Sample,
    /// Rate of each round.
    rounds: Vec<f64>,
    /// Background load (cores used by other processes) of each round.
    rounds_other: Vec<f64>,
}

impl Target {
    fn new(name: &'static str, addr: SocketAddr, server: Vec<usize>) -> Target {
        Target {
            name,
            addr,
            server,
            sample: Sample::default(),
            rounds: Vec::new(),
            rounds_other: Vec::new(),
        }
    }

    fn server_cpu(&self) -> f64 {
        self.server
            .iter()
            .map(|&i| self.sample.cpu.get(i).copied().unwrap_or(0.0))
            .sum()
    }
}

/// The processes of one run. Their pids, in [`Setup::pids`] order, start with this
/// process (the client), then the processes in `procs` order.
struct Setup {
    deployment: Deployment,
    procs: Vec<Proc>,
    /// `/metrics` of each key server, in `key server 1, 2, ...` order.
    keyserver_metrics: Vec<SocketAddr>,
    targets: Vec<Target>,
}

/// Index of the benchmark client in [`Setup::pids`].
const CLIENT: usize = 0;

impl Setup {
    fn pids(&self) -> Vec<u32> {
        std::iter::once(std::process::id())
            .chain(self.procs.iter().map(Proc::pid))
            .collect()
    }

    /// Index in [`Setup::pids`] of the process named `name`.
    fn pid_index(&self, name: &str) -> usize {
        self.procs
            .iter()
            .position(|p| p.name() == name)
            .map_or(usize::MAX, |i| i + 1)
    }

    /// Indexes in [`Setup::pids`] of the key servers.
    fn keyserver_indexes(&self) -> Vec<usize> {
        (1..=self.keyserver_metrics.len())
            .map(|n| self.pid_index(&format!("key server {n}")))
            .collect()
    }

    /// Operations each key server has answered `ok` so far (pings not counted).
    fn keyserver_ops(&self) -> Result<Vec<u64>> {
        self.keyserver_metrics
            .iter()
            .map(|&m| keyserver_ops_ok(m))
            .collect()
    }

    /// ECDSA P-256 signatures the key servers have made so far, together.
    fn keyserver_signs(&self) -> Result<u64> {
        self.keyserver_metrics
            .iter()
            .map(|&m| keyserver_ecdsa_signs(m))
            .sum()
    }

    fn check_running(&mut self) -> Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_running)
    }
}

fn cores(sample: &Sample, index: usize) -> f64 {
    sample.cpu.get(index).copied().unwrap_or(0.0) / sample.secs.max(f64::MIN_POSITIVE)
}

pub(crate) fn run(args: EdgeArgs) -> Result<bool> {
    ensure!(
        args.seconds > 0 && args.concurrency > 0 && args.rounds > 0 && args.client_threads > 0,
        "--seconds, --concurrency, --rounds and --client-threads must be positive"
    );
    // The reference server is this binary: a debug build would handicap it.
    ensure!(
        !cfg!(debug_assertions),
        "this is a debug build of keyless-bench, whose reference server would be slow; \
         run it with --release"
    );
    eprintln!("building the release key server, edge and test origin (cargo build --release)...");
    build_release()?;
    let mut setup = start(&args)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()?;
    let config = load::client_config(&setup.deployment.dir().join("client/ca.pem"))?;
    let client = Client::new(config, DOMAIN)?;

    // Every side must present the site's ECDSA P-256 certificate over TLS 1.3 and
    // answer with the origin's body, or the comparison means nothing.
    let ecdsa_leaf = site_leaf(&setup.deployment, DOMAIN, "ecdsa")?;
    for t in &setup.targets {
        let probe = runtime
            .block_on(client.probe(t.addr))
            .with_context(|| format!("probing the {}", t.name))?;
        probe.check(t.name, &ecdsa_leaf)?;
        ensure!(
            probe.alpn.as_deref() == Some("http/1.1"),
            "{}: ALPN {:?}, expected http/1.1",
            t.name,
            probe.alpn
        );
    }
    let signs_before = setup.keyserver_signs()?;
    let ops_before = setup.keyserver_ops()?;

    println!(
        "keyless-bench edge: full TLS 1.3 handshakes (ECDSA P-256 site key, X25519, no \
         resumption) + one GET / with Connection: close, per connection"
    );
    println!(
        "  {} connections at once, client threads {}, {cpus} cores; {} s per side in {} \
         round(s) after a {} s warm-up each; rates and latencies pooled over the rounds \
         (time-weighted mean)",
        args.concurrency,
        args.client_threads,
        args.seconds,
        args.rounds,
        crate::WARMUP.as_secs()
    );
    println!(
        "  checked: every side presents the ECDSA P-256 leaf over TLS 1.3 (X25519) and relays \
         {:?} from the test origin",
        load::EXPECTED_BODY
    );
    println!(
        "  key servers: {} of the same deployment in one [[keyserver.group]], same priority \
         and weight",
        args.keyservers
    );
    println!(
        "  logging: KEYLESS_LOG={LOG_FILTER} for the edge and the key servers (access and \
         audit logging off)"
    );

    let per_round = Duration::from_secs_f64(args.seconds as f64 / args.rounds as f64);
    let pids = setup.pids();
    for round in 0..args.rounds {
        // The edge first in rounds 1, 3, ..., last in rounds 2, 4, ...
        let mut order: Vec<usize> = (0..setup.targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let Some((name, addr)) = setup.targets.get(i).map(|t| (t.name, t.addr)) else {
                continue;
            };
            let sample = runtime
                .block_on(client.measure(addr, args.concurrency, per_round, &pids))
                .with_context(|| format!("measuring the {name}"))?;
            setup.check_running()?;
            let Some(t) = setup.targets.get_mut(i) else {
                continue;
            };
            t.rounds.push(sample.rate());
            t.rounds_other.push(sample.other_cores());
            t.sample.add(sample);
        }
        let line: Vec<String> = setup
            .targets
            .iter()
            .map(|t| format!("{} {:.0}/s", t.name, t.rounds.last().unwrap_or(&0.0)))
            .collect();
        eprintln!("round {}: {}", round + 1, line.join(", "));
    }
    let signs = setup.keyserver_signs()?.saturating_sub(signs_before);
    let ops: Vec<u64> = setup
        .keyserver_ops()?
        .iter()
        .zip(&ops_before)
        .map(|(after, before)| after.saturating_sub(*before))
        .collect();
    for p in &setup.procs {
        p.check_no_panic()?;
    }
    drop(runtime);
    report(&mut setup, signs, &ops, args.strict)
}

/// Prints the table and notes; returns the verdict (`true` unless strict and failed).
/// `ops`: operations each key server answered during the edge runs.
fn report(setup: &mut Setup, signs: u64, ops: &[u64], strict: bool) -> Result<bool> {
    let edge_i = setup.pid_index("edge");
    let ks_i = setup.keyserver_indexes();
    let [edge, reference, extra @ ..] = setup.targets.as_mut_slice() else {
        bail!("edge and reference targets expected");
    };
    let ratio = edge.sample.rate() / reference.sample.rate().max(f64::MIN_POSITIVE);
    let pass = ratio >= TARGET && edge.sample.errors == 0 && reference.sample.errors == 0;
    let mut busiest: f64 = 0.0;

    println!();
    println!(
        "{:<16} {:>13} {:>9} {:>9} {:>7} {:>12} {:>12} {:>12} {:>11}",
        "target",
        "handshakes/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "server cores",
        "server ms/hs",
        "client cores",
        "other cores"
    );
    for t in std::iter::once(&mut *edge)
        .chain(std::iter::once(&mut *reference))
        .chain(extra.iter_mut())
    {
        t.sample.latencies_us.sort_unstable();
        let s = &t.sample;
        println!(
            "{:<16} {:>13.0} {:>9.2} {:>9.2} {:>7} {:>12.2} {:>12.3} {:>12.2} {:>11.2}",
            t.name,
            s.rate(),
            percentile(&s.latencies_us, 0.50) / 1000.0,
            percentile(&s.latencies_us, 0.99) / 1000.0,
            s.errors,
            t.server_cpu() / s.secs.max(f64::MIN_POSITIVE),
            t.server_cpu() * 1000.0 / (s.ops.max(1) as f64),
            cores(s, CLIENT),
            s.other_cores(),
        );
        busiest = busiest.max(t.rounds_other.iter().copied().fold(0.0, f64::max));
    }
    println!();
    let rounds = edge
        .rounds
        .iter()
        .zip(&reference.rounds)
        .zip(edge.rounds_other.iter().zip(&reference.rounds_other))
        .enumerate();
    for (i, ((e, r), (eo, ro))) in rounds {
        println!(
            "round {}: edge {e:.0}/s, reference {r:.0}/s, ratio {:.2} (other processes: \
             {eo:.2} / {ro:.2} cores)",
            i + 1,
            e / r.max(f64::MIN_POSITIVE)
        );
    }
    let ks_cores: Vec<f64> = ks_i.iter().map(|&i| cores(&edge.sample, i)).collect();
    let ks_detail = if ks_cores.len() > 1 {
        let each: Vec<String> = ks_cores.iter().map(|c| format!("{c:.2}")).collect();
        format!(" ({})", each.join(" + "))
    } else {
        String::new()
    };
    println!(
        "server cores of the edge: edge process {:.2} + key server(s) {:.2}{ks_detail}; the \
         reference signs in its own process",
        cores(&edge.sample, edge_i),
        ks_cores.iter().sum::<f64>(),
    );
    println!(
        "key server(s): {signs} ECDSA P-256 signatures during the edge runs (warm-ups \
         included) for {} measured edge handshakes",
        edge.sample.ops
    );
    if ops.len() > 1 {
        let total = ops.iter().sum::<u64>().max(1) as f64;
        let split: Vec<String> = ops
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "key server {} {n} ({:.1} %)",
                    i + 1,
                    *n as f64 * 100.0 / total
                )
            })
            .collect();
        println!(
            "operations answered ok per key server during the edge runs: {}",
            split.join(", ")
        );
    }
    for t in std::iter::once(&*edge)
        .chain(std::iter::once(&*reference))
        .chain(extra.iter())
    {
        if let Some(e) = &t.sample.first_error {
            println!("{}: first failure: {e}", t.name);
        }
    }
    crate::print_verdict(
        busiest,
        &format!("ratio edge/reference {ratio:.2}, target >= {TARGET:.2}"),
        pass,
        &setup.deployment.logs_dir(),
    );
    Ok(pass || !strict)
}

/// For benchmarks whose client shares the machine's cores with the servers: refuses a
/// debug build of keyless-bench (its client would take their CPU), then builds the
/// release binaries.
pub(crate) fn release_client_and_build() -> Result<()> {
    ensure!(
        !cfg!(debug_assertions),
        "this is a debug build of keyless-bench, whose client would be slow; run it with \
         --release"
    );
    eprintln!("building the release key server, edge and test origin (cargo build --release)...");
    build_release()
}

/// Prints where a benchmark's deployment is and the processes it started.
pub(crate) fn print_deployment(dir: &Path, procs: &[Proc], logs: &Path) {
    let described: Vec<String> = procs
        .iter()
        .map(|p| format!("{} pid {}", p.name(), p.pid()))
        .collect();
    eprintln!(
        "deployment {} ({}); logs in {}",
        dir.display(),
        described.join(", "),
        logs.display()
    );
}

/// Builds the release binaries this benchmark starts (a no-op when they are fresh).
pub(crate) fn build_release() -> Result<()> {
    // keyless-origin and keyless-certs, honouring KEYLESS_TESTS_NO_BUILD.
    ensure_built(Profile::Release)?;
    if std::env::var_os("KEYLESS_TESTS_NO_BUILD").is_some() {
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--release"])
        .args(["-p", "keyless-edge", "-p", "keyless-tests"])
        .args(["--bin", "keyless-edge", "--bin", "keyless-test-origin"])
        .env("CARGO_TARGET_DIR", target_dir()?)
        .current_dir(workspace_root());
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Starts the key server(s), the test origin, the edge and the reference server(s).
fn start(args: &EdgeArgs) -> Result<Setup> {
    let EdgeStack {
        deployment,
        keyservers,
        origin,
        origin_addr,
        edge,
        edge_addr,
        ..
    } = start_edge_stack(DOMAIN, LOG_FILTER, usize::from(args.keyservers), |c| c)?;
    let dir = deployment.dir().to_path_buf();
    let logs = deployment.logs_dir();
    let keyserver_metrics: Vec<SocketAddr> = keyservers.iter().map(|k| k.metrics).collect();
    let mut procs: Vec<Proc> = keyservers.into_iter().map(|k| k.proc).collect();
    procs.extend([origin, edge]);

    let keys = deployment.keys_dir();
    let bench = std::env::current_exe().context("locating keyless-bench")?;
    let mut reference = |name: &'static str, log: &str, sign_via: &str| -> Result<SocketAddr> {
        let addr = free_addr()?;
        let mut args_ = vec![
            "reference-server".to_owned(),
            "--cert".to_owned(),
            path_arg(&keys.join(format!("{DOMAIN}-ecdsa.crt")))?,
            "--key".to_owned(),
            path_arg(&keys.join(format!("{DOMAIN}-ecdsa.key")))?,
            "--listen".to_owned(),
            addr.to_string(),
            "--origin".to_owned(),
            origin_addr.to_string(),
        ];
        if let Some(n) = args.reference_threads {
            args_.extend(["--threads".to_owned(), n.to_string()]);
        }
        args_.extend(["--sign-via".to_owned(), sign_via.to_owned()]);
        let mut p = Proc::spawn(name, &bench, args_, &[], logs.join(log))?;
        p.wait_port(addr)?;
        procs.push(p);
        Ok(addr)
    };
    let reference_addr = reference("reference", "reference.log", "local")?;
    let mut diagnostics = Vec::new();
    if args.diagnose {
        for (name, log, via) in DIAGNOSTICS {
            diagnostics.push((name, reference(name, log, via)?));
        }
    }

    let mut setup = Setup {
        deployment,
        procs,
        keyserver_metrics,
        targets: Vec::new(),
    };
    let mut edge_side = vec![setup.pid_index("edge")];
    edge_side.extend(setup.keyserver_indexes());
    let reference_side = vec![setup.pid_index("reference")];
    setup
        .targets
        .push(Target::new("edge", edge_addr, edge_side));
    setup
        .targets
        .push(Target::new("reference", reference_addr, reference_side));
    for (name, addr) in diagnostics {
        let side = vec![setup.pid_index(name)];
        setup.targets.push(Target::new(name, addr, side));
    }
    print_deployment(&dir, &setup.procs, &logs);
    Ok(setup)
}

fn path_arg(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// DER of the leaf certificate of `domain` (a site of the deployment) for its `key`
/// (`ecdsa` or `rsa`, the stem of its files).
pub(crate) fn site_leaf(deployment: &Deployment, domain: &str, key: &str) -> Result<Vec<u8>> {
    let path = deployment.keys_dir().join(format!("{domain}-{key}.crt"));
    let cert = CertificateDer::pem_file_iter(&path)
        .ok()
        .and_then(|mut it| it.next())
        .and_then(Result::ok)
        .with_context(|| format!("{}: no certificate", path.display()))?;
    Ok(cert.as_ref().to_vec())
}

/// ECDSA P-256 SHA-256 signatures the key server has made (its `/metrics`).
fn keyserver_ecdsa_signs(metrics: SocketAddr) -> Result<u64> {
    let (status, body) = http_get(metrics, "/metrics")?;
    ensure!(status == 200, "key server /metrics answered {status}");
    let opcode = format!("opcode=\"{}\"", Opcode::EcdsaSignSha256.name());
    Ok(body
        .lines()
        .filter(|l| l.starts_with("keyless_ops") && l.contains(&opcode))
        .filter(|l| l.contains("result=\"ok\""))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}
