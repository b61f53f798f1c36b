//! `keyless-bench keyserver-overload`: how the key server behaves when offered more
//! work than it can do. First its capacity is measured closed-loop (RSA-2048 signs, the
//! operation that goes through the worker queue); then requests are offered open-loop at
//! `factor` × that rate for `seconds`. Reported: latency of the requests answered with a
//! signature, the errors returned (by code), requests never answered, how far the
//! sender fell behind (TCP backpressure from the key server), and the key server's
//! memory (VmRSS) before, at its peak and after.
//!
//! Uses the binaries of the profile this bench was built with (run it with `--release`
//! for absolute figures; the behaviour is the same in a debug build).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use keyless_shared::{ErrorCode, Message, Opcode, Operation};
use keyless_tests::keys::{digest, tls12_x25519_signed_message, KeyAlg};
use keyless_tests::{binary, sign_request, ClientOptions, Deployment, KeyServer, Profile};

use crate::percentile;

#[derive(Args, Clone)]
pub(crate) struct OverloadArgs {
    /// Offered load as a multiple of the measured capacity.
    #[arg(long, default_value_t = 2.0)]
    factor: f64,
    /// Length of the overload phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Key server connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

type Pending = Arc<Mutex<HashMap<u32, Instant>>>;

#[derive(Default)]
struct Tally {
    ok_latencies_us: Vec<u32>,
    errors: HashMap<ErrorCode, u64>,
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn requests(d: &Deployment, n: usize) -> Result<Vec<Operation>> {
    let key = d.site_key("bench.example", KeyAlg::Rsa)?;
    (0..n)
        .map(|_| {
            let m = tls12_x25519_signed_message();
            let payload = digest(Opcode::RsaSignSha256, &m)?;
            Ok(sign_request(
                Opcode::RsaSignSha256,
                key.ski,
                &payload,
                Some(&m),
            ))
        })
        .collect()
}

pub(crate) fn run(args: OverloadArgs) -> Result<bool> {
    ensure!(args.factor > 0.0 && args.seconds > 0 && args.connections > 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: OverloadArgs) -> Result<bool> {
    let profile = Profile::current();
    let origin = binary("keyless-origin", profile)?;
    let mut d = Deployment::init(&["bench.example"])?;
    d.set_report_on_drop(false);
    let mut server = KeyServer::spawn_with(
        &origin,
        &d.config_path(),
        d.listen(),
        d.metrics(),
        &d.logs_dir(),
    )?;
    server.set_report_on_drop(false);
    let pool = Arc::new(requests(&d, 256)?);
    eprintln!("key server: {profile:?} build, default queue settings (queue_size, queue_deadline)");

    // 1. Capacity, closed loop: connections × 64 in flight for 3 s (no more than the
    // queue admits, so every request is signed).
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (mut rd, mut wr) = ClientOptions::new(&d).connect().await?.into_parts();
        let (pool, done, stop) = (pool.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut id = 0u32;
            for _ in 0..64 {
                id += 1;
                let op = pool[id as usize % pool.len()].clone();
                wr.send(Message { id, op }).await?;
            }
            while let Some(reply) = rd.next().await {
                reply?;
                done.fetch_add(1, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                id = id.wrapping_add(1);
                let op = pool[id as usize % pool.len()].clone();
                wr.send(Message { id, op }).await?;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = done.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let capacity = (done.load(Ordering::Relaxed) - start) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    eprintln!("capacity (closed loop, RSA-2048 PKCS#1 SHA-256 with handshake message): {capacity:.0} ops/s");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. Open loop at factor × capacity.
    let rate = capacity * args.factor;
    let per_conn = rate / args.connections as f64;
    let rss_before = vm_rss_kib(server.pid());
    let rss_peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, on, pid) = (rss_peak.clone(), sampling.clone(), server.pid());
        tokio::spawn(async move {
            while on.load(Ordering::Relaxed) {
                peak.fetch_max(vm_rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let sent = Arc::new(AtomicU64::new(0));
    let max_lag_ms = Arc::new(AtomicU64::new(0));
    let duration = Duration::from_secs(args.seconds);
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    let mut pendings = Vec::new();
    for _ in 0..args.connections {
        let (mut rd, mut wr) = ClientOptions::new(&d).connect().await?.into_parts();
        let pending: Pending = Arc::default();
        pendings.push(pending.clone());
        let (p, t) = (pending.clone(), tally.clone());
        readers.push(tokio::spawn(async move {
            while let Ok(Some(Ok(reply))) =
                tokio::time::timeout(Duration::from_secs(5), rd.next()).await
            {
                let Some(sent_at) = p.lock().ok().and_then(|mut p| p.remove(&reply.id)) else {
                    continue;
                };
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                match reply.op.opcode {
                    Some(Opcode::Response) => t
                        .ok_latencies_us
                        .push(sent_at.elapsed().as_micros().min(u32::MAX as u128) as u32),
                    _ => {
                        let code = reply.op.error_code().unwrap_or(ErrorCode::Format);
                        *t.errors.entry(code).or_default() += 1;
                    }
                }
            }
        }));
        let (pool, sent, lag) = (pool.clone(), sent.clone(), max_lag_ms.clone());
        writers.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut n: u64 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while start.elapsed() < duration {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * per_conn) as u64;
                while n < due {
                    let id = n as u32;
                    let op = pool[n as usize % pool.len()].clone();
                    if let Ok(mut p) = pending.lock() {
                        p.insert(id, Instant::now());
                    }
                    wr.send(Message { id, op }).await?;
                    n += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                // How far behind schedule the key server's backpressure put us.
                let on_time = Duration::from_secs_f64(n as f64 / per_conn);
                let behind = start.elapsed().saturating_sub(on_time);
                lag.fetch_max(behind.as_millis() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(wr)
        }));
    }
    let mut keep = Vec::new();
    for w in writers {
        keep.push(w.await.context("writer task")??);
    }
    let offered_for = duration.as_secs_f64();
    for r in readers {
        let _ = r.await;
    }
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let rss_after = vm_rss_kib(server.pid());
    let unanswered: usize = pendings
        .iter()
        .map(|p| p.lock().map(|p| p.len()).unwrap_or(0))
        .sum();
    drop(keep);

    let t = tally.lock().unwrap_or_else(|e| e.into_inner());
    let mut lat = t.ok_latencies_us.clone();
    lat.sort_unstable();
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "offered {rate:.0} ops/s ({:.1}× capacity) for {offered_for:.0} s over {} connections",
        args.factor, args.connections
    );
    println!(
        "sent {sent} ({:.0}/s; sender at most {} ms behind schedule: key server backpressure)",
        sent as f64 / offered_for,
        max_lag_ms.load(Ordering::Relaxed)
    );
    println!(
        "signed {} ({:.0}/s, {:.0}% of capacity); latency of signed requests: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        lat.len() as f64 / offered_for,
        100.0 * lat.len() as f64 / offered_for / capacity,
        percentile(&lat, 0.5) / 1000.0,
        percentile(&lat, 0.9) / 1000.0,
        percentile(&lat, 0.99) / 1000.0,
        lat.last().copied().map_or(f64::NAN, |v| f64::from(v) / 1000.0),
    );
    let mut errors: Vec<_> = t.errors.iter().collect();
    errors.sort_by_key(|(c, _)| c.to_u8());
    println!(
        "errors: {}; unanswered after 5 s: {unanswered}",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors
                .iter()
                .map(|(c, n)| format!("{n} {}", c.name()))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!(
        "key server VmRSS: {rss_before} KiB before, {} KiB peak, {rss_after} KiB after",
        rss_peak.load(Ordering::Relaxed)
    );
    let metrics = server.metrics_text().unwrap_or_default();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("keyless_queue_dropped_total"))
    {
        println!("{l}");
    }
    Ok(true)
}
