//! The shared session store: session ids (TLS 1.2) and stateful TLS 1.3 sessions made
//! on one edge resume on another through a real Redis, sealed so that Redis holds no
//! secret in clear; a hung or dead Redis costs at most the configured wait; a modified
//! or copied entry gets a full handshake; adding a Redis node keeps most sessions.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use keyless_tests::{
    metric_sum, Edge, EdgeConfig, Redis, ResumeBy, ResumeClient, Signal, TlsVersion,
};

use crate::edge_support::{Stack, StackBuilder, SITE};
use crate::resumption::{offer_session, save_session, wait_for_ticket_keys};

/// `[sessions]` of an edge that stores sessions in `redis` (hash mode), tickets off.
fn stored_in(redis: &[&Redis]) -> impl Fn(EdgeConfig) -> EdgeConfig {
    let urls: Vec<toml::Value> = redis.iter().map(|r| r.url().into()).collect();
    move |c| {
        c.session_option("tickets", false)
            .session_option("redis", toml::Value::Array(urls.clone()))
    }
}

/// A stack whose edge (A) stores sessions in a Redis of its own, and a second edge (B)
/// configured the same, both holding their group's keys.
fn two_edges(redis_wait: Option<&str>) -> Result<(Stack, Edge, Redis)> {
    let backends = StackBuilder::default().backends()?;
    let redis = Redis::start(backends.deployment.dir())?;
    let with_wait = |c: EdgeConfig| match redis_wait {
        Some(w) => c.session_option("wait", w),
        None => c,
    };
    let s = backends.with_edge(|c| with_wait(stored_in(&[&redis])(c)))?;
    let b = s.another_edge(|c| with_wait(stored_in(&[&redis])(c)))?;
    wait_for_ticket_keys(&s.edge)?;
    wait_for_ticket_keys(&b)?;
    Ok((s, b, redis))
}

fn client(edge: &Edge, version: TlsVersion) -> Result<ResumeClient> {
    ResumeClient::new(&edge.client_ca(), SITE, version, ResumeBy::SessionId)
}

fn store_results(edge: &Edge, result: &str) -> Result<f64> {
    Ok(metric_sum(
        &edge.metrics_text()?,
        "keyless_edge_session_store_ops_total",
        &[("result", result)],
    ))
}

/// `openssl sess_id` of a saved session: its master key (TLS 1.2) or resumption secret.
fn master_key(session: &std::path::Path) -> Result<Vec<u8>> {
    let out = std::process::Command::new("openssl")
        .args(["sess_id", "-noout", "-text", "-in"])
        .arg(session)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Master-Key:"))
        .context("no Master-Key in the session")?;
    Ok(hex::decode(hex.trim())?)
}

#[test]
fn session_ids_and_stateful_tls13_sessions_resume_on_another_edge_through_redis() -> Result<()> {
    let (mut s, b, redis) = two_edges(None)?;
    for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
        let session = s.deployment.dir().join(format!("session-{version:?}.pem"));
        save_session(&s.edge, version, &session).context("edge A")?;
        let ops = s.key_ops()?;
        let (resumed, text) = offer_session(&b, version, &session)?;
        ensure!(
            resumed,
            "edge B did not resume edge A's {version:?} session:\n{text}"
        );
        ensure!(
            s.key_ops()? == ops,
            "the resumed {version:?} handshake cost a key-server operation"
        );
    }
    let metrics = b.metrics_text()?;
    ensure!(
        metric_sum(
            &metrics,
            "keyless_edge_resumptions_total",
            &[("kind", "session-redis")]
        ) >= 2.0,
        "edge B did not count its resumptions from Redis:\n{metrics}"
    );
    // Redis holds sealed entries only: no session's master secret in clear.
    let keys = redis.keys("keyless:session:*")?;
    ensure!(!keys.is_empty(), "no session in Redis");
    let secret = master_key(&s.deployment.dir().join("session-Tls12.pem"))?;
    for key in &keys {
        let value = redis.get_raw(key)?;
        ensure!(
            !value.windows(secret.len()).any(|w| w == secret.as_slice()),
            "{key} holds the TLS 1.2 master secret in clear"
        );
    }
    // Edge A restarts with empty memory: its session id still resumes, there and on B.
    let config = std::fs::read_to_string(s.edge.config_path())?;
    s.edge.signal(Signal::Term)?;
    s.edge.wait_exit(Duration::from_secs(15))?;
    s.edge = Edge::start(&s.deployment, &config)?;
    wait_for_ticket_keys(&s.edge)?;
    let session = s.deployment.dir().join("session-Tls12.pem");
    for (name, edge) in [("restarted edge A", &s.edge), ("edge B", &b)] {
        let (resumed, text) = offer_session(edge, TlsVersion::Tls12, &session)?;
        ensure!(resumed, "{name} did not resume the session id:\n{text}");
    }
    Ok(())
}

#[test]
fn a_hung_or_dead_redis_costs_at_most_the_wait() -> Result<()> {
    let (s, b, redis) = two_edges(Some("300ms"))?;
    let wait = Duration::from_millis(300);
    // Sessions made on A while Redis works, offered to B after it stopped answering.
    let visitors: Vec<ResumeClient> = (0..3)
        .map(|_| client(&s.edge, TlsVersion::Tls12))
        .collect::<Result<_>>()?;
    for v in &visitors {
        ensure!(!v.visit(s.edge.https_addr())?, "a first visit resumed");
    }
    // The slowest of a few full handshakes on B, as the baseline of this machine now.
    let mut baseline = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        client(&b, TlsVersion::Tls12)?.visit(b.https_addr())?;
        baseline = baseline.max(started.elapsed());
    }
    redis.signal(Signal::Stop)?;
    let slowest = |clients: &[ResumeClient]| -> Result<Duration> {
        let mut slowest = Duration::ZERO;
        for v in clients {
            let started = Instant::now();
            ensure!(!v.visit(b.https_addr())?, "resumed while Redis was hung");
            slowest = slowest.max(started.elapsed());
        }
        Ok(slowest)
    };
    let hung = slowest(&visitors[..2])?;
    ensure!(
        hung < baseline + wait + Duration::from_millis(500),
        "a handshake took {hung:?} with Redis hung (full handshakes {baseline:?}, wait {wait:?})"
    );
    ensure!(store_results(&b, "timeout")? >= 2.0, "timeouts not counted");
    // New visitors (nothing to look up; their sessions are written in the background).
    for _ in 0..5 {
        let started = Instant::now();
        client(&b, TlsVersion::Tls12)?.visit(b.https_addr())?;
        let took = started.elapsed();
        ensure!(
            took < baseline + Duration::from_millis(500),
            "a new visitor took {took:?} with Redis hung"
        );
    }
    // Dead: refused at once.
    redis.signal(Signal::Cont)?;
    redis.stop()?;
    let dead = slowest(&visitors[2..])?;
    ensure!(
        dead < baseline + wait + Duration::from_millis(500),
        "a handshake took {dead:?} with Redis dead"
    );
    ensure!(
        s.edge.healthz()?.0 == 200,
        "the store made edge A unhealthy"
    );
    b.assert_no_panic();
    Ok(())
}

#[test]
fn a_modified_or_copied_redis_entry_gets_a_full_handshake_and_is_counted() -> Result<()> {
    let (s, b, redis) = two_edges(None)?;
    // One visitor at a time, each leaving one new entry in Redis.
    let mut entries = Vec::new();
    let mut visitors = Vec::new();
    for _ in 0..3 {
        let v = client(&s.edge, TlsVersion::Tls12)?;
        v.visit(s.edge.https_addr())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let key = loop {
            let new: Vec<String> = redis
                .keys("keyless:session:*")?
                .into_iter()
                .filter(|k| !entries.contains(k))
                .collect();
            if let [key] = new.as_slice() {
                break key.clone();
            }
            ensure!(
                Instant::now() < deadline,
                "expected one new entry, found {new:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        entries.push(key);
        visitors.push(v);
    }
    // Modified: one byte of the sealed state changed.
    redis.cli(&["SETRANGE", &entries[0], "40", "x"])?;
    // Copied: visitor 2's entry replaced by visitor 1's.
    redis.cli(&["COPY", &entries[1], &entries[2], "REPLACE"])?;
    let ops = s.key_ops()?;
    ensure!(
        !visitors[0].visit(b.https_addr())?,
        "a modified entry resumed"
    );
    ensure!(
        !visitors[2].visit(b.https_addr())?,
        "an entry copied from another session resumed"
    );
    ensure!(
        s.key_ops()? >= ops + 2,
        "the refused entries did not give full handshakes"
    );
    ensure!(
        store_results(&b, "forged")? == 2.0,
        "refused entries not counted:\n{}",
        b.metrics_text()?
    );
    // The intact one still resumes.
    ensure!(
        visitors[1].visit(b.https_addr())?,
        "an intact entry did not resume"
    );
    ensure!(
        b.log().contains("session-store entry refused"),
        "no log line for the refused entries"
    );
    Ok(())
}

#[test]
fn adding_a_redis_node_keeps_most_sessions() -> Result<()> {
    const VISITORS: usize = 120;
    let backends = StackBuilder::default().backends()?;
    let dir = backends.deployment.dir().to_owned();
    let (r1, r2) = (Redis::start(&dir)?, Redis::start(&dir)?);
    let s = backends.with_edge(stored_in(&[&r1, &r2]))?;
    wait_for_ticket_keys(&s.edge)?;
    let visitors: Vec<ResumeClient> = (0..VISITORS)
        .map(|_| client(&s.edge, TlsVersion::Tls12))
        .collect::<Result<_>>()?;
    for v in &visitors {
        v.visit(s.edge.https_addr())?;
    }
    // Writes are asynchronous: wait until every session is stored.
    let stored = || -> Result<(usize, usize)> {
        Ok((
            r1.keys("keyless:session:*")?.len(),
            r2.keys("keyless:session:*")?.len(),
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while {
        let (a, b) = stored()?;
        a + b < VISITORS
    } {
        ensure!(
            Instant::now() < deadline,
            "sessions not all stored: {:?}",
            stored()?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (on1, on2) = stored()?;
    ensure!(
        on1 > 0 && on2 > 0,
        "the sessions were not spread: {on1} and {on2}"
    );
    // A third node; edge B lists all three (in another order).
    let r3 = Redis::start(&dir)?;
    let b = s.another_edge(stored_in(&[&r3, &r2, &r1]))?;
    wait_for_ticket_keys(&b)?;
    let mut resumed = 0;
    for v in &visitors {
        resumed += usize::from(v.visit(b.https_addr())?);
    }
    let kept = resumed as f64 / VISITORS as f64;
    eprintln!("sessions on the two nodes: {on1} + {on2}; resumed after adding a third: {resumed}/{VISITORS} ({kept:.2}, ideal 0.67)");
    // Rendezvous hashing moves about 1/3 of the keys to the new node: most stay.
    ensure!(
        kept >= 0.5,
        "only {resumed} of {VISITORS} sessions resumed after adding a node"
    );
    ensure!(kept < 1.0, "no session moved to the new node");
    Ok(())
}

#[test]
fn a_redis_cluster_stores_sessions_for_every_edge() -> Result<()> {
    let backends = StackBuilder::default().backends()?;
    let dir = backends.deployment.dir().to_owned();
    let nodes = [
        Redis::start_cluster_node(&dir)?,
        Redis::start_cluster_node(&dir)?,
        Redis::start_cluster_node(&dir)?,
    ];
    Redis::create_cluster(&nodes.iter().collect::<Vec<_>>())?;
    // Each edge knows one seed node; the cluster tells them the rest.
    let cluster = |seed: &Redis| {
        let url = seed.url();
        move |c: EdgeConfig| {
            c.session_option("tickets", false)
                .session_option("redis_mode", "cluster")
                .session_option("redis", toml::Value::Array(vec![url.into()]))
        }
    };
    let s = backends.with_edge(cluster(&nodes[0]))?;
    let b = s.another_edge(cluster(&nodes[2]))?;
    wait_for_ticket_keys(&s.edge)?;
    wait_for_ticket_keys(&b)?;
    let visitors: Vec<ResumeClient> = (0..12)
        .map(|_| client(&s.edge, TlsVersion::Tls12))
        .collect::<Result<_>>()?;
    for v in &visitors {
        v.visit(s.edge.https_addr())?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let ops = s.key_ops()?;
    let mut resumed = 0;
    for v in &visitors {
        resumed += usize::from(v.visit(b.https_addr())?);
    }
    ensure!(
        resumed == visitors.len(),
        "only {resumed} of {} sessions resumed through the cluster",
        visitors.len()
    );
    ensure!(
        s.key_ops()? == ops,
        "resumptions through the cluster cost key-server operations"
    );
    let per_node: Vec<usize> = nodes
        .iter()
        .map(|n| Ok(n.cli(&["DBSIZE"])?.trim().parse::<usize>()?))
        .collect::<Result<_>>()?;
    ensure!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "the cluster did not spread the sessions: {per_node:?}"
    );
    Ok(())
}
