//! `keyless-bench cache`: HTTPS keep-alive requests per second for a cached object
//! through the release edge against nginx with `proxy_cache`, in the same run. Both sit
//! in front of the same test origin, present the same ECDSA P-256 site certificate and
//! are driven by the same wrk with the same threads and connections; the sides alternate
//! (edge, nginx, then nginx, edge, ...) and each side's rounds are pooled.
//!
//! Targets: the edge reaches ≥ 1.0× nginx's requests/s for a 1 KiB object and ≥ 1.0×
//! its throughput for a 1 MiB object and for a 256 MiB object, which the edge streams
//! from its disk tier (it is above `[cache] max_object_bytes`) and nginx from its cache
//! files; the large object's throughput counts every byte read (wrk's byte count), so
//! responses cut at the end of a round count too, and each side's server CPU is
//! reported per MiB served. nginx holds the site key itself (it is the reference); the
//! edge's handshakes are signed by the key server, but with keep-alive there are only
//! `--connections` of them per run.
//!
//! nginx and wrk are installed with `apt-get` when missing.

mod nginx;
mod wrk;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Args;
use keyless_tests::{free_addr, http_get, Curl, Deployment, SClient};

use crate::cpu_seconds;
use crate::edge::build_release;
use crate::load::machine_busy_seconds;
use crate::procs::{children, proc_state, rss_bytes, start_edge_stack, EdgeStack, Proc};
use nginx::{ensure_tools, nginx_config, version_text, Tools};
use wrk::{parse_wrk, Run, WRK_SCRIPT};

/// The edge must reach this fraction of nginx's rate, for each object.
const TARGET: f64 = 1.0;
/// The benchmark site (a `keyless-certs init` domain).
const DOMAIN: &str = "example.com";
/// Log filter of the edge and the key server: no per-request or audit lines.
const LOG_FILTER: &str = "warn";
/// `[cache] memory_bytes` of the benchmark edge.
const EDGE_CACHE_BYTES: i64 = 512 << 20;
/// `[cache] disk_bytes` of the benchmark edge (its disk tier holds the large object).
const EDGE_DISK_BYTES: i64 = 1 << 30;
/// The cached objects: the test origin's `/bytes` with an hour of freshness.
const OBJECTS: [Object; 3] = [
    Object {
        label: "1 KiB",
        bytes: 1 << 10,
        large: false,
    },
    Object {
        label: "1 MiB",
        bytes: 1 << 20,
        large: false,
    },
    Object {
        label: "256 MiB",
        bytes: 256 << 20,
        large: true,
    },
];
/// Unmeasured wrk run before the first round of each side and object.
const WARMUP_SECS: u64 = 1;
#[derive(Args, Clone)]
pub(crate) struct CacheArgs {
    /// Measurement time per side and object, split over the rounds (whole seconds per
    /// round, at least 1); each side and object first gets a 1 s unmeasured wrk run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// wrk connections (kept alive for the whole run), the same for both sides.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// wrk connections for the 256 MiB object (each response takes a while).
    #[arg(long, default_value_t = 4)]
    large_connections: usize,
    /// Alternate edge and nginx this many times per object (edge first in odd rounds);
    /// more rounds even out the drift of a shared 2-core machine.
    #[arg(long, default_value_t = 4)]
    rounds: u64,
    /// Measure even if a side does not serve the objects from its cache (to run the
    /// harness against an edge without a cache; the ratios then mean little).
    #[arg(long)]
    no_verify: bool,
    /// Exit non-zero when a ratio misses its target.
    #[arg(long)]
    strict: bool,
}

/// One cached object.
struct Object {
    label: &'static str,
    bytes: u64,
    /// Above the edge's `max_object_bytes`: served from its disk tier, measured in
    /// bytes per second with `--large-connections`.
    large: bool,
}

impl Object {
    /// Path and query asking the test origin for the object with `max-age=3600`.
    fn path(&self) -> String {
        format!("/bytes?n={}&cc=max-age%3D3600", self.bytes)
    }
}

/// The servers under test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Edge,
    Nginx,
}

impl Side {
    const BOTH: [Side; 2] = [Side::Edge, Side::Nginx];

    fn name(self) -> &'static str {
        match self {
            Side::Edge => "edge",
            Side::Nginx => "nginx",
        }
    }
}

/// The processes of one run.
struct Setup {
    deployment: Deployment,
    keyserver: Proc,
    origin: Proc,
    edge: Proc,
    nginx: Proc,
    origin_addr: SocketAddr,
    edge_addr: SocketAddr,
    nginx_addr: SocketAddr,
    /// The wrk script and the nginx files.
    work: PathBuf,
}

impl Setup {
    fn addr(&self, side: Side) -> SocketAddr {
        match side {
            Side::Edge => self.edge_addr,
            Side::Nginx => self.nginx_addr,
        }
    }

    /// The processes doing a side's work: the edge and the key server (which signs
    /// its handshakes), or nginx's master and workers.
    fn server_pids(&self, side: Side) -> Vec<u32> {
        match side {
            Side::Edge => vec![self.edge.pid(), self.keyserver.pid()],
            Side::Nginx => {
                let mut pids = vec![self.nginx.pid()];
                pids.extend(children(self.nginx.pid()));
                pids
            }
        }
    }

    fn check_running(&mut self) -> Result<()> {
        for p in [
            &mut self.keyserver,
            &mut self.origin,
            &mut self.edge,
            &mut self.nginx,
        ] {
            p.check_running()?;
        }
        Ok(())
    }

    /// Requests the test origin has answered so far (its `/__count` included).
    fn origin_count(&self) -> Result<u64> {
        let (status, body) = http_get(self.origin_addr, "/__count")?;
        ensure!(status == 200, "test origin /__count answered {status}");
        body.trim()
            .parse()
            .with_context(|| format!("test origin /__count: {body:?}"))
    }
}

/// What wrk reported and the side's results, per object.
struct Results {
    /// `[object][side]`: pooled runs.
    pooled: Vec<[Run; 2]>,
    /// `[object]`: (edge rate, nginx rate) of each round.
    rounds: Vec<Vec<(f64, f64)>>,
}

pub(crate) fn run(args: CacheArgs) -> Result<bool> {
    ensure!(
        args.seconds > 0 && args.connections > 0 && args.threads > 0 && args.rounds > 0,
        "--seconds, --connections, --threads and --rounds must be positive"
    );
    ensure!(
        args.connections >= args.threads && args.large_connections >= args.threads,
        "wrk needs at least one connection per thread: --connections {} / \
         --large-connections {} < --threads {}",
        args.connections,
        args.large_connections,
        args.threads
    );
    let tools = ensure_tools()?;
    eprintln!("building the release key server, edge and test origin (cargo build --release)...");
    build_release()?;
    let mut setup = start(&tools)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_round = args.seconds.div_ceil(args.rounds).max(1);

    let tls = check_tls(&setup)?;
    let mut uncached = Vec::new();
    for object in &OBJECTS {
        for side in Side::BOTH {
            if let Err(e) = check_cached(&setup, side, object) {
                ensure!(args.no_verify, "{e:#}");
                eprintln!("warning (--no-verify): {e:#}");
                uncached.push(format!("{} {}", side.name(), object.label));
            }
        }
    }
    let rss_start = rss_bytes(setup.edge.pid());

    println!(
        "keyless-bench cache: HTTPS keep-alive GETs of a cached object, edge ([cache] \
         memory_bytes = {EDGE_CACHE_BYTES}, disk tier of {EDGE_DISK_BYTES} bytes, \
         max_object_bytes default) vs nginx {} (proxy_cache), same test origin",
        version_text(tools.nginx_version)
    );
    println!(
        "  load: {}, {} threads, {} connections kept alive ({} for the large object), \
         HTTP/1.1 (wrk offers no ALPN); {} s per side and object in {} round(s) of \
         {per_round} s, order alternating, after a {WARMUP_SECS} s unmeasured run; rounds \
         pooled",
        tools.wrk_version,
        args.threads,
        args.connections,
        args.large_connections,
        per_round * args.rounds,
        args.rounds,
    );
    println!(
        "  caveat: {cpus} cores shared by wrk and the server under test; the ratio is what \
         counts, not the absolute rates"
    );
    for side in Side::BOTH {
        if let Some(line) = tls.iter().find(|(s, _)| *s == side).map(|(_, l)| l) {
            println!("  {}: {line}", side.name());
        }
    }
    println!(
        "  checked before measuring: the second GET of each object is a cache hit (edge \
         Cache-Status, nginx $upstream_cache_status){}",
        if uncached.is_empty() {
            String::new()
        } else {
            format!(" -- NOT for {} (--no-verify)", uncached.join(", "))
        }
    );
    println!(
        "  logging: KEYLESS_LOG={LOG_FILTER} for the edge and the key server, nginx \
         access_log off"
    );

    let script = setup.work.join("report.lua");
    std::fs::write(&script, WRK_SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    let mut results = Results {
        pooled: Vec::new(),
        rounds: Vec::new(),
    };
    for object in &OBJECTS {
        for side in Side::BOTH {
            let label = format!("warmup-{}-{}", side.name(), object.bytes);
            wrk(
                &tools,
                &mut setup,
                &script,
                side,
                object,
                &args,
                WARMUP_SECS,
                &label,
            )?;
        }
        let mut pooled = [Run::default(), Run::default()];
        let mut rounds = Vec::new();
        for round in 0..args.rounds {
            let mut order = Side::BOTH;
            if round % 2 == 1 {
                order.reverse();
            }
            let mut rates = [0.0; 2];
            for side in order {
                let i = side as usize;
                let label = format!("{}-{}-r{}", side.name(), object.bytes, round + 1);
                let run = wrk(
                    &tools, &mut setup, &script, side, object, &args, per_round, &label,
                )?;
                if let (Some(p), Some(r)) = (pooled.get_mut(i), rates.get_mut(i)) {
                    *r = if object.large {
                        mib_per_s(&run, object)
                    } else {
                        run.rate()
                    };
                    p.add(&run);
                }
            }
            eprintln!(
                "{} round {}: edge {:.0}, nginx {:.0} (requests/s; MiB/s for the large object)",
                object.label,
                round + 1,
                rates[0],
                rates[1]
            );
            rounds.push((rates[0], rates[1]));
        }
        results.pooled.push(pooled);
        results.rounds.push(rounds);
    }
    setup.check_running()?;
    setup.edge.check_no_panic()?;
    setup.keyserver.check_no_panic()?;
    report(&setup, &results, rss_start, args.strict)
}

/// MiB/s of `run`: every byte read for the large object (partial responses at the end
/// of a round included), whole responses for the others.
fn mib_per_s(run: &Run, object: &Object) -> f64 {
    let bytes = if object.large {
        run.bytes as f64
    } else {
        run.requests as f64 * object.bytes as f64
    };
    bytes / run.secs.max(f64::MIN_POSITIVE) / f64::from(1 << 20)
}

/// Prints the tables and notes; returns the verdict (`true` unless strict and failed).
fn report(setup: &Setup, results: &Results, rss_start: Option<u64>, strict: bool) -> Result<bool> {
    let mut pass_all = true;
    let mut busiest: f64 = 0.0;
    for (object, (pooled, rounds)) in OBJECTS
        .iter()
        .zip(results.pooled.iter().zip(&results.rounds))
    {
        let [edge, nginx] = pooled;
        println!();
        println!("{} object ({})", object.label, object.path());
        println!(
            "{:<6} {:>11} {:>9} {:>8} {:>8} {:>7} {:>12} {:>12} {:>13} {:>14} {:>9} {:>11}",
            "target",
            "requests/s",
            "MiB/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "origin reqs",
            "server cores",
            "server µs/req",
            "server ms/MiB",
            "wrk cores",
            "other cores"
        );
        for (side, run) in Side::BOTH.iter().zip(pooled) {
            println!(
                "{:<6} {:>11.1} {:>9.1} {:>8.3} {:>8.3} {:>7} {:>12} {:>12.2} {:>13.1} {:>14.3} {:>9.2} {:>11.2}",
                side.name(),
                run.rate(),
                mib_per_s(run, object),
                run.latency_ms(0.50),
                run.latency_ms(0.99),
                run.errors(),
                run.origin_requests,
                run.cores(run.server_cpu),
                run.server_cpu * 1e6 / (run.requests.max(1) as f64),
                run.server_cpu * 1e3 / (run.bytes.max(1) as f64 / f64::from(1 << 20)),
                run.cores(run.wrk_cpu),
                run.other_cores(),
            );
            busiest = busiest.max(run.other_cores());
            if run.errors() > 0 {
                println!(
                    "  {} errors: connect {}, read {}, write {}, timeout {}, non-2xx/3xx {}",
                    side.name(),
                    run.connect_errors,
                    run.read_errors,
                    run.write_errors,
                    run.timeouts,
                    run.status_errors
                );
            }
        }
        let unit = if object.large { "MiB/s" } else { "/s" };
        for (i, (e, n)) in rounds.iter().enumerate() {
            println!(
                "  round {}: edge {e:.0}{unit}, nginx {n:.0}{unit}, ratio {:.2}",
                i + 1,
                e / n.max(f64::MIN_POSITIVE)
            );
        }
        let ratio = if object.large {
            mib_per_s(edge, object) / mib_per_s(nginx, object).max(f64::MIN_POSITIVE)
        } else {
            edge.rate() / nginx.rate().max(f64::MIN_POSITIVE)
        };
        let pass = ratio >= TARGET && edge.errors() == 0 && nginx.errors() == 0;
        pass_all &= pass;
        let what = if object.bytes >= 1 << 20 {
            "throughput"
        } else {
            "requests/s"
        };
        println!(
            "  {what} edge/nginx {ratio:.2}, target >= {TARGET:.2}: {}",
            if pass { "PASS" } else { "FAIL" }
        );
    }

    println!();
    let mib = |b: Option<u64>| {
        b.map_or("?".to_owned(), |b| {
            format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
        })
    };
    println!(
        "memory after the run: edge VmRSS {} (after start {}); key server VmRSS {}",
        mib(rss_bytes(setup.edge.pid())),
        mib(rss_start),
        mib(rss_bytes(setup.keyserver.pid())),
    );
    let helpers = children(setup.nginx.pid());
    let workers = helpers
        .iter()
        .filter(|&&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("worker process"))
        })
        .count();
    let helper_rss: u64 = helpers.iter().filter_map(|&p| rss_bytes(p)).sum();
    let master_rss = rss_bytes(setup.nginx.pid());
    println!(
        "                      nginx VmRSS {} (master {} + {workers} workers and {} cache \
         manager/loader {}; shared pages counted in each); its cache is files (page cache \
         not included)",
        mib(Some(master_rss.unwrap_or(0) + helper_rss)),
        mib(master_rss),
        helpers.len().saturating_sub(workers),
        mib(Some(helper_rss)),
    );
    let edge_log = setup.edge.log();
    let notable: Vec<&str> = edge_log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    println!(
        "edge log: {} warning/error lines{}",
        notable.len(),
        notable
            .iter()
            .take(3)
            .map(|l| format!("\n  {l}"))
            .collect::<String>()
    );
    crate::print_verdict(
        busiest,
        &format!("edge vs nginx, target >= {TARGET:.2} for every object"),
        pass_all,
        &setup.deployment.logs_dir(),
    );
    Ok(pass_all || !strict)
}

/// One wrk run of `secs` seconds against a side, with its CPU and origin accounting.
#[allow(clippy::too_many_arguments)]
fn wrk(
    tools: &Tools,
    setup: &mut Setup,
    script: &Path,
    side: Side,
    object: &Object,
    args: &CacheArgs,
    secs: u64,
    label: &str,
) -> Result<Run> {
    let addr = setup.addr(side);
    let out_path = setup.deployment.logs_dir().join(format!("wrk-{label}.txt"));
    let out =
        File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut cmd = Command::new(&tools.wrk);
    // An IP in the URL: wrk has no --resolve. Its SNI is then the IP, which TLS servers
    // ignore, and the edge picks `[tls] default_site`; the Host header picks the site.
    cmd.arg("-t")
        .arg(args.threads.to_string())
        .arg("-c")
        .arg(
            if object.large {
                args.large_connections
            } else {
                args.connections
            }
            .to_string(),
        )
        .arg("-d")
        .arg(format!("{secs}s"))
        .arg("--latency")
        // wrk's default 2 s would count a slow 256 MiB response as a timeout.
        .arg("--timeout")
        .arg(if object.large { "60s" } else { "2s" })
        .arg("-s")
        .arg(script)
        .arg("-H")
        .arg(format!("Host: {DOMAIN}"))
        .arg(format!("https://{addr}{}", object.path()))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);

    let pids = setup.server_pids(side);
    let origin_before = setup.origin_count()?;
    let server_before: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let machine_before = machine_busy_seconds();
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let deadline = started + Duration::from_secs(secs + 30);
    // wrk's CPU is read from its zombie, before it is reaped.
    let mut wrk_cpu = 0.0;
    loop {
        match proc_state(child.id()) {
            Some('Z') | None => {
                wrk_cpu = cpu_seconds(child.id());
                break;
            }
            Some(_) if Instant::now() >= deadline => break,
            Some(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let machine_cpu = machine_busy_seconds() - machine_before;
    let server_cpu: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>() - server_before;
    if Instant::now() >= deadline {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for wrk")?;
    let origin_requests = setup
        .origin_count()?
        // The count includes the `/__count` request itself.
        .saturating_sub(origin_before + 1);
    setup.check_running()?;
    let text = std::fs::read_to_string(&out_path)
        .with_context(|| format!("reading {}", out_path.display()))?;
    ensure!(
        status.success(),
        "wrk against the {} exited with {status}:\n{text}",
        side.name()
    );
    let mut run = parse_wrk(&text).with_context(|| {
        format!(
            "wrk output against the {} ({})",
            side.name(),
            out_path.display()
        )
    })?;
    run.server_cpu = server_cpu;
    run.wrk_cpu = wrk_cpu;
    run.machine_cpu = machine_cpu;
    run.origin_requests = origin_requests;
    Ok(run)
}

/// Starts the key server, the test origin, the edge and nginx.
fn start(tools: &Tools) -> Result<Setup> {
    let EdgeStack {
        deployment,
        keyservers,
        origin,
        origin_addr,
        edge,
        edge_addr,
        ..
    } = start_edge_stack(DOMAIN, LOG_FILTER, 1, |c| {
        // wrk connects to an IP, so its SNI names no site.
        c.tls_option("default_site", DOMAIN)
            .cache_option("memory_bytes", EDGE_CACHE_BYTES)
            .cache_option("disk_dir", "cache-bench-disk")
            .cache_option("disk_bytes", EDGE_DISK_BYTES)
    })?;
    let keyserver = keyservers
        .into_iter()
        .next()
        .map(|k| k.proc)
        .context("the stack started no key server")?;
    let dir = deployment.dir().to_path_buf();
    let logs = deployment.logs_dir();

    let work = dir.join("cache-bench");
    let nginx_addr = free_addr()?;
    let nginx_dir = work.join("nginx");
    let conf = nginx_config(tools, &deployment, &nginx_dir, nginx_addr, origin_addr)?;
    let conf_path = nginx_dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).with_context(|| format!("writing {}", conf_path.display()))?;
    let nginx_args = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "-p".into(),
            nginx_dir.clone().into_os_string(),
            "-c".into(),
            conf_path.clone().into_os_string(),
            // Before reading the config, nginx opens its built-in error log path.
            "-e".into(),
            nginx_dir.join("error.log").into_os_string(),
        ];
        a.extend(extra.iter().map(Into::into));
        a
    };
    let test = Command::new(&tools.nginx)
        .args(nginx_args(&["-t", "-q"]))
        .output()
        .context("running nginx -t")?;
    ensure!(
        test.status.success(),
        "nginx rejected {}:\n{}",
        conf_path.display(),
        String::from_utf8_lossy(&test.stderr)
    );
    let mut nginx = Proc::spawn(
        "nginx",
        &tools.nginx,
        nginx_args(&[]),
        &[],
        logs.join("nginx.log"),
    )?
    // SIGTERM: the master stops its workers (SIGKILL would leave them serving).
    .stop_with("TERM");
    nginx.wait_port(nginx_addr)?;

    eprintln!(
        "deployment {}: key server pid {}, test origin pid {} ({origin_addr}), edge pid {} \
         ({edge_addr}), nginx pid {} ({nginx_addr}); logs in {}",
        dir.display(),
        keyserver.pid(),
        origin.pid(),
        edge.pid(),
        nginx.pid(),
        logs.display()
    );
    Ok(Setup {
        deployment,
        keyserver,
        origin,
        edge,
        nginx,
        origin_addr,
        edge_addr,
        nginx_addr,
        work,
    })
}

/// What each side negotiates with an OpenSSL client that, like wrk, names the IP as
/// SNI; fails unless both present the site's ECDSA P-256 leaf and verify.
fn check_tls(setup: &Setup) -> Result<Vec<(Side, String)>> {
    let ca = setup.deployment.dir().join("client/ca.pem");
    let cert_path = setup
        .deployment
        .keys_dir()
        .join(format!("{DOMAIN}-ecdsa.crt"));
    let cert_text = std::fs::read_to_string(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?;
    let leaf = first_pem(&cert_text).with_context(|| format!("{}: no PEM", cert_path.display()))?;
    let mut out = Vec::new();
    for side in Side::BOTH {
        let addr = setup.addr(side);
        let probe = SClient::new(addr)
            .servername(&addr.ip().to_string())
            .verify(&ca, DOMAIN)
            .run()
            .with_context(|| format!("openssl s_client to the {}", side.name()))?;
        probe
            .expect_verified()
            .with_context(|| format!("TLS to the {}", side.name()))?;
        let text = probe.text();
        ensure!(
            first_pem(&text).as_deref() == Some(leaf.as_str()),
            "the {} does not present the site's ECDSA leaf {}",
            side.name(),
            cert_path.display()
        );
        let field = |name: &str| probe.field(name).unwrap_or_else(|| "?".to_owned());
        // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384"
        let session = text
            .lines()
            .find_map(|l| l.strip_prefix("New, "))
            .map_or_else(|| "?".to_owned(), |l| l.replace(", Cipher is", ""));
        out.push((
            side,
            format!(
                "{session}, key exchange {}, ECDSA P-256 leaf of {DOMAIN}, signature {}+{}",
                field("Server Temp Key"),
                field("Peer signature type"),
                field("Peer signing digest"),
            ),
        ));
    }
    Ok(out)
}

/// The first PEM block of `text`, whitespace-normalised.
fn first_pem(text: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.find(BEGIN)?;
    let rest = text.get(start..)?;
    let end = rest.find(END)? + END.len();
    Some(rest.get(..end)?.split_whitespace().collect())
}

/// Fetches `object` twice from `side`: the first GET fills the cache, the second must be
/// a hit with the whole body.
fn check_cached(setup: &Setup, side: Side, object: &Object) -> Result<()> {
    let addr = setup.addr(side);
    let url = format!("https://{DOMAIN}:{}{}", addr.port(), object.path());
    let headers = setup
        .work
        .join(format!("headers-{}-{}.txt", side.name(), object.bytes));
    let ca = setup.deployment.dir().join("client/ca.pem");
    // The Host wrk sends (no port), in case the cache key has it.
    let curl = Curl::new(&ca)
        .resolve(DOMAIN, addr)
        .header(&format!("Host: {DOMAIN}"))
        .arg("-D")
        .arg(&headers);
    let mut last = String::new();
    for attempt in ["first", "second"] {
        let out = curl
            .get(&url)
            .with_context(|| format!("GET {url} from the {}", side.name()))?;
        out.expect_status(200)
            .with_context(|| format!("{attempt} GET {} from the {}", object.path(), side.name()))?;
        ensure!(
            out.body.len() as u64 == object.bytes,
            "{attempt} GET {} from the {}: {} body bytes, expected {}",
            object.path(),
            side.name(),
            out.body.len(),
            object.bytes
        );
        last = std::fs::read_to_string(&headers)
            .with_context(|| format!("reading {}", headers.display()))?;
    }
    let header = |name: &str| {
        last.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    match side {
        Side::Edge => {
            let status = header("cache-status");
            ensure!(
                status
                    .as_deref()
                    .is_some_and(|s| s.to_ascii_lowercase().contains("hit")),
                "edge did not serve {} from cache: Cache-Status {} on the second GET \
                 (rerun with --no-verify to measure anyway)",
                object.path(),
                status.map_or("absent".to_owned(), |s| format!("{s:?}"))
            );
        }
        Side::Nginx => {
            let status = header("x-cache-status");
            ensure!(
                status.as_deref() == Some("HIT"),
                "nginx did not serve {} from cache: X-Cache-Status {} on the second GET",
                object.path(),
                status.map_or("absent".to_owned(), |s| format!("{s:?}"))
            );
        }
    }
    Ok(())
}
