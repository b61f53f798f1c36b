//! Reuse and validation (RFC 9111 §4, §5.2): request and response directives,
//! conditional revalidation with the origin, client conditionals and ranges answered
//! from the cache, `Vary`, HEAD, and invalidation by unsafe methods.

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Result};
use keyless_tests::{http_date, pattern_body, Scripted};

use crate::cache_support::{date_now, default_stack, ok, sleep_ms, CacheStack};
use crate::edge_support::WILDCARD_NAME;

const DAY: Duration = Duration::from_secs(86_400);

/// A 200 with `Cache-Control: CC`, `ETag: "v1"` and `body` that answers a matching
/// `If-None-Match` with 304.
fn etagged(cc: &str, body: &str) -> Scripted {
    ok(cc, body).header("ETag", "\"v1\"").auto_304()
}

/// Fails unless the origin's `n`th request (1-based) to `path` carried
/// `If-None-Match: "v1"`.
fn assert_revalidated(s: &CacheStack, path: &str, n: usize) -> Result<()> {
    let seen = s.origin_requests(path)?;
    ensure!(
        seen.len() == n,
        "{path}: the origin saw {} requests, expected {n}: {seen:#?}",
        seen.len()
    );
    let last = seen.last().map(|r| r.header("if-none-match"));
    ensure!(
        last == Some(Some("\"v1\"")),
        "{path}: the origin's request {n} should be conditional: {seen:#?}"
    );
    Ok(())
}

#[test]
fn request_no_cache_max_age_zero_and_pragma_revalidate_with_the_origin() -> Result<()> {
    let s = default_stack()?;
    // Name, request field, and the `fwd` reason the edge gives.
    for (i, (name, field, fwd)) in [
        ("no-cache", "Cache-Control: no-cache", "request"),
        ("max-age=0", "Cache-Control: max-age=0", "stale"),
        ("Pragma", "Pragma: no-cache", "request"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/{i}");
        s.script(&path, &[etagged("max-age=60", "body")])?;
        s.get(&path)?.expect(200, "body")?.expect_stored()?;
        let r = s.req(&path).header(field).send()?;
        r.expect(200, "body")?.expect_forwarded()?;
        ensure!(
            r.cs().fwd() == Some(fwd),
            "{name}: expected fwd={fwd}: {}",
            r.show()
        );
        assert_revalidated(&s, &path, 2).map_err(|e| e.context(name))?;
    }
    Ok(())
}

#[test]
fn request_max_stale_accepts_a_stale_response() -> Result<()> {
    let s = default_stack()?;
    // Stale as soon as it is stored.
    s.script("/a", &[ok("max-age=0", "old"), ok("max-age=60", "new")])?;
    s.get("/a")?.expect(200, "old")?.expect_stored()?;
    for directive in ["max-stale=60", "max-stale"] {
        let r = s
            .req("/a")
            .header(&format!("Cache-Control: {directive}"))
            .send()?;
        r.expect(200, "old")?.expect_hit()?;
        ensure!(
            r.cs().ttl().is_some_and(|t| t <= 0) && r.age().is_some(),
            "{directive}: a stale hit has a ttl <= 0 and an Age: {}",
            r.show()
        );
    }
    ensure!(
        s.origin_count("/a")? == 1,
        "max-stale still went to the origin"
    );
    // Without it, the stale response is not used.
    s.get("/a")?.expect(200, "new")?.expect_forwarded()?;
    Ok(())
}

#[test]
fn request_min_fresh_needs_enough_freshness_left() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "body")])?;
    s.get("/a")?.expect(200, "body")?;
    s.req("/a")
        .header("Cache-Control: min-fresh=10")
        .send()?
        .expect(200, "body")?
        .expect_hit()?;
    s.req("/a")
        .header("Cache-Control: min-fresh=120")
        .send()?
        .expect(200, "body")?
        .expect_forwarded()?;
    ensure!(
        s.origin_count("/a")? == 2,
        "min-fresh=120 must go to the origin"
    );
    Ok(())
}

#[test]
fn request_only_if_cached_answers_504_or_a_hit() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "body")])?;
    let r = s.req("/a").header("Cache-Control: only-if-cached").send()?;
    ensure!(
        r.status == 504,
        "nothing stored: expected 504, got {}",
        r.show()
    );
    ensure!(
        s.origin_count("/a")? == 0,
        "only-if-cached reached the origin"
    );
    s.get("/a")?.expect(200, "body")?;
    s.req("/a")
        .header("Cache-Control: only-if-cached")
        .send()?
        .expect(200, "body")?
        .expect_hit()?;
    ensure!(
        s.origin_count("/a")? == 1,
        "only-if-cached reached the origin"
    );
    Ok(())
}

#[test]
fn response_no_cache_is_revalidated_on_every_use() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[etagged("max-age=60, no-cache", "body")])?;
    s.get("/a")?.expect(200, "body")?;
    let r = s.get("/a")?;
    r.expect(200, "body")?.expect_forwarded()?;
    assert_revalidated(&s, "/a", 2)?;
    s.get("/a")?.expect(200, "body")?.expect_forwarded()?;
    assert_revalidated(&s, "/a", 3)
}

#[test]
fn must_revalidate_and_proxy_revalidate_revalidate_once_stale() -> Result<()> {
    let s = default_stack()?;
    let cases = [
        ("/must", "max-age=2, must-revalidate"),
        ("/proxy", "max-age=2, proxy-revalidate"),
    ];
    for (path, cc) in cases {
        // The test's own `Date` (see `date_now`): the response is 0 s old when it
        // arrives, so it stays fresh for the immediate second request.
        s.script(path, &[etagged(cc, "body").header("Date", &date_now())])?;
        s.get(path)?.expect(200, "body")?.expect_stored()?;
        s.get(path)?.expect(200, "body")?.expect_hit()?;
    }
    sleep_ms(2100);
    for (path, _) in cases {
        // Even a client that accepts stale responses gets a revalidated one.
        let r = s.req(path).header("Cache-Control: max-stale=60").send()?;
        r.expect(200, "body")?.expect_forwarded()?;
        assert_revalidated(&s, path, 2)?;
    }
    Ok(())
}

#[test]
fn must_revalidate_is_never_served_stale_even_with_stale_if_error() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[
            ok("max-age=0, must-revalidate, stale-if-error=60", "old"),
            Scripted::new(503).body("down"),
        ],
    )?;
    s.get("/a")?.expect(200, "old")?;
    let r = s.get("/a")?;
    ensure!(
        r.status != 200 && r.text() != "old",
        "must-revalidate content was served stale: {}",
        r.show()
    );
    ensure!(s.origin_count("/a")? == 2, "the origin was not asked");
    Ok(())
}

#[test]
fn vary_stores_one_variant_per_header_value() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[
            ok("max-age=60", "english").header("Vary", "Accept-Language"),
            ok("max-age=60", "french").header("Vary", "Accept-Language"),
        ],
    )?;
    let en = s.req("/a").header("Accept-Language: en").send()?;
    en.expect(200, "english")?.expect_stored()?;
    let fr = s.req("/a").header("Accept-Language: fr").h2().send()?;
    fr.expect(200, "french")?
        .expect_fwd("vary-miss")?
        .expect_stored()?;
    ensure!(
        s.origin_count("/a")? == 2,
        "two variants, two origin requests"
    );
    s.req("/a")
        .header("Accept-Language: en")
        .h2()
        .send()?
        .expect(200, "english")?
        .expect_hit()?;
    s.req("/a")
        .header("Accept-Language: fr")
        .send()?
        .expect(200, "french")?
        .expect_hit()?;
    ensure!(s.origin_count("/a")? == 2, "variants were not reused");
    Ok(())
}

#[test]
fn vary_star_never_hits() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "body").header("Vary", "*")])?;
    for _ in 0..2 {
        s.get("/a")?.expect(200, "body")?.expect_forwarded()?;
    }
    ensure!(s.origin_count("/a")? == 2, "Vary: * was reused");
    Ok(())
}

#[test]
fn stale_response_with_etag_is_revalidated_and_304_headers_merged() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[
            etagged("max-age=0", "payload").header("X-Version", "1"),
            etagged("max-age=60", "payload").header("X-Version", "2"),
        ],
    )?;
    s.get("/a")?.expect(200, "payload")?;
    let r = s.get("/a")?;
    r.expect(200, "payload")?.expect_forwarded()?;
    let cs = r.cs();
    ensure!(
        cs.fwd() == Some("stale") && cs.fwd_status() == Some(304) && cs.stored(),
        "expected `fwd=stale; fwd-status=304; stored`: {}",
        r.show()
    );
    ensure!(
        r.header("x-version").as_deref() == Some("2"),
        "the 304's header fields must replace the stored ones: {}",
        r.show()
    );
    assert_revalidated(&s, "/a", 2)?;
    // The refreshed response is fresh for 60 s now.
    let hit = s.get("/a")?;
    hit.expect(200, "payload")?.expect_hit()?;
    ensure!(
        hit.header("x-version").as_deref() == Some("2") && hit.cs().ttl().is_some_and(|t| t > 50),
        "the stored response was not updated: {}",
        hit.show()
    );
    Ok(())
}

#[test]
fn stale_response_with_last_modified_is_revalidated_with_if_modified_since() -> Result<()> {
    let s = default_stack()?;
    let lm = http_date(SystemTime::now() - DAY);
    s.script(
        "/a",
        &[ok("max-age=0", "payload")
            .header("Last-Modified", &lm)
            .auto_304()],
    )?;
    s.get("/a")?.expect(200, "payload")?;
    s.get("/a")?.expect(200, "payload")?.expect_forwarded()?;
    let seen = s.origin_requests("/a")?;
    ensure!(
        seen.len() == 2 && seen[1].header("if-modified-since") == Some(lm.as_str()),
        "the revalidation should carry If-Modified-Since: {lm}: {seen:#?}"
    );
    ensure!(
        seen[0].header("if-modified-since").is_none(),
        "the first request was conditional: {seen:#?}"
    );
    Ok(())
}

#[test]
fn client_if_none_match_is_answered_from_the_cache() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[etagged("max-age=60", "payload")])?;
    s.get("/a")?.expect(200, "payload")?;
    let r = s.req("/a").header("If-None-Match: \"v1\"").send()?;
    ensure!(
        r.status == 304 && r.body.is_empty() && r.cs().hit(),
        "expected a 304 hit: {}",
        r.show()
    );
    ensure!(
        r.header("etag").as_deref() == Some("\"v1\""),
        "a 304 carries the ETag: {}",
        r.show()
    );
    // If-None-Match compares weakly.
    let weak = s
        .req("/a")
        .header("If-None-Match: \"v0\", W/\"v1\"")
        .h2()
        .send()?;
    ensure!(
        weak.status == 304 && weak.cs().hit(),
        "a weak match should be a 304 hit: {}",
        weak.show()
    );
    let other = s.req("/a").header("If-None-Match: \"v0\"").send()?;
    other.expect(200, "payload")?.expect_hit()?;
    ensure!(
        s.origin_count("/a")? == 1,
        "the conditional reached the origin"
    );
    Ok(())
}

#[test]
fn client_if_modified_since_is_answered_from_the_cache() -> Result<()> {
    let s = default_stack()?;
    let lm_time = SystemTime::now() - DAY;
    let lm = http_date(lm_time);
    s.script(
        "/a",
        &[ok("max-age=60", "payload").header("Last-Modified", &lm)],
    )?;
    s.get("/a")?.expect(200, "payload")?;
    let r = s
        .req("/a")
        .header(&format!("If-Modified-Since: {lm}"))
        .send()?;
    ensure!(
        r.status == 304 && r.body.is_empty() && r.cs().hit(),
        "expected a 304 hit: {}",
        r.show()
    );
    let earlier = http_date(lm_time - DAY);
    s.req("/a")
        .header(&format!("If-Modified-Since: {earlier}"))
        .send()?
        .expect(200, "payload")?
        .expect_hit()?;
    ensure!(
        s.origin_count("/a")? == 1,
        "the conditional reached the origin"
    );
    Ok(())
}

#[test]
fn head_is_answered_from_a_stored_get() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "payload")])?;
    s.get("/a")?.expect(200, "payload")?;
    let r = s.req("/a").method("HEAD").send()?;
    ensure!(
        r.status == 200 && r.cs().hit(),
        "expected a HEAD hit: {}",
        r.show()
    );
    ensure!(
        r.header("content-length").as_deref() == Some("7"),
        "HEAD should carry the stored Content-Length: {}",
        r.show()
    );
    let seen = s.origin_requests("/a")?;
    ensure!(
        seen.len() == 1 && seen[0].method == "GET",
        "the origin should have seen one GET: {seen:#?}"
    );
    Ok(())
}

#[test]
fn post_invalidates_the_stored_response() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "payload")])?;
    s.get("/a")?.expect(200, "payload")?;
    s.get("/a")?.expect_hit()?;
    let post = s.req("/a").method("POST").data("x=1").send()?;
    post.expect(200, "payload")?.expect_fwd("method")?;
    s.get("/a")?.expect(200, "payload")?.expect_forwarded()?;
    let methods: Vec<String> = s
        .origin_requests("/a")?
        .into_iter()
        .map(|r| r.method)
        .collect();
    ensure!(
        methods == ["GET", "POST", "GET"],
        "the origin should have seen GET, POST, GET: {methods:?}"
    );
    Ok(())
}

#[test]
fn post_invalidates_location_and_content_location() -> Result<()> {
    let s = default_stack()?;
    s.script("/b", &[ok("max-age=60", "b")])?;
    s.script("/c", &[ok("max-age=60", "c")])?;
    s.script("/d", &[ok("max-age=60", "d")])?;
    s.script(
        "/p",
        &[Scripted::new(201)
            .header("Location", "/b")
            .header("Content-Location", "/c")
            .body("created")],
    )?;
    for p in ["/b", "/c", "/d"] {
        s.get(p)?.expect_stored()?;
        s.get(p)?.expect_hit()?;
    }
    s.req("/p")
        .method("POST")
        .data("new")
        .send()?
        .expect(201, "created")?;
    s.get("/b")?.expect(200, "b")?.expect_forwarded()?;
    s.get("/c")?.expect(200, "c")?.expect_forwarded()?;
    // An unrelated URL stays.
    s.get("/d")?.expect(200, "d")?.expect_hit()?;
    Ok(())
}

#[test]
fn post_does_not_invalidate_a_location_on_another_origin() -> Result<()> {
    let s = default_stack()?;
    s.script("/e", &[ok("max-age=60", "e")])?;
    let other = format!("https://{WILDCARD_NAME}:{}/e", s.s.edge.https_port());
    s.script(
        "/p",
        &[Scripted::new(201)
            .header("Location", &other)
            .header("Content-Location", &other)
            .body("created")],
    )?;
    s.req("/e").host(WILDCARD_NAME).send()?.expect_stored()?;
    s.req("/e").host(WILDCARD_NAME).send()?.expect_hit()?;
    s.req("/p")
        .method("POST")
        .data("new")
        .send()?
        .expect(201, "created")?;
    // RFC 9111 §4.4: only URIs with the same origin as the target are invalidated.
    s.req("/e")
        .host(WILDCARD_NAME)
        .send()?
        .expect(200, "e")?
        .expect_hit()?;
    Ok(())
}

#[test]
fn delete_invalidates_the_stored_response() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "payload")])?;
    s.get("/a")?.expect_stored()?;
    s.get("/a")?.expect_hit()?;
    s.req("/a").method("DELETE").send()?.expect_fwd("method")?;
    s.get("/a")?.expect(200, "payload")?.expect_forwarded()?;
    Ok(())
}

#[test]
fn request_no_store_keeps_the_response_out_of_the_cache() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "body")])?;
    s.req("/a")
        .header("Cache-Control: no-store")
        .send()?
        .expect(200, "body")?
        .expect_not_stored()?;
    s.get("/a")?.expect(200, "body")?.expect_forwarded()?;
    ensure!(
        s.origin_count("/a")? == 2,
        "a response to a no-store request was stored"
    );
    Ok(())
}

#[test]
fn head_miss_does_not_store_an_empty_body() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "payload")])?;
    let head = s.req("/a").method("HEAD").send()?;
    ensure!(head.status == 200, "HEAD: {}", head.show());
    for _ in 0..2 {
        s.get("/a")?.expect(200, "payload")?;
    }
    s.get("/a")?.expect(200, "payload")?.expect_hit()?;
    Ok(())
}

#[test]
fn client_conditional_miss_does_not_store_a_304() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[etagged("max-age=60", "payload")])?;
    let r = s.req("/a").header("If-None-Match: \"v1\"").send()?;
    ensure!(
        r.status == 304 && r.body.is_empty(),
        "expected 304: {}",
        r.show()
    );
    s.get("/a")?.expect(200, "payload")?;
    s.get("/a")?.expect(200, "payload")?.expect_hit()?;
    Ok(())
}

#[test]
fn range_miss_does_not_store_a_partial_body() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/r",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .body_bytes(1000)
            .ranges()],
    )?;
    let full = pattern_body(1000);
    let r = s.req("/r").header("Range: bytes=0-9").send()?;
    ensure!(
        r.status == 206 && r.body == full[..10],
        "expected 206 with bytes 0-9: {}",
        r.show()
    );
    for _ in 0..2 {
        let r = s.get("/r")?;
        ensure!(
            r.status == 200 && r.body == full,
            "after a range miss, a full GET got: {}",
            r.show()
        );
    }
    let r = s.req("/r").header("Range: bytes=100-199").h2().send()?;
    ensure!(
        r.status == 206 && r.body == full[100..200],
        "expected 206 with bytes 100-199: {}",
        r.show()
    );
    Ok(())
}

#[test]
fn range_miss_fills_the_cache_in_the_background() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/r",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .body_bytes(1000)
            .ranges()],
    )?;
    let full = pattern_body(1000);
    let r = s.req("/r").header("Range: bytes=0-9").send()?;
    ensure!(
        r.status == 206 && r.body == full[..10],
        "expected 206 with bytes 0-9: {}",
        r.show()
    );
    // The range went to the origin as it was; one full GET without Range followed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let seen = s.origin_requests("/r")?;
        if seen.len() >= 2 {
            ensure!(
                seen.len() == 2 && seen.iter().filter(|q| q.header("range").is_none()).count() == 1,
                "expected the range request and one full fetch, origin saw {seen:?}"
            );
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no background full fetch after a range miss"
        );
        sleep_ms(50);
    }
    // Wait until stored, then the next range is a hit.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = s.req("/r").header("Range: bytes=100-199").send()?;
        if r.cs().hit() {
            ensure!(
                r.status == 206 && r.body == full[100..200],
                "a range served from the filled cache: {}",
                r.show()
            );
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "range requests still miss: {}",
            r.show()
        );
        sleep_ms(50);
    }
    Ok(())
}

/// A stored 1000-byte pattern body at `/r`, fetched once in full.
fn stored_pattern(s: &CacheStack) -> Result<Vec<u8>> {
    s.script(
        "/r",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .header("Content-Type", "text/plain")
            .body_bytes(1000)],
    )?;
    let full = s.get("/r")?;
    let expected = pattern_body(1000);
    ensure!(
        full.status == 200 && full.body == expected && full.cs().stored(),
        "the full response: {}",
        full.show()
    );
    Ok(expected)
}

/// Fails unless the origin saw exactly one request to `/r`, without `Range`.
fn assert_one_full_fetch(s: &CacheStack) -> Result<()> {
    let seen = s.origin_requests("/r")?;
    ensure!(
        seen.len() == 1 && seen[0].header("range").is_none(),
        "the origin should have seen one request without Range: {seen:#?}"
    );
    Ok(())
}

#[test]
fn single_range_is_served_from_the_stored_response() -> Result<()> {
    let s = default_stack()?;
    let full = stored_pattern(&s)?;
    for h2 in [false, true] {
        let mut req = s.req("/r").header("Range: bytes=100-199");
        if h2 {
            req = req.h2();
        }
        let r = req.send()?;
        ensure!(
            r.status == 206
                && r.header("content-range").as_deref() == Some("bytes 100-199/1000")
                && r.body == full[100..200]
                && r.cs().hit(),
            "expected a 206 hit with bytes 100-199: {}",
            r.show()
        );
    }
    let suffix = s.req("/r").header("Range: bytes=-50").send()?;
    ensure!(
        suffix.status == 206 && suffix.body == full[950..],
        "suffix range: {}",
        suffix.show()
    );
    assert_one_full_fetch(&s)
}

#[test]
fn multiple_ranges_are_served_as_multipart_byteranges() -> Result<()> {
    let s = default_stack()?;
    let full = stored_pattern(&s)?;
    let r = s.req("/r").header("Range: bytes=0-9,500-509").send()?;
    let ct = r.header("content-type").unwrap_or_default();
    ensure!(
        r.status == 206 && ct.starts_with("multipart/byteranges") && ct.contains("boundary="),
        "expected a multipart/byteranges 206: {}",
        r.show()
    );
    let text = r.text();
    for (range, bytes) in [("0-9", &full[0..10]), ("500-509", &full[500..510])] {
        let part = String::from_utf8_lossy(bytes);
        ensure!(
            text.contains(&format!("bytes {range}/1000")) && text.contains(part.as_ref()),
            "part {range} missing: {}",
            r.show()
        );
    }
    assert_one_full_fetch(&s)
}

#[test]
fn unsatisfiable_range_is_416() -> Result<()> {
    let s = default_stack()?;
    stored_pattern(&s)?;
    let r = s.req("/r").header("Range: bytes=5000-6000").send()?;
    ensure!(
        r.status == 416 && r.header("content-range").as_deref() == Some("bytes */1000"),
        "expected 416 with Content-Range: bytes */1000: {}",
        r.show()
    );
    assert_one_full_fetch(&s)
}

#[test]
fn if_range_gets_the_range_only_while_the_validator_matches() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/r",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .header("ETag", "\"p1\"")
            .body_bytes(1000)],
    )?;
    let full = pattern_body(1000);
    s.get("/r")?.expect_stored()?;
    let r = s
        .req("/r")
        .header("Range: bytes=0-9")
        .header("If-Range: \"p1\"")
        .send()?;
    ensure!(
        r.status == 206 && r.body == full[..10] && r.cs().hit(),
        "a matching If-Range should get the range: {}",
        r.show()
    );
    let r = s
        .req("/r")
        .header("Range: bytes=0-9")
        .header("If-Range: \"p0\"")
        .send()?;
    ensure!(
        r.status == 200 && r.body == full,
        "a stale If-Range should get the whole body: {}",
        r.show()
    );
    assert_one_full_fetch(&s)
}
