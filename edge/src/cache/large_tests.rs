//! Objects larger than `max_object_bytes`, streamed to the disk tier while they are
//! served and read back from it block by block ([`super::super::spool`],
//! [`super::super::blocks`]).

use bytes::Bytes;

use super::testkit::{Harness, Reply};

/// The memory bound of these tests: anything larger streams to disk.
const MEMORY_MAX: u64 = 64 << 10;

fn large_harness() -> Harness {
    Harness::with_disk(|c| c.max_object_bytes = MEMORY_MAX)
}

/// A body of `n` bytes that differs at every offset modulo 251.
fn body(n: usize) -> Bytes {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Whether `got` is `want`, told by lengths and the first difference (not dumped).
#[track_caller]
fn same(got: &Bytes, want: &Bytes) {
    if got != want {
        let at = got.iter().zip(want.iter()).position(|(a, b)| a != b);
        panic!(
            "body of {} bytes, expected {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

/// Large objects streamed to disk with `result` (`stored`, `dropped`).
fn streamed(h: &Harness, result: &'static str) -> u64 {
    h.cache
        .metrics()
        .cache_disk_streamed
        .get_or_create(&crate::metrics::CacheLabels { result })
        .get()
}

/// Block reads so far, from the rendered metrics.
fn block_reads(h: &Harness) -> u64 {
    let text = h.cache.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix("keyless_edge_cache_disk_block_read_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `path` is a hit (probed with `only-if-cached`); the hit.
async fn stored(h: &Harness, path: &str) -> super::testkit::Got {
    let hit = h
        .eventually(|| async { h.cached(path, &[]).await.status == 200 })
        .await;
    assert!(hit, "{path} never became a hit");
    h.cached(path, &[]).await
}

#[tokio::test]
async fn a_large_object_streams_to_disk_and_is_served_from_it() {
    let h = large_harness();
    let data = body(3 * (1 << 20) + 5);
    h.script(
        "/big",
        vec![Reply::ok("max-age=600", "").body(data.clone())],
    );
    let first = h.get("/big").await;
    same(&first.body, &data);
    assert!(first.cs().contains("stored"), "{}", first.cs());
    let hit = stored(&h, "/big").await;
    same(&hit.body, &data);
    assert_eq!(hit.header("content-length"), Some("3145733"));
    assert_eq!(h.calls("/big"), 1);
    // Never in memory: the memory tier holds nothing of it.
    let memory = h.cache.tiers[0].usage();
    assert_eq!(memory.objects, 0, "{memory:?}");
    let m = h.cache.metrics();
    assert!(m.served_bytes("disk").get() >= 2 * data.len() as u64);
    assert_eq!(m.cache_disk_streams.get(), 0);
    // One committed file, no temp file left.
    assert_eq!(h.disk_files().len(), 1, "{:?}", h.disk_files());
}

#[tokio::test]
async fn a_body_of_unknown_length_moves_to_disk_when_it_outgrows_memory() {
    let h = large_harness();
    let data = body(300_000);
    let reply = Reply::ok("max-age=600", "")
        .body(data.clone())
        .chunked(8192, 0);
    h.script("/chunked", vec![reply]);
    same(&h.get("/chunked").await.body, &data);
    same(&stored(&h, "/chunked").await.body, &data);
    assert_eq!(h.cache.tiers[0].usage().objects, 0);
    // What was collected in memory before the switch went back to the budget.
    assert!(h.cache.reserve_collecting(h.cache.collect_budget));
}

#[tokio::test]
async fn range_hits_read_only_the_blocks_they_need() {
    let h = large_harness();
    let n = 3 * (1 << 20) + 5;
    let data = body(n);
    h.script("/r", vec![Reply::ok("max-age=600", "").body(data.clone())]);
    h.get("/r").await;
    stored(&h, "/r").await;
    let blocks = || block_reads(&h);
    let before = blocks();
    // The last 5 bytes are the whole last block.
    let tail = h.call("GET", "/r", &[("range", "bytes=-5")]).await;
    assert_eq!(tail.status, 206);
    assert!(tail.body == data.slice(n - 5..));
    assert_eq!(
        tail.header("content-range"),
        Some("bytes 3145728-3145732/3145733")
    );
    assert_eq!(blocks() - before, 1, "the last 5 bytes come from one block");
    // A range across a block boundary, and several ranges in one answer.
    let across = h
        .call("GET", "/r", &[("range", "bytes=1048570-1048589")])
        .await;
    same(&across.body, &data.slice(1_048_570..1_048_590));
    let multi = h
        .call("GET", "/r", &[("range", "bytes=0-9,2097150-2097159")])
        .await;
    assert_eq!(multi.status, 206);
    let text = multi.body.clone();
    assert!(text.windows(10).any(|w| w == &data[..10]));
    assert!(text.windows(10).any(|w| w == &data[2_097_150..2_097_160]));
}

#[tokio::test]
async fn requests_coalesced_on_a_large_object_read_the_growing_file() {
    let h = large_harness();
    let data = body(1 << 20);
    // 64 chunks 20 ms apart: about 1.3 s of transfer.
    let reply = Reply::ok("max-age=600", "")
        .header("content-length", "1048576")
        .body(data.clone())
        .chunked(16 << 10, 20);
    h.script("/slow", vec![reply]);
    let leader = {
        let h = h.clone();
        tokio::spawn(async move { h.get("/slow").await })
    };
    h.wait_calls("/slow", 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let follower = h.get("/slow").await;
    let leader = leader.await.unwrap();
    same(&leader.body, &data);
    same(&follower.body, &data);
    assert!(follower.cs().contains("collapsed"), "{}", follower.cs());
    assert_eq!(h.calls("/slow"), 1, "one origin request for both");
    same(&stored(&h, "/slow").await.body, &data);
}

#[tokio::test]
async fn objects_over_the_disk_bound_or_cut_short_are_not_stored() {
    let h = Harness::with_disk(|c| {
        c.max_object_bytes = MEMORY_MAX;
        c.disk_max_object_bytes = 200_000;
    });
    // Declared too large: passes through.
    h.script(
        "/huge",
        vec![Reply::ok("max-age=600", "").body(body(300_000))],
    );
    let got = h.get("/huge").await;
    assert_eq!(got.body.len(), 300_000);
    assert!(got.cs().contains("detail=too-large"), "{}", got.cs());
    // Unknown length, grows past the bound: dropped on the way.
    let reply = Reply::ok("max-age=600", "")
        .body(body(300_000))
        .chunked(8192, 0);
    h.script("/grows", vec![reply]);
    assert_eq!(h.get("/grows").await.body.len(), 300_000);
    for path in ["/huge", "/grows"] {
        assert_eq!(h.cached(path, &[]).await.status, 504, "{path} not stored");
    }
    assert!(
        h.eventually(|| async { streamed(&h, "dropped") == 1 })
            .await
    );
    assert!(h.disk_files().is_empty(), "{:?}", h.disk_files());
}

#[tokio::test]
async fn a_large_object_refreshed_by_304_keeps_its_body() {
    let h = large_harness();
    let data = body(200_000);
    h.script(
        "/v",
        vec![
            Reply::ok("max-age=60", "")
                .header("etag", "\"v1\"")
                .header("age", "120")
                .body(data.clone()),
            Reply::new(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=600"),
        ],
    );
    h.get("/v").await;
    assert!(h.eventually(|| async { streamed(&h, "stored") == 1 }).await);
    let revalidated = h.get("/v").await;
    same(&revalidated.body, &data);
    assert!(
        revalidated.cs().contains("fwd-status=304"),
        "{}",
        revalidated.cs()
    );
    let hit = stored(&h, "/v").await;
    same(&hit.body, &data);
    assert!(hit.cs().contains("hit"), "{}", hit.cs());
    assert_eq!(h.calls("/v"), 2);
}

#[tokio::test]
async fn a_range_miss_fills_a_large_object_to_disk_in_the_background() {
    let h = large_harness();
    let data = body(300_000);
    h.script(
        "/video",
        vec![Reply::ok("max-age=600", "").body(data.clone()).ranges()],
    );
    let part = h.call("GET", "/video", &[("range", "bytes=0-99")]).await;
    assert_eq!(part.status, 206);
    same(&part.body, &data.slice(..100));
    // The whole object, fetched once in the background, streamed to disk.
    assert!(h.eventually(|| async { streamed(&h, "stored") == 1 }).await);
    let tail = h.call("GET", "/video", &[("range", "bytes=-10")]).await;
    assert_eq!(tail.status, 206);
    same(&tail.body, &data.slice(300_000 - 10..));
    assert!(tail.cs().contains("hit"), "{}", tail.cs());
    assert_eq!(h.calls("/video"), 2, "the range, then one fill");
}
