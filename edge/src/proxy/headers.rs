//! Header rewriting between client and origin: hop-by-hop headers removed in both
//! directions (RFC 9110 §7.6.1), forwarding headers added to requests
//! (`X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded` of RFC 7239) and `Via` added
//! both ways.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use super::ClientCtx;

/// This proxy's name in `Via`.
const VIA_NAME: &str = "keyless";

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the hop-by-hop headers: `Connection` and every header it names, and the
/// fixed list. A request's `TE: trailers` survives (as exactly that) when
/// `keep_te_trailers`, since it is the one TE value HTTP/2 allows end to end.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let te_trailers = keep_te_trailers
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                let token = t.split(';').next().unwrap_or("").trim();
                token.eq_ignore_ascii_case("trailers")
            });
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Rewrites a client request's headers for the origin. `host` is the name the client
/// asked for (its `Host` or `:authority`), if any. `Host` itself is set later, once
/// the upstream protocol is known.
pub(crate) fn prepare_request(
    headers: &mut HeaderMap,
    version: Version,
    ctx: &ClientCtx,
    host: Option<&str>,
) {
    strip_hop_by_hop(headers, true);
    // hyper answered any `Expect: 100-continue` on the client side already.
    headers.remove(header::EXPECT);
    let ip = ctx.client_addr.ip().to_canonical();
    append(headers, &X_FORWARDED_FOR, &ip.to_string());
    headers.remove(&X_FORWARDED_PROTO);
    if let Ok(proto) = HeaderValue::from_str(ctx.scheme) {
        headers.insert(X_FORWARDED_PROTO.clone(), proto);
    }
    append(
        headers,
        &header::FORWARDED,
        &forwarded_element(ip, ctx.scheme, host),
    );
    append(headers, &header::VIA, &via(version));
}

/// Rewrites an origin response's headers for the client.
pub(crate) fn prepare_response(headers: &mut HeaderMap, version: Version) {
    strip_hop_by_hop(headers, false);
    append(headers, &header::VIA, &via(version));
}

/// `<received-protocol> keyless` for `Via`.
fn via(version: Version) -> String {
    let v = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    format!("{v} {VIA_NAME}")
}

/// One RFC 7239 element: `for=...;proto=...;host=...`.
pub(crate) fn forwarded_element(ip: IpAddr, proto: &str, host: Option<&str>) -> String {
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut out = format!("for={node};proto={}", token_or_quoted(proto));
    if let Some(host) = host {
        out.push_str(";host=");
        out.push_str(&token_or_quoted(host));
    }
    out
}

/// A `token` as is, anything else as a `quoted-string` (RFC 9110 §5.6).
fn token_or_quoted(s: &str) -> String {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !s.is_empty() && s.chars().all(is_tchar) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Appends `value` to the list header `name`, folding earlier field lines into one
/// (`a, b, value`).
fn append(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(name) {
        let v = v.as_bytes().trim_ascii();
        if !v.is_empty() {
            joined.extend_from_slice(v);
            joined.extend_from_slice(b", ");
        }
    }
    joined.extend_from_slice(value.as_bytes());
    let value = HeaderValue::from_bytes(&joined)
        .or_else(|_| HeaderValue::from_str(value))
        .ok();
    headers.remove(name);
    if let Some(value) = value {
        headers.insert(name.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ctx(client: &str, scheme: &'static str) -> ClientCtx {
        ClientCtx {
            client_addr: client.parse().unwrap(),
            scheme,
            local_addr: "127.0.0.1:443".parse().unwrap(),
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-kept", "yes"),
            ("cookie", "a=b"),
        ]);
        strip_hop_by_hop(&mut h, true);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["cookie", "x-kept"]);
    }

    #[test]
    fn te_trailers_is_kept_on_requests_only() {
        let mut h = map(&[("te", "gzip;q=0.5, Trailers"), ("connection", "TE")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=203.0.113.7"),
            ("via", "1.0 upstream"),
        ]);
        prepare_request(
            &mut h,
            Version::HTTP_11,
            &ctx("192.0.2.9:5555", "https"),
            Some("www.example.com"),
        );
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "203.0.113.7, 198.51.100.1, 192.0.2.9"
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=203.0.113.7, for=192.0.2.9;proto=https;host=www.example.com"
        );
        assert_eq!(h.get("via").unwrap(), "1.0 upstream, 1.1 keyless");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn forwarded_quotes_ipv6_and_ports() {
        let mut h = HeaderMap::new();
        prepare_request(
            &mut h,
            Version::HTTP_2,
            &ctx("[2001:db8::1]:443", "http"),
            Some("example.com:8080"),
        );
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=\"[2001:db8::1]\";proto=http;host=\"example.com:8080\""
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "2001:db8::1");
        assert_eq!(h.get("via").unwrap(), "2 keyless");
        // An IPv4 client seen through a dual-stack socket is logged as IPv4.
        let mut h = HeaderMap::new();
        prepare_request(
            &mut h,
            Version::HTTP_10,
            &ctx("[::ffff:192.0.2.1]:1", "http"),
            None,
        );
        assert_eq!(h.get("forwarded").unwrap(), "for=192.0.2.1;proto=http");
        assert_eq!(h.get("via").unwrap(), "1.0 keyless");
        assert_eq!(token_or_quoted("a\"b\\"), "\"a\\\"b\\\\\"");
    }

    #[test]
    fn expect_is_not_forwarded() {
        let mut h = map(&[("expect", "100-continue")]);
        prepare_request(&mut h, Version::HTTP_11, &ctx("127.0.0.1:1", "http"), None);
        assert!(h.get("expect").is_none());
    }

    #[test]
    fn responses_lose_hop_by_hop_and_gain_via() {
        let mut h = map(&[
            ("connection", "x-internal"),
            ("x-internal", "1"),
            ("keep-alive", "timeout=5"),
            ("set-cookie", "a=b"),
        ]);
        prepare_response(&mut h, Version::HTTP_11);
        assert!(h.get("x-internal").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h.get("set-cookie").unwrap(), "a=b");
        assert_eq!(h.get("via").unwrap(), "1.1 keyless");
    }
}
