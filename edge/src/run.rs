//! The edge assembled from its configuration: [`run`] builds every component from its
//! own section of the (already parsed and checked) [`Config`], binds the listeners and
//! serves until told to stop. `keyless-edge` is a thin CLI around it; tests can start
//! an edge in-process with [`Edge::bind`] and [`Edge::serve`].

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keyless_shared::handoff;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::admin::AdminState;
use crate::cache::Cache;
use crate::config::{CacheConfig, Config, MAX_CONCURRENT_OPS_LIMIT, MAX_PENDING_SESSIONS_LIMIT};
use crate::keyserver::ClientConfig;
use crate::metrics::Metrics;
use crate::reload::{self, Lasting, Running};
use crate::serve::{Listeners, LiveFronts};
use crate::sessions::SessionStore;
use crate::sites::Sites;

/// How long a draining edge waits for its connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How the edge is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Stop accepting, let requests in flight finish (up to 10 s), then stop.
    Drain,
    /// Stop now.
    Now,
}

/// The runtime the edge serves on. Waiting remote signatures and session lookups take
/// blocking threads (`block_in_place`); the configuration bounds them to half of the
/// pool.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyless-edge")
        .max_blocking_threads(2 * (MAX_CONCURRENT_OPS_LIMIT + MAX_PENDING_SESSIONS_LIMIT))
        .build()
}

/// How the binary starts the edge.
#[derive(Debug, Default)]
pub struct Start {
    /// The file the configuration was read from: reloaded on `SIGHUP` and `POST
    /// /reload`. None = no reloads.
    pub path: Option<PathBuf>,
    /// Take the listening sockets from the running edge (`[listen] upgrade_socket`)
    /// instead of binding them; it drains once this one serves.
    pub upgrade: bool,
}

/// Serves `config` until `stop` resolves.
pub async fn run(
    config: Config,
    start: Start,
    stop: impl Future<Output = Stop>,
) -> anyhow::Result<()> {
    let edge = match start.upgrade {
        true => Edge::take_over(config).await?,
        false => Edge::bind(config).await?,
    };
    match start.path {
        Some(path) => edge.reloads_from(path),
        None => edge,
    }
    .serve(stop)
    .await
}

/// What `keyless-edge --test` checks beyond parsing: sites, the key-server identity
/// files, the origin client and the cache's disk directory. A one-line summary.
pub fn check(config: &Config) -> anyhow::Result<String> {
    Sites::new(&config.sites)?;
    let ks = ClientConfig::from_config(&config.keyserver, &config.dns)?;
    let cache = check_cache(&config.cache)?;
    let srv = ks
        .groups
        .iter()
        .filter(|g| matches!(g.servers, crate::keyserver::ServerSource::Srv { .. }))
        .count();
    Ok(format!(
        "{} site(s), {} key-server group(s) ({} listed server(s), {srv} by SRV), {cache}, {}",
        config.sites.len(),
        ks.groups.len(),
        ks.static_servers(),
        sessions_summary(&config.sessions),
    ))
}

/// How sessions resume, in a few words.
fn sessions_summary(sessions: &crate::config::SessionsConfig) -> String {
    let tickets = if sessions.tickets {
        "tickets on"
    } else {
        "tickets off"
    };
    match (sessions.redis.len(), sessions.redis_mode) {
        (0, _) => format!("sessions in memory, {tickets}"),
        (n, crate::config::RedisMode::Hash) => {
            format!("sessions in memory and {n} redis server(s) (hash), {tickets}")
        }
        (n, crate::config::RedisMode::Cluster) => {
            format!("sessions in memory and a redis cluster ({n} seed(s)), {tickets}")
        }
    }
}

/// The cache's disk directory can be created and written; a summary.
fn check_cache(cache: &CacheConfig) -> anyhow::Result<String> {
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
                "disk tier {} ({} MiB, objects up to {} MiB streamed)",
                dir.display(),
                mib(cache.disk_bytes),
                mib(cache.disk_max_object_bytes)
            )
        }
    };
    Ok(format!(
        "cache {} MiB in memory, {disk}",
        mib(cache.memory_bytes)
    ))
}

/// An edge with its components built and its listeners bound, not yet serving.
pub struct Edge {
    running: Running,
    lasting: Lasting,
    fronts: Arc<LiveFronts>,
    /// The configuration file reloads read; none = no reloads.
    path: Option<PathBuf>,
    /// The sockets taken from the edge this one upgrades (it drains once told).
    taken: Option<handoff::Taken>,
    https: TcpListener,
    http: Option<TcpListener>,
    admin: std::net::TcpListener,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("https", &self.https.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Edge {
    /// Builds the components and binds the listeners of `config`.
    pub async fn bind(config: Config) -> anyhow::Result<Edge> {
        Edge::build(config, None).await
    }

    /// Builds the components of `config` and takes the listening sockets from the edge
    /// serving upgrades on `[listen] upgrade_socket`.
    pub async fn take_over(config: Config) -> anyhow::Result<Edge> {
        let path = config
            .listen
            .upgrade_socket
            .clone()
            .context("--upgrade needs [listen] upgrade_socket (where the running edge hands over its sockets)")?;
        let taken = handoff::take(&path).context("cannot take over from the running edge")?;
        tracing::info!(upgrade_socket = %path.display(), "upgrade: took the listening sockets of the running edge");
        Edge::build(config, Some(taken)).await
    }

    async fn build(config: Config, mut taken: Option<handoff::Taken>) -> anyhow::Result<Edge> {
        let metrics = Arc::new(Metrics::new());
        let sessions = Arc::new(SessionStore::new(&config.sessions, metrics.clone())?);
        let cache = open_cache(&config.cache, &metrics)?;
        let lasting = Lasting {
            metrics: metrics.clone(),
            cache,
            sessions,
        };
        let (fronts, origin, _) = reload::build(&config, &lasting, None).await?;

        let listen = &config.listen;
        let mut listener = |name: &str, addr: SocketAddr| {
            handoff::tcp_listener(taken.as_mut(), name, addr)
                .with_context(|| format!("cannot listen on {addr} ({name})"))
        };
        let https = TcpListener::from_std(listener("https", listen.https)?)?;
        let http = match listen.http {
            Some(addr) => Some(TcpListener::from_std(listener("http", addr)?)?),
            None => None,
        };
        let admin = listener("admin", listen.admin)?;
        metrics.config_loaded_now();
        Ok(Edge {
            running: Running { config, origin },
            lasting,
            fronts: Arc::new(LiveFronts::new(fronts)),
            path: None,
            taken,
            https,
            http,
            admin,
        })
    }

    /// Reloads the configuration from `path` on `SIGHUP` and `POST /reload`.
    pub fn reloads_from(mut self, path: PathBuf) -> Edge {
        self.path = Some(path);
        self
    }

    /// The address the `https` listener is bound to.
    pub fn https_addr(&self) -> std::io::Result<SocketAddr> {
        self.https.local_addr()
    }

    /// Serves until `stop` resolves, then stops accepting and, for [`Stop::Drain`],
    /// lets the connections finish (up to 10 s).
    pub async fn serve(self, stop: impl Future<Output = Stop>) -> anyhow::Result<()> {
        let shutdown = CancellationToken::new();
        let offered = self.offer_upgrades()?;
        let reload = self.path.map(|path| {
            let (calls, rx) = tokio::sync::mpsc::channel(reload::RELOAD_QUEUE);
            tokio::spawn(reload::serve(
                path,
                self.running.clone(),
                self.fronts.clone(),
                self.lasting.clone(),
                rx,
                shutdown.clone(),
            ));
            calls
        });
        let admin = AdminState {
            metrics: self.lasting.metrics.clone(),
            cache: self.lasting.cache.clone(),
            fronts: self.fronts.clone(),
            reload,
        };
        spawn_admin(self.admin, admin, shutdown.clone())?;
        let config = &self.running.config;
        let listen = &config.listen;
        let keyservers = self.fronts.get().tls.keyservers().clone();
        tracing::info!(
            https = %listen.https,
            http = ?listen.http,
            admin = %listen.admin,
            sites = config.sites.len(),
            keyserver_groups = ?keyservers.groups().map(|g| g.name()).collect::<Vec<_>>(),
            keyservers = ?config.keyserver.static_servers().map(|s| s.as_str()).collect::<Vec<_>>(),
            "edge listening"
        );
        let tracker = TaskTracker::new();
        let listeners = Listeners {
            limit: Arc::new(Semaphore::new(config.proxy.max_connections.get())),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            fronts: self.fronts.clone(),
            metrics: self.lasting.metrics.clone(),
        };
        tokio::spawn(listeners.clone().https(self.https));
        if let Some(http) = self.http {
            tokio::spawn(listeners.http(http));
        }
        let mut upgrades = handoff::Upgrades::start(self.taken, offered)?;
        let how = tokio::select! {
            how = stop => how,
            () = upgrades.handed_off() => {
                tracing::info!("upgrade: a new edge serves; draining connections");
                Stop::Drain
            }
        };
        upgrades.stop();
        shutdown.cancel();
        tracker.close();
        if how == Stop::Drain
            && tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
                .await
                .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "drain timeout: closing remaining connections"
            );
        }
        upgrades.linger().await;
        tracing::info!("edge stopped");
        Ok(())
    }
}

impl Edge {
    /// The listening sockets to offer a later upgrade, when `[listen] upgrade_socket`
    /// is set.
    fn offer_upgrades(&self) -> anyhow::Result<Option<handoff::Offer>> {
        let Some(path) = &self.running.config.listen.upgrade_socket else {
            return Ok(None);
        };
        let mut named = vec![("https", self.https.as_fd()), ("admin", self.admin.as_fd())];
        if let Some(http) = &self.http {
            named.push(("http", http.as_fd()));
        }
        let offer =
            handoff::Offer::new(path, &named).context("cannot copy the listening sockets")?;
        Ok(Some(offer))
    }
}

/// The cache of `[cache]`, if enabled. Opening the disk tier reads its index:
/// blocking, once, before serving.
fn open_cache(config: &CacheConfig, metrics: &Arc<Metrics>) -> anyhow::Result<Option<Arc<Cache>>> {
    if !config.enabled {
        return Ok(None);
    }
    let cache = Cache::new(config, metrics.clone()).context("cannot set up the cache")?;
    tracing::info!(
        memory_bytes = config.memory_bytes,
        disk_dir = ?config.disk_dir,
        disk_bytes = config.disk_dir.as_ref().map(|_| config.disk_bytes),
        disk_max_object_bytes = config.disk_dir.as_ref().map(|_| config.disk_max_object_bytes),
        "cache ready"
    );
    Ok(Some(Arc::new(cache)))
}

/// Serves the admin listener (`/healthz`, `/metrics`, purge) on a thread and runtime of
/// its own, so that health checks and metrics answer promptly even while client
/// traffic (a handshake flood, say) keeps the main runtime busy.
fn spawn_admin(
    listener: std::net::TcpListener,
    state: AdminState,
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
                    Ok(listener) => admin::serve(listener, state, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "admin listener unusable"),
                }
            })
        })
        .context("cannot start the admin thread")?;
    Ok(())
}
