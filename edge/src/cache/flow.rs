//! How a request goes through the cache: lookup, hit (with client conditionals,
//! ranges and HEAD answered from the stored response), revalidation with the origin,
//! stale serving (RFC 5861), request coalescing on misses, storing while streaming,
//! and invalidation after unsafe methods. Every response gets a `Cache-Status`
//! (RFC 9211) entry.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::conditional::{self, Precondition};
use super::key::{CacheKey, PrimaryKey};
use super::object::{concat, CachedObject, Entry, StoredBody};
use super::policy::{self, Directives, ResponsePolicy, Usability};
use super::range::{self, RangeAnswer};
use super::spool::{Growing, Spool};
use super::{Cache, Flight, FlightGuard, Lookup};
use crate::config::SetCookiePolicy;
use crate::exchange::{empty, text_response, BodyError, ClientCtx, EdgeBody, Fetch};
use crate::sites::Site;
use prometheus_client::metrics::counter::Counter;

/// This cache's name in `Cache-Status`.
const CACHE_NAME: &str = "keyless";

static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Request fields that make a request conditional or partial: such a request is
/// forwarded as it is on a miss (its answer may still be stored when it is a full
/// response) and does not lead a coalesced fetch.
static CONDITIONAL: [HeaderName; 6] = [
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// Header fields a 304 does not update in the stored response (RFC 9111 §3.2), and
/// the cookies it sets (one client's, never stored).
static NOT_UPDATED: [HeaderName; 6] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
    header::CONTENT_RANGE,
    header::SET_COOKIE,
    HeaderName::from_static("set-cookie2"),
];

/// The obsolete RFC 2965 cookie field, treated as `Set-Cookie`.
static SET_COOKIE2: HeaderName = HeaderName::from_static("set-cookie2");

/// Whether a response sets a cookie.
fn sets_cookie(headers: &HeaderMap) -> bool {
    headers.contains_key(header::SET_COOKIE) || headers.contains_key(&SET_COOKIE2)
}

/// One `Cache-Status` list member (RFC 9211).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CacheStatus {
    hit: bool,
    fwd: Option<&'static str>,
    fwd_status: Option<u16>,
    stored: bool,
    collapsed: bool,
    ttl: Option<i64>,
    detail: Option<&'static str>,
}

impl CacheStatus {
    fn hit(ttl: i64) -> CacheStatus {
        CacheStatus {
            hit: true,
            ttl: Some(ttl),
            ..CacheStatus::default()
        }
    }

    fn fwd(reason: &'static str) -> CacheStatus {
        CacheStatus {
            fwd: Some(reason),
            ..CacheStatus::default()
        }
    }

    fn value(&self) -> HeaderValue {
        let mut s = String::from(CACHE_NAME);
        if self.hit {
            s.push_str("; hit");
        }
        if let Some(f) = self.fwd {
            s.push_str("; fwd=");
            s.push_str(f);
        }
        if let Some(st) = self.fwd_status {
            s.push_str(&format!("; fwd-status={st}"));
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(t) = self.ttl {
            s.push_str(&format!("; ttl={t}"));
        }
        if let Some(d) = self.detail {
            s.push_str("; detail=");
            s.push_str(d);
        }
        HeaderValue::from_maybe_shared(Bytes::from(s))
            .unwrap_or(HeaderValue::from_static("keyless"))
    }

    /// Adds this entry to `response`'s `Cache-Status` list.
    pub(crate) fn apply<B>(self, mut response: Response<B>) -> Response<B> {
        response.headers_mut().append(&CACHE_STATUS, self.value());
        response
    }
}

/// What the cache needs of the client request after the request itself has gone to
/// the origin.
#[derive(Clone)]
struct ReqInfo {
    method: Method,
    /// The request's header fields as the origin gets them ([`crate::serve::HttpFront`] has
    /// rewritten them): `Vary` variants and `key_headers` are computed from these, so
    /// a field the client named hop-by-hop (`Connection: origin`) counts as absent,
    /// as it is for the origin.
    headers: HeaderMap,
    directives: Directives,
    primary: PrimaryKey,
    /// The site's `store_set_cookie`.
    set_cookie: SetCookiePolicy,
}

impl Cache {
    /// Answers `req` (in upstream form, for `host`) for `site` from the cache, fetching
    /// from `origin` what it cannot answer.
    pub async fn handle<F: Fetch>(
        self: &Arc<Self>,
        origin: &Arc<F>,
        req: Request<EdgeBody>,
        host: &str,
        site: &Arc<Site>,
        ctx: &ClientCtx,
    ) -> Response<EdgeBody> {
        let cache = self;
        if !site.cache_enabled {
            cache.metrics().cache_lookup("bypass");
            return CacheStatus::fwd("bypass").apply(origin.forward(req, site, ctx).await);
        }
        let method = req.method().clone();
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let primary = PrimaryKey::new(site, ctx.scheme, host, path_and_query, req.headers());

        if method != Method::GET && method != Method::HEAD {
            let scope = Scope {
                origin,
                cache,
                site,
                ctx,
            };
            return other_method(scope, req, host, &primary).await;
        }

        if primary.len() > cache.max_url_bytes {
            cache.metrics().cache_lookup("bypass");
            let status = CacheStatus {
                detail: Some("url-too-long"),
                ..CacheStatus::fwd("bypass")
            };
            return status.apply(origin.forward(req, site, ctx).await);
        }

        // The header map moves into `info` (hits need no copy); a request that goes to the
        // origin gets a copy back.
        let (mut parts, body) = req.into_parts();
        let headers = std::mem::take(&mut parts.headers);
        let info = ReqInfo {
            directives: policy::cache_control(&headers),
            headers,
            method,
            primary,
            set_cookie: site.cache_set_cookie,
        };
        let req = Held { parts, body };
        let scope = Scope {
            origin,
            cache,
            site,
            ctx,
        };
        if slice::applies(cache, site, &info) {
            return slice::sliced(scope, req, &info).await;
        }
        match cache.lookup(&info.primary, &info.headers).await {
            Lookup::Found(entry, tier) => found(scope, req, &info, entry, tier).await,
            Lookup::UriMiss => miss(scope, req, &info, "uri-miss", None).await,
            Lookup::VaryMiss(key) => miss(scope, req, &info, "vary-miss", Some(key)).await,
        }
    }
}

/// Forwards a request of a method the cache does not answer; a successful unsafe one
/// invalidates what is stored for its URL (RFC 9111 §4.4).
async fn other_method<F: Fetch>(
    scope: Scope<'_, F>,
    req: Request<EdgeBody>,
    host: &str,
    primary: &PrimaryKey,
) -> Response<EdgeBody> {
    let Scope {
        origin,
        cache,
        site,
        ctx,
    } = scope;
    cache.metrics().cache_lookup("bypass");
    let method = req.method().clone();
    let headers = req.headers().clone();
    let response = origin.forward(req, site, ctx).await;
    let s = response.status();
    if policy::is_unsafe(&method) && (s.is_success() || s.is_redirection()) {
        invalidate_after_unsafe(
            cache,
            site,
            ctx,
            host,
            primary,
            &headers,
            response.headers(),
        );
    }
    CacheStatus::fwd("method").apply(response)
}

/// Answers from a stored response: at once when it may be used as it is (stale while
/// revalidating in the background), else after revalidating it.
async fn found<F: Fetch>(
    scope: Scope<'_, F>,
    req: Held,
    info: &ReqInfo,
    entry: Arc<Entry>,
    tier: &'static str,
) -> Response<EdgeBody> {
    let cache = scope.cache;
    let served = served_from(cache, &entry, tier);
    let now = SystemTime::now();
    let age = entry.age(now);
    match policy::usability(&entry.policy, age, &info.directives) {
        Usability::Fresh | Usability::StaleAccepted => {
            cache
                .metrics()
                .cache_lookup(if age < entry.policy.lifetime {
                    "hit"
                } else {
                    "stale"
                });
            serve_stored(info, &entry, now, CacheStatus::hit(entry.ttl(now)), served)
        }
        Usability::StaleWhileRevalidate => {
            cache.metrics().cache_lookup("stale");
            refresh_in_background(scope, &req, info, &entry);
            let status = CacheStatus {
                detail: Some("stale-while-revalidate"),
                ..CacheStatus::hit(entry.ttl(now))
            };
            serve_stored(info, &entry, now, status, served)
        }
        // RFC 9111 §5.2.1.7: a stored response or a 504, never the origin.
        Usability::Revalidate if info.directives.only_if_cached => {
            cache.metrics().cache_lookup("miss");
            let status = CacheStatus {
                detail: Some("only-if-cached"),
                ..CacheStatus::fwd("stale")
            };
            status.apply(text_response(
                StatusCode::GATEWAY_TIMEOUT,
                "not in cache (only-if-cached)\n",
            ))
        }
        Usability::Revalidate => {
            let fwd = if info.directives.no_cache {
                "request"
            } else {
                "stale"
            };
            revalidate(scope, req, info, (entry, served), fwd).await
        }
    }
}

/// What every step of a request's way through the cache uses.
struct Scope<'a, F> {
    origin: &'a Arc<F>,
    cache: &'a Arc<Cache>,
    site: &'a Arc<Site>,
    ctx: &'a ClientCtx,
}

impl<F> Clone for Scope<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F> Copy for Scope<'_, F> {}

/// A client request whose header map is in its [`ReqInfo`].
struct Held {
    parts: http::request::Parts,
    body: EdgeBody,
}

impl Held {
    /// The request again, with a copy of `headers`.
    fn into_request(self, headers: &HeaderMap) -> Request<EdgeBody> {
        let mut parts = self.parts;
        parts.headers = headers.clone();
        Request::from_parts(parts, self.body)
    }
}

/// Forwards a request nothing stored can answer; stores the answer when it may.
async fn miss<F: Fetch>(
    scope: Scope<'_, F>,
    req: Held,
    info: &ReqInfo,
    fwd: &'static str,
    full_key: Option<CacheKey>,
) -> Response<EdgeBody> {
    let Scope {
        origin,
        cache,
        site,
        ctx,
    } = scope;
    if info.directives.only_if_cached {
        cache.metrics().cache_lookup("miss");
        let status = CacheStatus {
            detail: Some("only-if-cached"),
            ..CacheStatus::fwd(fwd)
        };
        return status.apply(text_response(
            StatusCode::GATEWAY_TIMEOUT,
            "not in cache (only-if-cached)\n",
        ));
    }
    let partial_or_conditional = CONDITIONAL.iter().any(|h| info.headers.contains_key(h));
    let mut guard = None;
    if info.method == Method::GET && !partial_or_conditional && !info.directives.no_store {
        let key = full_key.clone().unwrap_or_else(|| info.primary.unvaried());
        match coalesce(cache, info, &key).await {
            Coalesced::Served(response) => return response,
            Coalesced::Lead(g) => guard = Some(g),
            Coalesced::Alone => {}
        }
    }
    // A range request that misses goes to the origin as it is; when its answer shows
    // the whole object is storable, it is fetched in the background so that the next
    // range requests are served from the cache (see `fill_after_range`).
    let only_range = info.headers.contains_key(header::RANGE)
        && CONDITIONAL.iter().all(|h| {
            *h == header::RANGE || *h == header::IF_RANGE || !info.headers.contains_key(h)
        });
    let fill = info.method == Method::GET
        && only_range
        && !info.directives.no_store
        && !cache.fill_refused(&info.primary);
    let target = (req.parts.uri.clone(), req.parts.version);
    cache.metrics().cache_lookup("miss");
    let request_time = SystemTime::now();
    match origin.fetch(req.into_request(&info.headers), site).await {
        Err(e) => CacheStatus::fwd(fwd).apply(e.response(site, ctx)),
        Ok(response) => {
            if fill && response.status() == StatusCode::PARTIAL_CONTENT {
                let key = full_key.unwrap_or_else(|| info.primary.unvaried());
                fill_after_range(scope, &target, info, &key, response.headers());
            }
            let status = CacheStatus::fwd(fwd);
            store_or_pass(cache, info, response, request_time, guard, status)
        }
    }
}

/// How a miss joined the fetches of its key.
enum Coalesced {
    /// Another request's fetch stored what answers this one.
    Served(Response<EdgeBody>),
    /// This request fetches; others wait for it until the guard drops.
    Lead(FlightGuard),
    /// This request goes to the origin on its own.
    Alone,
}

/// Follows the fetch in progress for `key`; when it ends without a usable object (its
/// client went away before the body was stored, or the fetch failed), one of the
/// waiters leads the next attempt. A URL marked not cacheable, or the coalescing
/// deadline, sends the request to the origin on its own.
async fn coalesce(cache: &Arc<Cache>, info: &ReqInfo, key: &CacheKey) -> Coalesced {
    let deadline = tokio::time::Instant::now() + cache.coalesce_timeout;
    while let Some(flight) = cache.join_flight(key) {
        let mut rx = match flight {
            Flight::Leader(g) => return Coalesced::Lead(g),
            Flight::Follower(rx) => rx,
        };
        // Until the flight ends, or until its object turns out large and streams to
        // disk: then this request reads the growing file, or (not usable for it)
        // goes to the origin on its own.
        let growing = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|g| g.clone()));
        if let Some(growing) = growing {
            return match serve_growing(cache, info, &growing) {
                Some(response) => Coalesced::Served(response),
                None => Coalesced::Alone,
            };
        }
        if let Lookup::Found(entry, tier) = cache.lookup(&info.primary, &info.headers).await {
            let now = SystemTime::now();
            let age = entry.age(now);
            if matches!(
                policy::usability(&entry.policy, age, &info.directives),
                Usability::Fresh | Usability::StaleAccepted
            ) {
                cache.metrics().cache_lookup("hit");
                cache.metrics().cache_coalesced.inc();
                let status = CacheStatus {
                    collapsed: true,
                    ..CacheStatus::hit(entry.ttl(now))
                };
                let served = served_from(cache, &entry, tier);
                return Coalesced::Served(serve_stored(info, &entry, now, status, served));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    Coalesced::Alone
}

/// Answers a request coalesced on a large object from its file as it is written,
/// when the object is usable for it (fresh enough, same `Vary` values).
fn serve_growing(cache: &Cache, info: &ReqInfo, growing: &Growing) -> Option<Response<EdgeBody>> {
    let entry = &growing.entry;
    let names: Vec<HeaderName> = entry.obj.vary.iter().map(|(n, _)| n.clone()).collect();
    if info.primary.variant(&names, &info.headers).as_str() != entry.obj.key.as_str() {
        return None;
    }
    let now = SystemTime::now();
    let usable = policy::usability(&entry.policy, entry.age(now), &info.directives);
    if !matches!(usable, Usability::Fresh | Usability::StaleAccepted) {
        return None;
    }
    cache.metrics().cache_lookup("hit");
    cache.metrics().cache_coalesced.inc();
    let status = CacheStatus {
        collapsed: true,
        ..CacheStatus::hit(entry.ttl(now))
    };
    let mut response = Response::new(counted(
        growing.body(),
        cache.metrics().served_bytes("disk"),
    ));
    *response.status_mut() = entry.obj.status;
    *response.headers_mut() = entry.obj.headers.clone();
    response
        .headers_mut()
        .insert(header::AGE, HeaderValue::from(entry.age(now).as_secs()));
    Some(status.apply(response))
}

/// The counter of bytes served from `entry` found in `tier`: `disk` when its body is
/// read from disk as it is served.
fn served_from(cache: &Cache, entry: &Entry, tier: &'static str) -> Counter {
    let source = if entry.obj.body.on_disk() {
        "disk"
    } else {
        tier
    };
    cache.metrics().served_bytes(source)
}

/// `body`, its data bytes counted in `counter` as they are sent.
fn counted(body: EdgeBody, counter: Counter) -> EdgeBody {
    body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            counter.inc_by(data.len() as u64);
        }
        frame
    })
    .boxed_unsync()
}

/// After a range miss answered `206` with `headers`: fetches the whole object in the
/// background, once (a coalesced flight), when it will be stored: its complete length
/// is known from `Content-Range` and within `max_object_bytes` (or, with a disk tier,
/// `disk_max_object_bytes`: the fill streams to disk), the response is
/// storable, and one of the `MAX_RANGE_FILLS` fill slots is free. A URL that fails
/// these (or whose fill is not stored) is remembered for a while and not filled again,
/// so small ranges of a large object cost one small origin request each, never a full
/// download.
fn fill_after_range<F: Fetch>(
    scope: Scope<'_, F>,
    target: &(http::Uri, http::Version),
    info: &ReqInfo,
    key: &CacheKey,
    headers: &HeaderMap,
) {
    let cache = scope.cache;
    let size = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(complete_length);
    let fits = size.is_some_and(|n| n <= cache.max_object_bytes || cache.may_stream(Some(n)));
    let storable =
        fits && not_storable(cache, info, StatusCode::OK, headers, SystemTime::now()).is_none();
    if !storable {
        tracing::debug!(key = %info.primary, ?size, "range miss: whole object not fetched");
        cache.refuse_fill(&info.primary);
        return;
    }
    let Some(slot) = cache.fill_slot() else {
        return;
    };
    if let Some(Flight::Leader(flight)) = cache.join_flight(key) {
        let background = Background {
            entry: None,
            flight: Some(flight),
            _refresh: None,
            _slot: Some(slot),
        };
        fetch_in_background(scope, target, info, background);
    }
}

/// The complete length of a `Content-Range: bytes a-b/N` value (`None` for `*`).
fn complete_length(content_range: &str) -> Option<u64> {
    let (unit, rest) = content_range.trim().split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    rest.rsplit_once('/')?.1.trim().parse().ok()
}

/// Why a response with `status` and `headers` to the request `info` is not stored
/// (RFC 9111 rules, nothing worth storing, or a cookie the site does not strip).
fn not_storable(
    cache: &Cache,
    info: &ReqInfo,
    status: StatusCode,
    headers: &HeaderMap,
    response_time: SystemTime,
) -> Option<&'static str> {
    let policy = ResponsePolicy::new(status, headers, response_time, cache.defaults);
    policy
        .not_storable(status, headers, &info.headers, &info.directives)
        .or_else(|| useless(&policy, headers))
        .or_else(|| {
            // A cookie named by a qualified `private` is left out of the stored copy.
            let cookie_private = policy
                .directives
                .private_fields
                .contains(&header::SET_COOKIE);
            (info.set_cookie == SetCookiePolicy::Never && sets_cookie(headers) && !cookie_private)
                .then_some("set-cookie")
        })
}

/// Stores `response` (while it streams to the client) when RFC 9111 allows it.
fn store_or_pass(
    cache: &Arc<Cache>,
    info: &ReqInfo,
    response: Response<EdgeBody>,
    request_time: SystemTime,
    guard: Option<FlightGuard>,
    mut status: CacheStatus,
) -> Response<EdgeBody> {
    match storing(cache, info, response, request_time, guard) {
        Storing::Pass {
            response,
            too_large,
        } => {
            if too_large {
                status.detail = Some("too-large");
            }
            status.apply(response)
        }
        Storing::Store {
            parts,
            body,
            sink,
            ttl,
        } => {
            status.stored = true;
            status.ttl = Some(ttl);
            let body = StoringBody {
                inner: body,
                sink: Some(*sink),
            };
            status.apply(Response::from_parts(parts, body.boxed_unsync()))
        }
    }
}

/// What [`storing`] decided.
enum Storing {
    /// Not stored: the response as it came.
    Pass {
        response: Response<EdgeBody>,
        /// Not stored because of its size.
        too_large: bool,
    },
    /// To be stored: the body goes into `sink` as it streams.
    Store {
        parts: http::response::Parts,
        body: EdgeBody,
        sink: Box<Sink>,
        /// Freshness lifetime, seconds.
        ttl: i64,
    },
}

/// Decides whether `response` is stored (RFC 9111 rules, size, cookies) and prepares
/// the sink that stores it. A URL not stored is remembered: it skips coalescing and
/// range fills for a while.
fn storing(
    cache: &Arc<Cache>,
    info: &ReqInfo,
    response: Response<EdgeBody>,
    request_time: SystemTime,
    guard: Option<FlightGuard>,
) -> Storing {
    let response_time = SystemTime::now();
    if info.method != Method::GET {
        return Storing::Pass {
            response,
            too_large: false,
        };
    }
    if let Some(reason) = not_storable(
        cache,
        info,
        response.status(),
        response.headers(),
        response_time,
    ) {
        // A 206 or 304 answers this request's range or conditionals: it says nothing
        // about whether the URL's full response is storable.
        let partial = matches!(
            response.status(),
            StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
        );
        if !partial && !matches!(reason, "request no-store" | "authorization") {
            cache.mark_pass(&info.primary);
            cache.refuse_fill(&info.primary);
        }
        tracing::debug!(key = %info.primary, reason, "response not stored");
        drop(guard);
        return Storing::Pass {
            response,
            too_large: false,
        };
    }
    let length = response
        .body()
        .size_hint()
        .exact()
        .or_else(|| content_length(response.headers()));
    let large = length.is_some_and(|n| n > cache.max_object_bytes);
    if large && !cache.may_stream(length) {
        cache.refuse_fill(&info.primary);
        drop(guard);
        return Storing::Pass {
            response,
            too_large: true,
        };
    }
    cache.clear_pass(&info.primary);
    store(cache, info, response, (request_time, response_time), guard)
}

/// The [`Storing::Store`] of a response that will be stored: its body streams into a
/// [`Sink`] holding the stored object's key, header fields (without cookies) and
/// times.
fn store(
    cache: &Arc<Cache>,
    info: &ReqInfo,
    response: Response<EdgeBody>,
    (request_time, response_time): (SystemTime, SystemTime),
    guard: Option<FlightGuard>,
) -> Storing {
    let policy = ResponsePolicy::new(
        response.status(),
        response.headers(),
        response_time,
        cache.defaults,
    );
    let names: Arc<[HeaderName]> = policy::vary_names(response.headers())
        .unwrap_or_default()
        .into();
    let key = info.primary.variant(&names, &info.headers);
    let vary = names
        .iter()
        .map(|n| (n.clone(), info.headers.get(n).cloned()))
        .collect();
    let (parts, body) = response.into_parts();
    let mut stored_headers = parts.headers.clone();
    // `store_set_cookie = "strip"`: the client that fetched it keeps its cookie, the
    // stored copy has none. Likewise the fields a qualified `private` names.
    stored_headers.remove(header::SET_COOKIE);
    stored_headers.remove(&SET_COOKIE2);
    for name in &policy.directives.private_fields {
        stored_headers.remove(name);
    }
    let template = CachedObject {
        key,
        status: parts.status,
        headers: stored_headers,
        body: StoredBody::Memory(Bytes::new()),
        request_time,
        response_time,
        vary,
    };
    let mut sink = Sink {
        cache: cache.clone(),
        expected: content_length(&parts.headers),
        template,
        names,
        chunks: Vec::new(),
        collected: 0,
        len: 0,
        spool: None,
        flight: guard,
    };
    // Known to be large: streams to disk from its first byte.
    if sink.expected.is_some_and(|n| n > cache.max_object_bytes) && !sink.spill(None) {
        return Storing::Pass {
            response: Response::from_parts(parts, body),
            too_large: true,
        };
    }
    Storing::Store {
        parts,
        body,
        sink: Box::new(sink),
        ttl: i64::try_from(policy.lifetime.as_secs()).unwrap_or(i64::MAX),
    }
}

/// Revalidates a stored response that cannot be used as it is.
async fn revalidate<F: Fetch>(
    scope: Scope<'_, F>,
    req: Held,
    info: &ReqInfo,
    (entry, served): (Arc<Entry>, Counter),
    fwd: &'static str,
) -> Response<EdgeBody> {
    let Scope {
        origin,
        cache,
        site,
        ctx,
    } = scope;
    cache.metrics().cache_lookup("revalidate");
    let mut parts = req.parts;
    parts.headers = info.headers.clone();
    let conditional = conditional_request(parts, Some(&entry.obj));
    let request_time = SystemTime::now();
    let result = origin.fetch(conditional, site).await;
    let now = SystemTime::now();
    let stale_ok = policy::may_serve_stale_on_error(&entry.policy, entry.age(now));
    match result {
        Err(e) if stale_ok => {
            tracing::warn!(key = %info.primary, error = %e, "origin failed; serving stale (stale-if-error)");
            cache.metrics().cache_lookup("stale");
            let status = CacheStatus {
                fwd: Some("stale"),
                fwd_status: Some(e.client_status().as_u16()),
                ttl: Some(entry.ttl(now)),
                detail: Some("stale-if-error"),
                ..CacheStatus::default()
            };
            serve_stored(info, &entry, now, status, served)
        }
        Err(e) => CacheStatus::fwd(fwd).apply(e.response(site, ctx)),
        Ok(response) if response.status() == StatusCode::NOT_MODIFIED => {
            let entry = store_not_modified(cache, &entry, response.headers(), request_time, now);
            let status = CacheStatus {
                fwd: Some(fwd),
                fwd_status: Some(304),
                stored: true,
                ttl: Some(entry.ttl(now)),
                ..CacheStatus::default()
            };
            let mut answer = serve_stored(info, &entry, now, status, served);
            // Cookies the 304 set are this client's: passed on, never merged.
            for name in [&header::SET_COOKIE, &SET_COOKIE2] {
                for v in response.headers().get_all(name) {
                    answer.headers_mut().append(name, v.clone());
                }
            }
            answer
        }
        Ok(response) if is_error_status(response.status()) && stale_ok => {
            tracing::warn!(key = %info.primary, status = response.status().as_u16(), "origin error; serving stale (stale-if-error)");
            cache.metrics().cache_lookup("stale");
            let status = CacheStatus {
                fwd: Some("stale"),
                fwd_status: Some(response.status().as_u16()),
                ttl: Some(entry.ttl(now)),
                detail: Some("stale-if-error"),
                ..CacheStatus::default()
            };
            drop(response);
            serve_stored(info, &entry, now, status, served)
        }
        Ok(response) => {
            let status = CacheStatus {
                fwd_status: Some(response.status().as_u16()),
                ..CacheStatus::fwd(fwd)
            };
            let response = store_or_pass(cache, info, response, request_time, None, status);
            // The client's own conditionals were not sent; answer them here.
            answer_client_conditionals(info, response)
        }
    }
}

/// Why a storable response is not worth storing: no freshness information at all
/// (no `max-age`, `s-maxage`, `Expires`, nor `Last-Modified` for a heuristic), nothing
/// to revalidate it with, and no stale serving allowed. Such a typical dynamic page
/// could serve only `max-stale` requests; storing is never required (RFC 9111 §3), so
/// it costs no cache churn. An explicit `max-age=0` is still stored.
fn useless(policy: &ResponsePolicy, headers: &HeaderMap) -> Option<&'static str> {
    let dead = !policy.has_explicit_freshness(headers)
        && policy.lifetime.is_zero()
        && policy.stale_while_revalidate.is_zero()
        && policy.stale_if_error.is_zero()
        && !headers.contains_key(header::ETAG)
        && !headers.contains_key(header::LAST_MODIFIED);
    dead.then_some("stale on arrival, no validator")
}

/// Statuses after which `stale-if-error` may serve a stale response.
fn is_error_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 500 | 502 | 503 | 504)
}

/// A full (200) response from the origin to a request that had conditionals the
/// origin did not see: answers `304`/`412` when they say so.
fn answer_client_conditionals(info: &ReqInfo, response: Response<EdgeBody>) -> Response<EdgeBody> {
    if response.status() != StatusCode::OK {
        return response;
    }
    match conditional::evaluate(&info.method, &info.headers, response.headers()) {
        Precondition::Proceed => response,
        precondition => {
            let (parts, body) = response.into_parts();
            // The response may be being stored: read it to its end anyway.
            tokio::spawn(drain(body));
            let mut r = precondition_answer(precondition, &parts.headers);
            for v in parts.headers.get_all(&CACHE_STATUS) {
                r.headers_mut().append(&CACHE_STATUS, v.clone());
            }
            r
        }
    }
}

/// The 304 or 412 answer of a request whose preconditions said so, about a response
/// with `headers`.
fn precondition_answer(precondition: Precondition, headers: &HeaderMap) -> Response<EdgeBody> {
    if precondition == Precondition::NotModified {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        *r.headers_mut() = conditional::not_modified_headers(headers);
        r
    } else {
        text_response(StatusCode::PRECONDITION_FAILED, "precondition failed\n")
    }
}

/// Reads `body` to its end, discarding it (a body being stored then completes).
async fn drain(mut body: EdgeBody) {
    while let Some(Ok(_)) = body.frame().await {}
}

/// The request that revalidates `obj`: the client's, minus its own conditionals and
/// range, with the stored validators, as a GET without body.
fn conditional_request(
    parts: http::request::Parts,
    obj: Option<&CachedObject>,
) -> Request<EdgeBody> {
    let mut req = Request::from_parts(parts, empty());
    *req.method_mut() = Method::GET;
    let h = req.headers_mut();
    for name in &CONDITIONAL {
        h.remove(name);
    }
    h.remove(header::CONTENT_LENGTH);
    if let Some(obj) = obj {
        if let Some(etag) = obj.headers.get(header::ETAG) {
            h.insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(lm) = obj.headers.get(header::LAST_MODIFIED) {
            h.insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }
    req
}

/// Stores `entry` updated by a 304's header fields `fresh`; returns the new entry.
fn store_not_modified(
    cache: &Arc<Cache>,
    entry: &Entry,
    fresh: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Arc<Entry> {
    let updated = merge_not_modified(&entry.obj, fresh, request_time, response_time);
    let names: Arc<[HeaderName]> = entry.obj.vary.iter().map(|(n, _)| n.clone()).collect();
    cache.store(updated, names)
}

/// The stored response updated by a 304's header fields (RFC 9111 §4.3.4).
fn merge_not_modified(
    obj: &CachedObject,
    fresh: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> CachedObject {
    let mut headers = obj.headers.clone();
    let mut replaced: Vec<&HeaderName> = Vec::new();
    for (name, value) in fresh {
        if NOT_UPDATED.contains(name) || *name == CACHE_STATUS {
            continue;
        }
        if !replaced.contains(&name) {
            headers.remove(name);
            replaced.push(name);
        }
        headers.append(name.clone(), value.clone());
    }
    // An Age of the old response no longer applies.
    if !fresh.contains_key(header::AGE) {
        headers.remove(header::AGE);
    }
    CachedObject {
        key: obj.key.clone(),
        status: obj.status,
        headers,
        body: obj.body.clone(),
        request_time,
        response_time,
        vary: obj.vary.clone(),
    }
}

/// Refreshes a stale entry in a task (stale-while-revalidate), once at a time.
fn refresh_in_background<F: Fetch>(
    scope: Scope<'_, F>,
    req: &Held,
    client: &ReqInfo,
    entry: &Arc<Entry>,
) {
    let Some(guard) = scope.cache.begin_refresh(&entry.obj.key) else {
        return;
    };
    let background = Background {
        entry: Some(entry.clone()),
        flight: None,
        _refresh: Some(guard),
        _slot: None,
    };
    let target = (req.parts.uri.clone(), req.parts.version);
    fetch_in_background(scope, &target, client, background);
}

/// What a background fetch updates and holds.
struct Background {
    /// The stored response being refreshed (its validators are sent); none to fill.
    entry: Option<Arc<Entry>>,
    /// The flight this fetch leads, released once the object is stored.
    flight: Option<FlightGuard>,
    /// The refresh this fetch is, ended with it.
    _refresh: Option<super::RefreshGuard>,
    /// The range-fill slot this fetch takes, freed with it.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Fetches the full response for the client's request in a task and stores it:
/// revalidating `background.entry` when there is one, else filling the cache (after a
/// range request missed). The client's own conditionals and range are not sent. A
/// response that will not be stored is dropped, not read: its transfer is cancelled.
fn fetch_in_background<F: Fetch>(
    scope: Scope<'_, F>,
    target: &(http::Uri, http::Version),
    client: &ReqInfo,
    background: Background,
) {
    let Scope {
        origin,
        cache,
        site,
        ctx: _,
    } = scope;
    let mut builder = Request::builder()
        .method(Method::GET)
        .uri(target.0.clone())
        .version(target.1);
    if let Some(h) = builder.headers_mut() {
        *h = client.headers.clone();
    }
    let Ok(parts) = builder.body(()).map(|r| r.into_parts().0) else {
        return;
    };
    let info = ReqInfo {
        method: Method::GET,
        directives: policy::cache_control(&parts.headers),
        headers: parts.headers.clone(),
        primary: client.primary.clone(),
        set_cookie: client.set_cookie,
    };
    let request = conditional_request(parts, background.entry.as_ref().map(|e| &e.obj));
    let (origin, cache, site) = (origin.clone(), cache.clone(), site.clone());
    tokio::spawn(async move {
        let Background {
            entry,
            flight,
            _refresh,
            _slot,
        } = background;
        let filling = entry.is_none();
        let request_time = SystemTime::now();
        match (origin.fetch(request, &site).await, entry) {
            (Err(e), _) => {
                tracing::warn!(key = %info.primary, error = %e, "background fetch failed");
            }
            (Ok(response), Some(entry)) if response.status() == StatusCode::NOT_MODIFIED => {
                let now = SystemTime::now();
                store_not_modified(&cache, &entry, response.headers(), request_time, now);
            }
            (Ok(response), _) => {
                let stored = match storing(&cache, &info, response, request_time, flight) {
                    // Dropping the response cancels its transfer.
                    Storing::Pass { .. } => false,
                    Storing::Store { body, sink, .. } => {
                        // A fill may be a large object streaming to disk.
                        let limit = if filling { FILL_TIMEOUT } else { DRAIN_TIMEOUT };
                        tokio::time::timeout(limit, drain_into(body, *sink))
                            .await
                            .unwrap_or(false)
                    }
                };
                if !stored && filling {
                    cache.refuse_fill(&info.primary);
                }
            }
        }
    });
}

/// Answers from a stored response: client conditionals (304/412), ranges (206/416),
/// HEAD, or the whole body; with `Age` and `Cache-Status`.
fn serve_stored(
    info: &ReqInfo,
    entry: &Entry,
    now: SystemTime,
    status: CacheStatus,
    served: Counter,
) -> Response<EdgeBody> {
    let obj = &entry.obj;
    let age = HeaderValue::from(entry.age(now).as_secs());
    // Preconditions apply to a stored 2xx only, ranges to a stored 200 only (RFC 9110
    // §13.2.1, §14.2).
    let precondition = if obj.status.is_success() {
        conditional::evaluate(&info.method, &info.headers, &obj.headers)
    } else {
        Precondition::Proceed
    };
    let mut response = match precondition {
        Precondition::NotModified | Precondition::Failed => {
            precondition_answer(precondition, &obj.headers)
        }
        Precondition::Proceed => {
            let mut headers = obj.headers.clone();
            let ranged = if obj.status == StatusCode::OK {
                range::answer(&info.method, &info.headers, &obj.headers, &obj.body)
            } else {
                RangeAnswer::Full
            };
            let (code, body) = match ranged {
                RangeAnswer::Full => {
                    let body = if info.method == Method::HEAD {
                        empty()
                    } else {
                        counted(StoredBody::into_body(vec![obj.body.clone()]), served)
                    };
                    (obj.status, body)
                }
                RangeAnswer::Partial {
                    content_type,
                    content_range,
                    body,
                    len,
                } => {
                    if let Some(ct) = content_type {
                        headers.insert(header::CONTENT_TYPE, ct);
                    }
                    if let Some(cr) = content_range {
                        headers.insert(header::CONTENT_RANGE, cr);
                    }
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                    (
                        StatusCode::PARTIAL_CONTENT,
                        counted(StoredBody::into_body(body), served),
                    )
                }
                RangeAnswer::Unsatisfiable { content_range } => {
                    headers.insert(header::CONTENT_RANGE, content_range);
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
                    (StatusCode::RANGE_NOT_SATISFIABLE, empty())
                }
            };
            let mut r = Response::new(body);
            *r.status_mut() = code;
            *r.headers_mut() = headers;
            r
        }
    };
    response.headers_mut().insert(header::AGE, age);
    status.apply(response)
}

/// Invalidates the target URI and same-host `Location` / `Content-Location` after a
/// successful unsafe request (RFC 9111 §4.4).
fn invalidate_after_unsafe(
    cache: &Cache,
    site: &Site,
    ctx: &ClientCtx,
    host: &str,
    primary: &PrimaryKey,
    req_headers: &HeaderMap,
    resp_headers: &HeaderMap,
) {
    // Every stored response for the URL goes, whatever its key-header values.
    let mut n = cache.invalidate(primary.url());
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(target) = resp_headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Ok(uri) = target.parse::<http::Uri>() else {
            continue;
        };
        let same_host = match uri.host() {
            None => true,
            Some(h) => h.eq_ignore_ascii_case(host),
        };
        if !same_host || (uri.scheme().is_some() && uri.scheme_str() != Some(ctx.scheme)) {
            continue;
        }
        let Some(pq) = uri.path_and_query().map(|p| p.as_str()) else {
            continue;
        };
        if !pq.starts_with('/') {
            continue;
        }
        let key = PrimaryKey::new(site, ctx.scheme, host, pq, req_headers);
        n += cache.invalidate(key.url());
    }
    if n > 0 {
        tracing::debug!(key = %primary, removed = n, "invalidated after unsafe method");
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Collects a streamed body for the cache and stores the object once it is whole: in
/// memory up to `max_object_bytes`, then (with a disk tier) streamed to disk.
struct Sink {
    cache: Arc<Cache>,
    template: CachedObject,
    names: Arc<[HeaderName]>,
    expected: Option<u64>,
    /// The body so far while it is small enough for memory.
    chunks: Vec<Bytes>,
    /// Bytes in `chunks`, taken from the cache's collecting budget.
    collected: u64,
    /// Body bytes so far.
    len: u64,
    /// The disk writer, once the body outgrew memory.
    spool: Option<Spool>,
    /// Held until the object is stored (or given up), so that coalesced requests
    /// wait for it; a spool takes it over.
    flight: Option<FlightGuard>,
}

impl Sink {
    /// Ready for the next chunk: always in memory, when the disk writer has room on
    /// disk. False when the writer is gone (the object will not be stored).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        match &mut self.spool {
            Some(spool) => spool.poll_ready(cx),
            None => Poll::Ready(true),
        }
    }

    /// Adds a chunk; false when the object cannot be stored: it grew past the size
    /// bounds, or the bodies being collected in memory by all requests together would
    /// exceed the memory tier's size.
    fn push(&mut self, data: &Bytes) -> bool {
        let n = data.len() as u64;
        if let Some(spool) = &mut self.spool {
            self.len += n;
            return spool.push(data);
        }
        if self.len + n > self.cache.max_object_bytes {
            return self.spill(Some(data));
        }
        if !self.cache.reserve_collecting(n) {
            return false;
        }
        self.len += n;
        self.collected += n;
        self.chunks.push(data.clone());
        true
    }

    /// The body outgrew memory: what was collected (and `next`) goes to a disk writer
    /// that takes the rest. False when it cannot (no disk tier, no free slot).
    fn spill(&mut self, next: Option<&Bytes>) -> bool {
        let mut first = std::mem::take(&mut self.chunks);
        first.extend(next.cloned());
        self.cache.release_collecting(self.collected);
        self.collected = 0;
        self.len = first.iter().map(|b| b.len() as u64).sum();
        let flight = self.flight.take();
        let names = self.names.clone();
        self.spool = self
            .cache
            .begin_disk_stream(&self.template, names, first, flight);
        self.spool.is_some()
    }

    fn complete(&self) -> bool {
        self.expected.is_some_and(|e| self.len >= e)
    }

    /// Stores the object (a disk writer commits it once written); false when its body
    /// was not whole.
    fn finish(mut self) -> bool {
        if self.expected.is_some_and(|e| e != self.len) {
            tracing::debug!(key = %self.template.key, "body length differs from Content-Length; not stored");
            return false;
        }
        if let Some(spool) = self.spool.take() {
            spool.finish();
            return true;
        }
        let body = concat(std::mem::take(&mut self.chunks), self.len);
        let mut obj = std::mem::replace(
            &mut self.template,
            CachedObject {
                key: CacheKey::from_stored(""),
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: StoredBody::Memory(Bytes::new()),
                request_time: SystemTime::UNIX_EPOCH,
                response_time: SystemTime::UNIX_EPOCH,
                vary: Vec::new(),
            },
        );
        obj.body = StoredBody::Memory(body);
        self.cache.store(obj, self.names.clone());
        // `flight` drops here, after the store: waiters find the object.
        true
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.cache.release_collecting(self.collected);
    }
}

/// A response body passed through to the client while a copy is collected for the
/// cache. The copy is dropped if the body fails, is cut short (the client went away)
/// or grows past `max_object_bytes`; it is stored only when whole.
struct StoringBody {
    inner: EdgeBody,
    sink: Option<Sink>,
}

impl Body for StoringBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(sink) = this.sink.as_mut() {
            match sink.poll_ready(cx) {
                // The disk lags: the origin's body waits for it.
                Poll::Pending => return Poll::Pending,
                Poll::Ready(false) => this.sink = None,
                Poll::Ready(true) => {}
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(sink) = this.sink.as_mut() {
                        if !sink.push(data) {
                            tracing::debug!(key = %sink.template.key, "object over its size bound; not stored");
                            this.sink = None;
                        }
                    }
                }
                let done =
                    this.inner.is_end_stream() || this.sink.as_ref().is_some_and(Sink::complete);
                if done {
                    if let Some(sink) = this.sink.take() {
                        sink.finish();
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.sink = None,
            Poll::Ready(None) => {
                if let Some(sink) = this.sink.take() {
                    sink.finish();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for StoringBody {
    fn drop(&mut self) {
        let Some(sink) = self.sink.take() else {
            return;
        };
        // An empty body (e.g. 204) may never be polled.
        if sink.expected == Some(0) || (sink.expected.is_none() && self.inner.is_end_stream()) {
            sink.finish();
            return;
        }
        // The client went away before the end: the rest of the body is read in the
        // background (bounded in time and size) so that the object is still stored
        // whole for the requests waiting for it, or dropped.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = std::mem::replace(&mut self.inner, empty());
        handle.spawn(async move {
            let drained = tokio::time::timeout(DRAIN_TIMEOUT, drain_into(inner, sink)).await;
            if drained.is_err() {
                tracing::debug!("origin body not finished within {DRAIN_TIMEOUT:?} after the client left; not stored");
            }
        });
    }
}

/// Longest time the rest of a body is read for the cache after its client left.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest background fill of a whole object after a range miss (it may be gigabytes
/// streaming to the disk tier).
const FILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Reads `body` to its end into `sink`, then stores the object (if whole and within
/// the size bound); whether it was stored. Reading stops (and dropping `body` cancels
/// the transfer) as soon as the object cannot be stored.
async fn drain_into(mut body: EdgeBody, mut sink: Sink) -> bool {
    loop {
        if !std::future::poll_fn(|cx| sink.poll_ready(cx)).await {
            return false;
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !sink.push(data) {
                        return false;
                    }
                }
                if sink.complete() || body.is_end_stream() {
                    break;
                }
            }
            Some(Err(_)) => return false,
            None => break,
        }
    }
    sink.finish()
}

#[cfg(test)]
mod tests {
    use super::complete_length;

    #[test]
    fn complete_length_of_content_range() {
        assert_eq!(complete_length("bytes 0-0/1048576"), Some(1_048_576));
        assert_eq!(complete_length("Bytes 5-9/10"), Some(10));
        assert_eq!(complete_length("bytes 0-0/*"), None);
        assert_eq!(complete_length("bytes */100"), Some(100));
        assert_eq!(complete_length("items 0-0/10"), None);
        assert_eq!(complete_length("bytes 0-0/-1"), None);
        assert_eq!(complete_length(""), None);
    }
}

#[path = "slice.rs"]
mod slice;

#[cfg(test)]
#[path = "flow_tests.rs"]
mod flow_tests;
