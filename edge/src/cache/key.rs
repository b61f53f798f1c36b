//! Cache keys. A request's [`PrimaryKey`] is its URL (scheme, host without port,
//! path, query unless the site ignores it) and the values of the site's `key_headers`;
//! a stored response's [`CacheKey`] adds its variant: the names its `Vary` listed and a
//! hash of the request's values for them (RFC 9111 §4.1).
//!
//! Both are kept as one string (what the indexes and the disk tier store), with the
//! positions of their parts, so that nothing outside this module knows the encoding:
//!
//! ```text
//! url ( "\n" name "=" values )*                 primary key
//! primary [ "\0" name "," name … "\0" hash ]    cache key (no Vary: the primary key)
//! ```

use std::sync::Arc;

use http::{header, HeaderMap, HeaderName};

use crate::sites::Site;

/// Request fields whose value is a list of preferences in which order, case and
/// whitespace do not change what the client accepts (its q-values do): a `Vary` on them
/// matches requests whose lists differ only so.
static NEGOTIATION_LISTS: [HeaderName; 2] = [header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE];

/// Separates `key_headers` values from the URL.
const KEY_HEADER_SEP: char = '\n';
/// Separates the variant from the primary key.
const VARY_SEP: char = '\0';

/// The part of a key that names a request's URL and key-header values.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PrimaryKey {
    text: Arc<str>,
    url_len: usize,
}

impl PrimaryKey {
    /// The primary key of a request for `path_and_query` at `host` over `scheme`,
    /// with `headers` (in upstream form) giving `site`'s key-header values.
    pub(crate) fn new(
        site: &Site,
        scheme: &str,
        host: &str,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> PrimaryKey {
        // Normalized by the front already: then borrowed, not copied.
        let host = keyless_shared::normalize_host(host);
        let target = if site.cache_ignore_query {
            path_and_query.split('?').next().unwrap_or("/")
        } else {
            path_and_query
        };
        let mut key = String::with_capacity(scheme.len() + host.len() + target.len() + 3);
        key.push_str(scheme);
        key.push_str("://");
        key.push_str(&host);
        key.push_str(target);
        let url_len = key.len();
        for name in &site.cache_key_headers {
            key.push(KEY_HEADER_SEP);
            key.push_str(name.as_str());
            key.push('=');
            let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
            key.push_str(&String::from_utf8_lossy(&values.join(&b","[..])));
        }
        PrimaryKey {
            text: key.into(),
            url_len,
        }
    }

    /// The key as the indexes store it.
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The shared form of [`PrimaryKey::as_str`].
    pub(crate) fn shared(&self) -> &Arc<str> {
        &self.text
    }

    /// `scheme://host/path?query`: what invalidation and purge by URL address.
    pub(crate) fn url(&self) -> &str {
        &self.text[..self.url_len]
    }

    /// Bytes of the key (bounded by `[cache] max_url_bytes`).
    pub(crate) fn len(&self) -> usize {
        self.text.len()
    }

    /// The primary key of slice `index` of this request's object: the same URL
    /// (invalidation and purge by URL reach every slice), set apart by a part no
    /// key-header name can take.
    pub(crate) fn slice(&self, index: u64) -> PrimaryKey {
        PrimaryKey {
            text: format!("{}{KEY_HEADER_SEP}#slice={index}", self.text).into(),
            url_len: self.url_len,
        }
    }

    /// The key of a response without `Vary` for this request.
    pub(crate) fn unvaried(&self) -> CacheKey {
        self.variant(&[], &HeaderMap::new())
    }

    /// The key of the response variant for a request with `headers`, when its
    /// responses vary on `names` (the primary key itself when they name none).
    pub(crate) fn variant(&self, names: &[HeaderName], headers: &HeaderMap) -> CacheKey {
        if names.is_empty() {
            return CacheKey {
                text: self.text.clone(),
                primary_len: self.text.len(),
                url_len: self.url_len,
            };
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut key = String::with_capacity(self.text.len() + 80);
        key.push_str(&self.text);
        key.push(VARY_SEP);
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            key.push_str(name.as_str());
            // The request's value of the field: its lines combined, whitespace around
            // commas normalized (RFC 9111 §4.1); for the negotiation lists, members
            // also compared without order, case or inner whitespace.
            let mut members: Vec<Vec<u8>> = headers
                .get_all(name)
                .iter()
                .flat_map(|v| v.as_bytes().split(|&b| b == b','))
                .map(|part| part.trim_ascii().to_vec())
                .collect();
            if NEGOTIATION_LISTS.contains(name) {
                for m in &mut members {
                    m.retain(|b| !b.is_ascii_whitespace());
                    m.make_ascii_lowercase();
                }
                members.retain(|m| !m.is_empty());
                members.sort();
            }
            ctx.update(&members.join(&b","[..]));
            let present = headers.contains_key(name);
            ctx.update(if present { b"\x00" } else { b"\x01" });
        }
        key.push(VARY_SEP);
        for b in ctx.finish().as_ref().iter().take(16) {
            key.push_str(&format!("{b:02x}"));
        }
        CacheKey {
            text: key.into(),
            primary_len: self.text.len(),
            url_len: self.url_len,
        }
    }
}

/// The key of one stored response: its primary key and its `Vary` variant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    text: Arc<str>,
    primary_len: usize,
    url_len: usize,
}

impl CacheKey {
    /// A key as the disk tier stored it ([`CacheKey::as_str`]).
    pub(crate) fn from_stored(text: &str) -> CacheKey {
        let primary_len = text.find(VARY_SEP).unwrap_or(text.len());
        let url_len = text[..primary_len]
            .find(KEY_HEADER_SEP)
            .unwrap_or(primary_len);
        CacheKey {
            text: text.into(),
            primary_len,
            url_len,
        }
    }

    /// The key as the tiers and indexes store it.
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The shared form of [`CacheKey::as_str`].
    pub(crate) fn shared(&self) -> &Arc<str> {
        &self.text
    }

    /// The primary key's text.
    pub(crate) fn primary(&self) -> &str {
        &self.text[..self.primary_len]
    }

    /// `scheme://host/path?query`.
    pub(crate) fn url(&self) -> &str {
        &self.text[..self.url_len]
    }

    /// The `Vary` names of the variant (none for a response without `Vary`).
    pub(crate) fn vary_names(&self) -> Vec<HeaderName> {
        let Some(rest) = self.text[self.primary_len..].strip_prefix(VARY_SEP) else {
            return Vec::new();
        };
        rest.split(VARY_SEP)
            .next()
            .unwrap_or("")
            .split(',')
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    }
}

impl std::fmt::Display for CacheKey {
    /// Escaped: keys hold client-chosen text.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        keyless_shared::log_safe(&self.text).fmt(f)
    }
}

impl std::fmt::Display for PrimaryKey {
    /// Escaped: keys hold client-chosen text.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        keyless_shared::log_safe(&self.text).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SiteConfig;
    use crate::sites::Sites;
    use http::HeaderValue;

    fn site(key_headers: &[&str], ignore_query: bool) -> Arc<Site> {
        let mut config = SiteConfig {
            domains: vec!["x".into()],
            origin: "http://o".parse().unwrap(),
            cache: Default::default(),
            keyserver_group: None,
            chain: None,
        };
        config.cache.key_headers = key_headers
            .iter()
            .map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap())
            .collect();
        config.cache.ignore_query = ignore_query;
        Sites::new(&[config]).unwrap().lookup("x").unwrap().clone()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn primary_keys_hold_the_url_and_key_header_values() {
        let plain = PrimaryKey::new(&site(&[], false), "https", "X.", "/a?q=1", &headers(&[]));
        assert_eq!(
            (plain.as_str(), plain.url()),
            ("https://x/a?q=1", "https://x/a?q=1")
        );
        let no_query = PrimaryKey::new(&site(&[], true), "https", "x", "/a?q=1", &headers(&[]));
        assert_eq!(no_query.url(), "https://x/a");
        let tenant = PrimaryKey::new(
            &site(&["x-tenant"], false),
            "http",
            "x",
            "/a",
            &headers(&[("x-tenant", "1"), ("x-tenant", "2")]),
        );
        assert_eq!(tenant.url(), "http://x/a");
        assert_ne!(tenant.as_str(), tenant.url());
        let other = PrimaryKey::new(
            &site(&["x-tenant"], false),
            "http",
            "x",
            "/a",
            &headers(&[("x-tenant", "3")]),
        );
        assert_ne!(tenant, other);
        assert_eq!(tenant.url(), other.url());
    }

    #[test]
    fn variants_normalize_values_and_split_back() {
        let names = vec![HeaderName::from_static("accept-language")];
        let primary = PrimaryKey::new(
            &site(&["x-tenant"], false),
            "https",
            "x",
            "/a",
            &headers(&[("x-tenant", "1")]),
        );
        let a = primary.variant(&names, &headers(&[("accept-language", "en,  fr")]));
        let b = primary.variant(&names, &headers(&[("accept-language", "en, fr")]));
        let none = primary.variant(&names, &headers(&[]));
        assert_eq!(a, b);
        assert_ne!(a, none);
        assert_eq!(a.primary(), primary.as_str());
        assert_eq!(a.url(), "https://x/a");
        assert_eq!(a.vary_names(), names);
        assert_eq!(CacheKey::from_stored(a.as_str()), a);

        let unvaried = primary.variant(&[], &headers(&[]));
        assert_eq!(unvaried.as_str(), primary.as_str());
        assert!(unvaried.vary_names().is_empty());
        assert_eq!(CacheKey::from_stored(unvaried.as_str()), unvaried);
        assert_eq!(CacheKey::from_stored("https://x/ab").url(), "https://x/ab");
    }

    #[test]
    fn negotiation_lists_match_in_any_order_case_or_spacing() {
        let primary = PrimaryKey::new(&site(&[], false), "https", "x", "/a", &headers(&[]));
        let lang = vec![HeaderName::from_static("accept-language")];
        let key =
            |name: &[HeaderName], pairs: &[(&str, &str)]| primary.variant(name, &headers(pairs));
        let base = key(&lang, &[("accept-language", "en-US, fr;q=0.8")]);
        for same in [
            "fr;q=0.8, en-US",
            "EN-us,FR; q=0.8",
            " en-US ,  fr ; q=0.8 ",
        ] {
            assert_eq!(key(&lang, &[("accept-language", same)]), base, "{same:?}");
        }
        // Two field lines are one list.
        assert_eq!(
            key(
                &lang,
                &[
                    ("accept-language", "fr;q=0.8"),
                    ("accept-language", "en-us")
                ]
            ),
            base
        );
        // Other q-values or languages are another variant.
        assert_ne!(key(&lang, &[("accept-language", "en-US, fr;q=0.9")]), base);
        assert_ne!(key(&lang, &[("accept-language", "en-US")]), base);
        let enc = vec![HeaderName::from_static("accept-encoding")];
        assert_eq!(
            key(&enc, &[("accept-encoding", "gzip, br")]),
            key(&enc, &[("accept-encoding", "BR,gzip")])
        );
        // Other fields keep their order and case.
        let other = vec![HeaderName::from_static("x-flavour")];
        assert_ne!(
            key(&other, &[("x-flavour", "a, b")]),
            key(&other, &[("x-flavour", "b, a")])
        );
    }
}
