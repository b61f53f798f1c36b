//! A stored response: what the cache keeps of an origin response and the request that
//! got it, in memory and (serialized by [`super::disk`]) on disk.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use super::blocks::BlockFile;
use super::key::CacheKey;
use super::policy::{self, ResponsePolicy, StaleDefaults};
use super::range::Slice;
use crate::exchange::{full, BodyError, EdgeBody};

/// A stored body: in memory, or (an object too large for the memory tier) bytes
/// `start..end` of a disk-tier file, read a block at a time when served.
#[derive(Clone, Debug)]
pub(crate) enum StoredBody {
    /// The whole body in memory.
    Memory(Bytes),
    /// Part of a body on disk.
    Disk {
        file: Arc<BlockFile>,
        start: u64,
        end: u64,
    },
}

impl StoredBody {
    /// The whole body of `file`.
    pub(crate) fn disk(file: BlockFile) -> StoredBody {
        let end = file.len();
        StoredBody::Disk {
            file: Arc::new(file),
            start: 0,
            end,
        }
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> u64 {
        match self {
            StoredBody::Memory(b) => b.len() as u64,
            StoredBody::Disk { start, end, .. } => end - start,
        }
    }

    /// The whole body in one buffer (tests; reads a disk body block by block).
    #[cfg(test)]
    pub(crate) fn to_bytes(&self) -> Bytes {
        match self {
            StoredBody::Memory(b) => b.clone(),
            StoredBody::Disk { file, start, end } => {
                let mut all = Vec::new();
                let mut at = *start;
                while at < *end {
                    let data = file.read_from(at, *end).expect("disk body readable");
                    at += data.len() as u64;
                    all.extend_from_slice(&data);
                }
                Bytes::from(all)
            }
        }
    }

    /// The whole body in one buffer (a disk body read block by block): for small
    /// parts, such as a slice's.
    pub(crate) async fn read(&self) -> Result<Bytes, BodyError> {
        let mut parts = VecDeque::from([self.clone()]);
        let mut all = Vec::new();
        while let Some(chunk) = next_chunk(&mut parts).await {
            let chunk = chunk?;
            if parts.is_empty() && all.is_empty() {
                return Ok(chunk);
            }
            all.push(chunk);
        }
        Ok(concat(all, self.len()))
    }

    /// Whether the body is read from disk when served.
    pub(crate) fn on_disk(&self) -> bool {
        matches!(self, StoredBody::Disk { .. })
    }

    /// `parts` in order, as a response body: one piece when all are in memory, else
    /// streamed, each disk block read (on a blocking thread) and checked only when
    /// the client takes the previous one. A block that fails its check ends the body
    /// with an error, so that the client sees a cut transfer, not a wrong body.
    pub(crate) fn into_body(parts: Vec<StoredBody>) -> EdgeBody {
        if !parts.iter().any(StoredBody::on_disk) {
            let len: u64 = parts.iter().map(StoredBody::len).sum();
            let bytes = parts.into_iter().filter_map(|p| match p {
                StoredBody::Memory(b) => Some(b),
                StoredBody::Disk { .. } => None,
            });
            return full(concat(bytes.collect(), len));
        }
        let frames = futures_util::stream::unfold(VecDeque::from(parts), |mut parts| async move {
            let data = next_chunk(&mut parts).await?;
            if data.is_err() {
                parts.clear();
            }
            Some((data.map(Frame::data), parts))
        });
        StreamBody::new(frames).boxed_unsync()
    }
}

/// The next piece of `parts`: a memory part whole, or what is left of a disk part's
/// current block. `None` at the end.
async fn next_chunk(parts: &mut VecDeque<StoredBody>) -> Option<Result<Bytes, BodyError>> {
    loop {
        match parts.pop_front()? {
            StoredBody::Memory(b) if b.is_empty() => continue,
            StoredBody::Memory(b) => return Some(Ok(b)),
            StoredBody::Disk { start, end, .. } if start >= end => continue,
            StoredBody::Disk { file, start, end } => {
                let reader = file.clone();
                let read = tokio::task::spawn_blocking(move || reader.read_from(start, end)).await;
                let data = match read {
                    Ok(Ok(data)) if !data.is_empty() => data,
                    Ok(Ok(_)) => return Some(Err("empty read from a disk cache file".into())),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "disk cache body unreadable; transfer cut");
                        return Some(Err(e.into()));
                    }
                    Err(e) => return Some(Err(e.into())),
                };
                let next = start + data.len() as u64;
                if next < end {
                    parts.push_front(StoredBody::Disk {
                        file,
                        start: next,
                        end,
                    });
                }
                return Some(Ok(data));
            }
        }
    }
}

impl Slice for StoredBody {
    fn total(&self) -> u64 {
        self.len()
    }

    fn part(&self, first: u64, last: u64) -> StoredBody {
        match self {
            StoredBody::Memory(b) => StoredBody::Memory(b.part(first, last)),
            StoredBody::Disk { file, start, end } => StoredBody::Disk {
                file: file.clone(),
                start: (start + first).min(*end),
                end: (start + last + 1).min(*end),
            },
        }
    }

    fn text(b: Bytes) -> StoredBody {
        StoredBody::Memory(b)
    }
}

/// `parts` (of `len` bytes in all) as one buffer; copied only when there are several.
pub(crate) fn concat(mut parts: Vec<Bytes>, len: u64) -> Bytes {
    if parts.len() <= 1 {
        return parts.pop().unwrap_or_default();
    }
    let mut all = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
    for part in &parts {
        all.extend_from_slice(part);
    }
    all.freeze()
}

/// A stored response, complete (the whole body arrived).
#[derive(Clone, Debug)]
pub(crate) struct CachedObject {
    /// The key of this response: primary key and variant.
    pub key: CacheKey,
    /// Status of the stored response (never 206 or 304).
    pub status: StatusCode,
    /// The response's header fields as stored: hop-by-hop fields removed, no `Age`
    /// added by this cache (an `Age` the origin sent is kept: it is part of the age
    /// calculation).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: StoredBody,
    /// When the request that got this response was sent (RFC 9111 §4.2.3
    /// `request_time`).
    pub request_time: SystemTime,
    /// When the response's header section arrived (`response_time`).
    pub response_time: SystemTime,
    /// The request's value of each header field the response's `Vary` names (names
    /// lowercase; `None` when the request did not have the field). Empty when the
    /// response has no `Vary`.
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

impl CachedObject {
    /// Bytes this object takes, for the tiers' byte bounds: body, header fields and
    /// key, plus a fixed overhead per object.
    pub(crate) fn weight(&self) -> u64 {
        const OVERHEAD: usize = 256;
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(k, v)| k.as_str().len() + v.as_ref().map_or(0, HeaderValue::len) + 16)
            .sum();
        (OVERHEAD + self.key.as_str().len() + headers + vary) as u64 + self.body.len()
    }

    /// The surrogate keys (purge tags) of this object: the space-separated tokens of
    /// `Surrogate-Key` and the comma-separated ones of `Cache-Tag`.
    pub(crate) fn tags(&self) -> Vec<String> {
        surrogate_keys(&self.headers)
    }
}

/// The surrogate keys in `headers`: `Surrogate-Key` (space-separated) and `Cache-Tag`
/// (comma-separated); empty and duplicate tokens dropped, each at most 1024 bytes.
pub(crate) fn surrogate_keys(headers: &HeaderMap) -> Vec<String> {
    const MAX_TAG: usize = 1024;
    let mut tags: Vec<String> = Vec::new();
    let split = |name: &str, sep: &[char]| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| {
                v.split(sep)
                    .map(str::trim)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter(|t| !t.is_empty() && t.len() <= MAX_TAG)
            .collect()
    };
    for t in split("surrogate-key", &[' ', '\t'])
        .into_iter()
        .chain(split("cache-tag", &[',']))
    {
        if !tags.contains(&t) {
            tags.push(t);
        }
    }
    tags
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
    pub(crate) fn new(obj: CachedObject, defaults: StaleDefaults) -> Entry {
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
