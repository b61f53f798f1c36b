//! Host name lookup with exact names before `*.` wildcards, as both the key server
//! (certificate chains by SNI) and the edge (sites by SNI or `Host`) match names.
//!
//! A wildcard covers exactly one label: `*.example.com` matches `a.example.com`, not
//! `example.com` nor `a.b.example.com` (RFC 6125 §6.4.3, as TLS clients match them).

use std::borrow::Cow;
use std::collections::hash_map::{Entry, HashMap};

/// Values filed by domain: exact names and `*.` wildcards (filed under the parent).
///
/// Domains are stored as given: callers lowercase them (and drop a trailing dot)
/// first. Looked-up names are normalized here.
#[derive(Clone, Debug)]
pub struct DomainMap<V> {
    exact: HashMap<String, V>,
    /// `*.example.com` is filed under `example.com`.
    wildcard: HashMap<String, V>,
}

impl<V> Default for DomainMap<V> {
    fn default() -> Self {
        DomainMap {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<V> DomainMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The slot of `domain` (an exact name or a `*.` wildcard).
    pub fn entry(&mut self, domain: &str) -> Entry<'_, String, V> {
        match domain.strip_prefix("*.") {
            Some(parent) => self.wildcard.entry(parent.to_owned()),
            None => self.exact.entry(domain.to_owned()),
        }
    }

    /// Files `value` under `domain`; returns the value that was there.
    pub fn insert(&mut self, domain: &str, value: V) -> Option<V> {
        match self.entry(domain) {
            Entry::Occupied(mut e) => Some(e.insert(value)),
            Entry::Vacant(e) => {
                e.insert(value);
                None
            }
        }
    }

    /// Every value covering `name` (an SNI or a host without port; case and a
    /// trailing dot do not matter): the exact match first, then the wildcard match.
    pub fn matches(&self, name: &str) -> impl Iterator<Item = &V> {
        let name = normalize_host(name);
        let exact = self.exact.get(name.as_ref());
        let wild = name
            .split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent));
        exact.into_iter().chain(wild)
    }

    /// The value for `name`: its exact match, else its wildcard match.
    pub fn get(&self, name: &str) -> Option<&V> {
        self.matches(name).next()
    }
}

/// A host name as lookups and cache keys use it: lowercase, no trailing dot; borrowed
/// when it already is.
pub fn normalize_host(name: &str) -> Cow<'_, str> {
    let name = name.trim_end_matches('.');
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_before_wildcards_one_label_deep() {
        let mut map = DomainMap::new();
        assert_eq!(map.insert("example.com", 1), None);
        assert_eq!(map.insert("*.example.com", 2), None);
        assert_eq!(map.insert("api.example.com", 3), None);
        assert_eq!(map.get("EXAMPLE.com."), Some(&1));
        assert_eq!(map.get("api.example.com"), Some(&3));
        assert_eq!(map.get("www.Example.COM"), Some(&2));
        assert_eq!(map.get("a.b.example.com"), None);
        assert_eq!(map.get("example.org"), None);
        assert_eq!(map.get(""), None);
        assert_eq!(map.get("."), None);
        assert_eq!(map.get("com"), None);
        // Both matches, exact first.
        assert_eq!(map.matches("api.example.com").collect::<Vec<_>>(), [&3, &2]);
        assert_eq!(map.matches("www.example.com").collect::<Vec<_>>(), [&2]);
    }

    #[test]
    fn insert_reports_the_previous_value_and_entry_collects() {
        let mut map = DomainMap::new();
        assert_eq!(map.insert("*.a.com", "x"), None);
        assert_eq!(map.insert("*.a.com", "y"), Some("x"));
        // An exact name and a wildcard with the same parent are different slots.
        assert_eq!(map.insert("a.com", "z"), None);

        let mut lists: DomainMap<Vec<u8>> = DomainMap::new();
        lists.entry("b.com").or_default().push(1);
        lists.entry("b.com").or_default().push(2);
        assert_eq!(lists.get("b.com"), Some(&vec![1, 2]));
    }
}
