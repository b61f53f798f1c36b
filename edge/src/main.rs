//! `keyless-edge`: terminates TLS for customer sites with signatures made by the key
//! server, and proxies requests to the sites' origins. The edge itself is
//! [`keyless_edge::run`]; this is its command line, logging and signals.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use keyless_edge::config::Config;
use keyless_edge::Stop;
use keyless_shared::cli::{exit_with_error, init_logging, ServerArgs};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "keyless-edge",
    version,
    about = "Keyless edge: TLS termination without site keys"
)]
struct Cli {
    #[command(flatten)]
    args: ServerArgs,
}

fn main() {
    keyless_shared::process::disable_core_dumps_or_exit("keyless-edge");
    let cli = Cli::parse();
    init_logging(cli.args.log_format);
    if let Err(e) = run(cli.args) {
        exit_with_error("keyless-edge", e.as_ref());
    }
}

fn run(cli: ServerArgs) -> anyhow::Result<()> {
    let config = Config::load(&cli.config)?;
    if cli.test {
        let summary =
            keyless_edge::check(&config).with_context(|| format!("{}", cli.config.display()))?;
        println!("configuration {} is valid: {summary}", cli.config.display());
        return Ok(());
    }
    let runtime = keyless_edge::runtime().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let stop = signals()?;
        keyless_edge::run(config, stop).await
    })
}

/// SIGTERM drains the connections, SIGINT stops at once.
fn signals() -> anyhow::Result<impl std::future::Future<Output = Stop>> {
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining connections"); Stop::Drain }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Stop::Now }
        }
    })
}
