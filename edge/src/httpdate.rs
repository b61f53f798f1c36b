//! HTTP-dates (RFC 9110 §5.6.7): parsing all three formats a recipient must accept, and
//! formatting the one a sender must use (IMF-fixdate). Used by the cache (freshness,
//! validators, `If-Range`) and by the test origin.
//!
//! Our own parser rather than the `httpdate` crate (already in the tree through hyper):
//! that crate maps two-digit RFC 850 years with a fixed 1970 pivot instead of §5.6.7's
//! "more than 50 years in the future" rule, rejects a day name that does not match the
//! date, and does not trim optional whitespace.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;

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
/// Names (days, months, `GMT`) match case-insensitively, as RFC 9111 §4.2 asks of a
/// cache (the grammar is case-sensitive, senders are not always); the day name must be
/// a valid one but is not checked against the date. A two-digit RFC 850 year more than 50 years in the
/// future is taken as the most recent past year with those digits (§5.6.7). Seconds
/// `60` (leap second) and dates before 1970 are rejected.
pub fn parse_http_date(v: &HeaderValue) -> Option<SystemTime> {
    // A field value holds no control characters but tab: ASCII whitespace here is
    // exactly optional whitespace (SP / HTAB).
    let s = v.as_bytes().trim_ascii();
    parse_imf_fixdate(s)
        .or_else(|| parse_rfc850(s))
        .or_else(|| parse_asctime(s))
        .and_then(to_system_time)
}

/// Formats `t` as an IMF-fixdate (for tests and for callers building `Date` fields).
pub fn fmt_http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
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

/// Broken-down UTC time: year, month (1–12), day, hour, minute, second.
type Civil = (i64, u32, u32, u32, u32, u32);

fn parse_imf_fixdate(s: &[u8]) -> Option<Civil> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    if s.len() != 29 {
        return None;
    }
    let (day_name, rest) = s.split_at_checked(3)?;
    if !is_one_of(&DAYS, day_name) {
        return None;
    }
    let rest = rest.strip_prefix(b", ")?;
    let (day, month, year, h, m, sec) = date_time_gmt(rest, b" ", 4)?;
    Some((i64::from(year), month, day, h, m, sec))
}

fn parse_rfc850(s: &[u8]) -> Option<Civil> {
    // "Sunday, 06-Nov-94 08:49:37 GMT"
    let comma = s.iter().position(|&b| b == b',')?;
    let (day_name, rest) = s.split_at_checked(comma)?;
    if !is_one_of(&LONG_DAYS, day_name) {
        return None;
    }
    let rest = rest.strip_prefix(b", ")?;
    let (day, month, yy, h, m, sec) = date_time_gmt(rest, b"-", 2)?;
    let this_year = current_year();
    let mut year = this_year - this_year.rem_euclid(100) + i64::from(yy);
    if year > this_year + 50 {
        year -= 100;
    }
    Some((year, month, day, h, m, sec))
}

/// `DD<sep>Mon<sep>YYYY HH:MM:SS GMT` with `year_digits` digits of year, the part
/// IMF-fixdate and RFC 850 share: day, month, year, hour, minute, second.
fn date_time_gmt(
    s: &[u8],
    sep: &[u8],
    year_digits: usize,
) -> Option<(u32, u32, u32, u32, u32, u32)> {
    let (day, rest) = digits(s, 2)?;
    let rest = rest.strip_prefix(sep)?;
    let (month, rest) = month(rest)?;
    let rest = rest.strip_prefix(sep)?;
    let (year, rest) = digits(rest, year_digits)?;
    let rest = rest.strip_prefix(b" ")?;
    let (h, m, sec, rest) = time_of_day(rest)?;
    rest.eq_ignore_ascii_case(b" GMT")
        .then_some((day, month, year, h, m, sec))
}

fn parse_asctime(s: &[u8]) -> Option<Civil> {
    // "Sun Nov  6 08:49:37 1994"
    if s.len() != 24 {
        return None;
    }
    let (day_name, rest) = s.split_at_checked(3)?;
    if !is_one_of(&DAYS, day_name) {
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

/// Whether `name` is one of `names`, ignoring ASCII case.
fn is_one_of(names: &[&[u8]], name: &[u8]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
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
    let idx = MONTHS.iter().position(|x| x.eq_ignore_ascii_case(m))?;
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

/// Year, month (1–12) and day of the date `days` after 1970-01-01: the inverse of
/// [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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
    civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0)).0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn http_date_three_formats() {
        let want = UNIX_EPOCH + Duration::from_secs(784_111_777);
        for (name, s) in [
            ("IMF-fixdate", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("RFC 850", "Sunday, 06-Nov-94 08:49:37 GMT"),
            ("asctime", "Sun Nov  6 08:49:37 1994"),
            ("optional whitespace", "  Sun, 06 Nov 1994 08:49:37 GMT "),
            // RFC 9111 §4.2: a cache matches the names case-insensitively.
            ("lowercase names", "sun, 06 nov 1994 08:49:37 gmt"),
            ("uppercase names", "SUNDAY, 06-NOV-94 08:49:37 GMT"),
            ("mixed-case asctime", "sUN nOV  6 08:49:37 1994"),
        ] {
            assert_eq!(parse_http_date(&hv(s)), Some(want), "{name}: {s:?}");
        }
    }

    #[test]
    fn http_date_rejects_invalid() {
        let cases: [(&str, &[u8]); 19] = [
            ("empty", b""),
            ("not a date", b"yesterday"),
            ("zone not GMT", b"Sun, 06 Nov 1994 08:49:37 UTC"),
            ("one-digit day", b"Sun, 6 Nov 1994 08:49:37 GMT"),
            ("31 February", b"Sun, 31 Feb 1994 08:49:37 GMT"),
            ("29 February, common year", b"Sun, 29 Feb 2023 08:49:37 GMT"),
            ("hour 24", b"Sun, 06 Nov 1994 24:00:00 GMT"),
            ("minute 60", b"Sun, 06 Nov 1994 08:60:00 GMT"),
            ("leap second", b"Sun, 06 Nov 1994 08:49:60 GMT"),
            ("before 1970", b"Sun, 06 Nov 1969 08:49:37 GMT"),
            ("unknown day name", b"Xyz, 06 Nov 1994 08:49:37 GMT"),
            ("trailing garbage", b"Sun, 06 Nov 1994 08:49:37 GMTX"),
            ("non-digit day", b"Sun, 0a Nov 1994 08:49:37 GMT"),
            ("truncated", b"Sun, 06 Nov 1994 08:49:3"),
            ("asctime, one space", b"Sun Nov 6 08:49:37 1994"),
            (
                "RFC 850, four-digit year",
                b"Sunday, 06-Nov-1994 08:49:37 GMT",
            ),
            ("RFC 850, unknown day", b"Funday, 06-Nov-94 08:49:37 GMT"),
            ("commas", b",,,,"),
            ("non-ASCII day name", b"\xff\xfe, 06 Nov 1994 08:49:37 GMT"),
        ];
        for (name, bad) in cases {
            let v = HeaderValue::from_bytes(bad).unwrap();
            assert_eq!(parse_http_date(&v), None, "{name}: {v:?}");
        }
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
        // 1994 is in the past either way.
        for (name, ahead, expect_year) in [
            ("~49 years ahead stays in this century", 49, year + 49),
            (
                "~51 years ahead is the previous century",
                51,
                year + 51 - 100,
            ),
        ] {
            let yy = (year + ahead) % 100;
            let s = format!("Monday, 01-Jan-{yy:02} 00:00:00 GMT");
            let t = parse_http_date(&hv(&s)).unwrap();
            let expect = format!("01 Jan {expect_year} 00:00:00 GMT");
            assert!(
                fmt_http_date(t).ends_with(&expect),
                "{name}: {}",
                fmt_http_date(t)
            );
        }
    }
}
