//! The proxy end to end on loopback: a small hyper origin, the edge's
//! `serve_connection` on a TCP listener, and real HTTP/1.1 and HTTP/2 clients.

mod https;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::Config;
use crate::exchange::ClientCtx;
use crate::metrics::Metrics;
use crate::sites::Sites;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::Response;

const MIB: usize = 1024 * 1024;

fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Byte `i` of the test payloads.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

async fn origin_handler(
    req: Request<hyper::body::Incoming>,
) -> Result<Response<UnsyncBoxBody<Bytes, Infallible>>, Infallible> {
    let full = |s: String| Full::new(Bytes::from(s)).boxed_unsync();
    let response = match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(full("late".into()))
        }
        "/upload" => {
            let mut body = req.into_body();
            let (mut len, mut hash) = (0usize, FNV_START);
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    len += data.len();
                    hash = fnv1a(hash, &data);
                }
            }
            Response::new(full(format!("len={len} hash={hash:x}")))
        }
        "/big" => {
            let chunks = (0..16).map(|c| {
                let chunk: Vec<u8> = (c * 65536..(c + 1) * 65536).map(pattern).collect();
                Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)))
            });
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync())
        }
        "/hop" => Response::builder()
            .header("connection", "x-internal")
            .header("x-internal", "1")
            .header("keep-alive", "timeout=5")
            .header("x-kept", "yes")
            .body(full("hop".into()))
            .unwrap(),
        _ => {
            let mut text = format!(
                "{} {}\n",
                req.method(),
                req.uri().path_and_query().map_or("", |p| p.as_str())
            );
            text.push_str(&format!("version: {:?}\n", req.version()));
            if let Some(authority) = req.uri().authority() {
                text.push_str(&format!("authority: {authority}\n"));
            }
            for (name, value) in req.headers() {
                text.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
            }
            Response::new(full(text))
        }
    };
    Ok(response)
}

/// A plain HTTP/1.1 origin; the counter is its accepted connections.
async fn start_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(origin_handler))
                    .await;
            });
        }
    });
    (addr, accepted)
}

struct Edge {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

struct EdgeOpts {
    scheme: &'static str,
    response_header_timeout: &'static str,
    idle_timeout: &'static str,
    origin_ca: Option<std::path::PathBuf>,
}

impl Default for EdgeOpts {
    fn default() -> Self {
        EdgeOpts {
            scheme: "http",
            response_header_timeout: "5s",
            idle_timeout: "10s",
            origin_ca: None,
        }
    }
}

async fn start_edge(origin: &str, opts: EdgeOpts) -> Edge {
    let text = format!(
        r#"
[listen]
https = "127.0.0.1:0"
[keyserver]
servers = ["127.0.0.1:1"]
ca = "ca.pem"
cert = "edge.pem"
key = "edge.key"
[proxy]
connect_timeout = "1s"
response_header_timeout = "{}"
idle_timeout = "{}"
max_header_bytes = 16384
[[site]]
domains = ["example.com", "*.example.com"]
origin = "{origin}"
"#,
        opts.response_header_timeout, opts.idle_timeout
    );
    let mut config = Config::parse(&text, Path::new("/nonexistent/edge.toml")).unwrap();
    config.proxy.origin_ca = opts.origin_ca;
    let metrics = Arc::new(Metrics::new());
    let origin = OriginClient::new(&config.proxy, &config.dns, metrics.clone()).unwrap();
    let sites = Arc::new(Sites::new(&config.sites).unwrap());
    let front = Arc::new(HttpFront::new(
        &config.proxy,
        sites,
        None,
        Arc::new(origin),
        metrics.clone(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let scheme = opts.scheme;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            let ctx = ClientCtx {
                client_addr: peer,
                scheme,
                local_addr: addr,
            };
            tokio::spawn(serve_connection(stream, front.clone(), ctx, token.clone()));
        }
    });
    Edge {
        addr,
        metrics,
        shutdown,
    }
}

type ClientSender<B> = hyper::client::conn::http1::SendRequest<B>;

async fn connect<B>(addr: SocketAddr) -> (ClientSender<B>, tokio::task::JoinHandle<()>)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send<B>(sender: &mut ClientSender<B>, req: Request<B>) -> Answer
where
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    sender.ready().await.unwrap();
    let response = sender.send_request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> Answer {
    let (mut sender, _task) = connect(addr).await;
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    send(&mut sender, req).await
}

#[tokio::test]
async fn forwards_with_host_kept_and_forwarding_headers_added() {
    let (origin, _) = start_origin().await;
    let edge = start_edge(&format!("http://{origin}"), EdgeOpts::default()).await;
    let (mut sender, _task) = connect(edge.addr).await;
    let req = Request::get("/hello?x=1")
        .header("host", "www.example.com")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "s")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "203.0.113.9")
        .header("cookie", "session=abc")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let answer = send(&mut sender, req).await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = answer.text();
    assert!(seen.starts_with("GET /hello?x=1\n"), "{seen}");
    for line in [
        "host: www.example.com\n",
        // The client's own X-Forwarded-For is replaced: the edge is the first hop.
        "x-forwarded-for: 127.0.0.1\n",
        "x-forwarded-host: www.example.com\n",
        "x-forwarded-proto: http\n",
        "forwarded: for=127.0.0.1;proto=http;host=www.example.com\n",
        "via: 1.1 keyless\n",
        "cookie: session=abc\n",
    ] {
        assert!(
            seen.contains(line),
            "origin did not see {line:?} in:\n{seen}"
        );
    }
    for gone in ["x-secret", "keep-alive", "proxy-authorization"] {
        assert!(!seen.contains(gone), "origin saw {gone} in:\n{seen}");
    }
    assert_eq!(answer.headers["via"], "1.1 keyless");

    let hop = send(
        &mut sender,
        Request::get("/hop")
            .header("host", "example.com")
            .body(Empty::new())
            .unwrap(),
    )
    .await;
    assert_eq!(hop.status, StatusCode::OK);
    assert!(hop.headers.get("x-internal").is_none());
    assert!(hop.headers.get("keep-alive").is_none());
    assert_eq!(hop.headers["x-kept"], "yes");

    let odd = send(
        &mut sender,
        Request::builder()
            .method("PURGE-ALL")
            .uri("/odd")
            .header("host", "example.com")
            .body(Empty::new())
            .unwrap(),
    )
    .await;
    assert!(odd.text().starts_with("PURGE-ALL /odd\n"), "{}", odd.text());

    let rendered = edge.metrics.render();
    assert!(rendered.contains("result=\"ok\""), "{rendered}");
    assert!(rendered.contains("status=\"200\""), "{rendered}");
}

#[tokio::test]
async fn origin_path_prefix_is_prepended() {
    let (origin, _) = start_origin().await;
    let edge = start_edge(&format!("http://{origin}/base/"), EdgeOpts::default()).await;
    let answer = get(edge.addr, "example.com", "/a/b?q=1").await;
    assert!(
        answer.text().starts_with("GET /base/a/b?q=1\n"),
        "{}",
        answer.text()
    );
}

#[tokio::test]
async fn streams_a_mebibyte_each_way() {
    let (origin, _) = start_origin().await;
    let edge = start_edge(&format!("http://{origin}"), EdgeOpts::default()).await;
    let (mut sender, _task) = connect(edge.addr).await;
    // Unknown length: the upload goes chunked, 64 KiB at a time.
    let chunks = (0..16).map(|c| {
        let chunk: Vec<u8> = (c * 65536..(c + 1) * 65536).map(pattern).collect();
        Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)))
    });
    let req = Request::post("/upload")
        .header("host", "example.com")
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let answer = send(&mut sender, req).await;
    let all: Vec<u8> = (0..MIB).map(pattern).collect();
    assert_eq!(
        answer.text(),
        format!("len={MIB} hash={:x}", fnv1a(FNV_START, &all))
    );

    let (mut sender, _task) = connect(edge.addr).await;
    let big = send(
        &mut sender,
        Request::get("/big")
            .header("host", "example.com")
            .body(Empty::<Bytes>::new())
            .unwrap(),
    )
    .await;
    assert_eq!(big.status, StatusCode::OK);
    assert_eq!(big.body.len(), MIB);
    assert!(big.body.iter().enumerate().all(|(i, b)| *b == pattern(i)));
}

#[tokio::test]
async fn origin_connections_are_reused() {
    let (origin, accepted) = start_origin().await;
    let edge = start_edge(&format!("http://{origin}"), EdgeOpts::default()).await;
    for _ in 0..3 {
        assert_eq!(
            get(edge.addr, "example.com", "/").await.status,
            StatusCode::OK
        );
        // The connection goes back to the pool once the response has been read.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unknown_hosts_and_default_site() {
    let (origin, _) = start_origin().await;
    let plain = start_edge(&format!("http://{origin}"), EdgeOpts::default()).await;
    assert_eq!(
        get(plain.addr, "example.org", "/").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(plain.addr, "a.b.example.com", "/").await.status,
        StatusCode::NOT_FOUND
    );
    let tls = start_edge(
        &format!("http://{origin}"),
        EdgeOpts {
            scheme: "https",
            ..EdgeOpts::default()
        },
    )
    .await;
    assert_eq!(
        get(tls.addr, "example.org", "/").await.status,
        StatusCode::MISDIRECTED_REQUEST
    );
    assert_eq!(
        get(tls.addr, "bad host", "/").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(tls.addr, "user:pw@example.com", "/").await.status,
        StatusCode::BAD_REQUEST
    );
    // No Host at all (HTTP/1.0): 400, even with an SNI site: the host keys the cache
    // and goes to the origin, so it is never guessed.
    let raw = raw_exchange(tls.addr, b"GET /nohost HTTP/1.0\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.0 400"), "{raw}");
    let raw = raw_exchange(plain.addr, b"GET /nohost HTTP/1.0\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.0 400"), "{raw}");
    // Two Host fields: 400.
    let raw = raw_exchange(
        plain.addr,
        b"GET / HTTP/1.1\r\nHost: example.com\r\nHost: other.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    // Port, trailing dot and case are normalized before the origin sees the host.
    let answer = get(plain.addr, "WWW.Example.COM.:8080", "/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.text().contains("host: www.example.com\n"),
        "{}",
        answer.text()
    );
}

#[tokio::test]
async fn origin_down_is_502_and_slow_origin_is_504() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let edge = start_edge(&format!("http://{closed}"), EdgeOpts::default()).await;
    let answer = get(edge.addr, "example.com", "/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.text(), "origin unreachable\n");
    let rendered = edge.metrics.render();
    assert!(rendered.contains("result=\"connect-error\""), "{rendered}");
    assert!(rendered.contains("status=\"502\""), "{rendered}");

    let (origin, _) = start_origin().await;
    let edge = start_edge(
        &format!("http://{origin}"),
        EdgeOpts {
            response_header_timeout: "300ms",
            ..EdgeOpts::default()
        },
    )
    .await;
    let started = std::time::Instant::now();
    let answer = get(edge.addr, "example.com", "/slow").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.text(), "origin response timed out\n");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(edge.metrics.render().contains("result=\"timeout\""));
    // The edge still serves after both.
    assert_eq!(
        get(edge.addr, "example.com", "/").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn http2_clients_are_served_by_authority() {
    let (origin, _) = start_origin().await;
    let edge = start_edge(&format!("http://{origin}"), EdgeOpts::default()).await;
    let stream = TcpStream::connect(edge.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://www.example.com/h2?z")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["via"], "1.1 keyless");
    let seen = response.into_body().collect().await.unwrap().to_bytes();
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("GET /h2?z\n"), "{seen}");
    assert!(seen.contains("host: www.example.com\n"), "{seen}");
    assert!(seen.contains("via: 2 keyless\n"), "{seen}");
}

/// Writes `request` on a new connection and reads until the edge closes it.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("edge did not close the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused() {
    let (origin, _) = start_origin().await;
    let edge = start_edge(&format!("http://{origin}"), EdgeOpts::default()).await;
    let bad = raw_exchange(
        edge.addr,
        b"GET /\x01 HTTP/1.1\r\nHost: example.com\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: example.com\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let refused = raw_exchange(edge.addr, huge.as_bytes()).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    let connect = raw_exchange(
        edge.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert_eq!(
        get(edge.addr, "example.com", "/").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn idle_and_shut_down_connections_close() {
    let (origin, _) = start_origin().await;
    let edge = start_edge(
        &format!("http://{origin}"),
        EdgeOpts {
            idle_timeout: "300ms",
            ..EdgeOpts::default()
        },
    )
    .await;
    let (mut sender, task) = connect(edge.addr).await;
    let req = Request::get("/")
        .header("host", "example.com")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send(&mut sender, req).await.status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("idle connection was not closed")
        .unwrap();

    let edge = start_edge(&format!("http://{origin}"), EdgeOpts::default()).await;
    let (mut sender, task) = connect(edge.addr).await;
    let req = Request::get("/")
        .header("host", "example.com")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send(&mut sender, req).await.status, StatusCode::OK);
    edge.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("connection was not closed on shutdown")
        .unwrap();
}
