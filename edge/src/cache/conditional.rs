//! Client preconditions (RFC 9110 §13) evaluated against a stored response, and the
//! validator parsing they need: entity-tag lists (§8.8.3); HTTP-dates (§5.6.7) are
//! [`crate::httpdate`]'s.
//!
//! The cache owns this evaluation when it answers from storage (RFC 9111 §4.3.2): a
//! conditional request for a fresh stored response is answered here, never forwarded.
//! [`super::range`] reuses the validator helpers for `If-Range`.

use std::time::SystemTime;

use http::header::{
    CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, IF_MATCH, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, IF_UNMODIFIED_SINCE, LAST_MODIFIED, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::httpdate::parse_http_date;

/// At most this many entity-tags in one precondition field (all its lines together);
/// a longer list is treated as malformed. Header sections are already bounded by the
/// HTTP server; this bounds the comparison work per request.
const MAX_ETAGS: usize = 256;

/// What to do with a request after evaluating its preconditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Precondition {
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
pub(crate) struct EntityTag {
    /// `W/` was present.
    pub weak: bool,
    /// The characters between the double quotes (`etagc`: %x21 / %x23-7E / obs-text).
    pub opaque: Vec<u8>,
}

impl EntityTag {
    /// Parses exactly one entity-tag (surrounding whitespace allowed), as in an `ETag`
    /// field or `If-Range`; `None` if the value is anything else.
    pub(crate) fn parse(v: &HeaderValue) -> Option<EntityTag> {
        let s = trim_ows(v.as_bytes());
        let (tag, rest) = parse_one_tag(s)?;
        if rest.is_empty() {
            Some(tag)
        } else {
            None
        }
    }

    /// Strong comparison (§8.8.3.2): both strong and the same opaque tag.
    pub(crate) fn strong_eq(&self, other: &EntityTag) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }

    /// Weak comparison (§8.8.3.2): the same opaque tag, weakness ignored.
    pub(crate) fn weak_eq(&self, other: &EntityTag) -> bool {
        self.opaque == other.opaque
    }
}

/// The value of an `If-Match` / `If-None-Match` field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum EtagList {
    /// `*`: any current representation.
    Any,
    /// A list of entity-tags (possibly empty: `If-None-Match: ,` is a valid empty list).
    Tags(Vec<EntityTag>),
}

impl EtagList {
    /// Whether the list matches `stored` (the stored response's entity-tag, if any)
    /// with the strong (`strong = true`) or the weak comparison. `*` matches because a
    /// stored representation exists.
    pub(crate) fn matches(&self, stored: Option<&EntityTag>, strong: bool) -> bool {
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
#[cfg(test)]
pub(crate) fn etag_list(v: &HeaderValue) -> Option<EtagList> {
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
pub(crate) fn etag_field(headers: &HeaderMap, name: &HeaderName) -> Option<Option<EtagList>> {
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
pub(crate) fn stored_etag(stored: &HeaderMap) -> Option<EntityTag> {
    single(stored, &ETAG).and_then(EntityTag::parse)
}

/// The stored response's `Last-Modified`, if exactly one valid line.
pub(crate) fn stored_last_modified(stored: &HeaderMap) -> Option<SystemTime> {
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
pub(crate) fn evaluate(method: &Method, req: &HeaderMap, stored: &HeaderMap) -> Precondition {
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
pub(crate) fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
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

#[cfg(test)]
mod tests {
    use super::*;
    use Precondition::{Failed, NotModified, Proceed};

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
        // RFC 9110 §8.8.3.2 table: the two tags, then strong and weak comparison.
        for (a, b, strong, weak) in [
            (tag(true, "1"), tag(true, "1"), false, true),
            (tag(true, "1"), tag(true, "2"), false, false),
            (tag(true, "1"), tag(false, "1"), false, true),
            (tag(false, "1"), tag(false, "1"), true, true),
        ] {
            assert_eq!(a.strong_eq(&b), strong, "strong: {a:?} {b:?}");
            assert_eq!(a.weak_eq(&b), weak, "weak: {a:?} {b:?}");
        }
    }

    /// A stored response without validators of one kind, or with a weak one.
    const WEAK_ETAG: Fields = &[("etag", "W/\"v1\"")];
    const NO_ETAG: Fields = &[("last-modified", LM)];
    const NO_LM: Fields = &[("etag", "\"v1\"")];
    const NO_LM_BUT_DATE: Fields = &[("etag", "\"v1\""), ("date", BEFORE)];

    type Fields = &'static [(&'static str, &'static str)];

    /// One precondition case: a name, the request, the stored response (`None`: the
    /// default [`stored`]) and the expected outcome.
    struct Case {
        name: &'static str,
        method: Method,
        req: Fields,
        stored: Option<Fields>,
        want: Precondition,
    }

    /// A case against the default stored response.
    fn case(name: &'static str, method: Method, req: Fields, want: Precondition) -> Case {
        Case {
            name,
            method,
            req,
            stored: None,
            want,
        }
    }

    /// A case against the stored response `stored`.
    fn case_with(
        name: &'static str,
        method: Method,
        req: Fields,
        stored: Fields,
        want: Precondition,
    ) -> Case {
        Case {
            stored: Some(stored),
            ..case(name, method, req, want)
        }
    }

    fn check(cases: &[Case]) {
        for c in cases {
            let stored = c.stored.map_or_else(stored, headers);
            let got = evaluate(&c.method, &headers(c.req), &stored);
            assert_eq!(got, c.want, "{}", c.name);
        }
    }

    #[test]
    fn no_preconditions_proceed() {
        check(&[
            case("GET", Method::GET, &[], Proceed),
            case("POST", Method::POST, &[], Proceed),
        ]);
    }

    #[test]
    fn if_match() {
        check(&[
            case("same tag", Method::GET, &[("if-match", "\"v1\"")], Proceed),
            case(
                "tag in a list",
                Method::GET,
                &[("if-match", "\"x\", \"v1\"")],
                Proceed,
            ),
            case("any", Method::GET, &[("if-match", "*")], Proceed),
            case("other tag", Method::PUT, &[("if-match", "\"v2\"")], Failed),
            // Strong comparison: a weak tag never matches.
            case(
                "weak request tag",
                Method::GET,
                &[("if-match", "W/\"v1\"")],
                Failed,
            ),
            case_with(
                "weak stored tag",
                Method::GET,
                &[("if-match", "\"v1\"")],
                WEAK_ETAG,
                Failed,
            ),
            // No stored ETag: only `*` matches.
            case_with(
                "no stored tag",
                Method::GET,
                &[("if-match", "\"v1\"")],
                NO_ETAG,
                Failed,
            ),
            case_with(
                "no stored tag, any",
                Method::GET,
                &[("if-match", "*")],
                NO_ETAG,
                Proceed,
            ),
        ]);
    }

    #[test]
    fn malformed_if_match_is_ignored() {
        check(&[
            case("alone", Method::GET, &[("if-match", "v2")], Proceed),
            // ... so If-Unmodified-Since is evaluated.
            case(
                "with If-Unmodified-Since",
                Method::GET,
                &[("if-match", "v2"), ("if-unmodified-since", BEFORE)],
                Failed,
            ),
        ]);
    }

    #[test]
    fn if_unmodified_since() {
        check(&[
            case(
                "modified since",
                Method::GET,
                &[("if-unmodified-since", BEFORE)],
                Failed,
            ),
            case(
                "same date",
                Method::GET,
                &[("if-unmodified-since", LM)],
                Proceed,
            ),
            case(
                "later date",
                Method::DELETE,
                &[("if-unmodified-since", AFTER)],
                Proceed,
            ),
            case(
                "invalid date is ignored",
                Method::GET,
                &[("if-unmodified-since", "garbage")],
                Proceed,
            ),
            case(
                "ignored when If-Match is present (and passes)",
                Method::GET,
                &[("if-match", "\"v1\""), ("if-unmodified-since", BEFORE)],
                Proceed,
            ),
            case_with(
                "no stored Last-Modified: not evaluated",
                Method::GET,
                &[("if-unmodified-since", BEFORE)],
                NO_LM,
                Proceed,
            ),
        ]);
    }

    #[test]
    fn if_none_match() {
        check(&[
            case(
                "same tag",
                Method::GET,
                &[("if-none-match", "\"v1\"")],
                NotModified,
            ),
            case(
                "weak request tag, HEAD",
                Method::HEAD,
                &[("if-none-match", "W/\"v1\"")],
                NotModified,
            ),
            case(
                "tag in a list",
                Method::GET,
                &[("if-none-match", "\"a\", \"b,\\\", W/\"v1\"")],
                NotModified,
            ),
            case("any", Method::GET, &[("if-none-match", "*")], NotModified),
            case("any, POST", Method::POST, &[("if-none-match", "*")], Failed),
            case(
                "same tag, PUT",
                Method::PUT,
                &[("if-none-match", "\"v1\"")],
                Failed,
            ),
            case(
                "other tag",
                Method::GET,
                &[("if-none-match", "\"v2\"")],
                Proceed,
            ),
            // A comma inside a quoted tag does not split it.
            case(
                "comma inside a tag",
                Method::GET,
                &[("if-none-match", "\"v1,x\"")],
                Proceed,
            ),
            // Weak stored tag matches under the weak comparison.
            case_with(
                "weak stored tag",
                Method::GET,
                &[("if-none-match", "\"v1\"")],
                WEAK_ETAG,
                NotModified,
            ),
        ]);
    }

    #[test]
    fn malformed_if_none_match_matches_nothing() {
        check(&[
            case("alone", Method::GET, &[("if-none-match", "v1")], Proceed),
            // Present (though malformed): If-Modified-Since is not evaluated.
            case(
                "with If-Modified-Since",
                Method::GET,
                &[("if-none-match", "v1"), ("if-modified-since", AFTER)],
                Proceed,
            ),
        ]);
    }

    #[test]
    fn if_modified_since() {
        check(&[
            case(
                "same date",
                Method::GET,
                &[("if-modified-since", LM)],
                NotModified,
            ),
            case(
                "later date, HEAD",
                Method::HEAD,
                &[("if-modified-since", AFTER)],
                NotModified,
            ),
            case(
                "modified since",
                Method::GET,
                &[("if-modified-since", BEFORE)],
                Proceed,
            ),
            case(
                "only GET/HEAD",
                Method::POST,
                &[("if-modified-since", AFTER)],
                Proceed,
            ),
            case(
                "invalid date is ignored",
                Method::GET,
                &[("if-modified-since", "Sun, 06 Nov 1994")],
                Proceed,
            ),
            case(
                "repeated field is ignored",
                Method::GET,
                &[("if-modified-since", AFTER), ("if-modified-since", AFTER)],
                Proceed,
            ),
            case(
                "ignored when If-None-Match is present, even if it does not match",
                Method::GET,
                &[("if-none-match", "\"v2\""), ("if-modified-since", AFTER)],
                Proceed,
            ),
            case_with(
                "no Last-Modified: Date is not used",
                Method::GET,
                &[("if-modified-since", AFTER)],
                NO_LM_BUT_DATE,
                Proceed,
            ),
        ]);
    }

    #[test]
    fn order_if_match_before_if_none_match() {
        check(&[
            case(
                "If-Match fails first: 412 even though If-None-Match would give 304",
                Method::GET,
                &[("if-match", "\"nope\""), ("if-none-match", "\"v1\"")],
                Failed,
            ),
            case(
                "If-Unmodified-Since fails before If-None-Match is looked at",
                Method::GET,
                &[("if-unmodified-since", BEFORE), ("if-none-match", "\"v1\"")],
                Failed,
            ),
            case(
                "both pass: If-None-Match decides",
                Method::GET,
                &[("if-match", "\"v1\""), ("if-none-match", "\"v1\"")],
                NotModified,
            ),
        ]);
    }

    #[test]
    fn ignored_methods() {
        let refused: Fields = &[("if-match", "\"nope\"")];
        check(&[
            case("OPTIONS", Method::OPTIONS, refused, Proceed),
            case("TRACE", Method::TRACE, refused, Proceed),
            case("CONNECT", Method::CONNECT, refused, Proceed),
        ]);
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
