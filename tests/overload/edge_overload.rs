//! The edge under a handshake flood while its key server hangs (SIGSTOP) or answers
//! only after 5 s: every handshake ends within the handshake deadline, `/healthz` (ok,
//! or degraded once the key server is marked down) and a cached object on an open
//! connection keep answering fast, and the edge serves normally (and stops on SIGTERM)
//! once the key server is back.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keyless_tests::{
    handshake_flood, metric_sum, DelayProxy, FloodReport, HandshakeEnd, KeepAliveClient, Scripted,
    Signal,
};
use rustls::AlertDescription;

use crate::edge_support::{Stack, StackBuilder, SITE};

/// Handshakes started at once.
const FLOOD: usize = 1000;
/// The edge's handshake deadline in these tests.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Remote signatures the edge lets wait at once in these tests.
const MAX_OPS: usize = 64;
/// What "keeps answering" means for `/healthz` and a cache hit.
const PROBE_BOUND: Duration = Duration::from_millis(100);
/// A cacheable object on the origin.
const CACHED: &str = "/overload-cached";

/// One flood at a time: two would share the machine's cores and measure each other.
static ONE_FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the stack with a short handshake deadline and a small signature bound (the
/// edge reaching its key server through a [`DelayProxy`] if `delayable`), and caches
/// [`CACHED`] over the returned connection.
async fn start(delayable: bool) -> Result<(Stack, KeepAliveClient, Option<DelayProxy>)> {
    let backends = tokio::task::spawn_blocking(|| StackBuilder::default().backends()).await??;
    let proxy = match delayable {
        true => Some(DelayProxy::start(backends.deployment.listen()).await?),
        false => None,
    };
    let via = proxy.as_ref().map(DelayProxy::addr);
    let s = tokio::task::spawn_blocking(move || {
        backends.with_edge(|c| {
            // The handshake deadline, not the longer key-server request timeout, is
            // what ends the waiting handshakes.
            let c = c
                .tls_option("handshake_timeout", "3s")
                .keyserver_option("timeout", "10s")
                .keyserver_option("max_concurrent_ops", MAX_OPS as i64);
            match via {
                Some(addr) => c.keyserver_addr(addr),
                None => c,
            }
        })
    })
    .await??;
    s.origin.script(
        CACHED,
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=600")
            .body("cached body\n")],
    )?;
    let mut conn = KeepAliveClient::connect(s.edge.https_addr(), SITE, &s.edge.client_ca()).await?;
    for _ in 0..2 {
        let r = conn.expect(CACHED, 200).await?;
        ensure!(r.body.as_ref() == b"cached body\n");
    }
    ensure!(
        s.origin.count(CACHED)? == 1,
        "the second GET was not a cache hit"
    );
    Ok((s, conn, proxy))
}

/// Probes `/healthz` (a new connection each time) and [`CACHED`] on `conn` every 20 ms
/// until `flood` ends; returns the flood's report and the slowest probe of each kind.
async fn flood_while_probing(
    s: &Stack,
    conn: &mut KeepAliveClient,
) -> Result<(FloodReport, Duration, Duration, usize)> {
    // The flood gets a runtime and threads of its own, so that the clients' work does
    // not delay the probes' client side.
    let (addr, ca) = (s.edge.https_addr(), s.edge.client_ca());
    let flood = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()?.block_on(handshake_flood(
            addr,
            SITE,
            &ca,
            FLOOD,
            HANDSHAKE_TIMEOUT * 3,
        ))
    });
    let admin = s.edge.admin_addr();
    let (mut worst_health, mut worst_hit, mut probes) = (Duration::ZERO, Duration::ZERO, 0);
    while !flood.is_finished() {
        let started = Instant::now();
        let (status, body) =
            tokio::task::spawn_blocking(move || keyless_tests::http_get(admin, "/healthz"))
                .await??;
        // Once the hung key server is marked down, the edge reports its group degraded.
        ensure!(
            status == 200 || (status == 503 && body.contains("key-server group default")),
            "/healthz answered {status} {body:?} during the flood"
        );
        worst_health = worst_health.max(started.elapsed());
        let hit = conn.expect(CACHED, 200).await?;
        ensure!(hit.body.as_ref() == b"cached body\n");
        worst_hit = worst_hit.max(hit.elapsed);
        probes += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    Ok((report, worst_health, worst_hit, probes))
}

/// Every handshake of the flood ended, none later than the deadline (plus scheduling
/// slack), and most were refused with an alert without waiting for the key server.
fn check_flood(report: &FloodReport) -> Result<()> {
    ensure!(report.outcomes.len() == FLOOD);
    ensure!(
        report.count(&HandshakeEnd::ConnectFailed) == 0,
        "connections failed: {}",
        report.summary()
    );
    let slack = Duration::from_millis(1500);
    ensure!(
        report.count(&HandshakeEnd::Hung) == 0 && report.slowest() <= HANDSHAKE_TIMEOUT + slack,
        "handshakes did not all end within the {HANDSHAKE_TIMEOUT:?} deadline: {}",
        report.summary()
    );
    ensure!(
        report.count(&HandshakeEnd::Established) == 0,
        "handshakes completed without a key server: {}",
        report.summary()
    );
    // At most MAX_OPS wait for a signature; the rest are refused before rustls starts.
    let refused = report.count(&HandshakeEnd::Alert(AlertDescription::InternalError));
    ensure!(
        refused >= FLOOD - MAX_OPS - FLOOD / 10,
        "expected most handshakes refused with internal_error: {}",
        report.summary()
    );
    // A refusal never waited for the key server: had it, the deadline would have
    // closed it instead. How soon it came is the accept and ClientHello work of the
    // whole flood on a shared machine: reported, not asserted.
    let mut refusals: Vec<Duration> = report
        .outcomes
        .iter()
        .filter(|o| o.end == HandshakeEnd::Alert(AlertDescription::InternalError))
        .map(|o| o.elapsed)
        .collect();
    refusals.sort();
    eprintln!(
        "refusals: median {:?}, p90 {:?}; {}",
        refusals[refusals.len() / 2],
        refusals[refusals.len() * 9 / 10],
        report.summary()
    );
    Ok(())
}

fn check_probes(worst_health: Duration, worst_hit: Duration, probes: usize) -> Result<()> {
    ensure!(probes >= 3, "only {probes} probes ran during the flood");
    ensure!(
        worst_health < PROBE_BOUND && worst_hit < PROBE_BOUND,
        "during the flood /healthz took up to {worst_health:?} and a cache hit up to \
         {worst_hit:?} (bound {PROBE_BOUND:?}, {probes} probes)"
    );
    Ok(())
}

/// Handshakes work again (within 10 s), then SIGTERM stops the edge within 15 s.
async fn check_recovery_and_stop(mut s: Stack) -> Result<()> {
    let back = Instant::now();
    loop {
        let edge = &s.edge;
        let out = tokio::task::block_in_place(|| edge.curl(SITE).get(&s.url(SITE, "/")))?;
        if out.exit_code == Some(0) && out.status == 200 {
            break;
        }
        if back.elapsed() > Duration::from_secs(10) {
            bail!(
                "still failing {:?} after the key server recovered: {}\nedge log:\n{}",
                back.elapsed(),
                out.stderr,
                s.edge.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = s.edge.metrics_text()?;
    ensure!(
        metric_sum(&metrics, "keyless_edge_remote_ops_rejected_total", &[]) > 0.0,
        "no refusal counted:\n{metrics}"
    );
    s.edge.assert_no_panic();
    s.edge.signal(Signal::Term)?;
    let status = tokio::task::block_in_place(|| s.edge.wait_exit(Duration::from_secs(15)))
        .context("the edge did not stop on SIGTERM after the flood")?;
    ensure!(status.success(), "the edge exited with {status}");
    Ok(())
}

/// Sends `signal` (e.g. `STOP`, `CONT`) to `pid`.
fn kill(signal: &str, pid: u32) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{signal} {pid}: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_key_server_and_handshake_flood_leave_the_edge_serving() -> Result<()> {
    let _one = ONE_FLOOD.lock().await;
    let (s, mut conn, _) = start(false).await?;
    let pid = s.keyserver.pid();
    kill("STOP", pid)?;
    let flooded = flood_while_probing(&s, &mut conn).await;
    kill("CONT", pid)?;
    let (report, worst_health, worst_hit, probes) = flooded?;
    eprintln!("probes: {probes}, /healthz up to {worst_health:?}, hit up to {worst_hit:?}");
    check_flood(&report)?;
    check_probes(worst_health, worst_hit, probes)?;
    check_recovery_and_stop(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_server_answering_after_5s_and_handshake_flood_leave_the_edge_serving() -> Result<()> {
    let _one = ONE_FLOOD.lock().await;
    let (s, mut conn, proxy) = start(true).await?;
    let proxy = proxy.context("no delay proxy")?;
    proxy.set_delay(Duration::from_secs(5));
    let flooded = flood_while_probing(&s, &mut conn).await;
    proxy.set_delay(Duration::ZERO);
    let (report, worst_health, worst_hit, probes) = flooded?;
    eprintln!("probes: {probes}, /healthz up to {worst_health:?}, hit up to {worst_hit:?}");
    check_flood(&report)?;
    check_probes(worst_health, worst_hit, probes)?;
    check_recovery_and_stop(s).await
}
