//! Where and how responses are kept: the memory bound, the object size limit, the disk
//! tier across restarts, streaming while storing, truncated bodies, request
//! coalescing, and the cache metrics.

use std::time::Duration;

use anyhow::{ensure, Result};
use keyless_tests::{pattern_body, Scripted};

use crate::cache_support::{cache_stack, default_stack, ok, raw_get, sleep_ms, CacheStack, Resp};
use crate::edge_support::SITE;

/// Sends `n` GETs of `path` over the plain listener at once; returns what each got.
fn concurrent_gets(s: &CacheStack, path: &str, n: usize) -> Result<Vec<Resp>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| s.req(path).plain().send()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a request thread panicked"))
            .collect()
    })
}

#[test]
fn concurrent_misses_are_coalesced_into_one_origin_request() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "slow body").delay(800)])?;
    let answers = concurrent_gets(&s, "/a", 10)?;
    for r in &answers {
        r.expect(200, "slow body")?;
    }
    ensure!(
        s.origin_count("/a")? == 1,
        "10 concurrent misses reached the origin {} times",
        s.origin_count("/a")?
    );
    let collapsed = answers
        .iter()
        .filter(|r| r.cs().hit() && r.cs().has("collapsed"))
        .count();
    ensure!(
        collapsed >= 1,
        "no answer says `hit; collapsed`: {:#?}",
        answers.iter().map(Resp::show).collect::<Vec<_>>()
    );
    let coalesced = s.metric("keyless_edge_cache_coalesced_total", &[])?;
    ensure!(
        coalesced >= 1.0,
        "coalesced requests not counted: {coalesced}"
    );
    Ok(())
}

#[test]
fn slow_uncacheable_responses_are_not_serialized() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("no-store", "private").delay(700)])?;
    let started = std::time::Instant::now();
    let answers = concurrent_gets(&s, "/a", 5)?;
    let elapsed = started.elapsed();
    for r in &answers {
        r.expect(200, "private")?;
    }
    ensure!(
        s.origin_count("/a")? == 5,
        "each request for a no-store response must reach the origin: {}",
        s.origin_count("/a")?
    );
    // Serialized would be 5 × 700 ms; one wait for the first answer is fine.
    ensure!(
        elapsed < Duration::from_millis(2450),
        "5 concurrent no-store requests took {elapsed:?}: serialized behind each other"
    );
    Ok(())
}

#[test]
fn memory_tier_stays_within_its_bound() -> Result<()> {
    const BOUND: u64 = 64 * 1024;
    let s = cache_stack(|c| c.cache_option("memory_bytes", BOUND as i64))?;
    let body = "x".repeat(8 * 1024);
    for i in 0..24 {
        let path = format!("/o{i}");
        s.script(&path, &[ok("max-age=60", &body)])?;
        s.req(&path).plain().send()?.expect(200, &body)?;
    }
    let bytes = s.wait_metric("keyless_edge_cache_bytes", &[("tier", "memory")], |v| {
        v > 0.0 && v <= BOUND as f64
    })?;
    ensure!(
        bytes > 0.0 && bytes <= BOUND as f64,
        "memory tier holds {bytes} bytes, bound {BOUND}"
    );
    let evictions = s.metric("keyless_edge_cache_evictions_total", &[("tier", "memory")])?;
    ensure!(evictions >= 1.0, "no evictions counted: {evictions}");
    // Not all 24 × 8 KiB fit: some must be fetched again.
    let mut refetched = 0;
    for i in 0..24 {
        let path = format!("/o{i}");
        let r = s.req(&path).plain().send()?;
        r.expect(200, &body)?;
        if !r.cs().hit() {
            refetched += 1;
        }
    }
    ensure!(
        refetched >= 1,
        "192 KiB of objects all stayed in a 64 KiB cache"
    );
    Ok(())
}

#[test]
fn bodies_over_max_object_bytes_are_served_but_not_stored() -> Result<()> {
    let s = cache_stack(|c| c.cache_option("max_object_bytes", 100_000))?;
    s.script(
        "/big",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .body_bytes(300_000)],
    )?;
    s.script(
        "/small",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .body_bytes(50_000)],
    )?;
    let expected = pattern_body(300_000);
    for _ in 0..2 {
        let r = s.req("/big").plain().send()?;
        ensure!(
            r.status == 200 && r.body == expected && !r.cs().hit() && !r.cs().stored(),
            "a 300 kB body should be passed through intact and not stored: {}",
            r.show()
        );
    }
    ensure!(s.origin_count("/big")? == 2, "the big body was reused");
    s.req("/small").plain().send()?.expect_stored()?;
    let hit = s.req("/small").plain().send()?;
    ensure!(
        hit.cs().hit() && hit.body == pattern_body(50_000),
        "a 50 kB body should be stored: {}",
        hit.show()
    );
    Ok(())
}

#[test]
fn disk_tier_survives_a_restart() -> Result<()> {
    let mut s = cache_stack(|c| c.cache_option("disk_dir", "cache-disk"))?;
    s.script("/a", &[ok("max-age=60", "persisted")])?;
    s.get("/a")?.expect(200, "persisted")?.expect_stored()?;
    let on_disk = s.wait_metric("keyless_edge_cache_bytes", &[("tier", "disk")], |v| v > 0.0)?;
    ensure!(on_disk > 0.0, "nothing written to the disk tier");
    s.restart()?;
    let r = s.get("/a")?;
    r.expect(200, "persisted")?.expect_hit()?;
    ensure!(
        r.age().is_some(),
        "a hit from disk carries Age: {}",
        r.show()
    );
    ensure!(
        s.origin_count("/a")? == 1,
        "the restarted edge asked the origin"
    );
    ensure!(
        s.metric("keyless_edge_cache_read_seconds_count", &[("tier", "disk")])? == 1.0,
        "the disk read was not timed"
    );
    Ok(())
}

#[test]
fn large_body_is_streamed_to_the_client_while_it_is_stored() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/big",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .body_bytes(200_000)
            .body_delay_ms(1000)],
    )?;
    let http = s.http_addr();
    let r = raw_get(http, SITE, "/big", None)?;
    ensure!(r.status == 200, "status {}: {}", r.status, r.head);
    ensure!(
        r.body == pattern_body(200_000),
        "body of {} bytes differs from the origin's",
        r.body.len()
    );
    let ttfb = r.first_body_byte.unwrap_or(r.total);
    ensure!(
        ttfb < Duration::from_millis(600) && r.total >= Duration::from_millis(900),
        "the first body bytes came after {ttfb:?} (whole body {:?}): not streamed",
        r.total
    );
    let hit = s.req("/big").plain().send()?;
    ensure!(
        hit.cs().hit() && hit.body == pattern_body(200_000),
        "the streamed body was not stored: {}",
        hit.show()
    );
    Ok(())
}

#[test]
fn client_disconnect_mid_body_does_not_corrupt_the_cache() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/big",
        &[Scripted::new(200)
            .header("Cache-Control", "max-age=60")
            .body_bytes(300_000)
            .body_delay_ms(600)],
    )?;
    let partial = raw_get(s.http_addr(), SITE, "/big", Some(10_000))?;
    ensure!(partial.status == 200, "status {}", partial.status);
    sleep_ms(800);
    let expected = pattern_body(300_000);
    for _ in 0..2 {
        let r = s.req("/big").plain().send()?;
        ensure!(
            r.status == 200 && r.exit_code == Some(0) && r.body == expected,
            "after a client went away, the body is {} bytes, not the origin's 300000: {}",
            r.body.len(),
            r.show()
        );
    }
    Ok(())
}

#[test]
fn origin_failure_mid_body_is_not_stored() -> Result<()> {
    let s = default_stack()?;
    s.script(
        "/big",
        &[
            Scripted::new(200)
                .header("Cache-Control", "max-age=60")
                .body_bytes(100_000)
                .fail_mid_body(),
            Scripted::new(200)
                .header("Cache-Control", "max-age=60")
                .body_bytes(100_000),
        ],
    )?;
    let expected = pattern_body(100_000);
    let first = s.req("/big").plain().send()?;
    ensure!(
        first.exit_code != Some(0) || first.body != expected,
        "the failed transfer looked complete: {}",
        first.show()
    );
    sleep_ms(200);
    let second = s.req("/big").plain().send()?;
    ensure!(
        second.status == 200 && second.exit_code == Some(0) && second.body == expected,
        "after an origin failure mid-body: {}",
        second.show()
    );
    ensure!(
        !second.cs().hit() && s.origin_count("/big")? == 2,
        "a truncated body was stored: {}",
        second.show()
    );
    Ok(())
}

#[test]
fn metrics_count_lookups_and_stored_bytes() -> Result<()> {
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "payload")])?;
    s.get("/a")?.expect_stored()?;
    s.get("/a")?.expect_hit()?;
    s.get("/a")?.expect_hit()?;
    let m = s.s.edge.metrics_text()?;
    let sum = |name: &str, labels: &[(&str, &str)]| keyless_tests::metric_sum(&m, name, labels);
    ensure!(
        sum("keyless_edge_cache_lookups_total", &[("result", "hit")]) >= 2.0,
        "hits not counted:\n{m}"
    );
    ensure!(
        sum("keyless_edge_cache_lookups_total", &[("result", "miss")]) >= 1.0,
        "misses not counted:\n{m}"
    );
    ensure!(
        sum("keyless_edge_cache_bytes", &[("tier", "memory")]) > 0.0,
        "stored bytes not reported:\n{m}"
    );
    ensure!(
        m.contains("keyless_edge_cache_evictions") && m.contains("keyless_edge_cache_coalesced"),
        "eviction and coalescing counters missing:\n{m}"
    );
    s.get("/a")?.expect_hit()?;
    let hits = s.metric("keyless_edge_cache_lookups_total", &[("result", "hit")])?;
    ensure!(hits >= 3.0, "the hit counter did not increase: {hits}");
    Ok(())
}

#[test]
fn coalesced_waiters_get_their_own_variant() -> Result<()> {
    let s = default_stack()?;
    // /echo shows the request's header fields; the response varies on the language.
    let path = "/echo?sleep=600&cc=max-age%3D60&h=Vary:Accept-Language";
    let answers: Vec<(String, Resp)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let lang = if i % 2 == 0 { "en" } else { "fr" };
                let s = &s;
                scope.spawn(move || -> Result<(String, Resp)> {
                    let r = s
                        .req(path)
                        .plain()
                        .header(&format!("Accept-Language: {lang}"))
                        .send()?;
                    Ok((lang.to_owned(), r))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a request thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    for (lang, r) in &answers {
        ensure!(
            r.status == 200 && r.text().contains(&format!("accept-language: {lang}\n")),
            "a request for {lang} got another variant: {}",
            r.show()
        );
    }
    let seen = s.origin_count("/echo")?;
    ensure!(
        (2..=8).contains(&seen),
        "the origin saw {seen} requests for 2 variants"
    );
    Ok(())
}

#[test]
fn coalesced_waiters_survive_the_first_client_going_away() -> Result<()> {
    use std::io::Write;
    let s = default_stack()?;
    s.script("/a", &[ok("max-age=60", "slow body").delay(800)])?;
    let mut first = std::net::TcpStream::connect(s.http_addr())?;
    write!(first, "GET /a HTTP/1.1\r\nHost: {SITE}\r\n\r\n")?;
    s.s.origin
        .wait_for_requests("/a", 1, Duration::from_secs(2))?;
    let answers = std::thread::scope(|scope| {
        let waiters = scope.spawn(|| concurrent_gets(&s, "/a", 3));
        sleep_ms(200);
        // The client whose miss the others wait for goes away.
        drop(first);
        waiters.join().expect("the waiting requests panicked")
    })?;
    for r in &answers {
        r.expect(200, "slow body")?;
    }
    // The fetch the others wait for should outlive its client (or hand over to one
    // waiter): not one origin request per waiter.
    ensure!(
        s.origin_count("/a")? <= 2,
        "after the first client went away, the origin saw {} requests for 4 clients",
        s.origin_count("/a")?
    );
    s.req("/a")
        .plain()
        .send()?
        .expect(200, "slow body")?
        .expect_hit()?;
    Ok(())
}

#[test]
fn disk_tier_keeps_every_variant_across_a_restart() -> Result<()> {
    let mut s = cache_stack(|c| c.cache_option("disk_dir", "cache-disk"))?;
    s.script(
        "/a",
        &[
            ok("max-age=60", "english").header("Vary", "Accept-Language"),
            ok("max-age=60", "french").header("Vary", "Accept-Language"),
        ],
    )?;
    s.req("/a")
        .header("Accept-Language: en")
        .send()?
        .expect(200, "english")?;
    s.req("/a")
        .header("Accept-Language: fr")
        .send()?
        .expect(200, "french")?;
    s.wait_disk_objects(2)?;
    s.restart()?;
    for (lang, body) in [("fr", "french"), ("en", "english")] {
        s.req("/a")
            .header(&format!("Accept-Language: {lang}"))
            .send()?
            .expect(200, body)?
            .expect_hit()?;
    }
    ensure!(
        s.origin_count("/a")? == 2,
        "a variant was lost in the restart"
    );
    Ok(())
}

#[test]
fn corrupt_disk_entries_are_misses_not_failures() -> Result<()> {
    let mut s = cache_stack(|c| c.cache_option("disk_dir", "cache-disk"))?;
    s.script("/a", &[ok("max-age=60", "intact")])?;
    s.get("/a")?.expect(200, "intact")?;
    s.wait_disk_objects(1)?;
    let mut damaged = 0;
    s.restart_with(|dir| {
        let mut stack = vec![dir.join("cache-disk")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let path = e?.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    // Keep the length, scramble the second half.
                    let mut bytes = std::fs::read(&path)?;
                    let half = bytes.len() / 2;
                    for b in &mut bytes[half..] {
                        *b ^= 0x5a;
                    }
                    std::fs::write(&path, bytes)?;
                    damaged += 1;
                }
            }
        }
        Ok(())
    })?;
    ensure!(damaged >= 1, "no file found in the disk tier");
    let r = s.get("/a")?;
    r.expect(200, "intact")?;
    s.get("/a")?.expect(200, "intact")?;
    ensure!(
        s.s.edge.is_running(),
        "the edge died on a corrupt disk entry"
    );
    s.s.edge.assert_no_panic();
    Ok(())
}

#[test]
fn coalesce_timeout_bounds_the_wait_for_another_request() -> Result<()> {
    let s = cache_stack(|c| c.cache_option("coalesce_timeout", "200ms"))?;
    s.script("/a", &[ok("max-age=60", "slow body").delay(1000)])?;
    let answers = concurrent_gets(&s, "/a", 3)?;
    for r in &answers {
        r.expect(200, "slow body")?;
    }
    // The waiters gave up after 200 ms and asked the origin themselves.
    ensure!(
        s.origin_count("/a")? >= 2,
        "with coalesce_timeout = 200ms, waiters still waited 1 s for the first request"
    );
    Ok(())
}
