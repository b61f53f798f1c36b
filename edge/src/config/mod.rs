//! `edge.toml`: the edge's configuration, parsed into typed values.
//!
//! Relative paths are taken from the directory of the configuration file.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod keyserver;
mod sessions;

pub use keyserver::{GroupConfig, GroupServers, KeyServerConfig, Protocol, ServerEntry};
pub use sessions::{RedisMode, SessionsConfig};

/// Implements `Deserialize` through `FromStr` for a configuration value.
macro_rules! deserialize_from_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid configuration.
    #[error("invalid config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners.
    pub listen: ListenConfig,
    /// Key servers and the edge's identity towards them.
    pub keyserver: KeyServerConfig,
    /// Resolver for origin host names.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Client-facing TLS.
    #[serde(default)]
    pub tls: TlsConfig,
    /// TLS session resumption: tickets and the session store.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Proxying to origins.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// The HTTP cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Distributed tracing (OpenTelemetry); off by default.
    #[serde(default)]
    pub tracing: keyless_shared::telemetry::TracingConfig,
    /// Customer sites.
    #[serde(rename = "site")]
    pub sites: Vec<SiteConfig>,
}

/// `[listen]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// HTTPS (ALPN h2 and http/1.1). Default `0.0.0.0:443`.
    #[serde(default = "default_https")]
    pub https: SocketAddr,
    /// Plain HTTP; absent = no plain listener.
    #[serde(default)]
    pub http: Option<SocketAddr>,
    /// Health and metrics. Default `127.0.0.1:9090`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Bearer token of the admin listener's control calls (`POST /reload`, which
    /// `keyless-edge reload` makes); none = they answer 404. Compared in constant time.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Unix socket over which a new `keyless-edge --upgrade` takes the listening sockets
    /// (a zero-downtime upgrade); put it in a directory only the edge's user can enter.
    /// None (default) = no upgrades.
    #[serde(default)]
    pub upgrade_socket: Option<PathBuf>,
}

impl ListenConfig {
    /// Whether `other` binds the same TCP sockets (the token may change on reload).
    pub fn same_sockets(&self, other: &ListenConfig) -> bool {
        (self.https, self.http, self.admin) == (other.https, other.http, other.admin)
    }
}

/// Largest `[keyserver] max_concurrent_ops`: half of tokio's blocking pool (512
/// threads), leaving the rest to the disk cache and DNS.
pub const MAX_CONCURRENT_OPS_LIMIT: usize = 256;
/// Largest `[sessions] max_pending`: each session lookup waiting for Redis holds a
/// thread too (the runtime's blocking pool has room for both bounds and more).
pub const MAX_PENDING_SESSIONS_LIMIT: usize = 256;

/// `[dns]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers (`ip` or `ip:port`, port 53 by default); empty = the system's
    /// resolver configuration.
    #[serde(default)]
    pub nameservers: Vec<NameServer>,
    /// Deadline of one DNS query. Default "2s".
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// `[tls]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Site used for clients that send no SNI; none = such handshakes fail.
    #[serde(default)]
    pub default_site: Option<String>,
    /// Deadline of a client TLS handshake. Default "10s".
    #[serde(default = "default_10s", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a fetched certificate chain is used before it is refreshed (in the
    /// background, while the old one keeps serving). Default "5m".
    #[serde(default = "default_cert_ttl", with = "humantime_serde")]
    pub cert_ttl: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            default_site: None,
            handshake_timeout: default_10s(),
            cert_ttl: default_cert_ttl(),
        }
    }
}

/// `[proxy]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Deadline of connecting to an origin (per address tried). Default "5s".
    #[serde(default = "default_5s", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for the origin's response headers. Default "30s".
    #[serde(default = "default_30s", with = "humantime_serde")]
    pub response_header_timeout: Duration,
    /// Idle client and origin connections are closed after this. Default "60s".
    #[serde(default = "default_60s", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Client connections open at once (all listeners). Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: NonZeroUsize,
    /// Largest request header block accepted from a client, bytes. Default 65536.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: NonZeroUsize,
    /// Extra CA (PEM) trusted for HTTPS origins, besides the system roots.
    #[serde(default)]
    pub origin_ca: Option<PathBuf>,
    /// Client networks (`10.0.0.0/8`, `2001:db8::/32`, or one address) of load
    /// balancers in front of the edge: their `X-Forwarded-For` and `Forwarded` are
    /// appended to and their `X-Forwarded-Host` / `X-Forwarded-Proto` kept. From any
    /// other client these are replaced (the edge is the first hop). Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNetwork>,
}

/// An IP network `addr/prefix` (or one address), e.g. `[proxy] trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// Whether `ip` is in the network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpNetwork {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<IpNetwork, AddrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr.trim().parse().map_err(|_| {
            AddrError::Network(s.to_owned(), "not an IP network (addr/prefix)".into())
        })?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| {
                    AddrError::Network(s.to_owned(), format!("prefix must be 0..={max}"))
                })?,
        };
        Ok(IpNetwork { addr, prefix })
    }
}

deserialize_from_str!(IpNetwork);

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: default_5s(),
            response_header_timeout: default_30s(),
            idle_timeout: default_60s(),
            max_connections: default_max_connections(),
            max_header_bytes: default_max_header_bytes(),
            origin_ca: None,
            trusted_proxies: Vec::new(),
        }
    }
}

/// One `[[site]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Names served (exact, or `*.example.com` for one label under it).
    pub domains: Vec<String>,
    /// Origin URL (`http://` or `https://`); its host is resolved through `[dns]`.
    pub origin: OriginUrl,
    /// How this site's responses are cached.
    #[serde(default)]
    pub cache: SiteCacheConfig,
    /// The key-server group that holds this site's keys. Default: the only group.
    #[serde(default)]
    pub keyserver_group: Option<String>,
    /// The site's certificate chain (PEM, leaf first), served as it is instead of being
    /// fetched from the key server; required for groups with `protocol = "reference"`.
    #[serde(default)]
    pub chain: Option<PathBuf>,
}

/// `[cache]`: the shared HTTP cache (RFC 9111) of every site.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Whether responses are cached at all. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Memory tier size, bytes (bodies + headers). Default 256 MiB.
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: u64,
    /// Largest response body kept in memory (collected whole, stored in both tiers),
    /// bytes. Larger ones stream to the disk tier when there is one (up to
    /// `disk_max_object_bytes`), else pass through uncached. Default 64 MiB.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// Largest response body stored in the disk tier, streamed to disk as it arrives
    /// and served from disk block by block. Default 4 GiB.
    #[serde(default = "default_disk_max_object_bytes")]
    pub disk_max_object_bytes: u64,
    /// Directory of the disk tier, which survives restarts; none = memory only.
    #[serde(default)]
    pub disk_dir: Option<PathBuf>,
    /// Disk tier size, bytes. Default 1 GiB.
    #[serde(default = "default_disk_bytes")]
    pub disk_bytes: u64,
    /// `stale-while-revalidate` applied when a response carries none (RFC 5861).
    /// Default "0s".
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Option<Duration>,
    /// `stale-if-error` applied when a response carries none (RFC 5861). Default "0s".
    #[serde(default, with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    /// Longest wait of a request for a concurrent miss of the same object before it
    /// goes to the origin itself. Default "10s".
    #[serde(default = "default_10s", with = "humantime_serde")]
    pub coalesce_timeout: Duration,
    /// Bearer token of the purge API on the admin listener; none = purge disabled.
    #[serde(default)]
    pub purge_token: Option<String>,
    /// Longest URL (with `key_headers` values) cached, bytes; longer ones pass
    /// through uncached. Default 8192.
    #[serde(default = "default_max_url_bytes")]
    pub max_url_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            memory_bytes: default_memory_bytes(),
            max_object_bytes: default_max_object_bytes(),
            disk_max_object_bytes: default_disk_max_object_bytes(),
            disk_dir: None,
            disk_bytes: default_disk_bytes(),
            stale_while_revalidate: None,
            stale_if_error: None,
            coalesce_timeout: default_10s(),
            purge_token: None,
            max_url_bytes: default_max_url_bytes(),
        }
    }
}

/// `[site.cache]`: per-site cache settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteCacheConfig {
    /// Whether this site's responses are cached. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Leave the query string out of the cache key. Default false.
    #[serde(default)]
    pub ignore_query: bool,
    /// Request headers whose values are part of the cache key.
    #[serde(default, deserialize_with = "header_names")]
    pub key_headers: Vec<http::HeaderName>,
    /// Responses carrying `Set-Cookie`: `"never"` stored (default) or `"strip"`:
    /// stored without their `Set-Cookie` fields (the client that fetched it still
    /// gets its cookie).
    #[serde(default)]
    pub store_set_cookie: SetCookiePolicy,
    /// Slice size, bytes: GETs are fetched from the origin and stored as aligned
    /// ranges of this size (e.g. 4 MiB), so that a range request fetches only the
    /// slices it covers. 0 (default) = off. Between 64 KiB and 64 MiB, and within
    /// `[cache] max_object_bytes`.
    #[serde(default)]
    pub slice_bytes: u64,
}

/// What the cache does with a response that sets a cookie.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetCookiePolicy {
    /// Not stored: a cookie is one user's answer.
    #[default]
    Never,
    /// Stored with every `Set-Cookie` field removed.
    Strip,
}

impl Default for SiteCacheConfig {
    fn default() -> Self {
        SiteCacheConfig {
            enabled: true,
            ignore_query: false,
            key_headers: Vec::new(),
            store_set_cookie: SetCookiePolicy::Never,
            slice_bytes: 0,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_memory_bytes() -> u64 {
    256 << 20
}
fn default_max_object_bytes() -> u64 {
    64 << 20
}
fn default_disk_max_object_bytes() -> u64 {
    4 << 30
}
fn default_max_url_bytes() -> usize {
    8 << 10
}
fn default_disk_bytes() -> u64 {
    1 << 30
}
fn default_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
pub(crate) fn default_ks_connections() -> NonZeroUsize {
    NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN)
}
pub(crate) fn default_2s() -> Duration {
    Duration::from_secs(2)
}
fn default_5s() -> Duration {
    Duration::from_secs(5)
}
fn default_10s() -> Duration {
    Duration::from_secs(10)
}
fn default_30s() -> Duration {
    Duration::from_secs(30)
}
fn default_60s() -> Duration {
    Duration::from_secs(60)
}
fn default_cert_ttl() -> Duration {
    Duration::from_secs(300)
}
pub(crate) fn default_max_concurrent_ops() -> NonZeroUsize {
    NonZeroUsize::new(128).unwrap_or(NonZeroUsize::MIN)
}
fn default_max_connections() -> NonZeroUsize {
    NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN)
}
fn default_max_header_bytes() -> NonZeroUsize {
    NonZeroUsize::new(64 * 1024).unwrap_or(NonZeroUsize::MIN)
}

impl Config {
    /// Reads and parses `path`, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses `text` as the file `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut config: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config
            .keyserver
            .resolve(base, &mut config.sites)
            .map_err(invalid)?;
        let mut paths = Vec::new();
        if let Some(p) = config.proxy.origin_ca.as_mut() {
            paths.push(p);
        }
        if let Some(p) = config.cache.disk_dir.as_mut() {
            paths.push(p);
        }
        if let Some(p) = config.listen.upgrade_socket.as_mut() {
            paths.push(p);
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.tracing.check().map_err(invalid)?;
        if config.keyserver.max_concurrent_ops.get() > MAX_CONCURRENT_OPS_LIMIT {
            return Err(invalid(format!(
                "[keyserver] max_concurrent_ops is at most {MAX_CONCURRENT_OPS_LIMIT} (each waiting signature holds a thread)"
            )));
        }
        if config
            .cache
            .purge_token
            .as_deref()
            .is_some_and(|t| t.len() < 16)
        {
            return Err(invalid(
                "[cache] purge_token must be at least 16 characters".into(),
            ));
        }
        if config.cache.max_object_bytes == 0
            || config.cache.memory_bytes == 0
            || config.cache.disk_max_object_bytes == 0
        {
            return Err(invalid(
                "[cache] memory_bytes, max_object_bytes and disk_max_object_bytes must be positive"
                    .into(),
            ));
        }
        if let Some(problem) = config.sessions.problem() {
            return Err(invalid(problem));
        }
        if config.sites.is_empty() {
            return Err(invalid("no [[site]] configured".into()));
        }
        for site in &config.sites {
            if site.domains.is_empty() {
                return Err(invalid(format!(
                    "site with origin {} has no domains",
                    site.origin
                )));
            }
            let slice = site.cache.slice_bytes;
            if slice != 0
                && (!(MIN_SLICE..=MAX_SLICE).contains(&slice)
                    || slice > config.cache.max_object_bytes)
            {
                return Err(invalid(format!(
                    "site {}: cache slice_bytes {slice} must be 0 (off) or between {MIN_SLICE} and {MAX_SLICE}, and at most [cache] max_object_bytes",
                    site.domains[0]
                )));
            }
        }
        Ok(config)
    }
}

/// Smallest slice size (`[site.cache] slice_bytes`): smaller slices cost more origin
/// requests than they save.
const MIN_SLICE: u64 = 64 << 10;
/// Largest slice size: a slice is fetched whole before it is served.
const MAX_SLICE: u64 = 64 << 20;

/// Deserializes a list of header names, refusing what is not one.
fn header_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<http::HeaderName>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|h| {
            http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                serde::de::Error::custom(format!(
                    "cache key_headers entry {h:?} is not a header name"
                ))
            })
        })
        .collect()
}

/// Why a configured address or URL is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// A key server is not `host:port`.
    #[error("key server {0:?} is not host:port")]
    KeyServer(String),
    /// A name server is not an IP address with an optional port.
    #[error("[dns] name server {0:?} is not an ip or ip:port")]
    NameServer(String),
    /// A site origin is not a URL.
    #[error("site origin {0:?}: {1}")]
    OriginSyntax(String, String),
    /// A network of `[proxy] trusted_proxies` is not `addr/prefix`.
    #[error("{0:?}: {1}")]
    Network(String, String),
    /// A site origin is a URL of another kind.
    #[error("site origin {0:?} must be an http:// or https:// URL with a host")]
    OriginKind(String),
}

/// A key server's `host:port` (`[v6]:port` for IPv6 literals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyServerAddr {
    /// As configured: what is connected to (resolved by the system).
    addr: String,
    /// The host without brackets: the default name its certificate is checked for.
    host: String,
}

impl KeyServerAddr {
    /// `host:port` as configured.
    pub fn as_str(&self) -> &str {
        &self.addr
    }

    /// The host, without IPv6 brackets.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl std::fmt::Display for KeyServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

impl std::str::FromStr for KeyServerAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<KeyServerAddr, AddrError> {
        let host = match s.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => {
                h.trim_start_matches('[').trim_end_matches(']')
            }
            _ => return Err(AddrError::KeyServer(s.to_owned())),
        };
        if host.is_empty() {
            return Err(AddrError::KeyServer(s.to_owned()));
        }
        Ok(KeyServerAddr {
            addr: s.to_owned(),
            host: host.to_owned(),
        })
    }
}
deserialize_from_str!(KeyServerAddr);

/// A DNS server: `ip` or `ip:port` (`[v6]:port`), port 53 by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameServer(pub SocketAddr);

impl std::str::FromStr for NameServer {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<NameServer, AddrError> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(NameServer(addr));
        }
        let bare = s
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(s);
        let ip = bare
            .parse::<std::net::IpAddr>()
            .map_err(|_| AddrError::NameServer(s.to_owned()))?;
        Ok(NameServer(SocketAddr::new(ip, 53)))
    }
}
deserialize_from_str!(NameServer);

/// A site's origin: an `http://` or `https://` URL with a host, optionally a port and
/// a path prefix, checked and split once when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginUrl {
    /// As configured, for logs.
    text: String,
    tls: bool,
    /// Lowercase; IPv6 literals in brackets.
    host: String,
    port: u16,
    /// `scheme://host:port`: the origin's name in errors and its connection pool key.
    key: String,
    /// The URL's authority as written: the `Host` sent when the client named none.
    authority: http::uri::Authority,
    /// The URL's path, prepended to every request's path (`/` = none).
    path: String,
}

impl OriginUrl {
    /// Whether the origin is reached over TLS (`https`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host as written in the URL, lowercase (IPv6 literals in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host without IPv6 brackets, for TLS server names and resolution.
    pub fn bare_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    /// The port (the scheme's default when the URL names none).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `scheme://host:port`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The URL's authority.
    pub fn authority(&self) -> &http::uri::Authority {
        &self.authority
    }

    /// The URL's path prefix (`/` when it has none).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl std::fmt::Display for OriginUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for OriginUrl {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<OriginUrl, AddrError> {
        let uri: http::Uri = s.parse().map_err(|e: http::uri::InvalidUri| {
            AddrError::OriginSyntax(s.to_owned(), e.to_string())
        })?;
        let kind = || AddrError::OriginKind(s.to_owned());
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(kind()),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(kind)?;
        let host = host.to_ascii_lowercase();
        let authority = uri.authority().cloned().ok_or_else(kind)?;
        if authority.as_str().contains('@') {
            return Err(kind());
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let scheme = if tls { "https" } else { "http" };
        Ok(OriginUrl {
            text: s.to_owned(),
            tls,
            key: format!("{scheme}://{host}:{port}"),
            host,
            port,
            authority,
            path: uri.path().to_owned(),
        })
    }
}
deserialize_from_str!(OriginUrl);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_urls_are_split_once() {
        let o: OriginUrl = "https://Origin.Example:8443/base/".parse().unwrap();
        assert!(o.is_tls());
        assert_eq!(o.host(), "origin.example");
        assert_eq!(o.port(), 8443);
        assert_eq!(o.key(), "https://origin.example:8443");
        assert_eq!(o.authority().as_str(), "Origin.Example:8443");
        assert_eq!(o.path(), "/base/");
        let v6: OriginUrl = "http://[::1]".parse().unwrap();
        assert_eq!((v6.bare_host(), v6.port(), v6.path()), ("::1", 80, "/"));
        for bad in ["ftp://x", "/path", "http://", "http://u@x", "x y"] {
            assert!(bad.parse::<OriginUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn key_server_and_name_server_addresses() {
        let k: KeyServerAddr = "[::1]:2407".parse().unwrap();
        assert_eq!((k.as_str(), k.host()), ("[::1]:2407", "::1"));
        assert_eq!(
            "ks.example:1".parse::<KeyServerAddr>().unwrap().host(),
            "ks.example"
        );
        for bad in ["ks.example", "ks:port", ":2407"] {
            assert!(bad.parse::<KeyServerAddr>().is_err(), "{bad}");
        }
        let n = |s: &str| s.parse::<NameServer>().map(|n| n.0);
        assert_eq!(n("10.0.0.1").unwrap(), "10.0.0.1:53".parse().unwrap());
        assert_eq!(
            n("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(n("::1").unwrap(), "[::1]:53".parse().unwrap());
        assert_eq!(n("[::1]:53").unwrap(), "[::1]:53".parse().unwrap());
        assert!(n("dns.example").is_err());
    }

    #[test]
    fn errors_name_the_key() {
        let text = |origin: &str| {
            format!(
                "[listen]\n[keyserver]\nservers = [\"k:1\"]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[[site]]\ndomains = [\"x\"]\norigin = \"{origin}\"\n"
            )
        };
        let err = Config::parse(&text("ftp://x"), Path::new("e.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("origin") && msg.contains("ftp://x"), "{msg}");
        assert!(Config::parse(&text("http://x:8080/p"), Path::new("e.toml")).is_ok());
    }
}
