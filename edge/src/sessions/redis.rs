//! The Redis side of the session store: several independent servers, each session on
//! the one chosen by rendezvous hashing of its key (adding a server moves about 1/N of
//! the sessions, and every edge computes the same placement), or one Redis Cluster.
//!
//! Connections are made lazily and re-made by the client library when they break;
//! callers bound every operation with their own deadline.

use std::collections::HashMap;
use std::time::Duration;

use hrw_hash::HrwNodes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, RedisResult};

use crate::config::{RedisMode, SessionsConfig};

/// Each connection attempt's deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Each command's deadline inside the client (callers' own deadlines are shorter).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait between two attempts to reach a cluster that could not be reached.
const CLUSTER_RETRY: Duration = Duration::from_secs(1);

/// Where sessions are stored.
pub(crate) enum Remote {
    /// Independent servers by rendezvous hashing.
    Hash {
        ring: HrwNodes<String>,
        servers: HashMap<String, ConnectionManager>,
    },
    /// A Redis Cluster.
    Cluster(Box<LazyCluster>),
}

/// The cluster connection, made on first use and again after a failed attempt.
pub(crate) struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<(Option<ClusterConnection>, Option<tokio::time::Instant>)>,
}

impl Remote {
    /// The store of `config` (its servers must be set). Runs inside the store's runtime:
    /// the connections' tasks are spawned there.
    pub(crate) fn new(config: &SessionsConfig) -> RedisResult<Remote> {
        match config.redis_mode {
            RedisMode::Hash => {
                let mut servers = HashMap::new();
                for url in &config.redis {
                    let client = redis::Client::open(url.as_str())?;
                    let manager = ConnectionManager::new_lazy_with_config(
                        client,
                        ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(CONNECT_TIMEOUT))
                            .set_response_timeout(Some(RESPONSE_TIMEOUT))
                            .set_number_of_retries(2)
                            .set_max_delay(Duration::from_secs(2)),
                    )?;
                    servers.insert(url.clone(), manager);
                }
                Ok(Remote::Hash {
                    ring: HrwNodes::new(config.redis.iter().cloned()),
                    servers,
                })
            }
            RedisMode::Cluster => {
                let client = redis::cluster::ClusterClientBuilder::new(
                    config.redis.iter().map(String::as_str),
                )
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(1)
                .build()?;
                Ok(Remote::Cluster(Box::new(LazyCluster {
                    client,
                    conn: tokio::sync::Mutex::new((None, None)),
                })))
            }
        }
    }

    /// The value stored under `key`.
    pub(crate) async fn get(&self, key: &str) -> RedisResult<Option<Vec<u8>>> {
        match self {
            Remote::Hash { .. } => self.server(key)?.get(key).await,
            Remote::Cluster(c) => c.connection().await?.get(key).await,
        }
    }

    /// The value stored under `key`, deleted in the same step (single-use sessions).
    pub(crate) async fn take(&self, key: &str) -> RedisResult<Option<Vec<u8>>> {
        match self {
            Remote::Hash { .. } => self.server(key)?.get_del(key).await,
            Remote::Cluster(c) => c.connection().await?.get_del(key).await,
        }
    }

    /// Stores `value` under `key` for `ttl` (at least 1 ms).
    pub(crate) async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> RedisResult<()> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        match self {
            Remote::Hash { .. } => self.server(key)?.pset_ex(key, value, ms).await,
            Remote::Cluster(c) => c.connection().await?.pset_ex(key, value, ms).await,
        }
    }

    /// Deletes `key`.
    pub(crate) async fn delete(&self, key: &str) -> RedisResult<()> {
        match self {
            Remote::Hash { .. } => self.server(key)?.del(key).await,
            Remote::Cluster(c) => c.connection().await?.del(key).await,
        }
    }

    /// The connection to the server `key` is placed on (a cheap clone of a multiplexed
    /// connection).
    fn server(&self, key: &str) -> RedisResult<ConnectionManager> {
        let Remote::Hash { ring, servers } = self else {
            unreachable!("hash mode only");
        };
        ring.sorted(&key)
            .next()
            .and_then(|s| servers.get(s))
            .cloned()
            .ok_or_else(|| (redis::ErrorKind::Client, "no redis server configured").into())
    }
}

impl LazyCluster {
    /// The cluster connection, connecting when there is none (at most one attempt per
    /// [`CLUSTER_RETRY`]).
    async fn connection(&self) -> RedisResult<ClusterConnection> {
        let mut state = self.conn.lock().await;
        if let Some(conn) = &state.0 {
            return Ok(conn.clone());
        }
        let now = tokio::time::Instant::now();
        if state.1.is_some_and(|next| now < next) {
            return Err((
                redis::ErrorKind::Io,
                "redis cluster unreachable; retrying soon",
            )
                .into());
        }
        match self.client.get_async_connection().await {
            Ok(conn) => {
                tracing::info!("connected to the redis cluster");
                state.0 = Some(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                state.1 = Some(now + CLUSTER_RETRY);
                Err(e)
            }
        }
    }
}
