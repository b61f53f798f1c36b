//! SoftHSM2 tokens for the HSM tests: each in its own directory, named by a
//! `SOFTHSM2_CONF` file the key server is started with, so tests never share a token.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// The SoftHSM2 PKCS#11 module of Debian's `softhsm2` package.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every test token.
pub const SOFTHSM_PIN: &str = "246810";

/// A SoftHSM2 token in a directory of its own.
#[derive(Debug)]
pub struct SoftHsm {
    conf: PathBuf,
    tokens: PathBuf,
    pin_file: PathBuf,
    pin: String,
    label: String,
}

impl SoftHsm {
    /// Initialises a token labelled `label` under `dir` (created), its user PIN in
    /// `dir/pin` (mode 0600).
    pub fn init(dir: &Path, label: &str) -> Result<SoftHsm> {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens)
            .with_context(|| format!("creating {}", tokens.display()))?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )?;
        let pin = SOFTHSM_PIN.to_owned();
        let pin_file = dir.join("pin");
        std::fs::write(&pin_file, format!("{pin}\n"))?;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600))?;
        let hsm = SoftHsm {
            conf,
            tokens,
            pin_file,
            pin,
            label: label.to_owned(),
        };
        hsm.util(&[
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            &hsm.pin,
            "--so-pin",
            "13579111",
        ])?;
        Ok(hsm)
    }

    /// Imports the PKCS#8 PEM private key `pem` as a non-extractable key labelled
    /// `label` with `CKA_ID` `id` (hex).
    pub fn import(&self, pem: &Path, label: &str, id: &str) -> Result<()> {
        let pem = pem.to_string_lossy().into_owned();
        self.util(&[
            "--import",
            &pem,
            "--token",
            &self.label,
            "--label",
            label,
            "--id",
            id,
            "--pin",
            &self.pin,
        ])
    }

    fn util(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("softhsm2-util")
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .context("running softhsm2-util (is softhsm2 installed?)")?;
        ensure!(
            out.status.success(),
            "softhsm2-util {}: {}{}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// `SOFTHSM2_CONF` for a process using this token.
    pub fn env(&self) -> (&'static str, OsString) {
        ("SOFTHSM2_CONF", self.conf.clone().into_os_string())
    }

    /// The directory holding the token's files.
    pub fn tokens_dir(&self) -> &Path {
        &self.tokens
    }

    /// The token's RFC 7512 URI for `[[keys.store]]` (every private key of the token).
    pub fn uri(&self) -> String {
        format!(
            "pkcs11:token={}?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
            self.label,
            self.pin_file.display()
        )
    }

    /// A `[[keys.store]]` table for this token.
    pub fn store_table(&self) -> toml::Table {
        let mut t = toml::Table::new();
        t.insert("type".into(), "pkcs11".into());
        t.insert("uri".into(), self.uri().into());
        t
    }

    /// The file holding the user PIN.
    pub fn pin_file(&self) -> &Path {
        &self.pin_file
    }
}

/// Builds `tests/support/hanging-pkcs11.c` into `dir` (created): a PKCS#11 module that
/// is SoftHSM2 except that `C_Sign` hangs while the file named by the environment
/// variable [`HANG_FILE_ENV`] exists (an HSM that stops answering without failing).
/// Its path, for a URI's `module-path`.
pub fn hanging_module(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/hanging-pkcs11.c");
    let module = dir.join("libhanging-pkcs11.so");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&module)
        .arg(&source)
        .arg("-ldl")
        .output()
        .context("running cc (a C compiler builds the test PKCS#11 module)")?;
    ensure!(
        out.status.success(),
        "building {}: {}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(module)
}

/// The environment variable naming the file whose existence makes the module of
/// [`hanging_module`] hang in `C_Sign`.
pub const HANG_FILE_ENV: &str = "KEYLESS_TEST_HANG_FILE";
