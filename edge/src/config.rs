//! `edge.toml`: the edge's configuration, parsed into typed values.
//!
//! Relative paths are taken from the directory of the configuration file.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
#[derive(Debug, Clone, Deserialize)]
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
    /// Proxying to origins.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Customer sites.
    #[serde(rename = "site")]
    pub sites: Vec<SiteConfig>,
}

/// `[listen]`.
#[derive(Debug, Clone, Deserialize)]
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
}

/// `[keyserver]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyServerConfig {
    /// `host:port` of each key server, most preferred first.
    pub servers: Vec<String>,
    /// CA that key-server certificates chain to.
    pub ca: PathBuf,
    /// The edge's client certificate (PEM chain).
    pub cert: PathBuf,
    /// The edge's client key (PEM).
    pub key: PathBuf,
    /// Name to verify key-server certificates against. Default: each server's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Connections per key server. Default 2.
    #[serde(default = "default_ks_connections")]
    pub connections: NonZeroUsize,
    /// Deadline of each key-server request. Default "2s".
    #[serde(default = "default_2s", with = "humantime_serde")]
    pub timeout: Duration,
    /// Deadline of connecting to a key server. Default "2s".
    #[serde(default = "default_2s", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

/// `[dns]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers (`ip` or `ip:port`); empty = the system's resolver configuration.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Deadline of one DNS query. Default "2s".
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: default_5s(),
            response_header_timeout: default_30s(),
            idle_timeout: default_60s(),
            max_connections: default_max_connections(),
            max_header_bytes: default_max_header_bytes(),
            origin_ca: None,
        }
    }
}

/// One `[[site]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Names served (exact, or `*.example.com` for one label under it).
    pub domains: Vec<String>,
    /// Origin URL (`http://` or `https://`); its host is resolved through `[dns]`.
    pub origin: String,
}

fn default_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_ks_connections() -> NonZeroUsize {
    NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN)
}
fn default_2s() -> Duration {
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
        let mut paths = vec![
            &mut config.keyserver.ca,
            &mut config.keyserver.cert,
            &mut config.keyserver.key,
        ];
        if let Some(p) = config.proxy.origin_ca.as_mut() {
            paths.push(p);
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if config.keyserver.servers.is_empty() {
            return Err(invalid("[keyserver] servers is empty".into()));
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
            let uri: http::Uri = site
                .origin
                .parse()
                .map_err(|e| invalid(format!("site origin {:?}: {e}", site.origin)))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(invalid(format!(
                    "site origin {:?} must be an http:// or https:// URL with a host",
                    site.origin
                )));
            }
        }
        Ok(config)
    }
}
