//! Objects of any size: a 1 GiB object streamed through the disk tier, never held in
//! the edge's memory, fetched by two clients at once with one origin request, then
//! served from disk byte for byte.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keyless_tests::blob_range;

use crate::cache_support::{cache_stack, CacheStack};
use crate::edge_support::SITE;

const GIB: u64 = 1 << 30;
/// The edge's peak resident memory allowed while it moves a 1 GiB object three times.
const RSS_LIMIT: u64 = 100 << 20;

/// What one streamed download got.
struct Fetched {
    status: u16,
    /// Hex SHA-256 of the body.
    sha256: String,
    len: u64,
    /// Response header fields, names lowercase.
    headers: Vec<(String, String)>,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// GETs `path` on the site through the edge with curl (HTTPS, or plain HTTP), hashing
/// the body as it streams: the test holds none of it.
fn fetch(s: &CacheStack, path: &str, tls: bool, tag: &str) -> Result<Fetched> {
    let edge = &s.s.edge;
    let head_file = s.s.deployment.dir().join(format!("large-head-{tag}.txt"));
    let (addr, url) = if tls {
        (edge.https_addr(), edge.url(SITE, path))
    } else {
        let a = s.http_addr();
        (a, format!("http://{SITE}:{}{path}", a.port()))
    };
    let mut child = Command::new("curl")
        .arg("-q")
        .arg("-sS")
        .arg("--noproxy")
        .arg("*")
        .arg("--max-time")
        .arg("300")
        .arg("--cacert")
        .arg(edge.client_ca())
        .arg("--resolve")
        .arg(format!("{SITE}:{}:127.0.0.1", addr.port()))
        .arg("-D")
        .arg(&head_file)
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running curl")?;
    let mut out = child.stdout.take().context("curl stdout")?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        len += n as u64;
    }
    let status = child.wait()?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    ensure!(status.success(), "curl {url}: {status}: {stderr}");
    let head = std::fs::read_to_string(&head_file).unwrap_or_default();
    let _ = std::fs::remove_file(&head_file);
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Fetched {
        status: code,
        sha256: hex::encode(ctx.finish()),
        len,
        headers,
    })
}

/// Hex SHA-256 of `/blob` bytes `start..start + len`.
fn blob_sha256(start: u64, len: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut at = start;
    while at < start + len {
        let n = (start + len - at).min(8 << 20);
        ctx.update(&blob_range(at, n as usize));
        at += n;
    }
    hex::encode(ctx.finish())
}

/// `VmHWM` (peak resident set) of `pid`, bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kib << 10)
}

/// A stack whose disk tier holds a few GiB.
fn large_stack() -> Result<CacheStack> {
    cache_stack(|c| {
        c.cache_option("disk_dir", "cache-disk")
            .cache_option("disk_bytes", 3 * GIB as i64)
    })
}

#[test]
fn a_1_gib_object_streams_through_the_disk_tier_in_bounded_memory() -> Result<()> {
    let s = large_stack()?;
    let path = format!("/blob?n={GIB}&cc=max-age%3D3600");
    let want = blob_sha256(0, GIB);
    // Two clients at once (the second while the first is streaming): one origin
    // request, both get the whole object.
    let (first, second) = std::thread::scope(|scope| {
        let a = scope.spawn(|| fetch(&s, &path, true, "a"));
        let b = scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            fetch(&s, &path, true, "b")
        });
        (a.join(), b.join())
    });
    let (first, second) = (
        first.expect("client a panicked")?,
        second.expect("client b panicked")?,
    );
    for (name, got) in [("a", &first), ("b", &second)] {
        ensure!(
            got.status == 200 && got.len == GIB && got.sha256 == want,
            "client {name}: status {}, {} bytes, sha256 {} (want {want})",
            got.status,
            got.len,
            got.sha256
        );
    }
    let count = s.origin_count("/blob")?;
    ensure!(
        count == 1,
        "two clients at once made {count} origin requests"
    );
    let cs = second.header("cache-status").unwrap_or_default();
    ensure!(
        cs.contains("hit") && cs.contains("collapsed"),
        "second client: {cs}"
    );
    // The writer commits a moment after the last byte.
    let stored = s.wait_metric(
        "keyless_edge_cache_disk_streamed_total",
        &[("result", "stored")],
        |v| v >= 1.0,
    )?;
    ensure!(stored >= 1.0, "the object was not stored on disk");
    let hit = fetch(&s, &path, true, "c")?;
    ensure!(
        hit.sha256 == want && hit.len == GIB,
        "disk hit differs: {} bytes, sha256 {}",
        hit.len,
        hit.sha256
    );
    let cs = hit.header("cache-status").unwrap_or_default();
    ensure!(cs.contains("hit"), "third fetch not a hit: {cs}");
    ensure!(s.origin_count("/blob")? == 1, "the hit reached the origin");
    let from_disk = s.metric(
        "keyless_edge_cache_served_bytes_total",
        &[("source", "disk")],
    )?;
    ensure!(
        from_disk >= 2.0 * GIB as f64,
        "bytes served from disk: {from_disk}"
    );
    let memory = s.metric("keyless_edge_cache_bytes", &[("tier", "memory")])?;
    ensure!(memory < 1e6, "the memory tier holds {memory} bytes");
    let peak = peak_rss(s.s.edge.pid())?;
    ensure!(
        peak < RSS_LIMIT,
        "edge peak RSS {} MiB while moving 3 GiB (limit {} MiB)",
        peak >> 20,
        RSS_LIMIT >> 20
    );
    eprintln!("edge peak RSS {} MiB", peak >> 20);
    Ok(())
}

const MIB: u64 = 1 << 20;
/// The slice size of the slicing tests.
const SLICE: u64 = 4 * MIB;

/// The `Range` of each request to `/blob` the origin got, after the first `skip`.
fn origin_ranges(s: &CacheStack, skip: usize) -> Result<Vec<(String, String)>> {
    Ok(s.origin_requests("/blob")?
        .iter()
        .skip(skip)
        .map(|r| {
            (
                r.method.clone(),
                r.header("range").unwrap_or("-").to_owned(),
            )
        })
        .collect())
}

#[test]
fn a_range_of_a_1_gib_object_fetches_only_its_slice_then_the_rest_fills_in() -> Result<()> {
    let s = cache_stack(|c| {
        c.cache_option("disk_dir", "cache-disk")
            .cache_option("disk_bytes", 3 * GIB as i64)
            .site_cache_option("slice_bytes", SLICE as i64)
    })?;
    let path = format!("/blob?n={GIB}&cc=max-age%3D3600");
    // The last MiB, on a cold cache: the length from a HEAD, then the one slice.
    let tail = s.req(&path).header("Range: bytes=-1048576").send()?;
    ensure!(tail.status == 206, "{}", tail.show());
    let want_tail = blob_range(GIB - MIB, MIB as usize);
    ensure!(
        tail.body == want_tail,
        "the last MiB differs ({} bytes)",
        tail.body.len()
    );
    ensure!(
        tail.header("content-range").as_deref() == Some("bytes 1072693248-1073741823/1073741824"),
        "{}",
        tail.show()
    );
    let last_slice = format!("bytes={}-{}", GIB - SLICE, GIB - 1);
    let seen = origin_ranges(&s, 0)?;
    ensure!(
        seen == [
            ("HEAD".into(), "-".into()),
            ("GET".into(), last_slice.clone())
        ],
        "the origin got {seen:?}, expected a HEAD and {last_slice}"
    );
    // The whole object: the stored slice plus the 255 missing ones, never the whole
    // object in one request.
    let whole = fetch(&s, &path, true, "whole")?;
    ensure!(
        whole.status == 200 && whole.len == GIB && whole.sha256 == blob_sha256(0, GIB),
        "whole object: status {}, {} bytes",
        whole.status,
        whole.len
    );
    let fills = origin_ranges(&s, 2)?;
    ensure!(
        fills.len() == 255,
        "{} more origin requests, expected 255",
        fills.len()
    );
    ensure!(
        fills
            .iter()
            .all(|(m, r)| m == "GET" && r != "-" && *r != last_slice),
        "not only the missing slices: {:?}",
        &fills[..3.min(fills.len())]
    );
    let fetched = s.metric(
        "keyless_edge_cache_slice_fetches_total",
        &[("result", "stored")],
    )?;
    ensure!(fetched == 256.0, "slice fetches counted: {fetched}");
    Ok(())
}

#[test]
fn an_origin_changing_the_etag_between_slices_never_yields_a_mixed_body() -> Result<()> {
    let s = cache_stack(|c| c.site_cache_option("slice_bytes", 256 << 10))?;
    let old = keyless_tests::pattern_body(MIB as usize);
    let new: Vec<u8> = old
        .iter()
        .map(|&b| if b == b'\n' { b'#' } else { b })
        .collect();
    let version = |etag: &str, body: &[u8]| {
        keyless_tests::Scripted::new(200)
            .header("Cache-Control", "max-age=600")
            .header("ETag", etag)
            .body(body)
            .ranges()
    };
    // The first slice of the old version, every later answer of the new one.
    s.script(
        "/changing",
        &[version("\"old\"", &old), version("\"new\"", &new)],
    )?;
    let cut = s.get("/changing")?;
    ensure!(
        cut.exit_code != Some(0) && cut.body.len() < old.len(),
        "a transfer spanning two versions completed: {} bytes, exit {:?}",
        cut.body.len(),
        cut.exit_code
    );
    ensure!(
        old.starts_with(&cut.body),
        "the cut answer holds bytes of the new version"
    );
    let ranges: Vec<String> = s
        .origin_requests("/changing")?
        .iter()
        .map(|r| r.header("range").unwrap_or("-").to_owned())
        .collect();
    ensure!(
        ranges.starts_with(&[
            "bytes=0-262143".to_owned(),
            "bytes=262144-524287".to_owned()
        ]),
        "slice requests: {ranges:?}"
    );
    let clean = s.get("/changing")?;
    ensure!(
        clean.exit_code == Some(0) && clean.body == new,
        "after the cut: {} bytes, exit {:?}",
        clean.body.len(),
        clean.exit_code
    );
    ensure!(
        clean.header("etag").as_deref() == Some("\"new\""),
        "{}",
        clean.show()
    );
    let mismatches = s.metric(
        "keyless_edge_cache_slice_fetches_total",
        &[("result", "mismatch")],
    )?;
    ensure!(mismatches == 1.0, "mismatches counted: {mismatches}");
    Ok(())
}
