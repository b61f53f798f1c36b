//! The edge cache's storage and freshness rules (RFC 9111 §3, §4.2), `CDN-Cache-Control`
//! (RFC 9213) and the cache key, seen by curl through the edge and by the origin's
//! request log.

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Result};
use keyless_tests::{http_date, Scripted};

use crate::cache_support::{
    assert_never_stored, assert_stored_then_hit, cache_stack, default_stack, expect_miss, ok,
    sleep_ms,
};

const DAY: Duration = Duration::from_secs(86_400);

#[test]
fn no_store_response_is_never_stored() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("no-store", "secret")])?;
    assert_never_stored(&s, "/a", 200, "secret")
}

#[test]
fn private_response_is_never_stored() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("private, max-age=60", "mine")])?;
    assert_never_stored(&s, "/a", 200, "mine")
}

#[test]
fn response_to_authorized_request_is_not_stored_by_default() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "for alice")])?;
    for _ in 0..2 {
        let r = s.req("/a").header("Authorization: Bearer alice").send()?;
        r.expect(200, "for alice")?
            .expect_forwarded()?
            .expect_not_stored()?;
    }
    ensure!(
        s.origin_count("/a")? == 2,
        "a response to Authorization was reused"
    );
    // Nor is it served to someone else.
    let r = s.get("/a")?;
    r.expect_forwarded()?;
    ensure!(
        s.origin_count("/a")? == 3,
        "a response to Authorization was reused"
    );
    Ok(())
}

#[test]
fn response_to_authorized_request_is_stored_with_public_s_maxage_or_must_revalidate() -> Result<()>
{
    let s = default_stack()?;
    for (path, cc) in [
        ("/public", "public, max-age=60"),
        ("/smaxage", "s-maxage=60"),
        ("/mustrevalidate", "max-age=60, must-revalidate"),
    ] {
        s.script(path, &[ok(cc, path)])?;
        let first = s.req(path).header("Authorization: Bearer alice").send()?;
        first.expect(200, path)?.expect_stored()?;
        let second = s.req(path).header("Authorization: Bearer alice").send()?;
        second.expect(200, path)?.expect_hit()?;
        ensure!(s.origin_count(path)? == 1, "{cc}: not reused");
    }
    Ok(())
}

#[test]
fn not_found_is_cacheable_by_default_with_max_age_or_heuristics() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/explicit",
        &[Scripted::new(404)
            .header("Cache-Control", "max-age=60")
            .body("gone")],
    )?;
    assert_stored_then_hit(&s, "/explicit", 404, "gone")?;
    let lm = http_date(SystemTime::now() - 10 * DAY);
    s.script(
        "/heuristic",
        &[Scripted::new(404).header("Last-Modified", &lm).body("gone")],
    )?;
    assert_stored_then_hit(&s, "/heuristic", 404, "gone")?;
    Ok(())
}

#[test]
fn non_heuristically_cacheable_statuses_are_not_stored_without_freshness() -> Result<()> {
    let s = default_stack()?;
    let lm = http_date(SystemTime::now() - 10 * DAY);
    s.script(
        "/redirect",
        &[Scripted::new(302)
            .header("Location", "/elsewhere")
            .header("Last-Modified", &lm)
            .body("moved")],
    )?;
    assert_never_stored(&s, "/redirect", 302, "moved")?;
    s.script(
        "/error",
        &[Scripted::new(500).header("Last-Modified", &lm).body("oops")],
    )?;
    assert_never_stored(&s, "/error", 500, "oops")?;
    Ok(())
}

#[test]
fn response_without_freshness_or_validator_is_not_stored_but_max_age_0_is() -> Result<()> {
    let s = default_stack()?;
    // A dynamic page: nothing says how long it is fresh, nothing to revalidate it with.
    s.script("/dynamic", &[Scripted::new(200).body("now")])?;
    assert_never_stored(&s, "/dynamic", 200, "now")?;
    // An explicit max-age=0 is kept (max-stale requests may use it).
    s.script("/zero", &[ok("max-age=0", "zero")])?;
    s.get("/zero")?.expect(200, "zero")?.expect_stored()?;
    Ok(())
}

#[test]
fn s_maxage_takes_precedence_over_max_age() -> Result<()> {
    let s = default_stack()?;
    s.script("/shared-longer", &[ok("max-age=0, s-maxage=60", "a")])?;
    let hit = assert_stored_then_hit(&s, "/shared-longer", 200, "a")?;
    let ttl = hit.cs().ttl();
    ensure!(
        ttl.is_some_and(|t| (50..=60).contains(&t)),
        "ttl should come from s-maxage=60: {}",
        hit.show()
    );
    s.script("/shared-shorter", &[ok("max-age=60, s-maxage=0", "b")])?;
    s.get("/shared-shorter")?.expect(200, "b")?;
    s.get("/shared-shorter")?
        .expect(200, "b")?
        .expect_forwarded()?;
    ensure!(
        s.origin_count("/shared-shorter")? == 2,
        "s-maxage=0 must make the response stale for a shared cache"
    );
    Ok(())
}

#[test]
fn max_age_takes_precedence_over_expires() -> Result<()> {
    let s = default_stack()?;
    let past = http_date(SystemTime::now() - DAY);
    s.script("/fresh", &[ok("max-age=60", "a").header("Expires", &past)])?;
    assert_stored_then_hit(&s, "/fresh", 200, "a")?;

    let future = http_date(SystemTime::now() + DAY);
    s.script("/stale", &[ok("max-age=0", "b").header("Expires", &future)])?;
    s.get("/stale")?.expect(200, "b")?;
    s.get("/stale")?.expect(200, "b")?.expect_forwarded()?;
    ensure!(
        s.origin_count("/stale")? == 2,
        "max-age=0 lost against Expires"
    );
    Ok(())
}

#[test]
fn expires_alone_gives_freshness() -> Result<()> {
    let s = default_stack()?;
    let expires = http_date(SystemTime::now() + Duration::from_secs(60));
    s.script(
        "/a",
        &[Scripted::new(200).header("Expires", &expires).body("a")],
    )?;
    let hit = assert_stored_then_hit(&s, "/a", 200, "a")?;
    let ttl = hit.cs().ttl();
    ensure!(
        ttl.is_some_and(|t| (40..=61).contains(&t)),
        "ttl should be about 60 s: {}",
        hit.show()
    );
    Ok(())
}

#[test]
fn heuristic_freshness_from_last_modified() -> Result<()> {
    let s = default_stack()?;
    // Modified ten days ago: 10% of that is a day of heuristic freshness.
    let lm = http_date(SystemTime::now() - 10 * DAY);
    s.script(
        "/a",
        &[Scripted::new(200).header("Last-Modified", &lm).body("old")],
    )?;
    s.get("/a")?.expect(200, "old")?.expect_stored()?;
    sleep_ms(1100);
    let hit = s.get("/a")?;
    hit.expect(200, "old")?.expect_hit()?;
    ensure!(
        hit.age().is_some_and(|a| a >= 1),
        "a hit after 1 s has Age >= 1: {}",
        hit.show()
    );
    ensure!(
        s.origin_count("/a")? == 1,
        "heuristic freshness not applied"
    );
    Ok(())
}

#[test]
fn invalid_expires_means_already_stale() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[Scripted::new(200).header("Expires", "0").body("a")])?;
    s.get("/a")?.expect(200, "a")?;
    s.get("/a")?.expect(200, "a")?.expect_forwarded()?;
    ensure!(
        s.origin_count("/a")? == 2,
        "Expires: 0 must be treated as already expired"
    );
    Ok(())
}

#[test]
fn age_grows_on_hits() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "a")])?;
    let first = s.get("/a")?;
    first.expect(200, "a")?.expect_stored()?;
    let hit1 = s.get("/a")?;
    hit1.expect(200, "a")?.expect_hit()?;
    let age1 = hit1.age();
    ensure!(age1.is_some(), "a hit must carry Age: {}", hit1.show());
    ensure!(
        hit1.header("via").is_some(),
        "a hit must carry Via: {}",
        hit1.show()
    );
    sleep_ms(1100);
    let hit2 = s.get("/a")?;
    hit2.expect(200, "a")?.expect_hit()?;
    ensure!(
        hit2.age() >= age1.map(|a| a + 1),
        "Age must grow with time: {} then {}",
        hit1.show(),
        hit2.show()
    );
    let (t1, t2) = (hit1.cs().ttl(), hit2.cs().ttl());
    ensure!(
        t1.is_some_and(|t| (55..=60).contains(&t)) && t2 < t1,
        "ttl must shrink: {t1:?} then {t2:?}"
    );
    ensure!(s.origin_count("/a")? == 1, "hits reached the origin");
    Ok(())
}

#[test]
fn age_from_the_origin_counts() -> Result<()> {
    let s = default_stack()?;
    s.script("/young", &[ok("max-age=60", "a").header("Age", "30")])?;
    s.get("/young")?.expect(200, "a")?;
    let hit = s.get("/young")?;
    hit.expect(200, "a")?.expect_hit()?;
    ensure!(
        hit.age().is_some_and(|a| (30..=40).contains(&a)),
        "the origin's Age must be included: {}",
        hit.show()
    );
    ensure!(
        hit.cs().ttl().is_some_and(|t| t <= 30),
        "ttl must account for the origin's Age: {}",
        hit.show()
    );
    // Older than max-age on arrival: stale at once.
    s.script("/old", &[ok("max-age=60", "b").header("Age", "100")])?;
    s.get("/old")?.expect(200, "b")?;
    s.get("/old")?.expect(200, "b")?.expect_forwarded()?;
    ensure!(
        s.origin_count("/old")? == 2,
        "a response with Age beyond max-age was reused"
    );
    Ok(())
}

#[test]
fn malformed_max_age_is_not_fresh() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=abc", "a")])?;
    s.get("/a")?.expect(200, "a")?;
    s.get("/a")?.expect(200, "a")?.expect_forwarded()?;
    ensure!(s.origin_count("/a")? == 2, "max-age=abc was taken as fresh");
    Ok(())
}

#[test]
fn conflicting_duplicate_max_age_is_stale() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .header("Cache-Control", "max-age=3600")
            .body("a")],
    )?;
    s.get("/a")?.expect(200, "a")?;
    s.get("/a")?.expect(200, "a")?.expect_forwarded()?;
    ensure!(
        s.origin_count("/a")? == 2,
        "conflicting max-age directives must make the response stale"
    );
    Ok(())
}

#[test]
fn cdn_cache_control_overrides_cache_control_no_store() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[ok("no-store", "a").header("CDN-Cache-Control", "max-age=60")],
    )?;
    let hit = assert_stored_then_hit(&s, "/a", 200, "a")?;
    // Cache-Control is for caches downstream: passed on as is.
    ensure!(
        hit.header("cache-control").as_deref() == Some("no-store"),
        "Cache-Control must reach the client unchanged: {}",
        hit.show()
    );
    Ok(())
}

#[test]
fn cdn_cache_control_no_store_beats_cache_control() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[ok("max-age=60", "a").header("CDN-Cache-Control", "no-store")],
    )?;
    assert_never_stored(&s, "/a", 200, "a")
}

#[test]
fn query_is_part_of_the_key_by_default() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "one"), ok("max-age=60", "two")])?;
    s.get("/a?x=1")?.expect(200, "one")?;
    let other = s.get("/a?x=2")?;
    other.expect(200, "two")?;
    expect_miss(&other)?;
    s.get("/a?x=1")?.expect(200, "one")?.expect_hit()?;
    s.get("/a?x=2")?.expect(200, "two")?.expect_hit()?;
    ensure!(s.origin_count("/a")? == 2, "two query strings, two entries");
    Ok(())
}

#[test]
fn ignore_query_site_shares_one_entry() -> Result<()> {
    let s = cache_stack(|c| c.site_cache_option("ignore_query", true))?;
    s.script("/a", &[ok("max-age=60", "one"), ok("max-age=60", "two")])?;
    s.get("/a?x=1")?.expect(200, "one")?.expect_stored()?;
    s.get("/a?x=2")?.expect(200, "one")?.expect_hit()?;
    s.get("/a")?.expect(200, "one")?.expect_hit()?;
    ensure!(
        s.origin_count("/a")? == 1,
        "ignore_query must share the entry"
    );
    Ok(())
}

#[test]
fn key_headers_make_separate_entries() -> Result<()> {
    let s = cache_stack(|c| {
        c.site_cache_option("key_headers", toml::Value::Array(vec!["x-tenant".into()]))
    })?;
    s.script(
        "/a",
        &[ok("max-age=60", "for a"), ok("max-age=60", "for b")],
    )?;
    s.req("/a")
        .header("X-Tenant: a")
        .send()?
        .expect(200, "for a")?;
    let b = s.req("/a").header("X-Tenant: b").send()?;
    b.expect(200, "for b")?.expect_forwarded()?;
    s.req("/a")
        .header("X-Tenant: a")
        .send()?
        .expect(200, "for a")?
        .expect_hit()?;
    s.req("/a")
        .header("X-Tenant: b")
        .h2()
        .send()?
        .expect(200, "for b")?
        .expect_hit()?;
    ensure!(s.origin_count("/a")? == 2, "one entry per X-Tenant value");
    // A POST to the URL (from any tenant) invalidates every tenant's entry.
    s.req("/a")
        .method("POST")
        .header("X-Tenant: c")
        .send()?
        .expect(200, "for b")?;
    for tenant in ["a", "b"] {
        s.req("/a")
            .header(&format!("X-Tenant: {tenant}"))
            .send()?
            .expect_forwarded()?;
    }
    Ok(())
}

#[test]
fn disabled_site_bypasses_the_cache() -> Result<()> {
    let s = cache_stack(|c| c.site_cache_option("enabled", false))?;
    s.script("/a", &[ok("max-age=60", "a")])?;
    for _ in 0..2 {
        s.get("/a")?.expect(200, "a")?.expect_fwd("bypass")?;
    }
    ensure!(
        s.origin_count("/a")? == 2,
        "a disabled site's response was reused"
    );
    Ok(())
}

#[test]
fn globally_disabled_cache_stores_nothing() -> Result<()> {
    let s = cache_stack(|c| c.cache_option("enabled", false))?;
    s.script("/a", &[ok("max-age=60", "a")])?;
    for _ in 0..2 {
        let r = s.get("/a")?;
        ensure!(
            r.status == 200 && r.text() == "a" && !r.cs().hit() && !r.cs().stored(),
            "with [cache] enabled = false: {}",
            r.show()
        );
    }
    ensure!(
        s.origin_count("/a")? == 2,
        "a disabled cache reused a response"
    );
    Ok(())
}
