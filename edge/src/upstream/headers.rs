//! Header rewriting between client and origin: hop-by-hop headers removed in both
//! directions (RFC 9110 §7.6.1), forwarding headers added to requests
//! (`X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded` of RFC 7239) and `Via` added
//! both ways.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use crate::exchange::ClientCtx;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the hop-by-hop headers: `Connection` and every header it names, and the
/// fixed list. A request's `TE: trailers` survives (as exactly that) when
/// `keep_te_trailers`, since it is the one TE value HTTP/2 allows end to end.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // Most messages carry none of these: one pass over the names instead of a hash
    // lookup per name (this runs on every request, cache hits included).
    if !headers.keys().any(|k| HOP_BY_HOP.contains(&k)) {
        return;
    }
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
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The fixed hop-by-hop fields (`Connection` names any others).
static HOP_BY_HOP: [&HeaderName; 9] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
];

/// Forwarding fields a client outside `[proxy] trusted_proxies` may not set.
static CLIENT_FORWARDING: [&HeaderName; 5] = [
    &X_FORWARDED_FOR,
    &header::FORWARDED,
    &X_FORWARDED_HOST,
    &X_FORWARDED_PROTO,
    &X_REAL_IP,
];

/// Rewrites a client request's headers for the origin. `host` is the host the
/// request is for, as the cache keys it. `Host` itself is set by the caller.
///
/// The edge is the first hop: a client's `X-Forwarded-For`, `Forwarded`,
/// `X-Forwarded-Host`, `X-Forwarded-Proto` and `X-Real-IP` are replaced by the edge's
/// own, since an origin that trusts them would trust anything a client writes. From a
/// `trusted` client (a load balancer of `[proxy] trusted_proxies`) the edge appends to
/// `X-Forwarded-For` and `Forwarded` and keeps its `X-Forwarded-Host` and
/// `X-Forwarded-Proto`.
pub(crate) fn prepare_request(
    headers: &mut HeaderMap,
    version: Version,
    ctx: &ClientCtx,
    host: &str,
    trusted: bool,
) {
    strip_hop_by_hop(headers, true);
    // hyper answered any `Expect: 100-continue` on the client side already.
    let mut found = false;
    for k in headers.keys() {
        if k == header::EXPECT || (!trusted && CLIENT_FORWARDING.contains(&k)) {
            found = true;
            break;
        }
    }
    if found {
        headers.remove(header::EXPECT);
        if !trusted {
            for name in CLIENT_FORWARDING {
                headers.remove(name);
            }
        }
    }
    headers.reserve(6);
    let ip = ctx.client_addr.ip().to_canonical();
    if let Ok(v) = HeaderValue::try_from(ip.to_string()) {
        append(headers, &X_FORWARDED_FOR, v);
    }
    // A trusted load balancer's own values are kept; anyone else's were removed above.
    if !trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), proto_value(ctx.scheme));
    }
    if !trusted || !headers.contains_key(&X_FORWARDED_HOST) {
        if let Ok(h) = HeaderValue::from_str(host) {
            headers.insert(X_FORWARDED_HOST.clone(), h);
        }
    }
    if let Ok(v) = HeaderValue::try_from(forwarded_element(ip, ctx.scheme, Some(host))) {
        append(headers, &header::FORWARDED, v);
    }
    append(headers, &header::VIA, via(version));
}

/// Rewrites an origin response's headers for the client.
pub(crate) fn prepare_response(headers: &mut HeaderMap, version: Version) {
    strip_hop_by_hop(headers, false);
    append(headers, &header::VIA, via(version));
}

/// The listener's scheme as a header value.
fn proto_value(scheme: &str) -> HeaderValue {
    match scheme {
        "https" => HeaderValue::from_static("https"),
        "http" => HeaderValue::from_static("http"),
        other => HeaderValue::from_str(other).unwrap_or(HeaderValue::from_static("-")),
    }
}

/// `<received-protocol> keyless` for `Via` (static: this runs on every request).
fn via(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 keyless",
        Version::HTTP_10 => "1.0 keyless",
        Version::HTTP_2 => "2 keyless",
        Version::HTTP_3 => "3 keyless",
        _ => "1.1 keyless",
    })
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
fn append(headers: &mut HeaderMap, name: &HeaderName, value: HeaderValue) {
    // The common case, nothing to join: no copy.
    if !headers.contains_key(name) {
        headers.insert(name.clone(), value);
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(name) {
        let v = v.as_bytes().trim_ascii();
        if !v.is_empty() {
            joined.extend_from_slice(v);
            joined.extend_from_slice(b", ");
        }
    }
    joined.extend_from_slice(value.as_bytes());
    let value = HeaderValue::from_bytes(&joined).unwrap_or(value);
    headers.insert(name.clone(), value);
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

    fn client_forwarding_headers() -> HeaderMap {
        map(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.example"),
            ("x-real-ip", "203.0.113.7"),
            ("forwarded", "for=203.0.113.7"),
            ("via", "1.0 upstream"),
        ])
    }

    #[test]
    fn forwarding_headers_of_a_client_are_replaced() {
        let mut h = client_forwarding_headers();
        prepare_request(
            &mut h,
            Version::HTTP_11,
            &ctx("192.0.2.9:5555", "https"),
            "www.example.com",
            false,
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "www.example.com");
        assert!(h.get("x-real-ip").is_none());
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=192.0.2.9;proto=https;host=www.example.com"
        );
        assert_eq!(h.get("via").unwrap(), "1.0 upstream, 1.1 keyless");
        for name in ["x-forwarded-for", "forwarded", "x-forwarded-host"] {
            assert_eq!(h.get_all(name).iter().count(), 1, "{name}");
        }
    }

    #[test]
    fn forwarding_headers_of_a_trusted_proxy_are_appended_to() {
        let mut h = client_forwarding_headers();
        prepare_request(
            &mut h,
            Version::HTTP_11,
            &ctx("10.1.2.3:5555", "https"),
            "www.example.com",
            true,
        );
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "203.0.113.7, 198.51.100.1, 10.1.2.3"
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "evil.example");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=203.0.113.7, for=10.1.2.3;proto=https;host=www.example.com"
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn trusted_proxy_networks() {
        use crate::config::IpNetwork;
        let net: IpNetwork = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.255.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let one: IpNetwork = "192.0.2.1".parse().unwrap();
        assert!(one.contains("192.0.2.1".parse().unwrap()));
        assert!(!one.contains("192.0.2.2".parse().unwrap()));
        let v6: IpNetwork = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::9".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        let all: IpNetwork = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x/8", "::/129", ""] {
            assert!(bad.parse::<IpNetwork>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_quotes_ipv6_and_ports() {
        let mut h = HeaderMap::new();
        prepare_request(
            &mut h,
            Version::HTTP_2,
            &ctx("[2001:db8::1]:443", "http"),
            "example.com:8080",
            false,
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
            "example.com",
            false,
        );
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=192.0.2.1;proto=http;host=example.com"
        );
        assert_eq!(h.get("via").unwrap(), "1.0 keyless");
        assert_eq!(token_or_quoted("a\"b\\"), "\"a\\\"b\\\\\"");
    }

    #[test]
    fn expect_is_not_forwarded() {
        let mut h = map(&[("expect", "100-continue")]);
        prepare_request(
            &mut h,
            Version::HTTP_11,
            &ctx("127.0.0.1:1", "http"),
            "example.com",
            false,
        );
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
