//! The purge API on the admin listener: by URL (every variant), by prefix, by
//! surrogate key, its bearer token, and purging the disk tier.

use anyhow::{ensure, Result};

use crate::cache_support::{cache_stack, default_stack, ok, CacheStack, PURGE_TOKEN};

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Purges with `query`; fails unless the answer is `200 purged N` with N ≥ `min`.
fn purge_ok(s: &CacheStack, query: &str, min: u64) -> Result<u64> {
    let (status, body) = s.purge(query)?;
    let n = body
        .trim()
        .strip_prefix("purged ")
        .and_then(|n| n.parse::<u64>().ok());
    ensure!(
        status == 200 && body.ends_with('\n') && n.is_some_and(|n| n >= min),
        "purge {query}: expected 200 `purged N` (N >= {min}), got {status} {body:?}"
    );
    Ok(n.unwrap_or(0))
}

/// Stores `path` (one origin request) and checks it is a hit.
fn store(s: &CacheStack, path: &str, headers: &[&str]) -> Result<()> {
    let mut req = s.req(path);
    for h in headers {
        req = req.header(h);
    }
    req.send()?.expect_stored()?;
    let mut req = s.req(path);
    for h in headers {
        req = req.header(h);
    }
    req.send()?.expect_hit()?;
    Ok(())
}

#[test]
fn purge_by_url_removes_every_variant() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[ok("max-age=60", "body").header("Vary", "Accept-Language")],
    )?;
    s.script("/b", &[ok("max-age=60", "other")])?;
    store(&s, "/a?x=1", &["Accept-Language: en"])?;
    store(&s, "/a?x=1", &["Accept-Language: fr"])?;
    store(&s, "/a?x=2", &[])?;
    store(&s, "/b", &[])?;
    purge_ok(&s, &format!("url={}", enc("https://example.com/a?x=1")), 2)?;
    for lang in ["en", "fr"] {
        s.req("/a?x=1")
            .header(&format!("Accept-Language: {lang}"))
            .send()?
            .expect(200, "body")?
            .expect_forwarded()?;
    }
    // Other URLs stay.
    s.get("/a?x=2")?.expect_hit()?;
    s.get("/b")?.expect(200, "other")?.expect_hit()?;
    Ok(())
}

#[test]
fn purge_by_prefix_removes_everything_under_it() -> Result<()> {
    let s = default_stack()?;
    for p in ["/p/1", "/p/2", "/q"] {
        s.script(p, &[ok("max-age=60", p)])?;
        store(&s, p, &[])?;
    }
    store(&s, "/p/2?v=3", &[])?;
    purge_ok(&s, &format!("prefix={}", enc("https://example.com/p/")), 3)?;
    for p in ["/p/1", "/p/2", "/p/2?v=3"] {
        s.get(p)?.expect_forwarded()?;
    }
    s.get("/q")?.expect(200, "/q")?.expect_hit()?;
    Ok(())
}

#[test]
fn purge_by_tag_removes_tagged_objects() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[ok("max-age=60", "a").header("Surrogate-Key", "red blue")],
    )?;
    s.script(
        "/b",
        &[ok("max-age=60", "b").header("Cache-Tag", "green, blue")],
    )?;
    s.script(
        "/c",
        &[ok("max-age=60", "c").header("Surrogate-Key", "green")],
    )?;
    for p in ["/a", "/b", "/c"] {
        store(&s, p, &[])?;
    }
    purge_ok(&s, "tag=blue", 2)?;
    s.get("/a")?.expect(200, "a")?.expect_forwarded()?;
    s.get("/b")?.expect(200, "b")?.expect_forwarded()?;
    s.get("/c")?.expect(200, "c")?.expect_hit()?;
    purge_ok(&s, "tag=green", 1)?;
    s.get("/c")?.expect(200, "c")?.expect_forwarded()?;
    Ok(())
}

#[test]
fn purge_needs_the_token_and_a_valid_query() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "a")])?;
    store(&s, "/a", &[])?;
    let url = format!("url={}", enc("https://example.com/a"));
    let edge = &s.s.edge;
    let (status, _) = edge.purge(&url, None)?;
    ensure!(status == 401, "no token: expected 401, got {status}");
    let (status, _) = edge.purge(&url, Some("wrong-token-0123456789"))?;
    ensure!(status == 401, "wrong token: expected 401, got {status}");
    let (status, _) = edge.admin_request(
        "POST",
        &format!("/cache/purge?{url}"),
        &[&format!("Authorization: Basic {PURGE_TOKEN}")],
    )?;
    ensure!(
        status == 401,
        "not a bearer token: expected 401, got {status}"
    );
    for bad in ["", "nothing=1", "url=not%20a%20url"] {
        let (status, body) = s.purge(bad)?;
        ensure!(
            status == 400,
            "query {bad:?}: expected 400, got {status} {body:?}"
        );
    }
    // Nothing was purged by the refused requests.
    s.get("/a")?.expect(200, "a")?.expect_hit()?;
    Ok(())
}

#[test]
fn purge_without_a_configured_token_is_404() -> Result<()> {
    let s = cache_stack(|mut c| {
        c.cache.remove("purge_token");
        c
    })?;
    let (status, _) = s.purge(&format!("url={}", enc("https://example.com/a")))?;
    ensure!(
        status == 404,
        "purge without a token configured: expected 404, got {status}"
    );
    Ok(())
}

#[test]
fn purge_removes_from_the_disk_tier_too() -> Result<()> {
    let mut s = cache_stack(|c| c.cache_option("disk_dir", "cache-disk"))?;
    s.script("/a", &[ok("max-age=60", "a")])?;
    s.script("/b", &[ok("max-age=60", "b")])?;
    store(&s, "/a", &[])?;
    store(&s, "/b", &[])?;
    s.wait_disk_objects(2)?;
    purge_ok(&s, &format!("url={}", enc("https://example.com/a")), 1)?;
    s.restart()?;
    s.get("/a")?.expect(200, "a")?.expect_forwarded()?;
    s.get("/b")?.expect(200, "b")?.expect_hit()?;
    ensure!(
        s.origin_count("/a")? == 2,
        "the purged object came back from disk"
    );
    ensure!(
        s.origin_count("/b")? == 1,
        "the disk tier lost an unpurged object"
    );
    Ok(())
}

#[test]
fn purge_by_tag_reaches_objects_loaded_from_disk() -> Result<()> {
    let mut s = cache_stack(|c| c.cache_option("disk_dir", "cache-disk"))?;
    s.script(
        "/a",
        &[ok("max-age=60", "a").header("Surrogate-Key", "red")],
    )?;
    s.script("/b", &[ok("max-age=60", "b")])?;
    store(&s, "/a", &[])?;
    store(&s, "/b", &[])?;
    s.wait_disk_objects(2)?;
    s.restart()?;
    purge_ok(&s, "tag=red", 1)?;
    s.get("/a")?.expect(200, "a")?.expect_forwarded()?;
    s.get("/b")?.expect(200, "b")?.expect_hit()?;
    Ok(())
}
