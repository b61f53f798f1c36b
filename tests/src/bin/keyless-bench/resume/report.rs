//! The table and the verdict of a `resume` run.

use super::*;

pub(super) fn cores(sample: &Sample, index: usize) -> f64 {
    sample.cpu.get(index).copied().unwrap_or(0.0) / sample.secs.max(f64::MIN_POSITIVE)
}

/// Prints the table and notes; returns the verdict.
pub(super) fn report(setup: &Setup, runs: &mut [Run], key: Key) -> Result<bool> {
    let [full, ticket, session] = runs else {
        bail!("full, ticket and session-id runs expected");
    };
    let full_rate = full.sample.rate();
    let ratio = |rate: f64, full: f64| rate / full.max(f64::MIN_POSITIVE);
    let ticket_ratio = ratio(ticket.sample.rate(), full_rate);
    let session_ratio = ratio(session.sample.rate(), full_rate);
    let errors = [&*full, &*ticket, &*session]
        .iter()
        .map(|r| r.sample.errors)
        .sum::<u64>();
    let pass = full.sample.ops > 0
        && ticket_ratio >= TICKET_TARGET
        && session_ratio >= SESSION_ID_TARGET
        && errors == 0;
    let mut busiest: f64 = 0.0;

    println!();
    println!(
        "{:<11} {:>13} {:>7} {:>8} {:>8} {:>8} {:>7} {:>12} {:>12} {:>12} {:>11}",
        "mode",
        "handshakes/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "resumed",
        "errors",
        "server cores",
        "server ms/hs",
        "client cores",
        "other cores"
    );
    for r in [&mut *full, &mut *ticket, &mut *session] {
        r.sample.latencies_us.sort_unstable();
        let s = &r.sample;
        println!(
            "{:<11} {:>13.0} {:>7.2} {:>8.2} {:>8.2} {:>8.3} {:>7} {:>12.2} {:>12.3} {:>12.2} {:>11.2}",
            r.mode.name(),
            s.rate(),
            ratio(s.rate(), full_rate),
            percentile(&s.latencies_us, 0.50) / 1000.0,
            percentile(&s.latencies_us, 0.99) / 1000.0,
            r.resumed_fraction(),
            s.errors,
            r.server_cpu() / s.secs.max(f64::MIN_POSITIVE),
            r.server_cpu() * 1000.0 / (s.ops.max(1) as f64),
            cores(s, CLIENT),
            s.other_cores(),
        );
        busiest = busiest.max(r.rounds_other.iter().copied().fold(0.0, f64::max));
    }
    println!();
    println!(
        "ratio: handshakes/s of the mode / handshakes/s of full; resumed: fraction of the \
         measured handshakes that resumed; server: the edge(s), the key server and \
         (session-id) Redis, not the test origin"
    );
    for round in 0..full.rounds.len() {
        let at = |r: &Run| r.rounds.get(round).copied().unwrap_or(0.0);
        let other = |r: &Run| r.rounds_other.get(round).copied().unwrap_or(0.0);
        println!(
            "round {}: full {:.0}/s, ticket {:.0}/s ({:.2}), session-id {:.0}/s ({:.2}) \
             (other processes: {:.2} / {:.2} / {:.2} cores)",
            round + 1,
            at(full),
            at(ticket),
            ratio(at(ticket), at(full)),
            at(session),
            ratio(at(session), at(full)),
            other(full),
            other(ticket),
            other(session),
        );
    }
    let names: Vec<String> = std::iter::once("client".to_owned())
        .chain(setup.procs.iter().map(|p| p.name().to_owned()))
        .collect();
    for r in [&*full, &*ticket, &*session] {
        let used: Vec<String> = names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let c = cores(&r.sample, i);
                (c >= 0.005).then(|| format!("{n} {c:.2}"))
            })
            .collect();
        println!("{}: cores by process: {}", r.mode.name(), used.join(", "));
    }
    for r in [&*full, &*ticket, &*session] {
        println!(
            "{}: key-server operations {} for {} full handshakes among {} connections \
             (warm-ups and first handshakes included)",
            r.mode.name(),
            r.keyserver_ops,
            r.all_full,
            r.all
        );
    }
    println!(
        "ticket: the edge counted {:.0} ticket resumptions and {:.0} full handshakes \
         (warm-ups included)",
        ticket.edge("keyless_edge_resumptions_total{kind=\"ticket\"}"),
        ticket.edge("keyless_edge_handshakes_full_total"),
    );
    let kinds: Vec<String> = ["session-redis", "session-memory", "ticket"]
        .iter()
        .map(|k| {
            let series = format!("keyless_edge_resumptions_total{{kind=\"{k}\"}}");
            format!("{k} {:.0}", session.edge(&series))
        })
        .collect();
    println!(
        "session-id: edge B keyless_edge_resumptions_total by kind: {}; full handshakes \
         {:.0} (warm-ups included)",
        kinds.join(", "),
        session.edge("keyless_edge_handshakes_full_total"),
    );
    let ops: Vec<String> = session
        .edge
        .iter()
        .filter_map(|(series, n)| {
            let labels = series.strip_prefix("keyless_edge_session_store_ops_total")?;
            (*n > 0.0).then(|| format!("{labels} {n:.0}"))
        })
        .collect();
    println!(
        "session-id: edge B keyless_edge_session_store_ops_total: {}",
        if ops.is_empty() {
            "none".to_owned()
        } else {
            ops.join(", ")
        }
    );
    let gets = session.edge("keyless_edge_session_store_seconds_count{op=\"get\"}");
    if gets > 0.0 {
        println!(
            "session-id: edge B Redis get round trip {:.3} ms on average ({gets:.0} gets)",
            session.edge("keyless_edge_session_store_seconds_sum{op=\"get\"}") * 1000.0 / gets
        );
    }
    for r in [&*full, &*ticket, &*session] {
        if let Some(e) = &r.sample.first_error {
            println!("{}: first failure: {e}", r.mode.name());
        }
    }
    crate::print_verdict(
        busiest,
        &format!(
            "{}: ratios ticket/full {ticket_ratio:.2} (target >= {TICKET_TARGET:.1}), \
             session-id through Redis/full {session_ratio:.2} (target >= \
             {SESSION_ID_TARGET:.1})",
            key.describe()
        ),
        pass,
        &setup.deployment.logs_dir(),
    );
    Ok(pass)
}
