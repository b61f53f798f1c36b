//! The last RFC 9111 details, each seen through the edge by curl and by the origin's
//! request log: `Age` with junk, an invalid `CDN-Cache-Control`, any status with
//! explicit freshness, `Vary` on negotiation lists, `Expires` in another case, a
//! qualified `private`, and `immutable`.

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Result};
use keyless_tests::{http_date, Scripted};

use crate::cache_support::{
    assert_never_stored, assert_stored_then_hit, date_now, default_stack, ok,
};

#[test]
fn an_age_with_trailing_junk_is_ignored_and_a_list_counts_its_first_member() -> Result<()> {
    let s = default_stack()?;
    // `7200s` is not a delta-seconds: ignored, so the response is fresh for its hour.
    s.script(
        "/junk",
        &[ok("max-age=3600", "a")
            .header("Date", &date_now())
            .header("Age", "7200s")],
    )?;
    let hit = assert_stored_then_hit(&s, "/junk", 200, "a")?;
    ensure!(
        hit.age().is_some_and(|a| a < 60),
        "the junk Age must not count: {}",
        hit.show()
    );
    // A list: its first member counts (7200 > max-age): stale at once.
    s.script("/list", &[ok("max-age=3600", "b").header("Age", "7200, 0")])?;
    s.get("/list")?.expect(200, "b")?;
    s.get("/list")?.expect(200, "b")?.expect_forwarded()?;
    ensure!(
        s.origin_count("/list")? == 2,
        "an Age list's first member was not counted"
    );
    Ok(())
}

#[test]
fn an_invalid_cdn_cache_control_leaves_cache_control_in_charge() -> Result<()> {
    let s = default_stack()?;
    // Wrong type (a string), a decimal, a field that does not parse at all: each is
    // ignored, and Cache-Control's max-age=60 governs.
    for (path, cdn) in [
        ("/string", "max-age=\"600\""),
        ("/decimal", "max-age=1.5"),
        ("/unparsable", "max-age=600,"),
        ("/unknown", "frobnicate=3"),
    ] {
        s.script(
            path,
            &[ok("max-age=60", "a").header("CDN-Cache-Control", cdn)],
        )?;
        let hit = assert_stored_then_hit(&s, path, 200, "a")?;
        ensure!(
            hit.cs().ttl().is_some_and(|t| t <= 60),
            "{cdn}: Cache-Control's max-age should govern: {}",
            hit.show()
        );
    }
    // A valid one still governs.
    s.script(
        "/valid",
        &[ok("max-age=60", "a").header("CDN-Cache-Control", "max-age=600")],
    )?;
    let hit = assert_stored_then_hit(&s, "/valid", 200, "a")?;
    ensure!(
        hit.cs().ttl().is_some_and(|t| t > 60),
        "CDN-Cache-Control should govern: {}",
        hit.show()
    );
    Ok(())
}

#[test]
fn any_status_with_explicit_freshness_is_stored() -> Result<()> {
    let s = default_stack()?;
    for (path, status) in [("/unavailable", 503), ("/error", 500), ("/accepted", 202)] {
        s.script(
            path,
            &[Scripted::new(status)
                .header("Cache-Control", "max-age=60")
                .body("said so")],
        )?;
        assert_stored_then_hit(&s, path, status, "said so")?;
    }
    // Expires is explicit freshness too.
    let expires = http_date(SystemTime::now() + Duration::from_secs(120));
    s.script(
        "/expires",
        &[Scripted::new(503).header("Expires", &expires).body("later")],
    )?;
    assert_stored_then_hit(&s, "/expires", 503, "later")?;
    // must-understand: only statuses whose rules this cache knows.
    s.script(
        "/must",
        &[Scripted::new(503)
            .header("Cache-Control", "max-age=60, must-understand")
            .body("no")],
    )?;
    assert_never_stored(&s, "/must", 503, "no")?;
    s.script("/must-ok", &[ok("max-age=60, must-understand", "yes")])?;
    assert_stored_then_hit(&s, "/must-ok", 200, "yes")?;
    Ok(())
}

#[test]
fn vary_on_negotiation_lists_matches_other_order_case_and_spacing() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/v",
        &[
            ok("max-age=60", "en-fr").header("Vary", "Accept-Language, Accept-Encoding"),
            ok("max-age=60", "de").header("Vary", "Accept-Language, Accept-Encoding"),
        ],
    )?;
    let get = |lang: &str, enc: &str| {
        s.req("/v")
            .header(&format!("Accept-Language: {lang}"))
            .header(&format!("Accept-Encoding: {enc}"))
            .send()
    };
    get("en-US, fr;q=0.8", "gzip, br")?
        .expect(200, "en-fr")?
        .expect_stored()?;
    for (lang, enc) in [
        ("fr;q=0.8, en-US", "br, gzip"),
        ("EN-us,FR; q=0.8", "GZIP,BR"),
        ("  en-US ,fr ; q=0.8", " gzip ,  br"),
    ] {
        get(lang, enc)?.expect(200, "en-fr")?.expect_hit()?;
    }
    // Other languages: another variant.
    get("de", "gzip, br")?
        .expect(200, "de")?
        .expect_forwarded()?;
    ensure!(
        s.origin_count("/v")? == 2,
        "the origin saw {} requests",
        s.origin_count("/v")?
    );
    Ok(())
}

#[test]
fn expires_in_another_case_gives_freshness() -> Result<()> {
    let s = default_stack()?;
    let expires = http_date(SystemTime::now() + Duration::from_secs(120));
    for (path, value) in [
        ("/lower", expires.to_ascii_lowercase()),
        ("/upper", expires.to_ascii_uppercase()),
    ] {
        s.script(
            path,
            &[Scripted::new(200).header("Expires", &value).body("a")],
        )?;
        let hit = assert_stored_then_hit(&s, path, 200, "a")?;
        ensure!(
            hit.cs().ttl().is_some_and(|t| (60..=121).contains(&t)),
            "{value}: ttl should be about 120 s: {}",
            hit.show()
        );
    }
    Ok(())
}

#[test]
fn a_qualified_private_stores_the_response_without_the_named_fields() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/p",
        &[ok("private=\"x-user, set-cookie\", max-age=60", "page")
            .header("X-User", "alice")
            .header("Set-Cookie", "session=alice")
            .header("X-Shared", "kept")],
    )?;
    let first = s.get("/p")?;
    first.expect(200, "page")?.expect_stored()?;
    ensure!(
        first.header("x-user").as_deref() == Some("alice"),
        "the client that fetched it gets every field: {}",
        first.show()
    );
    let hit = s.get("/p")?;
    hit.expect(200, "page")?.expect_hit()?;
    ensure!(
        hit.header("x-user").is_none() && hit.header("set-cookie").is_none(),
        "a private field was stored: {}",
        hit.show()
    );
    ensure!(
        hit.header("x-shared").as_deref() == Some("kept"),
        "{}",
        hit.show()
    );
    // Unqualified private: nothing stored.
    s.script("/all", &[ok("private, max-age=60", "mine")])?;
    assert_never_stored(&s, "/all", 200, "mine")
}

#[test]
fn immutable_answers_a_reload_from_the_cache_but_not_a_forced_one() -> Result<()> {
    let s = default_stack()?;
    s.script("/i", &[ok("max-age=600, immutable", "same")])?;
    s.get("/i")?.expect(200, "same")?.expect_stored()?;
    // A browser reload (max-age=0): served from the cache.
    s.req("/i")
        .header("Cache-Control: max-age=0")
        .send()?
        .expect(200, "same")?
        .expect_hit()?;
    ensure!(
        s.origin_count("/i")? == 1,
        "a reload of an immutable response reached the origin"
    );
    // A forced reload (no-cache): revalidated.
    s.req("/i")
        .header("Cache-Control: no-cache")
        .send()?
        .expect(200, "same")?
        .expect_forwarded()?;
    // Without immutable, a reload revalidates.
    s.script("/m", &[ok("max-age=600", "plain")])?;
    s.get("/m")?.expect(200, "plain")?;
    s.req("/m")
        .header("Cache-Control: max-age=0")
        .send()?
        .expect(200, "plain")?
        .expect_forwarded()?;
    Ok(())
}
