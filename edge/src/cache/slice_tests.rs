//! Slice-based caching ([`super::super::slice`]) against the fake origin.

use bytes::Bytes;

use super::testkit::{Harness, Reply};

const SLICE: u64 = 64 << 10;
/// Three whole slices and part of a fourth.
const LEN: usize = 200_000;

fn slicing() -> Harness {
    Harness::with(|_| {}, |site| site.slice_bytes = SLICE)
}

fn body(n: usize, seed: u8) -> Bytes {
    (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
}

fn object(etag: &str, seed: u8) -> Reply {
    Reply::ok("max-age=600", "")
        .header("etag", etag)
        .body(body(LEN, seed))
        .ranges()
}

/// The `Range` of each request the origin got for `path`.
fn ranges(h: &Harness, path: &str) -> Vec<String> {
    h.seen(path)
        .iter()
        .map(|s| s.header("range").unwrap_or("-").to_owned())
        .collect()
}

#[track_caller]
fn same(got: &Bytes, want: &Bytes) {
    assert!(
        got == want,
        "body of {} bytes differs from the {} expected",
        got.len(),
        want.len()
    );
}

#[tokio::test]
async fn a_whole_object_is_fetched_and_stored_in_slices() {
    let h = slicing();
    h.script("/v", vec![object("\"a\"", 0)]);
    let first = h.get("/v").await;
    assert_eq!(first.status, 200);
    same(&first.body, &body(LEN, 0));
    assert_eq!(first.header("content-length"), Some("200000"));
    assert_eq!(first.header("content-range"), None);
    assert_eq!(
        ranges(&h, "/v"),
        [
            "bytes=0-65535",
            "bytes=65536-131071",
            "bytes=131072-196607",
            "bytes=196608-262143"
        ]
    );
    let again = h.get("/v").await;
    same(&again.body, &body(LEN, 0));
    assert!(again.cs().contains("hit"), "{}", again.cs());
    assert_eq!(h.calls("/v"), 4, "every slice was stored");
    let m = h.cache.metrics();
    let stored = m
        .cache_slice_fetches
        .get_or_create(&crate::metrics::CacheLabels { result: "stored" })
        .get();
    assert_eq!(stored, 4);
}

#[tokio::test]
async fn a_range_request_fetches_only_the_slices_it_covers() {
    let h = slicing();
    h.script("/v", vec![object("\"a\"", 0)]);
    let part = h
        .call("GET", "/v", &[("range", "bytes=190000-199999")])
        .await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some("bytes 190000-199999/200000")
    );
    same(&part.body, &body(LEN, 0).slice(190_000..));
    assert_eq!(
        ranges(&h, "/v"),
        ["bytes=131072-196607", "bytes=196608-262143"]
    );
    // A suffix range on a cold URL: the length from a HEAD, then its slice only.
    h.script("/s", vec![object("\"a\"", 0)]);
    let tail = h.call("GET", "/s", &[("range", "bytes=-100")]).await;
    assert_eq!(tail.status, 206);
    same(&tail.body, &body(LEN, 0).slice(LEN - 100..));
    let seen: Vec<_> = h.seen("/s").iter().map(|s| s.method.to_string()).collect();
    assert_eq!(seen, ["HEAD", "GET"]);
    assert_eq!(ranges(&h, "/s")[1], "bytes=196608-262143");
    // The whole object later: the stored slices plus the missing ones.
    let whole = h.get("/v").await;
    same(&whole.body, &body(LEN, 0));
    assert_eq!(
        ranges(&h, "/v")[2..],
        ["bytes=0-65535", "bytes=65536-131071"],
        "only the missing slices"
    );
    // Out of the object: 416 with its length.
    let beyond = h.call("GET", "/v", &[("range", "bytes=300000-")]).await;
    assert_eq!(beyond.status, 416);
    assert_eq!(beyond.header("content-range"), Some("bytes */200000"));
}

#[tokio::test]
async fn an_object_changed_between_slices_is_cut_then_fetched_anew() {
    let h = slicing();
    // The first slice is of version a, every later answer of version b.
    h.script("/v", vec![object("\"a\"", 0), object("\"b\"", 0x55)]);
    let cut = h.try_send(h.request("GET", "/v", &[])).await;
    assert!(
        cut.is_err(),
        "a body mixed from two versions was served whole"
    );
    let mismatches = h
        .cache
        .metrics()
        .cache_slice_fetches
        .get_or_create(&crate::metrics::CacheLabels { result: "mismatch" })
        .get();
    assert_eq!(mismatches, 1);
    let clean = h.get("/v").await;
    same(&clean.body, &body(LEN, 0x55));
    assert_eq!(clean.header("etag"), Some("\"b\""));
}

#[tokio::test]
async fn an_origin_without_ranges_is_served_and_stored_whole() {
    let h = slicing();
    h.script("/w", vec![Reply::ok("max-age=600", "").body(body(LEN, 0))]);
    let first = h.call("GET", "/w", &[("range", "bytes=0-9")]).await;
    assert_eq!(first.status, 200, "the origin's whole answer");
    same(&first.body, &body(LEN, 0));
    let hit = h.call("GET", "/w", &[("range", "bytes=0-9")]).await;
    assert_eq!(hit.status, 206);
    same(&hit.body, &body(LEN, 0).slice(..10));
    assert!(hit.cs().contains("hit"), "{}", hit.cs());
    assert_eq!(h.calls("/w"), 1);
}

#[tokio::test]
async fn conditionals_are_answered_from_the_first_slice() {
    let h = slicing();
    h.script("/v", vec![object("\"a\"", 0)]);
    h.get("/v").await;
    let not_modified = h.call("GET", "/v", &[("if-none-match", "\"a\"")]).await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(h.calls("/v"), 4);
}
