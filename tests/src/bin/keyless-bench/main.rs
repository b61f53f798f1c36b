//! `keyless-bench`: benchmarks of the keyless binaries against a reference measured in
//! the same run. The ratio is what matters; absolute numbers depend on the machine.
//!
//! - `keyserver`: key server sign ops/s over mTLS against raw `ring` in this process;
//! - `keyserver-overload`: the key server offered twice (`--factor`) its capacity;
//! - `edge`: full TLS 1.3 handshakes/s through the edge (keyless ECDSA P-256) against
//!   a local-key rustls server (`reference-server`, this binary re-executed); with
//!   `--keyservers 2`, two key servers in the edge's group share the signing;
//! - `failover`: the same handshake load through an edge with a group of two key
//!   servers, one of them killed (SIGKILL) halfway: failures, rate and p99 before and
//!   after;
//! - `cache`: HTTPS keep-alive requests/s for a cached object through the edge against
//!   nginx with `proxy_cache`, both driven by wrk;
//! - `resume`: resumed handshakes/s through the edge (TLS 1.3 tickets; TLS 1.2 session
//!   ids found in Redis by a second edge) against full keyless handshakes.
#![forbid(unsafe_code)]

mod cache;
mod edge;
mod failover;
mod keyserver;
mod load;
mod overload;
mod procs;
mod reference;
mod resume;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keyless-bench",
    about = "Benchmarks of keyless against a reference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Key server sign ops/s over mTLS vs raw ring in one process.
    Keyserver(keyserver::KeyserverArgs),
    /// Key server at a multiple of its capacity (open loop): latency of signed requests,
    /// errors, memory.
    KeyserverOverload(overload::OverloadArgs),
    /// Full TLS 1.3 handshakes/s through the edge (keyless ECDSA P-256) vs a rustls
    /// server holding the same key; `--keyservers 2` balances the edge's signing over two
    /// key servers of one group and shows how the operations split.
    Edge(edge::EdgeArgs),
    /// Handshake load through an edge with a group of two key servers; one is killed
    /// (kill -9) after a steady phase: attempted, failed, handshakes/s, p50/p99 per
    /// phase and the kill/steady ratios.
    Failover(failover::FailoverArgs),
    /// HTTPS keep-alive requests/s for a cached 1 KiB and 1 MiB object through the
    /// edge vs nginx with proxy_cache (same certificate, origin, wrk and connections).
    Cache(cache::CacheArgs),
    /// Resumed handshakes/s through the edge vs full keyless handshakes in the same run:
    /// TLS 1.3 session tickets, and TLS 1.2 session ids made on one edge and resumed on
    /// another through Redis; the two ratios against their targets.
    Resume(resume::ResumeArgs),
    /// The local-key reference server of `edge` (started by `edge` itself).
    #[command(hide = true)]
    ReferenceServer(reference::ReferenceArgs),
}

/// Warm-up before each measurement.
pub(crate) const WARMUP: Duration = Duration::from_secs(1);
/// Phases of a measurement, shared with the load tasks through an `AtomicU8`.
pub(crate) const WARMING: u8 = 0;
pub(crate) const MEASURING: u8 = 1;
pub(crate) const STOPPED: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keyserver(args) => keyserver::run(args),
        Command::KeyserverOverload(args) => overload::run(args),
        Command::Edge(args) => edge::run(args),
        Command::Failover(args) => failover::run(args),
        Command::Cache(args) => cache::run(args),
        Command::Resume(args) => resume::run(args),
        Command::ReferenceServer(args) => reference::run(args).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("keyless-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Background load (cores used by other processes) above which figures get a warning.
const BACKGROUND_WARNING: f64 = 0.15;

/// The end of a report: a warning when other processes used up to `busiest` cores,
/// the `verdict` line with PASS/FAIL, and where the logs are when it failed.
pub(crate) fn print_verdict(busiest: f64, verdict: &str, pass: bool, logs: &std::path::Path) {
    if busiest > BACKGROUND_WARNING {
        println!(
            "warning: other processes used up to {busiest:.2} cores during a measurement; \
             rates are only comparable on a quiet machine (or rerun with more --rounds)"
        );
    }
    println!();
    println!("{verdict}: {}", if pass { "PASS" } else { "FAIL" });
    if !pass {
        println!("logs: {} (kept only with KEEP_TEST_DIRS=1)", logs.display());
    }
}

/// The `q` quantile of sorted samples (nearest rank), NaN when there are none.
pub(crate) fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(idx).copied().map_or(f64::NAN, f64::from)
}

/// User + system CPU seconds of a process so far (Linux `/proc`; 0 elsewhere).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    // USER_HZ is 100 on every Linux ABI this runs on.
    const TICKS_PER_SEC: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14, 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS_PER_SEC
}
