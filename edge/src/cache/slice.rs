//! Slice-based caching (`[site.cache] slice_bytes`), as nginx's slice module and
//! Varnish do it: on a slicing site a GET is answered from aligned ranges of the
//! object ("slices" of `slice_bytes`), each fetched from the origin with its own
//! `Range` and stored as its own object (a 206, under the URL's key plus the slice's
//! index). A range request fetches only the slices it covers; a whole-object request
//! is assembled from the slices stored and the ones missing.
//!
//! Every slice must belong to the same representation as the first one the answer
//! was built on: same `ETag`, `Last-Modified` and complete length. When one does not,
//! the object changed at the origin between slices: the answer is cut (the client
//! sees a failed transfer, never a body mixed from two versions), every stored slice
//! of the URL is dropped, and the next request fetches them anew.
//!
//! Slices are requested without `Accept-Encoding`, so that every range is of the same
//! (identity) coding. An origin that answers a slice request with a `200` does not
//! do ranges: its answer is served and stored as a whole object, and the URL is not
//! sliced for a while ([`super::super::NO_FILL_TTL`]); likewise a `206` that cannot be
//! a slice (another range, no complete length, or a `Vary`).

use http_body_util::StreamBody;

use super::*;
use crate::cache::range::{range_start, wanted, RangeStart, Slice as _, Wanted};
use crate::exchange::FetchError;

/// One stored (or just fetched) slice and where it came from.
struct Slice {
    entry: Arc<Entry>,
    /// The tier it was found in, or `origin`.
    source: &'static str,
}

/// What a slice fetch got.
enum SliceGot {
    /// The slice.
    Slice(Slice),
    /// The origin does not slice this URL: its answer, a whole `200`.
    Whole(Response<EdgeBody>),
    /// Another answer (an error status): passed on as it is.
    Other(Response<EdgeBody>),
    /// A `206` that cannot be a slice.
    Unsliceable(&'static str),
}

/// Why a slice could not be had.
#[derive(Debug, thiserror::Error)]
enum SliceError {
    /// The exchange with the origin failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The slice's body was cut or not of its announced length.
    #[error("slice body: {0}")]
    Body(String),
}

impl SliceError {
    /// The answer to a client whose first slice failed.
    fn response(self, site: &Site, ctx: &ClientCtx) -> Response<EdgeBody> {
        match self {
            SliceError::Fetch(e) => e.response(site, ctx),
            SliceError::Body(why) => {
                tracing::warn!(why, "slice from the origin unusable");
                text_response(StatusCode::BAD_GATEWAY, "bad answer from the origin\n")
            }
        }
    }
}

/// What the slices of one object must agree on.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Identity {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
    total: u64,
}

impl Identity {
    fn of(headers: &HeaderMap) -> Option<Identity> {
        let total = headers
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(complete_length)?;
        Some(Identity {
            etag: headers.get(header::ETAG).cloned(),
            last_modified: headers.get(header::LAST_MODIFIED).cloned(),
            total,
        })
    }
}

/// What fetching the slices of one client request needs (owned: the body fetches
/// them as the client reads).
struct Slicer<F> {
    origin: Arc<F>,
    cache: Arc<Cache>,
    site: Arc<Site>,
    /// The request as the origin gets it, without conditionals, range and
    /// `Accept-Encoding`.
    template: http::request::Parts,
    info: ReqInfo,
    size: u64,
}

/// Whether `info` is answered from slices on `site`: a GET of a slicing site that
/// may be stored, of a URL not found unsliceable lately.
pub(super) fn applies(cache: &Cache, site: &Site, info: &ReqInfo) -> bool {
    site.cache_slice > 0
        && info.method == Method::GET
        && !info.directives.no_store
        && !info.directives.only_if_cached
        && !info.headers.contains_key(header::AUTHORIZATION)
        && !cache.fill_refused(&info.primary)
}

/// Answers a GET from slices (see the module docs).
pub(super) async fn sliced<F: Fetch>(
    scope: Scope<'_, F>,
    req: Held,
    info: &ReqInfo,
) -> Response<EdgeBody> {
    let mut template = req.parts.clone();
    template.headers = info.headers.clone();
    for name in CONDITIONAL.iter().chain([&header::ACCEPT_ENCODING]) {
        template.headers.remove(name);
    }
    let slicer = Arc::new(Slicer {
        origin: scope.origin.clone(),
        cache: scope.cache.clone(),
        site: scope.site.clone(),
        template,
        info: info.clone(),
        size: scope.site.cache_slice,
    });
    let start = match range_start(&info.headers) {
        RangeStart::Whole => 0,
        RangeStart::At(at) => at,
        RangeStart::Suffix => match slicer.suffix_start().await {
            Some(at) => at,
            None => return unsliced(scope, req, info, "no length").await,
        },
    };
    let first = start / slicer.size;
    let head = match slicer.get(first).await {
        Ok(SliceGot::Slice(s)) => s,
        Ok(SliceGot::Whole(response)) => {
            // A range beyond the end, which the origin ignored: says nothing of its
            // ranges.
            if let Some(total) = content_length(response.headers()).filter(|&t| start >= t) {
                return CacheStatus::fwd("uri-miss").apply(unsatisfiable(total));
            }
            scope.cache.refuse_fill(&info.primary);
            tracing::debug!(key = %info.primary, "origin answers ranges whole; URL not sliced");
            let status = CacheStatus::fwd("uri-miss");
            return store_or_pass(scope.cache, info, response, SystemTime::now(), None, status);
        }
        Ok(SliceGot::Other(response)) => return CacheStatus::fwd("uri-miss").apply(response),
        Ok(SliceGot::Unsliceable(reason)) => return unsliced(scope, req, info, reason).await,
        Err(e) => {
            scope.cache.metrics().slice_fetch("error");
            return CacheStatus::fwd("uri-miss").apply(e.response(scope.site, scope.ctx));
        }
    };
    answer(slicer, head, first)
}

/// Marks the URL not to be sliced for a while and answers `req` the ordinary way.
async fn unsliced<F: Fetch>(
    scope: Scope<'_, F>,
    req: Held,
    info: &ReqInfo,
    reason: &'static str,
) -> Response<EdgeBody> {
    tracing::debug!(key = %info.primary, reason, "URL not sliced");
    scope.cache.refuse_fill(&info.primary);
    scope.cache.metrics().slice_fetch("unsliceable");
    miss(scope, req, info, "uri-miss", None).await
}

/// The answer built on slice `first` (the one holding the first byte asked for).
fn answer<F: Fetch>(slicer: Arc<Slicer<F>>, head: Slice, first: u64) -> Response<EdgeBody> {
    let info = &slicer.info;
    let stored = &head.entry.obj.headers;
    let Some(identity) = Identity::of(stored) else {
        // `get` only returns slices with a complete length.
        return text_response(StatusCode::BAD_GATEWAY, "bad slice\n");
    };
    let now = SystemTime::now();
    let status = if head.source == "origin" {
        CacheStatus {
            stored: true,
            ..CacheStatus::fwd("uri-miss")
        }
    } else {
        CacheStatus::hit(head.entry.ttl(now))
    };
    let precondition = conditional::evaluate(&info.method, &info.headers, stored);
    if precondition != Precondition::Proceed {
        return status.apply(precondition_answer(precondition, stored));
    }
    let mut headers = stored.clone();
    headers.remove(header::CONTENT_RANGE);
    let total = identity.total;
    let (code, range) = match wanted(&info.headers, stored, total) {
        Wanted::Whole => (StatusCode::OK, (0, total)),
        Wanted::Part(a, b) => {
            let cr = format!("bytes {a}-{b}/{total}");
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::try_from(cr).unwrap_or_else(|_| HeaderValue::from_static("")),
            );
            (StatusCode::PARTIAL_CONTENT, (a, b + 1))
        }
        Wanted::Unsatisfiable => return status.apply(unsatisfiable(total)),
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(range.1 - range.0));
    headers.insert(
        header::AGE,
        HeaderValue::from(head.entry.age(now).as_secs()),
    );
    // The head slice is the one holding the first byte; a whole answer may start
    // before it only when the first byte asked for was a suffix's.
    let head = (range.0 / slicer.size == first).then_some(head);
    let body = slicer.body(identity, head, range);
    let mut response = Response::new(body);
    *response.status_mut() = code;
    *response.headers_mut() = headers;
    status.apply(response)
}

/// A 416 for an object of `total` bytes.
fn unsatisfiable(total: u64) -> Response<EdgeBody> {
    let mut r = text_response(StatusCode::RANGE_NOT_SATISFIABLE, "");
    if let Ok(v) = HeaderValue::try_from(format!("bytes */{total}")) {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    r
}

impl<F: Fetch> Slicer<F> {
    /// Where a suffix range starts: the object's length from a `HEAD` to the origin.
    async fn suffix_start(&self) -> Option<u64> {
        let mut parts = self.template.clone();
        parts.method = Method::HEAD;
        let head = self
            .origin
            .fetch(Request::from_parts(parts, empty()), &self.site)
            .await;
        let response = head.ok()?;
        let total = content_length(response.headers())?;
        match wanted(&self.info.headers, &HeaderMap::new(), total) {
            Wanted::Part(a, _) => Some(a),
            _ => Some(0),
        }
    }

    /// The body of bytes `range.0..range.1`: the slices holding them in order, each
    /// taken (from the cache or the origin) when the client has read the one before.
    fn body(
        self: Arc<Self>,
        identity: Identity,
        head: Option<Slice>,
        range: (u64, u64),
    ) -> EdgeBody {
        let state = (self, identity, head, range.0);
        let frames =
            futures_util::stream::unfold(state, move |(slicer, identity, head, at)| async move {
                if at >= range.1 {
                    return None;
                }
                let index = at / slicer.size;
                let part = slicer.part(&identity, head, index, (at, range.1)).await;
                let next = match &part {
                    Ok(data) => at + data.len() as u64,
                    Err(_) => u64::MAX,
                };
                Some((part.map(Frame::data), (slicer, identity, None, next)))
            });
        StreamBody::new(frames).boxed_unsync()
    }

    /// The bytes of `range` in slice `index` (`head` when it is that slice),
    /// checked to be of the object `identity` describes.
    async fn part(
        &self,
        identity: &Identity,
        head: Option<Slice>,
        index: u64,
        range: (u64, u64),
    ) -> Result<Bytes, BodyError> {
        let slice = match head {
            Some(s) => s,
            None => match self.get(index).await {
                Ok(SliceGot::Slice(s)) => s,
                Ok(_) => return Err(self.changed("the origin stopped answering slices")),
                Err(e) => {
                    self.cache.metrics().slice_fetch("error");
                    return Err(e.into());
                }
            },
        };
        if Identity::of(&slice.entry.obj.headers).as_ref() != Some(identity) {
            return Err(self.changed("slices of two versions of the object"));
        }
        let base = index * self.size;
        let from = range.0 - base;
        let to = (range.1 - base).min(slice.entry.obj.body.len());
        if from >= to {
            return Err(self.changed("a slice shorter than its range"));
        }
        let data = slice.entry.obj.body.part(from, to - 1).read().await?;
        if slice.source != "origin" {
            self.cache
                .metrics()
                .served_bytes(slice.source)
                .inc_by(data.len() as u64);
        }
        Ok(data)
    }

    /// The object changed at the origin while it was sliced: every slice goes, the
    /// answer is cut.
    fn changed(&self, why: &'static str) -> BodyError {
        let removed = self.cache.invalidate(self.info.primary.url());
        self.cache.metrics().slice_fetch("mismatch");
        tracing::warn!(key = %self.info.primary, why, removed, "object changed between slices; answer cut, slices dropped");
        why.into()
    }

    /// Slice `index`: stored and fresh, else fetched (once for concurrent requests).
    async fn get(&self, index: u64) -> Result<SliceGot, SliceError> {
        let primary = self.info.primary.slice(index);
        let key = primary.unvaried();
        let deadline = tokio::time::Instant::now() + self.cache.coalesce_timeout;
        loop {
            if let Lookup::Found(entry, tier) = self.cache.lookup(&primary, &HeaderMap::new()).await
            {
                let usable = policy::usability(
                    &entry.policy,
                    entry.age(SystemTime::now()),
                    &self.info.directives,
                );
                if matches!(usable, Usability::Fresh | Usability::StaleAccepted) {
                    return Ok(SliceGot::Slice(Slice {
                        entry,
                        source: tier,
                    }));
                }
            }
            match self.cache.join_flight(&key) {
                Some(Flight::Follower(mut rx)) if tokio::time::Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, rx.wait_for(|_| false)).await;
                }
                Some(Flight::Leader(guard)) => return self.fetch(index, &key, Some(guard)).await,
                _ => return self.fetch(index, &key, None).await,
            }
        }
    }

    /// Fetches slice `index` from the origin and stores it (holding `flight` until
    /// it is stored).
    async fn fetch(
        &self,
        index: u64,
        key: &CacheKey,
        flight: Option<FlightGuard>,
    ) -> Result<SliceGot, SliceError> {
        let first = index * self.size;
        let last = first + self.size - 1;
        let mut parts = self.template.clone();
        if let Ok(v) = HeaderValue::try_from(format!("bytes={first}-{last}")) {
            parts.headers.insert(header::RANGE, v);
        }
        let request_time = SystemTime::now();
        let response = self
            .origin
            .fetch(Request::from_parts(parts, empty()), &self.site)
            .await?;
        let response_time = SystemTime::now();
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => return Ok(SliceGot::Whole(response)),
            _ => return Ok(SliceGot::Other(response)),
        }
        let headers = response.headers();
        let Some(identity) = Identity::of(headers) else {
            return Ok(SliceGot::Unsliceable("no complete length"));
        };
        let end = last.min(identity.total.saturating_sub(1));
        let expected = format!("bytes {first}-{end}/{}", identity.total);
        let range_ok = headers
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case(&expected));
        if !range_ok {
            return Ok(SliceGot::Unsliceable("another range than asked"));
        }
        if headers.contains_key(header::VARY) {
            return Ok(SliceGot::Unsliceable("vary"));
        }
        let len = end + 1 - first;
        let (parts, body) = response.into_parts();
        let data = collect(body, len).await.map_err(SliceError::Body)?;
        let mut stored_headers = parts.headers;
        stored_headers.remove(header::SET_COOKIE);
        stored_headers.remove(&SET_COOKIE2);
        let obj = CachedObject {
            key: key.clone(),
            status: StatusCode::PARTIAL_CONTENT,
            headers: stored_headers,
            body: StoredBody::Memory(data),
            request_time,
            response_time,
            vary: Vec::new(),
        };
        let storable = not_storable(
            &self.cache,
            &self.info,
            StatusCode::OK,
            &obj.headers,
            response_time,
        );
        let entry = match storable {
            None => {
                self.cache.metrics().slice_fetch("stored");
                self.cache.store(obj, Arc::from(Vec::new()))
            }
            Some(reason) => {
                // Not stored, so not worth slicing: the URL goes the ordinary way.
                tracing::debug!(key = %self.info.primary, reason, "slice not stored; URL not sliced");
                self.cache.refuse_fill(&self.info.primary);
                self.cache.metrics().slice_fetch("not-stored");
                Arc::new(Entry::new(obj, self.cache.defaults))
            }
        };
        drop(flight);
        Ok(SliceGot::Slice(Slice {
            entry,
            source: "origin",
        }))
    }
}

/// Reads a slice's body of `len` bytes whole; an error if it is longer or shorter.
async fn collect(mut body: EdgeBody, len: u64) -> Result<Bytes, String> {
    let mut data = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(d) = frame.data_ref() {
            if data.len() as u64 + d.len() as u64 > len {
                return Err("slice longer than its Content-Range".into());
            }
            data.extend_from_slice(d);
        }
    }
    if data.len() as u64 != len {
        return Err(format!("slice of {} bytes, {len} announced", data.len()));
    }
    Ok(data.freeze())
}
