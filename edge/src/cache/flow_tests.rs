//! The cache flow driven in-process through `Cache::handle`, against a fake origin
//! ([`testkit`]): what reaches the origin, with which conditionals, and the
//! `Cache-Status` every answer gets. The end-to-end tests (`tests/it/cache_*.rs`)
//! cover the same behaviours through real processes; these run in milliseconds.
//!
//! Objects are made stale by the origin's `Age` (`max-age=60` with `Age: 120`), never
//! by waiting; background work is awaited by polling with a bound.

#[path = "testkit.rs"]
mod testkit;

#[path = "large_tests.rs"]
mod large_tests;

#[path = "slice_tests.rs"]
mod slice_tests;

use std::time::{Duration, Instant};

use testkit::{connect_timeout, Harness, Reply};

/// Stored stale at once: 60 s of freshness, already 120 s old.
const STALE: &str = "max-age=60";

/// Header fields, as (name, value).
type Fields = &'static [(&'static str, &'static str)];

fn stale(cache_control: &str, body: &str) -> Reply {
    Reply::ok(cache_control, body).header("age", "120")
}

#[tokio::test]
async fn a_miss_is_stored_and_the_next_request_is_a_hit() {
    let h = Harness::new();
    h.script("/a", vec![Reply::ok("max-age=60", "payload")]);

    let first = h.get("/a").await;
    assert_eq!((first.status, first.text()), (200, "payload"));
    assert_eq!(first.cs(), "fwd=uri-miss; stored");
    assert_eq!(first.ttl(), Some(60));

    let second = h.get("/a").await;
    assert_eq!((second.status, second.text()), (200, "payload"));
    assert_eq!(second.cs(), "hit");
    assert!(second.ttl().is_some_and(|t| (59..=60).contains(&t)));
    assert!(second.header("age").is_some(), "a hit has Age: {second:?}");
    assert_eq!(h.calls("/a"), 1);
}

#[tokio::test]
async fn the_origin_age_counts_towards_the_age_served() {
    let h = Harness::new();
    h.script(
        "/a",
        vec![Reply::ok("max-age=600", "a").header("age", "100")],
    );
    h.get("/a").await;
    let hit = h.get("/a").await;
    assert_eq!(hit.cs(), "hit");
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!((100..=101).contains(&age), "Age {age}");
    assert!(hit.ttl().is_some_and(|t| (499..=500).contains(&t)));
}

#[tokio::test]
async fn each_vary_variant_is_stored_and_a_new_one_is_a_vary_miss() {
    let h = Harness::new();
    h.script(
        "/v",
        vec![
            Reply::ok("max-age=60", "en").header("vary", "accept-language"),
            Reply::ok("max-age=60", "fr").header("vary", "accept-language"),
        ],
    );
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];

    let r = h.call("GET", "/v", &en).await;
    assert_eq!((r.text(), r.cs().as_str()), ("en", "fwd=uri-miss; stored"));
    let r = h.call("GET", "/v", &fr).await;
    assert_eq!((r.text(), r.cs().as_str()), ("fr", "fwd=vary-miss; stored"));
    let r = h.call("GET", "/v", &en).await;
    assert_eq!((r.text(), r.cs().as_str()), ("en", "hit"));
    let r = h.call("GET", "/v", &fr).await;
    assert_eq!((r.text(), r.cs().as_str()), ("fr", "hit"));
    assert_eq!(h.calls("/v"), 2);
    let seen = h.seen("/v");
    assert_eq!(seen[1].header("accept-language"), Some("fr"));
}

#[tokio::test]
async fn a_stale_response_is_revalidated_and_refreshed_by_a_304() {
    const LM: &str = "Tue, 01 Jul 2025 10:00:00 GMT";
    // (validators of the stored response, the conditionals the origin must get)
    let cases: [(Fields, Fields); 3] = [
        (&[("etag", "\"v1\"")], &[("if-none-match", "\"v1\"")]),
        (&[("last-modified", LM)], &[("if-modified-since", LM)]),
        (
            &[("etag", "\"v1\""), ("last-modified", LM)],
            &[("if-none-match", "\"v1\""), ("if-modified-since", LM)],
        ),
    ];
    for (validators, conditionals) in cases {
        let h = Harness::new();
        let mut first = stale(STALE, "old").header("x-version", "1");
        for (name, value) in validators {
            first = first.header(name, value);
        }
        let not_modified = Reply::new(304)
            .header("cache-control", "max-age=3600")
            .header("x-version", "2");
        h.script("/a", vec![first, not_modified]);

        let r = h.get("/a").await;
        assert_eq!(r.cs(), "fwd=uri-miss; stored", "{validators:?}");
        let r = h.get("/a").await;
        assert_eq!((r.status, r.text()), (200, "old"), "{validators:?}");
        assert_eq!(
            r.cs(),
            "fwd=stale; fwd-status=304; stored",
            "{validators:?}"
        );
        assert!(r.ttl().is_some_and(|t| t > 3500), "{r:?}");
        assert_eq!(
            r.header("x-version"),
            Some("2"),
            "the 304's fields are merged"
        );

        let seen = h.seen("/a");
        assert_eq!(seen.len(), 2);
        assert!(seen[0].header("if-none-match").is_none());
        for (name, value) in conditionals {
            assert_eq!(seen[1].header(name), Some(*value), "{validators:?}");
        }
        let refreshed = h.get("/a").await;
        assert_eq!((refreshed.text(), refreshed.cs().as_str()), ("old", "hit"));
        assert_eq!(refreshed.header("x-version"), Some("2"));
        assert_eq!(h.calls("/a"), 2);
    }
}

#[tokio::test]
async fn a_revalidation_answered_200_replaces_the_stored_response() {
    let h = Harness::new();
    h.script(
        "/a",
        vec![
            stale(STALE, "old").header("etag", "\"v1\""),
            Reply::ok("max-age=3600", "new").header("etag", "\"v2\""),
        ],
    );
    h.get("/a").await;
    let r = h.get("/a").await;
    assert_eq!(r.text(), "new");
    assert_eq!(r.cs(), "fwd=stale; fwd-status=200; stored");
    let r = h.get("/a").await;
    assert_eq!((r.text(), r.cs().as_str()), ("new", "hit"));
    assert_eq!(h.calls("/a"), 2);
}

#[tokio::test]
async fn a_304_cookie_goes_to_its_client_and_is_not_merged() {
    let h = Harness::new();
    h.script(
        "/a",
        vec![
            stale(STALE, "old").header("etag", "\"v1\""),
            Reply::new(304)
                .header("cache-control", "max-age=3600")
                .header("set-cookie", "session=one"),
        ],
    );
    h.get("/a").await;
    let revalidated = h.get("/a").await;
    assert_eq!(revalidated.cs(), "fwd=stale; fwd-status=304; stored");
    assert_eq!(revalidated.header("set-cookie"), Some("session=one"));
    let hit = h.get("/a").await;
    assert_eq!(hit.cs(), "hit");
    assert_eq!(hit.header("set-cookie"), None);
}

#[tokio::test]
async fn request_no_cache_revalidates_a_fresh_response() {
    let h = Harness::new();
    h.script(
        "/a",
        vec![
            Reply::ok("max-age=600", "a").header("etag", "\"v1\""),
            Reply::new(304).header("cache-control", "max-age=600"),
        ],
    );
    h.get("/a").await;
    let r = h.call("GET", "/a", &[("cache-control", "no-cache")]).await;
    assert_eq!((r.status, r.text()), (200, "a"));
    assert_eq!(r.cs(), "fwd=request; fwd-status=304; stored");
    assert_eq!(h.seen("/a")[1].header("if-none-match"), Some("\"v1\""));
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_at_once_and_refreshes_once() {
    // The response's own directive, then the operator's default.
    let cases = [
        (None, "max-age=60, stale-while-revalidate=600"),
        (Some(Duration::from_secs(600)), STALE),
    ];
    for (default, cache_control) in cases {
        let h = Harness::with(|c| c.stale_while_revalidate = default, |_| {});
        h.script(
            "/a",
            vec![
                stale(cache_control, "old"),
                Reply::ok("max-age=3600", "new").delay_ms(150),
            ],
        );
        h.get("/a").await;

        let started = Instant::now();
        let r = h.get("/a").await;
        assert!(
            started.elapsed() < Duration::from_millis(150),
            "the stale answer waited for the origin"
        );
        assert_eq!((r.status, r.text()), (200, "old"));
        assert_eq!(
            r.cs(),
            "hit; detail=stale-while-revalidate",
            "{cache_control}"
        );
        assert!(r.ttl().is_some_and(|t| t <= 0));
        // More requests while the refresh runs start no other refresh.
        for _ in 0..3 {
            assert_eq!(h.get("/a").await.text(), "old");
        }
        h.wait_calls("/a", 2).await;
        let refreshed = h.eventually(|| async { h.get("/a").await.text() == "new" });
        assert!(
            refreshed.await,
            "the refreshed response never replaced the stale one"
        );
        let r = h.get("/a").await;
        assert_eq!((r.text(), r.cs().as_str()), ("new", "hit"));
        assert_eq!(h.calls("/a"), 2, "{cache_control}");
        assert!(h.seen("/a")[1].header("cache-control").is_none());
    }
}

#[tokio::test]
async fn stale_if_error_hides_a_failing_origin() {
    // (operator default, stored Cache-Control, origin's answer, client status,
    // Cache-Status)
    let with_sie = "max-age=60, stale-if-error=600";
    let sie_default = Some(Duration::from_secs(600));
    let cases = [
        (
            None,
            with_sie,
            Reply::fail(connect_timeout),
            200,
            "fwd=stale; fwd-status=502; detail=stale-if-error",
        ),
        (
            None,
            with_sie,
            Reply::new(503).body("down"),
            200,
            "fwd=stale; fwd-status=503; detail=stale-if-error",
        ),
        (
            sie_default,
            STALE,
            Reply::new(503).body("down"),
            200,
            "fwd=stale; fwd-status=503; detail=stale-if-error",
        ),
        (
            sie_default,
            STALE,
            Reply::fail(connect_timeout),
            200,
            "fwd=stale; fwd-status=502; detail=stale-if-error",
        ),
        // Without stale-if-error the failure reaches the client.
        (
            None,
            STALE,
            Reply::new(503).body("down"),
            503,
            "fwd=stale; fwd-status=503",
        ),
        (None, STALE, Reply::fail(connect_timeout), 502, "fwd=stale"),
        // must-revalidate forbids stale serving.
        (
            None,
            "max-age=60, must-revalidate, stale-if-error=600",
            Reply::new(503).body("down"),
            503,
            "fwd=stale; fwd-status=503",
        ),
    ];
    for (default, cache_control, failure, status, cs) in cases {
        let h = Harness::with(|c| c.stale_if_error = default, |_| {});
        h.script("/a", vec![stale(cache_control, "old"), failure]);
        h.get("/a").await;
        let r = h.get("/a").await;
        assert_eq!(r.status, status, "{cache_control} {default:?}: {r:?}");
        assert_eq!(r.cs(), cs, "{cache_control} {default:?}");
        if status == 200 {
            assert_eq!(r.text(), "old");
            assert!(r.ttl().is_some_and(|t| t <= 0));
        }
        assert_eq!(h.calls("/a"), 2);
    }
}

#[tokio::test]
async fn concurrent_misses_are_coalesced_into_one_origin_fetch() {
    const N: usize = 8;
    let h = Harness::new();
    h.script("/a", vec![Reply::ok("max-age=60", "slow").delay_ms(100)]);
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.get("/a").await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!((r.status, r.text()), (200, "slow"));
        statuses.push(r.cs());
    }
    assert_eq!(h.calls("/a"), 1, "{statuses:?}");
    statuses.sort();
    let mut expected = vec!["fwd=uri-miss; stored".to_owned()];
    expected.extend(vec!["hit; collapsed".to_owned(); N - 1]);
    assert_eq!(statuses, expected);
}

#[tokio::test]
async fn concurrent_misses_of_an_uncacheable_url_each_reach_the_origin() {
    const N: usize = 4;
    let h = Harness::new();
    h.script("/a", vec![Reply::ok("no-store", "mine").delay_ms(20)]);
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.get("/a").await })
        })
        .collect();
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!((r.text(), r.cs().as_str()), ("mine", "fwd=uri-miss"));
    }
    assert_eq!(h.calls("/a"), N);
}

/// A 100-byte body whose byte `i` is `i`.
fn hundred_bytes() -> Vec<u8> {
    (0..100u8).collect()
}

#[tokio::test]
async fn a_range_miss_is_forwarded_and_fills_the_cache_in_the_background() {
    let h = Harness::new();
    let body = hundred_bytes();
    h.script(
        "/r",
        vec![Reply::ok("max-age=600", "").body(body.clone()).ranges()],
    );
    let r = h.call("GET", "/r", &[("range", "bytes=0-9")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 0-9/100"));
    assert_eq!(r.body, body[..10]);
    assert_eq!(r.cs(), "fwd=uri-miss");

    // The range went as it was, then one full GET without it.
    h.wait_calls("/r", 2).await;
    let seen = h.seen("/r");
    assert_eq!(seen[0].header("range"), Some("bytes=0-9"));
    assert_eq!(seen[1].header("range"), None);
    assert_eq!(seen[1].method, http::Method::GET);

    let range = [("range", "bytes=10-19")];
    let filled = h.eventually(|| async { h.cached("/r", &range).await.status == 206 });
    assert!(filled.await, "the background fill never stored the object");
    let r = h.call("GET", "/r", &range).await;
    assert_eq!((r.status, r.cs().as_str()), (206, "hit"));
    assert_eq!(r.header("content-range"), Some("bytes 10-19/100"));
    assert_eq!(r.body, body[10..20]);
    let whole = h.get("/r").await;
    assert_eq!((whole.status, whole.cs().as_str()), (200, "hit"));
    assert_eq!(whole.body, body);
    assert_eq!(h.calls("/r"), 2);
}

#[tokio::test]
async fn a_range_miss_of_an_object_too_large_to_store_fetches_no_whole_body() {
    let h = Harness::with(|c| c.max_object_bytes = 50, |_| {});
    h.script(
        "/r",
        vec![Reply::ok("max-age=600", "").body(hundred_bytes()).ranges()],
    );
    for range in ["bytes=0-9", "bytes=10-19"] {
        let r = h.call("GET", "/r", &[("range", range)]).await;
        assert_eq!((r.status, r.cs().as_str()), (206, "fwd=uri-miss"));
    }
    // Give a fill (which must not come) the time to start.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = h.seen("/r");
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.header("range").is_some()));
}

#[tokio::test]
async fn successful_unsafe_methods_invalidate_the_stored_response() {
    // (method, origin status, whether the stored GET goes)
    let cases = [
        ("POST", 200, true),
        ("PUT", 201, true),
        ("DELETE", 204, true),
        ("PATCH", 303, true),
        ("POST", 500, false),
        ("POST", 404, false),
    ];
    for (method, status, invalidates) in cases {
        let h = Harness::new();
        h.script(
            "/a",
            vec![Reply::ok("max-age=600", "a"), Reply::new(status)],
        );
        h.get("/a").await;
        let r = h.call(method, "/a", &[]).await;
        assert_eq!((r.status, r.cs().as_str()), (status, "fwd=method"));
        assert_eq!(h.seen("/a")[1].method.as_str(), method);
        h.script("/a", vec![Reply::ok("max-age=600", "b")]);
        let after = h.get("/a").await;
        let expected = if invalidates {
            ("b", "fwd=uri-miss; stored")
        } else {
            ("a", "hit")
        };
        assert_eq!(
            (after.text(), after.cs().as_str()),
            expected,
            "{method} answered {status}"
        );
    }
}

#[tokio::test]
async fn unsafe_methods_invalidate_location_and_content_location_on_the_same_host() {
    // (field, value, whether the stored /b goes)
    let cases = [
        ("location", "/b", true),
        ("location", "https://example.com/b", true),
        ("location", "https://EXAMPLE.com/b", true),
        ("content-location", "/b", true),
        ("location", "https://other.test/b", false),
        ("location", "http://example.com/b", false),
        ("location", "/c", false),
    ];
    for (field, value, invalidates) in cases {
        let h = Harness::new();
        h.script("/b", vec![Reply::ok("max-age=600", "b")]);
        h.script("/form", vec![Reply::new(201).header(field, value)]);
        h.get("/b").await;
        let r = h.call("POST", "/form", &[]).await;
        assert_eq!((r.status, r.cs().as_str()), (201, "fwd=method"));
        let after = h.get("/b").await;
        let expected = if invalidates {
            "fwd=uri-miss; stored"
        } else {
            "hit"
        };
        assert_eq!(after.cs(), expected, "{field}: {value}");
    }
}

#[tokio::test]
async fn purge_url_removes_the_stored_response() {
    let h = Harness::new();
    h.script("/a", vec![Reply::ok("max-age=600", "a")]);
    h.get("/a").await;
    assert_eq!(h.cache.purge_url("https://example.com/a"), 1);
    assert_eq!(h.get("/a").await.cs(), "fwd=uri-miss; stored");
    assert_eq!(h.calls("/a"), 2);
}

#[tokio::test]
async fn only_if_cached_answers_504_on_a_miss_without_asking_the_origin() {
    let h = Harness::new();
    h.script("/a", vec![Reply::ok("max-age=600", "a")]);
    let r = h.cached("/a", &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.cs(), "fwd=uri-miss; detail=only-if-cached");
    assert_eq!(h.calls("/a"), 0);
    h.get("/a").await;
    let r = h.cached("/a", &[]).await;
    assert_eq!((r.status, r.text(), r.cs().as_str()), (200, "a", "hit"));
    assert_eq!(h.calls("/a"), 1);
}

#[tokio::test]
async fn responses_that_must_not_be_stored_are_forwarded_every_time() {
    // (response, request header fields)
    let cases = [
        (Reply::ok("no-store, max-age=600", "x"), &[][..]),
        (Reply::ok("private, max-age=600", "x"), &[]),
        (
            Reply::ok("max-age=600", "x"),
            &[("cache-control", "no-store")],
        ),
        (
            Reply::ok("max-age=600", "x"),
            &[("authorization", "Bearer t")],
        ),
        (
            Reply::ok("max-age=600", "x").header("set-cookie", "id=1"),
            &[],
        ),
        (Reply::ok("max-age=600", "x").header("vary", "*"), &[]),
        // No freshness and no validator: stale on arrival, not worth storing.
        (Reply::new(200).body("x"), &[]),
    ];
    for (reply, request) in cases {
        let h = Harness::new();
        let what = format!("{reply:?} {request:?}");
        h.script("/a", vec![reply]);
        for _ in 0..2 {
            let r = h.call("GET", "/a", request).await;
            assert_eq!(r.text(), "x", "{what}");
            assert_eq!(r.cs(), "fwd=uri-miss", "{what}");
        }
        assert_eq!(h.calls("/a"), 2, "{what}");
    }
}

#[tokio::test]
async fn set_cookie_strip_stores_the_response_without_its_cookie() {
    let h = Harness::with(
        |_| {},
        |s| s.store_set_cookie = crate::config::SetCookiePolicy::Strip,
    );
    h.script(
        "/a",
        vec![Reply::ok("max-age=600", "a").header("set-cookie", "id=1")],
    );
    let first = h.get("/a").await;
    assert_eq!(first.cs(), "fwd=uri-miss; stored");
    assert_eq!(first.header("set-cookie"), Some("id=1"));
    let hit = h.get("/a").await;
    assert_eq!((hit.text(), hit.cs().as_str()), ("a", "hit"));
    assert_eq!(hit.header("set-cookie"), None);
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let h = Harness::new();
    h.script("/a", vec![Reply::ok("max-age=600", "payload")]);
    h.get("/a").await;
    let head = h.call("HEAD", "/a", &[]).await;
    assert_eq!((head.status, head.cs().as_str()), (200, "hit"));
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("7"));
    assert_eq!(h.calls("/a"), 1);
}

#[tokio::test]
async fn a_head_miss_stores_no_empty_body() {
    let h = Harness::new();
    h.script("/a", vec![Reply::ok("max-age=600", "payload")]);
    let head = h.call("HEAD", "/a", &[]).await;
    assert_eq!((head.status, head.cs().as_str()), (200, "fwd=uri-miss"));
    assert_eq!(h.seen("/a")[0].method, http::Method::HEAD);
    let get = h.get("/a").await;
    assert_eq!(
        (get.text(), get.cs().as_str()),
        ("payload", "fwd=uri-miss; stored")
    );
}

#[tokio::test]
async fn client_conditionals_are_answered_from_the_stored_response() {
    const LM: &str = "Tue, 01 Jul 2025 10:00:00 GMT";
    const EARLIER: &str = "Mon, 30 Jun 2025 10:00:00 GMT";
    // (request field, value, status)
    let cases = [
        ("if-none-match", "\"v1\"", 304),
        ("if-none-match", "W/\"v1\"", 304),
        ("if-none-match", "\"v2\"", 200),
        ("if-none-match", "*", 304),
        ("if-modified-since", LM, 304),
        ("if-modified-since", EARLIER, 200),
        ("if-match", "\"v1\"", 200),
        ("if-match", "\"v2\"", 412),
        ("if-unmodified-since", LM, 200),
        ("if-unmodified-since", EARLIER, 412),
    ];
    let h = Harness::new();
    h.script(
        "/a",
        vec![Reply::ok("max-age=600", "a")
            .header("etag", "\"v1\"")
            .header("last-modified", LM)],
    );
    h.get("/a").await;
    for (name, value, status) in cases {
        let r = h.call("GET", "/a", &[(name, value)]).await;
        assert_eq!(
            (r.status, r.cs().as_str()),
            (status, "hit"),
            "{name}: {value}"
        );
        match status {
            200 => assert_eq!(r.text(), "a"),
            304 => {
                assert!(r.body.is_empty());
                assert_eq!(r.header("etag"), Some("\"v1\""));
            }
            _ => {}
        }
    }
    assert_eq!(h.calls("/a"), 1);
}

#[tokio::test]
async fn a_conditional_miss_is_forwarded_as_it_is_and_its_304_not_stored() {
    let h = Harness::new();
    h.script(
        "/a",
        vec![
            Reply::new(304).header("etag", "\"v1\""),
            Reply::ok("max-age=600", "a").header("etag", "\"v1\""),
        ],
    );
    let r = h.call("GET", "/a", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!((r.status, r.cs().as_str()), (304, "fwd=uri-miss"));
    assert_eq!(h.seen("/a")[0].header("if-none-match"), Some("\"v1\""));
    let r = h.get("/a").await;
    assert_eq!((r.status, r.text()), (200, "a"));
    assert_eq!(r.cs(), "fwd=uri-miss; stored");
}

#[tokio::test]
async fn a_site_with_the_cache_disabled_bypasses_it() {
    let h = Harness::with(|_| {}, |s| s.enabled = false);
    h.script("/a", vec![Reply::ok("max-age=600", "a")]);
    for _ in 0..2 {
        assert_eq!(h.get("/a").await.cs(), "fwd=bypass");
    }
    assert_eq!(h.calls("/a"), 2);
}

#[tokio::test]
async fn an_origin_failure_on_a_miss_is_the_short_answer() {
    let h = Harness::new();
    h.script("/a", vec![Reply::fail(connect_timeout)]);
    let r = h.get("/a").await;
    assert_eq!((r.status, r.cs().as_str()), (502, "fwd=uri-miss"));
    assert_eq!(r.text(), "origin connection timed out\n");
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_not_stored() {
    let h = Harness::new();
    h.script(
        "/a",
        vec![Reply::ok("max-age=600", "x").header("content-length", "5")],
    );
    for _ in 0..2 {
        let r = h.get("/a").await;
        assert_eq!(r.text(), "x");
        // Decided before the body streamed; dropped when it ended short.
        assert_eq!(r.cs(), "fwd=uri-miss; stored");
    }
    assert_eq!(h.calls("/a"), 2);
}

#[tokio::test]
async fn only_if_cached_never_revalidates_a_stale_response() {
    let h = Harness::new();
    h.script(
        "/a",
        vec![
            stale(STALE, "old").header("etag", "\"v1\""),
            Reply::new(304).header("cache-control", "max-age=600"),
        ],
    );
    h.get("/a").await;
    let r = h.cached("/a", &[]).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(h.calls("/a"), 1, "only-if-cached reached the origin");
    // A client accepting stale responses gets the stored one.
    let r = h.cached("/a", &[("cache-control", "max-stale")]).await;
    assert_eq!((r.status, r.text()), (200, "old"));
}

#[tokio::test]
async fn a_range_miss_after_a_purge_fills_the_cache_again() {
    let h = Harness::new();
    h.script(
        "/r",
        vec![Reply::ok("max-age=600", "").body(hundred_bytes()).ranges()],
    );
    let range = [("range", "bytes=0-9")];
    for round in 1..=2 {
        let r = h.call("GET", "/r", &range).await;
        assert_eq!((r.status, r.cs().as_str()), (206, "fwd=uri-miss"));
        h.wait_calls("/r", 2 * round).await;
        let filled = h.eventually(|| async { h.cached("/r", &range).await.status == 206 });
        assert!(filled.await, "round {round}: the range miss filled nothing");
        assert_eq!(h.cache.purge_url("https://example.com/r"), 1);
    }
}
