//! Operating the edge: `--test`, metrics, SIGTERM.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use keyless_tests::{check_edge_config, metric_sum, Deployment, Signal, TlsVersion};

use crate::edge_support::{stack, SITE};

#[test]
fn config_test_mode_accepts_the_generated_config_and_names_a_bad_file() -> Result<()> {
    let d = Deployment::init(&[SITE])?;
    let generated = d.dir().join("edge.toml");
    let out = check_edge_config(&generated)?;
    ensure!(
        out.status.success(),
        "keyless-edge --test {}: {}\n{}{}",
        generated.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = d.dir().join("edge-bad.toml");
    let text = std::fs::read_to_string(&generated)?;
    std::fs::write(
        &bad,
        text.replace("[keyserver]\n", "[keyserver]\nno_such_key = 1\n"),
    )?;
    let out = check_edge_config(&bad)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "--test accepted an unknown key:\n{stderr}"
    );
    ensure!(
        stderr.contains(&bad.display().to_string()) && stderr.contains("no_such_key"),
        "the error should name the file and the key:\n{stderr}"
    );

    // A cache disk directory that cannot be created is named; a short purge token too.
    let blocker = d.dir().join("not-a-dir");
    std::fs::write(&blocker, b"")?;
    for (extra, expected) in [
        (
            format!("\n[cache]\ndisk_dir = {:?}\n", blocker.join("cache")),
            "disk_dir",
        ),
        (
            "\n[cache]\npurge_token = \"short\"\n".to_owned(),
            "purge_token",
        ),
        (
            "\n[sessions]\nredis = [\"http://127.0.0.1:6379\"]\n".to_owned(),
            "is not a redis://host:port URL",
        ),
        (
            "\n[sessions]\nwait = \"5s\"\n".to_owned(),
            "[sessions] wait must be between 1ms and 1s",
        ),
        (
            "\n[sessions]\nredis_mode = \"cluster\"\n".to_owned(),
            "needs at least one redis server",
        ),
    ] {
        let cache_bad = d.dir().join("edge-cache-bad.toml");
        std::fs::write(&cache_bad, format!("{text}{extra}"))?;
        let out = check_edge_config(&cache_bad)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(expected),
            "--test should refuse {extra:?} naming {expected}:\n{stderr}"
        );
    }
    let stdout = String::from_utf8_lossy(&check_edge_config(&generated)?.stdout).into_owned();
    ensure!(
        stdout.contains("cache 256 MiB in memory"),
        "--test should summarize the cache: {stdout}"
    );
    ensure!(
        stdout.contains("sessions in memory, tickets on"),
        "--test should summarize the session store: {stdout}"
    );
    let shared = d.dir().join("edge-sessions.toml");
    std::fs::write(
        &shared,
        format!("{text}\n[sessions]\ntickets = false\nredis = [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]\n"),
    )?;
    let stdout = String::from_utf8_lossy(&check_edge_config(&shared)?.stdout).into_owned();
    ensure!(
        stdout.contains("sessions in memory and 2 redis server(s) (hash), tickets off"),
        "--test should summarize the shared session store: {stdout}"
    );
    Ok(())
}

#[test]
fn metrics_count_handshakes_requests_and_key_server_ops() -> Result<()> {
    let s = stack()?;
    for tls in [TlsVersion::Tls13, TlsVersion::Tls13, TlsVersion::Tls12] {
        s.edge
            .curl(SITE)
            .tls(tls)
            .get(&s.url(SITE, "/"))?
            .expect_status(200)?;
    }
    let _ = s.edge.s_client("unknown.test").run()?;
    let m = s.edge.metrics_text()?;
    let count = |name: &str, labels: &[(&str, &str)]| metric_sum(&m, name, labels);
    let handshakes = "keyless_edge_handshakes_total";
    ensure!(
        count(handshakes, &[("result", "ok"), ("version", "TLSv1_3")]) >= 2.0,
        "TLS 1.3 handshakes not counted:\n{m}"
    );
    ensure!(
        count(handshakes, &[("result", "ok"), ("version", "TLSv1_2")]) >= 1.0,
        "TLS 1.2 handshakes not counted:\n{m}"
    );
    ensure!(
        count(handshakes, &[("result", "unknown-sni")]) >= 1.0,
        "the unknown SNI is not counted:\n{m}"
    );
    ensure!(
        count("keyless_edge_keyserver_ops_total", &[("result", "ok")]) >= 3.0,
        "key-server operations not counted:\n{m}"
    );
    ensure!(
        count(
            "keyless_edge_requests_total",
            &[("status", "200"), ("scheme", "https")]
        ) >= 3.0,
        "requests not counted:\n{m}"
    );
    ensure!(
        m.contains("keyless_edge_origin_seconds"),
        "no origin latency histogram:\n{m}"
    );
    Ok(())
}

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_0() -> Result<()> {
    let mut s = stack()?;
    let slow = {
        let curl = s.edge.curl(SITE);
        let url = s.url(SITE, "/slow?ms=1000");
        std::thread::spawn(move || curl.get(&url))
    };
    // Once the connection is up, the request is at the origin within milliseconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_sum(
        &s.edge.metrics_text()?,
        "keyless_edge_connections_active",
        &[],
    ) < 1.0
    {
        ensure!(
            Instant::now() < deadline,
            "the slow request never connected"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    s.edge.signal(Signal::Term)?;
    let status = s.edge.wait_exit(Duration::from_secs(10))?;
    let out = slow
        .join()
        .map_err(|_| anyhow::anyhow!("curl thread panicked"))??;
    out.expect_status(200)?;
    ensure!(
        status.success(),
        "keyless-edge exited with {status} on SIGTERM"
    );
    Ok(())
}
