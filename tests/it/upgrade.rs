//! Zero-downtime upgrades: a new process takes the listening sockets of the running
//! one (`--upgrade`, over the upgrade socket), serves, and the old one drains and
//! exits, while clients keep connecting: no connection refused, no request failed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keyless_tests::Signal;

use crate::edge_support::{kept_alive_requests, no_failed_handshakes, request_loop, StackBuilder};

#[test]
fn an_edge_upgrade_refuses_no_connection_and_fails_no_request() -> Result<()> {
    let mut s = StackBuilder::default().start_with_upgrade_socket()?;
    let load = s.handshake_load(2, 20.0)?;
    let (stop, requests) = request_loop(&s, "/");
    let kept_alive = kept_alive_requests(&s, "/");
    std::thread::sleep(Duration::from_millis(700));

    load.phase("upgrade");
    let old_pid = s.edge.pid();
    let next = s.edge.upgrade()?;
    let status = s.edge.wait_exit(Duration::from_secs(15))?;
    ensure!(status.success(), "the old edge exited with {status}");
    let old = std::mem::replace(&mut s.edge, next);
    let drained = old.log();
    ensure!(
        drained.contains("upgrade: a new edge serves; draining connections"),
        "the old edge ({old_pid}) should say it drains:\n{drained}"
    );

    load.phase("after");
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let statuses = requests
        .join()
        .map_err(|_| anyhow::anyhow!("request loop"))?;
    no_failed_handshakes(&load.stop()?)?;
    let failed = statuses.iter().filter(|s| **s != 200).count();
    ensure!(
        statuses.len() >= 20 && failed == 0,
        "{failed} of {} requests failed",
        statuses.len()
    );
    let kept = kept_alive
        .join()
        .map_err(|_| anyhow::anyhow!("curl thread"))??;
    ensure!(
        kept.lines().count() == 40 && kept.lines().all(|l| l.starts_with("200 ")),
        "requests on a kept-alive connection: {kept}"
    );

    // The new edge serves everything, admin listener included, and can be upgraded
    // again.
    ensure!(s.edge.healthz()?.0 == 200, "the new edge's /healthz");
    let again = s.edge.upgrade()?;
    s.edge.wait_exit(Duration::from_secs(15))?;
    s.edge = again;
    s.edge
        .curl(crate::edge_support::SITE)
        .get(&s.url(crate::edge_support::SITE, "/"))?
        .expect_status(200)?;
    s.edge.assert_no_panic();
    Ok(())
}

#[test]
fn a_key_server_upgrade_under_handshakes_costs_no_handshake() -> Result<()> {
    let mut s = StackBuilder::default().keyserver_upgrade_socket().start()?;
    let load = s.handshake_load(2, 20.0)?;
    std::thread::sleep(Duration::from_millis(700));

    load.phase("upgrade");
    let next = s.keyserver.upgrade()?;
    let status = s.keyserver.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "the old key server exited with {status}");
    let old = std::mem::replace(&mut s.keyserver, next);
    ensure!(
        old.log()
            .contains("upgrade: a new key server serves; draining connections"),
        "the old key server should say it drains:\n{}",
        old.log()
    );
    load.phase("after");
    std::thread::sleep(Duration::from_millis(1500));
    let outcomes = load.stop()?;
    no_failed_handshakes(&outcomes)?;
    let after = outcomes.iter().filter(|o| o.phase == "after").count();
    ensure!(after >= 10, "only {after} handshakes after the upgrade");
    ensure!(
        s.keyserver
            .ops_ok()
            .context("the new key server's metrics")?
            > 0,
        "the new key server signed nothing"
    );
    s.keyserver.assert_no_panic();
    s.edge.assert_no_panic();
    Ok(())
}

/// Kills a process the test did not start (an edge's successor) when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// What a service manager does to upgrade a unit whose binary was replaced
/// (`systemctl kill -s USR2`): the edge starts its binary again with `--upgrade`, and
/// the successor (a child of the service, so in it) takes over.
#[test]
fn sigusr2_starts_a_successor_that_takes_over() -> Result<()> {
    let mut s = StackBuilder::default().start_with_upgrade_socket()?;
    let load = s.handshake_load(2, 20.0)?;
    std::thread::sleep(Duration::from_millis(500));
    load.phase("upgrade");
    s.edge.signal(Signal::Usr2)?;
    let line = s.edge.wait_for_log(Duration::from_secs(10), |l| {
        l.contains("SIGUSR2: started the binary again")
    })?;
    let pid: u32 = line
        .split("new_pid=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no pid in {line:?}"))?;
    let _successor = KillOnDrop(pid);
    let status = s.edge.wait_exit(Duration::from_secs(15))?;
    ensure!(status.success(), "the old edge exited with {status}");
    load.phase("after");
    std::thread::sleep(Duration::from_millis(700));
    no_failed_handshakes(&load.stop()?)?;
    ensure!(s.edge.healthz()?.0 == 200, "the successor's /healthz");
    let log = s.edge.log();
    ensure!(
        log.contains("upgrade: serving; the previous process drains and exits"),
        "the successor (its output goes where the edge's went) should say it serves:\n{log}"
    );
    Ok(())
}

/// A process that is not running as the server's user is refused: covered by the
/// handoff's unit tests (peer credentials) — here: `--upgrade` with nothing to take
/// over fails clearly and touches nothing.
#[test]
fn an_upgrade_without_a_running_edge_fails_clearly() -> Result<()> {
    let s = StackBuilder::default().start_with_upgrade_socket()?;
    let sock = s.deployment.dir().join("edge-upgrade.sock");
    std::fs::remove_file(&sock)?;
    let out = std::process::Command::new(keyless_tests::edge_bin()?)
        .arg("--config")
        .arg(s.edge.config_path())
        .arg("--upgrade")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("cannot take over from the running edge"),
        "{}: {stderr}",
        out.status
    );
    ensure!(s.edge.healthz()?.0 == 200, "the running edge still serves");
    Ok(())
}
