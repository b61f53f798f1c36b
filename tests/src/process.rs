//! Child processes of the tests: long-running ones whose output goes to a log file and
//! which are killed on drop, and short-lived tools (curl, openssl) run with a deadline.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::server::strip_ansi;

/// How much of its log a dropped process prints.
const LOG_TAIL_LINES: usize = 60;

/// A running child whose stdout and stderr go to `log_path`; killed (SIGKILL) on drop.
#[derive(Debug)]
pub(crate) struct LoggedChild {
    /// What the process is, for messages (`keyless-edge`, `dnsmasq`, ...).
    what: String,
    child: Child,
    exit: Option<ExitStatus>,
    log_path: PathBuf,
    /// Print the end of the log on drop (libtest shows it only for failed tests).
    report_on_drop: bool,
}

impl LoggedChild {
    /// Spawns `cmd` with stdin closed and its output appended to `log_path`.
    pub(crate) fn spawn(what: &str, mut cmd: Command, log_path: &Path) -> Result<LoggedChild> {
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log =
            File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(LoggedChild {
            what: what.to_owned(),
            child,
            exit: None,
            log_path: log_path.to_owned(),
            report_on_drop: true,
        })
    }

    pub(crate) fn set_report_on_drop(&mut self, report: bool) {
        self.report_on_drop = report;
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything logged so far, without ANSI escapes.
    pub(crate) fn log(&self) -> String {
        let raw = std::fs::read(&self.log_path).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&raw))
    }

    /// Waits until a log line satisfies `pred`, returning it.
    pub(crate) fn wait_for_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| pred(l)) {
                return Ok(line.to_owned());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: no matching log line within {timeout:?}; log:\n{}",
                    self.what,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The exit status, if the process has exited.
    pub(crate) fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.what))?;
        }
        Ok(self.exit)
    }

    /// Fails with the log if the process has exited.
    pub(crate) fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.try_exit()? {
            bail!("{} exited with {status}; log:\n{}", self.what, self.log());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub(crate) fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit()? {
            return Ok(status);
        }
        // Ignored: the process may exit on its own between the check and the kill.
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .with_context(|| format!("reaping {}", self.what))?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Sends a signal by name (`TERM`, `HUP`, ...) with `kill(1)`: the workspace forbids
    /// `unsafe`, so no `libc::kill`.
    pub(crate) fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{name} {} failed: {status}", self.pid());
        }
        Ok(())
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.kill();
        if !self.report_on_drop {
            return;
        }
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines.len().saturating_sub(LOG_TAIL_LINES);
        eprintln!(
            "---- {} log {} (last {} of {} lines) ----\n{}\n----",
            self.what,
            self.log_path.display(),
            lines.len() - tail,
            lines.len(),
            lines.get(tail..).unwrap_or_default().join("\n")
        );
    }
}

/// Runs `cmd` to completion with stdin closed, killing it after `timeout`.
///
/// Output is collected by reader threads so a chatty process cannot block on a full
/// pipe while we wait for it.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Result<Output> {
    run_with_input(cmd, None, timeout)
}

/// [`run_with_timeout`] with `input` written to stdin (then closed), if given.
pub(crate) fn run_with_input(
    mut cmd: Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Output> {
    let stdin = match input {
        Some(_) => Stdio::piped(),
        None => Stdio::null(),
    };
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    if let (Some(input), Some(mut pipe)) = (input, child.stdin.take()) {
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = pipe.write_all(&input);
        });
    }
    let stdout = child.stdout.take().map(reader_thread);
    let stderr = child.stderr.take().map(reader_thread);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {cmd:?}"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let join = |t: Option<std::thread::JoinHandle<Vec<u8>>>| {
        t.map(|t| t.join().unwrap_or_default()).unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

fn reader_thread(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error ends the capture; what was read so far is still useful.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}
