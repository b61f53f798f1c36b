//! Reloading the edge's configuration (`SIGHUP`, `keyless-edge reload`) while clients
//! keep making handshakes and requests: sites come and go, nothing in flight notices,
//! the cache survives, and a bad file changes nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keyless_tests::{metric_sum, EdgeConfig, Signal};

use crate::edge_support::{
    kept_alive_requests, no_failed_handshakes, request_loop, Stack, StackBuilder, RSA_SITE, SITE,
};

/// The admin token of the edges of these tests.
const ADMIN_TOKEN: &str = "reload-token-0123456789abcdef";
/// A cacheable path of the test origin.
const CACHED: &str = "/?cc=max-age%3D3600";

/// A stack whose key server has [`SITE`] and [`RSA_SITE`], whose edge serves only
/// [`SITE`]; the edge config with [`RSA_SITE`] too.
fn stack_without_rsa_site() -> Result<(Stack, EdgeConfig)> {
    let with_rsa = Arc::new(std::sync::Mutex::new(None));
    let keep = with_rsa.clone();
    let s = StackBuilder::default()
        .rsa_site()
        .edit(move |c| {
            let c = c.admin_token(ADMIN_TOKEN);
            let mut without = c.clone();
            without.sites.retain(|site| site.domains != [RSA_SITE]);
            *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
            without
        })
        .start()?;
    let config = with_rsa
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .context("the edit ran")?;
    Ok((s, config))
}

#[test]
fn sites_added_and_removed_by_reload_while_clients_see_no_failure() -> Result<()> {
    let (s, with_rsa) = stack_without_rsa_site()?;
    s.edge
        .curl(SITE)
        .get(&s.url(SITE, CACHED))?
        .expect_status(200)?;
    let out = s.edge.curl(RSA_SITE).get(&s.url(RSA_SITE, "/"))?;
    ensure!(out.status == 0, "{RSA_SITE} answered before it was added");

    let load = s.handshake_load(2, 20.0)?;
    let (stop, requests) = request_loop(&s, CACHED);
    let kept_alive = kept_alive_requests(&s, CACHED);
    std::thread::sleep(Duration::from_millis(500));

    // Added by SIGHUP: the new site answers, over a handshake signed by its RSA key.
    load.phase("reload");
    std::fs::write(s.edge.config_path(), with_rsa.to_toml())?;
    s.edge.signal(Signal::Hup)?;
    let log = s.edge.wait_for_log(Duration::from_secs(10), |l| {
        l.contains("configuration reloaded")
    })?;
    ensure!(
        log.contains("added rsa.example.net") && log.contains("by=\"SIGHUP\""),
        "the reload line should name the new site:\n{log}"
    );
    let out = s.edge.curl(RSA_SITE).get(&s.url(RSA_SITE, "/"))?;
    out.expect_status(200)?;

    // Removed through `keyless-edge reload`: its handshakes are refused again and its
    // cached chain is dropped; the other site keeps its own.
    std::thread::sleep(Duration::from_millis(500));
    let without = {
        let mut c = with_rsa.clone();
        c.sites.retain(|site| site.domains != [RSA_SITE]);
        c
    };
    std::fs::write(s.edge.config_path(), without.to_toml())?;
    let out = s.edge.reload_command()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("removed rsa.example.net"),
        "keyless-edge reload: {} {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.contains("1 cached chain(s) dropped"),
        "the removed site's chain should be dropped, the other kept: {stdout}"
    );
    let out = s.edge.curl(RSA_SITE).get(&s.url(RSA_SITE, "/"))?;
    ensure!(
        out.status == 0,
        "{RSA_SITE} still answers after its removal"
    );
    std::thread::sleep(Duration::from_millis(500));

    load.phase("after");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let statuses = requests
        .join()
        .map_err(|_| anyhow::anyhow!("request loop"))?;
    let outcomes = load.stop()?;
    let kept = kept_alive
        .join()
        .map_err(|_| anyhow::anyhow!("curl thread"))??;

    let failed_requests = statuses.iter().filter(|s| **s != 200).count();
    ensure!(
        statuses.len() >= 20 && failed_requests == 0,
        "{failed_requests} of {} requests failed",
        statuses.len()
    );
    no_failed_handshakes(&outcomes)?;
    let answers: Vec<&str> = kept.lines().collect();
    ensure!(
        answers.len() == 40 && answers.iter().all(|l| l.starts_with("200 ")),
        "kept-alive requests: {kept}"
    );
    let connects: u32 = answers
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
        .sum();
    ensure!(
        connects == 1,
        "the kept-alive requests used {connects} connections"
    );

    // The cache survived both reloads.
    let head = s.deployment.dir().join("reload-head.txt");
    s.edge
        .curl(SITE)
        .arg("-D")
        .arg(&head)
        .get(&s.url(SITE, CACHED))?
        .expect_status(200)?;
    let head = std::fs::read_to_string(&head)?;
    ensure!(
        head.to_ascii_lowercase()
            .contains("cache-status: keyless; hit"),
        "a cached object should still be a hit after the reloads:\n{head}"
    );
    let metrics = s.edge.metrics_text()?;
    let ok = metric_sum(
        &metrics,
        "keyless_edge_config_reloads_total",
        &[("result", "ok")],
    );
    ensure!(ok == 2.0, "{ok} successful reloads counted");
    s.edge.assert_no_panic();
    Ok(())
}

#[test]
fn a_bad_config_on_reload_keeps_the_running_one_and_says_why() -> Result<()> {
    let (s, with_rsa) = stack_without_rsa_site()?;
    let good = std::fs::read_to_string(s.edge.config_path())?;
    let load = s.handshake_load(2, 20.0)?;

    // Not a valid configuration: SIGHUP logs why, `keyless-edge reload` says it too.
    let broken = good.replace("[keyserver]\n", "[keyserver]\nno_such_key = 1\n");
    ensure!(broken != good, "the config has a [keyserver] section");
    std::fs::write(s.edge.config_path(), &broken)?;
    s.edge.signal(Signal::Hup)?;
    let log = s.edge.wait_for_log(Duration::from_secs(10), |l| {
        l.contains("configuration reload failed")
    })?;
    ensure!(
        log.contains("no_such_key") && log.contains("the running configuration stays"),
        "the failure should say why:\n{log}"
    );
    let out = s.edge.reload_command()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success() && stdout.contains("reload failed") && stdout.contains("no_such_key"),
        "keyless-edge reload of a broken file: {} {stdout}",
        out.status
    );

    // What takes a restart is refused as a whole, even with a valid new site beside it.
    let mut moved = with_rsa.clone();
    moved.https = keyless_tests::free_addr()?;
    std::fs::write(s.edge.config_path(), moved.to_toml())?;
    let out = s.edge.reload_command()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success() && stdout.contains("[listen] addresses changed"),
        "a changed listener: {stdout}"
    );
    let out = s.edge.curl(RSA_SITE).get(&s.url(RSA_SITE, "/"))?;
    ensure!(out.status == 0, "a refused reload added {RSA_SITE}");

    // A wrong token is refused before anything is read.
    std::fs::write(
        s.edge.config_path(),
        good.replace(ADMIN_TOKEN, "wrong-token-0123456789"),
    )?;
    let out = s.edge.reload_command()?;
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("bad or missing token"),
        "a wrong token: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The running configuration kept serving throughout.
    s.edge
        .curl(SITE)
        .get(&s.url(SITE, "/"))?
        .expect_status(200)?;
    no_failed_handshakes(&load.stop()?)?;
    let metrics = s.edge.metrics_text()?;
    let errors = metric_sum(
        &metrics,
        "keyless_edge_config_reloads_total",
        &[("result", "error")],
    );
    ensure!(errors == 3.0, "{errors} failed reloads counted");
    s.edge.assert_no_panic();
    Ok(())
}
