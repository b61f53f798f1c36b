//! The admin listener: `GET /healthz`, `GET /metrics` (Prometheus text), `POST
//! /reload` and the cache purge API. `/healthz` answers `200 ok`, or `503` naming each key-server group with
//! no server up (its sites fail closed), for load balancers to route around the edge.
//! The purge API:
//!
//! - `POST /cache/purge?url=URL` — every stored variant of one URL
//!   (`https://example.com/a?x=1`; the query is part of the URL);
//! - `POST /cache/purge?prefix=URL-PREFIX` — every object whose URL starts with it;
//! - `POST /cache/purge?tag=KEY` — every object tagged `KEY` by its `Surrogate-Key`
//!   or `Cache-Tag` response header.
//!
//! Purges need `Authorization: Bearer <[cache] purge_token>` (compared in constant
//! time); without a configured token the purge API answers 404. Each purge takes
//! effect in the memory and disk tiers and answers `purged N`.
//!
//! `POST /reload` re-reads the configuration file (as `SIGHUP` does) and answers `200
//! reloaded: <what changed>` or `422 reload failed: <why>` once the reload is done. It
//! needs `Authorization: Bearer <[listen] admin_token>`; without a configured token it
//! answers 404.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::{Method, Request, StatusCode};
use keyless_shared::log_safe;
use keyless_shared::serve::{serve_admin, text_response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::keyserver::KeyServerClient;
use crate::metrics::Metrics;
use crate::serve::LiveFronts;

/// What the admin endpoints report on and act on.
#[derive(Clone)]
pub struct AdminState {
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// The cache, if enabled (purges).
    pub cache: Option<Arc<Cache>>,
    /// The current fronts (their key-server groups: health).
    pub fronts: Arc<LiveFronts>,
    /// Where `POST /reload` goes; none = the edge cannot reload (no file to read).
    pub reload: Option<tokio::sync::mpsc::Sender<ReloadCall>>,
}

/// A `POST /reload`: the bearer token it carried and where its answer goes.
#[derive(Debug)]
pub struct ReloadCall {
    /// The bearer token (checked by the reloader against the running configuration).
    pub token: String,
    /// The caller, for the audit log.
    pub client: SocketAddr,
    /// The answer: status and text.
    pub reply: tokio::sync::oneshot::Sender<(StatusCode, String)>,
}

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    serve_admin(
        listener,
        shutdown,
        move |req: Request<hyper::body::Incoming>, peer: SocketAddr| {
            let state = state.clone();
            async move {
                if req.uri().path() == "/reload" {
                    let (status, body) = reload(&req, &state, peer).await;
                    tracing::info!(target: "audit", client = %peer, status = status.as_u16(), result = %log_safe(body.trim_end()), "admin reload");
                    return text_response(status, body);
                }
                let (status, body) = route(&req, &state);
                if req.uri().path() == "/cache/purge" {
                    // The query is the client's text: escaped so it cannot forge log lines.
                    // `client` keeps the `Some(addr)` form the audit line has always had.
                    let query = log_safe(req.uri().query().unwrap_or(""));
                    tracing::info!(target: "audit", client = ?Some(peer), %query, status = status.as_u16(), result = %body.trim_end(), "cache purge");
                }
                text_response(status, body)
            }
        },
    )
    .await;
}

/// `POST /reload`: hands the call to the reloader and waits for its answer.
async fn reload(
    req: &Request<hyper::body::Incoming>,
    state: &AdminState,
    client: SocketAddr,
) -> (StatusCode, String) {
    if req.method() != Method::POST {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST /reload\n".to_owned(),
        );
    }
    let Some(calls) = &state.reload else {
        return (
            StatusCode::NOT_FOUND,
            "this edge has no configuration file to reload\n".to_owned(),
        );
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let call = ReloadCall {
        token: bearer(req).to_owned(),
        client,
        reply,
    };
    let stopping = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the edge is stopping\n".to_owned(),
        )
    };
    if calls.try_send(call).is_err() {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "reloads already queued; try again\n".to_owned(),
        );
    }
    answer.await.unwrap_or_else(|_| stopping())
}

/// The bearer token of `req`, or "".
fn bearer(req: &Request<hyper::body::Incoming>) -> &str {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("")
}

fn route(req: &Request<hyper::body::Incoming>, state: &AdminState) -> (StatusCode, String) {
    let (metrics, cache) = (&state.metrics, state.cache.as_deref());
    let fronts = state.fronts.get();
    let keyservers = fronts.tls.keyservers();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            if let Some(cache) = cache {
                cache.maintain();
            }
            keyservers.report_ticket_keys(metrics);
            (StatusCode::OK, metrics.render())
        }
        (&Method::GET, "/healthz") => health(keyservers),
        (&Method::POST, "/cache/purge") => purge(req, cache),
        (_, "/cache/purge") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST /cache/purge\n".to_owned(),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

/// `ok`, or degraded with one line per problem (a key-server group with no server up,
/// an edge certificate close to expiry without renewal).
fn health(keyservers: &KeyServerClient) -> (StatusCode, String) {
    let problems = keyservers.problems();
    if problems.is_empty() {
        return (StatusCode::OK, "ok\n".to_owned());
    }
    let lines: String = problems.iter().map(|p| format!("{p}\n")).collect();
    (StatusCode::SERVICE_UNAVAILABLE, lines)
}

fn purge(req: &Request<hyper::body::Incoming>, cache: Option<&Cache>) -> (StatusCode, String) {
    let not_configured = || {
        (
            StatusCode::NOT_FOUND,
            "purge API disabled: no [cache] purge_token\n".to_owned(),
        )
    };
    let Some(cache) = cache else {
        return not_configured();
    };
    match cache.purge_authorized(bearer(req).as_bytes()) {
        None => return not_configured(),
        Some(false) => {
            return (
                StatusCode::UNAUTHORIZED,
                "bad or missing token\n".to_owned(),
            )
        }
        Some(true) => {}
    }
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let [(kind, value)] = pairs.as_slice() else {
        return (
            StatusCode::BAD_REQUEST,
            "give exactly one of url=, prefix=, tag=\n".to_owned(),
        );
    };
    if value.is_empty() {
        return (StatusCode::BAD_REQUEST, format!("{kind}= is empty\n"));
    }
    let n = match kind.as_str() {
        "url" | "prefix" => {
            let Some(key) = url_key(value) else {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("{kind}= must be an absolute http(s) URL\n"),
                );
            };
            if kind == "url" {
                cache.purge_url(&key)
            } else {
                cache.purge_prefix(&key)
            }
        }
        "tag" => cache.purge_tag(value),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "give exactly one of url=, prefix=, tag=\n".to_owned(),
            )
        }
    };
    (StatusCode::OK, format!("purged {n}\n"))
}

/// A purge URL in the cache's key form: scheme and host lowercase, no port; `None`
/// when it is not an absolute http(s) URL.
fn url_key(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = if authority.starts_with('[') {
        // [v6]:port
        &authority[..authority.find(']').map_or(authority.len(), |i| i + 1)]
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        }
    };
    if host.is_empty() || host.contains('@') {
        return None;
    }
    Some(format!(
        "{scheme}://{}{path}",
        crate::sites::normalize(host)
    ))
}

/// Longest wait of `keyless-edge reload` for the edge's answer (a reload rebuilds
/// the fronts; it takes well under a second).
const RELOAD_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where and how `keyless-edge reload` asks: `[listen] admin` and `admin_token` of the
/// configuration file `path`, read without checking the rest (the edge checks it).
pub fn reload_target(path: &std::path::Path) -> anyhow::Result<(SocketAddr, Option<String>)> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
    let listen = table.get("listen").and_then(|l| l.as_table());
    let admin = match listen.and_then(|l| l.get("admin")).and_then(|a| a.as_str()) {
        Some(a) => a
            .parse()
            .with_context(|| format!("[listen] admin {a:?} is not host:port"))?,
        None => SocketAddr::from(([127, 0, 0, 1], 9090)),
    };
    let token = listen
        .and_then(|l| l.get("admin_token"))
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    Ok((admin, token))
}

/// `POST /reload` to the admin listener at `addr`: the status and text of the answer.
pub fn request_reload(addr: SocketAddr, token: Option<&str>) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, RELOAD_CALL_TIMEOUT)?;
    tcp.set_read_timeout(Some(RELOAD_CALL_TIMEOUT))?;
    tcp.set_write_timeout(Some(RELOAD_CALL_TIMEOUT))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        tcp,
        "POST /reload HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    tcp.take(1 << 20).read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::url_key;

    #[test]
    fn purge_urls_take_the_cache_key_form() {
        assert_eq!(
            url_key("HTTPS://Example.COM:8443/a?x=1").as_deref(),
            Some("https://example.com/a?x=1")
        );
        assert_eq!(
            url_key("http://example.com").as_deref(),
            Some("http://example.com")
        );
        assert_eq!(url_key("ftp://example.com/").as_deref(), None);
        assert_eq!(url_key("/a").as_deref(), None);
        assert_eq!(url_key("https://u@h/").as_deref(), None);
        assert_eq!(
            url_key("https://[::1]:8443/p").as_deref(),
            Some("https://[::1]/p")
        );
    }
}
