//! Cache safety (issue 7 point 4): what one client's request makes the cache store
//! never carries another user's answer. Cookies are not stored (or stored stripped
//! when a site opts in), the host that keys the cache is the host sent upstream,
//! forwarding headers are the edge's own, variants are keyed by the headers the origin
//! actually saw, range misses cannot amplify into full downloads, long URLs are not
//! cached, and the disk tier is private to the edge's user.

use anyhow::{ensure, Context, Result};
use keyless_tests::Scripted;

use crate::cache_support::{cache_stack, default_stack, ok, raw_get};
use crate::edge_support::SITE;

#[test]
fn set_cookie_responses_are_not_served_to_another_client() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/c",
        &[
            ok("max-age=60, public", "alice's page").header("Set-Cookie", "session=alice"),
            ok("max-age=60, public", "bob's page").header("Set-Cookie", "session=bob"),
        ],
    )?;
    let alice = s.get("/c")?;
    alice.expect(200, "alice's page")?.expect_not_stored()?;
    ensure!(
        alice.header("set-cookie").as_deref() == Some("session=alice"),
        "the client that fetched it gets its cookie: {}",
        alice.show()
    );
    let bob = s.get("/c")?;
    bob.expect(200, "bob's page")?.expect_forwarded()?;
    ensure!(
        bob.header("set-cookie").as_deref() == Some("session=bob"),
        "the second client gets its own cookie, never the first one's: {}",
        bob.show()
    );
    ensure!(
        s.origin_count("/c")? == 2,
        "the cookie response was served from cache"
    );
    Ok(())
}

#[test]
fn store_set_cookie_strip_stores_the_response_without_its_cookie() -> Result<()> {
    let s = cache_stack(|c| c.site_cache_option("store_set_cookie", "strip"))?;
    s.script(
        "/c",
        &[ok("max-age=60", "shared page")
            .header("Set-Cookie", "session=alice")
            .header("Set-Cookie", "theme=dark")],
    )?;
    let first = s.get("/c")?;
    first.expect(200, "shared page")?.expect_stored()?;
    ensure!(
        first.header("set-cookie").as_deref() == Some("session=alice, theme=dark"),
        "the client that fetched it gets its cookies: {}",
        first.show()
    );
    for h2 in [false, true] {
        let req = s.req("/c");
        let hit = if h2 { req.h2().send()? } else { req.send()? };
        hit.expect(200, "shared page")?.expect_hit()?;
        ensure!(
            hit.header("set-cookie").is_none(),
            "a hit carries a stored cookie: {}",
            hit.show()
        );
    }
    ensure!(s.origin_count("/c")? == 1, "not stored in strip mode");
    Ok(())
}

#[test]
fn a_304_with_set_cookie_does_not_merge_it_into_the_stored_response() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/c",
        &[
            ok("max-age=0", "body").header("ETag", "\"v1\""),
            Scripted::new(304)
                .header("ETag", "\"v1\"")
                .header("Cache-Control", "max-age=60")
                .header("Set-Cookie", "session=bob"),
        ],
    )?;
    s.get("/c")?.expect(200, "body")?.expect_stored()?;
    let revalidated = s.get("/c")?;
    revalidated.expect(200, "body")?;
    ensure!(
        revalidated.cs().fwd_status() == Some(304),
        "expected a revalidation: {}",
        revalidated.show()
    );
    ensure!(
        revalidated.header("set-cookie").as_deref() == Some("session=bob"),
        "the revalidating client gets the 304's cookie: {}",
        revalidated.show()
    );
    let hit = s.get("/c")?;
    hit.expect(200, "body")?.expect_hit()?;
    ensure!(
        hit.header("set-cookie").is_none(),
        "the 304's cookie was merged into the stored response: {}",
        hit.show()
    );
    ensure!(s.origin_count("/c")? == 2, "expected one revalidation");
    Ok(())
}

/// Sends `request` as is over TLS (SNI `sni`, verified against `ca`) to `addr` and
/// returns everything the edge answered until it closed the connection.
fn raw_tls_exchange(
    addr: std::net::SocketAddr,
    sni: &str,
    ca: &std::path::Path,
    request: &[u8],
) -> Result<String> {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), sni.to_owned().try_into()?)?;
    let tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            // An unclean close after the answer is still the answer.
            Err(_) if !out.is_empty() => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Sends `request` as is over plain TCP to `addr`; what came back until EOF.
fn raw_tcp_exchange(addr: std::net::SocketAddr, request: &[u8]) -> Result<String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    tcp.write_all(request)?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn a_request_without_host_gets_400() -> Result<()> {
    let s = default_stack()?;
    s.script("/", &[ok("max-age=60", "cached")])?;
    let plain = raw_tcp_exchange(s.http_addr(), b"GET / HTTP/1.0\r\n\r\n")?;
    ensure!(
        plain.starts_with("HTTP/1.0 400"),
        "plain HTTP/1.0 without Host: {plain}"
    );
    // Over TLS the SNI names a site, but the request still names no host.
    let tls = raw_tls_exchange(
        s.s.edge.https_addr(),
        SITE,
        &s.s.edge.client_ca(),
        b"GET / HTTP/1.0\r\n\r\n",
    )?;
    ensure!(
        tls.starts_with("HTTP/1.0 400"),
        "HTTPS HTTP/1.0 without Host: {tls}"
    );
    let two = raw_tcp_exchange(
        s.http_addr(),
        format!("GET / HTTP/1.1\r\nHost: {SITE}\r\nHost: www.{SITE}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    ensure!(two.starts_with("HTTP/1.1 400"), "two Host fields: {two}");
    ensure!(
        s.origin_count("/")? == 0,
        "a request without a host reached the origin"
    );
    Ok(())
}

#[test]
fn the_cache_key_host_is_the_host_sent_upstream() -> Result<()> {
    let s = default_stack()?;
    s.script("/k", &[ok("max-age=60", "page")])?;
    // Upper case, a trailing dot and a port: the same host as `example.com`.
    let odd = format!("{}.:{}", SITE.to_ascii_uppercase(), s.http_addr().port());
    let first = raw_get(s.http_addr(), &odd, "/k", None)?;
    ensure!(first.status == 200, "{}", first.head);
    s.req("/k")
        .plain()
        .send()?
        .expect(200, "page")?
        .expect_hit()?;
    let seen = s.origin_requests("/k")?;
    ensure!(seen.len() == 1, "expected one origin request: {seen:#?}");
    ensure!(
        seen.first().and_then(|r| r.header("host")) == Some(SITE),
        "the origin must get the host that keys the cache: {seen:#?}"
    );
    Ok(())
}

#[test]
fn client_forwarding_headers_do_not_reach_the_origin() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/f",
        &[Scripted::new(200).header("Cache-Control", "no-store")],
    )?;
    s.req("/f")
        .header("X-Forwarded-For: 1.2.3.4")
        .header("X-Forwarded-Host: evil.example")
        .header("Forwarded: for=1.2.3.4;host=evil.example")
        .header("X-Real-IP: 1.2.3.4")
        .send()?
        .expect(200, "")?;
    let seen = s.origin_requests("/f")?;
    let r = seen.first().context("the origin saw no request")?;
    let h = |name: &str| r.header(name).unwrap_or("").to_owned();
    ensure!(h("x-forwarded-for") == "127.0.0.1", "{r:#?}");
    ensure!(h("x-forwarded-host") == SITE, "{r:#?}");
    ensure!(
        h("forwarded") == format!("for=127.0.0.1;proto=https;host={SITE}"),
        "{r:#?}"
    );
    ensure!(r.header("x-real-ip").is_none(), "{r:#?}");
    ensure!(
        !r.headers
            .iter()
            .any(|(_, v)| v.contains("1.2.3.4") || v.contains("evil")),
        "a client-chosen forwarding value reached the origin: {r:#?}"
    );
    Ok(())
}

#[test]
fn a_trusted_load_balancer_forwarding_headers_are_appended_to() -> Result<()> {
    let s = cache_stack(|c| c.proxy_option("trusted_proxies", vec!["127.0.0.0/8"]))?;
    s.script(
        "/f",
        &[Scripted::new(200).header("Cache-Control", "no-store")],
    )?;
    s.req("/f")
        .header("X-Forwarded-For: 1.2.3.4")
        .header("X-Forwarded-Host: www.example.com")
        .header("Forwarded: for=1.2.3.4")
        .send()?
        .expect(200, "")?;
    let seen = s.origin_requests("/f")?;
    let r = seen.first().context("the origin saw no request")?;
    let h = |name: &str| r.header(name).unwrap_or("").to_owned();
    ensure!(h("x-forwarded-for") == "1.2.3.4, 127.0.0.1", "{r:#?}");
    ensure!(h("x-forwarded-host") == "www.example.com", "{r:#?}");
    ensure!(
        h("forwarded") == format!("for=1.2.3.4, for=127.0.0.1;proto=https;host={SITE}"),
        "{r:#?}"
    );
    Ok(())
}

#[test]
fn connection_origin_does_not_poison_an_origin_variant() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/v",
        &[
            // What the origin answers a request without `Origin`: no CORS.
            ok("max-age=60", "no-cors").header("Vary", "Origin"),
            ok("max-age=60", "cors")
                .header("Vary", "Origin")
                .header("Access-Control-Allow-Origin", "https://app.example"),
        ],
    )?;
    // `Origin` named in `Connection` is hop-by-hop: the edge strips it, so the origin
    // answers as if there were none, and that answer must be keyed that way.
    s.req("/v")
        .header("Origin: https://app.example")
        .header("Connection: origin")
        .send()?
        .expect(200, "no-cors")?;
    let seen = s.origin_requests("/v")?;
    ensure!(
        seen.first().is_some_and(|r| r.header("origin").is_none()),
        "the hop-by-hop Origin reached the origin: {seen:#?}"
    );
    let cors = s.req("/v").header("Origin: https://app.example").send()?;
    cors.expect(200, "cors")?.expect_forwarded()?;
    ensure!(
        cors.header("access-control-allow-origin").as_deref() == Some("https://app.example"),
        "{}",
        cors.show()
    );
    // Each answer is stored under the request it answered.
    s.get("/v")?.expect(200, "no-cors")?.expect_hit()?;
    s.req("/v")
        .header("Origin: https://app.example")
        .send()?
        .expect(200, "cors")?
        .expect_hit()?;
    ensure!(s.origin_count("/v")? == 2, "expected two origin requests");
    Ok(())
}

#[test]
fn key_headers_are_the_values_sent_upstream() -> Result<()> {
    let s = cache_stack(|c| c.site_cache_option("key_headers", vec!["X-Tenant"]))?;
    s.script(
        "/t",
        &[ok("max-age=60", "default"), ok("max-age=60", "tenant a")],
    )?;
    s.req("/t")
        .header("X-Tenant: a")
        .header("Connection: x-tenant")
        .send()?
        .expect(200, "default")?;
    s.req("/t")
        .header("X-Tenant: a")
        .send()?
        .expect(200, "tenant a")?
        .expect_forwarded()?;
    s.get("/t")?.expect(200, "default")?.expect_hit()?;
    Ok(())
}

#[test]
fn range_requests_for_a_large_object_cost_one_origin_request_each() -> Result<()> {
    const MAX: usize = 64 * 1024;
    let s = cache_stack(|c| c.cache_option("max_object_bytes", MAX as i64))?;
    s.script(
        "/big",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .body_bytes(4 * MAX)
            .ranges()],
    )?;
    for i in 1..=5usize {
        let r = s.req("/big").header("Range: bytes=0-0").send()?;
        ensure!(
            r.status == 206 && r.body == b"0",
            "expected 206 with one byte: {}",
            r.show()
        );
        // Any background fetch would have started by now.
        crate::cache_support::sleep_ms(300);
        let seen = s.origin_requests("/big")?;
        ensure!(
            seen.len() == i && seen.iter().all(|q| q.header("range") == Some("bytes=0-0")),
            "after {i} range requests the origin saw (expected {i}, all ranges): {seen:#?}"
        );
    }
    // A small object is still filled (once) and then served from the cache.
    s.script(
        "/small",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .body_bytes(1000)
            .ranges()],
    )?;
    let r = s.req("/small").header("Range: bytes=0-0").send()?;
    ensure!(r.status == 206, "{}", r.show());
    s.s.origin
        .wait_for_requests("/small", 2, std::time::Duration::from_secs(5))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let r = s.req("/small").header("Range: bytes=0-0").send()?;
        if r.cs().hit() {
            ensure!(r.status == 206 && r.body == b"0", "{}", r.show());
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the filled object was never served: {}",
            r.show()
        );
        crate::cache_support::sleep_ms(100);
    }
    Ok(())
}

#[test]
fn urls_longer_than_max_url_bytes_are_not_cached() -> Result<()> {
    let s = cache_stack(|c| c.cache_option("max_url_bytes", 200))?;
    s.script("/long", &[ok("max-age=60", "page")])?;
    let long = format!("/long?q={}", "a".repeat(300));
    for _ in 0..2 {
        let r = s.get(&long)?;
        r.expect(200, "page")?
            .expect_fwd("bypass")?
            .expect_not_stored()?;
        ensure!(r.cs().detail() == Some("url-too-long"), "{}", r.show());
    }
    ensure!(
        s.origin_count("/long")? == 2,
        "a long URL was served from cache"
    );
    s.get("/long?q=short")?
        .expect(200, "page")?
        .expect_stored()?;
    s.get("/long?q=short")?.expect(200, "page")?.expect_hit()?;
    Ok(())
}

#[test]
fn disk_cache_files_and_directories_are_private() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let s = cache_stack(|c| c.cache_option("disk_dir", "cache-disk"))?;
    s.script("/a", &[ok("max-age=60", "secret page")])?;
    s.get("/a")?.expect(200, "secret page")?.expect_stored()?;
    s.wait_disk_objects(1)?;
    let root = s.s.deployment.dir().join("cache-disk");
    let (mut files, mut dirs) = (0, 0);
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        let mode = std::fs::metadata(&d)?.permissions().mode();
        ensure!(mode & 0o077 == 0, "{} has mode {mode:o}", d.display());
        dirs += 1;
        for e in std::fs::read_dir(&d)? {
            let path = e?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let mode = std::fs::metadata(&path)?.permissions().mode();
                ensure!(mode & 0o077 == 0, "{} has mode {mode:o}", path.display());
                files += 1;
            }
        }
    }
    ensure!(
        files >= 1 && dirs >= 2,
        "expected the object's file: {files} files, {dirs} dirs"
    );
    Ok(())
}
