//! A throw-away loopback deployment made by `keyless-certs init`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};

use crate::bins;
use crate::keys::{KeyAlg, SiteKey};
use crate::net::free_addr;

/// The edge name `Deployment::init` gives its edge (the CN of its client certificate).
pub const EDGE_NAME: &str = "edge-1";

/// A directory holding a complete PKI and configs, with its own free ports.
///
/// The directory is under `std::env::temp_dir()` and is removed on drop, unless the
/// `KEEP_TEST_DIRS` environment variable is set or the thread is panicking (a failed
/// test keeps its files and logs for inspection; the path is printed).
#[derive(Debug)]
pub struct Deployment {
    dir: PathBuf,
    listen: SocketAddr,
    metrics: SocketAddr,
    /// The enrollment API, for deployments made with `--enroll`.
    enroll: Option<SocketAddr>,
    domains: Vec<String>,
    edge_name: String,
    report_on_drop: bool,
}

impl Deployment {
    /// Runs `keyless-certs init` for `domains` with edge name [`EDGE_NAME`].
    pub fn init(domains: &[&str]) -> Result<Deployment> {
        Deployment::init_with(domains, EDGE_NAME)
    }

    /// Runs `keyless-certs init` for `domains` with the given edge name.
    pub fn init_with(domains: &[&str], edge_name: &str) -> Result<Deployment> {
        Deployment::init_inner(domains, edge_name, false)
    }

    /// Runs `keyless-certs init --enroll` for `domains`: the key server enrolls edges of
    /// group `default` (the edge CA) on [`Deployment::enroll_addr`].
    pub fn init_enroll(domains: &[&str]) -> Result<Deployment> {
        Deployment::init_inner(domains, EDGE_NAME, true)
    }

    fn init_inner(domains: &[&str], edge_name: &str, enroll: bool) -> Result<Deployment> {
        let dir = unique_temp_dir("deploy")?;
        let listen = free_addr()?;
        let metrics = free_addr()?;
        let certs = bins::certs_bin()?;
        let mut cmd = Command::new(&certs);
        cmd.arg("init").arg("--out").arg(&dir);
        for d in domains {
            cmd.args(["--domain", d]);
        }
        cmd.arg("--keyserver-listen")
            .arg(listen.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .args(["--edge-name", edge_name]);
        let enroll = if enroll {
            let addr = free_addr()?;
            cmd.arg("--enroll")
                .arg("--enroll-listen")
                .arg(addr.to_string());
            Some(addr)
        } else {
            None
        };
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed with {}:\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let deployment = Deployment {
            dir,
            listen,
            metrics,
            enroll,
            domains: domains.iter().map(|d| d.to_string()).collect(),
            edge_name: edge_name.to_owned(),
            report_on_drop: true,
        };
        if !deployment.config_path().is_file() {
            bail!(
                "{cmd:?} did not write {}",
                deployment.config_path().display()
            );
        }
        Ok(deployment)
    }

    /// Whether dropping says what became of the directory (default on; see
    /// [`crate::KeyServer::set_report_on_drop`]).
    pub fn set_report_on_drop(&mut self, report: bool) {
        self.report_on_drop = report;
    }

    /// The deployment's root directory (`--out`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key server's mTLS address.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The key server's metrics address.
    pub fn metrics(&self) -> SocketAddr {
        self.metrics
    }

    /// The enrollment API's address (deployments made by [`Deployment::init_enroll`]).
    pub fn enroll_addr(&self) -> Option<SocketAddr> {
        self.enroll
    }

    /// The domains given to `init`.
    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// The edge's name (CN of `edge/edge.crt`).
    pub fn edge_name(&self) -> &str {
        &self.edge_name
    }

    /// `DIR/origin.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("origin.toml")
    }

    /// `DIR/origin/keys`: the key server's site keys and certificates.
    pub fn keys_dir(&self) -> PathBuf {
        self.dir.join("origin/keys")
    }

    /// `DIR/edge`: everything an edge holds.
    pub fn edge_dir(&self) -> PathBuf {
        self.dir.join("edge")
    }

    /// The edge's client certificate and key.
    pub fn edge_identity(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("edge/edge.crt"),
            self.dir.join("edge/edge.key"),
        )
    }

    /// The CA the edge trusts for the key server's certificate.
    pub fn keyserver_ca(&self) -> PathBuf {
        self.dir.join("edge/keyserver-ca.crt")
    }

    /// Where key server logs go.
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Loads the site key `init` made for `domain` with algorithm `alg` (stem
    /// `<domain>-ecdsa` or `<domain>-rsa`).
    pub fn site_key(&self, domain: &str, alg: KeyAlg) -> Result<SiteKey> {
        let suffix = match alg {
            KeyAlg::Rsa => "rsa",
            KeyAlg::Ecdsa => "ecdsa",
            KeyAlg::Ed25519 => "ed25519",
        };
        SiteKey::load(&self.keys_dir(), &format!("{domain}-{suffix}"))
    }

    /// Every `*.key` file under the key server's keys directory.
    pub fn site_key_files(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.keys_dir())? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "key") {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The text of `origin.toml`.
    pub fn config_text(&self) -> Result<String> {
        let path = self.config_path();
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Writes a variant of `origin.toml` as `DIR/<name>`, after `edit` changed it.
    ///
    /// Relative paths in the config stay valid because the variant sits beside it.
    pub fn write_config_variant(
        &self,
        name: &str,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Result<PathBuf> {
        let mut table: toml::Table = self.config_text()?.parse().context("parsing origin.toml")?;
        edit(&mut table);
        let path = self.dir.join(name);
        std::fs::write(&path, table.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DIRS").is_some() || std::thread::panicking() {
            eprintln!("keeping test directory {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
            // Shown by the harness only if the test fails.
            if self.report_on_drop {
                eprintln!(
                    "removed test directory {} (set KEEP_TEST_DIRS=1 to keep it)",
                    self.dir.display()
                );
            }
        }
    }
}

/// Sets `[[keys.acl]]` entries in a config table: `key` may only be used by `allow`.
pub fn add_acl(table: &mut toml::Table, key: &str, allow: &[&str]) {
    let mut entry = toml::Table::new();
    entry.insert("key".into(), key.into());
    entry.insert(
        "allow".into(),
        toml::Value::Array(allow.iter().map(|a| (*a).into()).collect()),
    );
    push_keys_entry(table, "acl", entry);
}

/// Turns the strict signing policy off (`require_handshake_context = false`), as an
/// operator serving reference Keyless clients that send bare digests would.
pub fn set_permissive(table: &mut toml::Table) {
    table.insert("require_handshake_context".into(), false.into());
}

/// Adds a `[[keys.policy]]` entry enabling raw RSA decrypt for the key with file stem
/// `key`.
pub fn allow_rsa_decrypt(table: &mut toml::Table, key: &str) {
    push_keys_entry(table, "policy", {
        let mut entry = toml::Table::new();
        entry.insert("key".into(), key.into());
        entry.insert("allow_rsa_decrypt".into(), true.into());
        entry
    });
}

/// Sets `[keys] default_acl` (`"allow"` or `"deny"`).
pub fn set_default_acl(table: &mut toml::Table, value: &str) {
    if let Some(keys) = keys_table(table) {
        keys.insert("default_acl".into(), value.into());
    }
}

/// Sets a field of `[tls]` (e.g. `client_crl`, `identity`).
pub fn set_tls(table: &mut toml::Table, field: &str, value: impl Into<toml::Value>) {
    if let Some(toml::Value::Table(tls)) = table.get_mut("tls") {
        tls.insert(field.into(), value.into());
    }
}

fn keys_table(table: &mut toml::Table) -> Option<&mut toml::Table> {
    table
        .entry("keys")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
}

fn push_keys_entry(table: &mut toml::Table, section: &str, entry: toml::Table) {
    let list = keys_table(table).and_then(|keys| {
        keys.entry(section)
            .or_insert_with(|| toml::Value::Array(Vec::new()))
            .as_array_mut()
    });
    if let Some(list) = list {
        list.push(toml::Value::Table(entry));
    }
}

/// A fresh, not yet existing path under the temp dir (`keyless-tests-<pid>-<n>-<what>`).
pub fn unique_temp_dir(what: &str) -> Result<PathBuf> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("keyless-tests-{}-{n}-{what}", std::process::id()));
    if dir.exists() {
        // Left over by an earlier process with the same pid.
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(dir)
}
