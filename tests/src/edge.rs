//! A running `keyless-edge` and the `edge.toml` it is given.
//!
//! [`EdgeConfig`] writes a config for a [`Deployment`] (its edge identity, the key
//! server's address, free listener ports); [`Edge::start`] takes any config text, so a
//! test can also hand it something odd. The config file lives in the deployment
//! directory, so the `edge/...` paths `keyless-certs init` made resolve from it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bins::{binary, Profile};
use crate::deployment::Deployment;
use crate::net::{free_addr, http_get};
use crate::process::LoggedChild;
use crate::server::Signal;
use crate::tools::{Curl, SClient};

/// How long an edge may take to answer `/healthz` after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the edge binary for the current profile.
pub fn edge_bin() -> Result<PathBuf> {
    binary("keyless-edge", Profile::current())
}

/// Runs `keyless-edge --config CONFIG --test` and returns its output.
pub fn check_edge_config(config: &Path) -> Result<Output> {
    let mut cmd = Command::new(edge_bin()?);
    cmd.arg("--config")
        .arg(config)
        .arg("--test")
        .env("NO_COLOR", "1")
        .env_remove("KEYLESS_LOG");
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// One `[[site]]`.
#[derive(Clone, Debug)]
pub struct SiteEntry {
    /// Names served (exact, or `*.name`).
    pub domains: Vec<String>,
    /// Origin URL.
    pub origin: String,
    /// `[site.cache]` keys (`ignore_query`, `key_headers`, ...); none when empty.
    pub cache: toml::Table,
    /// Other keys of the site (`keyserver_group`, `chain`).
    pub options: toml::Table,
}

/// An `edge.toml` for a deployment, built field by field.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// `[listen] https`.
    pub https: SocketAddr,
    /// `[listen] http` (none by default).
    pub http: Option<SocketAddr>,
    /// `[listen] admin`.
    pub admin: SocketAddr,
    /// `[keyserver] servers`.
    pub keyservers: Vec<String>,
    /// Other `[keyserver]` keys (`server_name`, `timeout`, ...).
    pub keyserver: toml::Table,
    /// `[[keyserver.group]]` sections; when there are any, they replace `keyservers`.
    pub groups: Vec<toml::Table>,
    /// `[dns] nameservers` (none: the system resolver).
    pub nameservers: Vec<SocketAddr>,
    /// `[tls]` keys.
    pub tls: toml::Table,
    /// `[proxy]` keys.
    pub proxy: toml::Table,
    /// `[cache]` keys.
    pub cache: toml::Table,
    /// `[sessions]` keys.
    pub sessions: toml::Table,
    /// `[tracing]` keys.
    pub tracing: toml::Table,
    /// `[[site]]` entries.
    pub sites: Vec<SiteEntry>,
    /// `[listen] admin_token` (none by default).
    pub admin_token: Option<String>,
    /// `[listen] upgrade_socket` (none by default).
    pub upgrade_socket: Option<PathBuf>,
}

impl EdgeConfig {
    /// Free HTTPS and admin ports, the deployment's key server (by IP, verified as
    /// `localhost`), the deployment's edge identity, no sites yet.
    pub fn new(deployment: &Deployment) -> Result<EdgeConfig> {
        let mut keyserver = toml::Table::new();
        keyserver.insert("server_name".into(), "localhost".into());
        Ok(EdgeConfig {
            https: free_addr()?,
            http: None,
            admin: free_addr()?,
            keyservers: vec![deployment.listen().to_string()],
            keyserver,
            groups: Vec::new(),
            nameservers: Vec::new(),
            tls: toml::Table::new(),
            proxy: toml::Table::new(),
            cache: toml::Table::new(),
            sessions: toml::Table::new(),
            tracing: toml::Table::new(),
            sites: Vec::new(),
            admin_token: None,
            upgrade_socket: None,
        })
    }

    /// Sets a `[tracing]` key.
    pub fn tracing_option(mut self, key: &str, value: impl Into<toml::Value>) -> EdgeConfig {
        self.tracing.insert(key.into(), value.into());
        self
    }

    /// Sets `[listen] upgrade_socket` (where a new `keyless-edge --upgrade` takes over).
    pub fn upgrade_socket(mut self, path: &Path) -> EdgeConfig {
        self.upgrade_socket = Some(path.to_owned());
        self
    }

    /// Sets `[listen] admin_token` (the bearer token of `POST /reload`).
    pub fn admin_token(mut self, token: &str) -> EdgeConfig {
        self.admin_token = Some(token.to_owned());
        self
    }

    /// Uses this key server (`host:port`) instead of the deployment's.
    pub fn keyserver_addr(mut self, addr: impl ToString) -> EdgeConfig {
        self.keyservers = vec![addr.to_string()];
        self
    }

    /// Adds a `[[keyserver.group]]` named `name` with the deployment's edge identity and
    /// these `(addr, priority, weight)` servers, verified as `localhost`.
    pub fn group(mut self, name: &str, servers: &[(SocketAddr, u16, u16)]) -> EdgeConfig {
        let mut t = toml::Table::new();
        t.insert("name".into(), name.into());
        let list = servers
            .iter()
            .map(|(addr, priority, weight)| {
                let mut s = toml::Table::new();
                s.insert("addr".into(), addr.to_string().into());
                s.insert("priority".into(), i64::from(*priority).into());
                s.insert("weight".into(), i64::from(*weight).into());
                toml::Value::Table(s)
            })
            .collect();
        t.insert("servers".into(), toml::Value::Array(list));
        self.groups.push(t);
        self
    }

    /// Adds a `[[keyserver.group]]` named `name` whose servers are the SRV records of
    /// `_keyless._tcp.<srv>` (resolved through the config's name servers).
    pub fn srv_group(mut self, name: &str, srv: &str) -> EdgeConfig {
        let mut t = toml::Table::new();
        t.insert("name".into(), name.into());
        t.insert("srv".into(), srv.into());
        self.groups.push(t);
        self
    }

    /// Sets a key of the last `[[keyserver.group]]` added (`protocol = "reference"`).
    ///
    /// # Panics
    ///
    /// If no group was added yet.
    pub fn group_option(mut self, key: &str, value: impl Into<toml::Value>) -> EdgeConfig {
        let group = self
            .groups
            .last_mut()
            .expect("group_option needs a group added before it");
        group.insert(key.into(), value.into());
        self
    }

    /// Sets a key of the last `[[site]]` added (`keyserver_group`, `chain`).
    ///
    /// # Panics
    ///
    /// If no site was added yet.
    pub fn site_option(mut self, key: &str, value: impl Into<toml::Value>) -> EdgeConfig {
        let site = self
            .sites
            .last_mut()
            .expect("site_option needs a site added before it");
        site.options.insert(key.into(), value.into());
        self
    }

    /// Sets a `[keyserver]` key (`timeout = "1s"`, ...).
    pub fn keyserver_option(mut self, key: &str, value: impl Into<toml::Value>) -> EdgeConfig {
        self.keyserver.insert(key.into(), value.into());
        self
    }

    /// Resolves origins with this name server.
    pub fn nameserver(mut self, addr: SocketAddr) -> EdgeConfig {
        self.nameservers.push(addr);
        self
    }

    /// Adds a plain HTTP listener on `addr` (e.g. a [`free_addr`]).
    pub fn http_listener(mut self, addr: SocketAddr) -> EdgeConfig {
        self.http = Some(addr);
        self
    }

    /// Sets a `[tls]` key.
    pub fn tls_option(mut self, key: &str, value: impl Into<toml::Value>) -> EdgeConfig {
        self.tls.insert(key.into(), value.into());
        self
    }

    /// Sets a `[proxy]` key.
    pub fn proxy_option(mut self, key: &str, value: impl Into<toml::Value>) -> EdgeConfig {
        self.proxy.insert(key.into(), value.into());
        self
    }

    /// Sets a `[cache]` key (`memory_bytes = 4096`, `purge_token = "..."`, ...).
    pub fn cache_option(mut self, key: &str, value: impl Into<toml::Value>) -> EdgeConfig {
        self.cache.insert(key.into(), value.into());
        self
    }

    /// Sets a `[sessions]` key (`redis = [...]`, `tickets = false`, ...).
    pub fn session_option(mut self, key: &str, value: impl Into<toml::Value>) -> EdgeConfig {
        self.sessions.insert(key.into(), value.into());
        self
    }

    /// Sets a `[site.cache]` key of the last site added.
    ///
    /// # Panics
    ///
    /// If no site was added yet.
    pub fn site_cache_option(mut self, key: &str, value: impl Into<toml::Value>) -> EdgeConfig {
        let site = self
            .sites
            .last_mut()
            .expect("site_cache_option needs a site added before it");
        site.cache.insert(key.into(), value.into());
        self
    }

    /// Adds a site serving `domains` from `origin`.
    pub fn site(mut self, domains: &[&str], origin: &str) -> EdgeConfig {
        self.sites.push(SiteEntry {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            origin: origin.to_owned(),
            cache: toml::Table::new(),
            options: toml::Table::new(),
        });
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut root = toml::Table::new();
        let mut listen = toml::Table::new();
        listen.insert("https".into(), self.https.to_string().into());
        if let Some(http) = self.http {
            listen.insert("http".into(), http.to_string().into());
        }
        listen.insert("admin".into(), self.admin.to_string().into());
        if let Some(token) = &self.admin_token {
            listen.insert("admin_token".into(), token.as_str().into());
        }
        if let Some(path) = &self.upgrade_socket {
            listen.insert("upgrade_socket".into(), path.display().to_string().into());
        }
        root.insert("listen".into(), listen.into());

        root.insert("keyserver".into(), self.keyserver_table().into());

        if !self.nameservers.is_empty() {
            let mut dns = toml::Table::new();
            dns.insert(
                "nameservers".into(),
                toml::Value::Array(
                    self.nameservers
                        .iter()
                        .map(|a| a.to_string().into())
                        .collect(),
                ),
            );
            root.insert("dns".into(), dns.into());
        }
        if !self.tls.is_empty() {
            root.insert("tls".into(), self.tls.clone().into());
        }
        if !self.proxy.is_empty() {
            root.insert("proxy".into(), self.proxy.clone().into());
        }
        if !self.cache.is_empty() {
            root.insert("cache".into(), self.cache.clone().into());
        }
        if !self.sessions.is_empty() {
            root.insert("sessions".into(), self.sessions.clone().into());
        }
        if !self.tracing.is_empty() {
            root.insert("tracing".into(), self.tracing.clone().into());
        }
        let sites = self
            .sites
            .iter()
            .map(|s| {
                let mut t = toml::Table::new();
                t.insert(
                    "domains".into(),
                    toml::Value::Array(s.domains.iter().map(|d| d.as_str().into()).collect()),
                );
                t.insert("origin".into(), s.origin.as_str().into());
                t.extend(s.options.clone());
                if !s.cache.is_empty() {
                    t.insert("cache".into(), s.cache.clone().into());
                }
                toml::Value::Table(t)
            })
            .collect();
        root.insert("site".into(), toml::Value::Array(sites));
        root.to_string()
    }

    /// `[keyserver]`: the single-group form, or the groups with the deployment's edge
    /// identity (and `server_name`, unless a group sets its own).
    fn keyserver_table(&self) -> toml::Table {
        let identity = [
            ("ca", "edge/keyserver-ca.crt"),
            ("cert", "edge/edge.crt"),
            ("key", "edge/edge.key"),
        ];
        let mut keyserver = self.keyserver.clone();
        if self.groups.is_empty() {
            keyserver.insert(
                "servers".into(),
                toml::Value::Array(self.keyservers.iter().map(|s| s.as_str().into()).collect()),
            );
            for (k, v) in identity {
                keyserver.insert(k.into(), v.into());
            }
            return keyserver;
        }
        let server_name = keyserver.remove("server_name");
        let groups = self
            .groups
            .iter()
            .map(|g| {
                let mut g = g.clone();
                for (k, v) in identity {
                    g.entry(k).or_insert_with(|| v.into());
                }
                if let Some(name) = &server_name {
                    g.entry("server_name").or_insert_with(|| name.clone());
                }
                toml::Value::Table(g)
            })
            .collect();
        keyserver.insert("group".into(), toml::Value::Array(groups));
        keyserver
    }
}

/// A `keyless-edge` process; killed (SIGKILL) on drop, printing the end of its log.
#[derive(Debug)]
pub struct Edge {
    process: LoggedChild,
    dir: PathBuf,
    config_path: PathBuf,
    https: SocketAddr,
    http: Option<SocketAddr>,
    admin: SocketAddr,
}

impl Edge {
    /// Runs `keyless-edge reload --config` on this edge's configuration file.
    pub fn reload_command(&self) -> Result<Output> {
        let mut cmd = Command::new(edge_bin()?);
        cmd.arg("reload").arg("--config").arg(&self.config_path);
        cmd.output().with_context(|| format!("running {cmd:?}"))
    }

    /// Starts an edge with `config` (built by [`EdgeConfig`]).
    pub fn start_with(deployment: &Deployment, config: &EdgeConfig) -> Result<Edge> {
        Edge::start(deployment, &config.to_toml())
    }

    /// Writes `config_text` as `DIR/edge-N.toml`, starts `keyless-edge` on it with its
    /// log in `DIR/logs/edge-N.log`, and waits until the admin `/healthz` answers 200.
    /// The listener addresses are read from the text's `[listen]`.
    pub fn start(deployment: &Deployment, config_text: &str) -> Result<Edge> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let table: toml::Table = config_text.parse().context("parsing the edge config")?;
        let listen = |key: &str| -> Result<Option<SocketAddr>> {
            table
                .get("listen")
                .and_then(|l| l.get(key))
                .and_then(|v| v.as_str())
                .map(|s| s.parse().with_context(|| format!("[listen] {key} = {s:?}")))
                .transpose()
        };
        let https = listen("https")?.context("the edge config has no [listen] https")?;
        let admin = listen("admin")?.context("the edge config has no [listen] admin")?;
        let http = listen("http")?;

        let dir = deployment.dir().to_owned();
        let config_path = dir.join(format!("edge-{n}.toml"));
        std::fs::write(&config_path, config_text)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_path = deployment.logs_dir().join(format!("edge-{n}.log"));
        let process = spawn_edge(&config_path, &log_path, &[])?;
        let mut edge = Edge {
            process,
            dir,
            config_path,
            https,
            http,
            admin,
        };
        edge.wait_ready()?;
        Ok(edge)
    }

    /// Starts a new edge of this configuration with `--upgrade`: it takes this one's
    /// listening sockets (`[listen] upgrade_socket`) and serves; this one then drains
    /// and exits. Returns once the new one says it serves.
    pub fn upgrade(&self) -> Result<Edge> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let log_path = self.dir.join("logs").join(format!(
            "edge-upgrade-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let process = spawn_edge(&self.config_path, &log_path, &["--upgrade"])?;
        let next = Edge {
            process,
            dir: self.dir.clone(),
            config_path: self.config_path.clone(),
            https: self.https,
            http: self.http,
            admin: self.admin,
        };
        next.wait_for_log(START_TIMEOUT, |l| l.contains("upgrade: serving"))?;
        Ok(next)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.process.ensure_running()?;
            if matches!(self.healthz(), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "keyless-edge did not answer /healthz on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.admin,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The HTTPS listener.
    pub fn https_addr(&self) -> SocketAddr {
        self.https
    }

    /// The HTTPS port.
    pub fn https_port(&self) -> u16 {
        self.https.port()
    }

    /// The plain HTTP listener, if configured.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// The admin listener (`/healthz`, `/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The config file the edge runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The deployment directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The site CA (`DIR/client/ca.pem`) clients verify the edge's chains with.
    pub fn client_ca(&self) -> PathBuf {
        self.dir.join("client/ca.pem")
    }

    /// `https://HOST:PORT/PATH` on this edge.
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https.port())
    }

    /// A curl that reaches `host` at this edge and trusts the site CA.
    pub fn curl(&self, host: &str) -> Curl {
        Curl::new(&self.client_ca()).resolve(host, self.https)
    }

    /// An `openssl s_client` to this edge sending SNI `name` and verifying the chain
    /// for `name` against the site CA.
    pub fn s_client(&self, name: &str) -> SClient {
        SClient::new(self.https)
            .servername(name)
            .verify(&self.client_ca(), name)
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until a log line satisfies `pred`, returning it.
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        self.process.wait_for_log(timeout, pred)
    }

    /// Fails if the log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "keyless-edge panicked; log:\n{log}"
        );
    }

    /// `GET /healthz` on the admin port: (status, body).
    pub fn healthz(&self) -> Result<(u16, String)> {
        http_get(self.admin, "/healthz")
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics_text(&self) -> Result<String> {
        let (status, body) = http_get(self.admin, "/metrics")?;
        if status != 200 {
            bail!("GET /metrics answered {status}: {body}");
        }
        Ok(body)
    }

    /// A request to the admin listener (HTTP/1.0, `extra_headers` as `Name: value`
    /// lines): (status, body).
    pub fn admin_request(
        &self,
        method: &str,
        target: &str,
        extra_headers: &[&str],
    ) -> Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&self.admin, Duration::from_secs(5))
            .with_context(|| format!("connecting to the admin listener {}", self.admin))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut req = format!(
            "{method} {target} HTTP/1.0\r\nHost: {}\r\nContent-Length: 0\r\n",
            self.admin
        );
        for h in extra_headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes())?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .with_context(|| format!("reading the admin answer to {method} {target}"))?;
        crate::net::parse_reply(&raw)
    }

    /// `POST /cache/purge?QUERY` on the admin listener with `Authorization: Bearer
    /// TOKEN` when a token is given: (status, body).
    pub fn purge(&self, query: &str, token: Option<&str>) -> Result<(u16, String)> {
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
        self.admin_request("POST", &format!("/cache/purge?{query}"), &headers)
    }

    /// Kills the process (SIGKILL) and waits for it, freeing its ports.
    pub fn kill(&mut self) -> Result<()> {
        self.process.kill()?;
        Ok(())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.process.try_exit(), Ok(None))
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.process.signal(signal.name())
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.process.wait_exit(timeout)
    }
}

/// Spawns `keyless-edge --config CONFIG ARGS`, logging to `log_path`.
fn spawn_edge(config: &Path, log_path: &Path, args: &[&str]) -> Result<LoggedChild> {
    let mut cmd = Command::new(edge_bin()?);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("KEYLESS_LOG");
    if let Some(filter) = std::env::var_os("KEYLESS_EDGE_LOG") {
        cmd.env("KEYLESS_LOG", filter);
    }
    LoggedChild::spawn("keyless-edge", cmd, log_path)
}

/// The sum of a Prometheus counter's samples whose labels include all of `labels`
/// (`name{a="x",b="y"} 3` lines; `_total` included in `name`). Zero if none match.
pub fn metric_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            if !all {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}
