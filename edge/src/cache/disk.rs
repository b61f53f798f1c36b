//! The disk tier: a byte-bounded store of [`CachedObject`]s, one file per object,
//! that survives a restart of the process.
//!
//! Layout: `dir/XY/<sha256(key) hex>` where `XY` is the first hex byte; temp files
//! (`<hash>.<pid>.<n>.tmp`, same subdirectory) are renamed over the final name, so a
//! reader sees the old or the new file, never a mix. No fsync: a crash may leave a
//! truncated or empty file, which the length check at [`DiskTier::open`] and the
//! checksum at [`DiskTier::get`] detect and drop.
//!
//! File format, integers little-endian:
//!
//! ```text
//! magic     b"KLC1"
//! meta_len  u32            (≤ 1 MiB)
//! meta      key:   u32 len + UTF-8 bytes
//!           status: u16
//!           request_time, response_time: u8 sign (0 after / 1 before the epoch),
//!                                        u64 seconds, u32 nanoseconds
//!           headers: u32 count (≤ 1000), each u32 len + name, u32 len + value
//!           vary:    u32 count (≤ 1000), each u32 len + name, u8 present (0/1),
//!                    [u32 len + value when present]
//! body_len  u64
//! body      [body_len]
//! checksum  SHA-256 of everything above (32 bytes)
//! ```
//!
//! The index (key → file, size, recency, tags) lives in memory behind a
//! `std::sync::Mutex`; it is rebuilt at open from each file's metadata, with the
//! file's mtime as last access (`get` refreshes the mtime).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus_client::metrics::histogram::Histogram;
use ring::digest;
use tracing::{debug, warn};

use super::blocks::{self, BlockFile, BlockWriter};
use super::format::{
    decode_meta, eof_truncated, put_bytes, put_time, FormatError, Meta, Reader, FILE_MODE,
    MAX_FIELDS, MAX_META,
};
use super::key::CacheKey;
use super::object::{CachedObject, StoredBody};

const MAGIC: &[u8; 4] = b"KLC1";
/// `magic` + `meta_len` + `body_len` + checksum.
const FIXED: u64 = 4 + 4 + 8 + 32;
const CHECKSUM_LEN: usize = 32;

/// A bounded on-disk store of cached objects (see the module docs). `Send + Sync`;
/// share it behind an `Arc`.
#[derive(Debug)]
pub(crate) struct DiskTier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    evictions: AtomicU64,
    /// Distinguishes temp files of concurrent puts.
    tmp_counter: AtomicU64,
    /// Times each block read of a large object.
    block_seconds: Option<Histogram>,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<String, Entry>,
    /// Recency order: tick → key, oldest first.
    lru: BTreeMap<u64, String>,
    next_tick: u64,
    next_gen: u64,
    bytes: u64,
    /// Puts between their start and their commit; a removal that matches one cancels
    /// it, so an object purged while it was being written does not reappear.
    pending: HashMap<u64, Pending>,
}

#[derive(Debug)]
struct Entry {
    size: u64,
    tick: u64,
    /// Changes at every put of the key: lets a failed `get` drop only the entry it
    /// read, not one a concurrent put just committed.
    gen: u64,
    tags: Vec<String>,
}

#[derive(Debug)]
struct Pending {
    key: String,
    tags: Vec<String>,
    cancelled: bool,
}

impl Index {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn touch(&mut self, key: &str) -> Option<u64> {
        let tick = self.tick();
        let e = self.entries.get_mut(key)?;
        self.lru.remove(&e.tick);
        e.tick = tick;
        self.lru.insert(tick, key.to_owned());
        Some(e.gen)
    }

    /// Drops `key` from the index (not the file); returns the entry.
    fn take(&mut self, key: &str) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.lru.remove(&e.tick);
        self.bytes = self.bytes.saturating_sub(e.size);
        Some(e)
    }
}

impl DiskTier {
    /// Opens (creating) `dir`, removes temp files and unreadable or corrupt entries,
    /// rebuilds the index from the files' metadata (last access = mtime), and evicts
    /// the least recently used entries above `max_bytes` (counted in
    /// [`evictions`](Self::evictions)). Blocking: call it once at start, outside the
    /// async runtime or in `spawn_blocking`.
    ///
    /// Open checks each file's magic, metadata and total length (which catches a
    /// write cut short); the body checksum is verified when the object is read.
    ///
    /// # Errors
    ///
    /// Creating or listing `dir` (or one of its subdirectories) failed. A bad entry
    /// is not an error: it is removed.
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> io::Result<DiskTier> {
        create_private_dir(dir)?;
        // Cached responses are other users' content: only the edge's user reads them.
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
        let mut found: Vec<(SystemTime, String, u64, Vec<String>)> = Vec::new();
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            let name = sub.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.len() == 2 && is_lower_hex(name) && sub.file_type()?.is_dir()) {
                continue; // not ours: leave it alone
            }
            // Directories and files of an older version may be group/world-readable.
            fs::set_permissions(sub.path(), fs::Permissions::from_mode(DIR_MODE))?;
            for file in fs::read_dir(sub.path())? {
                let file = file?;
                let path = file.path();
                let fname = file.file_name();
                let valid_name = fname
                    .to_str()
                    .is_some_and(|f| f.len() == 64 && is_lower_hex(f) && f.starts_with(name));
                if !valid_name || !file.file_type().is_ok_and(|t| t.is_file()) {
                    debug!(path = %path.display(), "removing stray file from disk cache");
                    remove_path(&path);
                    continue;
                }
                match scan_file(&path) {
                    Ok((meta, size, mtime))
                        if fname.to_str() == Some(hash_hex(&meta.key).as_str()) =>
                    {
                        if let Err(e) =
                            fs::set_permissions(&path, fs::Permissions::from_mode(FILE_MODE))
                        {
                            warn!(path = %path.display(), error = %e, "cannot make a disk cache file private");
                        }
                        let tags = super::object::surrogate_keys(&meta.headers);
                        found.push((mtime, meta.key, size, tags));
                    }
                    Ok(_) => {
                        warn!(path = %path.display(), "disk cache file holds another key; removing");
                        remove_path(&path);
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "corrupt disk cache file; removing");
                        remove_path(&path);
                    }
                }
            }
        }
        found.sort_by_key(|f| f.0);
        let mut index = Index::default();
        for (_, key, size, tags) in found {
            let tick = index.tick();
            index.next_gen += 1;
            index.bytes += size;
            index.lru.insert(tick, key.clone());
            index.entries.insert(
                key,
                Entry {
                    size,
                    tick,
                    gen: index.next_gen,
                    tags,
                },
            );
        }
        let inner = Inner {
            dir: dir.to_owned(),
            max_bytes,
            index: Mutex::new(index),
            evictions: AtomicU64::new(0),
            tmp_counter: AtomicU64::new(0),
            block_seconds: None,
        };
        {
            let mut index = inner.lock();
            inner.evict(&mut index);
        }
        Ok(DiskTier {
            inner: Arc::new(inner),
        })
    }

    /// Times each block read of a large object in `h`. Call before sharing the tier.
    pub(crate) fn with_block_timer(mut self, h: Histogram) -> DiskTier {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.block_seconds = Some(h);
        }
        self
    }

    /// The object stored under `key`, read from its file on a blocking thread; `None`
    /// if absent or unreadable (an unreadable or corrupt file is removed with its
    /// entry). A hit makes the key the most recently used and refreshes the file's
    /// mtime, so recency survives a restart.
    pub(crate) async fn get(&self, key: &str) -> Option<CachedObject> {
        let gen = self.inner.lock().touch(key)?;
        let inner = Arc::clone(&self.inner);
        let owned = key.to_owned();
        let read = tokio::task::spawn_blocking(move || inner.read(&owned, gen)).await;
        let result = match read {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "disk cache read task failed");
                return None;
            }
        };
        let mut index = self.inner.lock();
        match result {
            Ok(obj) => {
                // Removed or replaced while we read it: what we read may predate a
                // purge that has since returned, so report a miss rather than undo it.
                index
                    .entries
                    .get(key)
                    .is_some_and(|entry| entry.gen == gen)
                    .then_some(obj)
            }
            Err(e) => {
                if index.entries.get(key).is_some_and(|entry| entry.gen == gen) {
                    warn!(key = %keyless_shared::log_safe(key), error = %e, "unreadable disk cache entry; removing");
                    index.take(key);
                    remove_path(&self.inner.path(key));
                }
                None
            }
        }
    }

    /// Stores `obj` under `obj.key`: writes a temp file on a blocking thread, renames
    /// it over the key's file, then evicts least recently used entries until the total
    /// is within the bound. An object whose file would exceed the bound is not stored.
    /// Errors are logged and swallowed: the cache keeps working from memory.
    pub(crate) async fn put(&self, obj: &CachedObject) {
        let inner = Arc::clone(&self.inner);
        let obj = obj.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || inner.store(&obj)).await {
            warn!(error = %e, "disk cache write task failed");
        }
    }

    /// Starts a put of `obj` whose body (ignored here) will stream in: registers it
    /// (a purge cancels it) and creates its temp file with the head. Blocking (one
    /// file creation). `None` when the file cannot be created.
    pub(crate) fn begin_stream(&self, obj: &CachedObject) -> Option<DiskStream> {
        let key = keyless_shared::log_safe(obj.key.as_str());
        let meta = encode_meta(obj)
            .inspect_err(|e| warn!(%key, error = %e, "object not storable on disk"))
            .ok()?;
        let final_path = self.inner.path(obj.key.as_str());
        let tmp = self.inner.tmp_path(&final_path);
        let writer = final_path
            .parent()
            .map_or(Ok(()), create_private_dir)
            .and_then(|()| BlockWriter::create(&tmp, &meta))
            .inspect_err(|e| warn!(%key, error = %e, "creating disk cache file failed"))
            .ok()?;
        let tags = obj.tags();
        let id = self.inner.begin(obj.key.as_str(), tags.clone());
        Some(DiskStream {
            inner: Arc::clone(&self.inner),
            staged: Some(Staged {
                id,
                key: obj.key.as_str().to_owned(),
                tags,
                size: 0,
                tmp,
                final_path,
            }),
            writer: Some(writer),
        })
    }

    /// Removes `key` (and cancels a put of it in progress); returns whether it was
    /// stored. Does not scan the index.
    pub(crate) fn remove(&self, key: &str) -> bool {
        let mut index = self.inner.lock();
        for p in index.pending.values_mut() {
            if p.key == key {
                p.cancelled = true;
            }
        }
        // The file goes under the lock, as in `remove_where`: a put of the same key
        // committing meanwhile must not lose its new file.
        let removed = index.take(key).is_some();
        if removed {
            remove_path(&self.inner.path(key));
        }
        removed
    }

    /// Whether `key` is stored or being stored.
    pub(crate) fn contains(&self, key: &str) -> bool {
        let index = self.inner.lock();
        index.entries.contains_key(key) || index.pending.values().any(|p| p.key == key)
    }

    /// Calls `f` with every stored key (not those being written).
    pub(crate) fn for_each_key(&self, f: &mut dyn FnMut(&str)) {
        let keys: Vec<String> = self.inner.lock().entries.keys().cloned().collect();
        for k in &keys {
            f(k);
        }
    }

    /// Removes every key for which `pred` holds (purge by URL or prefix); returns how
    /// many were stored. Scans the whole index.
    pub(crate) fn remove_matching(&self, pred: &dyn Fn(&str) -> bool) -> usize {
        self.inner.remove_where(|k, _| pred(k))
    }

    /// Removes every object tagged `tag` (see [`CachedObject::tags`]); returns how
    /// many. Scans the whole index.
    pub(crate) fn remove_tag(&self, tag: &str) -> usize {
        self.inner
            .remove_where(|_, tags| tags.iter().any(|t| t == tag))
    }

    /// Bytes used: the sum of the stored files' sizes.
    pub(crate) fn bytes(&self) -> u64 {
        self.inner.lock().bytes
    }

    /// Number of stored objects.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether no object is stored.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Objects evicted to fit the byte bound since open (including at open).
    pub(crate) fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index inconsistent in a way
        // that matters more than losing the cache; keep serving.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, key: &str) -> PathBuf {
        let h = hash_hex(key);
        let sub = h.get(..2).unwrap_or("00").to_owned();
        self.dir.join(sub).join(h)
    }

    /// Evicts least recently used entries until within the bound. Called with the lock.
    fn evict(&self, index: &mut Index) {
        while index.bytes > self.max_bytes {
            let Some((_, key)) = index.lru.pop_first() else {
                break;
            };
            if let Some(e) = index.entries.remove(&key) {
                index.bytes = index.bytes.saturating_sub(e.size);
            }
            remove_path(&self.path(&key));
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove_where(&self, pred: impl Fn(&str, &[String]) -> bool) -> usize {
        let mut index = self.lock();
        for p in index.pending.values_mut() {
            if pred(&p.key, &p.tags) {
                p.cancelled = true;
            }
        }
        let doomed: Vec<String> = index
            .entries
            .iter()
            .filter(|(k, e)| pred(k, &e.tags))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &doomed {
            index.take(key);
            remove_path(&self.path(key));
        }
        doomed.len()
    }

    /// Reads the file of `key`: a `KLC1` file whole and verified, a `KLC2` file's head
    /// and checksum table only (its body is read block by block when served; a
    /// corrupt block drops the entry of generation `gen`).
    fn read(self: &Arc<Self>, key: &str, gen: u64) -> Result<CachedObject, FormatError> {
        let path = self.path(key);
        let mut file = File::open(&path)?;
        let size = file.metadata()?.len();
        let mut magic = [0u8; 4];
        file.read_exact(&mut magic).map_err(eof_truncated)?;
        let obj = if &magic == blocks::MAGIC {
            let (meta, mut body) = BlockFile::open(file.try_clone()?, size)?;
            let tier = Arc::downgrade(self);
            let owned = key.to_owned();
            body.on_corrupt(Box::new(move || {
                if let Some(tier) = tier.upgrade() {
                    tier.drop_corrupt(&owned, gen);
                }
            }));
            if let Some(h) = &self.block_seconds {
                body.time_reads(h.clone());
            }
            object_of(meta, StoredBody::disk(body))
        } else {
            if size > self.max_bytes {
                return Err(FormatError::Bound("file size"));
            }
            let mut buf = magic.to_vec();
            buf.reserve(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut buf)?;
            decode(Bytes::from(buf))?
        };
        if obj.key.as_str() != key {
            return Err(FormatError::WrongKey);
        }
        if let Err(e) = file.set_modified(SystemTime::now()) {
            debug!(path = %path.display(), error = %e, "could not refresh disk cache mtime");
        }
        Ok(obj)
    }

    /// Drops `key` after a corrupt block was read from it, unless it was replaced
    /// since (another generation).
    fn drop_corrupt(&self, key: &str, gen: u64) {
        let mut index = self.lock();
        if index.entries.get(key).is_some_and(|e| e.gen == gen) {
            warn!(key = %keyless_shared::log_safe(key), "corrupt block in disk cache file; removing");
            index.take(key);
            remove_path(&self.path(key));
        }
    }

    /// The body of [`DiskTier::put`], on a blocking thread.
    fn store(&self, obj: &CachedObject) {
        if let Some(staged) = self.stage(obj) {
            self.commit(staged);
        }
    }

    /// First half of a put: registers it as pending (so a purge can cancel it) and
    /// writes the temp file. `None` if the object is not stored.
    fn stage(&self, obj: &CachedObject) -> Option<Staged> {
        let meta = match encode_meta(obj) {
            Ok(m) => m,
            Err(e) => {
                warn!(key = %keyless_shared::log_safe(obj.key.as_str()), error = %e, "object not storable on disk");
                return None;
            }
        };
        let size = match &obj.body {
            StoredBody::Memory(b) => FIXED + meta.len() as u64 + b.len() as u64,
            StoredBody::Disk { .. } => {
                blocks::file_size(meta.len() as u64, obj.body.len()).unwrap_or(u64::MAX)
            }
        };
        if size > self.max_bytes {
            debug!(key = %keyless_shared::log_safe(obj.key.as_str()), size, "object larger than the disk cache; not stored");
            return None;
        }
        let tags = obj.tags();
        let id = self.begin(obj.key.as_str(), tags.clone());
        let final_path = self.path(obj.key.as_str());
        let tmp = self.tmp_path(&final_path);
        let written = match &obj.body {
            StoredBody::Memory(b) => write_file(&tmp, &meta, b),
            disk => copy_blocks(&tmp, &meta, disk),
        };
        if let Err(e) = written {
            self.lock().pending.remove(&id);
            warn!(key = %keyless_shared::log_safe(obj.key.as_str()), error = %e, "writing disk cache file failed");
            remove_path(&tmp);
            return None;
        }
        Some(Staged {
            id,
            key: obj.key.as_str().to_owned(),
            tags,
            size,
            tmp,
            final_path,
        })
    }

    /// A temp file name beside `final_path`, unique in this process.
    fn tmp_path(&self, final_path: &Path) -> PathBuf {
        final_path.with_extension(format!(
            "{}.{}.tmp",
            std::process::id(),
            self.tmp_counter.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Registers a put of `key` as pending (a purge of it cancels it); its id.
    fn begin(&self, key: &str, tags: Vec<String>) -> u64 {
        let mut index = self.lock();
        index.next_gen += 1;
        let id = index.next_gen;
        index.pending.insert(
            id,
            Pending {
                key: key.to_owned(),
                tags,
                cancelled: false,
            },
        );
        id
    }

    /// Second half of a put: renames the temp file into place and indexes it, unless
    /// a purge cancelled the put meanwhile; then evicts down to the bound. Whether
    /// the object is stored.
    fn commit(&self, staged: Staged) -> bool {
        let mut index = self.lock();
        let cancelled = index.pending.remove(&staged.id).is_none_or(|p| p.cancelled);
        if cancelled {
            drop(index);
            remove_path(&staged.tmp);
            return false;
        }
        // Renaming under the lock keeps the file and the index in the same order when
        // puts of one key race.
        if let Err(e) = fs::rename(&staged.tmp, &staged.final_path) {
            drop(index);
            warn!(key = %keyless_shared::log_safe(&staged.key), error = %e, "renaming disk cache file failed");
            remove_path(&staged.tmp);
            return false;
        }
        index.take(&staged.key);
        let tick = index.tick();
        index.lru.insert(tick, staged.key.clone());
        index.bytes += staged.size;
        index.entries.insert(
            staged.key,
            Entry {
                size: staged.size,
                tick,
                gen: staged.id,
                tags: staged.tags,
            },
        );
        self.evict(&mut index);
        true
    }
}

/// A put of a large object whose body is being written ([`DiskTier::begin_stream`]).
/// Dropped before [`DiskStream::commit`], it removes its temp file.
#[derive(Debug)]
pub(crate) struct DiskStream {
    inner: Arc<Inner>,
    staged: Option<Staged>,
    writer: Option<BlockWriter>,
}

impl DiskStream {
    /// The file's writer.
    pub(crate) fn writer(&mut self) -> Option<&mut BlockWriter> {
        self.writer.as_mut()
    }

    /// Finishes the file and indexes it, evicting others to make room (blocking).
    /// Returns the body's length if the file was finished (then it can be read to its
    /// end through any handle already open), and whether the object is stored: not
    /// when it is larger than the whole tier, or when a purge cancelled it meanwhile.
    pub(crate) fn commit(mut self) -> (Option<u64>, bool) {
        let (Some(writer), Some(mut staged)) = (self.writer.take(), self.staged.take()) else {
            return (None, false);
        };
        let key = keyless_shared::log_safe(&staged.key).to_string();
        let (len, size) = match writer.finish() {
            Ok(done) => done,
            Err(e) => {
                warn!(%key, error = %e, "writing disk cache file failed");
                self.staged = Some(staged);
                return (None, false);
            }
        };
        if size > self.inner.max_bytes {
            debug!(%key, size, "object larger than the disk cache; not stored");
            self.staged = Some(staged);
            return (Some(len), false);
        }
        staged.size = size;
        (Some(len), self.inner.commit(staged))
    }
}

impl Drop for DiskStream {
    fn drop(&mut self) {
        drop(self.writer.take());
        if let Some(staged) = self.staged.take() {
            self.inner.lock().pending.remove(&staged.id);
            remove_path(&staged.tmp);
        }
    }
}

/// A put whose temp file is written, waiting for [`Inner::commit`].
#[derive(Debug)]
struct Staged {
    id: u64,
    key: String,
    tags: Vec<String>,
    size: u64,
    tmp: PathBuf,
    final_path: PathBuf,
}

/// Mode of the tier's directories: the edge's user only.
const DIR_MODE: u32 = 0o700;
/// Creates `dir` and its missing parents with [`DIR_MODE`] (an existing one is left
/// as it is).
fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

fn remove_path(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "removing disk cache file failed");
        }
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Hex SHA-256 of `key`: the file name, safe for keys of any length and content.
fn hash_hex(key: &str) -> String {
    digest::digest(&digest::SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the whole file to `path` (which must not exist).
fn write_file(path: &Path, meta: &[u8], body: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        create_private_dir(parent)?;
    }
    let mut head = Vec::with_capacity(16 + meta.len());
    head.extend_from_slice(MAGIC);
    // encode_meta bounds meta to MAX_META, which fits in u32.
    head.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_le_bytes());
    head.extend_from_slice(meta);
    head.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&head);
    ctx.update(body);
    let sum = ctx.finish();
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.write_all(&head)?;
    f.write_all(body)?;
    f.write_all(sum.as_ref())?;
    Ok(())
}

/// The metadata section of `obj`; fails if it would exceed the decoder's bounds.
fn encode_meta(obj: &CachedObject) -> Result<Vec<u8>, FormatError> {
    if obj.headers.len() > MAX_FIELDS as usize {
        return Err(FormatError::Bound("header count"));
    }
    if obj.vary.len() > MAX_FIELDS as usize {
        return Err(FormatError::Bound("vary count"));
    }
    let mut m = Vec::with_capacity(256);
    put_bytes(&mut m, obj.key.as_str().as_bytes())?;
    m.extend_from_slice(&obj.status.as_u16().to_le_bytes());
    put_time(&mut m, obj.request_time);
    put_time(&mut m, obj.response_time);
    let n = u32::try_from(obj.headers.len()).map_err(|_| FormatError::Bound("header count"))?;
    m.extend_from_slice(&n.to_le_bytes());
    for (name, value) in &obj.headers {
        put_bytes(&mut m, name.as_str().as_bytes())?;
        put_bytes(&mut m, value.as_bytes())?;
    }
    let n = u32::try_from(obj.vary.len()).map_err(|_| FormatError::Bound("vary count"))?;
    m.extend_from_slice(&n.to_le_bytes());
    for (name, value) in &obj.vary {
        put_bytes(&mut m, name.as_str().as_bytes())?;
        match value {
            Some(v) => {
                m.push(1);
                put_bytes(&mut m, v.as_bytes())?;
            }
            None => m.push(0),
        }
    }
    if m.len() > MAX_META {
        return Err(FormatError::Bound("metadata size"));
    }
    Ok(m)
}

/// Decodes and verifies a whole file. The body is a zero-copy slice of `file`.
fn decode(file: Bytes) -> Result<CachedObject, FormatError> {
    let payload_len = file
        .len()
        .checked_sub(CHECKSUM_LEN)
        .ok_or(FormatError::Truncated)?;
    let (payload, sum) = file
        .split_at_checked(payload_len)
        .ok_or(FormatError::Truncated)?;
    let mut r = Reader { buf: payload };
    if r.take(4)? != MAGIC {
        return Err(FormatError::Magic);
    }
    let meta_len = usize::try_from(r.u32()?).map_err(|_| FormatError::Truncated)?;
    if meta_len > MAX_META {
        return Err(FormatError::Bound("metadata size"));
    }
    let meta = decode_meta(r.take(meta_len)?)?;
    let body_len = r.u64()?;
    if body_len != r.buf.len() as u64 {
        return Err(FormatError::Length {
            declared: body_len,
            actual: r.buf.len() as u64,
        });
    }
    if digest::digest(&digest::SHA256, payload).as_ref() != sum {
        return Err(FormatError::Checksum);
    }
    let body_start = payload_len - r.buf.len(); // r.buf is the tail of payload
    Ok(object_of(
        meta,
        StoredBody::Memory(file.slice(body_start..payload_len)),
    ))
}

/// The object of a file's metadata and body.
fn object_of(meta: Meta, body: StoredBody) -> CachedObject {
    CachedObject {
        key: CacheKey::from_stored(&meta.key),
        status: meta.status,
        headers: meta.headers,
        body,
        request_time: meta.request_time,
        response_time: meta.response_time,
        vary: meta.vary,
    }
}

/// Writes a `KLC2` file at `path` with `meta` and the body `body` copied from another
/// disk file (re-storing a large object whose header fields changed), each block
/// checked as it is read.
fn copy_blocks(path: &Path, meta: &[u8], body: &StoredBody) -> io::Result<()> {
    let StoredBody::Disk { file, start, end } = body else {
        return Err(io::Error::other("not a disk body"));
    };
    if let Some(parent) = path.parent() {
        create_private_dir(parent)?;
    }
    let mut w = BlockWriter::create(path, meta)?;
    let mut at = *start;
    while at < *end {
        let data = file.read_from(at, *end).map_err(io::Error::other)?;
        if data.is_empty() {
            return Err(io::Error::other("empty read"));
        }
        w.write(&data)?;
        at += data.len() as u64;
    }
    w.finish().map(|_| ())
}

/// Reads a file's metadata and checks its total length without reading the body.
/// Returns the metadata, the file size and its mtime.
fn scan_file(path: &Path) -> Result<(Meta, u64, SystemTime), FormatError> {
    let mut f = File::open(path)?;
    let md = f.metadata()?;
    let size = md.len();
    let mut head = [0u8; 8];
    f.read_exact(&mut head).map_err(eof_truncated)?;
    if &head[..4] == blocks::MAGIC {
        let (meta, _, _) = blocks::read_head(&f, size)?;
        return Ok((meta, size, md.modified().unwrap_or(UNIX_EPOCH)));
    }
    let mut r = Reader { buf: &head };
    if r.take(4)? != MAGIC {
        return Err(FormatError::Magic);
    }
    let meta_len = r.u32()?;
    if meta_len as usize > MAX_META {
        return Err(FormatError::Bound("metadata size"));
    }
    if u64::from(meta_len) + FIXED > size {
        return Err(FormatError::Truncated);
    }
    let mut meta = vec![0u8; meta_len as usize];
    f.read_exact(&mut meta).map_err(eof_truncated)?;
    let meta = decode_meta(&meta)?;
    let mut body_len = [0u8; 8];
    f.read_exact(&mut body_len).map_err(eof_truncated)?;
    let declared = u64::from_le_bytes(body_len)
        .checked_add(FIXED + u64::from(meta_len))
        .ok_or(FormatError::Invalid("body length"))?;
    if declared != size {
        return Err(FormatError::Length {
            declared,
            actual: size,
        });
    }
    let mtime = md.modified().unwrap_or(UNIX_EPOCH);
    Ok((meta, size, mtime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
    use std::time::Duration;

    fn obj(key: &str, body: &[u8]) -> CachedObject {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        CachedObject {
            key: CacheKey::from_stored(key),
            status: StatusCode::OK,
            headers,
            body: StoredBody::Memory(Bytes::copy_from_slice(body)),
            request_time: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            response_time: UNIX_EPOCH + Duration::new(1_700_000_001, 999_999_999),
            vary: Vec::new(),
        }
    }

    fn tagged(key: &str, tags: &str) -> CachedObject {
        let mut o = obj(key, b"body");
        o.headers
            .insert("surrogate-key", HeaderValue::from_str(tags).unwrap());
        o
    }

    fn file_size(o: &CachedObject) -> u64 {
        FIXED + encode_meta(o).unwrap().len() as u64 + o.body.len()
    }

    fn path_of(dir: &Path, key: &str) -> PathBuf {
        let h = hash_hex(key);
        dir.join(&h[..2]).join(h)
    }

    fn assert_same(a: &CachedObject, b: &CachedObject) {
        assert_eq!(a.key, b.key);
        assert_eq!(a.status, b.status);
        assert_eq!(a.headers, b.headers);
        assert_eq!(a.body.to_bytes(), b.body.to_bytes());
        assert_eq!(a.request_time, b.request_time);
        assert_eq!(a.response_time, b.response_time);
        assert_eq!(a.vary, b.vary);
    }

    #[tokio::test]
    async fn round_trip_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        let mut o = obj(
            "https://example.com/a?b=c\u{e9}\n#weird key",
            &[0, 1, 2, 255, 13, 10],
        );
        o.status = StatusCode::from_u16(299).unwrap();
        o.headers
            .append("set-cookie", HeaderValue::from_static("a=1"));
        o.headers
            .append("set-cookie", HeaderValue::from_static("b=2"));
        o.headers.append(
            "x-binary",
            HeaderValue::from_bytes(b"\xff\xfe\x80 tab\there \x7e").unwrap(),
        );
        o.headers.append("x-empty", HeaderValue::from_static(""));
        o.request_time = UNIX_EPOCH - Duration::new(10, 500);
        o.response_time = UNIX_EPOCH + Duration::new(u32::MAX as u64 * 4, 123_456_789);
        o.vary = vec![
            (
                HeaderName::from_static("accept-encoding"),
                Some(HeaderValue::from_static("gzip, br")),
            ),
            (HeaderName::from_static("accept-language"), None),
            (
                HeaderName::from_static("x-v"),
                Some(HeaderValue::from_static("")),
            ),
        ];
        tier.put(&o).await;
        assert_eq!(tier.len(), 1);
        assert_eq!(tier.bytes(), file_size(&o));
        assert_eq!(
            fs::metadata(path_of(dir.path(), o.key.as_str()))
                .unwrap()
                .len(),
            file_size(&o)
        );
        let got = tier.get(o.key.as_str()).await.unwrap();
        assert_same(&got, &o);
        let values: Vec<_> = got.headers.get_all("set-cookie").iter().collect();
        assert_eq!(values, ["a=1", "b=2"]);
        assert!(tier.get("other").await.is_none());
    }

    #[tokio::test]
    async fn empty_body_and_no_headers() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        let mut o = obj("", b"");
        o.headers.clear();
        tier.put(&o).await;
        assert_same(&tier.get("").await.unwrap(), &o);
    }

    #[tokio::test]
    async fn survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = tagged("k/a", "t1 t2");
        let b = obj("k/b", &vec![7u8; 10_000]);
        {
            let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
            tier.put(&a).await;
            tier.put(&b).await;
        }
        // A stray temp file from a crash mid-write, and an unrelated top-level file.
        let tmp = path_of(dir.path(), "k/c").with_extension("1.2.tmp");
        fs::create_dir_all(tmp.parent().unwrap()).unwrap();
        fs::write(&tmp, b"KLC1 partial").unwrap();
        fs::write(dir.path().join("README"), b"not ours").unwrap();

        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(tier.len(), 2);
        assert_eq!(tier.bytes(), file_size(&a) + file_size(&b));
        assert_same(&tier.get("k/a").await.unwrap(), &a);
        assert_same(&tier.get("k/b").await.unwrap(), &b);
        assert!(!tmp.exists());
        assert!(dir.path().join("README").exists());
        // Tags are rebuilt from the stored headers.
        assert_eq!(tier.remove_tag("t2"), 1);
        assert!(tier.get("k/a").await.is_none());
    }

    #[tokio::test]
    async fn lru_eviction_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let one = file_size(&obj("k0", &[0u8; 1000]));
        let tier = DiskTier::open(dir.path(), one * 3).unwrap();
        for i in 0..3 {
            tier.put(&obj(&format!("k{i}"), &[0u8; 1000])).await;
        }
        assert_eq!(tier.len(), 3);
        assert_eq!(tier.evictions(), 0);
        // k0 becomes the most recently used; k1 is now the oldest.
        assert!(tier.get("k0").await.is_some());
        tier.put(&obj("k3", &[0u8; 1000])).await;
        assert_eq!(tier.len(), 3);
        assert_eq!(tier.evictions(), 1);
        assert!(tier.bytes() <= one * 3);
        assert!(tier.get("k1").await.is_none());
        assert!(!path_of(dir.path(), "k1").exists());
        for k in ["k0", "k2", "k3"] {
            assert!(tier.get(k).await.is_some(), "{k}");
        }
        // A big object evicts several.
        tier.put(&obj("big", &[0u8; 2500])).await;
        assert!(tier.bytes() <= one * 3);
        assert!(tier.get("big").await.is_some());
        assert_eq!(tier.len(), 1);
        assert_eq!(tier.evictions(), 4);
    }

    #[tokio::test]
    async fn replacing_a_key_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        tier.put(&obj("k", &[1u8; 100])).await;
        tier.put(&obj("k", &[2u8; 300])).await;
        assert_eq!(tier.len(), 1);
        assert_eq!(tier.bytes(), file_size(&obj("k", &[2u8; 300])));
        assert_eq!(
            tier.get("k").await.unwrap().body.to_bytes(),
            Bytes::from(vec![2u8; 300])
        );
    }

    #[tokio::test]
    async fn recency_survives_restart_and_open_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let one = file_size(&obj("a", &[0u8; 100]));
        {
            let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
            for k in ["a", "b", "c"] {
                tier.put(&obj(k, &[0u8; 100])).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Reading "a" refreshes its mtime: "b" is now the oldest.
            assert!(tier.get("a").await.is_some());
        }
        let tier = DiskTier::open(dir.path(), one * 2).unwrap();
        assert_eq!(tier.len(), 2);
        assert_eq!(tier.evictions(), 1);
        assert!(tier.get("b").await.is_none());
        assert!(!path_of(dir.path(), "b").exists());
        assert!(tier.get("a").await.is_some());
        assert!(tier.get("c").await.is_some());
    }

    #[tokio::test]
    async fn too_big_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1000).unwrap();
        tier.put(&obj("small", &[0u8; 10])).await;
        tier.put(&obj("big", &[0u8; 1000])).await;
        assert_eq!(tier.len(), 1);
        assert!(tier.get("big").await.is_none());
        assert!(!path_of(dir.path(), "big").exists());
        assert!(tier.get("small").await.is_some());
        assert_eq!(tier.evictions(), 0);
        // A zero bound stores nothing.
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 0).unwrap();
        tier.put(&obj("small", b"")).await;
        assert!(tier.is_empty());
    }

    #[tokio::test]
    async fn truncated_file_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
            tier.put(&obj("a", &[5u8; 500])).await;
            tier.put(&obj("b", &[6u8; 500])).await;
        }
        let pa = path_of(dir.path(), "a");
        let len = fs::metadata(&pa).unwrap().len();
        // Every possible cut of the file is rejected.
        let full = fs::read(&pa).unwrap();
        for cut in [0, 3, 4, 8, 20, len as usize - 533, len as usize - 1] {
            fs::write(&pa, &full[..cut]).unwrap();
            let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(tier.len(), 1, "cut at {cut}");
            assert!(!pa.exists(), "cut at {cut}");
            assert!(tier.get("a").await.is_none());
            assert!(tier.get("b").await.is_some());
        }
    }

    #[tokio::test]
    async fn corrupt_file_dropped_at_get() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        tier.put(&obj("a", &[5u8; 500])).await;
        tier.put(&obj("b", &[6u8; 500])).await;
        tier.put(&obj("c", &[6u8; 500])).await;
        // Truncated under our feet.
        let pa = path_of(dir.path(), "a");
        let full = fs::read(&pa).unwrap();
        fs::write(&pa, &full[..full.len() - 10]).unwrap();
        assert!(tier.get("a").await.is_none());
        assert!(!pa.exists());
        assert_eq!(tier.len(), 2);
        // Same length, one body byte flipped: the checksum catches it.
        let pb = path_of(dir.path(), "b");
        let mut bytes = fs::read(&pb).unwrap();
        let i = bytes.len() - 100;
        bytes[i] ^= 1;
        fs::write(&pb, &bytes).unwrap();
        assert!(tier.get("b").await.is_none());
        assert!(!pb.exists());
        // Deleted under our feet.
        fs::remove_file(path_of(dir.path(), "c")).unwrap();
        assert!(tier.get("c").await.is_none());
        assert!(tier.is_empty());
        assert_eq!(tier.bytes(), 0);
    }

    #[tokio::test]
    async fn garbage_files_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let good = obj("good", b"x");
        {
            let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
            tier.put(&good).await;
        }
        let g1 = path_of(dir.path(), "garbage");
        fs::create_dir_all(g1.parent().unwrap()).unwrap();
        fs::write(&g1, b"\x00\x01 this is not a cache file at all").unwrap();
        let g2 = path_of(dir.path(), "magic-only");
        fs::create_dir_all(g2.parent().unwrap()).unwrap();
        let mut huge_meta = MAGIC.to_vec();
        huge_meta.extend_from_slice(&u32::MAX.to_le_bytes());
        huge_meta.extend_from_slice(&[0u8; 64]);
        fs::write(&g2, &huge_meta).unwrap();
        // A valid file stored under the wrong name.
        let g3 = path_of(dir.path(), "misplaced");
        fs::create_dir_all(g3.parent().unwrap()).unwrap();
        fs::copy(path_of(dir.path(), "good"), &g3).unwrap();
        // A stray name in one of our subdirectories.
        let g4 = g1.parent().unwrap().join("notes.txt");
        fs::write(&g4, b"x").unwrap();

        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(tier.len(), 1);
        for g in [&g1, &g2, &g3, &g4] {
            assert!(!g.exists(), "{}", g.display());
        }
        assert_same(&tier.get("good").await.unwrap(), &good);
    }

    #[test]
    fn decode_never_panics_on_mutations() {
        let mut o = obj("key", b"some body bytes");
        o.vary = vec![(HeaderName::from_static("accept"), None)];
        let meta = encode_meta(&o).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_file(&p, &meta, &o.body.to_bytes()).unwrap();
        let good = fs::read(&p).unwrap();
        assert!(decode(Bytes::from(good.clone())).is_ok());
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut b = good.clone();
            match round % 3 {
                0 => {
                    let i = (seed as usize) % b.len();
                    b[i] = (seed >> 32) as u8;
                }
                1 => b.truncate((seed as usize) % b.len()),
                _ => {
                    let i = (seed as usize) % b.len();
                    b[i..].iter_mut().for_each(|x| *x = (seed >> 40) as u8);
                }
            }
            if b != good {
                assert!(decode(Bytes::from(b.clone())).is_err());
            }
            let _ = decode_meta(&b);
        }
        // Pure noise.
        for n in 0..200 {
            let noise: Vec<u8> = (0..n).map(|i| (i * 31 + n) as u8).collect();
            assert!(decode(Bytes::from(noise.clone())).is_err());
            let _ = decode_meta(&noise);
        }
    }

    #[test]
    fn decoder_bounds() {
        let mut m = Vec::new();
        put_bytes(&mut m, b"k").unwrap();
        m.extend_from_slice(&200u16.to_le_bytes());
        put_time(&mut m, UNIX_EPOCH);
        put_time(&mut m, UNIX_EPOCH);
        let mut too_many = m.clone();
        too_many.extend_from_slice(&(MAX_FIELDS + 1).to_le_bytes());
        assert!(matches!(
            decode_meta(&too_many),
            Err(FormatError::Bound("header count"))
        ));
        let mut bad_flag = m.clone();
        bad_flag.extend_from_slice(&0u32.to_le_bytes());
        bad_flag.extend_from_slice(&1u32.to_le_bytes());
        put_bytes(&mut bad_flag, b"accept").unwrap();
        bad_flag.push(2);
        assert!(matches!(
            decode_meta(&bad_flag),
            Err(FormatError::Invalid("vary flag"))
        ));
        let mut bad_nanos = Vec::new();
        put_bytes(&mut bad_nanos, b"k").unwrap();
        bad_nanos.extend_from_slice(&200u16.to_le_bytes());
        bad_nanos.push(0);
        bad_nanos.extend_from_slice(&0u64.to_le_bytes());
        bad_nanos.extend_from_slice(&1_000_000_000u32.to_le_bytes());
        assert!(decode_meta(&bad_nanos).is_err());
        // Too many headers to encode.
        let mut o = obj("k", b"");
        for i in 0..=MAX_FIELDS {
            o.headers.append(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(encode_meta(&o).is_err());
    }

    #[tokio::test]
    async fn remove_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        tier.put(&tagged("https://a.example/x\0gzip", "red blue"))
            .await;
        tier.put(&tagged("https://a.example/x\0br", "red")).await;
        tier.put(&tagged("https://a.example/y", "green")).await;
        tier.put(&tagged("https://b.example/x", "blue")).await;
        tier.put(&obj("https://b.example/z", b"z")).await;
        assert_eq!(tier.len(), 5);

        assert!(tier.remove("https://b.example/z"));
        assert!(!tier.remove("https://b.example/z"));
        assert!(!path_of(dir.path(), "https://b.example/z").exists());

        let n = tier.remove_matching(&|k: &str| k.starts_with("https://a.example/x\0"));
        assert_eq!(n, 2);
        assert!(tier.get("https://a.example/x\0br").await.is_none());
        assert!(tier.get("https://a.example/y").await.is_some());

        assert_eq!(tier.remove_tag("blue"), 1);
        assert_eq!(tier.remove_tag("blue"), 0);
        assert!(tier.get("https://b.example/x").await.is_none());
        assert_eq!(tier.len(), 1);
        assert_eq!(
            tier.bytes(),
            file_size(&tagged("https://a.example/y", "green"))
        );

        // Removals are on disk: a reopen does not bring them back.
        drop(tier);
        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(tier.len(), 1);
        assert_eq!(tier.remove_tag("green"), 1);
        assert!(tier.is_empty());
        assert_eq!(tier.bytes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_puts() {
        let dir = tempfile::tempdir().unwrap();
        let tier = Arc::new(DiskTier::open(dir.path(), 1 << 20).unwrap());
        let mut tasks = Vec::new();
        for i in 0..40u8 {
            let tier = Arc::clone(&tier);
            tasks.push(tokio::spawn(async move {
                // Same key with bodies of different lengths, plus distinct keys.
                tier.put(&obj("same", &vec![i; 100 + usize::from(i) * 50]))
                    .await;
                tier.put(&obj(&format!("k{i}"), &[i; 64])).await;
                // A get racing a put of the same key may miss, never see a mix.
                if let Some(got) = tier.get("same").await {
                    let body = got.body.to_bytes();
                    let b = body[0];
                    assert_eq!(body.len(), 100 + usize::from(b) * 50);
                    assert!(body.iter().all(|&x| x == b));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(tier.len(), 41);
        let same = tier.get("same").await.unwrap();
        let expect: u64 = (0..40u8)
            .map(|i| file_size(&obj(&format!("k{i}"), &[i; 64])))
            .sum::<u64>()
            + file_size(&same);
        assert_eq!(tier.bytes(), expect);
        // No temp files left behind, and a reopen sees the same state.
        let sub = path_of(dir.path(), "same");
        let leftovers = fs::read_dir(sub.parent().unwrap())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
        drop(tier);
        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(tier.len(), 41);
        assert_eq!(tier.bytes(), expect);
        assert_same(&tier.get("same").await.unwrap(), &same);
    }

    #[tokio::test]
    async fn purge_cancels_an_in_flight_put() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1 << 20).unwrap();
        type Purge<'a> = &'a dyn Fn(&DiskTier) -> usize;
        let cases: [(&str, Purge); 3] = [
            ("remove", &|t| usize::from(t.remove("k"))),
            ("remove_matching", &|t| t.remove_matching(&|k| k == "k")),
            ("remove_tag", &|t| t.remove_tag("t")),
        ];
        for (name, purge) in cases {
            let staged = tier.inner.stage(&tagged("k", "t")).unwrap();
            assert!(staged.tmp.exists());
            assert_eq!(purge(&tier), 0, "{name}");
            tier.inner.commit(staged);
            assert!(tier.is_empty(), "{name}");
            assert!(tier.get("k").await.is_none(), "{name}");
            assert!(!path_of(dir.path(), "k").exists(), "{name}");
            assert!(tier.inner.lock().pending.is_empty());
        }
        // A purge of something else does not cancel it.
        let staged = tier.inner.stage(&tagged("k", "t")).unwrap();
        assert_eq!(tier.remove_tag("other"), 0);
        assert!(!tier.remove("k2"));
        tier.inner.commit(staged);
        assert!(tier.get("k").await.is_some());
        let leftovers = fs::read_dir(path_of(dir.path(), "k").parent().unwrap())
            .unwrap()
            .count();
        assert_eq!(leftovers, 1);
    }

    #[test]
    fn tier_and_its_futures_are_send() {
        fn check<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        check::<DiskTier>();
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1).unwrap();
        let o = obj("k", b"");
        send(&tier.get("k"));
        send(&tier.put(&o));
    }
}
