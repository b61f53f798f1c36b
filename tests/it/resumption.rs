//! Cluster-wide resumption with shared ticket keys: a session made on one edge resumes
//! on another edge of the group (real `openssl s_client -sess_out` / `-sess_in`), with
//! no key-server operation for the resumed handshake.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use keyless_tests::{Edge, TlsVersion};

use crate::edge_support::{Stack, StackBuilder, SITE};

/// Waits until `edge` holds its group's ticket keys.
pub(crate) fn wait_for_ticket_keys(edge: &Edge) -> Result<()> {
    edge.wait_for_log(Duration::from_secs(10), |l| {
        l.contains("session-ticket keys of the group in use")
    })
    .map(drop)
}

const REQUEST: &str = "GET / HTTP/1.0\r\nHost: example.com\r\n\r\n";

/// A full handshake with [`SITE`] on `edge` over `version` (verified, answered), its
/// session saved as `path` (`s_client -sess_out`).
pub(crate) fn save_session(edge: &Edge, version: TlsVersion, path: &Path) -> Result<()> {
    edge.s_client(SITE)
        .tls(version)
        .input(REQUEST)
        .arg("-ign_eof")
        .arg("-sess_out")
        .arg(path)
        .run()?
        .expect_verified()
        .with_context(|| format!("full handshake over {version:?}"))?;
    ensure!(path.is_file(), "s_client wrote no session");
    Ok(())
}

/// Offers the session saved as `path` to `edge` (`s_client -sess_in`); the handshake
/// must succeed. Whether it resumed, and the output.
pub(crate) fn offer_session(
    edge: &Edge,
    version: TlsVersion,
    path: &Path,
) -> Result<(bool, String)> {
    let out = edge
        .s_client(SITE)
        .tls(version)
        .input(REQUEST)
        .arg("-ign_eof")
        .arg("-sess_in")
        .arg(path)
        .run()?;
    out.expect_verified()
        .with_context(|| format!("handshake offering a {version:?} session"))?;
    let text = out.text();
    ensure!(
        text.contains("hello from"),
        "no answer over the connection:\n{text}"
    );
    Ok((text.contains("Reused,"), text))
}

#[test]
fn a_ticket_from_edge_a_resumes_on_edge_b_without_a_key_server_operation() -> Result<()> {
    let s = StackBuilder::default().start()?;
    let b = s.another_edge(|c| c)?;
    wait_for_ticket_keys(&s.edge)?;
    wait_for_ticket_keys(&b)?;
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        let session = s.deployment.dir().join(format!("session-{version:?}.pem"));
        save_session(&s.edge, version, &session).context("edge A")?;
        let ops_before = s.key_ops()?;
        let started = Instant::now();
        let (resumed, text) = offer_session(&b, version, &session)?;
        ensure!(
            resumed,
            "edge B did not resume edge A's {version:?} session:\n{text}"
        );
        ensure!(
            s.key_ops()? == ops_before,
            "the resumed {version:?} handshake cost a key-server operation"
        );
        eprintln!("{version:?}: resumed on edge B in {:?}", started.elapsed());
    }
    let metrics = b.metrics_text()?;
    ensure!(
        keyless_tests::metric_sum(&metrics, "keyless_edge_handshakes_resumed_total", &[]) >= 2.0,
        "resumptions not counted on edge B:\n{metrics}"
    );
    ensure!(
        keyless_tests::metric_sum(
            &metrics,
            "keyless_edge_resumptions_total",
            &[("kind", "ticket")]
        ) >= 2.0,
        "ticket resumptions not counted by kind on edge B:\n{metrics}"
    );
    // Both edges seal with the same group key, and say which.
    let sealing_key = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("keyless_edge_ticket_key{") && l.ends_with(" 1"))
            .map(str::to_owned)
    };
    let on_b = sealing_key(&metrics).context("edge B reports no ticket key")?;
    ensure!(
        on_b.contains("group=\"default\"") && on_b.contains("id=\""),
        "{on_b}"
    );
    ensure!(
        sealing_key(&s.edge.metrics_text()?) == Some(on_b.clone()),
        "edges A and B seal with different keys"
    );
    ensure!(
        metrics.contains("keyless_edge_ticket_key_age_seconds{group=\"default\"}"),
        "no ticket key age:\n{metrics}"
    );
    Ok(())
}

/// Makes a TLS 1.3 session on `edge` and saves it as `name`.
fn session_from(s: &Stack, edge: &Edge, name: &str) -> Result<PathBuf> {
    let session = s.deployment.dir().join(name);
    save_session(edge, TlsVersion::Tls13, &session)?;
    Ok(session)
}

/// Offers a TLS 1.3 `session` to `edge`: whether it was resumed.
fn resumes(edge: &Edge, session: &Path) -> Result<bool> {
    Ok(offer_session(edge, TlsVersion::Tls13, session)?.0)
}

#[test]
fn a_ticket_survives_the_restart_of_the_edge_that_made_it() -> Result<()> {
    let s = StackBuilder::default().start()?;
    wait_for_ticket_keys(&s.edge)?;
    let session = session_from(&s, &s.edge, "session-a.pem")?;
    // Edge A restarts (same configuration): its sessions live in the group's keys.
    let config = std::fs::read_to_string(s.edge.config_path())?;
    let mut s = s;
    s.edge.signal(keyless_tests::Signal::Term)?;
    s.edge.wait_exit(Duration::from_secs(15))?;
    s.edge = Edge::start(&s.deployment, &config)?;
    wait_for_ticket_keys(&s.edge)?;
    let b = s.another_edge(|c| c)?;
    wait_for_ticket_keys(&b)?;
    ensure!(
        resumes(&s.edge, &session)?,
        "restarted edge A did not resume its own session"
    );
    ensure!(
        resumes(&b, &session)?,
        "edge B did not resume edge A's session"
    );
    Ok(())
}

#[test]
fn a_ticket_past_the_key_retention_window_gets_a_full_handshake() -> Result<()> {
    // Keys rotate every 2 s and one is kept after its period: a ticket lives at least
    // 2 s and less than 4 s, wherever in a period it was made.
    let s = StackBuilder::default()
        .backends_with_origin_config(|t| {
            let mut tickets = toml::Table::new();
            tickets.insert("rotate_every".into(), "2s".into());
            tickets.insert("previous".into(), 1.into());
            t.insert("tickets".into(), tickets.into());
        })?
        .with_edge(|c| c)?;
    wait_for_ticket_keys(&s.edge)?;
    let session = session_from(&s, &s.edge, "session-old.pem")?;
    std::thread::sleep(Duration::from_millis(4500));
    let before = s.key_ops()?;
    ensure!(
        !resumes(&s.edge, &session)?,
        "a ticket sealed with a retired key was accepted"
    );
    ensure!(
        s.key_ops()? > before,
        "the full handshake made no private-key operation"
    );
    // The ticket from that full handshake is sealed with a current key and resumes.
    let fresh = session_from(&s, &s.edge, "session-new.pem")?;
    ensure!(resumes(&s.edge, &fresh)?, "a fresh ticket did not resume");
    Ok(())
}
