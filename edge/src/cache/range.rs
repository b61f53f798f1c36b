//! Byte-range requests (RFC 9110 §14) answered from a stored full response: parsing
//! `Range`, evaluating `If-Range`, and building the single-part or
//! `multipart/byteranges` 206 body as zero-copy slices of the stored body.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, DATE, IF_RANGE, RANGE};
use http::{HeaderMap, HeaderValue, Method};

use super::conditional::{stored_etag, stored_last_modified, EntityTag};
use crate::httpdate::parse_http_date;

/// More range specs than this in one `Range` field: the field is ignored (RFC 9110
/// §14.2 lets a server ignore many small or overlapping ranges).
pub(crate) const MAX_RANGES: usize = 32;

/// A body ranges are cut from: bytes in memory or a stored body.
pub(crate) trait Slice: Sized {
    /// Length in bytes.
    fn total(&self) -> u64;
    /// Bytes `first..=last` (within the length).
    fn part(&self, first: u64, last: u64) -> Self;
    /// A piece of multipart framing.
    fn text(b: Bytes) -> Self;
}

impl Slice for Bytes {
    fn total(&self) -> u64 {
        self.len() as u64
    }

    fn part(&self, first: u64, last: u64) -> Bytes {
        // Resolved ranges satisfy first <= last < total, so these fit in usize and the
        // slice is in bounds; try_from only guards 32-bit targets.
        match (usize::try_from(first), usize::try_from(last)) {
            (Ok(s), Ok(e)) if s <= e && e < self.len() => self.slice(s..=e),
            _ => Bytes::new(),
        }
    }

    fn text(b: Bytes) -> Bytes {
        b
    }
}

/// How to answer a request with respect to its `Range` field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RangeAnswer<B = Bytes> {
    /// Serve the full representation (no `Range`, or `Range` ignored: malformed, not
    /// the `bytes` unit, too many ranges, `If-Range` mismatch, method not GET).
    Full,
    /// Answer 206 Partial Content.
    Partial {
        /// For several ranges, the `Content-Type` that replaces the stored one
        /// (`multipart/byteranges; boundary=...`); `None` for a single range (keep
        /// the stored `Content-Type`).
        content_type: Option<HeaderValue>,
        /// For a single range, its `Content-Range` (`bytes a-b/len`); `None` for
        /// multipart (each part carries its own).
        content_range: Option<HeaderValue>,
        /// The body, in order: slices of the stored body and, for multipart, the
        /// part headers and the closing delimiter.
        body: Vec<B>,
        /// Total length of `body` in bytes (the `Content-Length`).
        len: u64,
    },
    /// Answer 416 Range Not Satisfiable with this `Content-Range: bytes */LEN`.
    Unsatisfiable {
        /// The `Content-Range` field value.
        content_range: HeaderValue,
    },
}

/// One parsed range spec, before it is resolved against the body length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spec {
    /// `first-last` (`last` `None` for `first-`); numbers saturate at `u64::MAX`.
    Int { first: u64, last: Option<u64> },
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// Decides how to answer `method` with request fields `req` from a stored response
/// with fields `stored` and body `body`.
///
/// The caller uses this only for a stored 200 response, after
/// [`super::conditional::evaluate`] said `Proceed`.
///
/// `If-Range` (§13.1.5): an entity-tag applies the range only if it strongly matches
/// the stored `ETag`; an HTTP-date (any of the three formats) only if it equals the
/// stored `Last-Modified` *and* that `Last-Modified` is a strong validator, i.e. at
/// least 60 seconds before the stored `Date` (§8.8.2.2). Otherwise, or if `If-Range`
/// is malformed or repeated, the full representation is served.
pub(crate) fn answer<B: Slice>(
    method: &Method,
    req: &HeaderMap,
    stored: &HeaderMap,
    body: &B,
) -> RangeAnswer<B> {
    if method != Method::GET {
        return RangeAnswer::Full;
    }
    let mut ranges = req.get_all(RANGE).iter();
    let Some(range) = ranges.next() else {
        return RangeAnswer::Full;
    };
    if ranges.next().is_some() {
        return RangeAnswer::Full;
    }
    if !if_range_holds(req, stored) {
        return RangeAnswer::Full;
    }
    let Some(specs) = parse_range(range.as_bytes()) else {
        return RangeAnswer::Full;
    };
    let total = body.total();
    let Some(resolved) = resolve(&specs, total) else {
        return RangeAnswer::Full;
    };
    if resolved.is_empty() {
        return RangeAnswer::Unsatisfiable {
            content_range: header_value(format!("bytes */{total}")),
        };
    }
    let merged = coalesce(resolved);
    build(&merged, stored, body, total)
}

/// Where the one range a GET asks for starts, as far as it is known before the
/// representation's length: what a sliced fetch starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeStart {
    /// No usable `Range` (none, not `bytes`, several ranges, malformed): the whole.
    Whole,
    /// `bytes=a-` or `bytes=a-b`.
    At(u64),
    /// `bytes=-n`: depends on the length.
    Suffix,
}

/// [`RangeStart`] of the request fields `req` (a single range only).
pub(crate) fn range_start(req: &HeaderMap) -> RangeStart {
    let mut all = req.get_all(RANGE).iter();
    let (Some(range), None) = (all.next(), all.next()) else {
        return RangeStart::Whole;
    };
    match parse_range(range.as_bytes()).as_deref() {
        Some([Spec::Int { first, .. }]) => RangeStart::At(*first),
        Some([Spec::Suffix(_)]) => RangeStart::Suffix,
        _ => RangeStart::Whole,
    }
}

/// What a GET with fields `req` asks of a representation of `total` bytes whose
/// stored fields are `stored`: with [`answer`]'s rules, for a single range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// The whole representation.
    Whole,
    /// Bytes `first..=last`.
    Part(u64, u64),
    /// Nothing satisfiable: a 416.
    Unsatisfiable,
}

/// [`Wanted`] for a GET with fields `req`; several ranges, or an `If-Range` that does
/// not hold, ask for the whole.
pub(crate) fn wanted(req: &HeaderMap, stored: &HeaderMap, total: u64) -> Wanted {
    if range_start(req) == RangeStart::Whole || !if_range_holds(req, stored) {
        return Wanted::Whole;
    }
    let specs = req
        .get(RANGE)
        .and_then(|r| parse_range(r.as_bytes()))
        .unwrap_or_default();
    match resolve(&specs, total).as_deref() {
        Some([(first, last)]) => Wanted::Part(*first, *last),
        Some([]) => Wanted::Unsatisfiable,
        _ => Wanted::Whole,
    }
}

/// Whether `If-Range` is absent or holds for the stored response.
fn if_range_holds(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let mut all = req.get_all(IF_RANGE).iter();
    let Some(v) = all.next() else {
        return true;
    };
    if all.next().is_some() {
        return false;
    }
    let b = v.as_bytes();
    let trimmed = b.trim_ascii_start();
    if trimmed.starts_with(b"\"") || trimmed.starts_with(b"W/") {
        return match (EntityTag::parse(v), stored_etag(stored)) {
            (Some(client), Some(ours)) => client.strong_eq(&ours),
            _ => false,
        };
    }
    let (Some(date), Some(lm)) = (parse_http_date(v), stored_last_modified(stored)) else {
        return false;
    };
    if date != lm {
        return false;
    }
    // Strong only if the origin sent it at least 60 s after the last modification.
    let mut dates = stored.get_all(DATE).iter();
    match (dates.next().and_then(parse_http_date), dates.next()) {
        (Some(sent), None) => sent.duration_since(lm).is_ok_and(|d| d.as_secs() >= 60),
        _ => false,
    }
}

/// Parses a `Range` field value: `bytes=` and a list of specs. `None` if the syntax is
/// invalid, the unit is not `bytes`, or there are more than [`MAX_RANGES`] specs.
fn parse_range(v: &[u8]) -> Option<Vec<Spec>> {
    let v = v.trim_ascii();
    let eq = v.iter().position(|&b| b == b'=')?;
    let (unit, set) = v.split_at_checked(eq)?;
    if !unit.eq_ignore_ascii_case(b"bytes") {
        return None;
    }
    let set = set.get(1..)?; // skip '=' found above
    let mut specs = Vec::new();
    for elem in set.split(|&b| b == b',') {
        let elem = elem.trim_ascii();
        if elem.is_empty() {
            continue; // empty list elements are allowed (§5.6.1.2)
        }
        if specs.len() >= MAX_RANGES {
            return None;
        }
        specs.push(parse_spec(elem)?);
    }
    if specs.is_empty() {
        return None;
    }
    Some(specs)
}

fn parse_spec(s: &[u8]) -> Option<Spec> {
    let dash = s.iter().position(|&b| b == b'-')?;
    let (first, rest) = s.split_at_checked(dash)?;
    let last = rest.get(1..)?;
    if first.is_empty() {
        return Some(Spec::Suffix(number(last)?));
    }
    let first = number(first)?;
    if last.is_empty() {
        return Some(Spec::Int { first, last: None });
    }
    let last = number(last)?;
    if last < first {
        return None;
    }
    Some(Spec::Int {
        first,
        last: Some(last),
    })
}

/// A non-empty run of ASCII digits, saturating at `u64::MAX`.
fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.saturating_mul(10).saturating_add(u64::from(b - b'0'));
    }
    Some(n)
}

/// Resolves specs against the body length `total` into inclusive `(start, end)` pairs,
/// dropping unsatisfiable ones. `None` (serve in full) when the satisfiable ranges
/// together ask for more than twice the body: overlapping-range abuse.
fn resolve(specs: &[Spec], total: u64) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::with_capacity(specs.len());
    let mut asked: u64 = 0;
    for spec in specs {
        let r = match *spec {
            Spec::Int { first, last } if first < total => {
                let end = last.map_or(total - 1, |l| l.min(total - 1));
                (first, end)
            }
            Spec::Int { .. } => continue,
            Spec::Suffix(0) => continue,
            Spec::Suffix(_) if total == 0 => continue,
            Spec::Suffix(n) => (total - n.min(total), total - 1),
        };
        asked = asked.saturating_add(r.1 - r.0 + 1);
        out.push(r);
    }
    if asked > total.saturating_mul(2) {
        return None;
    }
    Some(out)
}

/// Sorts ranges and merges overlapping or adjacent ones.
fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn build<B: Slice>(
    ranges: &[(u64, u64)],
    stored: &HeaderMap,
    body: &B,
    total: u64,
) -> RangeAnswer<B> {
    let slice = |(s, e): (u64, u64)| -> B { body.part(s, e) };
    if let [single] = ranges {
        let part = slice(*single);
        return RangeAnswer::Partial {
            content_type: None,
            content_range: Some(header_value(format!(
                "bytes {}-{}/{total}",
                single.0, single.1
            ))),
            len: part.total(),
            body: vec![part],
        };
    }
    let boundary = boundary();
    let part_type = stored.get(CONTENT_TYPE).map(HeaderValue::as_bytes);
    let mut body_parts = Vec::with_capacity(ranges.len() * 2 + 1);
    let mut len = 0u64;
    for (i, &(s, e)) in ranges.iter().enumerate() {
        let mut head = Vec::with_capacity(128);
        if i > 0 {
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"--");
        head.extend_from_slice(boundary.as_bytes());
        head.extend_from_slice(b"\r\n");
        if let Some(ct) = part_type {
            head.extend_from_slice(b"Content-Type: ");
            head.extend_from_slice(ct);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(format!("Content-Range: bytes {s}-{e}/{total}\r\n\r\n").as_bytes());
        let data = slice((s, e));
        len += head.len() as u64 + data.total();
        body_parts.push(B::text(Bytes::from(head)));
        body_parts.push(data);
    }
    let tail = format!("\r\n--{boundary}--\r\n");
    len += tail.len() as u64;
    body_parts.push(B::text(Bytes::from(tail)));
    RangeAnswer::Partial {
        content_type: Some(header_value(format!(
            "multipart/byteranges; boundary={boundary}"
        ))),
        content_range: None,
        body: body_parts,
        len,
    }
}

/// A header value built from ASCII digits, letters and punctuation only.
fn header_value(s: String) -> HeaderValue {
    // Every caller formats numbers, hex and fixed ASCII text: always a valid value.
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A multipart boundary: 16 random bytes as 32 hex digits. Should the system RNG
/// fail, a process-wide counter mixed with the time keeps boundaries distinct (the
/// boundary needs uniqueness, not secrecy; a collision with the body would only
/// confuse the client's multipart parser).
fn boundary() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    static FALLBACK: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        let n = FALLBACK.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let d = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{n}/{t}/{}", std::process::id()).as_bytes(),
        );
        for (b, s) in bytes.iter_mut().zip(d.as_ref()) {
            *b = *s;
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    const LM_PLUS_1M: &str = "Sun, 06 Nov 1994 08:50:37 GMT";
    const LM_PLUS_59S: &str = "Sun, 06 Nov 1994 08:50:36 GMT";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn stored() -> HeaderMap {
        headers(&[
            ("content-type", "text/plain"),
            ("etag", "\"v1\""),
            ("last-modified", LM),
            ("date", LM_PLUS_1M),
        ])
    }

    fn body() -> Bytes {
        Bytes::from_static(b"0123456789abcdefghij") // 20 bytes
    }

    fn ask(range: &str) -> RangeAnswer {
        answer(
            &Method::GET,
            &headers(&[("range", range)]),
            &stored(),
            &body(),
        )
    }

    fn concat(parts: &[Bytes]) -> Vec<u8> {
        parts.iter().flat_map(|b| b.iter().copied()).collect()
    }

    /// Asserts a single-part answer with this Content-Range and body.
    fn assert_single(a: RangeAnswer, cr: &str, data: &[u8]) {
        match a {
            RangeAnswer::Partial {
                content_type,
                content_range,
                body,
                len,
            } => {
                assert_eq!(content_type, None);
                assert_eq!(content_range.unwrap(), cr);
                assert_eq!(concat(&body), data);
                assert_eq!(len, data.len() as u64);
            }
            other => panic!("expected single part, got {other:?}"),
        }
    }

    fn assert_416(a: RangeAnswer, len: u64) {
        assert_eq!(
            a,
            RangeAnswer::Unsatisfiable {
                content_range: HeaderValue::try_from(format!("bytes */{len}")).unwrap()
            }
        );
    }

    #[test]
    fn single_ranges() {
        assert_single(ask("bytes=0-4"), "bytes 0-4/20", b"01234");
        assert_single(ask("bytes=10-"), "bytes 10-19/20", b"abcdefghij");
        assert_single(ask("bytes=-3"), "bytes 17-19/20", b"hij");
        assert_single(ask("bytes=-100"), "bytes 0-19/20", b"0123456789abcdefghij");
        assert_single(ask("bytes=15-1000"), "bytes 15-19/20", b"fghij");
        assert_single(ask("bytes=19-19"), "bytes 19-19/20", b"j");
        assert_single(ask("BYTES=0-0"), "bytes 0-0/20", b"0");
        assert_single(
            ask("bytes=5-99999999999999999999999999"),
            "bytes 5-19/20",
            b"56789abcdefghij",
        );
    }

    #[test]
    fn slices_are_zero_copy() {
        let b = body();
        let a = answer(
            &Method::GET,
            &headers(&[("range", "bytes=2-5")]),
            &stored(),
            &b,
        );
        let RangeAnswer::Partial { body: parts, .. } = a else {
            panic!("not partial")
        };
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].as_ptr(), b[2..].as_ptr());
    }

    #[test]
    fn whitespace_and_empty_elements_tolerated() {
        assert_single(ask("bytes= 0-1 ,"), "bytes 0-1/20", b"01");
        assert_single(ask(" bytes=, ,0-1"), "bytes 0-1/20", b"01");
    }

    #[test]
    fn invalid_syntax_is_ignored() {
        for bad in [
            "bytes=",
            "bytes=,",
            "bytes 0-1",
            "bytes=a-b",
            "bytes=5-2",
            "bytes=-",
            "bytes=1",
            "bytes=1-2-3",
            "bytes=--1",
            "bytes=+1-2",
            "bytes=0-1;x",
            "bytes = 0-1",
            "items=0-1",
            "bytes=0 - 1",
            "=0-1",
        ] {
            assert_eq!(ask(bad), RangeAnswer::Full, "{bad:?}");
        }
        // Two Range lines: invalid.
        let req = headers(&[("range", "bytes=0-1"), ("range", "bytes=2-3")]);
        assert_eq!(
            answer(&Method::GET, &req, &stored(), &body()),
            RangeAnswer::Full
        );
    }

    #[test]
    fn non_get_and_absent_range_are_full() {
        let req = headers(&[("range", "bytes=0-1")]);
        for m in [Method::HEAD, Method::POST, Method::PUT] {
            assert_eq!(answer(&m, &req, &stored(), &body()), RangeAnswer::Full);
        }
        assert_eq!(
            answer(&Method::GET, &HeaderMap::new(), &stored(), &body()),
            RangeAnswer::Full
        );
    }

    #[test]
    fn unsatisfiable() {
        assert_416(ask("bytes=20-"), 20);
        assert_416(ask("bytes=20-30"), 20);
        assert_416(ask("bytes=-0"), 20);
        assert_416(ask("bytes=20-21, 99-, -0"), 20);
        assert_416(ask("bytes=18446744073709551616-"), 20);
        // Some satisfiable: the unsatisfiable ones are dropped.
        assert_single(ask("bytes=50-60, 0-1"), "bytes 0-1/20", b"01");
        // Empty body: everything is unsatisfiable.
        let empty = Bytes::new();
        for r in ["bytes=0-", "bytes=-5", "bytes=0-0"] {
            let a = answer(&Method::GET, &headers(&[("range", r)]), &stored(), &empty);
            assert_416(a, 0);
        }
    }

    #[test]
    fn coalescing() {
        // Overlapping and adjacent ranges merge into one.
        assert_single(ask("bytes=0-4, 3-7"), "bytes 0-7/20", b"01234567");
        assert_single(ask("bytes=0-4,5-9"), "bytes 0-9/20", b"0123456789");
        assert_single(ask("bytes=5-9, 0-4"), "bytes 0-9/20", b"0123456789");
        assert_single(ask("bytes=2-3, 0-10, 4-5"), "bytes 0-10/20", b"0123456789a");
        assert_single(ask("bytes=-5, 10-"), "bytes 10-19/20", b"abcdefghij");
        assert_eq!(coalesce(vec![(5, 6), (0, 1), (1, 2)]), vec![(0, 2), (5, 6)]);
        assert_eq!(
            coalesce(vec![(0, u64::MAX - 1), (3, 4)]),
            vec![(0, u64::MAX - 1)]
        );
    }

    #[test]
    fn multipart_framing() {
        let a = ask("bytes=0-1, 10-12, -2");
        let RangeAnswer::Partial {
            content_type,
            content_range,
            body,
            len,
        } = a
        else {
            panic!("not partial: {a:?}")
        };
        assert_eq!(content_range, None);
        let ct = content_type.unwrap();
        let ct = ct.to_str().unwrap();
        let boundary = ct.strip_prefix("multipart/byteranges; boundary=").unwrap();
        assert_eq!(boundary.len(), 32);
        assert!(boundary.bytes().all(|b| b.is_ascii_hexdigit()));
        let got = concat(&body);
        assert_eq!(len, got.len() as u64);
        let want = format!(
            "--{b}\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/20\r\n\r\n01\
             \r\n--{b}\r\nContent-Type: text/plain\r\nContent-Range: bytes 10-12/20\r\n\r\nabc\
             \r\n--{b}\r\nContent-Type: text/plain\r\nContent-Range: bytes 18-19/20\r\n\r\nij\
             \r\n--{b}--\r\n",
            b = boundary
        );
        assert_eq!(String::from_utf8(got).unwrap(), want);
    }

    #[test]
    fn multipart_without_stored_content_type() {
        let a = answer(
            &Method::GET,
            &headers(&[("range", "bytes=0-0,2-2")]),
            &HeaderMap::new(),
            &body(),
        );
        let RangeAnswer::Partial {
            content_type, body, ..
        } = a
        else {
            panic!("not partial")
        };
        let ct = content_type.unwrap();
        let b = ct
            .to_str()
            .unwrap()
            .strip_prefix("multipart/byteranges; boundary=")
            .unwrap()
            .to_owned();
        let want = format!(
            "--{b}\r\nContent-Range: bytes 0-0/20\r\n\r\n0\r\n--{b}\r\nContent-Range: bytes 2-2/20\r\n\r\n2\r\n--{b}--\r\n"
        );
        assert_eq!(concat(&body), want.as_bytes());
    }

    #[test]
    fn multipart_keeps_non_ascii_content_type_bytes() {
        let mut st = stored();
        st.insert(
            "content-type",
            HeaderValue::from_bytes(b"text/plain; name=\"\xe9\"").unwrap(),
        );
        let a = answer(
            &Method::GET,
            &headers(&[("range", "bytes=0-0,2-2")]),
            &st,
            &body(),
        );
        let RangeAnswer::Partial { body, .. } = a else {
            panic!("not partial")
        };
        let got = concat(&body);
        let needle = b"Content-Type: text/plain; name=\"\xe9\"\r\n";
        let count = got.windows(needle.len()).filter(|w| w == needle).count();
        assert_eq!(count, 2);
    }

    #[test]
    fn boundaries_differ() {
        assert_ne!(boundary(), boundary());
    }

    #[test]
    fn too_many_ranges_is_full() {
        let specs: Vec<String> = (0..MAX_RANGES).map(|i| format!("{i}-{i}")).collect();
        let ok = format!("bytes={}", specs.join(","));
        // 20 of the 32 are satisfiable single bytes that coalesce into one range.
        assert_single(ask(&ok), "bytes 0-19/20", b"0123456789abcdefghij");
        let specs: Vec<String> = (0..=MAX_RANGES).map(|i| format!("{i}-{i}")).collect();
        let too_many = format!("bytes={}", specs.join(","));
        assert_eq!(ask(&too_many), RangeAnswer::Full);
    }

    #[test]
    fn overlap_abuse_is_full() {
        // Exactly twice the body: allowed.
        assert_single(
            ask("bytes=0-19, 0-19"),
            "bytes 0-19/20",
            b"0123456789abcdefghij",
        );
        // More than twice: ignored.
        assert_eq!(ask("bytes=0-19, 0-19, 0-0"), RangeAnswer::Full);
        assert_eq!(ask("bytes=0-, -20, 5-"), RangeAnswer::Full);
    }

    #[test]
    fn if_range_etag() {
        let with = |ir: &str| {
            answer(
                &Method::GET,
                &headers(&[("range", "bytes=0-1"), ("if-range", ir)]),
                &stored(),
                &body(),
            )
        };
        assert_single(with("\"v1\""), "bytes 0-1/20", b"01");
        assert_eq!(with("\"v2\""), RangeAnswer::Full);
        assert_eq!(with("W/\"v1\""), RangeAnswer::Full);
        assert_eq!(with("\"v1"), RangeAnswer::Full);
        assert_eq!(with("\"v1\", \"v2\""), RangeAnswer::Full);
        // Weak stored ETag never matches.
        let mut weak = stored();
        weak.insert("etag", HeaderValue::from_static("W/\"v1\""));
        let a = answer(
            &Method::GET,
            &headers(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")]),
            &weak,
            &body(),
        );
        assert_eq!(a, RangeAnswer::Full);
        // No stored ETag.
        let mut none = stored();
        none.remove("etag");
        let a = answer(
            &Method::GET,
            &headers(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")]),
            &none,
            &body(),
        );
        assert_eq!(a, RangeAnswer::Full);
    }

    #[test]
    fn if_range_date() {
        let with = |ir: &str, st: &HeaderMap| {
            answer(
                &Method::GET,
                &headers(&[("range", "bytes=0-1"), ("if-range", ir)]),
                st,
                &body(),
            )
        };
        assert_single(with(LM, &stored()), "bytes 0-1/20", b"01");
        assert_single(
            with("Sunday, 06-Nov-94 08:49:37 GMT", &stored()),
            "bytes 0-1/20",
            b"01",
        );
        // Not equal (even later) → full.
        assert_eq!(with(LM_PLUS_1M, &stored()), RangeAnswer::Full);
        assert_eq!(
            with("Sat, 05 Nov 1994 08:49:37 GMT", &stored()),
            RangeAnswer::Full
        );
        assert_eq!(with("not a date", &stored()), RangeAnswer::Full);
        // Weak Last-Modified (Date less than 60 s later, or no Date) → full.
        let mut weak = stored();
        weak.insert("date", HeaderValue::from_static(LM_PLUS_59S));
        assert_eq!(with(LM, &weak), RangeAnswer::Full);
        let mut no_date = stored();
        no_date.remove("date");
        assert_eq!(with(LM, &no_date), RangeAnswer::Full);
        let mut no_lm = stored();
        no_lm.remove("last-modified");
        assert_eq!(with(LM, &no_lm), RangeAnswer::Full);
    }

    #[test]
    fn if_range_without_range_is_full() {
        let a = answer(
            &Method::GET,
            &headers(&[("if-range", "\"v1\"")]),
            &stored(),
            &body(),
        );
        assert_eq!(a, RangeAnswer::Full);
    }

    #[test]
    fn if_range_mismatch_beats_unsatisfiable() {
        let a = answer(
            &Method::GET,
            &headers(&[("range", "bytes=100-"), ("if-range", "\"v2\"")]),
            &stored(),
            &body(),
        );
        assert_eq!(a, RangeAnswer::Full);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz over short Range values.
        let alphabet = b"bytes=0123456789-, \t*xW\"";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = (seed % 24) as usize;
            let s: Vec<u8> = (0..n)
                .map(|i| alphabet[((seed >> (i % 8 * 8)) as usize + i) % alphabet.len()])
                .collect();
            let Ok(v) = HeaderValue::from_bytes(&s) else {
                continue;
            };
            let mut req = HeaderMap::new();
            req.insert(RANGE, v.clone());
            req.insert(IF_RANGE, v);
            let _ = answer(&Method::GET, &req, &stored(), &body());
            let mut req = HeaderMap::new();
            req.insert(
                RANGE,
                HeaderValue::from_bytes(&[b"bytes=".as_slice(), &s].concat()).unwrap(),
            );
            let _ = answer(&Method::GET, &req, &stored(), &body());
        }
    }
}
