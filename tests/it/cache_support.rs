//! What the cache tests share: a [`Stack`] whose edge config is kept (for restarts), a
//! request builder over curl that captures response headers, a `Cache-Status` (RFC
//! 9211) parser, and a raw HTTP/1.1 client for timing and early disconnects.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use keyless_tests::{
    free_addr, http_date, metric_sum, Edge, EdgeConfig, HttpVersion, Scripted, SeenRequest,
};

use crate::edge_support::{Stack, StackBuilder, ORIGIN_HOST, SITE};

/// The purge token every cache stack is configured with.
pub(crate) const PURGE_TOKEN: &str = "test-purge-token-0123456789";

/// A stack for cache tests: the edge also listens on plain HTTP and has a purge token.
pub(crate) struct CacheStack {
    pub(crate) s: Stack,
    pub(crate) config: EdgeConfig,
}

/// Starts a cache stack; `edit` changes the edge config (its one site is [`SITE`] and
/// its wildcard, last in the list, so `site_cache_option` applies to it).
pub(crate) fn cache_stack(edit: impl FnOnce(EdgeConfig) -> EdgeConfig) -> Result<CacheStack> {
    let b = StackBuilder::default().backends()?;
    let origin_url = format!("http://{ORIGIN_HOST}:{}", b.origin.port());
    let wildcard = format!("*.{SITE}");
    let config = EdgeConfig::new(&b.deployment)?
        .nameserver(b.dns.addr())
        .http_listener(free_addr()?)
        .cache_option("purge_token", PURGE_TOKEN)
        .site(&[SITE, &wildcard], &origin_url);
    let config = edit(config);
    let edge = Edge::start_with(&b.deployment, &config)?;
    Ok(CacheStack {
        s: Stack {
            edge,
            dns: b.dns,
            origin: b.origin,
            keyserver: b.keyserver,
            deployment: b.deployment,
        },
        config,
    })
}

/// A cache stack with the default cache config.
pub(crate) fn default_stack() -> Result<CacheStack> {
    cache_stack(|c| c)
}

impl CacheStack {
    /// A GET of `path` on [`SITE`] over HTTPS and HTTP/1.1.
    pub(crate) fn req(&self, path: &str) -> Req<'_> {
        Req {
            stack: self,
            path: path.to_owned(),
            host: SITE.to_owned(),
            plain: false,
            http: HttpVersion::Http11,
            method: None,
            headers: Vec::new(),
            data: None,
        }
    }

    /// A GET of `path` (fails unless curl got a response).
    pub(crate) fn get(&self, path: &str) -> Result<Resp> {
        self.req(path).send()
    }

    /// Scripts `path` on the origin.
    pub(crate) fn script(&self, path: &str, responses: &[Scripted]) -> Result<()> {
        self.s.origin.script(path, responses)
    }

    /// How many requests to `path` the origin saw.
    pub(crate) fn origin_count(&self, path: &str) -> Result<usize> {
        self.s.origin.count(path)
    }

    /// The requests to `path` the origin saw.
    pub(crate) fn origin_requests(&self, path: &str) -> Result<Vec<SeenRequest>> {
        self.s.origin.requests(path)
    }

    /// Kills the edge and starts a new one with the same config (same ports, same
    /// disk directory).
    pub(crate) fn restart(&mut self) -> Result<()> {
        self.restart_with(|_| Ok(()))
    }

    /// Kills the edge, runs `between` with the deployment directory, and starts a new
    /// edge with the same config.
    pub(crate) fn restart_with(
        &mut self,
        between: impl FnOnce(&std::path::Path) -> Result<()>,
    ) -> Result<()> {
        self.s.edge.kill()?;
        between(self.s.deployment.dir())?;
        self.s.edge = Edge::start_with(&self.s.deployment, &self.config)?;
        Ok(())
    }

    /// Waits up to 3 s for `metric{labels}` to satisfy `pred`; returns its last value.
    pub(crate) fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        pred: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let v = self.metric(name, labels)?;
            if pred(v) || Instant::now() >= deadline {
                return Ok(v);
            }
            sleep_ms(50);
        }
    }

    /// Waits (up to 3 s) until the disk tier holds `n` objects: disk writes happen in
    /// the background.
    pub(crate) fn wait_disk_objects(&self, n: usize) -> Result<()> {
        let objects = self.wait_metric("keyless_edge_cache_objects", &[("tier", "disk")], |v| {
            v >= n as f64
        })?;
        if objects < n as f64 {
            // Older metrics without an object gauge: settle for some bytes.
            self.wait_metric("keyless_edge_cache_bytes", &[("tier", "disk")], |v| v > 0.0)?;
            sleep_ms(300);
        }
        Ok(())
    }

    /// The plain HTTP listener.
    pub(crate) fn http_addr(&self) -> SocketAddr {
        // The listener is part of every cache stack's config.
        self.config.http.unwrap_or(self.config.https)
    }

    /// `POST /cache/purge?QUERY` with the right token.
    pub(crate) fn purge(&self, query: &str) -> Result<(u16, String)> {
        self.s.edge.purge(query, Some(PURGE_TOKEN))
    }

    /// The sum of metric `name` with `labels`.
    pub(crate) fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric_sum(&self.s.edge.metrics_text()?, name, labels))
    }
}

/// A request through the edge, sent with curl.
pub(crate) struct Req<'a> {
    stack: &'a CacheStack,
    path: String,
    host: String,
    plain: bool,
    http: HttpVersion,
    method: Option<String>,
    headers: Vec<String>,
    data: Option<String>,
}

impl Req<'_> {
    /// Adds a request header (`Name: value`).
    pub(crate) fn header(mut self, h: &str) -> Self {
        self.headers.push(h.to_owned());
        self
    }

    /// Uses this method (`HEAD` is sent with `curl -I`).
    pub(crate) fn method(mut self, m: &str) -> Self {
        self.method = Some(m.to_owned());
        self
    }

    /// Sends `data` as the body.
    pub(crate) fn data(mut self, data: &str) -> Self {
        self.data = Some(data.to_owned());
        self
    }

    /// Asks for HTTP/2.
    pub(crate) fn h2(mut self) -> Self {
        self.http = HttpVersion::Http2;
        self
    }

    /// Goes through the plain HTTP listener.
    pub(crate) fn plain(mut self) -> Self {
        self.plain = true;
        self
    }

    /// Asks for another host name on the edge.
    pub(crate) fn host(mut self, host: &str) -> Self {
        self.host = host.to_owned();
        self
    }

    /// Runs curl; fails unless it got a response.
    pub(crate) fn send(self) -> Result<Resp> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let edge = &self.stack.s.edge;
        let head_file = self.stack.s.deployment.dir().join(format!(
            "curl-headers-{}.txt",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let (mut curl, url) = if self.plain {
            let addr = self.stack.http_addr();
            (
                edge.curl(&self.host).resolve(&self.host, addr),
                format!("http://{}:{}{}", self.host, addr.port(), self.path),
            )
        } else {
            (edge.curl(&self.host), edge.url(&self.host, &self.path))
        };
        curl = curl.http(self.http).arg("-D").arg(&head_file);
        for h in &self.headers {
            curl = curl.header(h);
        }
        match self.method.as_deref() {
            Some("HEAD") => curl = curl.arg("-I"),
            Some(m) => curl = curl.arg("-X").arg(m),
            None => {}
        }
        if let Some(d) = &self.data {
            curl = curl.arg("--data-binary").arg(d);
        }
        let out = curl.get(&url)?;
        let head = std::fs::read_to_string(&head_file).unwrap_or_default();
        let _ = std::fs::remove_file(&head_file);
        if out.status == 0 {
            bail!(
                "curl {url} got no response (exit {:?}): {}",
                out.exit_code,
                out.stderr
            );
        }
        let (headers, informational) = parse_head(&head);
        let body = if self.method.as_deref() == Some("HEAD") {
            Vec::new()
        } else {
            out.body.clone()
        };
        Ok(Resp {
            status: out.status,
            http_version: out.http_version.clone(),
            headers,
            informational,
            body,
            exit_code: out.exit_code,
            elapsed: out.elapsed,
            what: format!("{} {url}", self.method.as_deref().unwrap_or("GET")),
        })
    }
}

/// The header fields of the last non-1xx response in curl's `-D` output, and the
/// statuses of the 1xx responses before it.
fn parse_head(text: &str) -> (Vec<(String, String)>, Vec<u16>) {
    let mut blocks: Vec<Vec<(String, String)>> = Vec::new();
    let mut interim = Vec::new();
    let mut current: Option<Vec<(String, String)>> = None;
    let mut informational = false;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("HTTP/") {
            if let Some(b) = current.take() {
                if !informational {
                    blocks.push(b);
                }
            }
            let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            informational = status.is_some_and(|s: u16| (100..200).contains(&s));
            if informational {
                interim.extend(status);
            }
            current = Some(Vec::new());
        } else if let (Some(b), Some((k, v))) = (current.as_mut(), line.split_once(':')) {
            b.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    if let Some(b) = current.take() {
        if !informational {
            blocks.push(b);
        }
    }
    (blocks.pop().unwrap_or_default(), interim)
}

/// What the client got.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) http_version: String,
    /// Names lowercase, in order.
    pub(crate) headers: Vec<(String, String)>,
    /// Statuses of the informational (1xx) responses before the final one.
    pub(crate) informational: Vec<u16>,
    pub(crate) body: Vec<u8>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) elapsed: Duration,
    what: String,
}

impl Resp {
    /// Every value of header `name`, joined with `, `.
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// The body as text.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `keyless` member of `Cache-Status` (empty if none).
    pub(crate) fn cs(&self) -> CacheStatus {
        CacheStatus::parse(self.header("cache-status").as_deref().unwrap_or(""))
    }

    /// The `Age` value.
    pub(crate) fn age(&self) -> Option<u64> {
        self.header("age")?.trim().parse().ok()
    }

    /// A description for assertion messages.
    pub(crate) fn show(&self) -> String {
        let body = self.text();
        let body: String = body.chars().take(300).collect();
        format!(
            "{}: HTTP/{} {} (curl exit {:?}, {:?})\n{}\nbody: {body:?}",
            self.what,
            self.http_version,
            self.status,
            self.exit_code,
            self.elapsed,
            self.headers
                .iter()
                .map(|(k, v)| format!("  {k}: {v}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    /// Fails unless the status is `status`, curl succeeded, the body is `body` and
    /// the response carries a `Cache-Status` of this cache.
    pub(crate) fn expect(&self, status: u16, body: &str) -> Result<&Resp> {
        ensure!(
            self.status == status && self.exit_code == Some(0) && self.text() == body,
            "expected {status} with body {body:?}, got {}",
            self.show()
        );
        ensure!(
            self.cs().present,
            "no `keyless` member in Cache-Status: {}",
            self.show()
        );
        Ok(self)
    }

    /// Fails unless this is a cache hit.
    pub(crate) fn expect_hit(&self) -> Result<&Resp> {
        ensure!(self.cs().hit(), "expected a cache hit, got {}", self.show());
        Ok(self)
    }

    /// Fails unless this was forwarded with `fwd=FWD`.
    pub(crate) fn expect_fwd(&self, fwd: &str) -> Result<&Resp> {
        let cs = self.cs();
        ensure!(
            !cs.hit() && cs.fwd() == Some(fwd),
            "expected Cache-Status fwd={fwd}, got {}",
            self.show()
        );
        Ok(self)
    }

    /// Fails unless this was forwarded (any reason), i.e. not a hit.
    pub(crate) fn expect_forwarded(&self) -> Result<&Resp> {
        let cs = self.cs();
        ensure!(
            !cs.hit() && cs.fwd().is_some(),
            "expected a forwarded response, got {}",
            self.show()
        );
        Ok(self)
    }

    /// Fails unless Cache-Status has `stored`.
    pub(crate) fn expect_stored(&self) -> Result<&Resp> {
        ensure!(self.cs().stored(), "expected `stored`, got {}", self.show());
        Ok(self)
    }

    /// Fails if Cache-Status has `stored`.
    pub(crate) fn expect_not_stored(&self) -> Result<&Resp> {
        ensure!(
            !self.cs().stored(),
            "expected no `stored`, got {}",
            self.show()
        );
        Ok(self)
    }
}

/// The `keyless` member of a `Cache-Status` field (RFC 9211): its parameters.
#[derive(Debug, Default)]
pub(crate) struct CacheStatus {
    pub(crate) present: bool,
    pub(crate) params: Vec<(String, Option<String>)>,
}

impl CacheStatus {
    /// Parses the field value, keeping the last member named `keyless`.
    pub(crate) fn parse(value: &str) -> CacheStatus {
        let mut found = CacheStatus::default();
        for member in value.split(',') {
            let mut parts = member.split(';').map(str::trim);
            if parts.next() != Some("keyless") {
                continue;
            }
            found = CacheStatus {
                present: true,
                params: parts
                    .filter(|p| !p.is_empty())
                    .map(|p| match p.split_once('=') {
                        Some((k, v)) => (
                            k.trim().to_owned(),
                            Some(v.trim().trim_matches('"').to_owned()),
                        ),
                        None => (p.to_owned(), None),
                    })
                    .collect(),
            };
        }
        found
    }

    /// Whether the parameter `name` is there.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.params.iter().any(|(k, _)| k == name)
    }

    /// The value of parameter `name`.
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub(crate) fn hit(&self) -> bool {
        self.has("hit")
    }

    pub(crate) fn fwd(&self) -> Option<&str> {
        self.param("fwd")
    }

    pub(crate) fn stored(&self) -> bool {
        self.has("stored")
    }

    pub(crate) fn ttl(&self) -> Option<i64> {
        self.param("ttl")?.parse().ok()
    }

    pub(crate) fn fwd_status(&self) -> Option<u16> {
        self.param("fwd-status")?.parse().ok()
    }

    pub(crate) fn detail(&self) -> Option<&str> {
        self.param("detail")
    }
}

/// Fails unless this is a forwarded miss (`fwd=miss` or `fwd=uri-miss`).
pub(crate) fn expect_miss(r: &Resp) -> Result<()> {
    let cs = r.cs();
    ensure!(
        !cs.hit() && matches!(cs.fwd(), Some("miss" | "uri-miss")),
        "expected a miss, got {}",
        r.show()
    );
    Ok(())
}

/// GETs `path` twice; both must reach the origin with `body`, neither stored.
pub(crate) fn assert_never_stored(
    s: &CacheStack,
    path: &str,
    status: u16,
    body: &str,
) -> Result<()> {
    for _ in 0..2 {
        let r = s.get(path)?;
        r.expect(status, body)?
            .expect_forwarded()?
            .expect_not_stored()?;
    }
    ensure!(
        s.origin_count(path)? == 2,
        "{path}: the origin saw {} requests, expected 2",
        s.origin_count(path)?
    );
    Ok(())
}

/// GETs `path` twice: a stored miss, then a hit the origin never sees.
pub(crate) fn assert_stored_then_hit(
    s: &CacheStack,
    path: &str,
    status: u16,
    body: &str,
) -> Result<Resp> {
    let first = s.get(path)?;
    first.expect(status, body)?.expect_stored()?;
    expect_miss(&first)?;
    let second = s.get(path)?;
    second.expect(status, body)?.expect_hit()?;
    ensure!(
        s.origin_count(path)? == 1,
        "{path}: the origin saw {} requests, expected 1",
        s.origin_count(path)?
    );
    Ok(second)
}

/// A `Scripted` 200 with `Cache-Control: CC` and `body`.
pub(crate) fn ok(cc: &str, body: &str) -> Scripted {
    Scripted::new(200).header("Cache-Control", cc).body(body)
}

/// A `Date` for a response scripted now: the current time rounded up to the next whole
/// second. The origin's own `Date` is rounded down, so a response can arrive up to 1 s
/// old (a `max-age=1` response was once stale 21 ms after it was stored); with this
/// one its age counts from when the edge fetched it, and a test can rely on it being
/// fresh for its whole `max-age`.
pub(crate) fn date_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    http_date(UNIX_EPOCH + Duration::from_secs(now.as_secs() + 1))
}

/// What a raw HTTP/1.1 exchange got.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub(crate) status: u16,
    pub(crate) head: String,
    /// The body as received (decoded if chunked and complete).
    pub(crate) body: Vec<u8>,
    /// From the request until the first body byte.
    pub(crate) first_body_byte: Option<Duration>,
    /// From the request until the end.
    pub(crate) total: Duration,
}

/// A raw `GET path` with `Host: host` on `addr` (HTTP/1.1, `Connection: close`). Reads
/// until EOF, or only until `limit` body bytes arrived, then drops the connection.
pub(crate) fn raw_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    limit: Option<usize>,
) -> Result<RawResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let started = Instant::now();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let mut head_end = None;
    let mut first_body_byte = None;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if head_end.is_some() => {
                // A reset after part of the body: report what arrived.
                let _ = e;
                break;
            }
            Err(e) => return Err(e).context(format!("reading GET {path} from {addr}")),
        };
        raw.extend_from_slice(buf.get(..n).unwrap_or_default());
        if head_end.is_none() {
            head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        if let Some(end) = head_end {
            if first_body_byte.is_none() && raw.len() > end {
                first_body_byte = Some(started.elapsed());
            }
            if limit.is_some_and(|l| raw.len() - end >= l) {
                break;
            }
        }
    }
    let total = started.elapsed();
    let Some(end) = head_end else {
        bail!(
            "no complete header section from {addr}: {:?}",
            String::from_utf8_lossy(&raw)
        );
    };
    let head = String::from_utf8_lossy(raw.get(..end).unwrap_or_default()).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw.get(end..).unwrap_or_default().to_vec();
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    if chunked && limit.is_none() {
        body = dechunk(&body).context("a malformed chunked body")?;
    }
    Ok(RawResponse {
        status,
        head,
        body,
        first_body_byte,
        total,
    })
}

/// Decodes a complete chunked body.
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line without CRLF")?;
        let size_text = std::str::from_utf8(raw.get(..line_end).unwrap_or_default())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        raw = raw.get(line_end + 2..).unwrap_or_default();
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(raw.get(..size).context("truncated chunk")?);
        raw = raw.get(size + 2..).context("truncated chunk end")?;
    }
}

/// Sleeps `ms` milliseconds.
pub(crate) fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
