//! The reference of `cache`: nginx with `proxy_cache`, and installing nginx and wrk
//! with apt-get when they are missing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use keyless_tests::Deployment;

use super::DOMAIN;
use crate::procs::find_program;

/// What `apt-get install` is given when nginx or wrk is missing.
const APT_PACKAGES: [&str; 2] = ["nginx", "wrk"];
/// First nginx release with the `http2` directive (older ones: `listen ... http2`).
const NGINX_HTTP2_DIRECTIVE: (u32, u32, u32) = (1, 25, 1);
/// nginx and wrk, found or installed.
pub(super) struct Tools {
    pub(super) nginx: PathBuf,
    pub(super) wrk: PathBuf,
    pub(super) nginx_version: (u32, u32, u32),
    /// `nginx -V`: version, TLS library and configure arguments.
    pub(super) nginx_build: String,
    pub(super) wrk_version: String,
}

/// Finds nginx and wrk, installing them with apt-get when one is missing.
pub(super) fn ensure_tools() -> Result<Tools> {
    let missing = || {
        ["nginx", "wrk"]
            .into_iter()
            .filter(|t| find_program(t).is_none())
            .collect::<Vec<_>>()
    };
    let absent = missing();
    if !absent.is_empty() {
        eprintln!(
            "{} not found: installing with `apt-get install -y {}`",
            absent.join(" and "),
            APT_PACKAGES.join(" ")
        );
        if apt_get(&["install", "-y", "--no-install-recommends"]).is_err() {
            eprintln!("apt-get install failed; running `apt-get update` and trying again");
            apt_get(&["update"])
                .and_then(|()| apt_get(&["install", "-y", "--no-install-recommends"]))
                .with_context(|| {
                    format!(
                        "could not install {} with apt-get (needs root and the Debian \
                         archive); install nginx and wrk and rerun",
                        APT_PACKAGES.join(" ")
                    )
                })?;
        }
        let still = missing();
        ensure!(
            still.is_empty(),
            "{} still not found after apt-get install",
            still.join(" and ")
        );
    }
    let nginx = find_program("nginx").context("nginx not found")?;
    let wrk = find_program("wrk").context("wrk not found")?;

    let out = Command::new(&nginx)
        .arg("-V")
        .output()
        .with_context(|| format!("running {} -V", nginx.display()))?;
    // nginx prints its version and build to stderr.
    let nginx_build = String::from_utf8_lossy(&out.stderr).into_owned();
    let nginx_version = nginx_build
        .lines()
        .find_map(|l| l.strip_prefix("nginx version: nginx/"))
        .and_then(|v| {
            let mut parts = v.split_whitespace().next()?.split('.');
            let mut next = || parts.next()?.parse::<u32>().ok();
            Some((next()?, next()?, next().unwrap_or(0)))
        })
        .with_context(|| format!("no version in `nginx -V`: {nginx_build}"))?;
    ensure!(
        !nginx_build.contains("--without-http_proxy_module"),
        "{} was built without the proxy module",
        nginx.display()
    );
    // `wrk -v` prints its version and exits non-zero.
    let out = Command::new(&wrk)
        .arg("-v")
        .output()
        .with_context(|| format!("running {} -v", wrk.display()))?;
    let wrk_version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.split('[').next())
        .unwrap_or("wrk")
        .trim()
        .to_owned();
    Ok(Tools {
        nginx,
        wrk,
        nginx_version,
        nginx_build,
        wrk_version,
    })
}

/// Runs `apt-get ARGS [packages]` (packages only for `install`), its output on stderr.
fn apt_get(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    if args.first() == Some(&"install") {
        cmd.args(APT_PACKAGES);
    }
    // The report goes to stdout; apt's chatter goes with the progress lines on stderr.
    let stderr = std::io::stderr();
    cmd.stdin(Stdio::null()).stdout(Stdio::from(
        std::os::fd::AsFd::as_fd(&stderr).try_clone_to_owned()?,
    ));
    eprintln!("running {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

pub(super) fn version_text((major, minor, patch): (u32, u32, u32)) -> String {
    format!("{major}.{minor}.{patch}")
}

/// The nginx reference: the site's ECDSA P-256 certificate and key (the ones the edge
/// serves through the key server), `proxy_cache` in front of the test origin, every
/// file under `dir`.
pub(super) fn nginx_config(
    tools: &Tools,
    deployment: &Deployment,
    dir: &Path,
    listen: SocketAddr,
    origin: SocketAddr,
) -> Result<String> {
    let keys = deployment.keys_dir();
    let cert = keys.join(format!("{DOMAIN}-ecdsa.crt"));
    let key = keys.join(format!("{DOMAIN}-ecdsa.key"));
    let tmp = dir.join("tmp");
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi", "cache"] {
        let d = tmp.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let p = |path: &Path| -> Result<String> {
        let s = path
            .to_str()
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        ensure!(
            !s.contains(['"', ';', '$', '\\']),
            "{s:?}: unsafe in an nginx config"
        );
        Ok(format!("\"{s}\""))
    };
    let (listen_http2, http2_on) = if tools.nginx_version >= NGINX_HTTP2_DIRECTIVE {
        ("", "        http2 on;\n")
    } else {
        (" http2", "")
    };
    // Workers run as the invoking user: as root they would switch to `nobody`, who
    // cannot write the temp and cache directories of this run.
    let user = if is_root() { "user root;\n" } else { "" };
    let mut temp_paths = format!(
        "    client_body_temp_path {};\n    proxy_temp_path {};\n",
        p(&tmp.join("body"))?,
        p(&tmp.join("proxy"))?
    );
    for module in ["fastcgi", "uwsgi", "scgi"] {
        if !tools
            .nginx_build
            .contains(&format!("--without-http_{module}_module"))
        {
            let _ = writeln!(
                temp_paths,
                "    {module}_temp_path {};",
                p(&tmp.join(module))?
            );
        }
    }
    Ok(format!(
        "# keyless-bench cache: the nginx reference.\n\
         {user}\
         worker_processes auto;\n\
         daemon off;\n\
         master_process on;\n\
         pid {pid};\n\
         error_log {error_log} warn;\n\
         events {{\n    worker_connections 4096;\n}}\n\
         http {{\n\
         \x20   access_log off;\n\
         {temp_paths}\
         \x20   # wrk keeps its connections for the whole run (the edge has no per-connection\n\
         \x20   # request limit; nginx's default is 1000).\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   keepalive_timeout 75s;\n\
         \x20   proxy_cache_path {cache} levels=1:2 keys_zone=bench:10m max_size=1g inactive=1h use_temp_path=off;\n\
         \x20   upstream test_origin {{\n\
         \x20       server {origin};\n\
         \x20       keepalive 64;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen {listen} ssl{listen_http2};\n\
         {http2_on}\
         \x20       server_name {DOMAIN};\n\
         \x20       ssl_certificate {cert};\n\
         \x20       ssl_certificate_key {key};\n\
         \x20       ssl_protocols TLSv1.3 TLSv1.2;\n\
         \x20       # The edge's cipher order, over the client's, as the edge does.\n\
         \x20       ssl_prefer_server_ciphers on;\n\
         \x20       ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384;\n\
         \x20       ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384;\n\
         \x20       ssl_session_cache shared:SSL:10m;\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://test_origin;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_cache bench;\n\
         \x20           proxy_cache_valid 200 1h;\n\
         \x20           add_header X-Cache-Status $upstream_cache_status always;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        pid = p(&dir.join("nginx.pid"))?,
        error_log = p(&dir.join("error.log"))?,
        cache = p(&tmp.join("cache"))?,
        cert = p(&cert)?,
        key = p(&key)?,
    ))
}

/// Whether this process runs as root (`Uid:` in `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
