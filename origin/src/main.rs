//! `keyless-origin`: the key server. It holds the site private keys and performs every
//! private-key operation for the edges, over mutual TLS, speaking Keyless protocol v1.
#![forbid(unsafe_code)]

mod admin;
mod config;
mod enroll;
mod keys;
mod keystore;
mod metrics;
mod pkcs11;
mod pool;
mod rotate;
mod server;
mod state;
mod tickets;
mod tls;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::Context;
use clap::Parser;
use keyless_shared::cli::{exit_with_error, init_logging, ServerArgs};
use keyless_shared::handoff;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::keystore::Keystore;
use crate::metrics::Metrics;
use crate::server::Shared;

const PERMISSIVE_WARNING: &str = "require_handshake_context = false: bare digests are signed \
without the TLS handshake message, so every holder of an edge certificate has a signing oracle \
for every key it may use; set it to true unless reference Keyless clients need it";
const DECRYPT_WARNING: &str = "every client allowed to use the key has a raw RSA \
decryption and signing oracle; rustls-based edges never need it";

#[derive(Debug, Parser)]
#[command(
    name = "keyless-origin",
    version,
    about = "Keyless key server",
    after_help = "Enrollment state: keyless-origin token create|list|revoke --config FILE ..., \
                  keyless-origin edges list|revoke --config FILE ... (see --help of each)"
)]
struct Cli {
    #[command(flatten)]
    args: ServerArgs,
}

fn main() {
    // Before any key is read: a core file would hold every site key.
    keyless_shared::process::disable_core_dumps_or_exit("keyless-origin");
    let first = std::env::args().nth(1);
    if first.is_some_and(|a| admin::COMMANDS.contains(&a.as_str())) {
        let cli = admin::AdminCli::parse();
        let _logs = init_logging(keyless_shared::cli::LogFormat::Human, None);
        if let Err(e) = admin::run(cli, &mut std::io::stdout().lock()) {
            exit_with_error("keyless-origin", e.as_ref());
        }
        return;
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli.args) {
        exit_with_error("keyless-origin", e.as_ref());
    }
}

fn run(cli: ServerArgs) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(&cli.config)?);
    let tracing = (!cli.test).then_some((&config.tracing, "keyless-origin"));
    let _logs = init_logging(cli.log_format, tracing);
    let state = state::StateDir::new(&config.state_dir);
    if !cli.test {
        state.ensure()?;
    }
    let rotation = rotate::Rotation::new(&config.tls);
    let rotation_status = match &rotation {
        Some(r) => Some(r.check()?),
        None => None,
    };
    let start_rotation = match (&rotation, &rotation_status) {
        (Some(r), Some(status)) if !cli.test => rotate_at_start(r, status),
        _ => None,
    };
    let tls = tls::build(&config)?;
    let store = Keystore::load(&config.keys)?;
    let warnings = warnings(&config, &store, rotation_status.as_ref());
    if cli.test {
        println!(
            "configuration {} is valid: {} site key(s), require_handshake_context = {}, \
             default_acl = {:?}, identity = {:?}, client CRLs = {}",
            cli.config.display(),
            store.len(),
            config.require_handshake_context,
            config.keys.default_acl,
            config.tls.identity,
            tls.crls,
        );
        println!(
            "state_dir {}, enrollment API {}, TLS files polled every {}",
            config.state_dir.display(),
            config
                .enroll_listen
                .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            humantime_serde::re::humantime::format_duration(config.tls_reload_interval),
        );
        for line in group_report(&config, &store) {
            println!("{line}");
        }
        for line in token_report(&store) {
            println!("{line}");
        }
        println!(
            "{}",
            rotation_report(rotation.as_ref().zip(rotation_status.as_ref()))
        );
        for w in &warnings {
            println!("WARNING: {w}");
        }
        return Ok(());
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    if store.len() == 0 {
        tracing::warn!(dir = %config.keys.dir.display(), "no site keys loaded");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyless-io")
        .build()
        .context("cannot start the async runtime")?;
    let taken = match cli.upgrade {
        true => Some(take_over(&config)?),
        false => None,
    };
    runtime.block_on(serve(
        config,
        cli.config,
        Started {
            tls,
            store,
            rotation,
            start_rotation,
            taken,
        },
    ))
}

/// What `serve` starts from.
struct Started {
    tls: tls::TlsState,
    store: Keystore,
    rotation: Option<rotate::Rotation>,
    start_rotation: Option<bool>,
    /// The sockets taken from the key server this one upgrades.
    taken: Option<handoff::Taken>,
}

/// The listening sockets of the key server serving upgrades on `upgrade_socket`.
fn take_over(config: &Config) -> anyhow::Result<handoff::Taken> {
    let path = config.upgrade_socket.as_ref().context(
        "--upgrade needs upgrade_socket (where the running key server hands over its sockets)",
    )?;
    let taken = handoff::take(path).context("cannot take over from the running key server")?;
    tracing::info!(upgrade_socket = %path.display(), "upgrade: took the listening sockets of the running key server");
    Ok(taken)
}

/// What `--test` prints and a starting key server logs as warnings: settings that
/// weaken it, and configuration that does not do what it seems to.
fn warnings(config: &Config, store: &Keystore, rotation: Option<&rotate::Status>) -> Vec<String> {
    let mut out = Vec::new();
    if rotation.is_some_and(|s| !s.issued_by_ca) {
        out.push(not_issued_by_ca(config));
    }
    for (group, pattern) in unmatched_group_patterns(config, store) {
        out.push(format!(
            "group {group}: key pattern {pattern:?} matches no loaded key"
        ));
    }
    if !config.require_handshake_context {
        out.push(PERMISSIVE_WARNING.to_owned());
    }
    let decrypt_keys: Vec<&str> = store
        .entries()
        .filter(|e| e.allow_rsa_decrypt)
        .map(|e| e.name.as_str())
        .collect();
    if !decrypt_keys.is_empty() {
        out.push(format!(
            "raw RSA decrypt enabled for {}: {DECRYPT_WARNING}",
            decrypt_keys.join(", ")
        ));
    }
    out
}

/// Rotates the key server's certificate before the listeners open when it has less than
/// half of `rotate_every` left (or none). `Some(ok)` when a rotation was tried; a failed
/// one is logged and the current certificate used, the watch task trying again.
fn rotate_at_start(rotation: &rotate::Rotation, status: &rotate::Status) -> Option<bool> {
    let now = SystemTime::now();
    if rotation.due(now, &status.current) > now {
        return None;
    }
    match rotation.rotate() {
        Ok(rotated) => {
            let next = rotation.due(now, &rotated.new);
            watch::log_rotated(&rotated, "start", Some(next));
            Some(true)
        }
        Err(e) => {
            tracing::error!(error = %e, "key server certificate rotation at start failed; starting with the current certificate");
            Some(false)
        }
    }
}

fn not_issued_by_ca(config: &Config) -> String {
    format!(
        "[tls] cert {} was not issued by [tls] ca_cert {}: from the first rotation on, edges must trust that CA for this key server",
        config.tls.cert.display(),
        config.tls.ca_cert.as_deref().unwrap_or(Path::new("-")).display()
    )
}

/// The `--test` line on certificate rotation.
fn rotation_report(rotation: Option<(&rotate::Rotation, &rotate::Status)>) -> String {
    use humantime_serde::re::humantime::{format_duration, format_rfc3339_seconds};
    let Some((rotation, status)) = rotation else {
        return "certificate rotation: off ([tls] rotate_every not set)".to_owned();
    };
    let now = SystemTime::now();
    let due = rotation.due(now, &status.current);
    let next = if due <= now {
        "at start (less than half of rotate_every left)".to_owned()
    } else {
        let secs = due.duration_since(now).map(|d| d.as_secs()).unwrap_or(0);
        format!(
            "{} (in {})",
            format_rfc3339_seconds(due),
            format_duration(std::time::Duration::from_secs(secs))
        )
    };
    format!(
        "certificate rotation: on, every {} by CA {}; current certificate serial {}, not after {}; next rotation due {next}",
        format_duration(rotation.every()),
        rotation.ca_cert().display(),
        status.current.serial,
        format_rfc3339_seconds(status.current.not_after),
    )
}

/// `(group, pattern)` for every group key pattern that names no key of `store`.
fn unmatched_group_patterns(config: &Config, store: &Keystore) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in &config.groups {
        for p in g.keys.iter().flatten() {
            if !store.entries().any(|e| config::glob_match(p, &e.name)) {
                out.push((g.name.clone(), p.clone()));
            }
        }
    }
    out
}

/// For `--test`: per PKCS#11 token, each key found on it (label, SKI, algorithm, the
/// names its certificate covers).
fn token_report(store: &Keystore) -> Vec<String> {
    let mut tokens: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for e in store.entries() {
        let Some(token) = &e.token else {
            continue;
        };
        let names = e
            .chain
            .as_ref()
            .map_or_else(|| "no certificate".to_owned(), |c| c.names.join(", "));
        tokens.entry(token.name()).or_default().push(format!(
            "  key {:?} ski {} {} ({names})",
            e.name,
            e.key.ski,
            e.key.algorithm.name()
        ));
    }
    let mut out = Vec::new();
    for (token, mut keys) in tokens {
        keys.sort();
        out.push(format!("PKCS#11 token {token}: {} key(s)", keys.len()));
        out.extend(keys);
    }
    out
}

/// One line per group for `--test`.
fn group_report(config: &Config, store: &Keystore) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(ca) = &config.tls.client_ca {
        lines.push(format!(
            "group (implicit, certificates without a group URI): CA {}, every key, no enrollment",
            ca.display()
        ));
    }
    for g in &config.groups {
        let mut names: Vec<&str> = store
            .entries()
            .filter(|e| g.allows_key(&e.name))
            .map(|e| e.name.as_str())
            .collect();
        names.sort_unstable();
        lines.push(format!(
            "group {}: CA {}{}, {}, keys {} ({}), cert_lifetime {}, max_clock_offset {}",
            g.name,
            g.ca_cert.display(),
            if g.previous_ca_certs.is_empty() {
                String::new()
            } else {
                format!(" (+{} previous)", g.previous_ca_certs.len())
            },
            if g.ca_key.is_some() {
                "enrolls edges"
            } else {
                "checks edges only (no ca_key)"
            },
            g.keys
                .as_ref()
                .map_or_else(|| "all".to_owned(), |k| format!("{k:?}")),
            names.join(", "),
            humantime_serde::re::humantime::format_duration(g.cert_lifetime),
            humantime_serde::re::humantime::format_duration(g.max_clock_offset),
        ));
    }
    lines
}

async fn serve(config: Arc<Config>, config_path: PathBuf, started: Started) -> anyhow::Result<()> {
    let Started {
        tls,
        store,
        rotation,
        start_rotation,
        mut taken,
    } = started;
    let shared = Arc::new(shared_state(&config, tls, store)?);
    if let Some(ok) = start_rotation {
        watch::count_start_rotation(&shared, ok);
    }
    // Before the port opens: whoever sees it open may signal, and a signal not yet
    // caught would kill the process.
    let mut signals = Signals::install()?;
    let (listener, enroll_listener, metrics_listener) = bind(&config, taken.as_mut())?;
    let offered = offer_upgrades(
        &config,
        &listener,
        enroll_listener.as_ref(),
        &metrics_listener,
    )?;
    // The hard stop: connections close at once (SIGINT, or the end of a drain).
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::spawn(metrics::serve(
        metrics_listener,
        shared.metrics.clone(),
        shutdown.clone(),
    ));
    // Enrollment stops with the Keyless listener: a draining key server issues nothing.
    let stop_enroll = shutdown.child_token();
    if let Some(listener) = enroll_listener {
        let service = Arc::new(enroll::Enroll::new(
            shared.clone(),
            state::StateDir::new(&config.state_dir),
        ));
        tokio::spawn(enroll::serve(listener, service, stop_enroll.clone()));
    }
    tokio::spawn(watch::watch(shared.clone(), rotation, shutdown.clone()));
    tracing::info!(
        listen = %config.listen,
        metrics = %config.metrics_listen,
        keys = shared.keystore().len(),
        workers = config.worker_count(),
        require_handshake_context = config.require_handshake_context,
        default_acl = ?config.keys.default_acl,
        identity = ?config.tls.identity,
        client_crls = shared.tls().crls,
        groups = config.groups.len(),
        enroll = ?config.enroll_listen,
        "key server listening"
    );

    let accept = server::accept_loop(
        listener,
        shared.clone(),
        &config,
        shutdown.clone(),
        tracker.clone(),
    );
    let mut upgrades = handoff::Upgrades::start(taken, offered)?;
    let stop = tokio::select! {
        // Only ends on `shutdown`, which is cancelled below.
        () = accept => Stop::Now,
        stop = signals.next_stop(&shared, &config_path) => stop,
        () = upgrades.handed_off() => {
            tracing::info!("upgrade: a new key server serves; draining connections");
            Stop::Drain
        }
    };
    upgrades.stop();
    // The accept loop, and with it the listener, was dropped with the select: from here
    // on new connections are refused and a new key server may bind the port.
    tracker.close();
    stop_enroll.cancel();
    if stop == Stop::Drain {
        drain(&shared, &tracker, &mut signals, &config, &config_path).await;
    }
    shutdown.cancel();
    upgrades.linger().await;
    tracing::info!("key server stopped");
    Ok(())
}

/// The Keyless, enrollment and metrics listeners, taken from the key server this one
/// upgrades (`taken`) or bound. Enrollment binds before the Keyless listener: whoever
/// sees that port open finds enrollment open.
fn bind(
    config: &Config,
    mut taken: Option<&mut handoff::Taken>,
) -> anyhow::Result<(
    tokio::net::TcpListener,
    Option<tokio::net::TcpListener>,
    tokio::net::TcpListener,
)> {
    let mut listener = |name: &str, addr: std::net::SocketAddr, what: &str| {
        let std = handoff::tcp_listener(taken.as_deref_mut(), name, addr)
            .with_context(|| format!("cannot listen {what}on {addr}"))?;
        anyhow::Ok(tokio::net::TcpListener::from_std(std)?)
    };
    let enroll = match config.enroll_listen {
        Some(addr) => Some(listener("enroll", addr, "for enrollment ")?),
        None => None,
    };
    let keyless = listener("keyless", config.listen, "")?;
    let metrics = listener("metrics", config.metrics_listen, "for metrics ")?;
    Ok((keyless, enroll, metrics))
}

/// The listening sockets to offer a later upgrade, when `upgrade_socket` is set.
fn offer_upgrades(
    config: &Config,
    keyless: &tokio::net::TcpListener,
    enroll: Option<&tokio::net::TcpListener>,
    metrics: &tokio::net::TcpListener,
) -> anyhow::Result<Option<handoff::Offer>> {
    use std::os::fd::AsFd;
    let Some(path) = &config.upgrade_socket else {
        return Ok(None);
    };
    let mut named = vec![("keyless", keyless.as_fd()), ("metrics", metrics.as_fd())];
    if let Some(enroll) = enroll {
        named.push(("enroll", enroll.as_fd()));
    }
    let offer = handoff::Offer::new(path, &named).context("cannot copy the listening sockets")?;
    Ok(Some(offer))
}

/// The state every connection shares: metrics, the worker pool, the keystore and TLS
/// configuration, and the limits of the configuration.
fn shared_state(config: &Config, tls: tls::TlsState, store: Keystore) -> anyhow::Result<Shared> {
    let metrics = Arc::new(Metrics::new());
    store.report(&metrics);
    let pool = pool::Pool::start(
        "keyless-crypto",
        config.worker_count(),
        config.queue_size.get(),
        config.queue_deadline,
        metrics.clone(),
    )
    .context("cannot start worker threads")?;
    Ok(Shared {
        keystore: RwLock::new(Arc::new(store)),
        tls: RwLock::new(Arc::new(tls)),
        tls_generation: tokio::sync::watch::Sender::new(0),
        rebuild_lock: tokio::sync::Mutex::new(()),
        metrics,
        pool,
        require_handshake_context: config.require_handshake_context,
        identity: config.tls.identity,
        max_in_flight: config.max_in_flight_per_connection.get(),
        handshake_timeout: config.handshake_timeout,
        idle_timeout: config.idle_timeout,
        stall_timeout: config.stall_timeout,
        drain: CancellationToken::new(),
        tickets: tickets::TicketKeys::new(
            config
                .tickets
                .secret_dir
                .clone()
                .unwrap_or_else(|| config.state_dir.join("tickets")),
            config.tickets.rotate_every,
            config.tickets.previous,
        ),
    })
}

/// Drains after SIGTERM, the listener already closed: every open connection is told
/// to go away and served until its edge closes it. Returns when the connections of the
/// closed `tracker` have all ended, when `shutdown_timeout` has passed, or on SIGINT;
/// the caller then closes what is left.
async fn drain(
    shared: &Shared,
    tracker: &TaskTracker,
    signals: &mut Signals,
    config: &Config,
    config_path: &Path,
) {
    let timeout = config.shutdown_timeout;
    shared.start_drain();
    tracing::info!(
        connections = tracker.len(),
        ?timeout,
        "SIGTERM: draining; new connections refused, go-away sent on every open connection"
    );
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = tracker.wait() => {
                tracing::info!("drained: every edge connection closed");
                return;
            }
            () = &mut deadline => {
                tracing::warn!(
                    connections = tracker.len(),
                    ?timeout,
                    "drain: shutdown timeout passed; closing the remaining connections"
                );
                return;
            }
            stop = signals.next_stop(shared, config_path) => match stop {
                Stop::Now => {
                    tracing::info!(connections = tracker.len(), "drain: cut short by SIGINT");
                    return;
                }
                Stop::Drain => tracing::info!("SIGTERM: already draining"),
            },
        }
    }
}

/// How the key server is to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: drain the connections, then stop.
    Drain,
    /// SIGINT: stop at once.
    Now,
}

/// The signals the key server handles. Once installed they stay caught for the life of
/// the process, so they are watched during a drain too.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?,
        })
    }

    /// Reloads on every SIGHUP; returns on SIGTERM or SIGINT.
    async fn next_stop(&mut self, shared: &Shared, config_path: &Path) -> Stop {
        loop {
            tokio::select! {
                _ = self.hup.recv() => reload(shared, config_path).await,
                _ = self.term.recv() => return Stop::Drain,
                _ = self.int.recv() => {
                    tracing::info!("SIGINT: shutting down");
                    return Stop::Now;
                }
            }
        }
    }
}

/// Re-reads the keys directory (with the ACL and policy of the running configuration),
/// the `[[group]]`s of `origin.toml` and rebuilds the TLS configuration (key server
/// identity, client CA and CRL, group CAs, revoked edges) for new connections; open
/// connections re-check their certificate. Other settings of `origin.toml` need a
/// restart. A part that fails to load keeps its current state.
async fn reload(shared: &Shared, config_path: &Path) {
    let current = shared.tls().config.clone();
    tracing::info!(config = %config_path.display(), dir = %current.keys.dir.display(), "SIGHUP: reloading keys, groups, TLS configuration and revoked edges");
    let path = config_path.to_owned();
    let keys = current.keys.clone();
    let loaded =
        tokio::task::spawn_blocking(move || (Keystore::load(&keys), Config::load(&path))).await;
    let label = |result| crate::metrics::ResultLabel { result };
    let (store, file) = match loaded {
        Ok(pair) => pair,
        Err(e) => {
            shared.metrics.reloads.get_or_create(&label("error")).inc();
            tracing::error!(error = %e, "reload task failed; keeping the current keystore and TLS configuration");
            return;
        }
    };
    let mut ok = true;
    // The groups of the file on the rest of the running configuration.
    let next = match file {
        Ok(file) => {
            let mut next = (*current).clone();
            next.groups = file.groups;
            Some(next)
        }
        Err(e) => {
            ok = false;
            tracing::error!(error = %e, "origin.toml does not load; keeping the current groups");
            None
        }
    };
    let groups = next.as_ref().unwrap_or(current.as_ref());
    match store {
        Ok(store) => {
            for (group, pattern) in unmatched_group_patterns(groups, &store) {
                tracing::warn!(%group, %pattern, "group key pattern matches no loaded key");
            }
            let n = store.len();
            shared.install(store);
            tracing::info!(keys = n, "keystore reloaded");
        }
        Err(e) => {
            ok = false;
            tracing::error!(error = %e, "keystore reload failed; keeping the current keystore");
        }
    }
    let group_names: Vec<String> = groups.groups.iter().map(|g| g.name.clone()).collect();
    match watch::rebuild(shared, next).await {
        Ok(rebuilt) => {
            tracing::info!(
                client_crls = rebuilt.crls,
                revoked_edges = rebuilt.revoked,
                groups = ?group_names,
                "TLS configuration reloaded"
            );
        }
        Err(e) => {
            ok = false;
            tracing::error!(error = %e, "TLS reload failed; keeping the current TLS configuration and groups");
        }
    }
    let result = if ok { "ok" } else { "error" };
    shared.metrics.reloads.get_or_create(&label(result)).inc();
}
