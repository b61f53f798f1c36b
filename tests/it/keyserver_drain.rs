//! Heartbeat and drain at the key server (PROTOCOL.md, "Extension: heartbeat and
//! drain"): pongs carry the key server's clock and its drain state; SIGTERM closes the
//! listener, sends every open connection a go-away, keeps answering what still
//! arrives, and exits once the edges have closed their connections or at
//! `shutdown_timeout`.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use futures_util::SinkExt;
use keyless_shared::{Message, Opcode, Operation};
use keyless_tests::keys::{random_bytes, KeyAlg};
use keyless_tests::{has_field, ClientError, Deployment, KeyClient, KeyServer, Signal};

use crate::support::{handshake_sign_request, ok_payload, DOMAIN};

const LOG_WAIT: Duration = Duration::from_secs(10);
/// How far the key server's clock may be from the test's: the same host's clock, read
/// a round trip apart, with room for a slow machine.
const CLOCK_SLACK_MS: u64 = 5_000;
/// RSA signs pipelined before SIGTERM: with one worker they take a few hundred
/// milliseconds, so most are still queued when the signal arrives.
const IN_FLIGHT: usize = 300;

/// Writes a variant of `origin.toml` with `shutdown_timeout` and one RSA worker in front
/// of a queue long (in size and deadline) enough that the signs of a test are never
/// refused as `overloaded`.
fn drain_config(d: &Deployment, name: &str, shutdown_timeout: &str) -> Result<PathBuf> {
    d.write_config_variant(name, |t| {
        t.insert("shutdown_timeout".into(), shutdown_timeout.into());
        t.insert("workers".into(), 1.into());
        t.insert("queue_size".into(), 1000.into());
        t.insert("queue_deadline".into(), "60s".into());
    })
}

fn now_ms() -> Result<u64> {
    let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?;
    Ok(u64::try_from(since.as_millis())?)
}

/// Checks that `reply` is a pong echoing `payload`, with a `server-time` within
/// [`CLOCK_SLACK_MS`] of the test's clock between `sent_ms` and `received_ms`, and with
/// `draining` as expected.
fn check_pong(
    reply: &Operation,
    payload: &[u8],
    draining: bool,
    sent_ms: u64,
    received_ms: u64,
) -> Result<()> {
    ensure!(
        reply.opcode == Some(Opcode::Pong) && reply.payload() == payload,
        "not a pong echoing {payload:02x?}: {reply:?}"
    );
    let Some(server_time) = reply.server_time else {
        bail!("pong without server-time: {reply:?}");
    };
    ensure!(
        server_time + CLOCK_SLACK_MS >= sent_ms && server_time <= received_ms + CLOCK_SLACK_MS,
        "server-time {server_time} ms is far from the test's clock ({sent_ms}..{received_ms} ms)"
    );
    ensure!(
        reply.draining == draining,
        "pong says draining = {}, expected {draining}",
        reply.draining
    );
    Ok(())
}

/// Pings with a fresh payload on `client` (nothing else in flight) and checks the pong.
async fn ping_and_check(client: &mut KeyClient, draining: bool) -> Result<()> {
    let payload = random_bytes(16);
    let sent = now_ms()?;
    let pong = client.ping(&payload).await.context("ping")?;
    check_pong(&pong, &payload, draining, sent, now_ms()?)
}

/// Whether `/metrics` shows `keyless_draining` at `value`, and `/healthz` agrees
/// (`503 draining` while draining, for load balancers).
fn draining_gauge_is(server: &KeyServer, value: u8) -> Result<()> {
    let text = server.metrics_text()?;
    let line = format!("keyless_draining {value}");
    ensure!(
        text.lines().any(|l| l == line),
        "no `{line}` in /metrics:\n{text}"
    );
    let (status, body) = keyless_tests::http_get(server.metrics_addr(), "/healthz")?;
    let expected = if value == 1 {
        (503, "draining\n")
    } else {
        (200, "ok\n")
    };
    ensure!(
        (status, body.as_str()) == expected,
        "/healthz answered {status} {body:?} with keyless_draining {value}"
    );
    Ok(())
}

/// Reads `client` until the go-away, keeping the replies that come before it in
/// `replies` (each id once). Every read is bounded by the client's timeout.
async fn until_go_away(
    client: &mut KeyClient,
    replies: &mut HashMap<u32, Operation>,
) -> Result<()> {
    loop {
        let Message { id, op } = client.recv().await.context("waiting for the go-away")?;
        if id == 0 {
            ensure!(
                op.opcode == Some(Opcode::GoAway) && op.payload.is_none(),
                "id 0 is not a bare go-away: {op:?}"
            );
            return Ok(());
        }
        ensure!(replies.insert(id, op).is_none(), "two replies with id {id}");
    }
}

/// How many lines of the key server's log contain `needle`.
fn log_count(server: &KeyServer, needle: &str) -> usize {
    server.log().lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test]
async fn pong_carries_the_server_clock_and_no_drain() -> Result<()> {
    let (d, server) = crate::support::start()?;
    let mut client = KeyClient::connect(&d).await?;
    ping_and_check(&mut client, false).await?;
    // An empty ping too: the pong echoes it as empty, with the clock.
    let sent = now_ms()?;
    let pong = client.ping(&[]).await?;
    check_pong(&pong, &[], false, sent, now_ms()?)?;
    draining_gauge_is(&server, 0)?;
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn sigterm_sends_go_away_answers_requests_in_transit_and_exits_once_closed() -> Result<()> {
    let d = Deployment::init(&[DOMAIN])?;
    let config = drain_config(&d, "origin-drain.toml", "20s")?;
    let mut server = KeyServer::start_with_config(&d, &config)?;
    let rsa = d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let opcode = Opcode::RsaPssSignSha256;
    let mut client = KeyClient::connect(&d).await?;
    ping_and_check(&mut client, false).await?;

    let mut ops = Vec::with_capacity(IN_FLIGHT);
    let mut signed = Vec::with_capacity(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        let (op, payload) = handshake_sign_request(opcode, rsa.ski)?;
        ops.push(op);
        signed.push(payload);
    }
    let ids = client.send_many(ops).await?;
    let mut replies: HashMap<u32, Operation> = HashMap::new();
    // Once the first is answered the key server has read the batch; the rest wait for
    // the one worker when SIGTERM arrives.
    let first = client.recv().await?;
    replies.insert(first.id, first.op);
    server.signal(Signal::Term)?;
    until_go_away(&mut client, &mut replies).await?;
    let before_go_away = replies.len();

    // The listener is closed: new connections are refused and the port can be bound
    // (by the next key server) while this one drains.
    match std::net::TcpStream::connect(d.listen()) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => bail!("a new connection during the drain: {other:?}"),
    }
    drop(
        std::net::TcpListener::bind(d.listen())
            .context("binding the port of the draining key server")?,
    );
    draining_gauge_is(&server, 1)?;

    // The open connection is still served: a sign sent after the go-away, and a ping
    // whose pong says the server drains.
    let (late, late_signed) = handshake_sign_request(opcode, rsa.ski)?;
    let late_id = client.send(late).await?;
    let ping = random_bytes(16);
    let ping_sent = now_ms()?;
    let ping_id = client
        .send(Operation::new(Opcode::Ping, ping.clone()))
        .await?;
    while replies.len() < IN_FLIGHT + 2 {
        let Message { id, op } = client.recv().await.context("replies after the go-away")?;
        ensure!(id != 0, "a second go-away: {op:?}");
        ensure!(replies.insert(id, op).is_none(), "two replies with id {id}");
    }
    let ping_received = now_ms()?;
    eprintln!("{before_go_away} of {IN_FLIGHT} signs answered before the go-away");
    ensure!(
        before_go_away < IN_FLIGHT,
        "all {IN_FLIGHT} signs were answered before the go-away: none was in flight at SIGTERM"
    );
    for (i, (id, payload)) in ids.iter().zip(&signed).enumerate() {
        let reply = replies
            .get(id)
            .with_context(|| format!("no reply to sign {i} (id {id})"))?;
        let sig = ok_payload(reply).with_context(|| format!("sign {i} (id {id})"))?;
        ensure!(
            rsa.verify(opcode, payload, &sig)?,
            "sign {i}: signature does not verify"
        );
    }
    let late_reply = replies.get(&late_id).context("no reply to the late sign")?;
    let sig = ok_payload(late_reply).context("sign sent after the go-away")?;
    ensure!(rsa.verify(opcode, &late_signed, &sig)?);
    let pong = replies.get(&ping_id).context("no pong")?;
    check_pong(pong, &ping, true, ping_sent, ping_received)?;
    ensure!(
        server.is_running(),
        "the key server exited with an edge connection open; log:\n{}",
        server.log()
    );

    // The edge closes (close_notify, then FIN): the key server exits now, long before
    // its 20 s shutdown_timeout.
    let (reader, mut writer) = client.into_parts();
    SinkExt::<Message>::close(&mut writer)
        .await
        .context("closing the connection")?;
    let status = server.wait_exit(Duration::from_secs(5))?;
    drop((reader, writer));
    ensure!(
        status.success(),
        "exit status {status} after the drain; log:\n{}",
        server.log()
    );
    let start = server.wait_for_log(LOG_WAIT, |l| l.contains("SIGTERM: draining"))?;
    ensure!(
        has_field(&start, "connections", "1"),
        "the drain start does not count the open connection: {start}"
    );
    ensure!(log_count(&server, "SIGTERM: draining") == 1);
    ensure!(
        log_count(&server, "drained: every edge connection closed") == 1,
        "no single drain end in the log:\n{}",
        server.log()
    );
    ensure!(log_count(&server, "shutdown timeout") == 0);
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn sigterm_with_an_edge_that_never_closes_exits_at_shutdown_timeout() -> Result<()> {
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
    let d = Deployment::init(&[DOMAIN])?;
    let config = drain_config(&d, "origin-drain-timeout.toml", "2s")?;
    let mut server = KeyServer::start_with_config(&d, &config)?;
    let mut client = KeyClient::connect(&d).await?;
    ping_and_check(&mut client, false).await?;

    let signalled = Instant::now();
    server.signal(Signal::Term)?;
    let mut replies = HashMap::new();
    until_go_away(&mut client, &mut replies).await?;
    ensure!(replies.is_empty(), "replies to nothing: {replies:?}");
    // Served until the timeout, though the edge ignores the go-away.
    ping_and_check(&mut client, true).await?;

    let status = server.wait_exit(SHUTDOWN_TIMEOUT + Duration::from_secs(8))?;
    let took = signalled.elapsed();
    ensure!(
        status.success(),
        "exit status {status} at the shutdown timeout; log:\n{}",
        server.log()
    );
    ensure!(
        took >= SHUTDOWN_TIMEOUT,
        "exited {took:?} after SIGTERM, before its {SHUTDOWN_TIMEOUT:?} shutdown_timeout, \
         with an edge connection open"
    );
    // The connection ended with the process.
    match client.expect_closed().await {
        Ok(extra) => ensure!(extra.is_empty(), "sent after the go-away: {extra:?}"),
        Err(ClientError::Timeout(t)) => bail!("connection still open {t:?} after exit"),
        Err(e) => return Err(e.into()),
    }
    let end = server.wait_for_log(LOG_WAIT, |l| l.contains("shutdown timeout passed"))?;
    ensure!(
        has_field(&end, "connections", "1"),
        "the drain end does not count the open connection: {end}"
    );
    ensure!(log_count(&server, "drained: every edge connection closed") == 0);
    server.assert_no_panic();
    Ok(())
}
