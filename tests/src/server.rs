//! A running `keyless-origin` process.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bins;
use crate::deployment::Deployment;
use crate::net::{http_get, wait_for_port};

/// How long a key server may take to accept connections after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of the log a dropped key server prints.
const LOG_TAIL_LINES: usize = 60;

/// A Unix signal the tests send to the key server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Reload the keys directory.
    Hup,
    /// Graceful shutdown.
    Term,
    /// Fast shutdown.
    Int,
    /// A crash: the process ends at once, its connections reset.
    Kill,
    /// A hang: the process stops running, its sockets stay open.
    Stop,
    /// Resume after [`Signal::Stop`].
    Cont,
    /// Start the binary again with `--upgrade` (a zero-downtime upgrade).
    Usr2,
}

impl Signal {
    /// The name `kill -NAME` takes.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Hup => "HUP",
            Signal::Term => "TERM",
            Signal::Int => "INT",
            Signal::Kill => "KILL",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
            Signal::Usr2 => "USR2",
        }
    }
}

/// A key server process with its stderr captured to a log file.
///
/// Dropping it kills the process (SIGKILL) and prints the end of its log to stderr,
/// which the test harness shows only for failed tests.
#[derive(Debug)]
pub struct KeyServer {
    child: Child,
    exit: Option<ExitStatus>,
    listen: SocketAddr,
    metrics: SocketAddr,
    config: PathBuf,
    log_path: PathBuf,
    report_on_drop: bool,
    /// Environment variables set for the process (kept for restarts).
    env: Vec<(String, std::ffi::OsString)>,
}

impl KeyServer {
    /// Starts the key server with the deployment's `origin.toml`.
    pub fn start(deployment: &Deployment) -> Result<KeyServer> {
        KeyServer::start_with_config(deployment, &deployment.config_path())
    }

    /// Starts the key server with another config that keeps the deployment's ports.
    pub fn start_with_config(deployment: &Deployment, config: &Path) -> Result<KeyServer> {
        KeyServer::spawn(
            config,
            deployment.listen(),
            deployment.metrics(),
            &deployment.logs_dir(),
        )
    }

    /// Starts one more key server of the deployment (same keys, identity and CA) on
    /// fresh ports, its config written as `DIR/<name>.toml`.
    pub fn start_another(deployment: &Deployment, name: &str) -> Result<KeyServer> {
        let listen = crate::net::free_addr()?;
        let metrics = crate::net::free_addr()?;
        let config = deployment.write_config_variant(&format!("{name}.toml"), |t| {
            t.insert("listen".into(), listen.to_string().into());
            t.insert("metrics_listen".into(), metrics.to_string().into());
        })?;
        KeyServer::spawn(&config, listen, metrics, &deployment.logs_dir())
    }

    /// Starts the key server with another config of the deployment's ports, with
    /// `env` set for its process (e.g. `SOFTHSM2_CONF`).
    pub fn start_with_env(
        deployment: &Deployment,
        config: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<KeyServer> {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_os_string()))
            .collect();
        KeyServer::launch(
            &bins::origin_bin()?,
            config,
            (deployment.listen(), deployment.metrics()),
            &deployment.logs_dir(),
            env,
        )
    }

    /// Starts the same configuration again on the same ports (after this one exited).
    pub fn restart(&self) -> Result<KeyServer> {
        let logs = self
            .log_path
            .parent()
            .context("the key server log has no directory")?;
        KeyServer::launch(
            &bins::origin_bin()?,
            &self.config,
            (self.listen, self.metrics),
            logs,
            self.env.clone(),
        )
    }

    /// Starts a new key server of this configuration with `--upgrade`: it takes this
    /// one's listening sockets (the configuration's `upgrade_socket`) and serves; this
    /// one then drains and exits. Returns once the new one says it serves.
    pub fn upgrade(&self) -> Result<KeyServer> {
        let logs = self
            .log_path
            .parent()
            .context("the key server log has no directory")?;
        let mut next = KeyServer::launch_args(
            &bins::origin_bin()?,
            &self.config,
            (self.listen, self.metrics),
            logs,
            self.env.clone(),
            &["--upgrade"],
        )?;
        next.wait_for_log(START_TIMEOUT, |l| l.contains("upgrade: serving"))?;
        next.report_on_drop = true;
        Ok(next)
    }

    /// Operations answered `ok`, over every opcode but ping (from `/metrics`).
    pub fn ops_ok(&self) -> Result<u64> {
        keyserver_ops_ok(self.metrics)
    }

    /// Spawns `keyless-origin --config CONFIG`, logging to a new file in `logs_dir`, and
    /// waits until `listen` accepts connections.
    pub fn spawn(
        config: &Path,
        listen: SocketAddr,
        metrics: SocketAddr,
        logs_dir: &Path,
    ) -> Result<KeyServer> {
        KeyServer::spawn_with(&bins::origin_bin()?, config, listen, metrics, logs_dir)
    }

    /// Like [`KeyServer::spawn`] with a given `keyless-origin` binary (e.g. the release
    /// build for benchmarks).
    pub fn spawn_with(
        bin: &Path,
        config: &Path,
        listen: SocketAddr,
        metrics: SocketAddr,
        logs_dir: &Path,
    ) -> Result<KeyServer> {
        KeyServer::launch(bin, config, (listen, metrics), logs_dir, Vec::new())
    }

    fn launch(
        bin: &Path,
        config: &Path,
        addrs: (SocketAddr, SocketAddr),
        logs_dir: &Path,
        env: Vec<(String, std::ffi::OsString)>,
    ) -> Result<KeyServer> {
        KeyServer::launch_args(bin, config, addrs, logs_dir, env, &[])
    }

    fn launch_args(
        bin: &Path,
        config: &Path,
        (listen, metrics): (SocketAddr, SocketAddr),
        logs_dir: &Path,
        env: Vec<(String, std::ffi::OsString)>,
        args: &[&str],
    ) -> Result<KeyServer> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        std::fs::create_dir_all(logs_dir)
            .with_context(|| format!("creating {}", logs_dir.display()))?;
        let log_path = logs_dir.join(format!(
            "origin-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        if let Some(filter) = std::env::var_os("KEYLESS_ORIGIN_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let mut server = KeyServer {
            child,
            exit: None,
            listen,
            metrics,
            config: config.to_owned(),
            log_path,
            report_on_drop: true,
            env,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.try_exit()? {
                bail!(
                    "keyless-origin exited with {status} before listening on {}; log:\n{}",
                    self.listen,
                    self.log()
                );
            }
            if wait_for_port(self.listen, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "keyless-origin did not listen on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.listen,
                    self.log()
                );
            }
        }
    }

    /// Whether dropping prints the end of the log (default on; programs outside the
    /// test harness, whose stderr is not captured, turn it off).
    pub fn set_report_on_drop(&mut self, report: bool) {
        self.report_on_drop = report;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The mTLS address.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// Path of the captured stderr/stdout.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything logged so far, without ANSI escapes.
    pub fn log(&self) -> String {
        let raw = std::fs::read(&self.log_path).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&raw))
    }

    /// Waits until a log line satisfies `pred`, returning it.
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| pred(l)) {
                return Ok(line.to_owned());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no matching log line within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Fails if the log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "keyless-origin panicked; log:\n{log}"
        );
    }

    /// Sends `signal` with `kill(1)` (the workspace forbids `unsafe`, so no `libc::kill`).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{}", signal.name()))
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{} {} failed: {status}", signal.name(), self.pid());
        }
        Ok(())
    }

    fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .context("waiting for keyless-origin")?;
        }
        Ok(self.exit)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_exit(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("keyless-origin still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics_text(&self) -> Result<String> {
        let (status, body) = http_get(self.metrics, "/metrics")?;
        if status != 200 {
            bail!("GET /metrics answered {status}: {body}");
        }
        Ok(body)
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !self.report_on_drop {
            return;
        }
        // libtest captures this and shows it only for a failed test, which is when the
        // key server's side of the story is wanted (tests returning `Err` have dropped
        // their servers before the harness learns of the failure).
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines.len().saturating_sub(LOG_TAIL_LINES);
        eprintln!(
            "---- keyless-origin log {} (last {} of {} lines) ----\n{}\n----",
            self.log_path.display(),
            lines.len() - tail,
            lines.len(),
            lines.get(tail..).unwrap_or_default().join("\n")
        );
    }
}

/// Operations a key server with `/metrics` on `metrics` has answered `ok`, over every
/// opcode but ping (for key servers the caller started itself, e.g. benchmarks).
pub fn keyserver_ops_ok(metrics: SocketAddr) -> Result<u64> {
    let (status, text) = http_get(metrics, "/metrics")?;
    if status != 200 {
        bail!("GET /metrics on {metrics} answered {status}: {text}");
    }
    let total = text
        .lines()
        .filter(|l| l.starts_with("keyless_ops_total{"))
        .filter(|l| l.contains("result=\"ok\"") && !l.contains("opcode=\"ping\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>();
    Ok(total as u64)
}

/// Runs `keyless-origin --config CONFIG --test` and returns its output.
pub fn check_config(config: &Path) -> Result<Output> {
    let bin = bins::origin_bin()?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .arg("--test")
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

/// [`check_config`]: whether it succeeded and what it printed (stdout then stderr).
pub fn check_config_text(config: &Path) -> Result<(bool, String)> {
    let out = check_config(config)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Removes ANSI escape sequences (colours), in case the logger emits them anyway.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in 0x40..=0x7e.
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether an audit-style log line has `key=value` (or `key="value"`).
pub fn has_field(line: &str, key: &str, value: &str) -> bool {
    line.split_whitespace().any(|word| {
        word.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
            .is_some_and(|v| v.trim_matches('"').trim_end_matches(',') == value)
    })
}
