//! Helpers for the unit tests: scratch directories and a deployment written through the
//! real command-line parser.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use clap::Parser;

use crate::{init, Cli, Command};

/// A not-yet-created path under the system temp directory, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        TempDir(std::env::temp_dir().join(format!(
            "keyless-certs-{tag}-{}-{n}-{nanos}",
            std::process::id()
        )))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `keyless-certs init --out DIR <args>` in-process; returns what it printed.
pub(crate) fn run_init(dir: &Path, args: &[&str]) -> Result<String> {
    let out = dir.to_string_lossy();
    let argv = ["keyless-certs", "init", "--out", out.as_ref()]
        .into_iter()
        .chain(args.iter().copied());
    let cli = Cli::try_parse_from(argv)?;
    let Command::Init(init_args) = cli.command else {
        bail!("parsed as another subcommand");
    };
    let mut printed = Vec::new();
    init::run(&init_args, &mut printed)?;
    Ok(String::from_utf8(printed)?)
}
