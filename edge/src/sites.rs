//! Customer sites: which names the edge serves and where each site's origin is.

use std::collections::hash_map::Entry;
use std::sync::Arc;

use keyless_shared::DomainMap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::{OriginUrl, SiteConfig};

/// One customer site.
#[derive(Debug)]
pub struct Site {
    /// The names configured (lowercase); the first is the site's name in logs.
    pub domains: Vec<String>,
    /// Origin base URL (`http://host:port` or `https://...`); path and query of a client
    /// request are appended to its path.
    pub origin: OriginUrl,
    /// Whether this site's responses are cached.
    pub cache_enabled: bool,
    /// Leave the query out of cache keys.
    pub cache_ignore_query: bool,
    /// Request headers whose values are part of cache keys.
    pub cache_key_headers: Vec<http::HeaderName>,
    /// Whether responses with `Set-Cookie` are stored (stripped) or not at all.
    pub cache_set_cookie: crate::config::SetCookiePolicy,
    /// Slice size for GETs (0: not sliced).
    pub cache_slice: u64,
    /// The key-server group that holds the site's keys.
    pub keyserver_group: String,
    /// The certificate chain from the site's `chain` file (leaf first), served instead
    /// of one fetched from the key server.
    pub chain: Option<Arc<[CertificateDer<'static>]>>,
}

impl Site {
    /// The site's name for logs and metrics.
    pub fn name(&self) -> &str {
        self.domains.first().map(String::as_str).unwrap_or("-")
    }
}

/// Name → site, exact names before `*.` wildcards (one label deep).
#[derive(Debug, Default)]
pub struct Sites {
    by_name: DomainMap<Arc<Site>>,
    /// In configuration order.
    list: Vec<Arc<Site>>,
}

/// Why the configured sites could not be indexed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SitesError {
    /// Two sites claim the same domain.
    #[error("domain {0} is configured for two sites")]
    DuplicateDomain(String),
    /// A site's `chain` file cannot be used.
    #[error("site {site}: chain {path}: {reason}")]
    Chain {
        /// The site's first domain.
        site: String,
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl Sites {
    /// Builds the index of the sites [`crate::config::Config::parse`] has checked.
    pub fn new(configs: &[SiteConfig]) -> Result<Sites, SitesError> {
        let mut sites = Sites::default();
        for c in configs {
            let site = Arc::new(Site {
                domains: c.domains.iter().map(|d| normalize(d)).collect(),
                origin: c.origin.clone(),
                cache_enabled: c.cache.enabled,
                cache_ignore_query: c.cache.ignore_query,
                cache_key_headers: c.cache.key_headers.clone(),
                cache_set_cookie: c.cache.store_set_cookie,
                cache_slice: c.cache.slice_bytes,
                keyserver_group: c.keyserver_group.clone().unwrap_or_default(),
                chain: c.chain.as_deref().map(|p| load_chain(c, p)).transpose()?,
            });
            for d in &site.domains {
                match sites.by_name.entry(d) {
                    Entry::Vacant(e) => e.insert(site.clone()),
                    Entry::Occupied(_) => return Err(SitesError::DuplicateDomain(d.clone())),
                };
            }
            sites.list.push(site);
        }
        Ok(sites)
    }

    /// Every site, in configuration order.
    pub fn all(&self) -> &[Arc<Site>] {
        &self.list
    }

    /// The site serving `name` (an SNI or a `Host` without port).
    pub fn lookup(&self, name: &str) -> Option<&Arc<Site>> {
        self.by_name.get(name)
    }
}

/// The certificates of a site's `chain` file (at least one).
fn load_chain(
    site: &SiteConfig,
    path: &std::path::Path,
) -> Result<Arc<[CertificateDer<'static>]>, SitesError> {
    let error = |reason: String| SitesError::Chain {
        site: site.domains.first().cloned().unwrap_or_default(),
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("holds no certificate".into()));
    }
    Ok(certs.into())
}

/// A host name as sites and cache keys use it: lowercase, no trailing dot.
pub(crate) fn normalize(name: &str) -> String {
    keyless_shared::normalize_host(name).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(domains: &[&str], origin: &str) -> SiteConfig {
        SiteConfig {
            domains: domains.iter().map(|s| s.to_string()).collect(),
            origin: origin.parse().unwrap(),
            cache: Default::default(),
            keyserver_group: None,
            chain: None,
        }
    }

    #[test]
    fn exact_then_wildcard_one_label() {
        let sites = Sites::new(&[
            site(&["example.com", "*.example.com"], "http://o1:80"),
            site(&["api.example.com"], "http://o2:80"),
        ])
        .unwrap();
        assert_eq!(
            sites.lookup("EXAMPLE.com.").unwrap().origin.key(),
            "http://o1:80"
        );
        assert_eq!(
            sites.lookup("api.example.com").unwrap().origin.key(),
            "http://o2:80"
        );
        assert_eq!(
            sites.lookup("www.example.com").unwrap().origin.key(),
            "http://o1:80"
        );
        assert!(sites.lookup("a.b.example.com").is_none());
        assert!(sites.lookup("example.org").is_none());
        let twice = Sites::new(&[site(&["a.com"], "http://x"), site(&["a.com"], "http://y")]);
        assert_eq!(
            twice.map(|_| ()).unwrap_err().to_string(),
            "domain a.com is configured for two sites"
        );
    }
}
