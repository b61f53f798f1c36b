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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// mTLS listener for edges. Default `0.0.0.0:2407`.
    #[serde(default = "default_listen")]
    pub(crate) listen: SocketAddr,
    /// Prometheus metrics and health. Default `127.0.0.1:2406`.
    #[serde(default = "default_metrics_listen")]
    pub(crate) metrics_listen: SocketAddr,
    /// Refuse sign requests that do not carry the whole TLS handshake message (tag
    /// 0x40), so that no client gets a signature over arbitrary data. Default `true`.
    /// `false` serves reference Keyless clients that send bare digests, and is logged
    /// as a warning at start and by `--test`. Raw RSA decrypt is governed per key by
    /// `[[keys.policy]]`, in both modes.
    #[serde(default = "default_true")]
    pub(crate) require_handshake_context: bool,
    /// Authenticated edge connections at most; a connection over the limit is closed
    /// right after its handshake. Default 10000.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: NonZeroUsize,
    /// Connections still in their TLS handshake at most (TCP accepted, not yet
    /// authenticated). When full, the oldest pending handshake is dropped for the new
    /// one, so idle TCP connections cannot lock edges out. Default 256.
    #[serde(default = "default_max_unauthenticated")]
    pub(crate) max_unauthenticated_connections: NonZeroUsize,
    /// Requests in flight per connection, replies waiting to be written included (errors
    /// too); the connection is not read further until one is written. Default 1024.
    #[serde(default = "default_max_in_flight")]
    pub(crate) max_in_flight_per_connection: NonZeroUsize,
    /// Threads doing private-key work. Default: the number of cores.
    #[serde(default)]
    pub(crate) workers: Option<NonZeroUsize>,
    /// Private-key operations waiting for a worker at most; a request that finds the
    /// queue full is answered `overloaded` at once. Default 4096.
    #[serde(default = "default_queue_size")]
    pub(crate) queue_size: NonZeroUsize,
    /// Longest wait for a worker: a request that would wait longer (by the queue's
    /// length and the recent cost of an operation) is answered `overloaded` at once, and
    /// a queued one that did is answered `overloaded` without being performed. It bounds
    /// the latency of admitted requests under overload; keep it below the edges' request
    /// timeout (2 s by default). Default "1s".
    #[serde(default = "default_queue_deadline", with = "humantime_serde")]
    pub(crate) queue_deadline: Duration,
    /// TLS handshake deadline of a new connection. Default "5s".
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub(crate) handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed. Default "10m".
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub(crate) idle_timeout: Duration,
    /// A write of replies that does not complete within this time, or a wait this long
    /// for a free in-flight slot, closes the connection (an edge that does not read its
    /// replies). Default "10s".
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub(crate) stall_timeout: Duration,
    /// Longest drain after SIGTERM: connections, told to go away, are served until their
    /// edge closes them or this time has passed, whichever comes first. Default "10s".
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub(crate) shutdown_timeout: Duration,
    /// How often the files of the TLS configuration (`[tls]` cert, key, client CA and
    /// CRL, every group's CA files) and `<state_dir>/revoked.json` are checked for
    /// changes; a change rebuilds the TLS configuration as SIGHUP does. Default "5s".
    #[serde(default = "default_tls_reload_interval", with = "humantime_serde")]
    pub(crate) tls_reload_interval: Duration,
    /// Directory of the enrollment state: `tokens.json`, `edges.json`, `revoked.json`
    /// (`ENROLL.md`). Created with mode 0700 when missing. Default `state` beside the
    /// configuration file.
    #[serde(default = "default_state_dir")]
    pub(crate) state_dir: PathBuf,
    /// The enrollment API (HTTPS with the `[tls]` identity, `ENROLL.md`). Default: none,
    /// no enrollment.
    #[serde(default)]
    pub(crate) enroll_listen: Option<SocketAddr>,
    /// Unix socket over which a new `keyless-origin --upgrade` takes the listening
    /// sockets (a zero-downtime upgrade); put it in a directory only the key server's
    /// user can enter. Default: none, no upgrades.
    #[serde(default)]
    pub(crate) upgrade_socket: Option<PathBuf>,
    /// The key server's own TLS identity and the CA of its clients.
    pub(crate) tls: TlsConfig,
    /// The site keys.
    pub(crate) keys: KeysConfig,
    /// Session-ticket keys handed to each group's edges (`get-ticket-keys`).
    #[serde(default)]
    pub(crate) tickets: TicketsConfig,
    /// Distributed tracing (OpenTelemetry); off by default.
    #[serde(default)]
    pub(crate) tracing: keyless_shared::telemetry::TracingConfig,
    /// Edge groups: each with its own CA, keys and certificate policy.
    #[serde(default, rename = "group")]
    pub(crate) groups: Vec<GroupConfig>,
}

/// One `[[group]]`: edges whose certificates carry the URI SAN
/// `keyless://group/<name>/edge/<id>` and were issued by the group's CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupConfig {
    /// The group's name: letters, digits, `-`, `_` and `.`, as in its certificates' URI.
    pub(crate) name: String,
    /// PEM certificate of the group's edge CA.
    pub(crate) ca_cert: PathBuf,
    /// PEM private key of the CA. Without it the key server checks the group's edges but
    /// cannot enroll or renew them. Default: none.
    #[serde(default)]
    pub(crate) ca_key: Option<PathBuf>,
    /// CA certificates still trusted for the group during a CA rotation (edges not yet
    /// renewed under the new CA). Default: none.
    #[serde(default)]
    pub(crate) previous_ca_certs: Vec<PathBuf>,
    /// File stems of the keys the group's edges may use; `*` matches any run of
    /// characters. Default: every key.
    #[serde(default)]
    pub(crate) keys: Option<Vec<String>>,
    /// Lifetime of the certificates the group's CA issues. Default "24h".
    #[serde(default = "default_cert_lifetime", with = "humantime_serde")]
    pub(crate) cert_lifetime: Duration,
    /// Largest difference between an enrolling edge's clock and the key server's.
    /// Default "5m".
    #[serde(default = "default_max_clock_offset", with = "humantime_serde")]
    pub(crate) max_clock_offset: Duration,
}

impl GroupConfig {
    /// Whether the group's edges may use the key with file stem `key`.
    pub(crate) fn allows_key(&self, key: &str) -> bool {
        self.keys
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| glob_match(p, key)))
    }

    /// The group's CA certificate files, current first.
    pub(crate) fn files_certs(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.ca_cert.as_path())
            .chain(self.previous_ca_certs.iter().map(PathBuf::as_path))
    }

    /// Every file of the group, for change detection.
    pub(crate) fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.ca_cert.as_path())
            .chain(self.ca_key.as_deref())
            .chain(self.previous_ca_certs.iter().map(PathBuf::as_path))
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters
/// (including none) and everything else for itself.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    // `split` yields at least one part.
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole name must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Whether `name` can be a group name: it goes into a URI path segment and a URL path.
fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != ".."
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    /// PEM certificate chain of the key server (leaf first).
    pub(crate) cert: PathBuf,
    /// PEM private key of the key server.
    pub(crate) key: PathBuf,
    /// PEM CA certificate(s) that edge client certificates without a group (no
    /// `keyless://group/` URI SAN) must chain to: the implicit group `default`, whose
    /// edges may use every key. Optional when `[[group]]`s are configured.
    #[serde(default)]
    pub(crate) client_ca: Option<PathBuf>,
    /// PEM CRL(s) of the edge CA. A certificate listed there is refused, and so is one
    /// whose revocation status the CRLs do not cover (fail closed). Re-read on SIGHUP.
    /// Default: none.
    #[serde(default)]
    pub(crate) client_crl: Option<PathBuf>,
    /// Where a client's identity (what ACLs name) comes from: `"san"`, the first DNS
    /// SAN of its certificate, or `"cn"`, the subject CN. A certificate without one is
    /// refused. Default `"san"`.
    #[serde(default)]
    pub(crate) identity: IdentitySource,
    /// Self-rotation: every `rotate_every` the key server issues itself a new
    /// certificate (new ECDSA P-256 key, same subject and SANs, valid for twice
    /// `rotate_every`) signed by `ca_cert`/`ca_key`, writes it over `cert` and `key` and
    /// reloads; also at start when the certificate has less than half of `rotate_every`
    /// left. At least "1s"; needs `ca_cert` and `ca_key`. Default: none, no rotation.
    #[serde(default, with = "humantime_serde")]
    pub(crate) rotate_every: Option<Duration>,
    /// PEM certificate of the key-server CA (the CA edges trust for key servers), the
    /// issuer of rotated certificates. Only with `rotate_every`. Default: none.
    #[serde(default)]
    pub(crate) ca_cert: Option<PathBuf>,
    /// PEM private key of the key-server CA. Only with `rotate_every`. Default: none.
    #[serde(default)]
    pub(crate) ca_key: Option<PathBuf>,
}

/// `[tls]` self-rotation, when configured: the schedule and the CA that signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RotationConfig {
    pub(crate) every: Duration,
    pub(crate) ca_cert: PathBuf,
    pub(crate) ca_key: PathBuf,
}

impl TlsConfig {
    /// The self-rotation settings; `None` without `rotate_every`. [`Config::load`] has
    /// checked that `ca_cert` and `ca_key` come with it.
    pub(crate) fn rotation(&self) -> Option<RotationConfig> {
        Some(RotationConfig {
            every: self.rotate_every?,
            ca_cert: self.ca_cert.clone()?,
            ca_key: self.ca_key.clone()?,
        })
    }
}

/// `[tickets]`: the session-ticket keys every edge of a group shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TicketsConfig {
    /// A new key seals tickets every this long. Default "1h".
    #[serde(default = "default_ticket_rotation", with = "humantime_serde")]
    pub(crate) rotate_every: Duration,
    /// Keys before the current one that still open tickets. Default 2.
    #[serde(default = "default_ticket_previous")]
    pub(crate) previous: u32,
    /// Where each group's ticket secret is kept (`<group>.key`; copy it to the group's
    /// other key servers). Default `<state_dir>/tickets`.
    #[serde(default)]
    pub(crate) secret_dir: Option<PathBuf>,
}

impl Default for TicketsConfig {
    fn default() -> Self {
        TicketsConfig {
            rotate_every: default_ticket_rotation(),
            previous: default_ticket_previous(),
            secret_dir: None,
        }
    }
}

fn default_ticket_rotation() -> Duration {
    Duration::from_secs(3600)
}

fn default_ticket_previous() -> u32 {
    2
}

/// The field of an edge certificate that names the edge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum IdentitySource {
    /// The first DNS subject alternative name.
    #[default]
    San,
    /// The subject common name.
    Cn,
}

/// Whether a key with no `[[keys.acl]]` entry may be used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DefaultAcl {
    /// Every authenticated client may use it.
    #[default]
    Allow,
    /// Nobody may: only keys listed in `[[keys.acl]]` are usable.
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeysConfig {
    /// Directory of PEM private keys and certificate chains.
    pub(crate) dir: PathBuf,
    /// Which client identities may use which key, for signing and for
    /// get-certificate-chain.
    #[serde(default)]
    pub(crate) acl: Vec<AclEntry>,
    /// A key with no `[[keys.acl]]` entry: `"allow"` (every authenticated client) or
    /// `"deny"` (nobody). Default `"allow"`.
    #[serde(default)]
    pub(crate) default_acl: DefaultAcl,
    /// Per-key operation policy. Default: no entry, so no key does raw RSA decrypt.
    #[serde(default)]
    pub(crate) policy: Vec<PolicyEntry>,
    /// Key stores besides `dir`: PKCS#11 tokens.
    #[serde(default)]
    pub(crate) store: Vec<StoreConfig>,
}

/// One `[[keys.store]]`: a PKCS#11 token whose private keys the key server uses
/// without ever holding them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreConfig {
    /// The store's kind; only `"pkcs11"`.
    #[serde(rename = "type")]
    pub(crate) kind: StoreKind,
    /// RFC 7512 URI: token, optional object/id, module-path and pin-source.
    pub(crate) uri: String,
    /// Sessions (and worker threads) on the token: operations run in parallel up to
    /// this many. Default: the token's session limit, at most 8 (4 when the token
    /// reports none).
    #[serde(default)]
    pub(crate) sessions: Option<usize>,
    /// Longest a private-key operation may take on the token. Default "2s".
    #[serde(default = "default_sign_timeout", with = "humantime_serde")]
    pub(crate) sign_timeout: Duration,
    /// Retries of an operation on a new session after a session or token failure.
    /// Default 1.
    #[serde(default = "default_sign_retry_count")]
    pub(crate) sign_retry_count: u32,
    /// Accept private keys marked extractable or not sensitive. Default false.
    #[serde(default)]
    pub(crate) allow_extractable: bool,
}

/// The kinds of `[[keys.store]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StoreKind {
    /// A PKCS#11 token.
    Pkcs11,
}

fn default_sign_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_sign_retry_count() -> u32 {
    1
}

/// One `[[keys.policy]]` entry: a key, by file stem or SKI, and what it may do beyond
/// handshake signatures.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyEntry {
    /// File stem of the key in `keys.dir`.
    #[serde(default)]
    pub(crate) key: Option<String>,
    /// Or the key's SKI in hex.
    #[serde(default)]
    pub(crate) ski: Option<Ski>,
    /// Allow the raw RSA private operation (opcode 0x01, TLS 1.2 RSA key exchange of
    /// reference clients). It is a decryption and signing oracle for whoever may use
    /// the key, and rustls never needs it. Default `false`.
    #[serde(default)]
    pub(crate) allow_rsa_decrypt: bool,
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
    /// Client identities (see `[tls] identity`).
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
fn default_true() -> bool {
    true
}
fn default_max_unauthenticated() -> NonZeroUsize {
    NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN)
}
fn default_queue_size() -> NonZeroUsize {
    NonZeroUsize::new(4096).unwrap_or(NonZeroUsize::MIN)
}
fn default_queue_deadline() -> Duration {
    Duration::from_secs(1)
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_in_flight() -> NonZeroUsize {
    NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN)
}
fn default_tls_reload_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}
fn default_cert_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_max_clock_offset() -> Duration {
    Duration::from_secs(300)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(5)
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
        config.make_absolute(path.parent().unwrap_or(Path::new(".")));
        config.check().map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Relative paths are taken from `base`, the configuration file's directory.
    fn make_absolute(&mut self, base: &Path) {
        let groups = self.groups.iter_mut().flat_map(|g| {
            std::iter::once(&mut g.ca_cert)
                .chain(g.ca_key.as_mut())
                .chain(g.previous_ca_certs.iter_mut())
        });
        for p in [
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.keys.dir,
            &mut self.state_dir,
        ]
        .into_iter()
        .chain(self.tls.client_ca.as_mut())
        .chain(self.tls.client_crl.as_mut())
        .chain(self.tls.ca_cert.as_mut())
        .chain(self.tls.ca_key.as_mut())
        .chain(self.tickets.secret_dir.as_mut())
        .chain(self.upgrade_socket.as_mut())
        .chain(groups)
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// What serde cannot check: settings that only make sense together.
    fn check(&self) -> Result<(), String> {
        self.tracing.check()?;
        let tls = &self.tls;
        if tls.client_ca.is_none() && self.groups.is_empty() {
            return Err(
                "no client CA: set [tls] client_ca or configure at least one [[group]]".into(),
            );
        }
        if tls.client_crl.is_some() && tls.client_ca.is_none() {
            return Err("[tls] client_crl needs [tls] client_ca (the CA whose CRL it is)".into());
        }
        match (
            tls.rotate_every,
            tls.ca_cert.is_some(),
            tls.ca_key.is_some(),
        ) {
            (Some(every), true, true) if every < Duration::from_secs(1) => {
                return Err("[tls] rotate_every must be at least 1s".into());
            }
            (Some(_), true, true) | (None, false, false) => {}
            (Some(_), _, _) => {
                return Err("[tls] rotate_every needs ca_cert and ca_key (the key-server CA that signs the rotated certificates)".into());
            }
            (None, _, _) => {
                return Err("[tls] ca_cert and ca_key are only used with rotate_every".into());
            }
        }
        if self.tickets.rotate_every < Duration::from_secs(1) || self.tickets.previous > 8 {
            return Err("[tickets] rotate_every is at least 1s and previous at most 8".into());
        }
        if self.tls_reload_interval < Duration::from_millis(100) {
            return Err("tls_reload_interval must be at least 100ms".into());
        }
        self.check_groups()?;
        let one_of = |key: bool, ski: bool, section: &str| {
            if key == ski {
                return Err(format!(
                    "each [[{section}]] entry needs exactly one of `key` or `ski`"
                ));
            }
            Ok(())
        };
        for entry in &self.keys.acl {
            one_of(entry.key.is_some(), entry.ski.is_some(), "keys.acl")?;
        }
        for entry in &self.keys.policy {
            one_of(entry.key.is_some(), entry.ski.is_some(), "keys.policy")?;
        }
        Ok(())
    }

    fn check_groups(&self) -> Result<(), String> {
        for (i, g) in self.groups.iter().enumerate() {
            if !valid_group_name(&g.name) {
                return Err(format!(
                    "[[group]] name {:?}: use 1 to 64 letters, digits, '-', '_' or '.'",
                    g.name
                ));
            }
            if self.groups[..i].iter().any(|o| o.name == g.name) {
                return Err(format!("[[group]] {:?} is defined twice", g.name));
            }
            if g.cert_lifetime < Duration::from_secs(1) {
                return Err(format!(
                    "[[group]] {:?}: cert_lifetime must be at least 1s",
                    g.name
                ));
            }
            if g.keys
                .as_ref()
                .is_some_and(|k| k.iter().any(String::is_empty))
            {
                return Err(format!(
                    "[[group]] {:?}: an empty key pattern matches no key",
                    g.name
                ));
            }
        }
        Ok(())
    }

    /// The group named `name`.
    pub(crate) fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
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
        assert!(c.require_handshake_context);
        assert_eq!(c.tls.cert, path.parent().unwrap().join("c.pem"));
        assert_eq!(c.state_dir, path.parent().unwrap().join("state"));
        assert!(c.enroll_listen.is_none());
        assert!(c.groups.is_empty());
        assert_eq!(c.tls_reload_interval, Duration::from_secs(5));
        assert_eq!(c.tls.identity, IdentitySource::San);
        assert!(c.tls.client_crl.is_none());
        assert_eq!(c.keys.default_acl, DefaultAcl::Allow);
        assert!(c.keys.policy.is_empty());
        assert_eq!(c.handshake_timeout, Duration::from_secs(5));
        assert_eq!(c.max_unauthenticated_connections.get(), 256);
        assert_eq!(c.queue_size.get(), 4096);
        assert_eq!(c.queue_deadline, Duration::from_secs(1));
        assert_eq!(c.stall_timeout, Duration::from_secs(10));
        assert!(c.tls.rotation().is_none());
    }

    #[test]
    fn rotation_needs_its_ca_and_a_sane_period() {
        let tls = |extra: &str| MIN.replace("[keys]", &format!("{extra}\n[keys]"));
        let path = write(
            "rotate",
            &tls("rotate_every = '24h'\nca_cert = 'ks-ca.crt'\nca_key = 'ks-ca.key'"),
        );
        let rotation = Config::load(&path).unwrap().tls.rotation().unwrap();
        let dir = path.parent().unwrap();
        assert_eq!(rotation.every, Duration::from_secs(24 * 3600));
        assert_eq!(rotation.ca_cert, dir.join("ks-ca.crt"));
        assert_eq!(rotation.ca_key, dir.join("ks-ca.key"));
        for (name, extra, expect) in [
            (
                "rot-noca",
                "rotate_every = '24h'",
                "needs ca_cert and ca_key",
            ),
            (
                "rot-nokey",
                "rotate_every = '24h'\nca_cert = 'a.crt'",
                "needs ca_cert and ca_key",
            ),
            (
                "rot-short",
                "rotate_every = '500ms'\nca_cert = 'a.crt'\nca_key = 'a.key'",
                "at least 1s",
            ),
            (
                "rot-unused",
                "ca_cert = 'a.crt'\nca_key = 'a.key'",
                "only used with rotate_every",
            ),
            ("rot-bad", "rotate_every = 'daily'", "rotate_every"),
        ] {
            let err = Config::load(&write(name, &tls(extra)))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{name}: {err}");
        }
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
        let path = write(
            "badpolicy",
            &format!("{MIN}[[keys.policy]]\nallow_rsa_decrypt=true\n"),
        );
        assert!(Config::load(&path)
            .unwrap_err()
            .to_string()
            .contains("keys.policy"));
        let path = write(
            "badacl2",
            &MIN.replace("[keys]", "[keys]\ndefault_acl='maybe'"),
        );
        assert!(Config::load(&path).is_err());
    }

    #[test]
    fn switches_parse() {
        let text = MIN
            .replace(
                "client_ca='ca.pem'",
                "client_ca='ca.pem'\nclient_crl='edge.crl'\nidentity='cn'",
            )
            .replace("[keys]", "[keys]\ndefault_acl='deny'");
        let path = write(
            "switches",
            &format!("require_handshake_context=false\n{text}[[keys.policy]]\nkey='a'\nallow_rsa_decrypt=true\n"),
        );
        let c = Config::load(&path).unwrap();
        assert!(!c.require_handshake_context);
        assert_eq!(c.tls.identity, IdentitySource::Cn);
        assert_eq!(
            c.tls.client_crl,
            Some(path.parent().unwrap().join("edge.crl"))
        );
        assert_eq!(c.keys.default_acl, DefaultAcl::Deny);
        assert!(c.keys.policy[0].allow_rsa_decrypt);
    }

    #[test]
    fn groups_parse_with_defaults_and_relative_paths() {
        let text = format!(
            "enroll_listen = '127.0.0.1:2408'\nstate_dir = '/var/lib/k'\n{MIN}\
             [[group]]\nname = 'eu'\nca_cert = 'eu.crt'\nca_key = 'eu.key'\n\
             previous_ca_certs = ['old.crt']\nkeys = ['example.com-*']\n\
             cert_lifetime = '90s'\nmax_clock_offset = '1m'\n\
             [[group]]\nname = 'us'\nca_cert = 'us.crt'\n"
        );
        let path = write("groups", &text);
        let c = Config::load(&path).unwrap();
        let dir = path.parent().unwrap();
        assert_eq!(c.enroll_listen, Some("127.0.0.1:2408".parse().unwrap()));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/k"));
        let eu = c.group("eu").unwrap();
        assert_eq!(eu.ca_cert, dir.join("eu.crt"));
        assert_eq!(eu.ca_key, Some(dir.join("eu.key")));
        assert_eq!(eu.previous_ca_certs, vec![dir.join("old.crt")]);
        assert_eq!(eu.cert_lifetime, Duration::from_secs(90));
        assert_eq!(eu.max_clock_offset, Duration::from_secs(60));
        assert!(eu.allows_key("example.com-ecdsa"));
        assert!(!eu.allows_key("other.org-ecdsa"));
        let us = c.group("us").unwrap();
        assert!(us.ca_key.is_none() && us.keys.is_none());
        assert_eq!(us.cert_lifetime, Duration::from_secs(86400));
        assert_eq!(us.max_clock_offset, Duration::from_secs(300));
        assert!(us.allows_key("anything"));
        assert_eq!(eu.files().count(), 3);

        // Groups alone, without [tls] client_ca.
        let path = write(
            "groups-only",
            &format!(
                "{}[[group]]\nname='g'\nca_cert='g.crt'\n",
                MIN.replace("client_ca='ca.pem'\n", "")
            ),
        );
        assert!(Config::load(&path).unwrap().tls.client_ca.is_none());
    }

    #[test]
    fn bad_groups_are_errors() {
        let group = |body: &str| format!("{MIN}[[group]]\nca_cert='g.crt'\n{body}");
        for (name, text, expect) in [
            ("g-noname", group(""), "name"),
            ("g-badname", group("name='a/b'"), "name"),
            ("g-dotdot", group("name='..'"), "name"),
            (
                "g-twice",
                format!(
                    "{}[[group]]\nname='a'\nca_cert='h.crt'\n",
                    group("name='a'")
                ),
                "twice",
            ),
            (
                "g-lifetime",
                group("name='a'\ncert_lifetime='0s'"),
                "cert_lifetime",
            ),
            (
                "g-badtime",
                group("name='a'\nmax_clock_offset='soon'"),
                "max_clock_offset",
            ),
            ("g-unknown", group("name='a'\nca='x'"), "unknown field"),
            (
                "g-emptykey",
                group("name='a'\nkeys=['']"),
                "empty key pattern",
            ),
            (
                "no-ca",
                MIN.replace("client_ca='ca.pem'\n", ""),
                "no client CA",
            ),
        ] {
            let err = Config::load(&write(name, &text)).unwrap_err().to_string();
            assert!(err.contains(expect), "{name}: {err}");
        }
    }

    #[test]
    fn globs_match_stems() {
        for (pattern, name, expected) in [
            ("a", "a", true),
            ("a", "ab", false),
            ("*", "", true),
            ("*", "anything", true),
            ("example.com-*", "example.com-rsa", true),
            ("example.com-*", "example.org-rsa", false),
            ("*-ecdsa", "x.org-ecdsa", true),
            ("*-ecdsa", "x.org-rsa", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
            ("**", "x", true),
        ] {
            assert_eq!(glob_match(pattern, name), expected, "{pattern} ~ {name}");
        }
    }
}
