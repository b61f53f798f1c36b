//! The TLS session store: session-id (and, with tickets off, TLS 1.3 stateful)
//! resumption across the cluster.
//!
//! Sessions are held in this edge's memory (rustls' bounded
//! [`ServerSessionMemoryCache`]) and, when `[sessions] redis` is set, in Redis, sealed
//! with the group's keys ([`seal`]) so that Redis never holds a session secret in clear.
//! rustls asks for sessions synchronously inside the handshake: a Redis lookup runs on
//! the store's own runtime while the handshake's thread waits (announced to tokio with
//! `block_in_place`), at most `[sessions] wait` and never past the handshake deadline,
//! with at most `max_pending` lookups and writes waiting at once. Whatever goes wrong —
//! Redis down, slow, full, or an entry that does not open — the lookup is a miss and the
//! handshake a full one; the store never fails a handshake.

mod redis;
mod seal;

use std::future::Future;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use tokio::sync::Semaphore;

use crate::config::SessionsConfig;
use crate::metrics::{Metrics, ResumptionLabels, SessionOpLabels};
use crate::side_runtime::{wait_blocking, SideRuntime};
use crate::tickets::SharedTicketer;
use redis::Remote;
use seal::Sealer;

/// Where a resumed handshake's session came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumption {
    /// A session ticket (the client held the state).
    Ticket,
    /// This edge's session memory.
    Memory,
    /// Redis (made by this or another edge).
    Redis,
}

impl Resumption {
    /// Metric label and log value.
    pub fn label(self) -> &'static str {
        match self {
            Resumption::Ticket => "ticket",
            Resumption::Memory => "session-memory",
            Resumption::Redis => "session-redis",
        }
    }
}

/// The edge's session store.
pub struct SessionStore {
    memory: Arc<ServerSessionMemoryCache>,
    remote: Option<RemoteStore>,
    lifetime: Duration,
    tickets: bool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("redis", &self.remote.is_some())
            .finish_non_exhaustive()
    }
}

/// Redis, its runtime and its bounds.
struct RemoteStore {
    backend: Arc<Remote>,
    /// One thread: Redis I/O never waits for a handshake thread, and a hung Redis
    /// never holds one past the wait.
    runtime: SideRuntime,
    permits: Arc<Semaphore>,
    wait: Duration,
    prefix: String,
}

/// Why the store could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionStoreError {
    /// The store's runtime could not start.
    #[error("cannot start the session store's runtime")]
    Runtime(#[source] std::io::Error),
    /// A Redis server address is not usable.
    #[error("[sessions] redis: {0}")]
    Redis(#[source] ::redis::RedisError),
}

impl SessionStore {
    /// The store of `[sessions]`; Redis connections are made on first use.
    pub fn new(
        config: &SessionsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<SessionStore, SessionStoreError> {
        let remote = if config.redis.is_empty() {
            None
        } else {
            let runtime =
                SideRuntime::new("keyless-sessions", 1).map_err(SessionStoreError::Runtime)?;
            let backend = {
                let _enter = runtime.handle.enter();
                Remote::new(config).map_err(SessionStoreError::Redis)?
            };
            Some(RemoteStore {
                backend: Arc::new(backend),
                runtime,
                permits: Arc::new(Semaphore::new(config.max_pending.get())),
                wait: config.wait,
                prefix: config.key_prefix.clone(),
            })
        };
        Ok(SessionStore {
            memory: ServerSessionMemoryCache::new(config.memory_entries.get()),
            remote,
            lifetime: config.lifetime,
            tickets: config.tickets,
            metrics,
        })
    }

    /// Whether session tickets are issued and accepted.
    pub fn tickets(&self) -> bool {
        self.tickets
    }

    /// The store one handshake of `group` uses: sealed with the group's keys (none =
    /// this edge's memory only), waiting for Redis at most until `deadline`.
    pub fn for_handshake(
        self: &Arc<Self>,
        group: &str,
        keys: Option<Arc<SharedTicketer>>,
        deadline: Instant,
    ) -> Arc<HandshakeSessions> {
        Arc::new(HandshakeSessions {
            store: self.clone(),
            group: group.to_owned(),
            keys,
            deadline,
            found: Mutex::new(None),
        })
    }

    /// Counts a completed handshake: resumed (and from where) or full.
    pub fn count(&self, resumed: Option<Resumption>) {
        match resumed {
            Some(kind) => {
                self.metrics.handshakes_resumed.inc();
                self.metrics
                    .resumptions
                    .get_or_create(&ResumptionLabels { kind: kind.label() })
                    .inc();
            }
            None => {
                self.metrics.handshakes_full.inc();
            }
        }
    }
}

/// The session store as one handshake sees it (rustls' `session_storage`): it knows
/// the group, the deadline, and records where a resumed session was found.
#[derive(Debug)]
pub struct HandshakeSessions {
    store: Arc<SessionStore>,
    group: String,
    keys: Option<Arc<SharedTicketer>>,
    deadline: Instant,
    found: Mutex<Option<Resumption>>,
}

impl HandshakeSessions {
    /// Where the session this handshake resumed came from: the store, or else (when
    /// rustls reports a resumption) a ticket.
    pub fn resumption(&self, resumed: bool) -> Option<Resumption> {
        let found = *self.found.lock().unwrap_or_else(|p| p.into_inner());
        resumed.then(|| found.unwrap_or(Resumption::Ticket))
    }

    fn found(&self, kind: Resumption) {
        *self.found.lock().unwrap_or_else(|p| p.into_inner()) = Some(kind);
    }

    fn sealer(&self) -> Option<Sealer<'_>> {
        self.keys.as_deref().map(|keys| Sealer {
            group: &self.group,
            keys,
        })
    }

    /// The Redis key of a session: hashed, so that its length is bounded whatever the
    /// client sent, and per group.
    fn redis_key(&self, remote: &RemoteStore, session: &[u8]) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, session);
        format!(
            "{}{}:{}",
            remote.prefix,
            self.group,
            hex::encode(&digest.as_ref()[..20])
        )
    }

    /// Looks `session` up in Redis (`take`: and deletes it), waiting at most the
    /// configured wait and never past the handshake deadline.
    fn fetch(&self, session: &[u8], take: bool) -> Option<Vec<u8>> {
        let op = if take { "take" } else { "get" };
        let remote = self.store.remote.as_ref()?;
        let metrics = &self.store.metrics;
        let Some(sealer) = self.sealer() else {
            metrics.session_op(op, "no-key");
            return None;
        };
        let key = self.redis_key(remote, session);
        let backend = remote.backend.clone();
        let wait = remote
            .wait
            .min(self.deadline.saturating_duration_since(Instant::now()));
        let answer = self.wait_for(remote, op, wait, async move {
            if take {
                backend.take(&key).await
            } else {
                backend.get(&key).await
            }
        })?;
        let Some(entry) = answer else {
            metrics.session_op(op, "miss");
            return None;
        };
        match sealer.open(session, &entry, SystemTime::now()) {
            Ok(state) => {
                metrics.session_op(op, "hit");
                Some(state)
            }
            Err(refused) => {
                tracing::warn!(group = %self.group, reason = refused.label(), "session-store entry refused: full handshake");
                metrics.session_op(op, refused.label());
                None
            }
        }
    }

    /// Runs `request` on the store's runtime and waits for its answer at most `wait`.
    /// `None` (counted) when the store is busy, the wait ran out, or Redis failed.
    fn wait_for<T: Send + 'static>(
        &self,
        remote: &RemoteStore,
        op: &'static str,
        wait: Duration,
        request: impl Future<Output = ::redis::RedisResult<T>> + Send + 'static,
    ) -> Option<T> {
        let metrics = &self.store.metrics;
        let Ok(permit) = remote.permits.clone().try_acquire_owned() else {
            metrics.session_op(op, "busy");
            return None;
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let timer = self.store.metrics.clone();
        remote.runtime.handle.spawn(async move {
            let answer = timed(&timer, op, wait, request).await;
            drop(permit);
            let _ = tx.send(answer);
        });
        // The task ends by itself at `wait`; a little more covers its scheduling.
        match wait_blocking(|| rx.recv_timeout(wait + Duration::from_millis(5))) {
            Ok(Ok(value)) => Some(value),
            Ok(Err(result)) => {
                metrics.session_op(op, result);
                None
            }
            Err(_) => {
                metrics.session_op(op, "timeout");
                None
            }
        }
    }

    /// Writes (or deletes) in Redis without waiting: the handshake goes on.
    fn send(&self, op: &'static str, session: &[u8], entry: Option<(Vec<u8>, Duration)>) {
        let Some(remote) = self.store.remote.as_ref() else {
            return;
        };
        let metrics = self.store.metrics.clone();
        let Ok(permit) = remote.permits.clone().try_acquire_owned() else {
            metrics.session_op(op, "busy");
            return;
        };
        let key = self.redis_key(remote, session);
        let backend = remote.backend.clone();
        remote.runtime.handle.spawn(async move {
            let request = async {
                match entry {
                    Some((value, ttl)) => backend.put(&key, &value, ttl).await,
                    None => backend.delete(&key).await,
                }
            };
            let result = timed(&metrics, op, RESPONSE_DEADLINE, request)
                .await
                .map_or_else(|failure| failure, |()| "stored");
            metrics.session_op(op, result);
            drop(permit);
        });
    }
}

/// Runs `request` within `deadline`, recording its round trip when it succeeds; a
/// failure is its result label (`error`, `timeout`).
async fn timed<T>(
    metrics: &Metrics,
    op: &'static str,
    deadline: Duration,
    request: impl Future<Output = ::redis::RedisResult<T>>,
) -> Result<T, &'static str> {
    let started = Instant::now();
    match tokio::time::timeout(deadline, request).await {
        Ok(Ok(value)) => {
            metrics
                .session_store_seconds
                .get_or_create(&SessionOpLabels { op })
                .observe(started.elapsed().as_secs_f64());
            Ok(value)
        }
        Ok(Err(e)) => {
            tracing::debug!(op, error = %e, "session store: redis failed");
            Err("error")
        }
        Err(_) => Err("timeout"),
    }
}

/// Deadline of a write to Redis (nobody waits for it; it only holds a permit).
const RESPONSE_DEADLINE: Duration = Duration::from_secs(1);

impl StoresServerSessions for HandshakeSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        if self.store.remote.is_some() {
            let sealed = self.sealer().and_then(|sealer| {
                sealer.seal(&key, &value, self.store.lifetime, SystemTime::now())
            });
            match sealed {
                Some(entry) => self.send("put", &key, Some(entry)),
                None => self.store.metrics.session_op("put", "no-key"),
            }
        }
        self.store.memory.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(value) = self.store.memory.get(key) {
            self.found(Resumption::Memory);
            return Some(value);
        }
        let value = self.fetch(key, false)?;
        self.store.memory.put(key.to_vec(), value.clone());
        self.found(Resumption::Redis);
        Some(value)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(value) = self.store.memory.take(key) {
            // Single use across the cluster: gone from Redis too.
            self.send("delete", key, None);
            self.found(Resumption::Memory);
            return Some(value);
        }
        let value = self.fetch(key, true)?;
        self.found(Resumption::Redis);
        Some(value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_redis_sessions_stay_in_memory_and_say_so() {
        let config = SessionsConfig::default();
        let store = Arc::new(SessionStore::new(&config, Arc::new(Metrics::new())).unwrap());
        let deadline = Instant::now() + Duration::from_secs(1);
        let a = store.for_handshake("g", None, deadline);
        assert!(a.put(b"sid".to_vec(), b"state".to_vec()));
        let b = store.for_handshake("g", None, deadline);
        assert_eq!(b.resumption(true), Some(Resumption::Ticket));
        assert_eq!(b.get(b"sid").as_deref(), Some(&b"state"[..]));
        assert_eq!(b.resumption(true), Some(Resumption::Memory));
        assert_eq!(b.resumption(false), None);
        assert_eq!(b.take(b"sid").as_deref(), Some(&b"state"[..]));
        assert!(b.take(b"sid").is_none(), "single use");
    }

    #[test]
    fn an_unreachable_redis_is_a_miss_within_the_wait() {
        // A port nobody listens on: connection refused, at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = SessionsConfig {
            redis: vec![format!("redis://127.0.0.1:{port}")],
            wait: Duration::from_millis(50),
            ..SessionsConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(SessionStore::new(&config, metrics.clone()).unwrap());
        let keys = Arc::new(SharedTicketer::default());
        keys.install(vec![keyless_shared::tickets::TicketKey {
            id: [1; 8],
            not_before: SystemTime::now() - Duration::from_secs(1),
            encrypt_until: SystemTime::now() + Duration::from_secs(60),
            decrypt_until: SystemTime::now() + Duration::from_secs(120),
            secret: zeroize::Zeroizing::new([3; 32]),
        }]);
        let h = store.for_handshake("g", Some(keys), Instant::now() + Duration::from_secs(5));
        let started = Instant::now();
        assert!(h.get(b"unknown").is_none());
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        let text = metrics.render();
        assert!(
            text.contains("keyless_edge_session_store_ops_total{op=\"get\",result=\"error\"} 1")
                || text.contains(
                    "keyless_edge_session_store_ops_total{op=\"get\",result=\"timeout\"} 1"
                ),
            "{text}"
        );
    }
}
