//! The edge's shared HTTP cache (RFC 9111, RFC 5861, RFC 9211, RFC 9213).
//!
//! Storage: tiers behind the [`storage::Storage`] interface, fastest first: a memory
//! tier (`moka`, bounded in bytes, TinyLFU admission and LRU eviction) and an optional
//! disk tier ([`disk`]) that survives restarts. Objects are addressed by a
//! [`key::CacheKey`]: the request's primary key (URL and per-site key-header values)
//! and, when the response had `Vary`, its variant. A small index maps each primary key
//! to its `Vary` names, so a lookup costs two hash-map probes; another maps each URL to
//! its stored keys, for invalidation and purge.
//!
//! The HTTP flow (hits, revalidation, stale serving, coalescing, invalidation) is in
//! [`flow`] (with [`Cache::handle`]); it reaches the origin only through
//! [`crate::exchange::Fetch`]. The RFC rules are in
//! [`policy`], [`conditional`] and [`range`].

mod blocks;
mod conditional;
mod disk;
mod flow;
mod format;
mod key;
mod object;
mod policy;
mod range;
mod spool;
mod storage;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::metrics::{Metrics, TierLabels};
use disk::DiskTier;
use key::{CacheKey, PrimaryKey};
use object::{CachedObject, Entry};
use policy::StaleDefaults;
use spool::{Growing, OnDone, Spool};
use storage::{DiskStore, MemoryTier, Purge, Storage};

/// How long a "not cacheable" answer exempts its URL from request coalescing.
const PASS_TTL: Duration = Duration::from_secs(30);
/// Bytes one key costs in the URL and `Vary` indexes besides its own length.
const INDEX_KEY_OVERHEAD: u64 = 64;
/// Hit-for-pass markers remembered.
const PASS_ENTRIES: u64 = 100_000;
/// How long a URL found too large or not storable is not filled after a range miss.
const NO_FILL_TTL: Duration = Duration::from_secs(600);
/// Bytes of keys remembered as not to be filled (oldest forgotten first).
const NO_FILL_BYTES: u64 = 4 << 20;
/// Background full fetches after range misses running at once; a range miss finding
/// none free fills nothing (a later one will).
pub const MAX_RANGE_FILLS: usize = 8;
/// Large objects written to the disk tier at once as they stream; a large response
/// finding none free passes through uncached. Bounds the disk space taken by objects
/// not yet committed (and so not yet counted in `disk_bytes`) to this many times
/// `disk_max_object_bytes`, and the memory of their writers to about 2 MiB each.
pub const MAX_DISK_STREAMS: usize = 32;

/// URL → the keys stored under it (every `Vary` and `key_headers` variant, in any
/// tier), so that invalidation and purge by URL touch only that URL's objects. A key
/// may outlive its object (evicted meanwhile); it is dropped when its URL is
/// invalidated or when the index is pruned. Bounded in bytes: an object whose key
/// would not fit is not stored (a stored object is always findable).
#[derive(Debug, Default)]
struct UrlIndex {
    map: HashMap<Arc<str>, HashSet<Arc<str>>>,
    bytes: u64,
    /// `bytes` after the last prune; the next prune waits until the index has grown
    /// by a quarter of the budget since, so that a full index costs no scan per store.
    pruned_at: u64,
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// A stored response for this request's variant, and the tier that had it.
    Found(Arc<Entry>, &'static str),
    /// Nothing stored under this URL (`fwd=uri-miss`).
    UriMiss,
    /// Responses stored under this URL, none for this request's `Vary` values
    /// (`fwd=vary-miss`); the request's key.
    VaryMiss(CacheKey),
}

/// Registers the one origin fetch of a cache key; dropping it (stored, abandoned or
/// not cacheable) releases the requests waiting for it.
pub(crate) struct FlightGuard {
    cache: Arc<Cache>,
    key: Arc<str>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.cache.inflight.lock() {
            map.remove(&self.key);
        }
    }
}

/// What the requests following a fetch watch: nothing until the object turns out
/// large and streams to disk, then the growing file they read behind the writer.
pub(crate) type FlightState = Option<Arc<Growing>>;

/// The outcome of [`Cache::join_flight`].
pub(crate) enum Flight {
    /// This request fetches; others wait for it.
    Leader(FlightGuard),
    /// Another request is fetching: wait on this (it ends when the fetch does).
    Follower(watch::Receiver<FlightState>),
}

/// The cache shared by every connection.
pub struct Cache {
    /// Storage tiers, fastest first: memory, then disk when configured.
    tiers: Vec<Arc<dyn Storage>>,
    /// Primary key → the `Vary` names of its stored responses (bounded in bytes; a
    /// forgotten entry makes its variants misses).
    vary: moka::sync::Cache<Arc<str>, Arc<[HeaderName]>>,
    /// URL → keys ([`UrlIndex`]).
    urls: Mutex<UrlIndex>,
    /// Bytes [`UrlIndex`] may take (and, separately, the `Vary` index).
    index_budget: u64,
    /// Longest primary key (URL plus `key_headers` values) cached; longer ones pass.
    max_url_bytes: usize,
    /// Primary keys whose last answer was not cacheable (no coalescing for them).
    pass: moka::sync::Cache<Arc<str>, ()>,
    /// Primary keys not to fill after a range miss (too large or not storable).
    no_fill: moka::sync::Cache<Arc<str>, ()>,
    /// Free range-fill slots ([`MAX_RANGE_FILLS`]).
    fills: Arc<tokio::sync::Semaphore>,
    /// Keys being fetched → the channel their waiters watch.
    inflight: Mutex<HashMap<Arc<str>, watch::Sender<FlightState>>>,
    /// The disk tier (also in `tiers`), which large objects stream to.
    disk: Option<Arc<DiskStore>>,
    /// Largest object streamed to the disk tier.
    disk_max_object_bytes: u64,
    /// Free disk-stream slots ([`MAX_DISK_STREAMS`]).
    disk_streams: Arc<tokio::sync::Semaphore>,
    /// Keys being refreshed in the background (stale-while-revalidate).
    refreshing: Mutex<HashSet<Arc<str>>>,
    max_object_bytes: u64,
    /// Bytes of response bodies being collected for storing, by all requests; at
    /// most `collect_budget`.
    collecting: AtomicU64,
    collect_budget: u64,
    defaults: StaleDefaults,
    coalesce_timeout: Duration,
    purge_token: Option<String>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tiers: Vec<_> = self.tiers.iter().map(|t| (t.tier(), t.usage())).collect();
        f.debug_struct("Cache")
            .field("tiers", &tiers)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Builds the cache of `[cache]`, opening (and indexing) the disk tier if one is
    /// configured. Blocking when there is a disk tier: call it before serving.
    pub fn new(config: &CacheConfig, metrics: Arc<Metrics>) -> std::io::Result<Cache> {
        let defaults = StaleDefaults {
            while_revalidate: config.stale_while_revalidate.unwrap_or_default(),
            if_error: config.stale_if_error.unwrap_or_default(),
        };
        let mut tiers: Vec<Arc<dyn Storage>> = vec![Arc::new(MemoryTier::new(config.memory_bytes))];
        let mut disk_store = None;
        if let Some(dir) = &config.disk_dir {
            let disk = DiskTier::open(dir, config.disk_bytes).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cache disk_dir {}: {e}", dir.display()))
            })?;
            let store = Arc::new(DiskStore::new(
                disk,
                defaults,
                metrics.cache_block_read_seconds.clone(),
            ));
            disk_store = Some(store.clone());
            tiers.push(store);
        }
        let index_budget = index_budget(config);
        let cache = Cache {
            tiers,
            vary: moka::sync::Cache::builder()
                .max_capacity(index_budget)
                .weigher(|k: &Arc<str>, names: &Arc<[HeaderName]>| {
                    let names: usize = names.iter().map(|n| n.as_str().len() + 16).sum();
                    u32::try_from(k.len() as u64 + names as u64 + INDEX_KEY_OVERHEAD)
                        .unwrap_or(u32::MAX)
                })
                .build(),
            urls: Mutex::new(UrlIndex::default()),
            index_budget,
            max_url_bytes: config.max_url_bytes,
            pass: moka::sync::Cache::builder()
                .max_capacity(PASS_ENTRIES)
                .time_to_live(PASS_TTL)
                .build(),
            no_fill: moka::sync::Cache::builder()
                .max_capacity(NO_FILL_BYTES)
                .weigher(|k: &Arc<str>, _v: &()| u32::try_from(k.len() + 64).unwrap_or(u32::MAX))
                .time_to_live(NO_FILL_TTL)
                .build(),
            fills: Arc::new(tokio::sync::Semaphore::new(MAX_RANGE_FILLS)),
            inflight: Mutex::new(HashMap::new()),
            disk: disk_store,
            disk_max_object_bytes: config.disk_max_object_bytes,
            disk_streams: Arc::new(tokio::sync::Semaphore::new(MAX_DISK_STREAMS)),
            refreshing: Mutex::new(HashSet::new()),
            max_object_bytes: config.max_object_bytes,
            collecting: AtomicU64::new(0),
            collect_budget: config.memory_bytes,
            defaults,
            coalesce_timeout: config.coalesce_timeout,
            purge_token: config.purge_token.clone(),
            metrics,
        };
        cache.rebuild_indexes();
        cache.update_gauges();
        Ok(cache)
    }

    /// After a restart, the keys of the persistent tiers tell which `Vary` names each
    /// URL had and which keys each URL has; objects whose keys do not fit the index
    /// are dropped.
    fn rebuild_indexes(&self) {
        for tier in &self.tiers {
            let mut keys = Vec::new();
            tier.for_each_key(&mut |k| keys.push(CacheKey::from_stored(k)));
            for key in keys {
                if self.index_add(&key) {
                    self.vary
                        .insert(key.primary().into(), key.vary_names().into());
                } else {
                    tier.remove(key.as_str());
                }
            }
        }
    }

    /// Adds `key` to the URL index; false when it does not fit (then the object is not
    /// stored). Callers add a key after inserting its object, so that a prune running
    /// meanwhile either sees the object or runs before the key is added.
    fn index_add(&self, key: &CacheKey) -> bool {
        let Ok(mut index) = self.urls.lock() else {
            return false;
        };
        let url = key.url();
        if index
            .map
            .get(url)
            .is_some_and(|keys| keys.contains(key.as_str()))
        {
            return true;
        }
        let cost = key_cost(key.as_str())
            + if index.map.contains_key(url) {
                0
            } else {
                key_cost(url)
            };
        if index.bytes + cost > self.index_budget
            && index.bytes >= index.pruned_at + self.index_budget / 4
        {
            self.prune(&mut index);
        }
        if index.bytes + cost > self.index_budget {
            return false;
        }
        index.bytes += cost;
        index
            .map
            .entry(url.into())
            .or_default()
            .insert(key.shared().clone());
        true
    }

    /// Drops the keys whose objects are in no tier any more. Scans the index (not the
    /// objects), and only when it is full.
    fn prune(&self, index: &mut UrlIndex) {
        let before = index.bytes;
        let mut bytes = 0;
        index.map.retain(|url, keys| {
            keys.retain(|k| self.tiers.iter().any(|t| t.contains(k)));
            if keys.is_empty() {
                return false;
            }
            bytes += key_cost(url) + keys.iter().map(|k| key_cost(k)).sum::<u64>();
            true
        });
        index.bytes = bytes;
        index.pruned_at = bytes;
        tracing::debug!(before, after = bytes, "cache URL index pruned");
    }

    /// Finds the stored response for a request, fastest tier first; an object found
    /// in a slower tier is copied into the faster ones.
    pub(crate) async fn lookup(&self, primary: &PrimaryKey, headers: &HeaderMap) -> Lookup {
        let Some(names) = self.vary.get(primary.as_str()) else {
            return Lookup::UriMiss;
        };
        let key = primary.variant(&names, headers);
        for (i, tier) in self.tiers.iter().enumerate() {
            let started = std::time::Instant::now();
            let Some(entry) = tier.get(key.as_str()).await else {
                continue;
            };
            self.metrics
                .cache_read_seconds
                .get_or_create(&TierLabels { tier: tier.tier() })
                .observe(started.elapsed().as_secs_f64());
            if i > 0 && !entry.obj.body.on_disk() && entry.obj.weight() <= self.max_object_bytes {
                for faster in &self.tiers[..i] {
                    if let Some(write) = faster.clone().put(entry.clone()) {
                        tokio::spawn(write);
                    }
                }
            }
            return Lookup::Found(entry, tier.tier());
        }
        if names.is_empty() {
            Lookup::UriMiss
        } else {
            Lookup::VaryMiss(key)
        }
    }

    /// Stores a complete response in the first tier (and, in the background, in the
    /// others). The entry is returned even when it could not be stored (the URL index
    /// is full).
    pub(crate) fn store(
        self: &Arc<Self>,
        obj: CachedObject,
        names: Arc<[HeaderName]>,
    ) -> Arc<Entry> {
        let key = obj.key.clone();
        let entry = Arc::new(Entry::new(obj, self.defaults));
        let (first, rest) = match self.tiers.split_first() {
            Some(split) => split,
            None => return entry,
        };
        if let Some(write) = first.clone().put(entry.clone()) {
            tokio::spawn(write);
        }
        if !self.index_add(&key) {
            first.remove(key.as_str());
            tracing::debug!(%key, "cache URL index full; response not stored");
            return entry;
        }
        self.vary.insert(key.primary().into(), names);
        self.metrics.cache_stores.inc();
        for tier in rest {
            if let Some(write) = tier.clone().put(entry.clone()) {
                let cache = self.clone();
                tokio::spawn(async move {
                    write.await;
                    cache.update_gauges();
                });
            }
        }
        self.update_gauges();
        entry
    }

    /// Forgets every stored variant of `url` (every `Vary` and `key_headers` value):
    /// unsafe-method invalidation and purge by URL. Finds them through the URL index.
    pub(crate) fn invalidate(&self, url: &str) -> usize {
        let keys = match self.urls.lock() {
            Ok(mut index) => match index.map.remove(url) {
                Some(keys) => {
                    let cost = key_cost(url) + keys.iter().map(|k| key_cost(k)).sum::<u64>();
                    index.bytes = index.bytes.saturating_sub(cost);
                    keys
                }
                None => return 0,
            },
            Err(_) => return 0,
        };
        let mut removed = 0;
        for key in keys {
            self.vary.invalidate(CacheKey::from_stored(&key).primary());
            // Every tier, not just the first that had it.
            let found = self.tiers.iter().filter(|t| t.remove(&key)).count() > 0;
            if found {
                removed += 1;
            }
        }
        self.update_gauges();
        removed
    }

    /// Removes what `purge` selects from every tier; objects on several tiers count
    /// once.
    fn purge(&self, purge: Purge<'_>) -> usize {
        let removed = self.tiers.iter().map(|t| t.purge(purge)).max().unwrap_or(0);
        self.update_gauges();
        self.metrics.cache_purged.inc_by(removed as u64);
        removed
    }

    /// Purge API: every variant of one URL (`scheme://host/path?query`).
    pub fn purge_url(&self, url: &str) -> usize {
        let n = self.invalidate(url);
        self.metrics.cache_purged.inc_by(n as u64);
        n
    }

    /// Purge API: every object whose URL starts with `prefix`.
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        self.purge(Purge::Prefix(prefix))
    }

    /// Purge API: every object tagged `tag` (`Surrogate-Key` / `Cache-Tag`).
    pub fn purge_tag(&self, tag: &str) -> usize {
        self.purge(Purge::Tag(tag))
    }

    /// Whether the purge API is enabled (`None` when not) and `token` is its bearer
    /// token. Both sides are hashed first, so the comparison time depends neither on
    /// where they differ nor on the token's length.
    pub fn purge_authorized(&self, token: &[u8]) -> Option<bool> {
        let expected = self.purge_token.as_ref()?;
        Some(keyless_shared::serve::token_matches(expected, token))
    }

    /// Joins the fetch of `key`: the first caller leads, the others follow. `None`
    /// when its primary key is marked not cacheable (no coalescing).
    pub(crate) fn join_flight(self: &Arc<Self>, key: &CacheKey) -> Option<Flight> {
        if self.pass.contains_key(key.primary()) {
            return None;
        }
        let mut map = self.inflight.lock().ok()?;
        if let Some(tx) = map.get(key.as_str()) {
            return Some(Flight::Follower(tx.subscribe()));
        }
        let (tx, _rx) = watch::channel(None);
        map.insert(key.shared().clone(), tx);
        Some(Flight::Leader(FlightGuard {
            cache: self.clone(),
            key: key.shared().clone(),
        }))
    }

    /// Whether a body of `len` bytes (`None`: not known yet) can stream to the disk
    /// tier.
    pub(crate) fn may_stream(&self, len: Option<u64>) -> bool {
        self.disk.is_some() && len.is_none_or(|n| n <= self.disk_max_object_bytes)
    }

    /// Starts writing a large object to the disk tier as its body streams: `template`
    /// is the stored response without its body, `first` the body collected so far.
    /// The flight (if this request leads one) is held until the object is committed,
    /// and its followers read the growing file meanwhile. `None` (nothing started)
    /// without a disk tier, with every disk-stream slot taken, or when the file
    /// cannot be created.
    pub(crate) fn begin_disk_stream(
        self: &Arc<Self>,
        template: &CachedObject,
        names: Arc<[HeaderName]>,
        first: Vec<bytes::Bytes>,
        flight: Option<FlightGuard>,
    ) -> Option<Spool> {
        let disk = self.disk.as_ref()?;
        let Ok(slot) = self.disk_streams.clone().try_acquire_owned() else {
            tracing::debug!(key = %template.key, "every disk-stream slot taken; large object not stored");
            return None;
        };
        let stream = disk.begin_stream(template)?;
        let entry = Arc::new(Entry::new(template.clone(), self.defaults));
        let cache = self.clone();
        let key = template.key.clone();
        let flight_key = flight.as_ref().map(|f| f.key.clone());
        self.metrics.cache_disk_streams.inc();
        let done: OnDone = Box::new(move |stored| {
            let result = if stored { "stored" } else { "dropped" };
            cache
                .metrics
                .cache_disk_streamed
                .get_or_create(&crate::metrics::CacheLabels { result })
                .inc();
            cache.metrics.cache_disk_streams.dec();
            if stored {
                cache.stored_on_disk(&key, names);
            }
            tracing::debug!(%key, stored, "large object streamed to disk");
            drop(slot);
            // Last: followers looking up after the flight ends find the object.
            drop(flight);
        });
        let (spool, growing) =
            Spool::start(stream, first, self.disk_max_object_bytes, entry, done)?;
        if let Some(flight_key) = flight_key {
            if let Ok(map) = self.inflight.lock() {
                if let Some(tx) = map.get(&flight_key) {
                    tx.send_replace(Some(growing));
                }
            }
        }
        Some(spool)
    }

    /// Indexes an object the disk tier committed after it streamed there; a copy of
    /// the key in a faster tier (an older, smaller version) goes.
    fn stored_on_disk(&self, key: &CacheKey, names: Arc<[HeaderName]>) {
        for tier in &self.tiers {
            if tier.tier() != "disk" {
                tier.remove(key.as_str());
            }
        }
        if !self.index_add(key) {
            if let Some(disk) = &self.disk {
                disk.remove(key.as_str());
            }
            tracing::debug!(%key, "cache URL index full; response not stored");
            return;
        }
        self.vary.insert(key.primary().into(), names);
        self.metrics.cache_stores.inc();
        self.update_gauges();
    }

    /// Marks `primary` as not cacheable for a while: requests for it skip coalescing.
    pub(crate) fn mark_pass(&self, primary: &PrimaryKey) {
        self.pass.insert(primary.shared().clone(), ());
    }

    /// Clears a pass mark (the URL answered with something cacheable).
    pub(crate) fn clear_pass(&self, primary: &PrimaryKey) {
        self.pass.invalidate(primary.as_str());
    }

    /// Remembers (for [`NO_FILL_TTL`]) that `primary` is not filled after range misses.
    pub(crate) fn refuse_fill(&self, primary: &PrimaryKey) {
        self.no_fill.insert(primary.shared().clone(), ());
    }

    /// Whether `primary` was found too large or not storable lately.
    pub(crate) fn fill_refused(&self, primary: &PrimaryKey) -> bool {
        self.no_fill.contains_key(primary.as_str())
    }

    /// A range-fill slot, if one is free.
    pub(crate) fn fill_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.fills.clone().try_acquire_owned().ok()
    }

    /// Starts a background refresh of `key` unless one is running; the returned guard
    /// ends it.
    pub(crate) fn begin_refresh(self: &Arc<Self>, key: &CacheKey) -> Option<RefreshGuard> {
        let mut set = self.refreshing.lock().ok()?;
        set.insert(key.shared().clone()).then(|| RefreshGuard {
            cache: self.clone(),
            key: key.shared().clone(),
        })
    }

    /// Accounts `n` more bytes being collected; false (and nothing accounted) when
    /// that would exceed the budget.
    pub(crate) fn reserve_collecting(&self, n: u64) -> bool {
        let budget = self.collect_budget;
        self.collecting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(n).filter(|&total| total <= budget)
            })
            .is_ok()
    }

    /// Returns `n` collected bytes to the budget.
    pub(crate) fn release_collecting(&self, n: u64) {
        self.collecting.fetch_sub(n, Ordering::AcqRel);
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Refreshes the tier gauges and eviction counters.
    pub fn update_gauges(&self) {
        let m = &self.metrics;
        for tier in &self.tiers {
            let usage = tier.usage();
            let labels = TierLabels { tier: tier.tier() };
            m.cache_bytes
                .get_or_create(&labels)
                .set(i64::try_from(usage.bytes).unwrap_or(i64::MAX));
            m.cache_objects
                .get_or_create(&labels)
                .set(i64::try_from(usage.objects).unwrap_or(i64::MAX));
            let counter = m.cache_evictions.get_or_create(&labels);
            let seen = counter.get();
            if usage.evictions > seen {
                counter.inc_by(usage.evictions - seen);
            }
        }
    }

    /// Runs the tiers' pending maintenance (evictions) and refreshes gauges; called
    /// before metrics are rendered.
    pub fn maintain(&self) {
        for tier in &self.tiers {
            tier.maintain();
        }
        self.update_gauges();
    }
}

/// Ends a background refresh when dropped.
pub(crate) struct RefreshGuard {
    cache: Arc<Cache>,
    key: Arc<str>,
}

impl Drop for RefreshGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = self.cache.refreshing.lock() {
            set.remove(&self.key);
        }
    }
}

/// What a key costs in an index.
fn key_cost(key: &str) -> u64 {
    key.len() as u64 + INDEX_KEY_OVERHEAD
}

/// Bytes each index (URL, `Vary`) may take: a sixteenth of the tiers' sizes, at least
/// 1 MiB, enough for the keys of every object the tiers can hold unless they are
/// mostly tiny objects with long URLs.
fn index_budget(config: &CacheConfig) -> u64 {
    let tiers = config
        .memory_bytes
        .saturating_add(if config.disk_dir.is_some() {
            config.disk_bytes
        } else {
            0
        });
    (tiers / 16).max(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SiteConfig;
    use crate::sites::{Site, Sites};
    use http::HeaderValue;
    use std::time::SystemTime;

    #[test]
    fn bodies_being_collected_share_the_memory_budget() {
        let config = CacheConfig {
            memory_bytes: 100,
            ..CacheConfig::default()
        };
        let cache = Cache::new(&config, Arc::new(Metrics::new())).unwrap();
        assert!(cache.reserve_collecting(60));
        assert!(!cache.reserve_collecting(50));
        assert!(cache.reserve_collecting(40));
        cache.release_collecting(60);
        assert!(cache.reserve_collecting(50));
        assert!(!cache.reserve_collecting(u64::MAX));
    }

    /// A site keyed on `x-tenant` besides the URL.
    fn tenant_site() -> Arc<Site> {
        let mut config = SiteConfig {
            domains: vec!["x".into()],
            origin: "http://o".parse().unwrap(),
            cache: Default::default(),
            keyserver_group: None,
            chain: None,
        };
        config.cache.key_headers = vec![HeaderName::from_static("x-tenant")];
        Sites::new(&[config]).unwrap().lookup("x").unwrap().clone()
    }

    fn primary(target: &str, headers: &[(&'static str, &str)]) -> PrimaryKey {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.insert(*n, HeaderValue::from_str(v).unwrap());
        }
        PrimaryKey::new(&tenant_site(), "https", "x", target, &h)
    }

    fn object(key: CacheKey) -> CachedObject {
        CachedObject {
            key,
            status: http::StatusCode::OK,
            headers: HeaderMap::new(),
            body: object::StoredBody::Memory(bytes::Bytes::from_static(b"x")),
            request_time: SystemTime::now(),
            response_time: SystemTime::now(),
            vary: Vec::new(),
        }
    }

    fn stored_keys(cache: &Cache) -> usize {
        let mut n = 0;
        cache.tiers[0].for_each_key(&mut |_| n += 1);
        n
    }

    #[tokio::test]
    async fn invalidation_finds_every_variant_through_the_url_index() {
        let cache =
            Arc::new(Cache::new(&CacheConfig::default(), Arc::new(Metrics::new())).unwrap());
        let names: Arc<[HeaderName]> = vec![HeaderName::from_static("accept-language")].into();
        for (lang, tenant) in [("en", "1"), ("fr", "1"), ("en", "2")] {
            let mut h = HeaderMap::new();
            h.insert("accept-language", HeaderValue::from_str(lang).unwrap());
            let key = primary("/a", &[("x-tenant", tenant)]).variant(&names, &h);
            cache.store(object(key), names.clone());
        }
        cache.store(
            object(primary("/a?q", &[]).unvaried()),
            Arc::from(Vec::new()),
        );
        cache.store(
            object(primary("/ab", &[]).unvaried()),
            Arc::from(Vec::new()),
        );
        let mut h = HeaderMap::new();
        h.insert("accept-language", HeaderValue::from_static("fr"));
        h.insert("x-tenant", HeaderValue::from_static("1"));
        assert!(matches!(
            cache.lookup(&primary("/a", &[("x-tenant", "1")]), &h).await,
            Lookup::Found(..)
        ));
        assert_eq!(cache.invalidate("https://x/a"), 3);
        assert_eq!(cache.invalidate("https://x/a"), 0);
        assert!(matches!(
            cache.lookup(&primary("/a", &[("x-tenant", "1")]), &h).await,
            Lookup::UriMiss
        ));
        cache.maintain();
        assert_eq!(stored_keys(&cache), 2);
        assert_eq!(cache.purge_url("https://x/ab"), 1);
        assert_eq!(cache.urls.lock().unwrap().map.len(), 1);
    }

    #[tokio::test]
    async fn the_url_index_is_bounded_in_bytes_and_pruned_when_full() {
        let cache =
            Arc::new(Cache::new(&CacheConfig::default(), Arc::new(Metrics::new())).unwrap());
        let budget = cache.index_budget;
        let long = "p".repeat(1000);
        let bytes = || cache.urls.lock().unwrap().bytes;
        let mut stored = 0u64;
        loop {
            let before = bytes();
            let key = primary(&format!("/{stored}/{long}"), &[]).unvaried();
            cache.store(object(key), Arc::from(Vec::new()));
            if bytes() == before {
                break;
            }
            stored += 1;
            assert!(stored < budget / 1000, "the index never filled");
        }
        assert!(
            bytes() <= budget && bytes() + 2 * 1100 > budget,
            "{} of {budget}",
            bytes()
        );
        // The object whose key did not fit was not stored.
        let refused = primary(&format!("/{stored}/{long}"), &[]).unvaried();
        assert!(!cache.tiers[0].contains(refused.as_str()));
        // Once the objects are gone, a prune makes room again.
        assert!(cache.purge_prefix("https://x/") as u64 == stored);
        cache.urls.lock().unwrap().pruned_at = 0;
        assert!(cache.index_add(&refused));
        assert_eq!(cache.urls.lock().unwrap().map.len(), 1);
    }
}
