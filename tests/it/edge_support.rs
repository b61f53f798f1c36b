//! The stack every edge test runs against: a deployment, its key server, a content
//! origin found through a real DNS server (dnsmasq), and a `keyless-edge` in front.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keyless_tests::{
    has_field, per_phase, Curl, Deployment, Dns, Edge, EdgeConfig, KeyServer, SClientOutput,
    TestOrigin,
};
use keyless_tests::{HandshakeEnd, LoadOutcome};

/// The ECDSA-and-RSA site (both keys, as `keyless-certs init` makes them).
pub(crate) const SITE: &str = "example.com";
/// A name under the site's wildcard.
pub(crate) const WILDCARD_NAME: &str = "www.example.com";
/// A site with only an RSA key (its ECDSA files are removed before the key server starts).
pub(crate) const RSA_SITE: &str = "rsa.example.net";
/// A site with only an Ed25519 key (self-signed: clients see it but cannot verify it).
pub(crate) const ED25519_SITE: &str = "ed25519.example.org";
/// The origin's host name; only the test's dnsmasq knows it.
pub(crate) const ORIGIN_HOST: &str = "origin.example.com";

/// Everything behind one edge. Fields drop in order: the edge first, the deployment
/// (which removes the directory the logs are in) last.
pub(crate) struct Stack {
    pub(crate) edge: Edge,
    pub(crate) dns: Dns,
    pub(crate) origin: TestOrigin,
    pub(crate) keyserver: KeyServer,
    pub(crate) deployment: Deployment,
}

type Edit = Box<dyn FnOnce(EdgeConfig) -> EdgeConfig>;
/// A change to the key server's `origin.toml`.
type OriginEdit = Box<dyn FnOnce(&mut toml::Table)>;

/// How to set up a [`Stack`].
#[derive(Default)]
pub(crate) struct StackBuilder {
    /// The deployment's key server enrolls edges (`keyless-certs init --enroll`).
    enroll: bool,
    rsa_site: bool,
    ed25519_site: bool,
    /// The key server's config has `upgrade_socket = "origin-upgrade.sock"`.
    keyserver_upgrade: bool,
    edit: Option<Edit>,
}

/// The default stack: [`SITE`] only.
pub(crate) fn stack() -> Result<Stack> {
    StackBuilder::default().start()
}

impl StackBuilder {
    /// Also serve [`RSA_SITE`], whose only key is RSA.
    pub(crate) fn rsa_site(mut self) -> StackBuilder {
        self.rsa_site = true;
        self
    }

    /// The key server enrolls edges of group `default` (`keyless-certs init --enroll`).
    pub(crate) fn enroll(mut self) -> StackBuilder {
        self.enroll = true;
        self
    }

    /// Also serve [`ED25519_SITE`], whose only key is Ed25519.
    pub(crate) fn ed25519_site(mut self) -> StackBuilder {
        self.ed25519_site = true;
        self
    }

    /// The key server takes `upgrade_socket = "origin-upgrade.sock"` (beside its config).
    pub(crate) fn keyserver_upgrade_socket(mut self) -> StackBuilder {
        self.keyserver_upgrade = true;
        self
    }

    /// Starts everything, the edge with `[listen] upgrade_socket = "edge-upgrade.sock"`
    /// (beside its config).
    pub(crate) fn start_with_upgrade_socket(self) -> Result<Stack> {
        self.edit(|c| c.upgrade_socket(std::path::Path::new("edge-upgrade.sock")))
            .start()
    }

    /// Changes the edge config before the edge starts.
    pub(crate) fn edit(mut self, edit: impl FnOnce(EdgeConfig) -> EdgeConfig + 'static) -> Self {
        self.edit = Some(Box::new(edit));
        self
    }

    /// Starts everything.
    pub(crate) fn start(mut self) -> Result<Stack> {
        let edit = self.edit.take();
        self.backends()?.with_edge(|c| match edit {
            Some(edit) => edit(c),
            None => c,
        })
    }

    /// Starts everything but the edge.
    pub(crate) fn backends(&self) -> Result<Backends> {
        if self.keyserver_upgrade {
            return self.start_backends(Some(Box::new(|t: &mut toml::Table| {
                t.insert("upgrade_socket".into(), "origin-upgrade.sock".into());
            })));
        }
        self.start_backends(None)
    }

    /// Starts everything but the edge, the key server with its `origin.toml` changed by
    /// `edit` (written as `origin-edited.toml` beside it).
    pub(crate) fn backends_with_origin_config(
        &self,
        edit: impl FnOnce(&mut toml::Table) + 'static,
    ) -> Result<Backends> {
        self.start_backends(Some(Box::new(edit)))
    }

    fn start_backends(&self, origin_edit: Option<OriginEdit>) -> Result<Backends> {
        let mut domains = vec![SITE];
        if self.rsa_site {
            domains.push(RSA_SITE);
        }
        let deployment = match self.enroll {
            true => Deployment::init_enroll(&domains)?,
            false => Deployment::init(&domains)?,
        };
        if self.rsa_site {
            for ext in ["key", "crt"] {
                let path = deployment
                    .keys_dir()
                    .join(format!("{RSA_SITE}-ecdsa.{ext}"));
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        if self.ed25519_site {
            keyless_tests::keys::install_key(
                &deployment.keys_dir(),
                &format!("{ED25519_SITE}-ed25519"),
                keyless_tests::keys::KeySpec::Ed25519,
                keyless_tests::keys::KeyEncoding::Pkcs8,
                &[ED25519_SITE],
            )?;
        }
        let keyserver = match origin_edit {
            Some(edit) => {
                let config = deployment.write_config_variant("origin-edited.toml", edit)?;
                KeyServer::start_with_config(&deployment, &config)?
            }
            None => KeyServer::start(&deployment)?,
        };
        let logs = deployment.logs_dir();
        let origin = TestOrigin::start(&logs)?;
        let dns = Dns::start(&logs, &[(ORIGIN_HOST, IpAddr::V4(Ipv4Addr::LOCALHOST))])?;
        Ok(Backends {
            rsa_site: self.rsa_site,
            ed25519_site: self.ed25519_site,
            dns,
            origin,
            keyserver,
            deployment,
        })
    }
}

/// A [`Stack`] without its edge yet.
pub(crate) struct Backends {
    rsa_site: bool,
    ed25519_site: bool,
    pub(crate) dns: Dns,
    pub(crate) origin: TestOrigin,
    pub(crate) keyserver: KeyServer,
    pub(crate) deployment: Deployment,
}

impl Backends {
    /// Starts the edge with the sites pointing at the origin by its DNS name, after
    /// `edit` changed the config.
    pub(crate) fn with_edge(self, edit: impl FnOnce(EdgeConfig) -> EdgeConfig) -> Result<Stack> {
        let origin_url = format!("http://{ORIGIN_HOST}:{}", self.origin.port());
        let wildcard = format!("*.{SITE}");
        let mut config = EdgeConfig::new(&self.deployment)?
            .nameserver(self.dns.addr())
            .site(&[SITE, &wildcard], &origin_url);
        if self.rsa_site {
            config = config.site(&[RSA_SITE], &origin_url);
        }
        if self.ed25519_site {
            config = config.site(&[ED25519_SITE], &origin_url);
        }
        let edge = Edge::start_with(&self.deployment, &edit(config))?;
        Ok(Stack {
            edge,
            dns: self.dns,
            origin: self.origin,
            keyserver: self.keyserver,
            deployment: self.deployment,
        })
    }
}

impl Stack {
    /// New full TLS 1.3 handshakes with [`SITE`] on the edge from `workers` clients at
    /// `rate` each per second, each given up after 5 s.
    pub(crate) fn handshake_load(
        &self,
        workers: usize,
        rate: f64,
    ) -> Result<keyless_tests::HandshakeLoad> {
        keyless_tests::HandshakeLoad::start(
            self.edge.https_addr(),
            SITE,
            &self.edge.client_ca(),
            workers,
            rate,
            Duration::from_secs(5),
        )
    }

    /// `https://HOST:PORT/PATH` on the edge.
    pub(crate) fn url(&self, host: &str, path: &str) -> String {
        self.edge.url(host, path)
    }

    /// Another edge of the stack's deployment (same group, same key server) serving
    /// [`SITE`], after `edit` changed its config.
    pub(crate) fn another_edge(&self, edit: impl FnOnce(EdgeConfig) -> EdgeConfig) -> Result<Edge> {
        let origin = format!("http://{ORIGIN_HOST}:{}", self.origin.port());
        let config = EdgeConfig::new(&self.deployment)?
            .nameserver(self.dns.addr())
            .site(&[SITE], &origin);
        Edge::start_with(&self.deployment, &edit(config))
    }

    /// Private-key operations the key server has answered `ok` (signatures and RSA
    /// decryptions; not chain lookups, ticket keys or pings).
    pub(crate) fn key_ops(&self) -> Result<u64> {
        let text = self.keyserver.metrics_text()?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("keyless_ops_total{") && l.contains("result=\"ok\""))
            .filter(|l| l.contains("-sign") || l.contains("rsa-decrypt"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// Audit lines of the key server for `op` with `result=ok` and `sni`.
    pub(crate) fn audit_lines(&self, op: &str, sni: &str) -> Vec<String> {
        self.keyserver
            .log()
            .lines()
            .filter(|l| {
                l.contains("audit")
                    && has_field(l, "op", op)
                    && has_field(l, "result", "ok")
                    && has_field(l, "sni", sni)
            })
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the key server has audited `n` successful `op`s for `sni` (audit
    /// lines are written after the reply, so they may trail the client a little).
    pub(crate) fn wait_for_audits(&self, op: &str, sni: &str, n: usize) -> Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.audit_lines(op, sni);
            if lines.len() >= n {
                return Ok(lines);
            }
            if Instant::now() >= deadline {
                bail!(
                    "expected {n} audited {op} for {sni}, found {}; key server log:\n{}",
                    lines.len(),
                    self.keyserver.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// The key type of the served leaf as `openssl s_client` prints it in the chain
/// (`a:PKEY: id-ecPublicKey, 256 (bit); ...` → `id-ecPublicKey`).
pub(crate) fn leaf_key_type(out: &SClientOutput) -> Option<String> {
    out.stdout.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("a:PKEY:")?;
        Some(rest.split(',').next()?.trim().to_owned())
    })
}

/// Plain GETs of `path` on [`SITE`], each on a new connection, from a thread of their
/// own until the flag is set; the status of each.
pub(crate) fn request_loop(
    s: &Stack,
    path: &str,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<Vec<u16>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ca, addr, url) = (s.edge.client_ca(), s.edge.https_addr(), s.url(SITE, path));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut statuses = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            let status = Curl::new(&ca)
                .resolve(SITE, addr)
                .get(&url)
                .map_or(0, |out| out.status);
            statuses.push(status);
            std::thread::sleep(Duration::from_millis(20));
        }
        statuses
    });
    (stop, thread)
}

/// 40 GETs of `path` on [`SITE`] on one kept-alive connection, 10 a second (so that
/// they span what the test does meanwhile): curl with every URL at once; a line per
/// answer with its status and the connections it opened.
pub(crate) fn kept_alive_requests(
    s: &Stack,
    path: &str,
) -> std::thread::JoinHandle<Result<String>> {
    let addr = s.edge.https_addr();
    let mut cmd = Command::new("curl");
    cmd.args(["-q", "-sS", "--noproxy", "*", "--rate", "10/s"])
        .arg("--cacert")
        .arg(s.edge.client_ca())
        .arg("--resolve")
        .arg(format!("{SITE}:{}:{}", addr.port(), addr.ip()))
        .args(["-w", "%{http_code} %{num_connects}\\n"]);
    for _ in 0..40 {
        cmd.args(["-o", "/dev/null"]).arg(s.url(SITE, path));
    }
    std::thread::spawn(move || {
        let out = cmd.output().context("running curl")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

/// Fails unless every handshake of every phase completed (a refused connection is a
/// `ConnectFailed`).
pub(crate) fn no_failed_handshakes(outcomes: &[LoadOutcome]) -> Result<()> {
    let refused = outcomes
        .iter()
        .filter(|o| o.end == HandshakeEnd::ConnectFailed)
        .count();
    ensure!(refused == 0, "{refused} connection attempts refused");
    for (phase, attempted, failed) in per_phase(outcomes) {
        ensure!(
            attempted > 0 && failed == 0,
            "phase {phase}: {failed} of {attempted} handshakes failed"
        );
    }
    Ok(())
}
