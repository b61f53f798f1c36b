//! A stored response: what the cache keeps of an origin response and the request that
//! got it, in memory and (serialized by [`super::disk`]) on disk.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::key::CacheKey;
use super::policy::{self, ResponsePolicy, StaleDefaults};

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
    pub body: Bytes,
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
        (OVERHEAD + self.key.as_str().len() + self.body.len() + headers + vary) as u64
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
