//! `keyless-test-origin`: a small content origin for the demo and the end-to-end tests.
//!
//! Routes (any method unless said):
//! - `/` — a greeting;
//! - `/echo` — the request line and headers as text, for header assertions;
//! - `/slow?ms=N` — answers after N milliseconds;
//! - `/bytes?n=N` — N bytes (streamed in 64 KiB chunks);
//! - `/status/N` — an empty response with status N;
//! - `/upload` — reads the body, answers its length and SHA-256;
//! - `/__count` — how many requests this origin has answered.
//!
//! Query parameters `cc=...` and `h=Name:Value` (repeatable) add `Cache-Control` and
//! other response headers.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
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

type Body = BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = TcpListener::bind(cli.listen).await?;
    eprintln!(
        "keyless-test-origin listening on {}",
        listener.local_addr()?
    );
    let count = Arc::new(AtomicU64::new(0));
    let name: Arc<str> = cli.name.into();
    loop {
        let (tcp, _) = listener.accept().await?;
        let count = count.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                handle(req, n, name.clone())
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

async fn handle(
    req: Request<Incoming>,
    count: u64,
    name: Arc<str>,
) -> Result<Response<Body>, Infallible> {
    let q = query(&req);
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let path = req.uri().path().to_owned();
    let mut resp = match path.as_str() {
        "/" => Response::new(full(format!("hello from {name}\n"))),
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
                Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))));
            r.headers_mut().insert("content-length", n.into());
            r
        }
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
        "/__count" => Response::new(full(format!("{count}\n"))),
        p if p.starts_with("/status/") => {
            let code = p["/status/".len()..].parse().unwrap_or(500);
            let mut r = Response::new(full(""));
            *r.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r
        }
        _ => {
            let mut r = Response::new(full("not found\n"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
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
                    hyper::header::HeaderName::from_bytes(name.trim().as_bytes()),
                    hyper::header::HeaderValue::from_str(value.trim()),
                ) {
                    resp.headers_mut().append(n, v);
                }
            }
        }
    }
    resp.headers_mut().insert("x-origin-count", count.into());
    Ok(resp)
}
