//! Finding (and building, once per process) the workspace binaries under test.
//!
//! `cargo test -p keyless-tests` builds only this package's targets, so the key server
//! and the PKI tool could be missing or stale. The first caller runs
//! `cargo build -p keyless-origin -p keyless-certs -p keyless-edge -p keyless-tests` with a
//! `--bin` for each binary under test (a no-op when they are fresh) for the
//! profile the test binary itself was built with; set `KEYLESS_TESTS_NO_BUILD=1` to use
//! whatever binaries are already in the target directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};

/// The packages whose binaries the tests drive.
const PACKAGES: [&str; 4] = [
    "keyless-origin",
    "keyless-certs",
    "keyless-edge",
    "keyless-tests",
];
/// The binaries the tests drive (not `keyless-bench`: no test runs it).
const BINARIES: [&str; 4] = [
    "keyless-origin",
    "keyless-certs",
    "keyless-edge",
    "keyless-test-origin",
];

/// A cargo build profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// `target/debug`.
    Debug,
    /// `target/release`.
    Release,
}

impl Profile {
    fn dir_name(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }

    /// The profile the running executable was built with (from its directory name).
    pub fn current() -> Profile {
        match current_profile_dir() {
            Ok(dir) if dir.file_name().is_some_and(|n| n == "release") => Profile::Release,
            _ => Profile::Debug,
        }
    }
}

/// `target/<profile>` of the running executable: tests live in `target/<profile>/deps`,
/// binaries in `target/<profile>`.
fn current_profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no parent directory")?
        .to_path_buf();
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir.pop();
    }
    Ok(dir)
}

/// The cargo target directory (`target/`).
pub fn target_dir() -> Result<PathBuf> {
    let profile_dir = current_profile_dir()?;
    profile_dir
        .parent()
        .map(Path::to_path_buf)
        .context("the profile directory has no parent (target dir)")
}

/// Path of `name` in `target/<profile>/`, building the binaries first if needed.
pub fn binary(name: &str, profile: Profile) -> Result<PathBuf> {
    ensure_built(profile)?;
    let path = target_dir()?.join(profile.dir_name()).join(name);
    if !path.is_file() {
        bail!("{} does not exist after building", path.display());
    }
    Ok(path)
}

/// Path of the key server binary for the current profile.
pub fn origin_bin() -> Result<PathBuf> {
    binary("keyless-origin", Profile::current())
}

/// Path of the PKI tool binary for the current profile.
pub fn certs_bin() -> Result<PathBuf> {
    binary("keyless-certs", Profile::current())
}

/// Builds the binaries under test once per process and profile.
///
/// A failed build is remembered and reported to every later caller (the tests would
/// otherwise run each into the same compile error).
pub fn ensure_built(profile: Profile) -> Result<()> {
    static BUILT: OnceLock<Mutex<HashMap<Profile, Result<(), String>>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let outcome = built
        .entry(profile)
        .or_insert_with(|| build(profile).map_err(|e| format!("{e:#}")));
    match outcome {
        Ok(()) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

fn build(profile: Profile) -> Result<()> {
    let dir = target_dir()?.join(profile.dir_name());
    let present = BINARIES.iter().all(|b| dir.join(b).is_file());
    if std::env::var_os("KEYLESS_TESTS_NO_BUILD").is_some() {
        if present {
            return Ok(());
        }
        bail!(
            "KEYLESS_TESTS_NO_BUILD is set but {} lacks {:?}",
            dir.display(),
            BINARIES
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--quiet");
    for p in PACKAGES {
        cmd.args(["-p", p]);
    }
    for b in BINARIES {
        cmd.args(["--bin", b]);
    }
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    // Build into the same target dir as the running binary, from the workspace root.
    cmd.env("CARGO_TARGET_DIR", target_dir()?);
    // `cargo test` gives the test process the variables it sets for a crate
    // (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...). Build scripts that watch them
    // (ring's does, through `rerun-if-env-changed`) would see them changed from the
    // outer build's and rebuild ring and everything above it on every test run.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(workspace_root());
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// The workspace root (parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}
