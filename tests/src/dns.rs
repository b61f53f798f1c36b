//! A real DNS server for the edge's origin lookups: `dnsmasq` on a loopback port,
//! answering only the records a test gives it.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::net::{free_addr, wait_for_port};
use crate::process::LoggedChild;

/// Where Debian installs dnsmasq.
const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// How long dnsmasq may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `dnsmasq` process serving fixed A/AAAA records on 127.0.0.1 (UDP and TCP), with
/// no upstream servers, no `/etc/hosts` and no cache; killed on drop. Queries are logged.
#[derive(Debug)]
pub struct Dns {
    process: LoggedChild,
    addr: SocketAddr,
}

/// An SRV record: `owner` (`_service._proto.name`) → `target:port`.
#[derive(Clone, Copy, Debug)]
pub struct SrvRecord<'a> {
    /// The owner name, e.g. `_keyless._tcp.ks.test`.
    pub owner: &'a str,
    /// The target host (give it an A record too).
    pub target: &'a str,
    /// The port.
    pub port: u16,
    /// Lower is preferred.
    pub priority: u16,
    /// Share within a priority.
    pub weight: u16,
}

impl Dns {
    /// Starts dnsmasq answering `name → ip` for each record (exact names; more than one
    /// record per name is allowed), logging into `logs_dir`.
    pub fn start(logs_dir: &Path, records: &[(&str, IpAddr)]) -> Result<Dns> {
        Dns::start_with(logs_dir, None, records, &[], None)
    }

    /// Like [`Dns::start`], on `addr` if given (e.g. where a stopped one listened, to
    /// change the records a resolver sees), also serving `srv`, every answer with `ttl`
    /// seconds to live (dnsmasq's default for its own records is 0).
    pub fn start_with(
        logs_dir: &Path,
        addr: Option<SocketAddr>,
        records: &[(&str, IpAddr)],
        srv: &[SrvRecord<'_>],
        ttl: Option<u32>,
    ) -> Result<Dns> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        if !Path::new(DNSMASQ).is_file() {
            bail!("{DNSMASQ} not found: the edge tests need a real DNS server (apt-get install dnsmasq)");
        }
        let addr = match addr {
            Some(addr) => addr,
            None => free_addr()?,
        };
        let mut cmd = Command::new(DNSMASQ);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--cache-size=0",
            "--bind-interfaces",
            "--log-queries",
            "--log-facility=-",
            "--pid-file=",
            // Every name is local: unknown names get NXDOMAIN and a name without an
            // AAAA record gets an empty answer, not REFUSED for want of an upstream.
            "--local=/#/",
        ])
        .arg(format!("--listen-address={}", addr.ip()))
        .arg(format!("--port={}", addr.port()));
        // Run as root, dnsmasq drops to `nobody` unless told otherwise; as anyone else
        // it cannot change user and must not be asked to.
        if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            cmd.arg("--user=root");
        }
        for (name, ip) in records {
            cmd.arg(format!("--host-record={name},{ip}"));
        }
        for r in srv {
            cmd.arg(format!(
                "--srv-host={},{},{},{},{}",
                r.owner, r.target, r.port, r.priority, r.weight
            ));
        }
        if let Some(ttl) = ttl {
            cmd.arg(format!("--local-ttl={ttl}"));
        }
        let log_path = logs_dir.join(format!(
            "dnsmasq-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut process = LoggedChild::spawn("dnsmasq", cmd, &log_path)?;
        let deadline = Instant::now() + START_TIMEOUT;
        // dnsmasq binds UDP and TCP together: TCP accepting means it is serving.
        while wait_for_port(addr, Duration::from_millis(100)).is_err() {
            process.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "dnsmasq did not listen on {addr} within {START_TIMEOUT:?}; log:\n{}",
                    process.log()
                );
            }
        }
        Ok(Dns { process, addr })
    }

    /// Stops dnsmasq (SIGKILL) and waits for it to exit.
    pub fn stop(mut self) -> Result<()> {
        self.process.kill().map(drop)
    }

    /// The address to give resolvers (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The query log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Whether `name` has been asked for.
    pub fn was_queried(&self, name: &str) -> bool {
        self.log()
            .lines()
            .any(|l| l.contains("query[") && l.contains(&format!(" {name} from ")))
    }
}
