//! RFC 9111 shared-cache rules: directive parsing, storability (§3), freshness
//! lifetime (§4.2.1–4.2.2), age (§4.2.3), request directives (§5.2.1), stale serving
//! (§4.2.4 and RFC 5861) and `CDN-Cache-Control` (RFC 9213).
//!
//! Written here rather than taken from `http-cache-semantics` (3.0): that crate follows
//! RFC 7234, does not know `CDN-Cache-Control`, `stale-while-revalidate` or
//! `stale-if-error`, splits directives without honouring quoted strings, and clones
//! both header maps on every lookup, which a hit path meant to beat nginx cannot pay.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::httpdate::parse_http_date;

/// RFC 9111 §1.2.2: a delta-seconds too large to represent counts as 2^31.
const DELTA_MAX: u64 = 2_147_483_648;
/// Heuristic freshness is this fraction of the time since `Last-Modified` ...
const HEURISTIC_FRACTION: f64 = 0.1;
/// ... capped at this (RFC 9111 §4.2.2 leaves the cap to the cache).
const HEURISTIC_MAX: Duration = Duration::from_secs(24 * 3600);

static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// A delta-seconds directive value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Delta {
    /// Not present.
    #[default]
    Absent,
    /// Present with a valid value (seconds).
    Secs(u64),
    /// Present but malformed or given twice with different values: the response's
    /// freshness information is invalid (RFC 9111 §4.2.1: treat as stale).
    Invalid,
}

impl Delta {
    fn set(&mut self, value: Option<&str>) {
        let parsed = value.and_then(parse_delta);
        *self = match (*self, parsed) {
            (Delta::Absent, Some(v)) => Delta::Secs(v),
            (Delta::Secs(old), Some(v)) if old == v => Delta::Secs(v),
            _ => Delta::Invalid,
        };
    }

    fn is_present(self) -> bool {
        self != Delta::Absent
    }
}

/// delta-seconds = 1*DIGIT; overflow counts as 2^31 (RFC 9111 §1.2.2).
fn parse_delta(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX))
}

/// Cache-Control directives (of a request or a response), as this cache uses them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Directives {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (qualified forms are treated as unqualified, which RFC 9111
    /// §5.2.2.4 allows).
    pub no_cache: bool,
    /// `private` without field names: a shared cache stores nothing.
    pub private: bool,
    /// The field names of a qualified `private="..."`: a shared cache may store the
    /// response without them (RFC 9111 §5.2.2.7).
    pub private_fields: Vec<HeaderName>,
    /// `must-understand`: store only statuses whose caching rules this cache knows.
    pub must_understand: bool,
    /// `immutable` (RFC 8246): the response will not change while fresh.
    pub immutable: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `only-if-cached` (request).
    pub only_if_cached: bool,
    /// `max-age`.
    pub max_age: Delta,
    /// `s-maxage`.
    pub s_maxage: Delta,
    /// `min-fresh` (request).
    pub min_fresh: Delta,
    /// `max-stale` (request): `Some(None)` for any staleness, `Some(Some(n))` for at
    /// most `n` seconds.
    pub max_stale: Option<Option<u64>>,
    /// `stale-while-revalidate` (RFC 5861).
    pub stale_while_revalidate: Delta,
    /// `stale-if-error` (RFC 5861).
    pub stale_if_error: Delta,
}

impl Directives {
    /// Parses every field line of `values` (comma-separated directives, quoted
    /// strings honoured, names case-insensitive). Unknown directives are ignored.
    pub(crate) fn parse<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Directives {
        let mut d = Directives::default();
        for value in values {
            for (name, arg) in split_directives(value.as_bytes()) {
                d.apply(&name, arg.as_deref());
            }
        }
        d
    }

    fn apply(&mut self, name: &str, arg: Option<&str>) {
        match name {
            "no-store" => self.no_store = true,
            "no-cache" => self.no_cache = true,
            "private" => match arg.map(field_names) {
                Some(names) if !names.is_empty() => self.private_fields.extend(names),
                _ => self.private = true,
            },
            "must-understand" => self.must_understand = true,
            "immutable" => self.immutable = true,
            "public" => self.public = true,
            "must-revalidate" => self.must_revalidate = true,
            "proxy-revalidate" => self.proxy_revalidate = true,
            "only-if-cached" => self.only_if_cached = true,
            "max-age" => self.max_age.set(arg),
            "s-maxage" => self.s_maxage.set(arg),
            "min-fresh" => self.min_fresh.set(arg),
            "max-stale" => {
                // A malformed max-stale allows no staleness.
                self.max_stale = Some(arg.map(|v| parse_delta(v).unwrap_or(0)))
            }
            "stale-while-revalidate" => self.stale_while_revalidate.set(arg),
            "stale-if-error" => self.stale_if_error.set(arg),
            _ => {}
        }
    }
}

/// The field names of a qualified directive (`"set-cookie, x-user"`); a name that is not
/// a field name makes the whole list count as none (the directive then applies to the
/// whole response, the safe reading).
fn field_names(list: &str) -> Vec<HeaderName> {
    let names: Option<Vec<HeaderName>> = list
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    names.unwrap_or_default()
}

/// Splits `a, b=1, c="x, y"` into (lowercase name, unquoted argument) pairs. Malformed
/// pieces (an unterminated quote, an empty name) end or skip parsing without error.
fn split_directives(bytes: &[u8]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut i = 0;
    let n = bytes.len();
    while i < n {
        // name
        while i < n && (bytes[i] == b',' || bytes[i].is_ascii_whitespace()) {
            i += 1;
        }
        let start = i;
        while i < n && bytes[i] != b'=' && bytes[i] != b',' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let name = String::from_utf8_lossy(&bytes[start..i]).to_ascii_lowercase();
        while i < n && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut arg = None;
        if i < n && bytes[i] == b'=' {
            i += 1;
            while i < n && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < n && bytes[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                let mut closed = false;
                while i < n {
                    match bytes[i] {
                        b'\\' if i + 1 < n => {
                            v.push(bytes[i + 1]);
                            i += 2;
                        }
                        b'"' => {
                            closed = true;
                            i += 1;
                            break;
                        }
                        b => {
                            v.push(b);
                            i += 1;
                        }
                    }
                }
                if !closed {
                    break;
                }
                arg = Some(String::from_utf8_lossy(&v).into_owned());
            } else {
                let s = i;
                while i < n && bytes[i] != b',' {
                    i += 1;
                }
                arg = Some(String::from_utf8_lossy(&bytes[s..i]).trim().to_owned());
            }
        }
        // Anything up to the next comma is junk of this directive.
        while i < n && bytes[i] != b',' {
            i += 1;
        }
        if !name.is_empty() {
            out.push((name, arg));
        }
    }
    out
}

/// `Cache-Control` of `headers`, with `Pragma: no-cache` counting as `no-cache` when
/// there is no `Cache-Control` (RFC 9111 §5.4).
pub(crate) fn cache_control(headers: &HeaderMap) -> Directives {
    let mut d = Directives::parse(headers.get_all(header::CACHE_CONTROL));
    if !headers.contains_key(header::CACHE_CONTROL)
        && headers
            .get_all(header::PRAGMA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("no-cache"))
    {
        d.no_cache = true;
    }
    d
}

/// `CDN-Cache-Control` (RFC 9213), a Structured Fields Dictionary: a field that does
/// not parse is ignored as a whole, a directive this cache does not know or whose value
/// has the wrong type alone. `None` — the field absent, unparsable, or with no directive
/// left — lets `Cache-Control` govern.
fn cdn_directives(headers: &HeaderMap) -> Option<Directives> {
    let mut joined = Vec::new();
    for (i, v) in headers.get_all(&CDN_CACHE_CONTROL).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if joined.is_empty() {
        return None;
    }
    let dict: sfv::Dictionary = sfv::Parser::new(&joined).parse().ok()?;
    let mut d = Directives::default();
    let mut any = false;
    for (key, entry) in &dict {
        let sfv::ListEntry::Item(item) = entry else {
            continue;
        };
        any |= d.apply_structured(key.as_str(), &item.bare_item);
    }
    any.then_some(d)
}

impl Directives {
    /// Applies one `CDN-Cache-Control` member; whether it was understood.
    fn apply_structured(&mut self, name: &str, value: &sfv::BareItem) -> bool {
        let flag = match value {
            sfv::BareItem::Boolean(b) => Some(*b),
            _ => None,
        };
        let secs = match value {
            sfv::BareItem::Integer(i) => u64::try_from(i64::from(*i))
                .ok()
                .map(|v| Delta::Secs(v.min(DELTA_MAX))),
            _ => None,
        };
        let set = |field: &mut bool| flag.map(|f| *field = f).is_some();
        let delta = |field: &mut Delta| secs.map(|v| *field = v).is_some();
        match name {
            "no-store" => set(&mut self.no_store),
            "no-cache" => set(&mut self.no_cache),
            "public" => set(&mut self.public),
            "must-revalidate" => set(&mut self.must_revalidate),
            "proxy-revalidate" => set(&mut self.proxy_revalidate),
            "must-understand" => set(&mut self.must_understand),
            "immutable" => set(&mut self.immutable),
            "private" => match value {
                sfv::BareItem::String(list) => {
                    self.private_fields.extend(field_names(list.as_str()));
                    true
                }
                _ => set(&mut self.private),
            },
            "max-age" => delta(&mut self.max_age),
            "s-maxage" => delta(&mut self.s_maxage),
            "stale-while-revalidate" => delta(&mut self.stale_while_revalidate),
            "stale-if-error" => delta(&mut self.stale_if_error),
            _ => false,
        }
    }
}

/// Statuses whose caching rules this cache implements (`must-understand`).
fn understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 302 | 303 | 307 | 308 | 404 | 405 | 410 | 414 | 451 | 501
    )
}

/// Statuses heuristically cacheable (RFC 9110 §15.1), minus 206 which is not stored.
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 451 | 501
    )
}

/// Operator defaults applied when a response carries no RFC 5861 directive.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StaleDefaults {
    /// Default `stale-while-revalidate`.
    pub while_revalidate: Duration,
    /// Default `stale-if-error`.
    pub if_error: Duration,
}

/// What this cache knows of a stored (or storable) response's caching rules.
#[derive(Clone, Debug)]
pub(crate) struct ResponsePolicy {
    /// The governing directives: `CDN-Cache-Control` when present and usable, else
    /// `Cache-Control` (+ `Pragma: no-cache` when it has none).
    pub directives: Directives,
    /// Whether `CDN-Cache-Control` governs (then `Expires` is ignored too).
    pub cdn: bool,
    /// Freshness lifetime.
    pub lifetime: Duration,
    /// Whether the lifetime is heuristic (RFC 9111 §4.2.2); read by tests only.
    #[cfg_attr(not(test), allow(dead_code))]
    pub heuristic: bool,
    /// Stale serving forbidden (`must-revalidate`, `proxy-revalidate`, `s-maxage`,
    /// `no-cache`).
    pub no_stale: bool,
    /// Allowed staleness while revalidating in the background.
    pub stale_while_revalidate: Duration,
    /// Allowed staleness when the origin fails.
    pub stale_if_error: Duration,
}

impl ResponsePolicy {
    /// The policy of a response with `status` and `headers`, received at
    /// `response_time`.
    pub(crate) fn new(
        status: StatusCode,
        headers: &HeaderMap,
        response_time: SystemTime,
        defaults: StaleDefaults,
    ) -> ResponsePolicy {
        let cdn_directives = cdn_directives(headers);
        let cdn = cdn_directives.is_some();
        let directives = cdn_directives.unwrap_or_else(|| cache_control(headers));
        let date = date_value(headers).unwrap_or(response_time);
        let (lifetime, heuristic) = freshness_lifetime(status, headers, &directives, cdn, date);
        let no_stale = directives.must_revalidate
            || directives.proxy_revalidate
            || directives.s_maxage.is_present()
            || directives.no_cache;
        let pick = |d: Delta, default: Duration| match d {
            Delta::Secs(s) => Duration::from_secs(s),
            Delta::Invalid => Duration::ZERO,
            Delta::Absent => default,
        };
        ResponsePolicy {
            stale_while_revalidate: pick(
                directives.stale_while_revalidate,
                defaults.while_revalidate,
            ),
            stale_if_error: pick(directives.stale_if_error, defaults.if_error),
            directives,
            cdn,
            lifetime,
            heuristic,
            no_stale,
        }
    }

    /// Whether the response states its freshness: `max-age`, `s-maxage`, or (unless
    /// `CDN-Cache-Control` governs) `Expires` — valid or not.
    pub(crate) fn has_explicit_freshness(&self, headers: &HeaderMap) -> bool {
        self.directives.max_age.is_present()
            || self.directives.s_maxage.is_present()
            || (!self.cdn && headers.contains_key(header::EXPIRES))
    }

    /// Why a response to a GET may not be stored, or `None` when it may (RFC 9111 §3).
    pub(crate) fn not_storable(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        request: &HeaderMap,
        request_directives: &Directives,
    ) -> Option<&'static str> {
        let d = &self.directives;
        if request_directives.no_store {
            return Some("request no-store");
        }
        // RFC 9111 §3: any final status may be stored (206 and 304 are answers to
        // this request, never stored); with `must-understand`, only those whose
        // caching rules this cache knows.
        if status.is_informational()
            || matches!(
                status,
                StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
            )
            || (d.must_understand && !understood(status))
        {
            return Some("status");
        }
        if d.no_store {
            return Some("no-store");
        }
        if d.private {
            return Some("private");
        }
        if request.contains_key(header::AUTHORIZATION)
            && !(d.public || d.must_revalidate || d.s_maxage.is_present())
        {
            return Some("authorization");
        }
        if vary_names(headers).is_none() {
            return Some("vary *");
        }
        if !(self.has_explicit_freshness(headers) || d.public || heuristically_cacheable(status)) {
            return Some("no freshness");
        }
        None
    }
}

/// RFC 9111 §4.2.1: s-maxage, then max-age, then Expires − Date, then a heuristic.
fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    d: &Directives,
    cdn: bool,
    date: SystemTime,
) -> (Duration, bool) {
    match d.s_maxage {
        Delta::Secs(s) => return (Duration::from_secs(s), false),
        Delta::Invalid => return (Duration::ZERO, false),
        Delta::Absent => {}
    }
    match d.max_age {
        Delta::Secs(s) => return (Duration::from_secs(s), false),
        Delta::Invalid => return (Duration::ZERO, false),
        Delta::Absent => {}
    }
    if !cdn {
        let mut expires = headers.get_all(header::EXPIRES).iter();
        if let Some(first) = expires.next() {
            // Several Expires lines, or an invalid date (e.g. "0"): already expired.
            if expires.next().is_some() {
                return (Duration::ZERO, false);
            }
            return match parse_http_date(first) {
                Some(exp) => (exp.duration_since(date).unwrap_or(Duration::ZERO), false),
                None => (Duration::ZERO, false),
            };
        }
    }
    if heuristically_cacheable(status) || d.public {
        if let Some(lm) = headers.get(header::LAST_MODIFIED).and_then(parse_http_date) {
            if let Ok(since) = date.duration_since(lm) {
                let h = since.mul_f64(HEURISTIC_FRACTION).min(HEURISTIC_MAX);
                return (h, true);
            }
        }
    }
    (Duration::ZERO, false)
}

/// The `Date` of a response, if present and valid.
pub(crate) fn date_value(headers: &HeaderMap) -> Option<SystemTime> {
    headers.get(header::DATE).and_then(parse_http_date)
}

/// The names a response's `Vary` lists (lowercase, deduplicated, sorted); `None` for
/// `Vary: *` (never matches, RFC 9111 §4.1).
pub(crate) fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::VARY) {
        let Ok(s) = v.to_str() else {
            // Unreadable Vary: safest is never to match.
            return None;
        };
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if t == "*" {
                return None;
            }
            let Ok(name) = HeaderName::from_bytes(t.as_bytes()) else {
                return None;
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Some(names)
}

/// The `Age` a response arrived with (RFC 9111 §5.1): of a list (or several lines), the
/// first member; a value that is not a non-negative integer (`3s`, `-1`, `1.5`) is
/// ignored.
pub(crate) fn age_value(headers: &HeaderMap) -> Option<u64> {
    let first = headers.get(header::AGE)?.to_str().ok()?.split(',').next()?;
    parse_delta(first.trim())
}

/// The current age of a stored response (RFC 9111 §4.2.3), whole seconds.
pub(crate) fn current_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
    now: SystemTime,
) -> Duration {
    let date = date_value(headers).unwrap_or(response_time);
    let age_value = age_value(headers).map_or(Duration::ZERO, Duration::from_secs);
    let apparent_age = response_time.duration_since(date).unwrap_or(Duration::ZERO);
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    let corrected_age_value = age_value + response_delay;
    let corrected_initial_age = apparent_age.max(corrected_age_value);
    let resident_time = now.duration_since(response_time).unwrap_or(Duration::ZERO);
    corrected_initial_age + resident_time
}

/// What a request may get from a stored response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Usability {
    /// Fresh enough for this request: serve it.
    Fresh,
    /// Stale, but `stale-while-revalidate` allows serving it while one background
    /// request refreshes it.
    StaleWhileRevalidate,
    /// Stale and the request's `max-stale` accepts it.
    StaleAccepted,
    /// Must be revalidated (or fetched) before use; `stale-if-error` may still allow
    /// it when the origin fails.
    Revalidate,
}

/// Decides whether a stored response with `policy` and current `age` can serve a
/// request with directives `req` (RFC 9111 §4.2, §5.2.1; RFC 5861).
pub(crate) fn usability(policy: &ResponsePolicy, age: Duration, req: &Directives) -> Usability {
    if req.no_cache || policy.directives.no_cache {
        return Usability::Revalidate;
    }
    let lifetime = policy.lifetime;
    let fresh = age < lifetime;
    if fresh {
        // RFC 8246: an `immutable` response does not change while it is fresh, so a
        // browser reload's `max-age=0` is answered from the cache; a forced reload
        // (`no-cache`, above) still revalidates.
        let too_old = !policy.directives.immutable
            && (matches!(req.max_age, Delta::Secs(m) if age > Duration::from_secs(m))
                || req.max_age == Delta::Invalid);
        let not_fresh_enough = match req.min_fresh {
            Delta::Secs(m) => lifetime - age < Duration::from_secs(m),
            _ => false,
        };
        if !too_old && !not_fresh_enough {
            return Usability::Fresh;
        }
        return Usability::Revalidate;
    }
    if policy.no_stale {
        return Usability::Revalidate;
    }
    let staleness = age - lifetime;
    if let Some(max_stale) = req.max_stale {
        let ok = max_stale.is_none_or(|m| staleness <= Duration::from_secs(m));
        let age_ok = !matches!(req.max_age, Delta::Secs(m) if age > Duration::from_secs(m));
        if ok && age_ok {
            return Usability::StaleAccepted;
        }
    }
    if staleness <= policy.stale_while_revalidate && req.max_age == Delta::Absent {
        return Usability::StaleWhileRevalidate;
    }
    Usability::Revalidate
}

/// Whether a stale response may be served because the origin failed (RFC 5861 §4).
pub(crate) fn may_serve_stale_on_error(policy: &ResponsePolicy, age: Duration) -> bool {
    if policy.no_stale {
        return false;
    }
    age.saturating_sub(policy.lifetime) <= policy.stale_if_error
}

/// Whether `method` is unsafe, so that a non-error response to it invalidates stored
/// responses (RFC 9111 §4.4).
pub(crate) fn is_unsafe(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::httpdate::fmt_http_date;

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

    fn policy(pairs: &[(&str, &str)]) -> ResponsePolicy {
        let now = SystemTime::now();
        let mut h = headers(pairs);
        if !h.contains_key(header::DATE) {
            h.insert(
                header::DATE,
                HeaderValue::from_str(&fmt_http_date(now)).unwrap(),
            );
        }
        ResponsePolicy::new(StatusCode::OK, &h, now, StaleDefaults::default())
    }

    #[test]
    fn directives_parse_quoted_strings_and_case() {
        let d = Directives::parse(&[
            HeaderValue::from_static("Max-Age=60, no-cache=\"set-cookie, x\""),
            HeaderValue::from_static("s-maxage=\"30\"  , PUBLIC"),
        ]);
        assert_eq!(d.max_age, Delta::Secs(60));
        assert_eq!(d.s_maxage, Delta::Secs(30));
        assert!(d.no_cache && d.public);
        assert!(!d.private);
    }

    #[test]
    fn malformed_and_conflicting_values_are_invalid() {
        type Fields = &'static [(&'static str, &'static str)];
        let cases: [(&str, Fields, Duration); 5] = [
            (
                "malformed max-age",
                &[("cache-control", "max-age=abc")],
                Duration::ZERO,
            ),
            (
                "conflicting max-age",
                &[("cache-control", "max-age=60, max-age=120")],
                Duration::ZERO,
            ),
            (
                "repeated identical max-age",
                &[
                    ("cache-control", "max-age=60"),
                    ("cache-control", "max-age=60"),
                ],
                Duration::from_secs(60),
            ),
            (
                "max-age past 2^31",
                &[("cache-control", "max-age=99999999999999999999")],
                Duration::from_secs(DELTA_MAX),
            ),
            ("invalid Expires", &[("expires", "0")], Duration::ZERO),
        ];
        for (name, fields, lifetime) in cases {
            assert_eq!(policy(fields).lifetime, lifetime, "{name}");
        }
    }

    #[test]
    fn s_maxage_beats_max_age_beats_expires() {
        let p = policy(&[
            ("cache-control", "max-age=10, s-maxage=100"),
            ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
        ]);
        assert_eq!(p.lifetime, Duration::from_secs(100));
        assert!(p.no_stale, "s-maxage implies proxy-revalidate");
        let p = policy(&[
            ("cache-control", "max-age=10"),
            ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
        ]);
        assert_eq!(p.lifetime, Duration::from_secs(10));
        let p = policy(&[("expires", "Thu, 01 Jan 2099 00:00:00 GMT")]);
        assert!(p.lifetime > Duration::from_secs(3600 * 24 * 365));
    }

    #[test]
    fn cdn_cache_control_takes_precedence() {
        let p = policy(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=60"),
        ]);
        assert!(p.cdn);
        assert_eq!(p.lifetime, Duration::from_secs(60));
        assert!(p
            .not_storable(
                StatusCode::OK,
                &HeaderMap::new(),
                &HeaderMap::new(),
                &Directives::default()
            )
            .is_none());
        let p = policy(&[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "no-store"),
        ]);
        assert_eq!(
            p.not_storable(
                StatusCode::OK,
                &HeaderMap::new(),
                &HeaderMap::new(),
                &Directives::default()
            ),
            Some("no-store")
        );
    }

    #[test]
    fn heuristic_freshness_from_last_modified() {
        let ten_days = SystemTime::now() - Duration::from_secs(10 * 24 * 3600);
        let p = policy(&[("last-modified", &fmt_http_date(ten_days))]);
        assert!(p.heuristic);
        assert!(p.lifetime >= Duration::from_secs(23 * 3600));
    }

    #[test]
    fn storability_rules() {
        let none = Directives::default();
        let req = HeaderMap::new();
        let auth = headers(&[("authorization", "Bearer x")]);
        let p = policy(&[("cache-control", "private, max-age=60")]);
        assert_eq!(
            p.not_storable(StatusCode::OK, &HeaderMap::new(), &req, &none),
            Some("private")
        );
        let p = policy(&[("cache-control", "max-age=60")]);
        assert_eq!(
            p.not_storable(StatusCode::OK, &HeaderMap::new(), &auth, &none),
            Some("authorization")
        );
        let p = policy(&[("cache-control", "s-maxage=60")]);
        assert_eq!(
            p.not_storable(StatusCode::OK, &HeaderMap::new(), &auth, &none),
            None
        );
        let p = policy(&[]);
        assert_eq!(
            p.not_storable(StatusCode::FOUND, &HeaderMap::new(), &req, &none),
            Some("no freshness")
        );
        // Any final status with no freshness: not stored; with explicit freshness:
        // stored, unless must-understand names a status this cache does not know.
        assert_eq!(
            p.not_storable(
                StatusCode::INTERNAL_SERVER_ERROR,
                &HeaderMap::new(),
                &req,
                &none
            ),
            Some("no freshness")
        );
        let explicit = policy(&[("cache-control", "max-age=60")]);
        for status in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert_eq!(
                explicit.not_storable(status, &HeaderMap::new(), &req, &none),
                None
            );
        }
        let must = policy(&[("cache-control", "max-age=60, must-understand")]);
        assert_eq!(
            must.not_storable(
                StatusCode::SERVICE_UNAVAILABLE,
                &HeaderMap::new(),
                &req,
                &none
            ),
            Some("status")
        );
        assert_eq!(
            must.not_storable(StatusCode::OK, &HeaderMap::new(), &req, &none),
            None
        );
        for status in [
            StatusCode::PARTIAL_CONTENT,
            StatusCode::NOT_MODIFIED,
            StatusCode::CONTINUE,
        ] {
            assert_eq!(
                explicit.not_storable(status, &HeaderMap::new(), &req, &none),
                Some("status"),
                "{status}"
            );
        }
        // A qualified private names fields to leave out, not the whole response.
        let fields = policy(&[(
            "cache-control",
            "private=\"set-cookie, x-user\", max-age=60",
        )]);
        assert_eq!(
            fields.not_storable(StatusCode::OK, &HeaderMap::new(), &req, &none),
            None
        );
        assert_eq!(
            fields.directives.private_fields,
            vec![header::SET_COOKIE, HeaderName::from_static("x-user")]
        );
        let vary_star = headers(&[("vary", "accept, *")]);
        assert_eq!(
            p.not_storable(StatusCode::OK, &vary_star, &req, &none),
            Some("vary *")
        );
    }

    #[test]
    fn request_directives_decide_usability() {
        use Usability::{Fresh, Revalidate, StaleAccepted};
        let p = policy(&[("cache-control", "max-age=100")]);
        let mr = policy(&[("cache-control", "max-age=100, must-revalidate")]);
        let young = Duration::from_secs(50);
        let old = Duration::from_secs(150);
        let none = Directives::default;
        let req = |v: &str| cache_control(&headers(&[("cache-control", v)]));
        let pragma = cache_control(&headers(&[("pragma", "no-cache")]));
        let cases = [
            ("fresh", &p, young, none(), Fresh),
            ("max-age < age", &p, young, req("max-age=10"), Revalidate),
            (
                "min-fresh > left",
                &p,
                young,
                req("min-fresh=60"),
                Revalidate,
            ),
            ("min-fresh < left", &p, young, req("min-fresh=40"), Fresh),
            ("no-cache", &p, young, req("no-cache"), Revalidate),
            ("Pragma: no-cache", &p, young, pragma, Revalidate),
            ("stale", &p, old, none(), Revalidate),
            ("max-stale", &p, old, req("max-stale"), StaleAccepted),
            ("max-stale=60", &p, old, req("max-stale=60"), StaleAccepted),
            ("max-stale=10", &p, old, req("max-stale=10"), Revalidate),
            ("must-revalidate", &mr, old, req("max-stale"), Revalidate),
        ];
        for (name, policy, age, directives, want) in cases {
            assert_eq!(usability(policy, age, &directives), want, "{name}");
        }
    }

    #[test]
    fn stale_while_revalidate_and_if_error_windows() {
        let p = policy(&[(
            "cache-control",
            "max-age=10, stale-while-revalidate=30, stale-if-error=60",
        )]);
        let none = Directives::default();
        assert_eq!(
            usability(&p, Duration::from_secs(20), &none),
            Usability::StaleWhileRevalidate
        );
        assert_eq!(
            usability(&p, Duration::from_secs(50), &none),
            Usability::Revalidate
        );
        assert!(may_serve_stale_on_error(&p, Duration::from_secs(50)));
        assert!(!may_serve_stale_on_error(&p, Duration::from_secs(80)));
        let mr = policy(&[(
            "cache-control",
            "max-age=10, must-revalidate, stale-if-error=60",
        )]);
        assert!(!may_serve_stale_on_error(&mr, Duration::from_secs(20)));
    }

    #[test]
    fn age_follows_rfc_9111_section_4_2_3() {
        let now = SystemTime::now();
        let date = now - Duration::from_secs(10);
        let h = headers(&[("date", &fmt_http_date(date)), ("age", "30")]);
        let age = current_age(
            &h,
            now - Duration::from_secs(2),
            now,
            now + Duration::from_secs(5),
        );
        // corrected_age_value = 30 + 2 > apparent 10; + 5 resident.
        assert_eq!(age.as_secs(), 37);
    }

    #[test]
    fn vary_names_normalized_and_star() {
        let h = headers(&[
            ("vary", "Accept-Language, accept-encoding"),
            ("vary", "accept-language"),
        ]);
        let names = vary_names(&h).unwrap();
        assert_eq!(names.len(), 2);
        assert_eq!(names[0].as_str(), "accept-encoding");
        assert!(vary_names(&headers(&[("vary", "*")])).is_none());
    }

    #[test]
    fn cdn_cache_control_is_a_structured_dictionary() {
        // Governs when it parses and has a directive this cache knows.
        let p = policy(&[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "max-age=600, stale-if-error=30"),
        ]);
        assert!(p.cdn);
        assert_eq!(p.lifetime, Duration::from_secs(600));
        assert_eq!(p.stale_if_error, Duration::from_secs(30));
        // A value of the wrong type, or an unknown directive, is ignored alone.
        for cdn in [
            "max-age=\"600\"",
            "max-age=1.5",
            "max-age=-1",
            "foo=3",
            "max-age=(1 2)",
        ] {
            let p = policy(&[("cache-control", "max-age=60"), ("cdn-cache-control", cdn)]);
            assert!(!p.cdn, "{cdn}");
            assert_eq!(p.lifetime, Duration::from_secs(60), "{cdn}");
        }
        let p = policy(&[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "max-age=abc, no-store"),
        ]);
        assert!(p.cdn, "max-age=abc is a token: ignored, no-store stays");
        assert!(p.directives.no_store);
        // A field that does not parse is ignored as a whole.
        for cdn in [
            "max-age=600,",
            "Max-Age=600",
            "max-age=600 no-store",
            "max-age=\"x",
        ] {
            let p = policy(&[("cache-control", "max-age=60"), ("cdn-cache-control", cdn)]);
            assert!(!p.cdn, "{cdn:?}");
            assert_eq!(p.lifetime, Duration::from_secs(60), "{cdn:?}");
        }
        // Booleans: bare, ?1, ?0.
        let p = policy(&[("cdn-cache-control", "no-store=?0, public, max-age=5")]);
        assert!(!p.directives.no_store && p.directives.public);
    }

    #[test]
    fn age_is_the_first_member_and_junk_is_ignored() {
        let age = |v: &str| age_value(&headers(&[("age", v)]));
        assert_eq!(age("30"), Some(30));
        assert_eq!(age(" 30 "), Some(30));
        assert_eq!(age("30, 7200"), Some(30));
        assert_eq!(age("3s"), None);
        assert_eq!(age("-1"), None);
        assert_eq!(age("1.5"), None);
        assert_eq!(age("99999999999999999999"), Some(DELTA_MAX));
        let two_lines = headers(&[("age", "40"), ("age", "7200")]);
        assert_eq!(age_value(&two_lines), Some(40));
    }

    #[test]
    fn immutable_answers_a_reload_while_fresh() {
        let p = policy(&[("cache-control", "max-age=100, immutable")]);
        let req = |v: &str| cache_control(&headers(&[("cache-control", v)]));
        let young = Duration::from_secs(50);
        assert_eq!(usability(&p, young, &req("max-age=0")), Usability::Fresh);
        assert_eq!(
            usability(&p, young, &req("no-cache")),
            Usability::Revalidate
        );
        assert_eq!(
            usability(&p, Duration::from_secs(150), &req("max-age=0")),
            Usability::Revalidate
        );
        let plain = policy(&[("cache-control", "max-age=100")]);
        assert_eq!(
            usability(&plain, young, &req("max-age=0")),
            Usability::Revalidate
        );
    }
}
