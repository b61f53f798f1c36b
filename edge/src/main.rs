//! `keyless-edge`: terminates TLS for customer sites with signatures made by the key
//! server, and proxies requests to the sites' origins. The edge itself is
//! [`keyless_edge::run`]; this is its command line, logging and signals.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use keyless_edge::config::Config;
use keyless_edge::Stop;
use keyless_shared::cli::{exit_with_error, init_logging, LogFormat, ServerArgs};
use std::path::PathBuf;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "keyless-edge",
    version,
    about = "Keyless edge: TLS termination without site keys",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(flatten)]
    args: Option<ServerArgs>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Join a key-server group with a one-time token: make a key pair and CSR here,
    /// prove the token to the key server's enrollment API, write the certificate.
    Enroll(EnrollArgs),
    /// Ask the running edge to reload its configuration (`POST /reload` on its admin
    /// listener, as `SIGHUP` does) and print its answer; exit status 1 when the reload
    /// failed (the edge then keeps its running configuration).
    Reload(ReloadArgs),
}

#[derive(Debug, clap::Args)]
struct ReloadArgs {
    /// The edge's configuration file: its `[listen] admin` and `admin_token` say where
    /// and how to ask (the edge itself reads and checks the whole file).
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// The admin listener, `host:port`. Default: `[listen] admin` of --config.
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct EnrollArgs {
    /// The key server's enrollment API (`enroll_listen`), `host:port`.
    #[arg(long)]
    server: String,
    /// CA certificate(s) the key server's certificate chains to (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Name the key server's certificate must carry. Default: the host of --server.
    #[arg(long)]
    server_name: Option<String>,
    /// The id this edge enrolls as (its certificate's CN and DNS name).
    #[arg(long)]
    id: String,
    /// File holding the bootstrap token (`keyless-origin token create` printed it).
    #[arg(long)]
    token_file: PathBuf,
    /// Directory for `edge.key` (0600), `edge.crt`, `edge-ca.crt` and a copy of --ca.
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    keyless_shared::process::disable_core_dumps_or_exit("keyless-edge");
    let cli = Cli::parse();
    let result = match (cli.command, cli.args) {
        (Some(Command::Enroll(args)), _) => {
            let _logs = init_logging(LogFormat::Human, None);
            enroll(args)
        }
        (Some(Command::Reload(args)), _) => reload(args),
        (None, Some(args)) => run(args),
        (None, None) => Err(anyhow::anyhow!("--config is required (see --help)")),
    };
    if let Err(e) = result {
        exit_with_error("keyless-edge", e.as_ref());
    }
}

/// `keyless-edge enroll`: writes the credential and prints the configuration lines.
fn enroll(args: EnrollArgs) -> anyhow::Result<()> {
    use keyless_edge::enroll::{EnrollServer, Enrolled};
    let text = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("cannot read the token file {}", args.token_file.display()))?;
    let token = keyless_shared::enroll::Token::parse(&text)
        .with_context(|| format!("{}", args.token_file.display()))?;
    let host = match args.server_name.clone() {
        Some(name) => name,
        None => args
            .server
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .context("--server must be host:port")?,
    };
    let server = EnrollServer {
        addr: args.server.clone(),
        server_name: rustls::pki_types::ServerName::try_from(host.clone())
            .with_context(|| format!("{host:?} is not a valid server name"))?,
        ca: args.ca.clone(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let Enrolled { response, .. } = runtime.block_on(keyless_edge::enroll::enroll(
        &server, &token, &args.id, &args.out,
    ))?;
    // Absolute paths in the printed lines: edge.toml may live anywhere.
    let out = std::fs::canonicalize(&args.out).unwrap_or_else(|_| args.out.clone());
    let ca_copy = out.join("keyserver-ca.crt");
    if std::fs::canonicalize(&args.ca).ok() != std::fs::canonicalize(&ca_copy).ok() {
        std::fs::copy(&args.ca, &ca_copy).with_context(|| {
            format!("cannot copy {} to {}", args.ca.display(), ca_copy.display())
        })?;
    }
    let expires = keyless_edge::httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(response.not_after),
    );
    eprintln!(
        "enrolled {} in group {}; certificate valid until {expires}; renewed by the edge at 2/3 of its lifetime",
        response.edge_id, response.group
    );
    println!("# Add to edge.toml (and list the group's key servers):");
    println!("[[keyserver.group]]");
    println!("name = {:?}", response.group);
    println!("ca = {:?}", ca_copy.display().to_string());
    println!("cert = {:?}", out.join("edge.crt").display().to_string());
    println!("key = {:?}", out.join("edge.key").display().to_string());
    println!("server_name = {host:?}");
    println!("enroll = {:?}", args.server);
    println!("servers = [{{ addr = \"KEY-SERVER:2407\" }}]");
    Ok(())
}

/// `keyless-edge reload`: prints the edge's answer; an error when it did not reload.
fn reload(args: ReloadArgs) -> anyhow::Result<()> {
    let (admin, token) = keyless_edge::admin::reload_target(&args.config)?;
    let admin = args.admin.unwrap_or(admin);
    let (status, text) = keyless_edge::admin::request_reload(admin, token.as_deref())
        .with_context(|| format!("cannot reach the edge's admin listener {admin}"))?;
    print!("{text}");
    anyhow::ensure!(status == 200, "the edge did not reload (HTTP {status})");
    Ok(())
}

fn run(cli: ServerArgs) -> anyhow::Result<()> {
    let config = Config::load(&cli.config)?;
    let tracing = (!cli.test).then_some((&config.tracing, "keyless-edge"));
    let _logs = init_logging(cli.log_format, tracing);
    if cli.test {
        let summary =
            keyless_edge::check(&config).with_context(|| format!("{}", cli.config.display()))?;
        println!("configuration {} is valid: {summary}", cli.config.display());
        return Ok(());
    }
    let runtime = keyless_edge::runtime().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let stop = signals()?;
        let start = keyless_edge::run::Start {
            path: Some(cli.config.clone()),
            upgrade: cli.upgrade,
        };
        keyless_edge::run(config, start, stop).await
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
