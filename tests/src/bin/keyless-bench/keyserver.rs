//! `keyless-bench keyserver`: signing throughput of the release key server over mutual
//! TLS with pipelining, against raw `ring` signing of the same keys in this process, in
//! the same run. The ratio is what matters; absolute numbers depend on the machine.
//!
//! With `--store pkcs11` the keys live in a SoftHSM2 token (initialised for the run)
//! and the reference is direct PKCS#11 signing of the same digests with the same
//! mechanisms on the same token, in this process, on `--sessions` threads with one
//! session each (as many as the key server's `[[keys.store]] sessions`).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use keyless_shared::{Message, Opcode, Operation};
use keyless_tests::keys::{
    digest, random_bytes, tls12_x25519_signed_message, tls13_server_signed_message, KeyAlg, SiteKey,
};
use keyless_tests::{
    binary, ensure_built, sign_request, ClientOptions, Deployment, KeyServer, Profile,
};
use ring::rand::SystemRandom;
use ring::signature::{self as rs, EcdsaKeyPair, RsaKeyPair};
use tokio::sync::{Notify, Semaphore};

use crate::{cpu_seconds, percentile, MEASURING, STOPPED, WARMING, WARMUP};

#[derive(Args, Clone)]
pub(crate) struct KeyserverArgs {
    /// Measurement time per algorithm and side, after a 1 s warm-up.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Key server connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// Alternate key server and ring measurements this many times (each side gets
    /// `seconds / rounds` per round), so background load hits both sides alike.
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// Tokio worker threads of the benchmark client.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Exit non-zero when a ratio misses its target.
    #[arg(long)]
    strict: bool,
    /// Where the key server's keys are: `file` (its keys directory) or `pkcs11` (a
    /// SoftHSM2 token).
    #[arg(long, value_enum, default_value_t = Store::File)]
    store: Store,
    /// Sessions on the token (`--store pkcs11`), for the key server and the reference.
    #[arg(long, default_value_t = 4)]
    sessions: usize,
}

/// Where the benchmark keys live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Store {
    File,
    Pkcs11,
}

/// One algorithm under test.
struct Case {
    name: &'static str,
    target: f64,
    key: SiteKey,
    opcode: Opcode,
    /// Builds a realistic to-be-signed message.
    message: fn() -> Vec<u8>,
    /// Verifies a whole-message signature with ring.
    verify_alg: &'static dyn rs::VerificationAlgorithm,
}

/// Results of one side of a run.
#[derive(Default)]
struct Throughput {
    ops: u64,
    secs: f64,
    errors: u64,
    latencies_us: Vec<u32>,
    /// CPU seconds used by (key server, this process) while measuring.
    cpu: (f64, f64),
}

impl Throughput {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.secs.max(f64::MIN_POSITIVE)
    }

    fn add(&mut self, other: Throughput) {
        self.ops += other.ops;
        self.secs += other.secs;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
        self.cpu.0 += other.cpu.0;
        self.cpu.1 += other.cpu.1;
    }
}

pub(crate) fn run(args: KeyserverArgs) -> Result<bool> {
    ensure!(args.seconds > 0 && args.connections > 0 && args.depth > 0 && args.rounds > 0);
    if cfg!(debug_assertions) {
        eprintln!("note: this is a debug build of keyless-bench; run it with --release");
    }
    eprintln!("building the release key server (cargo build --release)...");
    ensure_built(Profile::Release)?;
    let origin = binary("keyless-origin", Profile::Release)?;

    let mut deployment = Deployment::init(&["bench.example"])?;
    deployment.set_report_on_drop(false);
    let config = match args.store {
        Store::File => deployment.config_path(),
        Store::Pkcs11 => hsm::setup(&deployment, args.sessions)?,
    };
    let mut server = KeyServer::spawn_with(
        &origin,
        &config,
        deployment.listen(),
        deployment.metrics(),
        &deployment.logs_dir(),
    )?;
    server.set_report_on_drop(false);
    let hsm = args.store == Store::Pkcs11;
    let cases = [
        Case {
            name: "ECDSA P-256 SHA-256",
            target: if hsm { 0.70 } else { 0.50 },
            key: deployment.site_key("bench.example", KeyAlg::Ecdsa)?,
            opcode: Opcode::EcdsaSignSha256,
            message: || tls13_server_signed_message(&random_bytes(32)),
            verify_alg: &rs::ECDSA_P256_SHA256_ASN1,
        },
        Case {
            name: "RSA-2048 PKCS#1 SHA-256",
            target: 0.80,
            key: deployment.site_key("bench.example", KeyAlg::Rsa)?,
            opcode: Opcode::RsaSignSha256,
            message: tls12_x25519_signed_message,
            verify_alg: &rs::RSA_PKCS1_2048_8192_SHA256,
        },
    ];

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    let workers = server
        .log()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("workers=").map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    println!(
        "keyless-bench keyserver: {} connections x {} in flight, {} s per side after {} s warm-up; \
         {cores} cores; key server workers={workers}, client threads={}",
        args.connections,
        args.depth,
        args.seconds,
        WARMUP.as_secs(),
        args.client_threads
    );
    if hsm {
        println!(
            "  keys in a SoftHSM2 token ({}), {} sessions; reference (\"raw\"): direct \
             PKCS#11 signing in this process, {} threads with a session each",
            keyless_tests::hsm::SOFTHSM_MODULE,
            args.sessions,
            args.sessions,
        );
    }
    // As an operator runs it: the default level logs an audit line per operation.
    println!(
        "  key server logging: KEYLESS_LOG={}",
        std::env::var("KEYLESS_LOG")
            .unwrap_or_else(|_| "unset (info: an audit line per operation)".into())
    );

    let mut rows = Vec::new();
    let per_round = Duration::from_secs_f64(args.seconds as f64 / args.rounds as f64);
    for case in &cases {
        let mut remote = Throughput::default();
        let mut raw = Throughput::default();
        for _ in 0..args.rounds {
            remote.add(
                runtime
                    .block_on(measure_keyserver(
                        &deployment,
                        server.pid(),
                        case,
                        &args,
                        per_round,
                    ))
                    .with_context(|| format!("{}: key server run", case.name))
                    .inspect_err(|_| print_log_tail(&server))?,
            );
            let reference = match args.store {
                Store::File => measure_ring(case, cores, per_round),
                Store::Pkcs11 => hsm::measure_direct(case, args.sessions, per_round),
            };
            raw.add(reference.with_context(|| format!("{}: reference run", case.name))?);
        }
        rows.push((case, remote, raw));
    }
    if server.log().contains("panicked") {
        print_log_tail(&server);
        bail!("the key server panicked during the benchmark");
    }

    println!();
    println!(
        "{:<24} {:>14} {:>12} {:>7} {:>7} {:>6} {:>9} {:>9} {:>7}",
        "algorithm",
        "keyserver op/s",
        "raw op/s",
        "ratio",
        "target",
        "result",
        "p50 ms",
        "p99 ms",
        "errors"
    );
    let mut all_pass = true;
    let mut cpu_notes = Vec::new();
    for (case, mut remote, raw) in rows {
        let ratio = remote.ops_per_sec() / raw.ops_per_sec().max(f64::MIN_POSITIVE);
        let pass = ratio >= case.target && remote.errors == 0;
        all_pass &= pass;
        remote.latencies_us.sort_unstable();
        println!(
            "{:<24} {:>14.0} {:>12.0} {:>7.2} {:>7} {:>6} {:>9.2} {:>9.2} {:>7}",
            case.name,
            remote.ops_per_sec(),
            raw.ops_per_sec(),
            ratio,
            format!(">={:.2}", case.target),
            if pass { "PASS" } else { "FAIL" },
            percentile(&remote.latencies_us, 0.50) / 1000.0,
            percentile(&remote.latencies_us, 0.99) / 1000.0,
            remote.errors
        );
        cpu_notes.push(format!(
            "{}: while measuring the key server used {:.2} cores, the bench client {:.2}",
            case.name,
            remote.cpu.0 / remote.secs,
            remote.cpu.1 / remote.secs
        ));
    }
    println!();
    for note in cpu_notes {
        println!("{note}");
    }
    Ok(all_pass || !args.strict)
}

fn print_log_tail(server: &KeyServer) {
    let log = server.log();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines.len().saturating_sub(40);
    eprintln!(
        "---- end of the key server log ----\n{}\n----",
        lines.get(tail..).unwrap_or_default().join("\n")
    );
}

/// A pool of distinct, valid requests to cycle through (building them is not part of
/// what is measured).
fn request_pool(case: &Case, n: usize) -> Result<Vec<Operation>> {
    (0..n)
        .map(|_| {
            let m = (case.message)();
            let d = digest(case.opcode, &m)?;
            Ok(sign_request(case.opcode, case.key.ski, &d, Some(&m)))
        })
        .collect()
}

async fn measure_keyserver(
    deployment: &Deployment,
    server_pid: u32,
    case: &Case,
    args: &KeyserverArgs,
    duration: Duration,
) -> Result<Throughput> {
    // One checked request first: the key server must accept and sign these requests.
    let mut probe = ClientOptions::new(deployment).connect().await?;
    let m = (case.message)();
    let reply = probe
        .sign(
            case.opcode,
            case.key.ski,
            &digest(case.opcode, &m)?,
            Some(&m),
        )
        .await?;
    ensure!(
        reply.opcode == Some(Opcode::Response),
        "the key server refused a benchmark request: {:?}",
        reply.error_code()
    );
    ensure!(
        case.key
            .verify_message_ring(case.verify_alg, &m, reply.payload()),
        "the key server's signature does not verify"
    );
    drop(probe);

    let phase = Arc::new(AtomicU8::new(WARMING));
    let completed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        let client = ClientOptions::new(deployment).connect().await?;
        let pool = request_pool(case, 256)?;
        conns.push(tokio::spawn(connection(
            client,
            pool,
            args.depth,
            epoch,
            phase.clone(),
            completed.clone(),
            errors.clone(),
        )));
    }
    tokio::time::sleep(WARMUP).await;
    phase.store(MEASURING, Ordering::SeqCst);
    let cpu0 = (cpu_seconds(server_pid), cpu_seconds(std::process::id()));
    let t0 = Instant::now();
    tokio::time::sleep(duration).await;
    phase.store(STOPPED, Ordering::SeqCst);
    let elapsed = t0.elapsed();
    let cpu1 = (cpu_seconds(server_pid), cpu_seconds(std::process::id()));
    let ops = completed.load(Ordering::SeqCst);
    let mut latencies_us = Vec::new();
    for conn in conns {
        latencies_us.extend(conn.await??);
    }
    Ok(Throughput {
        ops,
        secs: elapsed.as_secs_f64(),
        errors: errors.load(Ordering::SeqCst),
        latencies_us,
        cpu: (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1),
    })
}

/// Keeps `depth` requests in flight on one connection until the phase is STOPPED,
/// writing whatever slots are free as one batch; returns the latencies measured.
async fn connection(
    client: keyless_tests::KeyClient,
    pool: Vec<Operation>,
    depth: usize,
    epoch: Instant,
    phase: Arc<AtomicU8>,
    completed: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> Result<Vec<u32>> {
    let (mut reader, mut writer) = client.into_parts();
    writer.set_backpressure_boundary(64 * 1024);
    let slots = Arc::new(Semaphore::new(depth));
    // Send time (µs since `epoch`) per in-flight slot: ids are sequential and at most
    // `depth` are in flight, so `id % depth` never collides.
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..depth).map(|_| AtomicU64::new(0)).collect());
    let drained = Arc::new(Notify::new());

    let write = {
        let slots = slots.clone();
        let sent_at = sent_at.clone();
        let phase = phase.clone();
        let drained = drained.clone();
        async move {
            let mut id: u32 = 0;
            while phase.load(Ordering::Relaxed) != STOPPED {
                let Ok(first) = slots.acquire().await else {
                    break;
                };
                first.forget();
                let mut batch = 1;
                while batch < depth {
                    match slots.try_acquire() {
                        Ok(p) => {
                            p.forget();
                            batch += 1;
                        }
                        Err(_) => break,
                    }
                }
                let now = epoch.elapsed().as_micros() as u64;
                for _ in 0..batch {
                    id = id.wrapping_add(1);
                    let slot = id as usize % depth;
                    if let Some(t) = sent_at.get(slot) {
                        t.store(now, Ordering::Relaxed);
                    }
                    let op = pool
                        .get(id as usize % pool.len())
                        .cloned()
                        .unwrap_or_default();
                    writer.feed(Message { id, op }).await?;
                }
                SinkExt::<Message>::flush(&mut writer).await?;
            }
            // Wait for every reply, then let the reader go.
            let _ = slots.acquire_many(depth as u32).await;
            drained.notify_one();
            Ok::<_, anyhow::Error>(())
        }
    };
    let read = async move {
        let mut latencies = Vec::new();
        loop {
            let msg = tokio::select! {
                msg = reader.next() => msg,
                () = drained.notified() => break,
            };
            let msg = match msg {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    slots.close();
                    bail!("reading replies: {e}");
                }
                None => {
                    slots.close();
                    bail!("the key server closed a benchmark connection");
                }
            };
            if msg.op.opcode != Some(Opcode::Response) {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            if phase.load(Ordering::Relaxed) == MEASURING {
                completed.fetch_add(1, Ordering::Relaxed);
                let sent = sent_at
                    .get(msg.id as usize % depth)
                    .map_or(0, |t| t.load(Ordering::Relaxed));
                let now = epoch.elapsed().as_micros() as u64;
                latencies.push(u32::try_from(now.saturating_sub(sent)).unwrap_or(u32::MAX));
            }
            slots.add_permits(1);
        }
        Ok(latencies)
    };
    let ((), latencies) = tokio::try_join!(write, read)?;
    Ok(latencies)
}

mod hsm;

/// Raw ring signing of the same key and messages on `threads` threads.
fn measure_ring(case: &Case, threads: usize, duration: Duration) -> Result<Throughput> {
    let der = case.key.private_pkcs8_der()?;
    let rng = SystemRandom::new();
    enum Signer {
        Ecdsa(EcdsaKeyPair),
        Rsa(RsaKeyPair),
    }
    let signer = match case.key.alg() {
        KeyAlg::Ecdsa => Signer::Ecdsa(
            EcdsaKeyPair::from_pkcs8(&rs::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
                .map_err(|e| anyhow::anyhow!("ring rejects the ECDSA key: {e}"))?,
        ),
        KeyAlg::Rsa => Signer::Rsa(
            RsaKeyPair::from_pkcs8(&der)
                .map_err(|e| anyhow::anyhow!("ring rejects the RSA key: {e}"))?,
        ),
        KeyAlg::Ed25519 => bail!("no raw reference for Ed25519 here"),
    };
    let messages: Vec<Vec<u8>> = (0..256).map(|_| (case.message)()).collect();
    measure_threads(
        threads,
        duration,
        || Ok(vec![0u8; 512]),
        |sig: &mut Vec<u8>, i: usize| {
            let m = messages
                .get(i % messages.len())
                .map_or(&[][..], Vec::as_slice);
            match &signer {
                Signer::Ecdsa(k) => {
                    k.sign(&rng, m)
                        .map_err(|_| anyhow::anyhow!("ring ECDSA sign failed"))?;
                }
                Signer::Rsa(k) => {
                    let out = sig
                        .get_mut(..k.public().modulus_len())
                        .context("RSA modulus too long")?;
                    k.sign(&rs::RSA_PKCS1_SHA256, &rng, m, out)
                        .map_err(|_| anyhow::anyhow!("ring RSA sign failed"))?;
                }
            }
            Ok(())
        },
    )
}

/// Runs operations one after another on `threads` threads — `setup` makes a thread's
/// state, `op` runs its i-th operation with it — through the warm-up and then
/// `duration` of measuring; counts the operations done while measuring.
fn measure_threads<S>(
    threads: usize,
    duration: Duration,
    setup: impl Fn() -> Result<S> + Sync,
    op: impl Fn(&mut S, usize) -> Result<()> + Sync,
) -> Result<Throughput> {
    let phase = AtomicU8::new(WARMING);
    let completed = AtomicU64::new(0);
    let elapsed = std::thread::scope(|s| -> Result<Duration> {
        let mut handles = Vec::new();
        for t in 0..threads.max(1) {
            let (setup, op, phase, completed) = (&setup, &op, &phase, &completed);
            handles.push(s.spawn(move || -> Result<()> {
                let mut state = setup()?;
                let mut i = t;
                while phase.load(Ordering::Relaxed) != STOPPED {
                    i = i.wrapping_add(1);
                    op(&mut state, i)?;
                    if phase.load(Ordering::Relaxed) == MEASURING {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            }));
        }
        std::thread::sleep(WARMUP);
        phase.store(MEASURING, Ordering::SeqCst);
        let t0 = Instant::now();
        std::thread::sleep(duration);
        phase.store(STOPPED, Ordering::SeqCst);
        let elapsed = t0.elapsed();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a measuring thread panicked"))??;
        }
        Ok(elapsed)
    })?;
    Ok(Throughput {
        ops: completed.load(Ordering::SeqCst),
        secs: elapsed.as_secs_f64(),
        ..Throughput::default()
    })
}
