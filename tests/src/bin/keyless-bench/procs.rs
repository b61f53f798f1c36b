//! The processes the benchmarks start (key server, edge, test origin, reference server,
//! nginx): each with its stderr and stdout in a log file, stopped when dropped; and what
//! `/proc` tells about them (children, resident memory).

use std::ffi::OsStr;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keyless_tests::{
    binary, free_addr, http_get, strip_ansi, wait_for_port, Deployment, EdgeConfig, Profile,
};

/// How long a process may take to become ready after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process given a stop signal may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running child process.
pub(crate) struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
    /// Signal (`kill -NAME`) sent on drop before SIGKILL; none = SIGKILL at once.
    stop_signal: Option<&'static str>,
}

impl Proc {
    /// Spawns `bin args...` with `env` added, logging to `log_path`.
    pub(crate) fn spawn<I, S>(
        name: impl Into<String>,
        bin: &Path,
        args: I,
        env: &[(&str, &str)],
        log_path: PathBuf,
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let name = name.into();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Proc {
            name,
            child,
            log_path,
            stop_signal: None,
        })
    }

    /// Makes dropping send `kill -SIGNAL` and wait up to [`STOP_TIMEOUT`] before
    /// SIGKILL: for a process that must stop its own children (nginx's master stops its
    /// workers; killed outright, it would leave them serving).
    pub(crate) fn stop_with(mut self, signal: &'static str) -> Proc {
        self.stop_signal = Some(signal);
        self
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Kills the process (SIGKILL, a crash: its connections are reset) and reaps it.
    pub(crate) fn kill(&mut self) -> Result<()> {
        self.child
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        self.child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        Ok(())
    }

    /// Everything logged so far, without ANSI escapes.
    pub(crate) fn log(&self) -> String {
        let raw = std::fs::read(&self.log_path).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&raw))
    }

    /// The last `n` lines of the log.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(n);
        lines.get(from..).unwrap_or_default().join("\n")
    }

    /// Fails (with the log) if the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.name))?
        {
            bail!(
                "{} exited with {status}; log {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// Waits until `addr` accepts TCP connections.
    pub(crate) fn wait_port(&mut self, addr: SocketAddr) -> Result<()> {
        self.wait_until(&format!("listen on {addr}"), |_| {
            wait_for_port(addr, Duration::from_millis(100)).is_ok()
        })
    }

    /// Waits until `GET path` on `addr` answers 200.
    pub(crate) fn wait_http_ok(&mut self, addr: SocketAddr, path: &str) -> Result<()> {
        self.wait_until(&format!("answer 200 to GET {path} on {addr}"), |_| {
            matches!(http_get(addr, path), Ok((200, _)))
        })
    }

    fn wait_until(&mut self, what: &str, ready: impl Fn(&Proc) -> bool) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_running()?;
            if ready(self) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not {what} within {START_TIMEOUT:?}; log {}:\n{}",
                    self.name,
                    self.log_path.display(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails if the log shows a panic.
    pub(crate) fn check_no_panic(&self) -> Result<()> {
        if self.log().contains("panicked") {
            bail!(
                "{} panicked; log {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail(40)
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(signal) = self.stop_signal {
            let sent = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(self.pid().to_string())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let deadline = Instant::now() + STOP_TIMEOUT;
            while sent && Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids of the live children of `pid` (Linux `/proc`; none elsewhere).
pub(crate) fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the parenthesised command name: state, ppid, ...
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect();
    out.sort_unstable();
    out
}

/// Resident set size (`VmRSS`) of `pid` in bytes, if it is alive (Linux `/proc`).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// The state letter of `pid` (`R`, `S`, `Z`, ...) from `/proc/PID/stat`.
pub(crate) fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next()?.chars().next()
}

/// The first executable called `name` in `PATH`, then in the sbin directories (where
/// Debian puts nginx, and which a non-root `PATH` may lack).
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The keyless side of a benchmark, release builds: a `Deployment` for one domain,
/// its key servers, a test origin and an edge serving the domain from that origin.
pub(crate) struct EdgeStack {
    pub(crate) deployment: Deployment,
    /// One or more key servers of the deployment, in one `[[keyserver.group]]`.
    pub(crate) keyservers: Vec<StackKeyServer>,
    pub(crate) origin: Proc,
    pub(crate) origin_addr: SocketAddr,
    pub(crate) edge: Proc,
    pub(crate) edge_addr: SocketAddr,
    /// The edge's admin listener (`/healthz`, `/metrics`).
    pub(crate) edge_admin: SocketAddr,
}

/// A key server of an [`EdgeStack`].
pub(crate) struct StackKeyServer {
    pub(crate) proc: Proc,
    /// Its mTLS listener, as the edge's config names it.
    pub(crate) addr: SocketAddr,
    /// Its `/metrics` listener.
    pub(crate) metrics: SocketAddr,
}

/// Starts an [`EdgeStack`] for `domain` with `keyservers` key servers of the same
/// deployment (same keys and identity, their own ports), all of the same priority and
/// weight in one `[[keyserver.group]]` of the edge. The key servers and the edge log at
/// `log_filter`; `configure` adds to the edge's configuration (`[tls]`, `[cache]`,
/// `[keyserver]` keys).
pub(crate) fn start_edge_stack(
    domain: &str,
    log_filter: &str,
    keyservers: usize,
    configure: impl FnOnce(EdgeConfig) -> EdgeConfig,
) -> Result<EdgeStack> {
    let mut deployment = Deployment::init(&[domain])?;
    deployment.set_report_on_drop(false);
    let dir = deployment.dir().to_path_buf();
    let logs = deployment.logs_dir();
    let env = [("KEYLESS_LOG", log_filter)];

    let origin_bin = binary("keyless-origin", Profile::Release)?;
    let mut servers = Vec::with_capacity(keyservers);
    for n in 1..=keyservers.max(1) {
        // The first on the deployment's own config and ports, the others on a copy of
        // that config with fresh ports (as `KeyServer::start_another` does).
        let (config, addr, metrics, log) = if n == 1 {
            (
                deployment.config_path(),
                deployment.listen(),
                deployment.metrics(),
                "keyserver.log".to_owned(),
            )
        } else {
            let (addr, metrics) = (free_addr()?, free_addr()?);
            let config = deployment.write_config_variant(&format!("keyserver-{n}.toml"), |t| {
                t.insert("listen".into(), addr.to_string().into());
                t.insert("metrics_listen".into(), metrics.to_string().into());
            })?;
            (config, addr, metrics, format!("keyserver-{n}.log"))
        };
        let mut proc = Proc::spawn(
            format!("key server {n}"),
            &origin_bin,
            ["--config".as_ref(), config.as_os_str()],
            &env,
            logs.join(log),
        )?;
        proc.wait_port(addr)?;
        servers.push(StackKeyServer {
            proc,
            addr,
            metrics,
        });
    }

    let origin_addr = free_addr()?;
    let mut origin = Proc::spawn(
        "test origin",
        &binary("keyless-test-origin", Profile::Release)?,
        ["--listen".to_owned(), origin_addr.to_string()],
        &[],
        logs.join("test-origin.log"),
    )?;
    origin.wait_port(origin_addr)?;

    // Same priority and weight: the edge balances between them (weighted least-loaded).
    let group: Vec<(SocketAddr, u16, u16)> = servers.iter().map(|s| (s.addr, 10, 1)).collect();
    let config = configure(
        EdgeConfig::new(&deployment)?
            .group(BENCH_GROUP, &group)
            .site(
                &[domain, &format!("*.{domain}")],
                &format!("http://{origin_addr}"),
            ),
    );
    let edge_config = dir.join("bench-edge.toml");
    std::fs::write(&edge_config, config.to_toml())
        .with_context(|| format!("writing {}", edge_config.display()))?;
    let mut edge = Proc::spawn(
        "edge",
        &binary("keyless-edge", Profile::Release)?,
        ["--config".as_ref(), edge_config.as_os_str()],
        &env,
        logs.join("edge.log"),
    )?;
    edge.wait_http_ok(config.admin, "/healthz")?;
    edge.wait_port(config.https)?;
    Ok(EdgeStack {
        deployment,
        keyservers: servers,
        origin,
        origin_addr,
        edge,
        edge_addr: config.https,
        edge_admin: config.admin,
    })
}

/// The name of the edge's key-server group in an [`EdgeStack`].
pub(crate) const BENCH_GROUP: &str = "bench";
