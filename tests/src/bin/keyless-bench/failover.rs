//! `keyless-bench failover`: what clients see when one key server of a group crashes
//! under load. One release edge whose `[[keyserver.group]]` holds two key servers of
//! the same deployment, priority and weight; the load of `edge` (`concurrency` loops of
//! connect, full TLS 1.3 handshake without resumption, `GET /`, close). After a warm-up
//! comes a steady phase with both key servers up, then the kill phase: one key server
//! is killed with SIGKILL at its start and the load goes on.
//!
//! Reported per phase: handshakes attempted and failed, handshakes/s, p50 and p99
//! handshake latency; the kill/steady ratios of handshakes/s and p99; how the key
//! servers' operations split; when the edge marked the killed server down; and what
//! failed, with the edge's log lines. The edge runs with a short `[keyserver] timeout`
//! and `probe_interval` (printed). Failed handshakes are a finding to report, not a
//! failure of the benchmark.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Args;
use keyless_tests::{http_get, keyserver_ops_ok};

use crate::edge::{release_client_and_build, site_leaf};
use crate::load::{self, Client, ERROR_PAUSE};
use crate::procs::{start_edge_stack, EdgeStack, StackKeyServer};
use crate::{percentile, WARMUP};

/// The benchmark site (a `keyless-certs init` domain).
const DOMAIN: &str = "example.com";
/// Log filter of the edge and the key servers: warnings (key server down, failed
/// handshakes) but no per-request or audit lines.
const LOG_FILTER: &str = "warn";
/// `[keyserver] down_after` and `up_after` of the benchmark edge (set, so that the
/// report states them).
const DOWN_AFTER: i64 = 3;
const UP_AFTER: i64 = 3;
/// Width of the timeline buckets.
const BUCKET: Duration = Duration::from_millis(500);
/// How often the edge's `/metrics` is read for the killed server's state.
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// Distinct failure messages and edge log lines shown.
const SHOWN: usize = 8;

#[derive(Args, Clone)]
pub(crate) struct FailoverArgs {
    /// Length of the steady phase (both key servers up), after a 1 s warm-up.
    #[arg(long, default_value_t = 5)]
    steady_seconds: u64,
    /// Length of the kill phase; one key server is killed (SIGKILL) at its start.
    #[arg(long, default_value_t = 5)]
    kill_seconds: u64,
    /// Connections in progress at once (each loop: connect, handshake, GET, close).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Tokio worker threads of the benchmark client.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// The edge's `[keyserver] timeout` in ms: deadline of each key-server request and
    /// of each probe.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// The edge's `[keyserver] probe_interval` in ms: heartbeat of every key server.
    #[arg(long, default_value_t = 500)]
    probe_interval_ms: u64,
}

/// One connection of the load: when it started and ended, and its handshake latency
/// or what failed.
struct Attempt {
    start: Instant,
    end: Instant,
    outcome: Result<Duration, String>,
}

/// The attempts that ended in one phase.
struct Phase {
    name: &'static str,
    from: Instant,
    to: Instant,
    attempts: Vec<Attempt>,
}

impl Phase {
    fn secs(&self) -> f64 {
        (self.to - self.from).as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn failed(&self) -> usize {
        self.attempts.iter().filter(|a| a.outcome.is_err()).count()
    }

    fn ok(&self) -> usize {
        self.attempts.len() - self.failed()
    }

    fn rate(&self) -> f64 {
        self.ok() as f64 / self.secs()
    }

    /// Handshake latencies of the successful attempts, µs, sorted.
    fn latencies_us(&self) -> Vec<u32> {
        let mut l: Vec<u32> = self
            .attempts
            .iter()
            .filter_map(|a| a.outcome.as_ref().ok())
            .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX))
            .collect();
        l.sort_unstable();
        l
    }

    /// `ok/failed` per [`BUCKET`] of the phase, by end time (the last bucket also
    /// takes the few ms by which the phase overran a whole number of buckets).
    fn timeline(&self) -> String {
        let n = ((self.secs() / BUCKET.as_secs_f64()).round() as usize).max(1);
        let mut buckets = vec![(0u64, 0u64); n];
        for a in &self.attempts {
            let i = ((a.end - self.from).as_secs_f64() / BUCKET.as_secs_f64()) as usize;
            if let Some(b) = buckets.get_mut(i.min(n - 1)) {
                if a.outcome.is_ok() {
                    b.0 += 1;
                } else {
                    b.1 += 1;
                }
            }
        }
        let cells: Vec<String> = buckets.iter().map(|(o, f)| format!("{o}/{f}")).collect();
        cells.join(" ")
    }
}

pub(crate) fn run(args: FailoverArgs) -> Result<bool> {
    ensure!(
        args.steady_seconds > 0
            && args.kill_seconds > 0
            && args.concurrency > 0
            && args.client_threads > 0
            && args.timeout_ms > 0
            && args.probe_interval_ms > 0,
        "every option must be positive"
    );
    release_client_and_build()?;
    let timeout = format!("{}ms", args.timeout_ms);
    let probe_interval = format!("{}ms", args.probe_interval_ms);
    let EdgeStack {
        deployment,
        keyservers,
        origin,
        mut edge,
        edge_addr,
        edge_admin,
        ..
    } = start_edge_stack(DOMAIN, LOG_FILTER, 2, |c| {
        c.keyserver_option("timeout", timeout.as_str())
            .keyserver_option("probe_interval", probe_interval.as_str())
            .keyserver_option("down_after", DOWN_AFTER)
            .keyserver_option("up_after", UP_AFTER)
    })?;
    let [mut survivor, mut victim]: [StackKeyServer; 2] = keyservers
        .try_into()
        .map_err(|_| anyhow::anyhow!("the stack did not start two key servers"))?;
    eprintln!(
        "deployment {} (key server 1 pid {}, key server 2 pid {}, test origin pid {}, edge \
         pid {}); logs in {}",
        deployment.dir().display(),
        survivor.proc.pid(),
        victim.proc.pid(),
        origin.pid(),
        edge.pid(),
        deployment.logs_dir().display()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()?;
    let config = load::client_config(&deployment.dir().join("client/ca.pem"))?;
    let client = Client::new(config, DOMAIN)?;
    runtime
        .block_on(client.probe(edge_addr))
        .context("probing the edge")?
        .check("edge", &site_leaf(&deployment, DOMAIN, "ecdsa")?)?;
    ensure!(
        edge_says_up(edge_admin, victim.addr)? == Some(true),
        "the edge does not export keyless_edge_keyserver_up = 1 for {}",
        victim.addr
    );

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "keyless-bench failover: full TLS 1.3 handshakes (ECDSA P-256 site key, X25519, no \
         resumption) + one GET / with Connection: close, per connection, through one edge \
         whose [[keyserver.group]] holds 2 key servers of the same priority and weight"
    );
    println!(
        "  {} connections at once, client threads {}, {cpus} cores; {} s warm-up, steady \
         phase {} s, kill phase {} s (key server 2 killed with SIGKILL at its start)",
        args.concurrency,
        args.client_threads,
        WARMUP.as_secs(),
        args.steady_seconds,
        args.kill_seconds
    );
    println!(
        "  edge [keyserver]: timeout {timeout}, probe_interval {probe_interval}, down_after \
         {DOWN_AFTER}, up_after {UP_AFTER} (the rest at their defaults)"
    );
    println!(
        "  logging: KEYLESS_LOG={LOG_FILTER} for the edge and the key servers; a handshake \
         counts when it ends in a phase"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..args.concurrency)
        .map(|_| runtime.spawn(load_loop(client.clone(), edge_addr, stop.clone())))
        .collect();
    std::thread::sleep(WARMUP);
    let ops_start = [
        keyserver_ops_ok(survivor.metrics)?,
        keyserver_ops_ok(victim.metrics)?,
    ];
    let steady_from = Instant::now();
    let flapped = watch(
        edge_admin,
        victim.addr,
        steady_from + Duration::from_secs(args.steady_seconds),
    );
    let ops_kill = [
        keyserver_ops_ok(survivor.metrics)?,
        keyserver_ops_ok(victim.metrics)?,
    ];
    let kill_from = Instant::now();
    victim.proc.kill()?;
    let kill_took = kill_from.elapsed();
    let marked_down = watch(
        edge_admin,
        victim.addr,
        kill_from + Duration::from_secs(args.kill_seconds),
    );
    let kill_to = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let survivor_end = keyserver_ops_ok(survivor.metrics)?;
    let mut attempts = Vec::new();
    for l in loops {
        attempts.extend(runtime.block_on(l).context("a load task panicked")?);
    }
    drop(runtime);
    edge.check_no_panic()?;
    survivor.proc.check_no_panic()?;

    let mut steady = Phase {
        name: "steady",
        from: steady_from,
        to: kill_from,
        attempts: Vec::new(),
    };
    let mut kill = Phase {
        name: "kill",
        from: kill_from,
        to: kill_to,
        attempts: Vec::new(),
    };
    for a in attempts {
        if a.end >= steady.from && a.end < steady.to {
            steady.attempts.push(a);
        } else if a.end >= kill.from && a.end < kill.to {
            kill.attempts.push(a);
        }
    }

    println!();
    println!(
        "{:<8} {:>10} {:>7} {:>13} {:>9} {:>9} {:>9}",
        "phase", "attempted", "failed", "handshakes/s", "p50 ms", "p99 ms", "max ms"
    );
    let mut p99 = Vec::new();
    for p in [&steady, &kill] {
        let l = p.latencies_us();
        p99.push(percentile(&l, 0.99));
        println!(
            "{:<8} {:>10} {:>7} {:>13.0} {:>9.2} {:>9.2} {:>9.2}",
            p.name,
            p.attempts.len(),
            p.failed(),
            p.rate(),
            percentile(&l, 0.50) / 1000.0,
            percentile(&l, 0.99) / 1000.0,
            percentile(&l, 1.0) / 1000.0,
        );
    }
    println!();
    println!(
        "ratio kill/steady: handshakes/s {:.2}, p99 {:.2}",
        kill.rate() / steady.rate().max(f64::MIN_POSITIVE),
        p99.get(1).copied().unwrap_or(f64::NAN) / p99.first().copied().unwrap_or(f64::NAN)
    );
    let steady_ops = [
        ops_kill[0].saturating_sub(ops_start[0]),
        ops_kill[1].saturating_sub(ops_start[1]),
    ];
    let steady_total = (steady_ops[0] + steady_ops[1]).max(1) as f64;
    println!(
        "key server operations answered ok: steady phase: key server 1 {} ({:.1} %), key \
         server 2 {} ({:.1} %); kill phase: key server 1 (survivor) {}",
        steady_ops[0],
        steady_ops[0] as f64 * 100.0 / steady_total,
        steady_ops[1],
        steady_ops[1] as f64 * 100.0 / steady_total,
        survivor_end.saturating_sub(ops_kill[0]),
    );
    if let Some(at) = flapped {
        println!(
            "finding: the edge marked key server 2 down {:.0} ms into the steady phase, \
             before the kill",
            at.as_secs_f64() * 1000.0
        );
    }
    match marked_down {
        Some(at) => println!(
            "edge: key server 2 first seen down (keyless_edge_keyserver_up 0) {:.0} ms after \
             the kill (/metrics read every {} ms; kill -9 and reaping took {:.1} ms)",
            at.as_secs_f64() * 1000.0,
            WATCH_EVERY.as_millis(),
            kill_took.as_secs_f64() * 1000.0
        ),
        None => println!(
            "edge: key server 2 still exported as up (keyless_edge_keyserver_up 1) at the end \
             of the kill phase"
        ),
    }
    println!(
        "per {} ms (ok/failed): steady: {}",
        BUCKET.as_millis(),
        steady.timeline()
    );
    println!(
        "per {} ms (ok/failed): kill:   {}",
        BUCKET.as_millis(),
        kill.timeline()
    );
    for p in [&steady, &kill] {
        report_failures(p);
    }
    report_edge_log(&edge.log());
    // Losing one key server of two must not take the edge or the other one down.
    edge.check_running()?;
    survivor.proc.check_running()?;
    Ok(true)
}

/// One connection loop until `stop`; returns every attempt.
async fn load_loop(client: Client, addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let outcome = client.connection(addr).await;
        let failed = outcome.is_err();
        attempts.push(Attempt {
            start,
            end: Instant::now(),
            outcome,
        });
        if failed {
            tokio::time::sleep(ERROR_PAUSE).await;
        }
    }
    attempts
}

/// Reads the edge's view of the key server at `keyserver` every [`WATCH_EVERY`] until
/// `until`; returns how long after the start it was first exported as down.
fn watch(admin: SocketAddr, keyserver: SocketAddr, until: Instant) -> Option<Duration> {
    let from = Instant::now();
    let mut down = None;
    loop {
        let now = Instant::now();
        if now >= until {
            return down;
        }
        if down.is_none() && matches!(edge_says_up(admin, keyserver), Ok(Some(false))) {
            down = Some(now - from);
        }
        std::thread::sleep(WATCH_EVERY.min(until - now));
    }
}

/// `keyless_edge_keyserver_up` of the key server at `keyserver` (none: not exported).
fn edge_says_up(admin: SocketAddr, keyserver: SocketAddr) -> Result<Option<bool>> {
    let (status, body) = http_get(admin, "/metrics")?;
    ensure!(status == 200, "edge /metrics answered {status}");
    let label = format!("server=\"{keyserver}\"");
    Ok(body
        .lines()
        .filter(|l| l.starts_with("keyless_edge_keyserver_up{") && l.contains(&label))
        .find_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v > 0.0))
}

/// What failed in a phase: how many, how long they took, and the distinct errors.
fn report_failures(phase: &Phase) {
    let failed: Vec<&Attempt> = phase
        .attempts
        .iter()
        .filter(|a| a.outcome.is_err())
        .collect();
    if failed.is_empty() {
        return;
    }
    let mut took: Vec<u32> = failed
        .iter()
        .map(|a| u32::try_from((a.end - a.start).as_micros()).unwrap_or(u32::MAX))
        .collect();
    took.sort_unstable();
    println!(
        "finding: {} of {} connections failed in the {} phase (each failed after p50 {:.1} \
         ms, max {:.1} ms):",
        failed.len(),
        phase.attempts.len(),
        phase.name,
        percentile(&took, 0.5) / 1000.0,
        percentile(&took, 1.0) / 1000.0,
    );
    let errors = failed.iter().filter_map(|a| a.outcome.as_ref().err());
    for (n, e) in top(errors.map(String::as_str)) {
        println!("  {n} × {e}");
    }
}

/// The edge's warnings and errors over the whole run, alike lines counted once (the
/// timestamp and the client's address left out).
fn report_edge_log(log: &str) {
    let lines: Vec<String> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(|l| {
            l.split_whitespace()
                .skip_while(|w| w.starts_with(|c: char| c.is_ascii_digit()))
                .filter(|w| !w.starts_with("peer="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    if lines.is_empty() {
        println!("edge log: no warnings or errors");
        return;
    }
    println!("edge log: {} warning/error lines:", lines.len());
    for (n, line) in top(lines.iter().map(String::as_str)) {
        println!("  {n} × {line}");
    }
}

/// The [`SHOWN`] most frequent of `items` with their counts, most frequent first.
fn top<'a>(items: impl Iterator<Item = &'a str>) -> Vec<(u64, &'a str)> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for i in items {
        *counts.entry(i).or_default() += 1;
    }
    let mut v: Vec<(u64, &str)> = counts.into_iter().map(|(k, n)| (n, k)).collect();
    v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    v.truncate(SHOWN);
    v
}
