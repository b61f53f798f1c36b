//! The edge when something around it goes wrong: unknown names, a key server that is
//! down or slow, an origin that is down or slow.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keyless_tests::{DelayProxy, KeepAliveClient, KeyServer, TlsVersion};

use crate::edge_support::{stack, StackBuilder, SITE, WILDCARD_NAME};

#[test]
fn unknown_sni_gets_unrecognized_name() -> Result<()> {
    let s = stack()?;
    for name in ["unknown.test", "deep.www.example.com"] {
        let out = s.edge.s_client(name).run()?;
        let text = out.text();
        ensure!(
            !out.handshake_ok()
                && text.contains("unrecognized name")
                && text.contains("alert number 112"),
            "SNI {name}: expected alert unrecognized_name (112):\n{text}"
        );
        let line = s.edge.wait_for_log(Duration::from_secs(5), |l| {
            l.contains("WARN") && l.contains("unknown SNI") && l.contains(name)
        })?;
        ensure!(line.contains(&format!("sni={name}")), "{line}");
        // curl fails the handshake too (exit 35: TLS connect error).
        let out = s.edge.curl(name).get(&s.url(name, "/"))?;
        ensure!(
            out.exit_code == Some(35) && out.status == 0,
            "curl to {name}: exit {:?}, status {}: {}",
            out.exit_code,
            out.status,
            out.stderr
        );
    }
    // Unknown names never reach the key server.
    ensure!(
        !s.keyserver.log().contains("unknown.test"),
        "the key server heard of unknown.test:\n{}",
        s.keyserver.log()
    );
    Ok(())
}

/// Sends SIGKILL to `pid` (a crash, not a shutdown).
fn kill_hard(pid: u32) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -KILL {pid}: {status}");
    Ok(())
}

#[test]
fn key_server_down_fails_handshakes_fast_and_recovers() -> Result<()> {
    // Fast probes, so that the server is back in use soon after it answers again.
    let mut s = StackBuilder::default().backends()?.with_edge(|c| {
        c.keyserver_option("probe_interval", "250ms")
            .keyserver_option("probe_max_interval", "1s")
    })?;
    s.edge
        .curl(SITE)
        .get(&s.url(SITE, "/"))?
        .expect_status(200)?;

    kill_hard(s.keyserver.pid())?;
    s.keyserver.wait_exit(Duration::from_secs(5))?;
    let seen_lines = s.edge.log().lines().count();

    // The chain of SITE is cached, so this fails at signing; WILDCARD_NAME has no chain
    // yet, so that fails at fetching it. Either way: quickly, with a TLS alert.
    for name in [SITE, WILDCARD_NAME] {
        let out = s.edge.s_client(name).run()?;
        ensure!(
            !out.handshake_ok(),
            "handshake for {name} succeeded with the key server down:\n{}",
            out.text()
        );
        ensure!(
            out.elapsed < Duration::from_secs(3),
            "handshake for {name} took {:?} to fail",
            out.elapsed
        );
        let out = s.edge.curl(name).get(&s.url(name, "/"))?;
        ensure!(
            out.exit_code != Some(0) && out.elapsed < Duration::from_secs(3),
            "curl to {name} with the key server down: exit {:?} after {:?}",
            out.exit_code,
            out.elapsed
        );
    }
    // The edge says why, and is still up.
    let warnings: Vec<String> = s
        .edge
        .log()
        .lines()
        .skip(seen_lines)
        .filter(|l| l.contains("WARN"))
        .map(str::to_owned)
        .collect();
    ensure!(
        warnings.iter().any(|l| l.contains(&format!("sni={SITE}"))
            && l.contains("error=")
            && l.to_ascii_lowercase().contains("key server")),
        "no WARN naming the failure for {SITE}; new log lines:\n{}",
        warnings.join("\n")
    );
    ensure!(
        s.edge.is_running(),
        "the edge exited; log:\n{}",
        s.edge.log()
    );
    // Its only key server down, the edge fails closed and says so to load balancers.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = s.edge.healthz()?;
        if status == 503 && body.contains("key-server group default") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "/healthz answered {status} {body:?} with the group's only key server down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A key server is back on the same address: handshakes work again within the
    // edge's reconnect back-off (at most 5 s).
    s.keyserver = KeyServer::start(&s.deployment)?;
    let back = Instant::now();
    loop {
        let out = s.edge.curl(SITE).get(&s.url(SITE, "/"))?;
        if out.exit_code == Some(0) && out.status == 200 {
            break;
        }
        if back.elapsed() > Duration::from_secs(10) {
            bail!(
                "still failing {:?} after the key server came back: {}",
                back.elapsed(),
                out.stderr
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    s.edge
        .s_client(WILDCARD_NAME)
        .run()?
        .expect_verified()
        .context("new name after the key server came back")?;
    s.edge.assert_no_panic();
    Ok(())
}

#[test]
fn origin_down_is_502() -> Result<()> {
    let mut s = stack()?;
    s.edge
        .curl(SITE)
        .get(&s.url(SITE, "/"))?
        .expect_status(200)?;
    s.origin.stop()?;
    let out = s.edge.curl(SITE).get(&s.url(SITE, "/"))?;
    out.expect_status(502)?;
    ensure!(
        out.elapsed < Duration::from_secs(5),
        "502 took {:?}",
        out.elapsed
    );
    Ok(())
}

#[test]
fn origin_slower_than_the_header_timeout_is_504() -> Result<()> {
    let s = StackBuilder::default()
        .edit(|c| c.proxy_option("response_header_timeout", "1s"))
        .start()?;
    let out = s.edge.curl(SITE).get(&s.url(SITE, "/slow?ms=5000"))?;
    out.expect_status(504)?;
    ensure!(
        out.elapsed >= Duration::from_millis(900) && out.elapsed < Duration::from_secs(4),
        "504 after {:?} with a 1 s header timeout",
        out.elapsed
    );
    // A fast enough answer still passes.
    let out = s.edge.curl(SITE).get(&s.url(SITE, "/slow?ms=100"))?;
    out.expect_status(200)?;
    Ok(())
}

/// How long a chunk from the edge to the key server is held once the key server is
/// "slow".
const KEYSERVER_DELAY: Duration = Duration::from_millis(500);

/// The per-attempt limit of the failover test's edge (`[keyserver] timeout`).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_server_that_hangs_mid_request_fails_over_to_the_next_one() -> Result<()> {
    let backends = tokio::task::spawn_blocking(|| StackBuilder::default().backends()).await??;
    let direct = backends.deployment.listen();
    let proxy = DelayProxy::start(direct).await?;
    let via = proxy.addr();
    // The preferred key server is reached through the proxy; the second one directly
    // (the same key server process: what matters is the path that hangs).
    let s = tokio::task::spawn_blocking(move || {
        backends.with_edge(|mut c| {
            c.keyservers = vec![via.to_string(), direct.to_string()];
            c.keyserver_option("timeout", "1s")
        })
    })
    .await??;

    // Healthy: the preferred server answers (chain fetch and signature).
    let client = s.edge.s_client(SITE);
    let first = tokio::task::spawn_blocking(move || client.run()).await??;
    first
        .expect_verified()
        .context("handshake through the healthy preferred server")?;
    ensure!(proxy.delayed_chunks() == 0, "nothing should be held yet");
    let up = |server: std::net::SocketAddr| -> Result<f64> {
        let text = s.edge.metrics_text()?;
        let labels = [("server", server.to_string())];
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Ok(keyless_tests::metric_sum(
            &text,
            "keyless_edge_keyserver_up",
            &labels,
        ))
    };
    ensure!(
        up(via)? == 1.0 && up(direct)? == 1.0,
        "both key servers start up"
    );

    // The preferred server hangs: everything sent to it is held far past every deadline.
    proxy.set_delay(Duration::from_secs(60));
    let mut elapsed = Vec::new();
    for _ in 0..3 {
        let client = s.edge.s_client(SITE);
        let out = tokio::task::spawn_blocking(move || client.run()).await??;
        out.expect_verified()
            .context("a handshake while the preferred key server hangs")?;
        elapsed.push(out.elapsed);
    }
    ensure!(
        proxy.delayed_chunks() > 0,
        "the hung server was never asked: the test did not exercise failover"
    );
    // Three failed requests in a row: the hung server is passed over for a while.
    s.edge
        .wait_for_log(Duration::from_secs(5), |log| {
            log.contains("key server down; no new requests")
        })
        .context("the hung key server was not marked down")?;
    ensure!(
        up(via)? == 0.0 && up(direct)? == 1.0,
        "keyless_edge_keyserver_up should say the hung server is passed over"
    );
    // Each handshake waited one attempt on the hung server, then the next one answered.
    ensure!(
        elapsed
            .iter()
            .all(|t| *t >= ATTEMPT_TIMEOUT && *t < ATTEMPT_TIMEOUT * 5),
        "handshakes took {elapsed:?}: expected one {ATTEMPT_TIMEOUT:?} attempt then failover"
    );
    s.edge.assert_no_panic();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_key_server_does_not_stall_established_connections() -> Result<()> {
    let backends = tokio::task::spawn_blocking(|| StackBuilder::default().backends()).await??;
    let proxy = DelayProxy::start(backends.deployment.listen()).await?;
    let via = proxy.addr();
    let s = tokio::task::spawn_blocking(move || backends.with_edge(|c| c.keyserver_addr(via)))
        .await??;

    // An established HTTP/1.1 keep-alive connection, before the key server slows down.
    let mut conn = KeepAliveClient::connect(s.edge.https_addr(), SITE, &s.edge.client_ca()).await?;
    let first = conn.expect("/", 200).await?;
    ensure!(first.body == s.origin.greeting().as_bytes());

    proxy.set_delay(KEYSERVER_DELAY);
    let handshake = {
        let client = s.edge.s_client(SITE);
        tokio::task::spawn_blocking(move || client.run())
    };
    // Wait until the new handshake's signature request is being held.
    let held = Instant::now();
    while proxy.delayed_chunks() == 0 {
        ensure!(
            held.elapsed() < Duration::from_secs(5),
            "the new handshake never reached the key server"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        let r = conn.expect("/", 200).await?;
        times.push(r.elapsed);
    }
    // The requests ran while the new handshake's signature was outstanding.
    let overlapped = !handshake.is_finished();
    let out = handshake.await??;
    out.expect_verified()
        .context("the handshake through the slow key server")?;
    ensure!(
        out.elapsed >= KEYSERVER_DELAY,
        "the handshake took {:?}: the delay did not apply",
        out.elapsed
    );
    ensure!(
        times.iter().all(|t| *t < Duration::from_millis(300)),
        "requests on the established connection took {times:?} while a handshake waited \
         {KEYSERVER_DELAY:?} for the key server"
    );
    ensure!(
        overlapped,
        "the handshake finished before the five requests did ({times:?}): nothing was \
         measured while the key server was slow"
    );
    s.edge.assert_no_panic();
    Ok(())
}

#[test]
fn client_accepting_none_of_the_sites_key_types_gets_handshake_failure() -> Result<()> {
    let s = stack()?;
    // SITE has ECDSA and RSA keys; this client only takes Ed25519 signatures.
    let out = s
        .edge
        .s_client(SITE)
        .tls(TlsVersion::Tls13)
        .sigalgs("ed25519")
        .run()?;
    let text = out.text();
    ensure!(!out.handshake_ok(), "handshake succeeded:\n{text}");
    ensure!(
        text.contains("alert number 40") && !text.contains("unrecognized name"),
        "{SITE} is a configured site: the failure is the signature algorithms \
         (handshake_failure, 40), not the name:\n{text}\nedge log:\n{}",
        s.edge.log()
    );
    Ok(())
}
