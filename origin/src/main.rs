//! `keyless-origin`: the key server. It holds the site private keys and performs every
//! private-key operation for the edges, over mutual TLS, speaking Keyless protocol v1.
#![forbid(unsafe_code)]

mod config;
mod keys;
mod keystore;
mod metrics;
mod pool;
mod server;
mod tls;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use clap::Parser;
use keyless_shared::cli::{exit_with_error, init_logging, ServerArgs};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::keystore::Keystore;
use crate::metrics::Metrics;
use crate::server::Shared;

#[derive(Debug, Parser)]
#[command(name = "keyless-origin", version, about = "Keyless key server")]
struct Cli {
    #[command(flatten)]
    args: ServerArgs,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.args.log_format);
    if let Err(e) = run(cli.args) {
        exit_with_error("keyless-origin", e.as_ref());
    }
}

fn run(cli: ServerArgs) -> anyhow::Result<()> {
    let config = Config::load(&cli.config)?;
    let tls = tls::server_config(&config.tls)?;
    let store = Keystore::load(&config.keys.dir, &config.keys.acl)?;
    if cli.test {
        println!(
            "configuration {} is valid: {} site key(s)",
            cli.config.display(),
            store.len()
        );
        return Ok(());
    }
    if store.len() == 0 {
        tracing::warn!(dir = %config.keys.dir.display(), "no site keys loaded");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyless-io")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, cli.config, tls, store))
}

async fn serve(
    config: Config,
    config_path: PathBuf,
    tls: Arc<rustls::ServerConfig>,
    store: Keystore,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    metrics.keystore(&store);
    let pool = pool::Pool::start(config.worker_count()).context("cannot start worker threads")?;
    let shared = Arc::new(Shared {
        keystore: RwLock::new(Arc::new(store)),
        metrics: metrics.clone(),
        pool,
        require_handshake_context: config.require_handshake_context,
        max_in_flight: config.max_in_flight_per_connection.get(),
        handshake_timeout: config.handshake_timeout,
        idle_timeout: config.idle_timeout,
    });

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("cannot listen for metrics on {}", config.metrics_listen))?;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::spawn(metrics::serve(
        metrics_listener,
        metrics.clone(),
        shutdown.clone(),
    ));
    tracing::info!(
        listen = %config.listen,
        metrics = %config.metrics_listen,
        keys = shared.keystore().len(),
        workers = config.worker_count(),
        require_handshake_context = config.require_handshake_context,
        "key server listening"
    );

    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let accept = server::accept_loop(
        listener,
        acceptor,
        shared.clone(),
        &config,
        shutdown.clone(),
        tracker.clone(),
    );
    let signals = handle_signals(shared, &config, config_path, shutdown.clone());
    let graceful = tokio::select! {
        () = accept => true,
        graceful = signals => graceful?,
    };
    shutdown.cancel();
    tracker.close();
    if graceful {
        tracing::info!(open = tracker.len(), "draining connections");
        if tokio::time::timeout(config.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "shutdown timeout: closing remaining connections"
            );
        }
    }
    tracing::info!("key server stopped");
    Ok(())
}

/// Reloads on SIGHUP; returns on SIGTERM (`true`, graceful) or SIGINT (`false`).
async fn handle_signals(
    shared: Arc<Shared>,
    config: &Config,
    config_path: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<bool> {
    let mut hup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&shared, config, &config_path).await,
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down gracefully"); return Ok(true) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(false) }
            () = shutdown.cancelled() => return Ok(true),
        }
    }
}

/// Re-reads the keys directory (with the ACL of the running configuration); a failure
/// keeps the current keystore.
async fn reload(shared: &Arc<Shared>, config: &Config, config_path: &std::path::Path) {
    let dir = config.keys.dir.clone();
    let acl = config.keys.acl.clone();
    tracing::info!(config = %config_path.display(), dir = %dir.display(), "SIGHUP: reloading keys");
    let loaded = tokio::task::spawn_blocking(move || Keystore::load(&dir, &acl)).await;
    let label = |result| crate::metrics::ResultLabel { result };
    match loaded {
        Ok(Ok(store)) => {
            let n = store.len();
            shared.install(store);
            shared.metrics.reloads.get_or_create(&label("ok")).inc();
            tracing::info!(keys = n, "keystore reloaded");
        }
        Ok(Err(e)) => {
            shared.metrics.reloads.get_or_create(&label("error")).inc();
            tracing::error!(error = %e, "reload failed; keeping the current keystore");
        }
        Err(e) => {
            shared.metrics.reloads.get_or_create(&label("error")).inc();
            tracing::error!(error = %e, "reload task failed; keeping the current keystore");
        }
    }
}
