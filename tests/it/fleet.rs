//! The edge in front of a fleet of key servers: priority failover and failback with
//! real processes killed, hung and brought back under a steady stream of new
//! handshakes; weighted selection; SRV discovery through a real DNS server; drain on a
//! key server's SIGTERM; and a group speaking the reference protocol.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keyless_tests::{
    has_field, per_phase, Dns, HandshakeEnd, KeyServer, LoadOutcome, Signal, SrvRecord, TlsVersion,
};

use crate::edge_support::{Stack, StackBuilder, ORIGIN_HOST, SITE};

/// The group every test here configures.
const GROUP: &str = "fleet";
/// Fast probes and short attempts, so that the phases take seconds.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// `up_after` (the default): probes in a row that bring a server back.
const UP_AFTER: u32 = 3;

/// `[keyserver]` settings of these tests' edges.
fn fast(c: keyless_tests::EdgeConfig) -> keyless_tests::EdgeConfig {
    c.keyserver_option("timeout", "300ms")
        .keyserver_option("connect_timeout", "300ms")
        .keyserver_option("probe_interval", "250ms")
        .keyserver_option("probe_max_interval", "1s")
}

/// A stack whose group holds its key server at `first` `(priority, weight)` and one
/// more key server of the deployment per entry of `others`; the site's chain fetched.
fn fleet(first: (u16, u16), others: &[(u16, u16)]) -> Result<(Stack, Vec<KeyServer>)> {
    let backends = StackBuilder::default().backends()?;
    let mut servers = vec![(backends.keyserver.addr(), first.0, first.1)];
    let mut extra = Vec::new();
    for (i, (priority, weight)) in others.iter().enumerate() {
        let k = KeyServer::start_another(&backends.deployment, &format!("origin-{i}"))?;
        servers.push((k.addr(), *priority, *weight));
        extra.push(k);
    }
    let s = backends.with_edge(|cfg| fast(cfg.group(GROUP, &servers)))?;
    s.edge.s_client(SITE).run()?.expect_verified()?;
    Ok((s, extra))
}

/// Sleeps while the load runs.
fn run_for(d: Duration) {
    std::thread::sleep(d);
}

/// Waits until `cond` holds, checking every 50 ms, for at most `limit`.
fn wait_until(
    limit: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if cond()? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Prints the attempted and failed handshakes of each phase (shown with --nocapture
/// and for failed tests).
fn report(outcomes: &[LoadOutcome]) {
    eprintln!("{:<12} {:>9} {:>7}", "phase", "attempted", "failed");
    for (phase, attempted, failed) in per_phase(outcomes) {
        eprintln!("{phase:<12} {attempted:>9} {failed:>7}");
    }
}

/// The outcomes of `phase`.
fn in_phase<'a>(outcomes: &'a [LoadOutcome], phase: &str) -> Vec<&'a LoadOutcome> {
    outcomes.iter().filter(|o| o.phase == phase).collect()
}

/// No handshake of `phase` failed.
fn none_failed(outcomes: &[LoadOutcome], phase: &str) -> Result<usize> {
    let all = in_phase(outcomes, phase);
    let failed: Vec<_> = all
        .iter()
        .filter(|o| o.end != HandshakeEnd::Established)
        .map(|o| format!("{:?} after {:?}", o.end, o.elapsed))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {} handshakes failed in phase {phase}: {failed:?}",
        failed.len(),
        all.len()
    );
    ensure!(!all.is_empty(), "no handshake ran in phase {phase}");
    Ok(all.len())
}

/// `/healthz` of the edge says the group is degraded.
fn degraded(s: &Stack) -> Result<bool> {
    let (status, body) = s.edge.healthz()?;
    Ok(status == 503 && body.contains(&format!("key-server group {GROUP} ")))
}

#[test]
fn three_key_servers_killed_hung_and_restarted_cost_no_handshake() -> Result<()> {
    let (mut s, extra) = fleet((10, 1), &[(10, 1), (20, 1)])?;
    let [mut b, c]: [KeyServer; 2] = extra
        .try_into()
        .map_err(|_| anyhow::anyhow!("two extra key servers"))?;

    let load = s.handshake_load(2, 40.0)?;
    // Steady: both priority-10 servers sign, the priority-20 one does not.
    load.phase("steady");
    let ops = |k: &KeyServer| k.ops_ok();
    let (a0, b0, c0) = (ops(&s.keyserver)?, ops(&b)?, ops(&c)?);
    let steady = Instant::now();
    run_for(Duration::from_secs(2));
    let rate = in_phase(&load.outcomes(), "steady").len() as f64 / steady.elapsed().as_secs_f64();
    let (a1, b1, c1) = (ops(&s.keyserver)?, ops(&b)?, ops(&c)?);
    ensure!(
        rate >= 50.0,
        "only {rate:.0} handshakes/s in the steady phase"
    );
    ensure!(
        a1 > a0 && b1 > b0 && c1 == c0,
        "steady: priority-10 servers should share the load and priority 20 idle: a +{}, b +{}, c +{}",
        a1 - a0,
        b1 - b0,
        c1 - c0
    );

    // kill -9 one priority-10 server: the other takes over.
    load.phase("kill-a");
    s.keyserver.signal(Signal::Kill)?;
    s.keyserver.wait_exit(Duration::from_secs(5))?;
    run_for(Duration::from_secs(2));

    // kill -9 the other: traffic moves to priority 20.
    load.phase("kill-b");
    let c2 = ops(&c)?;
    b.signal(Signal::Kill)?;
    b.wait_exit(Duration::from_secs(5))?;
    run_for(Duration::from_secs(2));
    ensure!(ops(&c)? > c2, "the priority-20 server took no traffic");

    // A priority-10 server comes back: after UP_AFTER probes, new requests return to it.
    load.phase("restart-a");
    let restarted = Instant::now();
    s.keyserver = s.keyserver.restart()?;
    let a_before = ops(&s.keyserver)?;
    let back = wait_until(
        Duration::from_secs(10),
        "traffic back on the restarted server",
        || Ok(ops(&s.keyserver)? > a_before),
    )?;
    let failback = restarted.elapsed();
    let c3 = ops(&c)?;
    run_for(Duration::from_secs(1));
    ensure!(
        ops(&c)? == c3,
        "the priority-20 server still signs after failback"
    );
    ensure!(
        back >= PROBE_INTERVAL * (UP_AFTER - 1),
        "traffic returned after {back:?}: before {UP_AFTER} probes could have passed"
    );

    // Every server hangs: the group is down, handshakes fail fast, /healthz says so.
    load.phase("stop-all");
    s.keyserver.signal(Signal::Stop)?;
    c.signal(Signal::Stop)?;
    let down = wait_until(Duration::from_secs(5), "/healthz degraded", || degraded(&s))?;
    load.phase("all-down");
    run_for(Duration::from_secs(1));

    // One comes back: handshakes succeed again within the probes, without a restart.
    load.phase("cont-a");
    let resumed = Instant::now();
    s.keyserver.signal(Signal::Cont)?;
    let recovered = wait_until(Duration::from_secs(5), "handshakes succeed again", || {
        Ok(in_phase(&load.outcomes(), "cont-a")
            .iter()
            .any(|o| o.end == HandshakeEnd::Established))
    })?;
    run_for(Duration::from_secs(1));
    let outcomes = load.stop()?;
    c.signal(Signal::Cont)?;
    report(&outcomes);
    eprintln!(
        "failback after {failback:?}, group down noticed after {down:?}, recovery after {recovered:?} (resumed at +{:?})",
        resumed.elapsed()
    );

    for phase in ["steady", "kill-a", "kill-b", "restart-a"] {
        none_failed(&outcomes, phase)?;
    }
    for phase in ["stop-all", "all-down"] {
        for o in in_phase(&outcomes, phase) {
            ensure!(
                o.end == HandshakeEnd::Established || o.elapsed < Duration::from_secs(1),
                "phase {phase}: a handshake failed only after {:?} ({:?})",
                o.elapsed,
                o.end
            );
        }
    }
    let all_down = in_phase(&outcomes, "all-down");
    ensure!(
        !all_down.is_empty() && all_down.iter().all(|o| o.end != HandshakeEnd::Established),
        "with every key server hung, handshakes should fail: {:?}",
        all_down.iter().map(|o| &o.end).collect::<Vec<_>>()
    );
    // Fail closed: refused at once with handshake_failure, not left to time out.
    ensure!(
        all_down
            .iter()
            .all(|o| o.end == HandshakeEnd::Alert(rustls::AlertDescription::HandshakeFailure)),
        "with the group down, handshakes should get handshake_failure: {:?}",
        all_down.iter().map(|o| &o.end).collect::<Vec<_>>()
    );
    // Recovery: within the interval, UP_AFTER probes and one probe timeout.
    ensure!(
        recovered < PROBE_INTERVAL * (UP_AFTER + 1) + Duration::from_millis(1500),
        "handshakes came back only after {recovered:?}"
    );
    let cont = in_phase(&outcomes, "cont-a");
    let first_ok = cont
        .iter()
        .find(|o| o.end == HandshakeEnd::Established)
        .map(|o| o.started)
        .context("no success after SIGCONT")?;
    ensure!(
        cont.iter()
            .filter(|o| o.started > first_ok)
            .all(|o| o.end == HandshakeEnd::Established),
        "handshakes failed after the group came back"
    );
    s.edge.assert_no_panic();
    Ok(())
}

#[test]
fn weights_three_to_one_share_operations_three_to_one() -> Result<()> {
    let (s, extra) = fleet((10, 3), &[(10, 1)])?;
    let b = &extra[0];
    let (a0, b0) = (s.keyserver.ops_ok()?, b.ops_ok()?);

    // One client, back to back: at equal (zero) load the choice is the plain weighted
    // one. Under concurrency the least-loaded half of the choice moves some requests
    // to whichever server has fewer outstanding per weight, by design.
    const OPS: u64 = 2000;
    let load = s.handshake_load(1, 1000.0)?;
    load.phase("weighted");
    wait_until(Duration::from_secs(120), "enough operations", || {
        Ok(s.keyserver.ops_ok()? - a0 + b.ops_ok()? - b0 >= OPS)
    })?;
    let outcomes = load.stop()?;
    report(&outcomes);
    none_failed(&outcomes, "weighted")?;
    let (a, b) = (s.keyserver.ops_ok()? - a0, b.ops_ok()? - b0);
    let share = a as f64 / (a + b) as f64;
    eprintln!(
        "weight 3: {a} operations, weight 1: {b} ({:.1} % / {:.1} %)",
        share * 100.0,
        (1.0 - share) * 100.0
    );
    ensure!(
        (share - 0.75).abs() <= 0.07,
        "weights 3:1 gave {:.1} % / {:.1} % of {} operations",
        share * 100.0,
        (1.0 - share) * 100.0,
        a + b
    );
    Ok(())
}

/// The SRV owner name the group `srv = "ks.test"` asks for.
const SRV_OWNER: &str = "_keyless._tcp.ks.test";
/// TTL of the test's DNS answers, seconds.
const SRV_TTL: u32 = 2;

/// dnsmasq serving the origin's name and one SRV target `target` → `port`.
fn srv_dns(
    s_logs: &std::path::Path,
    at: Option<SocketAddr>,
    target: &str,
    port: u16,
) -> Result<Dns> {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    Dns::start_with(
        s_logs,
        at,
        &[(ORIGIN_HOST, localhost), (target, localhost)],
        &[SrvRecord {
            owner: SRV_OWNER,
            target,
            port,
            priority: 10,
            weight: 1,
        }],
        Some(SRV_TTL),
    )
}

#[test]
fn srv_records_move_new_requests_after_their_ttl() -> Result<()> {
    let backends = StackBuilder::default().backends()?;
    let b = KeyServer::start_another(&backends.deployment, "origin-b")?;
    let logs = backends.deployment.logs_dir();
    let dns = srv_dns(&logs, None, "ks1.test", backends.keyserver.addr().port())?;
    let dns_addr = dns.addr();
    let s = backends.with_edge(|cfg| {
        let mut cfg = fast(cfg.srv_group(GROUP, "ks.test"));
        // One resolver for origins and key servers: the test's own.
        cfg.nameservers = vec![dns_addr];
        cfg
    })?;
    s.edge.wait_for_log(Duration::from_secs(10), |l| {
        l.contains("key servers discovered")
    })?;
    s.edge.s_client(SITE).run()?.expect_verified()?;

    let load = s.handshake_load(1, 30.0)?;
    load.phase("first");
    let (a0, b0) = (s.keyserver.ops_ok()?, b.ops_ok()?);
    run_for(Duration::from_secs(1));
    ensure!(
        s.keyserver.ops_ok()? > a0 && b.ops_ok()? == b0,
        "before the change, only the SRV target should sign"
    );

    // New records (a new dnsmasq on the same address): after the TTL, new requests
    // go to the new target, with no edge restart.
    load.phase("changed");
    dns.stop()?;
    let changed = Instant::now();
    let _dns = srv_dns(&logs, Some(dns_addr), "ks2.test", b.addr().port())?;
    let moved = wait_until(
        Duration::from_secs(15),
        "requests on the new SRV target",
        || Ok(b.ops_ok()? > b0),
    )?;
    let a1 = s.keyserver.ops_ok()?;
    run_for(Duration::from_secs(1));
    let outcomes = load.stop()?;
    report(&outcomes);
    eprintln!("moved {moved:?} after the records changed (TTL {SRV_TTL} s)");
    ensure!(
        s.keyserver.ops_ok()? == a1,
        "the old SRV target still signs after the move"
    );
    ensure!(
        changed.elapsed() >= Duration::from_secs(1),
        "moved before the old answer's TTL could expire"
    );
    none_failed(&outcomes, "first")?;
    none_failed(&outcomes, "changed")?;
    Ok(())
}

#[test]
fn a_draining_key_server_finishes_in_flight_and_gets_nothing_new() -> Result<()> {
    let (mut s, extra) = fleet((10, 1), &[(10, 1)])?;
    let b = &extra[0];

    let load = s.handshake_load(4, 40.0)?;
    load.phase("before");
    run_for(Duration::from_secs(1));
    load.phase("drain");
    let b0 = b.ops_ok()?;
    s.keyserver.signal(Signal::Term)?;
    // The edge closes its connections once nothing is owed: the key server exits then,
    // long before its shutdown timeout.
    let status = s
        .keyserver
        .wait_exit(Duration::from_secs(5))
        .context("the draining key server did not exit: the edge kept its connections")?;
    ensure!(status.success(), "the key server exited with {status}");
    run_for(Duration::from_secs(1));
    let outcomes = load.stop()?;
    report(&outcomes);
    none_failed(&outcomes, "before")?;
    none_failed(&outcomes, "drain")?;
    ensure!(b.ops_ok()? > b0, "the other server took no traffic");

    // Nothing reached the draining server after it said go-away: every operation it
    // audited after the drain began had been sent before (answered within a moment).
    let log = s.keyserver.log();
    let drain_line = log
        .lines()
        .position(|l| l.contains("SIGTERM: draining"))
        .context("no drain line in the key server log")?;
    let late: Vec<&str> = log
        .lines()
        .skip(drain_line)
        .filter(|l| l.contains("audit") && has_field(l, "result", "ok"))
        .collect();
    ensure!(
        late.len() <= 16,
        "{} operations reached the key server after it started draining:\n{}",
        late.len(),
        late.join("\n")
    );
    s.edge.wait_for_log(Duration::from_secs(1), |l| {
        l.contains("key server draining")
    })?;
    s.edge.assert_no_panic();
    Ok(())
}

#[test]
fn a_reference_protocol_group_signs_bare_digests_with_a_local_chain() -> Result<()> {
    let backends = StackBuilder::default().backends_with_origin_config(|t| {
        t.insert("require_handshake_context".into(), false.into());
    })?;
    let chain = backends
        .deployment
        .keys_dir()
        .join(format!("{SITE}-ecdsa.crt"));
    let servers = [(backends.keyserver.addr(), 10, 1)];
    let s = backends.with_edge(|cfg| {
        fast(cfg.group(GROUP, &servers))
            .group_option("protocol", "reference")
            .site_option("chain", chain.display().to_string())
    })?;
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        s.edge
            .curl(SITE)
            .tls(version)
            .get(&s.url(SITE, "/"))?
            .expect_status(200)
            .with_context(|| format!("curl over {version:?} through a reference group"))?;
    }
    // The key server saw only reference requests: signatures over bare digests, and
    // no certificate-chain request (the chain is the site's local file).
    let signs = s.wait_for_audits("ecdsa-sign-sha256", SITE, 1)?;
    ensure!(
        signs.len() >= 2 && signs.iter().all(|l| has_field(l, "context", "digest")),
        "expected bare-digest signatures only:\n{}",
        signs.join("\n")
    );
    let log = s.keyserver.log();
    ensure!(
        !log.lines().any(|l| l.contains("get-certificate-chain")),
        "the edge asked a reference key server for a chain:\n{log}"
    );
    Ok(())
}
