//! A real Redis for the edge's session store: `redis-server` on a loopback port, no
//! persistence, in a directory of the test's; optionally a node of a Redis Cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::net::{free_addr, wait_for_port};
use crate::process::{run_with_timeout, LoggedChild};
use crate::Signal;

const REDIS_SERVER: &str = "redis-server";
const REDIS_CLI: &str = "redis-cli";
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` process; killed on drop.
#[derive(Debug)]
pub struct Redis {
    process: LoggedChild,
    addr: SocketAddr,
    dir: PathBuf,
    cluster: bool,
}

impl Redis {
    /// Starts a stand-alone Redis on a free port, its files and log in `dir`.
    pub fn start(dir: &Path) -> Result<Redis> {
        Redis::start_on(dir, free_addr()?, false)
    }

    /// Starts a Redis that is a (not yet joined) node of a Redis Cluster.
    pub fn start_cluster_node(dir: &Path) -> Result<Redis> {
        Redis::start_on(dir, free_addr()?, true)
    }

    fn start_on(dir: &Path, addr: SocketAddr, cluster: bool) -> Result<Redis> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = dir.join(format!("redis-{}", addr.port()));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.arg("--bind")
            .arg(addr.ip().to_string())
            .arg("--port")
            .arg(addr.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir);
        if cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(dir.join("nodes.conf"));
        }
        let log = dir.join(format!(
            "redis-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut process = LoggedChild::spawn("redis-server", cmd, &log).with_context(|| {
            format!("{REDIS_SERVER} did not start: the session-store tests need Redis (apt-get install redis-server)")
        })?;
        let deadline = Instant::now() + START_TIMEOUT;
        while wait_for_port(addr, Duration::from_millis(100)).is_err() {
            process.ensure_running()?;
            if Instant::now() >= deadline {
                bail!("redis did not listen on {addr}; log:\n{}", process.log());
            }
        }
        Ok(Redis {
            process,
            addr,
            dir,
            cluster,
        })
    }

    /// Makes one Redis Cluster of `nodes` (all slots, no replicas) and waits until it
    /// serves.
    pub fn create_cluster(nodes: &[&Redis]) -> Result<()> {
        let mut cmd = Command::new(REDIS_CLI);
        cmd.arg("--cluster").arg("create");
        for n in nodes {
            if !n.cluster {
                bail!("{} is not a cluster node", n.addr);
            }
            cmd.arg(n.addr.to_string());
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = run_with_timeout(cmd, Duration::from_secs(30))?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in nodes {
            while !n.cli(&["cluster", "info"])?.contains("cluster_state:ok") {
                if Instant::now() >= deadline {
                    bail!("the redis cluster did not become ready");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs `redis-cli` against it (`-c`: following cluster redirects) and returns its
    /// output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(REDIS_CLI);
        cmd.arg("-h")
            .arg(self.addr.ip().to_string())
            .arg("-p")
            .arg(self.addr.port().to_string());
        if self.cluster {
            cmd.arg("-c");
        }
        cmd.args(args);
        let out = run_with_timeout(cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!(
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The raw value of `key` (`GET`), as redis-cli prints it to a pipe.
    pub fn get_raw(&self, key: &str) -> Result<Vec<u8>> {
        let mut cmd = Command::new(REDIS_CLI);
        cmd.arg("-h")
            .arg(self.addr.ip().to_string())
            .arg("-p")
            .arg(self.addr.port().to_string())
            .args(["--raw", "GET", key]);
        let mut out = run_with_timeout(cmd, Duration::from_secs(10))?.stdout;
        // redis-cli ends the value with a newline of its own.
        if out.last() == Some(&b'\n') {
            out.pop();
        }
        Ok(out)
    }

    /// The keys matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Result<Vec<String>> {
        Ok(self
            .cli(&["--scan", "--pattern", pattern])?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Sends `signal` to the server (`Stop` hangs it with its socket open).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.process.signal(signal.name())
    }

    /// Stops it (SIGKILL) and waits for it to exit.
    pub fn stop(mut self) -> Result<()> {
        self.process.kill().map(drop)
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
