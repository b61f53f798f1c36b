//! Serving stale content (RFC 5861): `stale-while-revalidate` answers at once and
//! refreshes in the background, `stale-if-error` hides origin failures; the operator's
//! defaults from `[cache]` apply to responses that carry neither.

use std::time::Duration;

use anyhow::{ensure, Result};
use keyless_tests::Scripted;

use crate::cache_support::{cache_stack, default_stack, ok, sleep_ms, CacheStack};

/// Asserts the origin saw exactly `n` requests to `path` within 2 s, and no more
/// 300 ms later.
fn assert_exactly(s: &CacheStack, path: &str, n: usize) -> Result<()> {
    s.s.origin
        .wait_for_requests(path, n, Duration::from_secs(2))?;
    sleep_ms(300);
    let seen = s.origin_count(path)?;
    ensure!(
        seen == n,
        "{path}: the origin saw {seen} requests, expected {n}"
    );
    Ok(())
}

/// Stale-while-revalidate: a stale hit at once, one background refresh, then the new
/// response. `/a` is stale after `stale_after_ms`.
fn assert_swr(s: &CacheStack, stale_after_ms: u64) -> Result<()> {
    s.get("/a")?.expect(200, "old")?.expect_stored()?;
    sleep_ms(stale_after_ms);
    let r = s.get("/a")?;
    r.expect(200, "old")?.expect_hit()?;
    ensure!(
        r.cs().ttl().is_some_and(|t| t <= 0),
        "a stale hit has a ttl <= 0: {}",
        r.show()
    );
    ensure!(
        r.cs()
            .detail()
            .is_none_or(|d| d == "stale-while-revalidate"),
        "unexpected detail: {}",
        r.show()
    );
    ensure!(
        r.elapsed < Duration::from_millis(900),
        "the stale response waited for the origin (which takes 0.8 s): {}",
        r.show()
    );
    // Two more while the refresh is under way: still no second refresh.
    s.get("/a")?.expect(200, "old")?;
    s.get("/a")?.expect(200, "old")?;
    assert_exactly(s, "/a", 2)?;
    // The refresh takes 0.8 s at the origin.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = s.get("/a")?;
        if r.text() == "new" {
            r.expect_hit()?;
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the refreshed response never replaced the stale one: {}",
            r.show()
        );
        sleep_ms(100);
    }
    ensure!(s.origin_count("/a")? == 2, "more than one refresh");
    Ok(())
}

#[test]
fn stale_while_revalidate_serves_stale_and_refreshes_once() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[
            ok("max-age=1, stale-while-revalidate=30", "old"),
            ok("max-age=60", "new").delay(800),
        ],
    )?;
    assert_swr(&s, 1100)
}

#[test]
fn operator_default_stale_while_revalidate_applies() -> Result<()> {
    let s = cache_stack(|c| c.cache_option("stale_while_revalidate", "30s"))?;
    s.script(
        "/a",
        &[ok("max-age=0", "old"), ok("max-age=60", "new").delay(800)],
    )?;
    assert_swr(&s, 0)
}

/// Stale-if-error: "old" at `/a` is stale at once (max-age=0); when the origin fails,
/// "old" is served.
fn assert_sie(s: &CacheStack) -> Result<()> {
    s.get("/a")?.expect(200, "old")?;
    let r = s.get("/a")?;
    r.expect(200, "old")?;
    let cs = r.cs();
    ensure!(
        !cs.hit() || cs.ttl().is_some_and(|t| t <= 0),
        "expected the stale response: {}",
        r.show()
    );
    Ok(())
}

#[test]
fn stale_if_error_hides_an_origin_503() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[
            ok("max-age=0, stale-if-error=60", "old"),
            Scripted::new(503).body("down"),
        ],
    )?;
    assert_sie(&s)?;
    let r = s.get("/a")?;
    r.expect(200, "old")?;
    let cs = r.cs();
    ensure!(
        cs.fwd() == Some("stale") && cs.fwd_status() == Some(503),
        "expected fwd=stale; fwd-status=503: {}",
        r.show()
    );
    ensure!(s.origin_count("/a")? >= 2, "the origin was not asked");
    Ok(())
}

#[test]
fn stale_if_error_hides_an_origin_that_is_down() -> Result<()> {
    let mut s = default_stack()?;
    s.script("/a", &[ok("max-age=0, stale-if-error=60", "old")])?;
    s.get("/a")?.expect(200, "old")?;
    s.s.origin.stop()?;
    s.get("/a")?.expect(200, "old")?;
    Ok(())
}

#[test]
fn operator_default_stale_if_error_applies() -> Result<()> {
    let s = cache_stack(|c| c.cache_option("stale_if_error", "60s"))?;
    s.script(
        "/a",
        &[ok("max-age=0", "old"), Scripted::new(503).body("down")],
    )?;
    assert_sie(&s)
}

#[test]
fn without_stale_directives_errors_reach_the_client() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[ok("max-age=0", "old"), Scripted::new(503).body("down")],
    )?;
    s.get("/a")?.expect(200, "old")?;
    s.get("/a")?.expect(503, "down")?.expect_forwarded()?;
    Ok(())
}

#[test]
fn s_maxage_forbids_serving_stale() -> Result<()> {
    let s = default_stack()?;
    // s-maxage implies proxy-revalidate (RFC 9111 §5.2.2.10).
    s.script(
        "/a",
        &[
            ok("s-maxage=0, stale-if-error=60", "old"),
            Scripted::new(503).body("down"),
        ],
    )?;
    s.get("/a")?.expect(200, "old")?;
    let r = s.get("/a")?;
    ensure!(
        r.status != 200 && r.text() != "old",
        "an s-maxage response was served stale: {}",
        r.show()
    );
    Ok(())
}

#[test]
fn no_cache_response_is_not_served_while_revalidating() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/a",
        &[
            ok("max-age=0, no-cache, stale-while-revalidate=60", "old"),
            ok("max-age=60", "new"),
        ],
    )?;
    s.get("/a")?.expect(200, "old")?;
    s.get("/a")?.expect(200, "new")?.expect_forwarded()?;
    ensure!(s.origin_count("/a")? == 2, "the origin was not asked");
    Ok(())
}
