//! The edge's shared HTTP cache (RFC 9111, RFC 5861, RFC 9211, RFC 9213).
//!
//! Storage: a memory tier (`moka`, bounded in bytes by a weigher, TinyLFU admission
//! and LRU eviction) in front of an optional disk tier ([`disk`]) that survives
//! restarts. Objects are addressed by a *full key*: the primary key (scheme, host
//! without port, path, query — per-site options may drop the query or add request
//! headers) and, when the response had `Vary`, the names it listed and a hash of the
//! request's values for them. A small index maps each primary key to its `Vary` names,
//! so a lookup costs two hash-map probes.
//!
//! The HTTP flow (hits, revalidation, stale serving, coalescing, invalidation) is in
//! [`flow`]; the RFC rules in [`policy`].

pub mod conditional;
mod disk;
mod flow;
mod object;
mod policy;
mod range;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};
use moka::notification::RemovalCause;
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::exchange::{ClientCtx, EdgeBody, Fetch};
use crate::metrics::{Metrics, TierLabels};
use crate::sites::Site;
use disk::DiskTier;
use object::CachedObject;
use policy::{ResponsePolicy, StaleDefaults};

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

/// A primary key and the `Vary` names of its responses.
type VaryIndexEntry = (Arc<str>, Arc<[HeaderName]>);

/// URL → the full keys stored under it (every `Vary` and `key_headers` variant, in
/// either tier), so that invalidation and purge by URL touch only that URL's objects.
/// A key may outlive its object (evicted meanwhile); it is dropped when its URL is
/// invalidated or when the index is pruned. Bounded in bytes: an object whose key
/// would not fit is not stored (a stored object is always findable).
#[derive(Debug, Default)]
struct UrlIndex {
    map: HashMap<Arc<str>, std::collections::HashSet<Arc<str>>>,
    bytes: u64,
    /// `bytes` after the last prune; the next prune waits until the index has grown
    /// by a quarter of the budget since, so that a full index costs no scan per store.
    pruned_at: u64,
}
/// A stored object with what every hit needs precomputed.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) obj: CachedObject,
    pub(crate) policy: ResponsePolicy,
    /// RFC 9111 §4.2.3 `corrected_initial_age`.
    corrected_initial_age: Duration,
}

impl Entry {
    fn new(obj: CachedObject, defaults: StaleDefaults) -> Entry {
        let policy = ResponsePolicy::new(obj.status, &obj.headers, obj.response_time, defaults);
        let corrected_initial_age = policy::current_age(
            &obj.headers,
            obj.request_time,
            obj.response_time,
            obj.response_time,
        );
        Entry {
            obj,
            policy,
            corrected_initial_age,
        }
    }

    /// The object's current age.
    pub(crate) fn age(&self, now: SystemTime) -> Duration {
        self.corrected_initial_age
            + now
                .duration_since(self.obj.response_time)
                .unwrap_or(Duration::ZERO)
    }

    /// Seconds of freshness left (negative when stale), for `Cache-Status: ttl`.
    pub(crate) fn ttl(&self, now: SystemTime) -> i64 {
        let lifetime = i64::try_from(self.policy.lifetime.as_secs()).unwrap_or(i64::MAX);
        let age = i64::try_from(self.age(now).as_secs()).unwrap_or(i64::MAX);
        lifetime.saturating_sub(age)
    }
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// A stored response for this request's variant.
    Found(Arc<Entry>),
    /// Nothing stored under this URL (`fwd=uri-miss`).
    UriMiss,
    /// Responses stored under this URL, none for this request's `Vary` values
    /// (`fwd=vary-miss`); the request's full key.
    VaryMiss(String),
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

/// The outcome of [`Cache::join_flight`].
pub(crate) enum Flight {
    /// This request fetches; others wait for it.
    Leader(FlightGuard),
    /// Another request is fetching: wait on this (it ends when the fetch does).
    Follower(watch::Receiver<()>),
}

/// The cache shared by every connection.
pub struct Cache {
    memory: moka::sync::Cache<Arc<str>, Arc<Entry>>,
    /// Primary key → the `Vary` names of its stored responses (bounded in bytes; a
    /// forgotten entry makes its variants misses).
    vary: moka::sync::Cache<Arc<str>, Arc<[HeaderName]>>,
    /// URL → full keys ([`UrlIndex`]).
    urls: Mutex<UrlIndex>,
    /// Bytes [`UrlIndex`] may take (and, separately, the `Vary` index).
    index_budget: u64,
    /// Longest primary key (URL plus `key_headers` values) cached; longer ones pass.
    pub(crate) max_url_bytes: usize,
    /// Primary keys whose last answer was not cacheable (no coalescing for them).
    pass: moka::sync::Cache<Arc<str>, ()>,
    /// Primary keys not to fill after a range miss (too large or not storable).
    no_fill: moka::sync::Cache<Arc<str>, ()>,
    /// Free range-fill slots ([`MAX_RANGE_FILLS`]).
    fills: Arc<tokio::sync::Semaphore>,
    disk: Option<Arc<DiskTier>>,
    /// Full keys being fetched → the channel their waiters watch.
    inflight: Mutex<HashMap<Arc<str>, watch::Sender<()>>>,
    /// Full keys being refreshed in the background (stale-while-revalidate).
    refreshing: Mutex<std::collections::HashSet<Arc<str>>>,
    pub(crate) max_object_bytes: u64,
    /// Bytes of response bodies being collected for storing, by all requests; at
    /// most `collect_budget`.
    collecting: AtomicU64,
    collect_budget: u64,
    pub(crate) defaults: StaleDefaults,
    pub(crate) coalesce_timeout: Duration,
    pub(crate) purge_token: Option<String>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("memory_objects", &self.memory.entry_count())
            .field("memory_bytes", &self.memory.weighted_size())
            .field("disk", &self.disk.is_some())
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Builds the cache of `[cache]`, opening (and indexing) the disk tier if one is
    /// configured. Blocking when there is a disk tier: call it before serving.
    pub fn new(config: &CacheConfig, metrics: Arc<Metrics>) -> std::io::Result<Cache> {
        let evictions = metrics
            .cache_evictions
            .get_or_create(&TierLabels { tier: "memory" })
            .clone();
        let memory = moka::sync::Cache::builder()
            .max_capacity(config.memory_bytes)
            .weigher(|_k: &Arc<str>, e: &Arc<Entry>| {
                u32::try_from(e.obj.weight()).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build();
        let disk = match &config.disk_dir {
            Some(dir) => {
                let tier = DiskTier::open(dir, config.disk_bytes).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cache disk_dir {}: {e}", dir.display()))
                })?;
                Some(Arc::new(tier))
            }
            None => None,
        };
        let index_budget = index_budget(config);
        let cache = Cache {
            memory,
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
            disk,
            inflight: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(std::collections::HashSet::new()),
            max_object_bytes: config.max_object_bytes,
            collecting: AtomicU64::new(0),
            collect_budget: config.memory_bytes,
            defaults: StaleDefaults {
                while_revalidate: config.stale_while_revalidate.unwrap_or_default(),
                if_error: config.stale_if_error.unwrap_or_default(),
            },
            coalesce_timeout: config.coalesce_timeout,
            purge_token: config.purge_token.clone(),
            metrics,
        };
        cache.rebuild_vary_index();
        cache.update_gauges();
        Ok(cache)
    }

    /// After a restart, the disk tier's keys tell which `Vary` names each URL had and
    /// which keys each URL has; objects whose keys do not fit the index are dropped.
    fn rebuild_vary_index(&self) {
        let Some(disk) = &self.disk else {
            return;
        };
        let found: Mutex<Vec<(String, VaryIndexEntry)>> = Mutex::new(Vec::new());
        disk.remove_matching(&|key: &str| {
            let (primary, names) = split_full_key(key);
            if let Ok(mut f) = found.lock() {
                f.push((key.to_owned(), (primary.into(), names.into())));
            }
            false
        });
        for (key, (primary, names)) in found.into_inner().unwrap_or_default() {
            if self.index_add(&key.as_str().into()) {
                self.vary.insert(primary, names);
            } else {
                disk.remove(&key);
            }
        }
    }

    /// Adds `key` to the URL index; false when it does not fit (then the object is not
    /// stored). Callers add a key after inserting its object, so that a prune running
    /// meanwhile either sees the object or runs before the key is added.
    fn index_add(&self, key: &Arc<str>) -> bool {
        let Ok(mut index) = self.urls.lock() else {
            return false;
        };
        let url = url_of(key);
        if index.map.get(url).is_some_and(|keys| keys.contains(key)) {
            return true;
        }
        let cost = key_cost(key)
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
        index.map.entry(url.into()).or_default().insert(key.clone());
        true
    }

    /// Drops the keys whose objects are in neither tier any more. Scans the index (not
    /// the objects), and only when it is full.
    fn prune(&self, index: &mut UrlIndex) {
        let before = index.bytes;
        let mut bytes = 0;
        index.map.retain(|url, keys| {
            keys.retain(|k| {
                self.memory.contains_key(k) || self.disk.as_ref().is_some_and(|d| d.contains(k))
            });
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

    /// The primary key of a request for `path_and_query` at `host` over `scheme`.
    pub(crate) fn primary_key(
        site: &Site,
        scheme: &str,
        host: &str,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> String {
        let host = crate::sites::normalize(host);
        let target = if site.cache_ignore_query {
            path_and_query.split('?').next().unwrap_or("/")
        } else {
            path_and_query
        };
        let mut key = String::with_capacity(scheme.len() + host.len() + target.len() + 3);
        key.push_str(scheme);
        key.push_str("://");
        key.push_str(&host);
        key.push_str(target);
        for name in &site.cache_key_headers {
            key.push('\n');
            key.push_str(name.as_str());
            key.push('=');
            let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
            key.push_str(&String::from_utf8_lossy(&values.join(&b","[..])));
        }
        key
    }

    /// Answers `req` (in upstream form, for `host`) for `site` from the cache, fetching
    /// from `origin` what it cannot answer; see [`flow`].
    pub async fn handle<F: Fetch>(
        self: &Arc<Self>,
        origin: &Arc<F>,
        req: http::Request<EdgeBody>,
        host: &str,
        site: &Arc<Site>,
        ctx: &ClientCtx,
    ) -> http::Response<EdgeBody> {
        flow::handle(origin, self, req, host, site, ctx).await
    }

    /// Finds the stored response for a request (memory, then disk).
    pub(crate) async fn lookup(&self, primary: &str, headers: &HeaderMap) -> Lookup {
        let Some(names) = self.vary.get(primary) else {
            return Lookup::UriMiss;
        };
        let full: std::borrow::Cow<'_, str> = if names.is_empty() {
            std::borrow::Cow::Borrowed(primary)
        } else {
            std::borrow::Cow::Owned(full_key(primary, &names, headers))
        };
        if let Some(e) = self.memory.get(full.as_ref()) {
            return Lookup::Found(e);
        }
        if let Some(disk) = &self.disk {
            if let Some(obj) = disk.get(&full).await {
                let entry = Arc::new(Entry::new(obj, self.defaults));
                if entry.obj.weight() <= self.max_object_bytes {
                    self.memory.insert(full.as_ref().into(), entry.clone());
                }
                return Lookup::Found(entry);
            }
        }
        if names.is_empty() {
            Lookup::UriMiss
        } else {
            Lookup::VaryMiss(full.into_owned())
        }
    }

    /// Stores a complete response in memory (and, in the background, on disk). The
    /// entry is returned even when it could not be stored (the URL index is full).
    pub(crate) fn store(
        self: &Arc<Self>,
        obj: CachedObject,
        names: Arc<[HeaderName]>,
    ) -> Arc<Entry> {
        let (primary, _) = split_full_key(&obj.key);
        let primary: Arc<str> = primary.into();
        let key: Arc<str> = obj.key.as_str().into();
        let entry = Arc::new(Entry::new(obj, self.defaults));
        self.memory.insert(key.clone(), entry.clone());
        if !self.index_add(&key) {
            self.memory.invalidate(&key);
            tracing::debug!(key = %keyless_shared::log_safe(&key), "cache URL index full; response not stored");
            return entry;
        }
        self.vary.insert(primary, names);
        self.metrics.cache_stores.inc();
        if let Some(disk) = &self.disk {
            let disk = disk.clone();
            let entry = entry.clone();
            let cache = self.clone();
            tokio::spawn(async move {
                disk.put(&entry.obj).await;
                cache.update_gauges();
            });
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
            self.vary.invalidate(split_full_key(&key).0);
            let in_memory = self.memory.remove(&key).is_some();
            let on_disk = self.disk.as_ref().is_some_and(|d| d.remove(&key));
            if in_memory || on_disk {
                removed += 1;
            }
        }
        self.update_gauges();
        removed
    }

    /// Removes the memory objects for which `in_memory` holds and what `on_disk`
    /// removes from the disk tier; objects on both tiers count once.
    fn remove_where(
        &self,
        in_memory: &dyn Fn(&str, &Entry) -> bool,
        on_disk: &dyn Fn(&DiskTier) -> usize,
    ) -> usize {
        let keys: Vec<Arc<str>> = self
            .memory
            .iter()
            .filter(|(k, e)| in_memory(k, e))
            .map(|(k, _)| k.as_ref().clone())
            .collect();
        let mut removed = keys.len();
        for k in keys {
            self.memory.invalidate(&k);
        }
        if let Some(disk) = &self.disk {
            removed = removed.max(on_disk(disk));
        }
        self.update_gauges();
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
        let matches = |key: &str| key.starts_with(prefix);
        let n = self.remove_where(&|key, _| matches(key), &|disk| {
            disk.remove_matching(&matches)
        });
        self.metrics.cache_purged.inc_by(n as u64);
        n
    }

    /// Purge API: every object tagged `tag` (`Surrogate-Key` / `Cache-Tag`).
    pub fn purge_tag(&self, tag: &str) -> usize {
        let n = self.remove_where(&|_, e| e.obj.tags().iter().any(|t| t == tag), &|disk| {
            disk.remove_tag(tag)
        });
        self.metrics.cache_purged.inc_by(n as u64);
        n
    }

    /// Whether the purge API is enabled (`None` when not) and `token` is its bearer
    /// token. Both sides are hashed first, so the comparison time depends neither on
    /// where they differ nor on the token's length.
    pub fn purge_authorized(&self, token: &[u8]) -> Option<bool> {
        use subtle::ConstantTimeEq;
        let expected = self.purge_token.as_ref()?;
        let a = ring::digest::digest(&ring::digest::SHA256, expected.as_bytes());
        let b = ring::digest::digest(&ring::digest::SHA256, token);
        Some(bool::from(a.as_ref().ct_eq(b.as_ref())))
    }

    /// Joins the fetch of `key`: the first caller leads, the others follow. `None`
    /// when the key is marked not cacheable (no coalescing).
    pub(crate) fn join_flight(self: &Arc<Self>, primary: &str, key: &str) -> Option<Flight> {
        if self.pass.contains_key(primary) {
            return None;
        }
        let mut map = self.inflight.lock().ok()?;
        if let Some(tx) = map.get(key) {
            return Some(Flight::Follower(tx.subscribe()));
        }
        let key: Arc<str> = key.into();
        let (tx, _rx) = watch::channel(());
        map.insert(key.clone(), tx);
        Some(Flight::Leader(FlightGuard {
            cache: self.clone(),
            key,
        }))
    }

    /// Marks `primary` as not cacheable for a while: requests for it skip coalescing.
    pub(crate) fn mark_pass(&self, primary: &str) {
        self.pass.insert(primary.into(), ());
    }

    /// Clears a pass mark (the URL answered with something cacheable).
    pub(crate) fn clear_pass(&self, primary: &str) {
        self.pass.invalidate(primary);
    }

    /// Remembers (for [`NO_FILL_TTL`]) that `primary` is not filled after range misses.
    pub(crate) fn refuse_fill(&self, primary: &str) {
        self.no_fill.insert(primary.into(), ());
    }

    /// Whether `primary` was found too large or not storable lately.
    pub(crate) fn fill_refused(&self, primary: &str) -> bool {
        self.no_fill.contains_key(primary)
    }

    /// A range-fill slot, if one is free.
    pub(crate) fn fill_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.fills.clone().try_acquire_owned().ok()
    }

    /// Starts a background refresh of `key` unless one is running; the returned guard
    /// ends it.
    pub(crate) fn begin_refresh(self: &Arc<Self>, key: &str) -> Option<RefreshGuard> {
        let mut set = self.refreshing.lock().ok()?;
        let key: Arc<str> = key.into();
        set.insert(key.clone()).then(|| RefreshGuard {
            cache: self.clone(),
            key,
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

    /// Refreshes the tier gauges.
    pub fn update_gauges(&self) {
        let m = &self.metrics;
        let memory = TierLabels { tier: "memory" };
        m.cache_bytes
            .get_or_create(&memory)
            .set(i64::try_from(self.memory.weighted_size()).unwrap_or(i64::MAX));
        m.cache_objects
            .get_or_create(&memory)
            .set(i64::try_from(self.memory.entry_count()).unwrap_or(i64::MAX));
        if let Some(disk) = &self.disk {
            let tier = TierLabels { tier: "disk" };
            m.cache_bytes
                .get_or_create(&tier)
                .set(i64::try_from(disk.bytes()).unwrap_or(i64::MAX));
            m.cache_objects
                .get_or_create(&tier)
                .set(i64::try_from(disk.len()).unwrap_or(i64::MAX));
            let evicted = disk.evictions();
            let counter = m.cache_evictions.get_or_create(&tier);
            let seen = counter.get();
            if evicted > seen {
                counter.inc_by(evicted - seen);
            }
        }
    }

    /// Runs the memory tier's pending maintenance (evictions) and refreshes gauges;
    /// called before metrics are rendered.
    pub fn maintain(&self) {
        self.memory.run_pending_tasks();
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

/// Separates variant keys from their primary key.
const VARY_SEP: char = '\0';

/// `primary` itself when `names` is empty, else
/// `primary \0 name,name \0 sha256(values)` (hex).
pub(crate) fn full_key(primary: &str, names: &[HeaderName], headers: &HeaderMap) -> String {
    if names.is_empty() {
        return primary.to_owned();
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut key = String::with_capacity(primary.len() + 80);
    key.push_str(primary);
    key.push(VARY_SEP);
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        key.push_str(name.as_str());
        // The request's value of the field: its lines combined, whitespace around
        // commas normalized (RFC 9111 §4.1).
        let mut first = true;
        for v in headers.get_all(name) {
            for part in v.as_bytes().split(|&b| b == b',') {
                if !first {
                    ctx.update(b",");
                }
                first = false;
                ctx.update(part.trim_ascii());
            }
        }
        ctx.update(if first { b"\x01" } else { b"\x00" });
    }
    key.push(VARY_SEP);
    for b in ctx.finish().as_ref().iter().take(16) {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// The primary key and `Vary` names encoded in a full key.
fn split_full_key(key: &str) -> (&str, Vec<HeaderName>) {
    match key.split_once(VARY_SEP) {
        None => (key, Vec::new()),
        Some((primary, rest)) => {
            let names = rest
                .split(VARY_SEP)
                .next()
                .unwrap_or("")
                .split(',')
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect();
            (primary, names)
        }
    }
}

/// The URL of a primary or full key: up to its first `key_headers` or `Vary` part.
fn url_of(key: &str) -> &str {
    key.split(['\n', VARY_SEP]).next().unwrap_or(key)
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
    use http::HeaderValue;

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

    fn object(key: String) -> CachedObject {
        CachedObject {
            key,
            status: http::StatusCode::OK,
            headers: HeaderMap::new(),
            body: bytes::Bytes::from_static(b"x"),
            request_time: SystemTime::now(),
            response_time: SystemTime::now(),
            vary: Vec::new(),
        }
    }

    #[test]
    fn invalidation_finds_every_variant_through_the_url_index() {
        let cache =
            Arc::new(Cache::new(&CacheConfig::default(), Arc::new(Metrics::new())).unwrap());
        let names: Arc<[HeaderName]> = vec![HeaderName::from_static("accept-language")].into();
        for (lang, tenant) in [("en", "1"), ("fr", "1"), ("en", "2")] {
            let mut h = HeaderMap::new();
            h.insert("accept-language", HeaderValue::from_str(lang).unwrap());
            let primary = format!("https://x/a\nx-tenant={tenant}");
            cache.store(object(full_key(&primary, &names, &h)), names.clone());
        }
        cache.store(object("https://x/a?q".into()), Arc::from(Vec::new()));
        cache.store(object("https://x/ab".into()), Arc::from(Vec::new()));
        assert_eq!(cache.invalidate("https://x/a"), 3);
        assert_eq!(cache.invalidate("https://x/a"), 0);
        assert_eq!(cache.memory.iter().count(), 2);
        assert_eq!(cache.purge_url("https://x/ab"), 1);
        assert_eq!(cache.urls.lock().unwrap().map.len(), 1);
    }

    #[test]
    fn the_url_index_is_bounded_in_bytes_and_pruned_when_full() {
        let cache =
            Arc::new(Cache::new(&CacheConfig::default(), Arc::new(Metrics::new())).unwrap());
        let budget = cache.index_budget;
        let long = "p".repeat(1000);
        let bytes = || cache.urls.lock().unwrap().bytes;
        let mut stored = 0u64;
        loop {
            let before = bytes();
            cache.store(
                object(format!("https://x/{stored}/{long}")),
                Arc::from(Vec::new()),
            );
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
        let refused = format!("https://x/{stored}/{long}");
        assert!(!cache.memory.contains_key(refused.as_str()));
        // Once the objects are gone, a prune makes room again.
        assert!(cache.purge_prefix("https://x/") as u64 == stored);
        cache.urls.lock().unwrap().pruned_at = 0;
        assert!(cache.index_add(&Arc::from(refused.as_str())));
        assert_eq!(cache.urls.lock().unwrap().map.len(), 1);
    }

    #[test]
    fn full_keys_split_back_and_normalize_values() {
        let names = vec![HeaderName::from_static("accept-language")];
        let mut a = HeaderMap::new();
        a.insert("accept-language", HeaderValue::from_static("en,  fr"));
        let mut b = HeaderMap::new();
        b.insert("accept-language", HeaderValue::from_static("en, fr"));
        let empty = HeaderMap::new();
        let ka = full_key("https://x/a", &names, &a);
        assert_eq!(ka, full_key("https://x/a", &names, &b));
        assert_ne!(ka, full_key("https://x/a", &names, &empty));
        let (primary, n) = split_full_key(&ka);
        assert_eq!(primary, "https://x/a");
        assert_eq!(n, names);
        assert_eq!(url_of(&ka), "https://x/a");
        assert_eq!(url_of("https://x/a\nx-tenant=1"), "https://x/a");
        let with_key_header = full_key("https://x/a\nx-tenant=1", &names, &a);
        assert_eq!(url_of(&with_key_header), "https://x/a");
        assert_eq!(url_of("https://x/ab"), "https://x/ab");
    }
}
