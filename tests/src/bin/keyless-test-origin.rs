//! `keyless-test-origin`: a small content origin for the demo and the end-to-end tests.
//!
//! Routes (any method unless said):
//! - `/` — a greeting;
//! - `/echo` — the request line and headers as text, for header assertions;
//! - `/slow?ms=N` — answers after N milliseconds;
//! - `/bytes?n=N` — N bytes (streamed in 64 KiB chunks);
//! - `/blob?n=N&etag=E` — N bytes of [`keyless_tests::blob_range`] (any size, made as
//!   they stream, 256 KiB at a time) with `ETag: "E"` (default `"blob-N"`), a fixed
//!   `Last-Modified` and `Accept-Ranges`; a single `Range` gets a `206` of that part;
//! - `/status/N` — an empty response with status N;
//! - `/upload` — reads the body, answers its length and SHA-256;
//! - `/__count` — how many requests this origin has answered;
//! - `GET /__requests?path=/p` — the log of requests to `/p` (any query), in the
//!   format of [`keyless_tests::SeenRequest`]: per request a line `> METHOD URI MILLIS`
//!   (milliseconds since the origin started), its header lines, and an empty line;
//! - `POST /__script?path=/p` — appends the response spec in the body to `/p`'s queue:
//!   requests to `/p` take the specs in order, the last one answering every later
//!   request (format and options in [`keyless_tests::Scripted`]);
//! - `POST /__reset` — forgets the log and every script.
//!
//! Every request whose path does not start with `/__` is logged. Query parameters
//! `cc=...` and `h=Name:Value` (repeatable) add `Cache-Control` and other response
//! headers to the built-in routes; `sleep=MS` delays them.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyless_tests::{parse_http_date, pattern_body, Scripted};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "keyless-test-origin",
    about = "Content origin for the keyless demo and tests"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Name this origin reports in the greeting.
    #[arg(long, default_value = "origin")]
    name: String,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// One logged request, already in its text form.
struct Seen {
    path: String,
    text: String,
}

/// What every connection shares.
struct State {
    count: AtomicU64,
    name: Arc<str>,
    started: Instant,
    log: Mutex<Vec<Seen>>,
    scripts: Mutex<HashMap<String, VecDeque<Scripted>>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = TcpListener::bind(cli.listen).await?;
    eprintln!(
        "keyless-test-origin listening on {}",
        listener.local_addr()?
    );
    let state = Arc::new(State {
        count: AtomicU64::new(0),
        name: cli.name.into(),
        started: Instant::now(),
        log: Mutex::new(Vec::new()),
        scripts: Mutex::new(HashMap::new()),
    });
    loop {
        let (tcp, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let n = state.count.fetch_add(1, Ordering::Relaxed) + 1;
                handle(req, n, state.clone())
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a whole request body (the control routes' input).
async fn read_body(req: Request<Incoming>) -> Vec<u8> {
    match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

/// Records `req` in the log.
fn record(state: &State, req: &Request<Incoming>) {
    let mut text = format!(
        "> {} {} {}\n",
        req.method(),
        req.uri(),
        state.started.elapsed().as_millis()
    );
    for (k, v) in req.headers() {
        text.push_str(&format!(
            "{}: {}\n",
            k,
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    text.push('\n');
    let path = req.uri().path().to_owned();
    state
        .log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Seen { path, text });
}

/// The next scripted response for `path`, if `path` has a script: the queue's front,
/// removed unless it is the last one.
fn next_script(state: &State, path: &str) -> Option<Scripted> {
    let mut scripts = state.scripts.lock().unwrap_or_else(|p| p.into_inner());
    let queue = scripts.get_mut(path)?;
    if queue.len() > 1 {
        queue.pop_front()
    } else {
        queue.front().cloned()
    }
}

async fn control(req: Request<Incoming>, state: &State, count: u64) -> Response<Body> {
    let q = query(&req);
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    match req.uri().path() {
        "/__count" => text(StatusCode::OK, format!("{count}\n")),
        "/__requests" => {
            let Some(path) = get("path") else {
                return text(StatusCode::BAD_REQUEST, "path= missing\n");
            };
            let log = state.log.lock().unwrap_or_else(|p| p.into_inner());
            let body: String = log
                .iter()
                .filter(|s| s.path == path)
                .map(|s| s.text.as_str())
                .collect();
            text(StatusCode::OK, body)
        }
        "/__script" => {
            let Some(path) = get("path") else {
                return text(StatusCode::BAD_REQUEST, "path= missing\n");
            };
            let body = read_body(req).await;
            match Scripted::parse(&body) {
                Ok(spec) => {
                    state
                        .scripts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(path)
                        .or_default()
                        .push_back(spec);
                    text(StatusCode::OK, "ok\n")
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        "/__reset" => {
            state.log.lock().unwrap_or_else(|p| p.into_inner()).clear();
            state
                .scripts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            text(StatusCode::OK, "ok\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn handle(
    req: Request<Incoming>,
    count: u64,
    state: Arc<State>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if path.starts_with("/__") {
        return Ok(control(req, &state, count).await);
    }
    record(&state, &req);
    if let Some(spec) = next_script(&state, &path) {
        return Ok(scripted(&req, spec, count).await);
    }
    let q = query(&req);
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    if let Some(ms) = get("sleep").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut resp = match path.as_str() {
        "/" => Response::new(full(format!("hello from {}\n", state.name))),
        "/echo" => {
            let mut text = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (k, v) in req.headers() {
                text.push_str(&format!(
                    "{}: {}\n",
                    k,
                    String::from_utf8_lossy(v.as_bytes())
                ));
            }
            Response::new(full(text))
        }
        "/slow" => {
            let ms = get("ms").and_then(|v| v.parse().ok()).unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(format!("slept {ms} ms\n")))
        }
        "/bytes" => {
            let n: usize = get("n").and_then(|v| v.parse().ok()).unwrap_or(1024);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = (0..n.div_ceil(64 * 1024)).map(move |i| {
                let len = (n - i * 64 * 1024).min(64 * 1024);
                Ok::<_, std::io::Error>(Frame::data(chunk.slice(..len)))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))));
            r.headers_mut().insert("content-length", n.into());
            r
        }
        "/blob" => blob(&req, &get),
        "/upload" => {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut len = 0usize;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            len += d.len();
                            ctx.update(d);
                        }
                    }
                    Err(_) => break,
                }
            }
            Response::new(full(format!("{len} {}\n", hex::encode(ctx.finish()))))
        }
        p if p.starts_with("/status/") => {
            let code = p["/status/".len()..].parse().unwrap_or(500);
            text(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "",
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if let Some(cc) = get("cc") {
        if let Ok(v) = cc.parse() {
            resp.headers_mut().insert("cache-control", v);
        }
    }
    for (k, v) in &q {
        if k == "h" {
            if let Some((name, value)) = v.split_once(':') {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.trim().as_bytes()),
                    HeaderValue::from_str(value.trim()),
                ) {
                    resp.headers_mut().append(n, v);
                }
            }
        }
    }
    resp.headers_mut().insert("x-origin-count", count.into());
    Ok(resp)
}

/// Whether `req`'s conditionals match `spec`'s validators (its `ETag`, else its
/// `Last-Modified`), as RFC 9110 §13.2.2 orders them.
fn not_modified(req: &Request<Incoming>, spec: &Scripted) -> bool {
    let header = |name: &str| -> Option<String> {
        let values: Vec<String> = req
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    if let Some(inm) = header("if-none-match") {
        let Some(etag) = spec.header_value("etag") else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        return inm
            .split(',')
            .any(|t| t.trim() == "*" || weak(t) == weak(etag));
    }
    if let (Some(ims), Some(lm)) = (
        header("if-modified-since"),
        spec.header_value("last-modified"),
    ) {
        if let (Some(ims), Some(lm)) = (parse_http_date(&ims), parse_http_date(lm)) {
            return ims >= lm;
        }
    }
    false
}

async fn scripted(req: &Request<Incoming>, spec: Scripted, count: u64) -> Response<Body> {
    if spec.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(spec.delay_ms)).await;
    }
    let add_headers = |resp: &mut Response<Body>| {
        for (k, v) in &spec.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                resp.headers_mut().append(n, v);
            }
        }
        resp.headers_mut().insert("x-origin-count", count.into());
    };
    if spec.auto_304 && not_modified(req, &spec) {
        let mut resp = Response::new(Empty::new().map_err(|e: Infallible| match e {}).boxed());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        add_headers(&mut resp);
        return resp;
    }
    let mut body: Bytes = match spec.body_bytes {
        Some(n) => pattern_body(n).into(),
        None => spec.body.clone().into(),
    };
    let mut content_range = None;
    if spec.ranges {
        if let Some((start, end)) = single_range(req, body.len()) {
            content_range = Some(format!("bytes {start}-{end}/{}", body.len()));
            body = body.slice(start..end + 1);
        }
    }
    let len = body.len();
    let streamed = spec.body_bytes.is_some() || spec.body_delay_ms > 0 || spec.fail_mid_body;
    let mut resp = if streamed {
        Response::new(stream_body(body, spec.body_delay_ms, spec.fail_mid_body))
    } else {
        Response::new(full(body))
    };
    *resp.status_mut() = StatusCode::from_u16(spec.status).unwrap_or(StatusCode::OK);
    add_headers(&mut resp);
    if let Some(cr) = content_range.and_then(|cr| HeaderValue::from_str(&cr).ok()) {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        resp.headers_mut().insert("content-range", cr);
    }
    if streamed && !resp.headers().contains_key("content-length") {
        resp.headers_mut().insert("content-length", len.into());
    }
    resp
}

/// `/blob`: the object of `n` bytes, or the one range asked for.
fn blob(req: &Request<Incoming>, get: &dyn Fn(&str) -> Option<String>) -> Response<Body> {
    const CHUNK: u64 = 256 * 1024;
    let n: u64 = get("n").and_then(|v| v.parse().ok()).unwrap_or(1024);
    let etag = get("etag").unwrap_or_else(|| format!("blob-{n}"));
    let range = usize::try_from(n)
        .ok()
        .and_then(|len| single_range(req, len));
    let (start, end) = range.map_or((0, n), |(a, b)| (a as u64, b as u64 + 1));
    let chunks = futures_util::stream::unfold(start, move |at| async move {
        if at >= end {
            return None;
        }
        let len = (end - at).min(CHUNK);
        let data = Bytes::from(keyless_tests::blob_range(at, len as usize));
        Some((Ok::<_, std::io::Error>(Frame::data(data)), at + len))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
    let h = r.headers_mut();
    h.insert("content-length", (end - start).into());
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    h.insert(
        "last-modified",
        HeaderValue::from_static("Mon, 02 Nov 2026 10:00:00 GMT"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        h.insert("etag", v);
    }
    if range.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{n}", end - 1)) {
            h.insert("content-range", v);
        }
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    r
}

/// The one satisfiable range of a `Range: bytes=A-B` / `A-` / `-N` request header for a
/// body of `len` bytes, as inclusive offsets.
fn single_range(req: &Request<Incoming>, len: usize) -> Option<(usize, usize)> {
    let spec = req.headers().get("range")?.to_str().ok()?;
    let spec = spec.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || len == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: usize = n.parse().ok()?;
            (len.checked_sub(n.min(len))?, len - 1)
        }
        (a, "") => (a.parse().ok()?, len - 1),
        (a, b) => (a.parse().ok()?, b.parse::<usize>().ok()?.min(len - 1)),
    };
    (start <= end && start < len).then_some((start, end))
}

/// `body` in chunks of at most 16 KiB (at least two when it is delayed or fails):
/// with `delay_ms`, the first chunk goes at once and the others are spread over
/// `delay_ms`; with `fail`, the stream errs after half the body, which makes hyper
/// abort the connection.
fn stream_body(body: Bytes, delay_ms: u64, fail: bool) -> Body {
    const CHUNK: usize = 16 * 1024;
    let len = body.len();
    let min_chunks = if delay_ms > 0 || fail { 2 } else { 1 };
    let n = len.div_ceil(CHUNK).max(min_chunks).max(1);
    let size = len.div_ceil(n).max(1);
    let pause = if n > 1 {
        Duration::from_millis(delay_ms) / (n as u32 - 1)
    } else {
        Duration::ZERO
    };
    let stop_at = if fail { len / 2 } else { usize::MAX };
    let stream = futures_util::stream::unfold(0usize, move |at| {
        let body = body.clone();
        async move {
            if at >= len {
                return None;
            }
            if at >= stop_at {
                // Let the half that was sent reach the peer before the abort.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let err = std::io::Error::other("scripted failure mid-body");
                return Some((Err(err), usize::MAX));
            }
            if at > 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            let end = (at + size).min(len).min(stop_at.max(at + 1));
            Some((Ok(Frame::data(body.slice(at..end))), end))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}
