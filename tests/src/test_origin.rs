//! A running `keyless-test-origin`: the content origin behind the edge in end-to-end
//! tests (`/`, `/echo`, `/slow?ms=N`, `/bytes?n=N`, `/status/N`, `/upload`, `/__count`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::bins::{binary, Profile};
use crate::net::{free_addr, http_get, wait_for_port};
use crate::process::LoggedChild;

/// How long the origin may take to listen after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A `keyless-test-origin` process on a loopback port; killed on drop.
#[derive(Debug)]
pub struct TestOrigin {
    process: LoggedChild,
    addr: SocketAddr,
    name: String,
}

impl TestOrigin {
    /// Starts an origin named `origin` on a free port, logging into `logs_dir`.
    pub fn start(logs_dir: &Path) -> Result<TestOrigin> {
        TestOrigin::start_on(logs_dir, free_addr()?, "origin")
    }

    /// Starts an origin answering `hello from NAME` on `addr`.
    pub fn start_on(logs_dir: &Path, addr: SocketAddr, name: &str) -> Result<TestOrigin> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let log_path = logs_dir.join(format!(
            "test-origin-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = Command::new(binary("keyless-test-origin", Profile::current())?);
        cmd.arg("--listen")
            .arg(addr.to_string())
            .args(["--name", name]);
        let mut process = LoggedChild::spawn("keyless-test-origin", cmd, &log_path)?;
        // It logs one line; the edge's log tells what happened to requests.
        process.set_report_on_drop(false);
        let deadline = Instant::now() + START_TIMEOUT;
        while wait_for_port(addr, Duration::from_millis(100)).is_err() {
            process.ensure_running()?;
            if Instant::now() >= deadline {
                bail!("keyless-test-origin did not listen on {addr} within {START_TIMEOUT:?}");
            }
        }
        Ok(TestOrigin {
            process,
            addr,
            name: name.to_owned(),
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The name in its greeting.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What `/` answers: `hello from NAME\n`.
    pub fn greeting(&self) -> String {
        format!("hello from {}\n", self.name)
    }

    /// How many requests the origin has answered (asked directly, not through the edge;
    /// the question itself counts).
    pub fn request_count(&self) -> Result<u64> {
        let (status, body) = http_get(self.addr, "/__count")?;
        if status != 200 {
            bail!("GET /__count answered {status}: {body}");
        }
        Ok(body.trim().parse()?)
    }

    /// Kills the origin (its port then refuses connections).
    pub fn stop(&mut self) -> Result<()> {
        self.process.kill()?;
        Ok(())
    }
}
