//! Client preconditions (RFC 9110 §13) evaluated against a stored response, and the
//! validator parsing they need: entity-tag lists (§8.8.3) and HTTP-dates (§5.6.7).
//!
//! The cache owns this evaluation when it answers from storage (RFC 9111 §4.3.2): a
//! conditional request for a fresh stored response is answered here, never forwarded.
//! [`super::range`] reuses the validator helpers for `If-Range`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{
    CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, IF_MATCH, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, IF_UNMODIFIED_SINCE, LAST_MODIFIED, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// At most this many entity-tags in one precondition field (all its lines together);
/// a longer list is treated as malformed. Header sections are already bounded by the
/// HTTP server; this bounds the comparison work per request.
const MAX_ETAGS: usize = 256;

/// What to do with a request after evaluating its preconditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Serve normally (range handling may follow).
    Proceed,
    /// Answer 304 Not Modified (GET/HEAD only), with [`not_modified_headers`].
    NotModified,
    /// Answer 412 Precondition Failed.
    Failed,
}

/// One entity-tag (RFC 9110 §8.8.3): the opaque tag without its quotes, and whether it
/// carried the `W/` weakness indicator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityTag {
    /// `W/` was present.
    pub weak: bool,
    /// The characters between the double quotes (`etagc`: %x21 / %x23-7E / obs-text).
    pub opaque: Vec<u8>,
}

impl EntityTag {
    /// Parses exactly one entity-tag (surrounding whitespace allowed), as in an `ETag`
    /// field or `If-Range`; `None` if the value is anything else.
    pub fn parse(v: &HeaderValue) -> Option<EntityTag> {
        let s = trim_ows(v.as_bytes());
        let (tag, rest) = parse_one_tag(s)?;
        if rest.is_empty() {
            Some(tag)
        } else {
            None
        }
    }

    /// Strong comparison (§8.8.3.2): both strong and the same opaque tag.
    pub fn strong_eq(&self, other: &EntityTag) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }

    /// Weak comparison (§8.8.3.2): the same opaque tag, weakness ignored.
    pub fn weak_eq(&self, other: &EntityTag) -> bool {
        self.opaque == other.opaque
    }
}

/// The value of an `If-Match` / `If-None-Match` field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EtagList {
    /// `*`: any current representation.
    Any,
    /// A list of entity-tags (possibly empty: `If-None-Match: ,` is a valid empty list).
    Tags(Vec<EntityTag>),
}

impl EtagList {
    /// Whether the list matches `stored` (the stored response's entity-tag, if any)
    /// with the strong (`strong = true`) or the weak comparison. `*` matches because a
    /// stored representation exists.
    pub fn matches(&self, stored: Option<&EntityTag>, strong: bool) -> bool {
        match self {
            EtagList::Any => true,
            EtagList::Tags(tags) => stored.is_some_and(|s| {
                tags.iter()
                    .any(|t| if strong { t.strong_eq(s) } else { t.weak_eq(s) })
            }),
        }
    }
}

/// Parses one line of an entity-tag list field (`"*"` or `#entity-tag`); `None` if it
/// is malformed or longer than 256 tags.
pub fn etag_list(v: &HeaderValue) -> Option<EtagList> {
    let s = trim_ows(v.as_bytes());
    if s == b"*" {
        return Some(EtagList::Any);
    }
    let mut tags = Vec::new();
    parse_tags_into(s, &mut tags)?;
    Some(EtagList::Tags(tags))
}

/// Parses every line of the list field `name` in `headers` as one list (RFC 9110
/// §5.3). `None` when the field is absent; `Some(None)` when it is malformed (`*`
/// combined with anything else counts as malformed).
pub fn etag_field(headers: &HeaderMap, name: &HeaderName) -> Option<Option<EtagList>> {
    let mut lines = headers.get_all(name).iter().peekable();
    lines.peek()?;
    let mut tags = Vec::new();
    let mut any = false;
    let mut count = 0usize;
    for line in lines {
        count += 1;
        let s = trim_ows(line.as_bytes());
        if s == b"*" {
            any = true;
        } else if parse_tags_into(s, &mut tags).is_none() {
            return Some(None);
        }
    }
    if any {
        // `*` must be the field's whole value (§13.1.1, §13.1.2).
        return Some((count == 1 && tags.is_empty()).then_some(EtagList::Any));
    }
    Some(Some(EtagList::Tags(tags)))
}

/// Appends the entity-tags of one list line to `out`; `None` if malformed or the total
/// exceeds [`MAX_ETAGS`]. Empty list elements are allowed (§5.6.1.2).
fn parse_tags_into(mut s: &[u8], out: &mut Vec<EntityTag>) -> Option<()> {
    loop {
        s = trim_start_ows(s);
        match s.first() {
            None => return Some(()),
            Some(b',') => {
                s = s.get(1..)?;
                continue;
            }
            Some(_) => {}
        }
        let (tag, rest) = parse_one_tag(s)?;
        if out.len() >= MAX_ETAGS {
            return None;
        }
        out.push(tag);
        let rest = trim_start_ows(rest);
        match rest.first() {
            None => return Some(()),
            Some(b',') => s = rest.get(1..)?,
            Some(_) => return None,
        }
    }
}

/// Parses an entity-tag at the start of `s`; returns it and the bytes after it.
fn parse_one_tag(s: &[u8]) -> Option<(EntityTag, &[u8])> {
    let (weak, s) = match s.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let s = s.strip_prefix(b"\"")?;
    let end = s.iter().position(|&b| b == b'"')?;
    let (opaque, rest) = s.split_at_checked(end)?;
    if !opaque
        .iter()
        .all(|&b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
    {
        return None;
    }
    let rest = rest.get(1..)?; // skip the closing quote found above
    Some((
        EntityTag {
            weak,
            opaque: opaque.to_vec(),
        },
        rest,
    ))
}

fn trim_start_ows(mut s: &[u8]) -> &[u8] {
    while let Some((&(b' ' | b'\t'), rest)) = s.split_first() {
        s = rest;
    }
    s
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    s = trim_start_ows(s);
    while let Some((&(b' ' | b'\t'), rest)) = s.split_last() {
        s = rest;
    }
    s
}

/// The stored response's entity-tag: its single `ETag` line, if valid.
pub fn stored_etag(stored: &HeaderMap) -> Option<EntityTag> {
    single(stored, &ETAG).and_then(EntityTag::parse)
}

/// The stored response's `Last-Modified`, if exactly one valid line.
pub fn stored_last_modified(stored: &HeaderMap) -> Option<SystemTime> {
    single(stored, &LAST_MODIFIED).and_then(parse_http_date)
}

/// The only line of `name`; `None` when absent or repeated.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    all.next().is_none().then_some(first)
}

/// The date in a single-line date field of `req`; `None` when absent, repeated or not
/// a valid HTTP-date (all of which mean "ignore the field").
fn date_field(req: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    single(req, name).and_then(parse_http_date)
}

/// Evaluates the request's preconditions against the stored response, in the order of
/// RFC 9110 §13.2.2 (steps 1–4; step 5, `If-Range`, is [`super::range`]'s).
///
/// The caller evaluates only against a stored 2xx response: preconditions are ignored
/// when the unconditional answer would not be 2xx (§13.2.1). CONNECT, OPTIONS and
/// TRACE always proceed (§13.2.1).
///
/// Malformed fields: a malformed `If-Match` is ignored (as if absent); a malformed
/// `If-None-Match` matches nothing (so the request proceeds, and `If-Modified-Since` is
/// still not evaluated because the field is present); an invalid or repeated date
/// field is ignored.
pub fn evaluate(method: &Method, req: &HeaderMap, stored: &HeaderMap) -> Precondition {
    if matches!(*method, Method::CONNECT | Method::OPTIONS | Method::TRACE) {
        return Precondition::Proceed;
    }
    let etag = stored_etag(stored);
    let get_or_head = matches!(*method, Method::GET | Method::HEAD);

    // Step 1 / 2: If-Match, else If-Unmodified-Since.
    match etag_field(req, &IF_MATCH) {
        Some(Some(list)) => {
            if !list.matches(etag.as_ref(), true) {
                return Precondition::Failed;
            }
        }
        Some(None) | None => {
            if let (Some(since), Some(lm)) = (
                date_field(req, &IF_UNMODIFIED_SINCE),
                stored_last_modified(stored),
            ) {
                if lm > since {
                    return Precondition::Failed;
                }
            }
        }
    }

    // Step 3 / 4: If-None-Match, else If-Modified-Since.
    match etag_field(req, &IF_NONE_MATCH) {
        Some(list) => {
            let matched = list.is_some_and(|l| l.matches(etag.as_ref(), false));
            if matched {
                return if get_or_head {
                    Precondition::NotModified
                } else {
                    Precondition::Failed
                };
            }
        }
        None => {
            if get_or_head {
                if let (Some(since), Some(lm)) = (
                    date_field(req, &IF_MODIFIED_SINCE),
                    stored_last_modified(stored),
                ) {
                    if lm <= since {
                        return Precondition::NotModified;
                    }
                }
            }
        }
    }
    Precondition::Proceed
}

/// The header fields a 304 carries from the stored response (RFC 9110 §15.4.5):
/// `Cache-Control`, `Content-Location`, `Date`, `ETag`, `Expires`, `Vary` and
/// `Last-Modified`, every line of each.
pub fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        CACHE_CONTROL,
        CONTENT_LOCATION,
        DATE,
        ETAG,
        EXPIRES,
        VARY,
        LAST_MODIFIED,
    ] {
        for v in stored.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

const DAYS: [&[u8]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
const LONG_DAYS: [&[u8]; 7] = [
    b"Monday",
    b"Tuesday",
    b"Wednesday",
    b"Thursday",
    b"Friday",
    b"Saturday",
    b"Sunday",
];
const MONTHS: [&[u8]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// Parses an HTTP-date (RFC 9110 §5.6.7) in any of its three formats: IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`), the obsolete RFC 850 form
/// (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`).
///
/// Names are case-sensitive as in the grammar; the day name must be a valid one but is
/// not checked against the date. A two-digit RFC 850 year more than 50 years in the
/// future is taken as the most recent past year with those digits (§5.6.7). Seconds
/// `60` (leap second) and dates before 1970 are rejected.
pub fn parse_http_date(v: &HeaderValue) -> Option<SystemTime> {
    let s = trim_ows(v.as_bytes());
    parse_imf_fixdate(s)
        .or_else(|| parse_rfc850(s))
        .or_else(|| parse_asctime(s))
        .and_then(to_system_time)
}

/// Broken-down UTC time: year, month (1–12), day, hour, minute, second.
type Civil = (i64, u32, u32, u32, u32, u32);

fn parse_imf_fixdate(s: &[u8]) -> Option<Civil> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    if s.len() != 29 {
        return None;
    }
    let (day_name, rest) = s.split_at_checked(3)?;
    if !DAYS.contains(&day_name) {
        return None;
    }
    let rest = rest.strip_prefix(b", ")?;
    let (day, rest) = digits(rest, 2)?;
    let rest = rest.strip_prefix(b" ")?;
    let (month, rest) = month(rest)?;
    let rest = rest.strip_prefix(b" ")?;
    let (year, rest) = digits(rest, 4)?;
    let rest = rest.strip_prefix(b" ")?;
    let (h, m, sec, rest) = time_of_day(rest)?;
    if rest != b" GMT" {
        return None;
    }
    Some((i64::from(year), month, day, h, m, sec))
}

fn parse_rfc850(s: &[u8]) -> Option<Civil> {
    // "Sunday, 06-Nov-94 08:49:37 GMT"
    let comma = s.iter().position(|&b| b == b',')?;
    let (day_name, rest) = s.split_at_checked(comma)?;
    if !LONG_DAYS.contains(&day_name) {
        return None;
    }
    let rest = rest.strip_prefix(b", ")?;
    let (day, rest) = digits(rest, 2)?;
    let rest = rest.strip_prefix(b"-")?;
    let (month, rest) = month(rest)?;
    let rest = rest.strip_prefix(b"-")?;
    let (yy, rest) = digits(rest, 2)?;
    let rest = rest.strip_prefix(b" ")?;
    let (h, m, sec, rest) = time_of_day(rest)?;
    if rest != b" GMT" {
        return None;
    }
    let this_year = current_year();
    let mut year = this_year - this_year.rem_euclid(100) + i64::from(yy);
    if year > this_year + 50 {
        year -= 100;
    }
    Some((year, month, day, h, m, sec))
}

fn parse_asctime(s: &[u8]) -> Option<Civil> {
    // "Sun Nov  6 08:49:37 1994"
    if s.len() != 24 {
        return None;
    }
    let (day_name, rest) = s.split_at_checked(3)?;
    if !DAYS.contains(&day_name) {
        return None;
    }
    let rest = rest.strip_prefix(b" ")?;
    let (month, rest) = month(rest)?;
    let rest = rest.strip_prefix(b" ")?;
    let (day, rest) = match rest.strip_prefix(b" ") {
        Some(r) => digits(r, 1)?,
        None => digits(rest, 2)?,
    };
    let rest = rest.strip_prefix(b" ")?;
    let (h, m, sec, rest) = time_of_day(rest)?;
    let rest = rest.strip_prefix(b" ")?;
    let (year, rest) = digits(rest, 4)?;
    if !rest.is_empty() {
        return None;
    }
    Some((i64::from(year), month, day, h, m, sec))
}

/// `n` ASCII digits at the start of `s`, as a number, and the rest.
fn digits(s: &[u8], n: usize) -> Option<(u32, &[u8])> {
    let (d, rest) = s.split_at_checked(n)?;
    let mut v = 0u32;
    for &b in d {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(b - b'0'); // at most 4 digits: no overflow
    }
    Some((v, rest))
}

fn month(s: &[u8]) -> Option<(u32, &[u8])> {
    let (m, rest) = s.split_at_checked(3)?;
    let idx = MONTHS.iter().position(|&x| x == m)?;
    Some((u32::try_from(idx).ok()? + 1, rest))
}

/// `HH:MM:SS` at the start of `s`.
fn time_of_day(s: &[u8]) -> Option<(u32, u32, u32, &[u8])> {
    let (h, rest) = digits(s, 2)?;
    let rest = rest.strip_prefix(b":")?;
    let (m, rest) = digits(rest, 2)?;
    let rest = rest.strip_prefix(b":")?;
    let (sec, rest) = digits(rest, 2)?;
    Some((h, m, sec, rest))
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn to_system_time((y, mo, d, h, mi, s): Civil) -> Option<SystemTime> {
    if y < 1970 || d == 0 || d > days_in_month(y, mo) || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let days = u64::try_from(days_from_civil(y, mo, d)).ok()?;
    let secs = days * 86_400 + u64::from(h * 3600 + mi * 60 + s);
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn current_year() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    // Inverse of days_from_civil, year only.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let y = yoe + era * 400;
    if mp >= 10 {
        y + 1
    } else {
        y
    }
}

/// Formats `t` as an IMF-fixdate (for tests and for callers building `Date` fields).
pub fn fmt_http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // 1970-01-01 was a Thursday (index 3 in DAYS).
    let wd = usize::try_from((days + 3).rem_euclid(7)).unwrap_or(0);
    let name = |arr: &[&[u8]], i: usize| {
        arr.get(i)
            .map_or(String::new(), |b| String::from_utf8_lossy(b).into_owned())
    };
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        name(&DAYS, wd),
        d,
        name(&MONTHS, usize::try_from(m - 1).unwrap_or(0)),
        y,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), hv(v));
        }
        h
    }

    fn tag(weak: bool, s: &str) -> EntityTag {
        EntityTag {
            weak,
            opaque: s.as_bytes().to_vec(),
        }
    }

    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    const BEFORE: &str = "Sat, 05 Nov 1994 08:49:37 GMT";
    const AFTER: &str = "Mon, 07 Nov 1994 08:49:37 GMT";

    fn stored() -> HeaderMap {
        headers(&[
            ("etag", "\"v1\""),
            ("last-modified", LM),
            ("cache-control", "max-age=60"),
            ("content-type", "text/plain"),
            ("date", AFTER),
        ])
    }

    fn eval(method: Method, req: &[(&str, &str)]) -> Precondition {
        evaluate(&method, &headers(req), &stored())
    }

    #[test]
    fn http_date_three_formats() {
        let want = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_http_date(&hv(LM)), Some(want));
        assert_eq!(
            parse_http_date(&hv("Sunday, 06-Nov-94 08:49:37 GMT")),
            Some(want)
        );
        assert_eq!(parse_http_date(&hv("Sun Nov  6 08:49:37 1994")), Some(want));
        assert_eq!(
            parse_http_date(&hv("  Sun, 06 Nov 1994 08:49:37 GMT ")),
            Some(want)
        );
    }

    #[test]
    fn http_date_rejects_invalid() {
        for bad in [
            "",
            "yesterday",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 29 Feb 2023 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:60:00 GMT",
            "Sun, 06 Nov 1994 08:49:60 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMTX",
            "Sun, 0a Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:3",
            "Sun Nov 6 08:49:37 1994",
            "Sunday, 06-Nov-1994 08:49:37 GMT",
            "Funday, 06-Nov-94 08:49:37 GMT",
            ",,,,",
        ] {
            assert_eq!(parse_http_date(&hv(bad)), None, "{bad:?}");
        }
        let binary = HeaderValue::from_bytes(b"\xff\xfe, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_http_date(&binary), None);
    }

    #[test]
    fn http_date_leap_day_and_format_round_trip() {
        let t = parse_http_date(&hv("Thu, 29 Feb 2024 23:59:59 GMT")).unwrap();
        assert_eq!(fmt_http_date(t), "Thu, 29 Feb 2024 23:59:59 GMT");
        assert_eq!(fmt_http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        for secs in [0u64, 951_782_400, 1_700_000_000, 4_102_444_800, 784_111_777] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_http_date(&hv(&fmt_http_date(t))), Some(t), "{secs}");
        }
    }

    #[test]
    fn rfc850_two_digit_year_window() {
        let year = current_year();
        assert!(year >= 2024);
        // 1994 is in the past either way; a year ~49 ahead stays in this century.
        let yy = (year + 49) % 100;
        let s = format!("Monday, 01-Jan-{yy:02} 00:00:00 GMT");
        let t = parse_http_date(&hv(&s)).unwrap();
        let expect = format!("01 Jan {} 00:00:00 GMT", year + 49);
        assert!(fmt_http_date(t).ends_with(&expect), "{}", fmt_http_date(t));
        // ~51 years ahead maps to the previous century.
        let yy = (year + 51) % 100;
        let s = format!("Monday, 01-Jan-{yy:02} 00:00:00 GMT");
        let t = parse_http_date(&hv(&s)).unwrap();
        let expect = format!("01 Jan {} 00:00:00 GMT", year + 51 - 100);
        assert!(fmt_http_date(t).ends_with(&expect), "{}", fmt_http_date(t));
    }

    #[test]
    fn etag_list_parsing() {
        assert_eq!(etag_list(&hv("*")), Some(EtagList::Any));
        assert_eq!(etag_list(&hv(" * ")), Some(EtagList::Any));
        assert_eq!(
            etag_list(&hv("\"a\", W/\"b\" ,\"c,d\"")),
            Some(EtagList::Tags(vec![
                tag(false, "a"),
                tag(true, "b"),
                tag(false, "c,d")
            ]))
        );
        assert_eq!(
            etag_list(&hv(" , \"a\",,\t\"\" ,")),
            Some(EtagList::Tags(vec![tag(false, "a"), tag(false, "")]))
        );
        assert_eq!(etag_list(&hv("")), Some(EtagList::Tags(vec![])));
        for bad in [
            "a",
            "\"a",
            "\"a\" \"b\"",
            "w/\"a\"",
            "W/ \"a\"",
            "\"a\"b",
            "\"a b\"",
            "*, \"a\"",
            "\"a\", *",
            "W/",
        ] {
            assert_eq!(etag_list(&hv(bad)), None, "{bad:?}");
        }
        let obs = HeaderValue::from_bytes(b"\"\xe9t\xe9\"").unwrap();
        assert_eq!(
            etag_list(&obs),
            Some(EtagList::Tags(vec![EntityTag {
                weak: false,
                opaque: b"\xe9t\xe9".to_vec()
            }]))
        );
        let long = vec!["\"x\""; MAX_ETAGS + 1].join(",");
        assert_eq!(etag_list(&hv(&long)), None);
        let ok = vec!["\"x\""; MAX_ETAGS].join(",");
        assert!(etag_list(&hv(&ok)).is_some());
    }

    #[test]
    fn etag_field_combines_lines() {
        let h = headers(&[("if-match", "\"a\""), ("if-match", "\"b\", \"c\"")]);
        assert_eq!(
            etag_field(&h, &IF_MATCH),
            Some(Some(EtagList::Tags(vec![
                tag(false, "a"),
                tag(false, "b"),
                tag(false, "c")
            ])))
        );
        let h = headers(&[("if-match", "*"), ("if-match", "\"b\"")]);
        assert_eq!(etag_field(&h, &IF_MATCH), Some(None));
        let h = headers(&[("if-match", "\"a\""), ("if-match", "junk")]);
        assert_eq!(etag_field(&h, &IF_MATCH), Some(None));
        assert_eq!(etag_field(&HeaderMap::new(), &IF_MATCH), None);
    }

    #[test]
    fn comparison_functions() {
        // RFC 9110 §8.8.3.2 table.
        assert!(!tag(true, "1").strong_eq(&tag(true, "1")));
        assert!(tag(true, "1").weak_eq(&tag(true, "1")));
        assert!(!tag(true, "1").strong_eq(&tag(true, "2")));
        assert!(!tag(true, "1").weak_eq(&tag(true, "2")));
        assert!(!tag(true, "1").strong_eq(&tag(false, "1")));
        assert!(tag(true, "1").weak_eq(&tag(false, "1")));
        assert!(tag(false, "1").strong_eq(&tag(false, "1")));
        assert!(tag(false, "1").weak_eq(&tag(false, "1")));
    }

    #[test]
    fn no_preconditions_proceed() {
        assert_eq!(eval(Method::GET, &[]), Precondition::Proceed);
        assert_eq!(eval(Method::POST, &[]), Precondition::Proceed);
    }

    #[test]
    fn if_match() {
        assert_eq!(
            eval(Method::GET, &[("if-match", "\"v1\"")]),
            Precondition::Proceed
        );
        assert_eq!(
            eval(Method::GET, &[("if-match", "\"x\", \"v1\"")]),
            Precondition::Proceed
        );
        assert_eq!(
            eval(Method::GET, &[("if-match", "*")]),
            Precondition::Proceed
        );
        assert_eq!(
            eval(Method::PUT, &[("if-match", "\"v2\"")]),
            Precondition::Failed
        );
        // Strong comparison: a weak tag never matches.
        assert_eq!(
            eval(Method::GET, &[("if-match", "W/\"v1\"")]),
            Precondition::Failed
        );
        let weak_stored = headers(&[("etag", "W/\"v1\"")]);
        assert_eq!(
            evaluate(
                &Method::GET,
                &headers(&[("if-match", "\"v1\"")]),
                &weak_stored
            ),
            Precondition::Failed
        );
        // No stored ETag: only `*` matches.
        let no_etag = headers(&[("last-modified", LM)]);
        assert_eq!(
            evaluate(&Method::GET, &headers(&[("if-match", "\"v1\"")]), &no_etag),
            Precondition::Failed
        );
        assert_eq!(
            evaluate(&Method::GET, &headers(&[("if-match", "*")]), &no_etag),
            Precondition::Proceed
        );
    }

    #[test]
    fn malformed_if_match_is_ignored() {
        assert_eq!(
            eval(Method::GET, &[("if-match", "v2")]),
            Precondition::Proceed
        );
        // ... so If-Unmodified-Since is evaluated.
        assert_eq!(
            eval(
                Method::GET,
                &[("if-match", "v2"), ("if-unmodified-since", BEFORE)]
            ),
            Precondition::Failed
        );
    }

    #[test]
    fn if_unmodified_since() {
        assert_eq!(
            eval(Method::GET, &[("if-unmodified-since", BEFORE)]),
            Precondition::Failed
        );
        assert_eq!(
            eval(Method::GET, &[("if-unmodified-since", LM)]),
            Precondition::Proceed
        );
        assert_eq!(
            eval(Method::DELETE, &[("if-unmodified-since", AFTER)]),
            Precondition::Proceed
        );
        // Invalid date: ignored.
        assert_eq!(
            eval(Method::GET, &[("if-unmodified-since", "garbage")]),
            Precondition::Proceed
        );
        // Ignored when If-Match is present (and passes).
        assert_eq!(
            eval(
                Method::GET,
                &[("if-match", "\"v1\""), ("if-unmodified-since", BEFORE)]
            ),
            Precondition::Proceed
        );
        // No stored Last-Modified: not evaluated.
        let no_lm = headers(&[("etag", "\"v1\"")]);
        assert_eq!(
            evaluate(
                &Method::GET,
                &headers(&[("if-unmodified-since", BEFORE)]),
                &no_lm
            ),
            Precondition::Proceed
        );
    }

    #[test]
    fn if_none_match() {
        assert_eq!(
            eval(Method::GET, &[("if-none-match", "\"v1\"")]),
            Precondition::NotModified
        );
        assert_eq!(
            eval(Method::HEAD, &[("if-none-match", "W/\"v1\"")]),
            Precondition::NotModified
        );
        assert_eq!(
            eval(
                Method::GET,
                &[("if-none-match", "\"a\", \"b,\\\", W/\"v1\"")]
            ),
            Precondition::NotModified
        );
        assert_eq!(
            eval(Method::GET, &[("if-none-match", "*")]),
            Precondition::NotModified
        );
        assert_eq!(
            eval(Method::POST, &[("if-none-match", "*")]),
            Precondition::Failed
        );
        assert_eq!(
            eval(Method::PUT, &[("if-none-match", "\"v1\"")]),
            Precondition::Failed
        );
        assert_eq!(
            eval(Method::GET, &[("if-none-match", "\"v2\"")]),
            Precondition::Proceed
        );
        // A comma inside a quoted tag does not split it.
        assert_eq!(
            eval(Method::GET, &[("if-none-match", "\"v1,x\"")]),
            Precondition::Proceed
        );
        // Weak stored tag matches under the weak comparison.
        let weak_stored = headers(&[("etag", "W/\"v1\"")]);
        assert_eq!(
            evaluate(
                &Method::GET,
                &headers(&[("if-none-match", "\"v1\"")]),
                &weak_stored
            ),
            Precondition::NotModified
        );
    }

    #[test]
    fn malformed_if_none_match_matches_nothing() {
        assert_eq!(
            eval(Method::GET, &[("if-none-match", "v1")]),
            Precondition::Proceed
        );
        // Present (though malformed): If-Modified-Since is not evaluated.
        assert_eq!(
            eval(
                Method::GET,
                &[("if-none-match", "v1"), ("if-modified-since", AFTER)]
            ),
            Precondition::Proceed
        );
    }

    #[test]
    fn if_modified_since() {
        assert_eq!(
            eval(Method::GET, &[("if-modified-since", LM)]),
            Precondition::NotModified
        );
        assert_eq!(
            eval(Method::HEAD, &[("if-modified-since", AFTER)]),
            Precondition::NotModified
        );
        assert_eq!(
            eval(Method::GET, &[("if-modified-since", BEFORE)]),
            Precondition::Proceed
        );
        // Only GET/HEAD.
        assert_eq!(
            eval(Method::POST, &[("if-modified-since", AFTER)]),
            Precondition::Proceed
        );
        // Invalid or repeated: ignored.
        assert_eq!(
            eval(Method::GET, &[("if-modified-since", "Sun, 06 Nov 1994")]),
            Precondition::Proceed
        );
        assert_eq!(
            eval(
                Method::GET,
                &[("if-modified-since", AFTER), ("if-modified-since", AFTER)]
            ),
            Precondition::Proceed
        );
        // Ignored when If-None-Match is present, even if it does not match.
        assert_eq!(
            eval(
                Method::GET,
                &[("if-none-match", "\"v2\""), ("if-modified-since", AFTER)]
            ),
            Precondition::Proceed
        );
        // No Last-Modified: Date is not used.
        let no_lm = headers(&[("etag", "\"v1\""), ("date", BEFORE)]);
        assert_eq!(
            evaluate(
                &Method::GET,
                &headers(&[("if-modified-since", AFTER)]),
                &no_lm
            ),
            Precondition::Proceed
        );
    }

    #[test]
    fn order_if_match_before_if_none_match() {
        // If-Match fails first: 412 even though If-None-Match would give 304.
        assert_eq!(
            eval(
                Method::GET,
                &[("if-match", "\"nope\""), ("if-none-match", "\"v1\"")]
            ),
            Precondition::Failed
        );
        // If-Unmodified-Since fails before If-None-Match is looked at.
        assert_eq!(
            eval(
                Method::GET,
                &[("if-unmodified-since", BEFORE), ("if-none-match", "\"v1\"")]
            ),
            Precondition::Failed
        );
        // Both pass: If-None-Match decides.
        assert_eq!(
            eval(
                Method::GET,
                &[("if-match", "\"v1\""), ("if-none-match", "\"v1\"")]
            ),
            Precondition::NotModified
        );
    }

    #[test]
    fn ignored_methods() {
        for m in [Method::OPTIONS, Method::TRACE, Method::CONNECT] {
            assert_eq!(eval(m, &[("if-match", "\"nope\"")]), Precondition::Proceed);
        }
    }

    #[test]
    fn not_modified_header_selection() {
        let mut s = stored();
        s.append("vary", hv("accept-encoding"));
        s.append("vary", hv("accept-language"));
        s.append("content-location", hv("/a"));
        s.append("expires", hv(AFTER));
        s.append("content-length", hv("10"));
        s.append("set-cookie", hv("a=b"));
        let h = not_modified_headers(&s);
        assert_eq!(h.get("etag").unwrap(), "\"v1\"");
        assert_eq!(h.get("last-modified").unwrap(), LM);
        assert_eq!(h.get("cache-control").unwrap(), "max-age=60");
        assert_eq!(h.get("date").unwrap(), AFTER);
        assert_eq!(h.get("expires").unwrap(), AFTER);
        assert_eq!(h.get("content-location").unwrap(), "/a");
        assert_eq!(h.get_all("vary").iter().count(), 2);
        assert!(h.get("content-type").is_none());
        assert!(h.get("content-length").is_none());
        assert!(h.get("set-cookie").is_none());
        assert_eq!(h.len(), 8);
    }
}
