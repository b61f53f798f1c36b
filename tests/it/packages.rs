//! The Debian packages: `packaging/build-debs.sh` builds keyless-edge, keyless-origin and
//! keyless-certs from the binaries this test run uses (no release build), with the layout
//! each crate's `[package.metadata.deb]` (cargo-deb) describes. The packages are unpacked
//! into a throwaway root with `dpkg-deb -x`, never installed on this machine: `dpkg -i`
//! would create system users and enable units here, and `dpkg --root` runs the
//! maintainer scripts either chrooted (needs root and a base system in the root) or, with
//! `--force-script-chrootless`, against this machine's own `adduser`, `deb-systemd-helper`
//! and `systemctl`. The scripts are checked as text and for syntax; the units with
//! `systemd-analyze verify` and for the sandbox every unit must have; the example
//! configurations with the packaged binaries' `--test`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use keyless_tests::{ensure_built, run_with_timeout, target_dir, workspace_root, Profile};

const PACKAGES: [&str; 3] = ["keyless-edge", "keyless-origin", "keyless-certs"];
/// The packages that run a service: (package, the writable directories its unit declares).
const SERVICES: [(&str, &[(&str, &str)]); 2] = [
    (
        "keyless-edge",
        &[
            ("StateDirectory", "keyless-edge"),
            ("CacheDirectory", "keyless-edge"),
        ],
    ),
    ("keyless-origin", &[("StateDirectory", "keyless-origin")]),
];
const TIMEOUT: Duration = Duration::from_secs(60);

/// The packages, built once per test process, and what they unpack to.
struct Built {
    /// `<package>_<version>_<arch>.deb` per package, in [`PACKAGES`] order.
    debs: Vec<PathBuf>,
    /// Every package's files (`dpkg-deb -x`).
    root: PathBuf,
    /// `<control>/<package>/`: each package's control files (`dpkg-deb -e`).
    control: PathBuf,
    /// The package version the manifests give (`<workspace version>-1`).
    version: String,
}

fn built() -> Result<&'static Built> {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    match BUILT.get_or_init(|| build().map_err(|e| format!("{e:#}"))) {
        Ok(b) => Ok(b),
        Err(e) => bail!("building the packages failed: {e}"),
    }
}

fn build() -> Result<Built> {
    let profile = Profile::current();
    ensure_built(profile)?;
    // Inside the target directory (cargo's place for integration-test data), replaced on
    // every run.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("packages");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let out = dir.join("debs");
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("packaging/build-debs.sh"))
        .arg("--profile")
        .arg(match profile {
            Profile::Debug => "debug",
            Profile::Release => "release",
        })
        .arg("--out")
        .arg(&out)
        .arg("--target-dir")
        .arg(target_dir()?);
    let output = checked(cmd, "packaging/build-debs.sh")?;
    let listed: Vec<PathBuf> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();

    let version = format!("{}-1", workspace_version()?);
    let arch = String::from_utf8_lossy(
        &checked(command("dpkg", &["--print-architecture"]), "dpkg")?.stdout,
    )
    .trim()
    .to_owned();
    let debs: Vec<PathBuf> = PACKAGES
        .iter()
        .map(|p| out.join(format!("{p}_{version}_{arch}.deb")))
        .collect();
    ensure!(
        listed == debs,
        "build-debs.sh printed {listed:?}, expected {debs:?}"
    );

    let root = dir.join("root");
    let control = dir.join("control");
    std::fs::create_dir_all(&control).with_context(|| format!("creating {}", control.display()))?;
    for (pkg, deb) in PACKAGES.iter().zip(&debs) {
        let mut x = Command::new("dpkg-deb");
        x.arg("-x").arg(deb).arg(&root);
        checked(x, "dpkg-deb -x")?;
        let mut e = Command::new("dpkg-deb");
        e.arg("-e").arg(deb).arg(control.join(pkg));
        checked(e, "dpkg-deb -e")?;
    }
    Ok(Built {
        debs,
        root,
        control,
        version,
    })
}

fn command(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// Runs `cmd`, failing with its output unless it succeeds.
fn checked(cmd: Command, what: &str) -> Result<Output> {
    let output = run_with_timeout(cmd, TIMEOUT).with_context(|| format!("running {what}"))?;
    ensure!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn manifest(crate_dir: &str) -> Result<toml::Table> {
    let path = workspace_root().join(crate_dir).join("Cargo.toml");
    read(&path)?
        .parse::<toml::Table>()
        .with_context(|| format!("parsing {}", path.display()))
}

fn workspace_version() -> Result<String> {
    let root = manifest(".")?;
    root.get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .context("no [workspace.package] version in Cargo.toml")
}

/// `[package.metadata.deb]` of the package's crate.
fn deb_metadata(pkg: &str) -> Result<toml::Table> {
    let crate_dir = pkg.trim_start_matches("keyless-");
    manifest(crate_dir)?
        .get("package")
        .and_then(|p| p.get("metadata"))
        .and_then(|m| m.get("deb"))
        .and_then(toml::Value::as_table)
        .cloned()
        .with_context(|| format!("{crate_dir}/Cargo.toml has no [package.metadata.deb]"))
}

fn strings(value: Option<&toml::Value>) -> Vec<String> {
    value
        .and_then(toml::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(toml::Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The regular files of a package (`dpkg-deb --contents`), with their permission strings.
fn contents(deb: &Path) -> Result<Vec<(String, String)>> {
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("--contents").arg(deb);
    let output = checked(cmd, "dpkg-deb --contents")?;
    let mut files = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut fields = line.split_whitespace();
        let perms = fields.next().unwrap_or_default();
        let path = fields.last().unwrap_or_default();
        if perms.starts_with('-') {
            files.push((path.trim_start_matches("./").to_owned(), perms.to_owned()));
        }
    }
    Ok(files)
}

fn field(deb: &Path, name: &str) -> Result<String> {
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("--field").arg(deb).arg(name);
    let output = checked(cmd, "dpkg-deb --field")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[test]
fn packages_have_the_layout_their_cargo_deb_metadata_describes() -> Result<()> {
    let b = built()?;
    for (pkg, deb) in PACKAGES.iter().zip(&b.debs) {
        let meta = deb_metadata(pkg)?;
        ensure!(field(deb, "Package")? == *pkg, "{pkg}: Package field");
        ensure!(field(deb, "Version")? == b.version, "{pkg}: Version field");
        let depends = field(deb, "Depends")?;
        ensure!(
            depends.contains("libc6") && !depends.contains("$auto"),
            "{pkg}: Depends {depends:?} lacks the shared-library dependencies"
        );
        let is_service = SERVICES.iter().any(|(p, _)| p == pkg);
        ensure!(
            depends.contains("adduser") == is_service,
            "{pkg}: Depends {depends:?} (adduser exactly for the packages with a service user)"
        );

        // Exactly the assets, the unit and the copyright file, nothing else.
        let files = contents(deb)?;
        let mut expected = BTreeSet::new();
        let assets = meta
            .get("assets")
            .and_then(toml::Value::as_array)
            .with_context(|| format!("{pkg}: no assets"))?;
        for asset in assets {
            let fields = strings(Some(asset));
            let [src, dest, mode] = &fields[..] else {
                bail!("{pkg}: asset {asset} is not [source, dest, mode]");
            };
            let dest = match dest.strip_suffix('/') {
                Some(dir) => format!("{dir}/{}", src.rsplit('/').next().unwrap_or(src)),
                None => dest.clone(),
            };
            let perms = files
                .iter()
                .find(|(path, _)| *path == dest)
                .map(|(_, perms)| perms.as_str())
                .with_context(|| format!("{pkg}: asset {dest} missing from {files:?}"))?;
            let executable = perms.as_bytes().get(3) == Some(&b'x');
            ensure!(
                executable == (mode.as_str() == "755"),
                "{pkg}: {dest} has {perms}, the manifest says {mode}"
            );
            expected.insert(dest);
        }
        if meta.contains_key("systemd-units") {
            expected.insert(format!("lib/systemd/system/{pkg}.service"));
        }
        expected.insert(format!("usr/share/doc/{pkg}/copyright"));
        let found: BTreeSet<String> = files.into_iter().map(|(p, _)| p).collect();
        ensure!(
            found == expected,
            "{pkg}: files {found:?}, expected {expected:?}"
        );
        ensure!(
            found.contains(&format!("usr/bin/{pkg}")),
            "{pkg}: no /usr/bin/{pkg}"
        );

        // Configuration: /etc/keyless/<package>.toml, a conffile, for each service.
        let control = b.control.join(pkg);
        let conffiles = match std::fs::read_to_string(control.join("conffiles")) {
            Ok(text) => text.lines().map(str::to_owned).collect(),
            Err(_) => BTreeSet::new(),
        };
        let mut want_conf: BTreeSet<String> = strings(meta.get("conf-files")).into_iter().collect();
        want_conf.extend(
            found
                .iter()
                .filter(|p| p.starts_with("etc/"))
                .map(|p| format!("/{p}")),
        );
        ensure!(
            conffiles == want_conf,
            "{pkg}: conffiles {conffiles:?}, expected {want_conf:?}"
        );
        if is_service {
            let conf = format!("/etc/keyless/{pkg}.toml");
            ensure!(conffiles.contains(&conf), "{pkg}: {conf} is not a conffile");
        }

        // The packaged (stripped) binary runs and is this version.
        let bin = b.root.join("usr/bin").join(pkg);
        let mut cmd = Command::new(&bin);
        cmd.arg("--version");
        let output = checked(cmd, &format!("{pkg} --version"))?;
        let version = workspace_version()?;
        ensure!(
            String::from_utf8_lossy(&output.stdout).contains(&version),
            "{pkg} --version does not print {version}"
        );
    }
    Ok(())
}

#[test]
fn maintainer_scripts_create_the_user_and_enable_without_starting() -> Result<()> {
    let b = built()?;
    for (pkg, _) in SERVICES {
        let control = b.control.join(pkg);
        let unit = format!("{pkg}.service");
        let mut texts = Vec::new();
        for script in ["postinst", "prerm", "postrm"] {
            let path = control.join(script);
            let text = read(&path)?;
            let path = path.to_string_lossy().into_owned();
            ensure!(
                !text.contains("#DEBHELPER#") && !text.contains("#UNITFILE"),
                "{pkg} {script}: placeholders left in it"
            );
            checked(
                command("sh", &["-n", &path]),
                &format!("sh -n {pkg} {script}"),
            )?;
            if have("shellcheck") {
                checked(
                    command("shellcheck", &["-s", "sh", &path]),
                    &format!("shellcheck {pkg} {script}"),
                )?;
            }
            texts.push(text);
        }
        let [postinst, prerm, postrm] = &texts[..] else {
            bail!("three scripts read");
        };
        ensure!(
            postinst.contains(&format!(
                "adduser --system --group --no-create-home --home /var/lib/{pkg} --quiet {pkg}"
            )),
            "{pkg} postinst does not create the system user"
        );
        ensure!(
            postinst.contains(&format!("deb-systemd-helper enable '{unit}'")),
            "{pkg} postinst does not enable {unit}"
        );
        ensure!(
            !postinst.contains("deb-systemd-invoke start")
                && !postinst.contains("deb-systemd-invoke restart"),
            "{pkg} postinst starts {unit} (it needs the operator's files first)"
        );
        ensure!(
            prerm.contains(&format!("deb-systemd-invoke stop {unit}")),
            "{pkg} prerm does not stop {unit} on removal"
        );
        ensure!(
            postrm.contains(&format!("deb-systemd-helper purge {unit}")),
            "{pkg} postrm does not purge {unit}'s state"
        );
    }
    ensure!(
        !b.control.join("keyless-certs/postinst").exists(),
        "keyless-certs has no service and needs no maintainer script"
    );
    Ok(())
}

/// The `(key, value)` settings of `[section]` of a unit file, in order.
fn unit_settings(text: &str, section: &str) -> Result<Vec<(String, String)>> {
    let mut inside = false;
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        ensure!(
            !line.ends_with('\\'),
            "continued lines are not linted: {line}"
        );
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
            continue;
        }
        if inside {
            let (key, value) = line
                .split_once('=')
                .with_context(|| format!("not a setting: {line}"))?;
            settings.push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    Ok(settings)
}

/// The value of `key`, which must be set exactly once (so no later line undoes it).
fn once<'a>(settings: &'a [(String, String)], key: &str) -> Result<&'a str> {
    let values: Vec<&str> = settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    match values[..] {
        [value] => Ok(value),
        _ => bail!("{key}= is set {} times, not once", values.len()),
    }
}

fn is_yes(value: &str) -> bool {
    matches!(value, "yes" | "true" | "on" | "1")
}

#[test]
fn units_carry_the_sandbox() -> Result<()> {
    let b = built()?;
    for (pkg, dirs) in SERVICES {
        let path = b.root.join(format!("lib/systemd/system/{pkg}.service"));
        let text = read(&path)?;
        let s = unit_settings(&text, "Service")?;
        let check = |ok: bool, what: &str| -> Result<()> {
            ensure!(ok, "{pkg}.service: {what}");
            Ok(())
        };
        check(
            once(&s, "User")? == pkg,
            "User= is not the package's own user",
        )?;
        check(
            once(&s, "Group")? == pkg,
            "Group= is not the package's own group",
        )?;
        check(
            once(&s, "ExecStart")? == format!("/usr/bin/{pkg} --config /etc/keyless/{pkg}.toml"),
            "ExecStart= does not run the packaged binary on the packaged configuration",
        )?;
        check(
            once(&s, "ExecReload")? == "/bin/kill -HUP $MAINPID",
            "ExecReload= does not send SIGHUP",
        )?;
        check(
            once(&s, "ProtectSystem")? == "strict",
            "ProtectSystem= is not strict",
        )?;
        for key in [
            "NoNewPrivileges",
            "PrivateTmp",
            "MemoryDenyWriteExecute",
            "ProtectHome",
            "PrivateDevices",
            "RestrictSUIDSGID",
        ] {
            check(is_yes(once(&s, key)?), &format!("{key}= is not yes"))?;
        }
        check(once(&s, "LimitCORE")? == "0", "LimitCORE= is not 0")?;
        for (key, dir) in dirs.iter() {
            check(once(&s, key)? == *dir, &format!("{key}= is not {dir}"))?;
        }
        for key in ["StateDirectory", "CacheDirectory"] {
            if !dirs.iter().any(|(k, _)| *k == key) {
                check(
                    !s.iter().any(|(k, _)| k == key),
                    &format!("{key}= set without need"),
                )?;
            }
        }
        let (caps, ambient) = if pkg == "keyless-edge" {
            ("CAP_NET_BIND_SERVICE", Some("CAP_NET_BIND_SERVICE"))
        } else {
            ("", None)
        };
        check(
            once(&s, "CapabilityBoundingSet")? == caps,
            &format!("CapabilityBoundingSet= is not {caps:?}"),
        )?;
        let ambient_set = s
            .iter()
            .filter(|(k, _)| k == "AmbientCapabilities")
            .map(|(_, v)| v.as_str())
            .find(|v| !v.is_empty());
        check(
            ambient_set == ambient,
            &format!("AmbientCapabilities= is {ambient_set:?}, not {ambient:?}"),
        )?;
        check(
            s.iter()
                .any(|(k, v)| k == "SystemCallFilter" && v == "@system-service"),
            "no SystemCallFilter=@system-service",
        )?;
        let install = unit_settings(&text, "Install")?;
        check(
            once(&install, "WantedBy")? == "multi-user.target",
            "not WantedBy=multi-user.target",
        )?;
        // The configuration the unit runs on is in the same package.
        check(
            b.root.join(format!("etc/keyless/{pkg}.toml")).is_file(),
            "its configuration is not packaged",
        )?;
    }
    Ok(())
}

#[test]
fn units_pass_systemd_analyze_verify() -> Result<()> {
    let b = built()?;
    if !have("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze is not installed; the units were only linted (units_carry_the_sandbox)");
        return Ok(());
    }
    // `verify` checks that ExecStart= exists: copies of the units run the unpacked binaries.
    // (`--root` would need the whole of systemd's own units and /bin/kill in the root.)
    let dir = b.root.parent().context("root has a parent")?.join("verify");
    std::fs::create_dir_all(&dir)?;
    let mut units = Vec::new();
    for (pkg, _) in SERVICES {
        let text = read(&b.root.join(format!("lib/systemd/system/{pkg}.service")))?;
        let bin = b.root.join("usr/bin").join(pkg);
        let text = text.replace(
            &format!("ExecStart=/usr/bin/{pkg} "),
            &format!("ExecStart={} ", bin.display()),
        );
        let unit = dir.join(format!("{pkg}.service"));
        std::fs::write(&unit, text)?;
        units.push(unit);
    }
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").args(&units);
    let output = checked(cmd, "systemd-analyze verify")?;
    // Unknown keys and unparsable values are warnings, with exit status 0.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        said.trim().is_empty(),
        "systemd-analyze verify warned:\n{said}"
    );
    Ok(())
}

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--test` of a packaged binary on a configuration.
fn config_test(b: &Built, pkg: &str, config: &Path) -> Result<Output> {
    let mut cmd = Command::new(b.root.join("usr/bin").join(pkg));
    cmd.arg("--test").arg("--config").arg(config);
    run_with_timeout(cmd, TIMEOUT)
}

#[test]
fn example_configs_need_only_the_files_their_comments_say_to_create() -> Result<()> {
    let b = built()?;
    let etc = b.root.join("etc/keyless");
    // As installed: refused, naming the first missing file, which the comments list.
    for (pkg, missing) in [
        ("keyless-origin", "origin/keyserver.crt"),
        ("keyless-edge", "edge/keyserver-ca.crt"),
    ] {
        let config = etc.join(format!("{pkg}.toml"));
        let output = config_test(b, pkg, &config)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success(),
            "{pkg} --test accepted the example without its key files"
        );
        let path = etc.join(missing);
        ensure!(
            stderr.contains(&path.display().to_string()) && stderr.contains("No such file"),
            "{pkg} --test does not name the missing {}:\n{stderr}",
            path.display()
        );
        let text = read(&config)?;
        ensure!(
            text.lines()
                .any(|l| l.trim_start().starts_with('#') && l.contains(missing)),
            "the comments of {pkg}.toml do not say to create {missing}"
        );
    }

    // After the command the comments give: accepted (the packaged configuration files,
    // in a copy of /etc/keyless).
    const INIT: &str = "keyless-certs init --out /etc/keyless --force --domain example.com";
    let origin_text = read(&etc.join("keyless-origin.toml"))?;
    ensure!(
        origin_text.contains(INIT),
        "keyless-origin.toml does not document `{INIT}`"
    );
    let scratch = Scratch(keyless_tests::unique_temp_dir("packages-etc")?);
    let copy = scratch.0.join("etc/keyless");
    std::fs::create_dir_all(&copy)?;
    for pkg in ["keyless-origin", "keyless-edge"] {
        let name = format!("{pkg}.toml");
        std::fs::copy(etc.join(&name), copy.join(&name))?;
    }
    let mut init = Command::new(b.root.join("usr/bin/keyless-certs"));
    init.args(["init", "--out"]).arg(&copy).args([
        "--force",
        "--domain",
        "example.com",
        "--keyserver-listen",
        "0.0.0.0:2407",
    ]);
    checked(init, "keyless-certs init")?;

    let output = config_test(b, "keyless-origin", &copy.join("keyless-origin.toml"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && stdout.contains("is valid: 2 site key(s)"),
        "keyless-origin --test refused the example after keyless-certs init:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        stdout.contains("state_dir /var/lib/keyless-origin"),
        "the example's state_dir is not the unit's StateDirectory:\n{stdout}"
    );

    // The edge's --test creates and writes its disk cache directory: a copy points it
    // into the scratch directory instead of /var/cache.
    let edge_text = read(&copy.join("keyless-edge.toml"))?;
    const CACHE: &str = "disk_dir = \"/var/cache/keyless-edge\"";
    ensure!(
        edge_text.contains(CACHE),
        "the edge example's disk tier is not in the unit's CacheDirectory"
    );
    let cache = scratch.0.join("var/cache/keyless-edge");
    let edge_config = copy.join("keyless-edge.test.toml");
    std::fs::write(
        &edge_config,
        edge_text.replace(
            CACHE,
            &format!("disk_dir = {:?}", cache.display().to_string()),
        ),
    )?;
    let output = config_test(b, "keyless-edge", &edge_config)?;
    ensure!(
        output.status.success(),
        "keyless-edge --test refused the example after keyless-certs init:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
