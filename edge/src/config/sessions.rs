//! `[sessions]`: how the edge resumes TLS sessions — session tickets sealed with the
//! group's shared keys, and session ids kept in memory and, when configured, in Redis
//! where every edge of the cluster finds them.

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;

/// How sessions are placed on the `redis` servers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// Independent servers; each session lives on one of them, chosen by rendezvous
    /// hashing of its id (every edge must list the same servers, in any order).
    #[default]
    Hash,
    /// The servers are seeds of one Redis Cluster, which places the keys itself.
    Cluster,
}

/// `[sessions]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// Issue and accept session tickets (TLS 1.3 and 1.2). Default true. Off, TLS 1.3
    /// resumption is stateful too (its tickets name sessions held in the store).
    #[serde(default = "yes")]
    pub tickets: bool,
    /// Sessions held in this edge's memory (the first tier). Default 100000.
    #[serde(default = "default_memory_entries")]
    pub memory_entries: NonZeroUsize,
    /// Redis servers shared by the edges (`redis://host:port[/db]`); none = sessions
    /// stay in this edge's memory.
    #[serde(default)]
    pub redis: Vec<String>,
    /// `hash` (default) or `cluster`.
    #[serde(default)]
    pub redis_mode: RedisMode,
    /// Longest wait for Redis during a handshake; after it, the handshake is a full one.
    /// Default "25ms".
    #[serde(default = "default_wait", with = "humantime_serde")]
    pub wait: Duration,
    /// How long a stored session may be resumed (the Redis TTL). Default "1h"; a
    /// session also ends with the group key it was sealed with.
    #[serde(default = "default_lifetime", with = "humantime_serde")]
    pub lifetime: Duration,
    /// Lookups and writes waiting for Redis at once; beyond it a lookup is a miss and a
    /// write is dropped. Default 256.
    #[serde(default = "default_max_pending")]
    pub max_pending: NonZeroUsize,
    /// Prefix of the Redis keys. Default "keyless:session:".
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            tickets: true,
            memory_entries: default_memory_entries(),
            redis: Vec::new(),
            redis_mode: RedisMode::default(),
            wait: default_wait(),
            lifetime: default_lifetime(),
            max_pending: default_max_pending(),
            key_prefix: default_prefix(),
        }
    }
}

impl SessionsConfig {
    /// What is wrong with the section, if anything.
    pub(super) fn problem(&self) -> Option<String> {
        if self.wait.is_zero() || self.wait > Duration::from_secs(1) {
            return Some("[sessions] wait must be between 1ms and 1s".into());
        }
        if self.lifetime < Duration::from_secs(1) || self.lifetime > Duration::from_secs(86_400) {
            return Some("[sessions] lifetime must be between 1s and 24h".into());
        }
        if self.max_pending.get() > super::MAX_PENDING_SESSIONS_LIMIT {
            return Some(format!(
                "[sessions] max_pending is at most {} (each waiting lookup holds a thread)",
                super::MAX_PENDING_SESSIONS_LIMIT
            ));
        }
        if self.redis_mode == RedisMode::Cluster && self.redis.is_empty() {
            return Some(
                "[sessions] redis_mode = \"cluster\" needs at least one redis server".into(),
            );
        }
        self.redis.iter().find_map(|url| {
            redis::parse_redis_url(url)
                .filter(|u| u.scheme() == "redis")
                .is_none()
                .then(|| format!("[sessions] redis {url:?} is not a redis://host:port URL"))
        })
    }
}

fn yes() -> bool {
    true
}
fn default_memory_entries() -> NonZeroUsize {
    NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN)
}
fn default_wait() -> Duration {
    Duration::from_millis(25)
}
fn default_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_pending() -> NonZeroUsize {
    NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN)
}
fn default_prefix() -> String {
    "keyless:session:".into()
}
