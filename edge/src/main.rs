//! `keyless-edge`: terminates TLS for customer sites with signatures made by the key
//! server, and proxies requests to the sites' origins.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use keyless_edge::admin;
use keyless_edge::cache::Cache;
use keyless_edge::config::{Config, KeyServerConfig};
use keyless_edge::keyserver::{ClientConfig, Endpoint, KeyServerClient};
use keyless_edge::metrics::Metrics;
use keyless_edge::proxy::{serve_connection, ClientCtx, Proxy};
use keyless_edge::sites::Sites;
use keyless_edge::tls::{TlsFront, TlsFrontConfig};
use keyless_shared::cli::{exit_with_error, init_logging, ServerArgs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    let sites = Arc::new(
        Sites::new(&config.sites).map_err(|e| anyhow::anyhow!("{}: {e}", cli.config.display()))?,
    );
    let ks_tls = keyserver_tls(&config.keyserver)?;
    let endpoints = endpoints(&config.keyserver)?;
    if cli.test {
        let cache = check_cache(&config.cache)?;
        println!(
            "configuration {} is valid: {} site(s), {} key server(s), {cache}",
            cli.config.display(),
            config.sites.len(),
            endpoints.len()
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyless-edge")
        // Waiting remote signatures take blocking threads (`block_in_place`); config
        // bounds them to half of this.
        .max_blocking_threads(2 * keyless_edge::config::MAX_CONCURRENT_OPS_LIMIT)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, sites, ks_tls, endpoints))
}

/// For `--test`: the cache's disk directory can be created and written; a summary.
fn check_cache(cache: &keyless_edge::config::CacheConfig) -> anyhow::Result<String> {
    if !cache.enabled {
        return Ok("cache off".to_owned());
    }
    let mib = |b: u64| b >> 20;
    let disk = match &cache.disk_dir {
        None => "no disk tier".to_owned(),
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cache disk_dir {}", dir.display()))?;
            let probe = dir.join(format!(".keyless-edge-test-{}", std::process::id()));
            std::fs::write(&probe, b"")
                .with_context(|| format!("cache disk_dir {} is not writable", dir.display()))?;
            let _ = std::fs::remove_file(&probe);
            format!(
                "disk tier {} ({} MiB)",
                dir.display(),
                mib(cache.disk_bytes)
            )
        }
    };
    Ok(format!(
        "cache {} MiB in memory, {disk}",
        mib(cache.memory_bytes)
    ))
}

/// The edge's mTLS client configuration towards key servers (TLS 1.3 only).
fn keyserver_tls(ks: &KeyServerConfig) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&ks.ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: cannot read key-server CA: {e}", ks.ca.display()))?;
    anyhow::ensure!(!cas.is_empty(), "{}: holds no certificate", ks.ca.display());
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| anyhow::anyhow!("{}: unusable CA certificate: {e}", ks.ca.display()))?;
    }
    let chain = CertificateDer::pem_file_iter(&ks.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: cannot read edge certificate: {e}", ks.cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{}: holds no certificate",
        ks.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&ks.key)
        .map_err(|e| anyhow::anyhow!("{}: cannot read edge key: {e}", ks.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            anyhow::anyhow!(
                "{} / {}: unusable edge identity: {e}",
                ks.cert.display(),
                ks.key.display()
            )
        })?;
    Ok(Arc::new(config))
}

fn endpoints(ks: &KeyServerConfig) -> anyhow::Result<Vec<Endpoint>> {
    ks.servers
        .iter()
        .map(|addr| {
            let host = match addr.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => {
                    h.trim_start_matches('[').trim_end_matches(']')
                }
                _ => anyhow::bail!("key server {addr:?} is not host:port"),
            };
            let name = ks.server_name.as_deref().unwrap_or(host);
            let server_name = ServerName::try_from(name.to_owned())
                .map_err(|e| anyhow::anyhow!("key server name {name:?}: {e}"))?;
            Ok(Endpoint {
                addr: addr.clone(),
                server_name,
            })
        })
        .collect()
}

async fn serve(
    config: Config,
    sites: Arc<Sites>,
    ks_tls: Arc<rustls::ClientConfig>,
    endpoints: Vec<Endpoint>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let mut client_config = ClientConfig::new(endpoints, ks_tls);
    client_config.connections_per_server = config.keyserver.connections.get();
    client_config.request_timeout = config.keyserver.timeout;
    client_config.connect_timeout = config.keyserver.connect_timeout;
    let client = Arc::new(
        KeyServerClient::new(client_config).context("cannot start the key-server client")?,
    );
    let front = Arc::new(
        TlsFront::new(
            TlsFrontConfig {
                default_site: config.tls.default_site.clone(),
                handshake_timeout: config.tls.handshake_timeout,
                cert_ttl: config.tls.cert_ttl,
                send_handshake_message: true,
                max_concurrent_ops: config.keyserver.max_concurrent_ops.get(),
            },
            sites.clone(),
            client,
            metrics.clone(),
        )
        .map_err(|e| anyhow::anyhow!(e))?,
    );
    let cache = if config.cache.enabled {
        // Opening the disk tier reads its index: blocking, once, before serving.
        let cache =
            Cache::new(&config.cache, metrics.clone()).context("cannot set up the cache")?;
        tracing::info!(
            memory_bytes = config.cache.memory_bytes,
            disk_dir = ?config.cache.disk_dir,
            disk_bytes = config.cache.disk_dir.as_ref().map(|_| config.cache.disk_bytes),
            "cache ready"
        );
        Some(Arc::new(cache))
    } else {
        None
    };
    let proxy = Arc::new(
        Proxy::new(&config, metrics.clone(), cache.clone())
            .context("cannot set up the origin client")?,
    );

    let https = TcpListener::bind(config.listen.https)
        .await
        .with_context(|| format!("cannot listen on {} (https)", config.listen.https))?;
    let http = match config.listen.http {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (http)"))?,
        ),
        None => None,
    };
    let admin_listener = std::net::TcpListener::bind(config.listen.admin)
        .with_context(|| format!("cannot listen on {} (admin)", config.listen.admin))?;

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(config.proxy.max_connections.get()));
    spawn_admin(admin_listener, metrics.clone(), cache, shutdown.clone())?;
    tracing::info!(
        https = %config.listen.https,
        http = ?config.listen.http,
        admin = %config.listen.admin,
        sites = config.sites.len(),
        keyservers = ?config.keyserver.servers,
        "edge listening"
    );

    let ctx = Accept {
        limit,
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        proxy,
        sites,
        metrics,
    };
    tokio::spawn(ctx.clone().https_loop(https, front));
    if let Some(http) = http {
        tokio::spawn(ctx.clone().http_loop(http));
    }

    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let graceful = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: draining connections"); true }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); false }
    };
    shutdown.cancel();
    tracker.close();
    if graceful
        && tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain timeout: closing remaining connections"
        );
    }
    tracing::info!("edge stopped");
    Ok(())
}

/// Serves the admin listener (`/healthz`, `/metrics`, purge) on a thread and runtime of
/// its own, so that health checks and metrics answer promptly even while client
/// traffic (a handshake flood, say) keeps the main runtime busy.
fn spawn_admin(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    cache: Option<Arc<Cache>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    listener
        .set_nonblocking(true)
        .context("admin listener: cannot set non-blocking")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the admin runtime")?;
    std::thread::Builder::new()
        .name("keyless-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => admin::serve(listener, metrics, cache, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "admin listener unusable"),
                }
            })
        })
        .context("cannot start the admin thread")?;
    Ok(())
}

#[derive(Clone)]
struct Accept {
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    proxy: Arc<Proxy>,
    sites: Arc<Sites>,
    metrics: Arc<Metrics>,
}

impl Accept {
    /// Next client connection, within the connection bound; `None` at shutdown.
    async fn next(
        &self,
        listener: &TcpListener,
    ) -> Option<(
        tokio::net::TcpStream,
        SocketAddr,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        loop {
            let permit = tokio::select! {
                p = self.limit.clone().acquire_owned() => p.ok()?,
                () = self.shutdown.cancelled() => return None,
            };
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        return Some((tcp, peer, permit));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; backing off");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = self.shutdown.cancelled() => return None,
            }
        }
    }

    async fn https_loop(self, listener: TcpListener, front: Arc<TlsFront>) {
        while let Some((tcp, peer, permit)) = self.next(&listener).await {
            let me = self.clone();
            let front = front.clone();
            let local_addr = tcp.local_addr().unwrap_or(peer);
            self.tracker.spawn(async move {
                let _permit = permit;
                let Ok((tls, site)) = front.accept(tcp, peer).await else {
                    return;
                };
                me.metrics.connections_active.inc();
                let ctx = ClientCtx {
                    client_addr: peer,
                    scheme: "https",
                    local_addr,
                };
                serve_connection(tls, me.proxy, me.sites, Some(site), ctx, me.shutdown).await;
                me.metrics.connections_active.dec();
            });
        }
    }

    async fn http_loop(self, listener: TcpListener) {
        while let Some((tcp, peer, permit)) = self.next(&listener).await {
            let me = self.clone();
            let local_addr = tcp.local_addr().unwrap_or(peer);
            self.tracker.spawn(async move {
                let _permit = permit;
                me.metrics.connections_active.inc();
                let ctx = ClientCtx {
                    client_addr: peer,
                    scheme: "http",
                    local_addr,
                };
                serve_connection(tcp, me.proxy, me.sites, None, ctx, me.shutdown).await;
                me.metrics.connections_active.dec();
            });
        }
    }
}
