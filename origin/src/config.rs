//! `origin.toml`: the key server's configuration, parsed into typed values.
//!
//! Relative paths are taken from the directory of the configuration file, so a
//! deployment directory can be moved as a whole.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyless_shared::Ski;
use serde::Deserialize;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// mTLS listener for edges. Default `0.0.0.0:2407`.
    #[serde(default = "default_listen")]
    pub(crate) listen: SocketAddr,
    /// Prometheus metrics and health. Default `127.0.0.1:2406`.
    #[serde(default = "default_metrics_listen")]
    pub(crate) metrics_listen: SocketAddr,
    /// Refuse sign requests that do not carry the whole TLS handshake message (and
    /// raw RSA decrypt, which is a signing oracle). Default `false`.
    #[serde(default)]
    pub(crate) require_handshake_context: bool,
    /// Open edge connections at most; further ones wait in the accept queue.
    /// Default 10000.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: NonZeroUsize,
    /// Requests in flight per connection; the connection is not read further until
    /// one completes. Default 1024.
    #[serde(default = "default_max_in_flight")]
    pub(crate) max_in_flight_per_connection: NonZeroUsize,
    /// Threads doing private-key work. Default: the number of cores.
    #[serde(default)]
    pub(crate) workers: Option<NonZeroUsize>,
    /// TLS handshake deadline. Default "10s".
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub(crate) handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed. Default "10m".
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub(crate) idle_timeout: Duration,
    /// On SIGTERM, in-flight requests get this long to finish. Default "10s".
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub(crate) shutdown_timeout: Duration,
    /// The key server's own TLS identity and the CA of its clients.
    pub(crate) tls: TlsConfig,
    /// The site keys.
    pub(crate) keys: KeysConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    /// PEM certificate chain of the key server (leaf first).
    pub(crate) cert: PathBuf,
    /// PEM private key of the key server.
    pub(crate) key: PathBuf,
    /// PEM CA certificate(s) that edge client certificates must chain to.
    pub(crate) client_ca: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeysConfig {
    /// Directory of PEM private keys and certificate chains.
    pub(crate) dir: PathBuf,
    /// Which client identities may use which key. A key with no entry may be used
    /// by every authenticated client.
    #[serde(default)]
    pub(crate) acl: Vec<AclEntry>,
}

/// One ACL entry: a key, by file stem or SKI, and the identities allowed to use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AclEntry {
    /// File stem of the key in `keys.dir` (e.g. `example.com-ecdsa`).
    #[serde(default)]
    pub(crate) key: Option<String>,
    /// Or the key's SKI in hex.
    #[serde(default)]
    pub(crate) ski: Option<Ski>,
    /// Client identities (certificate CN, or first DNS SAN without a CN).
    pub(crate) allow: Vec<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 2407))
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 2406))
}
fn default_max_connections() -> NonZeroUsize {
    NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN)
}
fn default_max_in_flight() -> NonZeroUsize {
    NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Config {
    /// Reads and parses `path`, resolving relative paths against its directory.
    pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.tls.client_ca,
            &mut config.keys.dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for entry in &config.keys.acl {
            if entry.key.is_some() == entry.ski.is_some() {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: "each [[keys.acl]] entry needs exactly one of `key` or `ski`".into(),
                });
            }
        }
        Ok(config)
    }

    /// Number of private-key worker threads.
    pub(crate) fn worker_count(&self) -> usize {
        self.workers.map(NonZeroUsize::get).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(NonZeroUsize::get)
                .unwrap_or(1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("keyless-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("origin.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const MIN: &str = "[tls]\ncert='c.pem'\nkey='k.pem'\nclient_ca='ca.pem'\n[keys]\ndir='keys'\n";

    #[test]
    fn defaults_and_relative_paths() {
        let path = write("defaults", MIN);
        let c = Config::load(&path).unwrap();
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.metrics_listen.port(), 2406);
        assert!(!c.require_handshake_context);
        assert_eq!(c.tls.cert, path.parent().unwrap().join("c.pem"));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_the_file() {
        let path = write("unknown", &format!("bogus = 1\n{MIN}"));
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("origin.toml") && err.contains("bogus"),
            "{err}"
        );
        let path = write("badaddr", &format!("listen = 'nope'\n{MIN}"));
        assert!(Config::load(&path).is_err());
        let path = write("badacl", &format!("{MIN}[[keys.acl]]\nallow=['a']\n"));
        assert!(Config::load(&path)
            .unwrap_err()
            .to_string()
            .contains("exactly one"));
    }
}
