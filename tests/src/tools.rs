//! The real clients of the edge tests: `curl` and `openssl s_client`, run as processes
//! with a deadline, their results parsed into what the tests assert on.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::TlsVersion;
use crate::process::run_with_timeout;

/// How long a client may run unless told otherwise.
const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// Separates the body from curl's `--write-out` on stdout.
const WRITE_OUT_MARK: &str = "\n--keyless-tests-write-out--";

/// The HTTP version curl is asked to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    /// `--http1.1`.
    Http11,
    /// `--http2` (over TLS this is ALPN `h2`, falling back to 1.1 if refused).
    Http2,
}

/// A curl invocation, built step by step; [`Curl::get`] runs it.
#[derive(Clone, Debug)]
pub struct Curl {
    ca: PathBuf,
    args: Vec<OsString>,
    timeout: Duration,
}

/// What curl reported.
#[derive(Clone, Debug)]
pub struct CurlOutput {
    /// curl's exit code (0 = transfer done, whatever the HTTP status).
    pub exit_code: Option<i32>,
    /// The HTTP status (0 if there was no response).
    pub status: u16,
    /// `%{http_version}`: `1.1`, `2`, ... (`0` if there was no response).
    pub http_version: String,
    /// The response body.
    pub body: Vec<u8>,
    /// curl's error messages (`-sS`) and any `-v` output.
    pub stderr: String,
    /// Wall time of the whole curl run.
    pub elapsed: Duration,
}

impl CurlOutput {
    /// The body as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Fails unless curl succeeded and the status is `status`.
    pub fn expect_status(&self, status: u16) -> Result<&CurlOutput> {
        if self.exit_code != Some(0) || self.status != status {
            bail!(
                "expected HTTP {status}, curl exited {:?} with status {}: {}\nbody: {}",
                self.exit_code,
                self.status,
                self.stderr.trim(),
                self.body_text()
            );
        }
        Ok(self)
    }
}

impl Curl {
    /// curl trusting only the CA in `ca` (PEM), ignoring `~/.curlrc` and proxies.
    pub fn new(ca: &Path) -> Curl {
        Curl {
            ca: ca.to_owned(),
            args: Vec::new(),
            timeout: DEFAULT_TOOL_TIMEOUT,
        }
    }

    /// Connects to `addr` for `host` on `addr`'s port (`--resolve host:port:ip`).
    pub fn resolve(self, host: &str, addr: SocketAddr) -> Curl {
        let ip = match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        self.arg("--resolve")
            .arg(format!("{host}:{}:{ip}", addr.port()))
    }

    /// Offers only this TLS version.
    pub fn tls(self, version: TlsVersion) -> Curl {
        match version {
            TlsVersion::Tls12 => self.arg("--tlsv1.2").arg("--tls-max").arg("1.2"),
            TlsVersion::Tls13 => self.arg("--tlsv1.3").arg("--tls-max").arg("1.3"),
        }
    }

    /// Asks for this HTTP version.
    pub fn http(self, version: HttpVersion) -> Curl {
        match version {
            HttpVersion::Http11 => self.arg("--http1.1"),
            HttpVersion::Http2 => self.arg("--http2"),
        }
    }

    /// Adds a request header (`Name: value`).
    pub fn header(self, header: &str) -> Curl {
        self.arg("-H").arg(header)
    }

    /// POSTs the contents of `path` as the request body (`--data-binary @PATH`).
    pub fn body_file(self, path: &Path) -> Curl {
        let mut arg = OsString::from("@");
        arg.push(path);
        self.arg("--data-binary").arg(arg)
    }

    /// Adds any curl argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Curl {
        self.args.push(arg.into());
        self
    }

    /// Bounds the whole transfer (`--max-time`; the process is killed a bit later).
    pub fn timeout(mut self, timeout: Duration) -> Curl {
        self.timeout = timeout;
        self
    }

    /// Runs `curl URL` (a GET unless a body or `-X` was given) and parses the outcome. Failing to connect or handshake is not
    /// an error here: it is in `exit_code` and `stderr`.
    pub fn get(&self, url: &str) -> Result<CurlOutput> {
        let mut cmd = Command::new("curl");
        // `-q` must come first: it skips ~/.curlrc.
        cmd.arg("-q")
            .arg("-sS")
            .arg("--noproxy")
            .arg("*")
            .arg("--cacert")
            .arg(&self.ca)
            .arg("--max-time")
            .arg(format!("{:.3}", self.timeout.as_secs_f64()))
            .arg("-w")
            .arg(format!("{WRITE_OUT_MARK}%{{http_code}} %{{http_version}}"))
            .args(&self.args)
            .arg(url);
        let started = Instant::now();
        let out = run_with_timeout(cmd, self.timeout + Duration::from_secs(5))
            .context("running curl (is it installed?)")?;
        let elapsed = started.elapsed();
        let stdout = out.stdout;
        let mark = WRITE_OUT_MARK.as_bytes();
        let at = stdout
            .windows(mark.len())
            .rposition(|w| w == mark)
            .with_context(|| {
                format!(
                    "curl printed no write-out; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let (body, tail) = stdout.split_at(at);
        let tail = String::from_utf8_lossy(tail.get(mark.len()..).unwrap_or_default());
        let mut fields = tail.split_whitespace();
        let status = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let http_version = fields.next().unwrap_or("0").to_owned();
        Ok(CurlOutput {
            exit_code: out.status.code(),
            status,
            http_version,
            body: body.to_vec(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        })
    }
}

/// An `openssl s_client` run with stdin closed: it handshakes, prints what it saw and
/// leaves.
#[derive(Clone, Debug)]
pub struct SClient {
    addr: SocketAddr,
    servername: Option<String>,
    verify: Option<(PathBuf, String)>,
    version: Option<TlsVersion>,
    sigalgs: Option<String>,
    args: Vec<OsString>,
    timeout: Duration,
    input: Option<Vec<u8>>,
}

/// What `openssl s_client` printed.
#[derive(Clone, Debug)]
pub struct SClientOutput {
    /// The exit code.
    pub exit_code: Option<i32>,
    /// stdout (certificate chain, session details).
    pub stdout: String,
    /// stderr (errors, alerts, verification results).
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl SClientOutput {
    /// stdout and stderr together.
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Whether the handshake completed (a cipher was negotiated) and s_client exited 0.
    pub fn handshake_ok(&self) -> bool {
        self.exit_code == Some(0)
            && self.stdout.contains("Cipher is ")
            && !self.stdout.contains("Cipher is (NONE)")
    }

    /// Whether the handshake completed with a chain that verified (`Verify return
    /// code: 0 (ok)`, which s_client also prints when it got no certificate at all).
    pub fn verified(&self) -> bool {
        self.handshake_ok()
            && self.stdout.contains("Verify return code: 0 (ok)")
            && !self.stdout.contains("no peer certificate available")
    }

    /// The value of a `Name: value` line (e.g. `Peer signature type`), trimmed.
    pub fn field(&self, name: &str) -> Option<String> {
        self.text().lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    }

    /// The negotiated protocol (`TLSv1.3`, `TLSv1.2`), from the `Protocol` line.
    pub fn protocol(&self) -> Option<String> {
        self.field("Protocol")
    }

    /// Fails with the whole output unless the handshake completed and verified.
    pub fn expect_verified(&self) -> Result<&SClientOutput> {
        if !self.verified() {
            bail!(
                "openssl s_client: handshake or verification failed (exit {:?}):\n{}",
                self.exit_code,
                self.text()
            );
        }
        Ok(self)
    }
}

impl SClient {
    /// `openssl s_client -connect ADDR`.
    pub fn new(addr: SocketAddr) -> SClient {
        SClient {
            addr,
            servername: None,
            verify: None,
            version: None,
            sigalgs: None,
            args: Vec::new(),
            timeout: DEFAULT_TOOL_TIMEOUT,
            input: None,
        }
    }

    /// Writes `text` once connected (e.g. an HTTP/1.0 request, so that the server
    /// answers and closes, and s_client reads what follows the handshake, such as TLS
    /// 1.3 session tickets).
    pub fn input(mut self, text: &str) -> SClient {
        self.input = Some(text.as_bytes().to_vec());
        self
    }

    /// Sends this SNI (`-servername`).
    pub fn servername(mut self, name: &str) -> SClient {
        self.servername = Some(name.to_owned());
        self
    }

    /// Verifies the chain against `ca` for `hostname` and fails the handshake if it does
    /// not verify (`-CAfile -verify_hostname -verify_return_error`).
    pub fn verify(mut self, ca: &Path, hostname: &str) -> SClient {
        self.verify = Some((ca.to_owned(), hostname.to_owned()));
        self
    }

    /// Offers only this TLS version (`-tls1_2` / `-tls1_3`).
    pub fn tls(mut self, version: TlsVersion) -> SClient {
        self.version = Some(version);
        self
    }

    /// Offers only these signature algorithms (`-sigalgs`, e.g. `RSA-PSS+SHA256`).
    pub fn sigalgs(mut self, sigalgs: &str) -> SClient {
        self.sigalgs = Some(sigalgs.to_owned());
        self
    }

    /// Adds any s_client argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> SClient {
        self.args.push(arg.into());
        self
    }

    /// Kills s_client after this long.
    pub fn timeout(mut self, timeout: Duration) -> SClient {
        self.timeout = timeout;
        self
    }

    /// Runs it. A failed handshake is not an error here: see the output.
    pub fn run(&self) -> Result<SClientOutput> {
        let mut cmd = Command::new("openssl");
        cmd.arg("s_client")
            .arg("-connect")
            .arg(self.addr.to_string());
        if let Some(name) = &self.servername {
            cmd.arg("-servername").arg(name);
        } else {
            cmd.arg("-noservername");
        }
        if let Some((ca, hostname)) = &self.verify {
            cmd.arg("-CAfile")
                .arg(ca)
                .arg("-verify_return_error")
                .arg("-verify_hostname")
                .arg(hostname);
        }
        match self.version {
            Some(TlsVersion::Tls12) => {
                cmd.arg("-tls1_2");
            }
            Some(TlsVersion::Tls13) => {
                cmd.arg("-tls1_3");
            }
            None => {}
        }
        if let Some(sigalgs) = &self.sigalgs {
            cmd.arg("-sigalgs").arg(sigalgs);
        }
        cmd.args(&self.args);
        let started = Instant::now();
        let out = crate::process::run_with_input(cmd, self.input.clone(), self.timeout)
            .context("running openssl s_client")?;
        Ok(SClientOutput {
            exit_code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        })
    }
}
