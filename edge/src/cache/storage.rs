//! The storage interface of the cache, in the spirit of pingora-cache's `storage.rs`:
//! what a tier provides (look up, insert, remove, purge by prefix or tag, list its
//! keys), implemented by the memory tier ([`MemoryTier`], `moka`) and the disk tier
//! ([`DiskStore`] over [`DiskTier`]). The cache holds its tiers fastest first and
//! knows nothing else of them; the HTTP flow knows nothing of tiers at all.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moka::notification::RemovalCause;

use super::disk::{DiskStream, DiskTier};
use super::object::{CachedObject, Entry};
use super::policy::StaleDefaults;

/// A tier's future (a disk read or write).
pub(crate) type StorageFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What [`Storage::purge`] removes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Purge<'a> {
    /// Every object whose key starts with this URL prefix.
    Prefix(&'a str),
    /// Every object tagged with this surrogate key.
    Tag(&'a str),
}

/// A tier's size, for the gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) bytes: u64,
    pub(crate) objects: u64,
    /// Objects evicted to stay within the size bound, since the tier was opened.
    pub(crate) evictions: u64,
}

/// What a storage tier does for the cache. Keys are [`super::key::CacheKey`] texts.
pub(crate) trait Storage: Send + Sync + 'static {
    /// The tier's name in metrics (`memory`, `disk`).
    fn tier(&self) -> &'static str;

    /// The object stored under `key`.
    fn get<'a>(&'a self, key: &'a str) -> StorageFuture<'a, Option<Arc<Entry>>>;

    /// Stores `entry` under its key. `None` when done already (then the next `get`
    /// finds it); else the write, which the cache runs in the background.
    fn put(self: Arc<Self>, entry: Arc<Entry>) -> Option<StorageFuture<'static, ()>>;

    /// Removes `key`; whether it was stored.
    fn remove(&self, key: &str) -> bool;

    /// Whether `key` is stored (or being stored).
    fn contains(&self, key: &str) -> bool;

    /// Removes what `purge` selects; how many objects.
    fn purge(&self, purge: Purge<'_>) -> usize;

    /// Calls `f` with each stored key.
    fn for_each_key(&self, f: &mut dyn FnMut(&str));

    /// Bytes and objects stored.
    fn usage(&self) -> Usage;

    /// Runs pending housekeeping (evictions) before the gauges are read.
    fn maintain(&self) {}
}

/// The memory tier: `moka`, bounded in bytes by a weigher ([`super::object::CachedObject::weight`]),
/// TinyLFU admission and LRU eviction.
pub(crate) struct MemoryTier {
    objects: moka::sync::Cache<Arc<str>, Arc<Entry>>,
    evictions: Arc<AtomicU64>,
}

impl MemoryTier {
    /// A memory tier of at most `max_bytes`.
    pub(crate) fn new(max_bytes: u64) -> MemoryTier {
        let evictions = Arc::new(AtomicU64::new(0));
        let evicted = evictions.clone();
        let objects = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &Arc<str>, e: &Arc<Entry>| {
                u32::try_from(e.obj.weight()).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    evicted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        MemoryTier { objects, evictions }
    }
}

impl Storage for MemoryTier {
    fn tier(&self) -> &'static str {
        "memory"
    }

    fn get<'a>(&'a self, key: &'a str) -> StorageFuture<'a, Option<Arc<Entry>>> {
        Box::pin(std::future::ready(self.objects.get(key)))
    }

    fn put(self: Arc<Self>, entry: Arc<Entry>) -> Option<StorageFuture<'static, ()>> {
        // A body read from disk when served stays there.
        if !entry.obj.body.on_disk() {
            self.objects.insert(entry.obj.key.shared().clone(), entry);
        }
        None
    }

    fn remove(&self, key: &str) -> bool {
        self.objects.remove(key).is_some()
    }

    fn contains(&self, key: &str) -> bool {
        self.objects.contains_key(key)
    }

    fn purge(&self, purge: Purge<'_>) -> usize {
        let keys: Vec<Arc<str>> = self
            .objects
            .iter()
            .filter(|(k, e)| match purge {
                Purge::Prefix(prefix) => k.starts_with(prefix),
                Purge::Tag(tag) => e.obj.tags().iter().any(|t| t == tag),
            })
            .map(|(k, _)| k.as_ref().clone())
            .collect();
        for k in &keys {
            self.objects.invalidate(k);
        }
        keys.len()
    }

    fn for_each_key(&self, f: &mut dyn FnMut(&str)) {
        for (k, _) in self.objects.iter() {
            f(&k);
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            bytes: self.objects.weighted_size(),
            objects: self.objects.entry_count(),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    fn maintain(&self) {
        self.objects.run_pending_tasks();
    }
}

/// The disk tier as a [`Storage`]: objects read back get their policy computed with
/// the cache's stale defaults.
pub(crate) struct DiskStore {
    disk: DiskTier,
    defaults: StaleDefaults,
}

impl DiskStore {
    /// The store of `disk`; block reads of large objects are timed in `block_seconds`.
    pub(crate) fn new(
        disk: DiskTier,
        defaults: StaleDefaults,
        block_seconds: prometheus_client::metrics::histogram::Histogram,
    ) -> DiskStore {
        DiskStore {
            disk: disk.with_block_timer(block_seconds),
            defaults,
        }
    }

    /// Starts a put of a large object whose body will stream in (blocking: creates
    /// its file).
    pub(crate) fn begin_stream(&self, template: &CachedObject) -> Option<DiskStream> {
        self.disk.begin_stream(template)
    }
}

impl Storage for DiskStore {
    fn tier(&self) -> &'static str {
        "disk"
    }

    fn get<'a>(&'a self, key: &'a str) -> StorageFuture<'a, Option<Arc<Entry>>> {
        Box::pin(async move {
            let obj = self.disk.get(key).await?;
            Some(Arc::new(Entry::new(obj, self.defaults)))
        })
    }

    fn put(self: Arc<Self>, entry: Arc<Entry>) -> Option<StorageFuture<'static, ()>> {
        Some(Box::pin(async move { self.disk.put(&entry.obj).await }))
    }

    fn remove(&self, key: &str) -> bool {
        self.disk.remove(key)
    }

    fn contains(&self, key: &str) -> bool {
        self.disk.contains(key)
    }

    fn purge(&self, purge: Purge<'_>) -> usize {
        match purge {
            Purge::Prefix(prefix) => self.disk.remove_matching(&|k| k.starts_with(prefix)),
            Purge::Tag(tag) => self.disk.remove_tag(tag),
        }
    }

    fn for_each_key(&self, f: &mut dyn FnMut(&str)) {
        self.disk.for_each_key(f);
    }

    fn usage(&self) -> Usage {
        Usage {
            bytes: self.disk.bytes(),
            objects: self.disk.len() as u64,
            evictions: self.disk.evictions(),
        }
    }
}
