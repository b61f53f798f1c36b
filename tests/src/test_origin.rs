//! A running `keyless-test-origin`: the content origin behind the edge in end-to-end
//! tests (`/`, `/echo`, `/slow?ms=N`, `/bytes?n=N`, `/status/N`, `/upload`, `/__count`),
//! which logs the requests it gets ([`TestOrigin::requests`]) and answers scripted
//! responses ([`TestOrigin::script`], [`Scripted`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::bins::{binary, Profile};
use crate::net::{free_addr, http_get, wait_for_port};
use crate::process::LoggedChild;

/// How long the origin may take to listen after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A `keyless-test-origin` process on a loopback port; killed on drop.
#[derive(Debug)]
pub struct TestOrigin {
    process: LoggedChild,
    addr: SocketAddr,
    name: String,
}

impl TestOrigin {
    /// Starts an origin named `origin` on a free port, logging into `logs_dir`.
    pub fn start(logs_dir: &Path) -> Result<TestOrigin> {
        TestOrigin::start_on(logs_dir, free_addr()?, "origin")
    }

    /// Starts an origin answering `hello from NAME` on `addr`.
    pub fn start_on(logs_dir: &Path, addr: SocketAddr, name: &str) -> Result<TestOrigin> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let log_path = logs_dir.join(format!(
            "test-origin-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = Command::new(binary("keyless-test-origin", Profile::current())?);
        cmd.arg("--listen")
            .arg(addr.to_string())
            .args(["--name", name]);
        let mut process = LoggedChild::spawn("keyless-test-origin", cmd, &log_path)?;
        // It logs one line; the edge's log tells what happened to requests.
        process.set_report_on_drop(false);
        let deadline = Instant::now() + START_TIMEOUT;
        while wait_for_port(addr, Duration::from_millis(100)).is_err() {
            process.ensure_running()?;
            if Instant::now() >= deadline {
                bail!("keyless-test-origin did not listen on {addr} within {START_TIMEOUT:?}");
            }
        }
        Ok(TestOrigin {
            process,
            addr,
            name: name.to_owned(),
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The name in its greeting.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What `/` answers: `hello from NAME\n`.
    pub fn greeting(&self) -> String {
        format!("hello from {}\n", self.name)
    }

    /// How many requests the origin has answered (asked directly, not through the edge;
    /// the question itself counts).
    pub fn request_count(&self) -> Result<u64> {
        let (status, body) = http_get(self.addr, "/__count")?;
        if status != 200 {
            bail!("GET /__count answered {status}: {body}");
        }
        Ok(body.trim().parse()?)
    }

    /// Kills the origin (its port then refuses connections).
    pub fn stop(&mut self) -> Result<()> {
        self.process.kill()?;
        Ok(())
    }

    /// The requests this origin logged whose path (without query) is `path`, oldest
    /// first.
    pub fn requests(&self, path: &str) -> Result<Vec<SeenRequest>> {
        let (status, body) =
            self.call("GET", &format!("/__requests?path={}", encode(path)), b"")?;
        if status != 200 {
            bail!("GET /__requests answered {status}: {body}");
        }
        SeenRequest::parse_log(&body)
    }

    /// How many requests to `path` (any query) the origin logged.
    pub fn count(&self, path: &str) -> Result<usize> {
        Ok(self.requests(path)?.len())
    }

    /// Waits up to `timeout` until the origin logged at least `n` requests to `path`;
    /// returns them.
    pub fn wait_for_requests(
        &self,
        path: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<SeenRequest>> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.requests(path)?;
            if seen.len() >= n {
                return Ok(seen);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the origin saw {} requests to {path} within {timeout:?}, expected {n}: {seen:#?}",
                    seen.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Appends `responses` to `path`'s script: requests to `path` (any method, any
    /// query) take them in order, and the last one answers every later request.
    pub fn script(&self, path: &str, responses: &[Scripted]) -> Result<()> {
        for r in responses {
            let (status, body) = self.call(
                "POST",
                &format!("/__script?path={}", encode(path)),
                &r.to_text(),
            )?;
            if status != 200 {
                bail!("POST /__script answered {status}: {body}");
            }
        }
        Ok(())
    }

    /// Forgets the request log and every script.
    pub fn reset(&self) -> Result<()> {
        let (status, body) = self.call("POST", "/__reset", b"")?;
        if status != 200 {
            bail!("POST /__reset answered {status}: {body}");
        }
        Ok(())
    }

    /// One HTTP/1.0 exchange with the origin's control routes: (status, body).
    fn call(&self, method: &str, target: &str, body: &[u8]) -> Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to the test origin at {}", self.addr))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut req = format!(
            "{method} {target} HTTP/1.0\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        stream.write_all(&req)?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .with_context(|| format!("reading the test origin's answer to {method} {target}"))?;
        crate::net::parse_reply(&raw)
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A request the origin logged.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The request target as received (path and query).
    pub uri: String,
    /// The header fields in order, names lowercase.
    pub headers: Vec<(String, String)>,
    /// When it arrived, since the origin started.
    pub at: Duration,
}

impl SeenRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Parses the `/__requests` text: per request `> METHOD URI MILLIS`, header lines
    /// `name: value`, an empty line.
    fn parse_log(text: &str) -> Result<Vec<SeenRequest>> {
        let mut out: Vec<SeenRequest> = Vec::new();
        for line in text.lines() {
            if let Some(first) = line.strip_prefix("> ") {
                let mut parts = first.split(' ');
                let (Some(method), Some(uri), Some(ms)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    bail!("bad request line {line:?} in the origin's log");
                };
                out.push(SeenRequest {
                    method: method.to_owned(),
                    uri: uri.to_owned(),
                    headers: Vec::new(),
                    at: Duration::from_millis(ms.parse()?),
                });
            } else if let Some((k, v)) = line.split_once(": ") {
                let Some(last) = out.last_mut() else {
                    bail!("header line {line:?} before any request in the origin's log");
                };
                last.headers.push((k.to_owned(), v.to_owned()));
            }
        }
        Ok(out)
    }
}

/// A scripted origin response, built step by step and sent with [`TestOrigin::script`].
///
/// Its wire form (the body of `POST /__script`) is a first line `STATUS` followed by
/// options (`delay=MS`, `auto-304`, `ranges`, `body-bytes=N`, `body-delay=MS`,
/// `fail-mid-body`),
/// then `Name: Value` header lines, an empty line, and the body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scripted {
    /// The status code.
    pub status: u16,
    /// Header fields, in order.
    pub headers: Vec<(String, String)>,
    /// The body (unless `body_bytes`).
    pub body: Vec<u8>,
    /// Sleep this long before answering.
    pub delay_ms: u64,
    /// Answer 304 (with these headers, no body) to a request whose `If-None-Match`
    /// matches the `ETag` or whose `If-Modified-Since` is not before `Last-Modified`.
    pub auto_304: bool,
    /// Answer a request with one satisfiable `Range: bytes=...` with 206 and that
    /// slice of the body.
    pub ranges: bool,
    /// The body is [`pattern_body`] of this many bytes, streamed in chunks.
    pub body_bytes: Option<usize>,
    /// Send the header section, then the body's first chunk, then the rest spread over
    /// this many milliseconds.
    pub body_delay_ms: u64,
    /// Send half the body (with the full `Content-Length`), then abort the connection.
    pub fail_mid_body: bool,
}

impl Scripted {
    /// A response with `status`, no header fields and an empty body.
    pub fn new(status: u16) -> Scripted {
        Scripted {
            status,
            ..Scripted::default()
        }
    }

    /// Adds a header field.
    pub fn header(mut self, name: &str, value: &str) -> Scripted {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl AsRef<[u8]>) -> Scripted {
        self.body = body.as_ref().to_vec();
        self
    }

    /// Sleeps `ms` before answering.
    pub fn delay(mut self, ms: u64) -> Scripted {
        self.delay_ms = ms;
        self
    }

    /// Answers matching conditional requests with 304.
    pub fn auto_304(mut self) -> Scripted {
        self.auto_304 = true;
        self
    }

    /// Answers single byte ranges with 206.
    pub fn ranges(mut self) -> Scripted {
        self.ranges = true;
        self
    }

    /// A body of `n` bytes ([`pattern_body`]), streamed in chunks.
    pub fn body_bytes(mut self, n: usize) -> Scripted {
        self.body_bytes = Some(n);
        self
    }

    /// Sends the body slowly: the first chunk at once, the rest over `ms`.
    pub fn body_delay_ms(mut self, ms: u64) -> Scripted {
        self.body_delay_ms = ms;
        self
    }

    /// Sends half the body, then aborts the connection.
    pub fn fail_mid_body(mut self) -> Scripted {
        self.fail_mid_body = true;
        self
    }

    /// The value of header `name` (case-insensitive), if set.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The wire form.
    pub fn to_text(&self) -> Vec<u8> {
        let mut first = self.status.to_string();
        if self.delay_ms > 0 {
            first.push_str(&format!(" delay={}", self.delay_ms));
        }
        if self.auto_304 {
            first.push_str(" auto-304");
        }
        if self.ranges {
            first.push_str(" ranges");
        }
        if let Some(n) = self.body_bytes {
            first.push_str(&format!(" body-bytes={n}"));
        }
        if self.body_delay_ms > 0 {
            first.push_str(&format!(" body-delay={}", self.body_delay_ms));
        }
        if self.fail_mid_body {
            first.push_str(" fail-mid-body");
        }
        let mut text = first;
        text.push('\n');
        for (k, v) in &self.headers {
            text.push_str(&format!("{k}: {v}\n"));
        }
        text.push('\n');
        let mut out = text.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    /// Parses the wire form.
    pub fn parse(raw: &[u8]) -> std::result::Result<Scripted, String> {
        let split = raw
            .windows(2)
            .position(|w| w == b"\n\n")
            .ok_or("no empty line after the header section")?;
        let (head, body) = raw.split_at(split);
        let head = std::str::from_utf8(head).map_err(|_| "header section is not UTF-8")?;
        let mut lines = head.lines();
        let first = lines.next().ok_or("empty spec")?;
        let mut words = first.split_whitespace();
        let status = words
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or("first line must start with a status code")?;
        let mut spec = Scripted::new(status);
        spec.body = body.get(2..).unwrap_or_default().to_vec();
        for w in words {
            let (k, v) = w.split_once('=').unwrap_or((w, ""));
            let num = || v.parse::<u64>().map_err(|_| format!("bad option {w:?}"));
            match k {
                "delay" => spec.delay_ms = num()?,
                "auto-304" => spec.auto_304 = true,
                "ranges" => spec.ranges = true,
                "body-bytes" => spec.body_bytes = Some(num()? as usize),
                "body-delay" => spec.body_delay_ms = num()?,
                "fail-mid-body" => spec.fail_mid_body = true,
                _ => return Err(format!("unknown option {w:?}")),
            }
        }
        for line in lines {
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| format!("bad header line {line:?}"))?;
            spec.headers
                .push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok(spec)
    }
}

/// The body of [`Scripted::body_bytes`]: 16-byte lines each holding its own offset
/// (`000000000000016\n`), cut at `n` bytes, so any slice shows where it came from.
pub fn pattern_body(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 16);
    let mut at = 0usize;
    while out.len() < n {
        out.extend_from_slice(format!("{at:015}\n").as_bytes());
        at += 16;
    }
    out.truncate(n);
    out
}

/// Bytes of one page of [`blob_range`].
pub const BLOB_PAGE: u64 = 4096;

/// Bytes `start..start + len` of the test origin's `/blob` object, of any size: 4 KiB
/// pages, each starting with a 16-byte line holding its own offset
/// (`000000000004096\n`) and filled with a fixed byte pattern, so that any page out of
/// place changes the object's hash. Cheap to make (a copy per page), so that a
/// gigabyte can be generated in a test's time.
pub fn blob_range(start: u64, len: usize) -> Vec<u8> {
    const PAGE: usize = BLOB_PAGE as usize;
    let fill: Vec<u8> = (0..PAGE).map(|i| b'a' + (i * 7 % 26) as u8).collect();
    let mut out = Vec::with_capacity(len);
    let mut page = vec![0u8; PAGE];
    let mut at = start;
    while out.len() < len {
        let base = at - at % BLOB_PAGE;
        page[..16].copy_from_slice(format!("{base:015}\n").as_bytes());
        page[16..].copy_from_slice(&fill[16..]);
        let from = (at - base) as usize;
        let take = (PAGE - from).min(len - out.len());
        out.extend_from_slice(&page[from..from + take]);
        at += take as u64;
    }
    out
}

/// `t` as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the HTTP date format.
pub fn http_date(t: SystemTime) -> String {
    keyless_edge::httpdate::fmt_http_date(t)
}

/// Parses an HTTP date (IMF-fixdate, RFC 850 or asctime); `None` for anything else.
pub fn parse_http_date(s: &str) -> Option<SystemTime> {
    let value = hyper::header::HeaderValue::from_str(s).ok()?;
    keyless_edge::httpdate::parse_http_date(&value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn http_dates_round_trip() {
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        let now = UNIX_EPOCH + Duration::from_secs(1_795_000_123);
        assert_eq!(parse_http_date(&http_date(now)), Some(now));
    }

    #[test]
    fn scripts_round_trip() {
        let s = Scripted::new(203)
            .header("Cache-Control", "max-age=60")
            .body("a\n\nb")
            .delay(5)
            .auto_304()
            .ranges()
            .body_bytes(7)
            .body_delay_ms(9)
            .fail_mid_body();
        assert_eq!(Scripted::parse(&s.to_text()), Ok(s));
        assert_eq!(&pattern_body(20)[..], b"000000000000000\n0000");
    }
}
