//! In-process harness for the cache flow: a scriptable fake origin behind the
//! [`Fetch`] interface that records what reached it, a memory-only [`Cache`], one
//! site and a loopback client context, and a client that reads whole answers.
//!
//! It uses the cache's public surface only (`Cache::new`, `Cache::handle`,
//! `Cache::purge_url`), so the tests do not depend on how objects are keyed or kept.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::cache::Cache;
use crate::config::{CacheConfig, SiteCacheConfig, SiteConfig};
use crate::exchange::{empty, full, ClientCtx, EdgeBody, Fetch, FetchError};
use crate::metrics::Metrics;
use crate::sites::{Site, Sites};

/// The host every request is for.
pub(crate) const HOST: &str = "example.com";
/// The site's origin, as `FetchError`s name it.
pub(crate) const ORIGIN: &str = "http://origin.test:8080";

/// One scripted origin answer.
#[derive(Clone, Debug)]
pub(crate) struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    delay: Duration,
    fail: Option<fn() -> FetchError>,
    ranges: bool,
    /// Sends the body in chunks of this size, this long apart, without a
    /// `Content-Length` unless the script sets one.
    chunked: Option<(usize, Duration)>,
}

impl Reply {
    /// An empty answer with `status`.
    pub(crate) fn new(status: u16) -> Reply {
        Reply {
            status: StatusCode::from_u16(status).expect("a valid status in a test script"),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            delay: Duration::ZERO,
            fail: None,
            ranges: false,
            chunked: None,
        }
    }

    /// `200` with `Cache-Control: cache_control` and `body`.
    pub(crate) fn ok(cache_control: &str, body: &str) -> Reply {
        Reply::new(200)
            .header("cache-control", cache_control)
            .body(Bytes::copy_from_slice(body.as_bytes()))
    }

    /// No response: the fetch fails with `fail()`.
    pub(crate) fn fail(fail: fn() -> FetchError) -> Reply {
        Reply {
            fail: Some(fail),
            ..Reply::new(502)
        }
    }

    /// Adds a header field (appended: a name may repeat).
    pub(crate) fn header(mut self, name: &'static str, value: &str) -> Reply {
        let value = HeaderValue::from_str(value).expect("a valid header value in a test script");
        self.headers.append(HeaderName::from_static(name), value);
        self
    }

    pub(crate) fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = body.into();
        self
    }

    /// Answers after `ms` milliseconds (or fails after them).
    pub(crate) fn delay_ms(mut self, ms: u64) -> Reply {
        self.delay = Duration::from_millis(ms);
        self
    }

    /// Sends the body in chunks of `size` bytes, `ms` milliseconds apart (the first
    /// at once), without adding a `Content-Length`.
    pub(crate) fn chunked(mut self, size: usize, ms: u64) -> Reply {
        self.chunked = Some((size.max(1), Duration::from_millis(ms)));
        self
    }

    /// Answers a single `Range: bytes=a-b` with a `206` of that part, as origins do.
    pub(crate) fn ranges(mut self) -> Reply {
        self.ranges = true;
        self
    }

    /// The response to a request with `method` and `range`.
    fn respond(&self, method: &Method, range: Option<&str>) -> Response<EdgeBody> {
        let mut headers = self.headers.clone();
        let (status, body) = match range.and_then(|r| self.part(r)) {
            Some((first, last)) => {
                let len = self.body.len();
                let cr = format!("bytes {first}-{last}/{len}");
                headers.insert(header::CONTENT_RANGE, HeaderValue::from_str(&cr).unwrap());
                (StatusCode::PARTIAL_CONTENT, self.body.slice(first..=last))
            }
            None => (self.status, self.body.clone()),
        };
        let bodiless = matches!(status.as_u16(), 204 | 304);
        if !bodiless && !headers.contains_key(header::CONTENT_LENGTH) && self.chunked.is_none() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let body = match self.chunked {
            _ if *method == Method::HEAD || bodiless => empty(),
            Some((size, gap)) => chunks(body, size, gap),
            None => full(body),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    /// The satisfiable single range `bytes=a-b` of the body, if the reply serves ranges.
    fn part(&self, range: &str) -> Option<(usize, usize)> {
        if !self.ranges || self.status != StatusCode::OK {
            return None;
        }
        let (first, last) = range.strip_prefix("bytes=")?.split_once('-')?;
        let first: usize = first.trim().parse().ok()?;
        let last: usize = last.trim().parse().ok()?;
        let last = last.min(self.body.len().checked_sub(1)?);
        (first <= last).then_some((first, last))
    }
}

/// `body` in pieces of `size` bytes, `gap` apart.
fn chunks(body: Bytes, size: usize, gap: Duration) -> EdgeBody {
    let frames = futures_util::stream::unfold((body, true), move |(rest, first)| async move {
        if rest.is_empty() {
            return None;
        }
        if !first {
            tokio::time::sleep(gap).await;
        }
        let mut rest = rest;
        let piece = rest.split_to(size.min(rest.len()));
        let frame: Result<_, crate::exchange::BodyError> = Ok(hyper::body::Frame::data(piece));
        Some((frame, (rest, false)))
    });
    http_body_util::StreamBody::new(frames).boxed_unsync()
}

/// `FetchError::ConnectTimeout` for the site's origin (a [`Reply::fail`] argument).
pub(crate) fn connect_timeout() -> FetchError {
    FetchError::ConnectTimeout {
        origin: ORIGIN.to_owned(),
    }
}

/// A request as the origin got it.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) method: Method,
    pub(crate) headers: HeaderMap,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The fake origin: per path (with query) a queue of replies, the last repeating; a
/// path without a script gets a `404` with `no-store`. Records every request.
#[derive(Debug, Default)]
pub(crate) struct FakeOrigin {
    scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
    seen: Mutex<Vec<(String, Seen)>>,
}

impl FakeOrigin {
    /// Records `req` and picks its reply.
    fn take(&self, path: &str, seen: Seen) -> Reply {
        self.seen.lock().unwrap().push((path.to_owned(), seen));
        let mut scripts = self.scripts.lock().unwrap();
        match scripts.get_mut(path) {
            Some(queue) if queue.len() > 1 => queue.pop_front().unwrap(),
            Some(queue) if !queue.is_empty() => queue[0].clone(),
            _ => Reply::new(404)
                .header("cache-control", "no-store")
                .body("no script"),
        }
    }
}

impl Fetch for FakeOrigin {
    fn fetch(
        &self,
        req: Request<EdgeBody>,
        _site: &Site,
    ) -> impl Future<Output = Result<Response<EdgeBody>, FetchError>> + Send {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let seen = Seen {
            method: req.method().clone(),
            headers: req.headers().clone(),
        };
        let reply = self.take(path, seen);
        let method = req.method().clone();
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        async move {
            if !reply.delay.is_zero() {
                tokio::time::sleep(reply.delay).await;
            }
            match reply.fail {
                Some(fail) => Err(fail()),
                None => Ok(reply.respond(&method, range.as_deref())),
            }
        }
    }
}

/// An answer read whole.
#[derive(Debug)]
pub(crate) struct Got {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Got {
    /// The value of header `name` (the first).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<not UTF-8>")
    }

    /// The parameters of the `keyless` member of `Cache-Status`, without `ttl`
    /// (see [`Got::ttl`]): e.g. `fwd=uri-miss; stored`.
    pub(crate) fn cs(&self) -> String {
        self.cs_params()
            .into_iter()
            .filter(|p| !p.starts_with("ttl="))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The `ttl` parameter of `Cache-Status`.
    pub(crate) fn ttl(&self) -> Option<i64> {
        self.cs_params()
            .iter()
            .find_map(|p| p.strip_prefix("ttl=")?.parse().ok())
    }

    fn cs_params(&self) -> Vec<String> {
        let values = self.headers.get_all("cache-status");
        let member = values
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|m| m.split(';').next().map(str::trim) == Some("keyless"))
            .unwrap_or("");
        member
            .split(';')
            .skip(1)
            .map(|p| p.trim().to_owned())
            .collect()
    }
}

/// A memory-only cache, a fake origin and one site, driven through `Cache::handle`.
#[derive(Clone, Debug)]
pub(crate) struct Harness {
    pub(crate) cache: Arc<Cache>,
    pub(crate) origin: Arc<FakeOrigin>,
    pub(crate) site: Arc<Site>,
    ctx: ClientCtx,
    /// The disk tier's directory, removed with the last clone.
    pub(crate) disk: Option<Arc<tempfile::TempDir>>,
}

impl Harness {
    /// Default `[cache]` and site settings.
    pub(crate) fn new() -> Harness {
        Harness::with(|_| {}, |_| {})
    }

    /// A cache with a disk tier in a temporary directory, `[cache]` changed by
    /// `cache`.
    pub(crate) fn with_disk(cache: impl FnOnce(&mut CacheConfig)) -> Harness {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let path = dir.path().to_owned();
        let mut harness = Harness::with(
            |c| {
                c.disk_dir = Some(path);
                cache(c);
            },
            |_| {},
        );
        harness.disk = Some(dir);
        harness
    }

    /// Files in the disk tier (committed objects and temp files).
    pub(crate) fn disk_files(&self) -> Vec<std::path::PathBuf> {
        let Some(dir) = &self.disk else {
            return Vec::new();
        };
        let mut files = Vec::new();
        for sub in std::fs::read_dir(dir.path()).unwrap().flatten() {
            if sub.path().is_dir() {
                files.extend(
                    std::fs::read_dir(sub.path())
                        .unwrap()
                        .flatten()
                        .map(|f| f.path()),
                );
            }
        }
        files
    }

    /// `[cache]` and `[site.cache]` settings changed by `cache` and `site`.
    pub(crate) fn with(
        cache: impl FnOnce(&mut CacheConfig),
        site: impl FnOnce(&mut SiteCacheConfig),
    ) -> Harness {
        let mut config = CacheConfig {
            disk_dir: None,
            ..CacheConfig::default()
        };
        cache(&mut config);
        let mut site_cache = SiteCacheConfig::default();
        site(&mut site_cache);
        let sites = Sites::new(&[SiteConfig {
            domains: vec![HOST.to_owned()],
            origin: ORIGIN.parse().unwrap(),
            cache: site_cache,
            keyserver_group: None,
            chain: None,
        }])
        .unwrap();
        let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Harness {
            cache: Arc::new(Cache::new(&config, Arc::new(Metrics::new())).unwrap()),
            origin: Arc::new(FakeOrigin::default()),
            site: sites.lookup(HOST).unwrap().clone(),
            ctx: ClientCtx {
                client_addr: loopback(40000),
                scheme: "https",
                local_addr: loopback(443),
            },
            disk: None,
        }
    }

    /// Scripts the origin's replies for `path`, replacing any script it had.
    pub(crate) fn script(&self, path: &str, replies: Vec<Reply>) {
        assert!(!replies.is_empty(), "an empty script for {path}");
        let mut scripts = self.origin.scripts.lock().unwrap();
        scripts.insert(path.to_owned(), replies.into());
    }

    /// A request in upstream form: origin-form target, `Host` set.
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Request<EdgeBody> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, HOST);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(empty()).unwrap()
    }

    /// Sends `req` through the cache and reads the whole answer (which is what lets
    /// a response being stored complete).
    pub(crate) async fn send(&self, req: Request<EdgeBody>) -> Got {
        self.try_send(req).await.expect("a whole body")
    }

    /// [`Harness::send`], with the error that cut the body if one did.
    pub(crate) async fn try_send(&self, req: Request<EdgeBody>) -> Result<Got, String> {
        let response = self
            .cache
            .handle(&self.origin, req, HOST, &self.site, &self.ctx)
            .await;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// `method path` with `headers`, answered whole.
    pub(crate) async fn call(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
        self.send(self.request(method, path, headers)).await
    }

    pub(crate) async fn get(&self, path: &str) -> Got {
        self.call("GET", path, &[]).await
    }

    /// The requests for `path` the origin got, in order.
    pub(crate) fn seen(&self, path: &str) -> Vec<Seen> {
        let seen = self.origin.seen.lock().unwrap();
        seen.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// How many requests for `path` reached the origin.
    pub(crate) fn calls(&self, path: &str) -> usize {
        self.seen(path).len()
    }

    /// Waits (up to 2 s, in 5 ms steps) until `done` holds; whether it did.
    pub(crate) async fn eventually<Fut: Future<Output = bool>>(
        &self,
        mut done: impl FnMut() -> Fut,
    ) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if done().await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the origin has had `n` requests for `path`; fails the test if it
    /// does not within 2 s.
    pub(crate) async fn wait_calls(&self, path: &str, n: usize) {
        let reached = self.eventually(|| async { self.calls(path) >= n }).await;
        assert!(
            reached,
            "{path}: the origin got {} requests, expected {n}",
            self.calls(path)
        );
    }

    /// A probe that never reaches the origin: `GET path` with `only-if-cached` (and
    /// `headers`); a hit when the response is stored, else `504`.
    pub(crate) async fn cached(&self, path: &str, headers: &[(&str, &str)]) -> Got {
        let mut all = vec![("cache-control", "only-if-cached")];
        all.extend_from_slice(headers);
        self.call("GET", path, &all).await
    }
}
