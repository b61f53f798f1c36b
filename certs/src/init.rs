//! `keyless-certs init`: a complete loopback deployment in one directory.
//!
//! Owns the on-disk layout the key server, the edge and the integration tests rely on:
//!
//! ```text
//! DIR/origin.toml, DIR/edge.toml
//! DIR/ca/{site,keyserver,edge}-ca.{crt,key}     offline CA material
//! DIR/client/ca.pem                             site CA, for curl --cacert
//! DIR/origin/keys/<domain>-{ecdsa,rsa}.{key,crt} site keys: only the key server has them
//! DIR/origin/keyserver.{crt,key}, DIR/origin/edge-ca.crt
//! DIR/edge/edge.{crt,key}, DIR/edge/keyserver-ca.crt
//! DIR/origin/edge-ca.key                        with --enroll only: the key server
//!                                               enrolls edges of group "default"
//! ```
//!
//! Everything is generated in memory first, so a failure leaves no half-written PKI.
//! Private keys are created with mode 0600 (never chmod-ed after the fact), and nothing
//! under `edge/` is derived from a site key.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use keyless_shared::Ski;

use crate::pki::{Ca, IssuedCert, KeyAlg, SubjectKey};

/// Arguments of `keyless-certs init`.
#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Directory to write the deployment into (created if missing; must be empty
    /// unless --force).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// A site domain; repeat for several. Each gets an ECDSA P-256 and an RSA-2048 key
    /// with a certificate for DOMAIN and *.DOMAIN.
    #[arg(long = "domain", value_name = "DOMAIN", required = true, value_parser = parse_dns_name)]
    pub(crate) domains: Vec<String>,
    /// Address the key server listens on (written to origin.toml; its port to edge.toml).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2407", value_parser = parse_keyserver_listen)]
    pub(crate) keyserver_listen: SocketAddr,
    /// Address of the key server's metrics endpoint (written to origin.toml).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2406")]
    pub(crate) metrics_listen: SocketAddr,
    /// Name of the edge: CN and DNS SAN of its client certificate.
    #[arg(long, value_name = "NAME", default_value = "edge-1", value_parser = parse_dns_name)]
    pub(crate) edge_name: String,
    /// Write into a non-empty directory, replacing files of the same name.
    #[arg(long)]
    pub(crate) force: bool,
    /// Let the key server enroll edges: origin.toml gets a [[group]] "default" with the
    /// edge CA's certificate and key (a copy of the key in origin/) and an
    /// enroll_listen address.
    #[arg(long)]
    pub(crate) enroll: bool,
    /// Address of the key server's enrollment API (with --enroll).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:2408",
        requires = "enroll"
    )]
    pub(crate) enroll_listen: SocketAddr,
}

/// Private keys: readable by the owner only.
const SECRET_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;
/// Directories holding private keys.
const PRIVATE_DIR_MODE: u32 = 0o700;
const PUBLIC_DIR_MODE: u32 = 0o755;

/// Runs `init`, printing a summary of the files written to `out`.
pub(crate) fn run(args: &InitArgs, out: &mut impl Write) -> Result<()> {
    reject_duplicates(&args.domains)?;
    prepare_dir(&args.out, args.force)?;

    // Generate everything before touching the disk.
    let pki = Pki::generate(args)?;

    let mut w = TreeWriter {
        root: &args.out,
        force: args.force,
        written: Vec::new(),
    };
    w.dir("ca", PRIVATE_DIR_MODE)?;
    w.dir("client", PUBLIC_DIR_MODE)?;
    w.dir("origin", PRIVATE_DIR_MODE)?;
    w.dir("origin/keys", PRIVATE_DIR_MODE)?;
    w.dir("edge", PRIVATE_DIR_MODE)?;
    pki.write_cas(&mut w)?;
    pki.write_sites(&mut w)?;
    pki.write_origin(&mut w)?;
    if args.enroll {
        w.secret(
            "origin/edge-ca.key",
            &pki.edge_ca.key_pem,
            "edge CA key, signs enrolled edges' certificates",
        )?;
    }
    pki.write_edge(&mut w)?;

    let mut origin = origin_toml(args.keyserver_listen, args.metrics_listen);
    if args.enroll {
        origin = enroll_origin_toml(&origin, args.enroll_listen);
    }
    w.public("origin.toml", &origin, "keyless-origin configuration")?;
    let edge = edge_toml(args.keyserver_listen.port(), &args.domains);
    w.public("edge.toml", &edge, "keyless-edge configuration")?;

    print_summary(out, args, &w.written).context("printing the summary")
}

/// Every key and certificate of a deployment, generated in memory.
struct Pki<'a> {
    site_ca: Ca,
    keyserver_ca: Ca,
    edge_ca: Ca,
    /// Per domain and algorithm: the site key and its certificate.
    sites: Vec<(&'a str, KeyAlg, SubjectKey, IssuedCert)>,
    keyserver: (SubjectKey, IssuedCert),
    edge: (SubjectKey, IssuedCert),
}

impl<'a> Pki<'a> {
    fn generate(args: &'a InitArgs) -> Result<Pki<'a>> {
        let site_ca = Ca::generate("keyless site CA")?;
        let keyserver_ca = Ca::generate("keyless key-server CA")?;
        let edge_ca = Ca::generate("keyless edge CA")?;

        let mut sites = Vec::new();
        for domain in &args.domains {
            for alg in [KeyAlg::EcdsaP256, KeyAlg::Rsa2048] {
                let key = SubjectKey::generate(alg)?;
                let cert = site_ca.issue_site(domain, &key, alg)?;
                sites.push((domain.as_str(), alg, key, cert));
            }
        }
        let keyserver_key = SubjectKey::generate(KeyAlg::EcdsaP256)?;
        let keyserver_cert = keyserver_ca.issue_keyserver(&keyserver_key)?;
        let edge_key = SubjectKey::generate(KeyAlg::EcdsaP256)?;
        let edge_cert = edge_ca.issue_edge(&args.edge_name, &edge_key)?;
        Ok(Pki {
            site_ca,
            keyserver_ca,
            edge_ca,
            sites,
            keyserver: (keyserver_key, keyserver_cert),
            edge: (edge_key, edge_cert),
        })
    }

    /// `ca/` (offline material) and `client/ca.pem`.
    fn write_cas(&self, w: &mut TreeWriter<'_>) -> Result<()> {
        for (name, ca) in [
            ("site-ca", &self.site_ca),
            ("keyserver-ca", &self.keyserver_ca),
            ("edge-ca", &self.edge_ca),
        ] {
            w.secret(
                &format!("ca/{name}.key"),
                &ca.key_pem,
                "CA private key (offline)",
            )?;
            w.public(&format!("ca/{name}.crt"), &ca.cert.pem, "CA certificate")?;
        }
        w.public(
            "client/ca.pem",
            &self.site_ca.cert.pem,
            "site CA, for curl --cacert",
        )
    }

    /// `origin/keys/`: the site keys, which only the key server has.
    fn write_sites(&self, w: &mut TreeWriter<'_>) -> Result<()> {
        for (domain, alg, key, cert) in &self.sites {
            let base = format!("origin/keys/{domain}-{}", alg.file_suffix());
            let ski = Ski::from_spki_der(key.spki_der())
                .with_context(|| format!("unparsable public key of {domain}"))?;
            w.secret(
                &format!("{base}.key"),
                key.private_pem(),
                "site private key",
            )?;
            w.public(
                &format!("{base}.crt"),
                &cert.pem,
                &format!("site certificate, SKI {ski}"),
            )?;
        }
        Ok(())
    }

    /// The key server's TLS identity and the CA of its clients.
    fn write_origin(&self, w: &mut TreeWriter<'_>) -> Result<()> {
        let (key, cert) = &self.keyserver;
        w.public(
            "origin/keyserver.crt",
            &cert.pem,
            "key server TLS certificate",
        )?;
        w.secret(
            "origin/keyserver.key",
            key.private_pem(),
            "key server TLS key",
        )?;
        w.public(
            "origin/edge-ca.crt",
            &self.edge_ca.cert.pem,
            "edge CA, verifies edge client certificates",
        )
    }

    /// The edge's client identity and the CA of its key servers.
    fn write_edge(&self, w: &mut TreeWriter<'_>) -> Result<()> {
        let (key, cert) = &self.edge;
        w.public("edge/edge.crt", &cert.pem, "edge client certificate")?;
        w.secret("edge/edge.key", key.private_pem(), "edge client key")?;
        w.public(
            "edge/keyserver-ca.crt",
            &self.keyserver_ca.cert.pem,
            "key-server CA",
        )
    }
}

/// The key server's configuration; paths are relative to the file's directory.
pub(crate) fn origin_toml(listen: SocketAddr, metrics_listen: SocketAddr) -> String {
    let listen = format!("listen = \"{listen}\"");
    let metrics = format!("metrics_listen = \"{metrics_listen}\"");
    format!(
        "# keyless-origin configuration (written by keyless-certs init)\n\
         {listen:<35}# from --keyserver-listen\n\
         {metrics:<35}# from --metrics-listen\n\
         # Refuse signatures unless the request carries the whole TLS handshake message\n\
         # (false serves reference Keyless clients that send bare digests; logged as a risk).\n\
         require_handshake_context = true\n\
         \n\
         [tls]\n\
         cert = \"origin/keyserver.crt\"\n\
         key = \"origin/keyserver.key\"\n\
         client_ca = \"origin/edge-ca.crt\"\n\
         # An edge is named (in [[keys.acl]]) by the first DNS SAN of its certificate.\n\
         identity = \"san\"\n\
         # Revoked edge certificates (keyless-certs revoke writes it; re-read on SIGHUP):\n\
         # client_crl = \"origin/edge-ca.crl\"\n\
         # Rotate this certificate on a schedule, signed by the key-server CA (whose key\n\
         # the key server then holds; it writes cert and key itself and reloads them):\n\
         # rotate_every = \"24h\"\n\
         # ca_cert = \"ca/keyserver-ca.crt\"\n\
         # ca_key = \"ca/keyserver-ca.key\"\n\
         \n\
         [keys]\n\
         dir = \"origin/keys\"\n\
         # Keys without a [[keys.acl]] entry may be used by every edge (\"allow\") or none (\"deny\").\n\
         default_acl = \"allow\"\n\
         # Raw RSA decrypt (opcode 0x01) is refused unless enabled per key:\n\
         # [[keys.policy]]\n\
         # key = \"example.com-rsa\"\n\
         # allow_rsa_decrypt = true\n"
    )
}

/// `origin` (as [`origin_toml`] wrote it) with enrollment on: `enroll_listen` among
/// the top-level keys and a `[[group]]` "default" whose CA is the edge CA, key included.
pub(crate) fn enroll_origin_toml(origin: &str, enroll_listen: SocketAddr) -> String {
    let listen = format!("enroll_listen = \"{enroll_listen}\"");
    let top = format!("{listen:<35}# from --enroll-listen (enrollment API)\n");
    // Beside the other addresses, before the first table (a top-level key after one
    // would belong to it).
    const AFTER: &str = "# from --metrics-listen\n";
    let mut s = match origin.find(AFTER) {
        Some(at) => {
            let (head, tail) = origin.split_at(at + AFTER.len());
            format!("{head}{top}{tail}")
        }
        None => format!("{top}{origin}"),
    };
    s.push_str(
        "\n\
         # Edge enrollment (keyless-certs init --enroll): edges join group \"default\" with a\n\
         # token from `keyless-origin token create --config origin.toml --group default --ttl 1h`.\n\
         # Enrollment state (tokens, edges, revocations) lives in state_dir (default \"state\").\n\
         [[group]]\n\
         name = \"default\"\n\
         ca_cert = \"origin/edge-ca.crt\"\n\
         ca_key = \"origin/edge-ca.key\"\n\
         # Keys its edges may use (file stems, * globs); default: every key.\n\
         # keys = [\"example.com-*\"]\n\
         cert_lifetime = \"24h\"\n\
         max_clock_offset = \"5m\"\n",
    );
    s
}

/// The edge's configuration; paths are relative to the file's directory.
pub(crate) fn edge_toml(keyserver_port: u16, domains: &[String]) -> String {
    // The key server certificate names `localhost`, not the listen address, so the edge
    // dials by name whatever interface the key server binds.
    let mut s = format!(
        "# keyless-edge configuration (written by keyless-certs init)\n\
         [listen]\n\
         https = \"127.0.0.1:8443\"\n\
         http = \"127.0.0.1:8080\"\n\
         admin = \"127.0.0.1:9090\"\n\
         \n\
         [keyserver]\n\
         servers = [\"localhost:{keyserver_port}\"]   # port from --keyserver-listen\n\
         ca = \"edge/keyserver-ca.crt\"\n\
         cert = \"edge/edge.crt\"\n\
         key = \"edge/edge.key\"\n"
    );
    for domain in domains {
        s.push_str(&format!(
            "\n[[site]]\n\
             domains = [\"{domain}\", \"*.{domain}\"]\n\
             origin = \"http://origin.{domain}:8000\"\n"
        ));
    }
    s
}

/// Validates a DNS host name (LDH labels, no wildcard) and lowercases it. The name
/// becomes part of file names, so this is also what keeps `/` and `..` out of paths.
pub(crate) fn parse_dns_name(s: &str) -> Result<String, String> {
    if let Some(bare) = s.strip_prefix("*.") {
        return Err(format!(
            "give the bare domain ({bare}): the *. name is added to its certificate automatically"
        ));
    }
    let name = s.to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err(format!(
            "{s:?} is not a DNS name: it must have 1 to 253 characters"
        ));
    }
    for label in name.split('.') {
        let ldh = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if label.is_empty()
            || label.len() > 63
            || !ldh
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(format!(
                "{s:?} is not a DNS name: each dot-separated label needs 1 to 63 letters, \
                 digits or inner hyphens"
            ));
        }
    }
    Ok(name)
}

fn parse_keyserver_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if addr.port() == 0 {
        return Err("the key server needs a fixed port: edge.toml names it".to_owned());
    }
    Ok(addr)
}

fn reject_duplicates(domains: &[String]) -> Result<()> {
    for (i, d) in domains.iter().enumerate() {
        if domains[..i].contains(d) {
            bail!("--domain {d} is given twice");
        }
    }
    Ok(())
}

/// Creates `dir`, or checks it is empty unless `force`.
fn prepare_dir(dir: &Path, force: bool) -> Result<()> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if !force && entries.next().is_some() {
                bail!(
                    "{} already contains files; use --force to overwrite them",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display())),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// Writes files below `root`, remembering what it wrote for the summary.
struct TreeWriter<'a> {
    root: &'a Path,
    force: bool,
    written: Vec<Written>,
}

struct Written {
    rel: String,
    what: String,
    secret: bool,
}

impl TreeWriter<'_> {
    fn dir(&self, rel: &str, mode: u32) -> Result<()> {
        let path = self.root.join(rel);
        match DirBuilder::new().mode(mode).create(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
            Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }

    fn secret(&mut self, rel: &str, contents: &str, what: &str) -> Result<()> {
        self.file(rel, contents, what, true)
    }

    fn public(&mut self, rel: &str, contents: &str, what: &str) -> Result<()> {
        self.file(rel, contents, what, false)
    }

    fn file(&mut self, rel: &str, contents: &str, what: &str, secret: bool) -> Result<()> {
        let path = self.root.join(rel);
        if self.force {
            // Replace rather than truncate: an existing file keeps its old mode on open,
            // and a private key must never inherit a permissive one.
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("replacing {}", path.display())),
            }
        }
        let mode = if secret { SECRET_MODE } else { PUBLIC_MODE };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        self.written.push(Written {
            rel: rel.to_owned(),
            what: what.to_owned(),
            secret,
        });
        Ok(())
    }
}

fn print_summary(out: &mut impl Write, args: &InitArgs, written: &[Written]) -> io::Result<()> {
    writeln!(
        out,
        "wrote a keyless loopback deployment to {}:",
        args.out.display()
    )?;
    let width = written.iter().map(|w| w.rel.len()).max().unwrap_or(0);
    for w in written {
        let mode = if w.secret { "  (0600)" } else { "" };
        writeln!(out, "  {:<width$}  {}{mode}", w.rel, w.what)?;
    }
    let dir = args.out.display();
    writeln!(out)?;
    writeln!(out, "key server config: {dir}/origin.toml")?;
    writeln!(out, "edge config:       {dir}/edge.toml")?;
    writeln!(
        out,
        "try:               curl --cacert {dir}/client/ca.pem --resolve {d}:8443:127.0.0.1 https://{d}:8443/",
        d = args.domains.first().map(String::as_str).unwrap_or("example.com")
    )?;
    writeln!(out, "keep {dir}/ca/ offline: it holds the CA private keys")?;
    Ok(())
}

#[cfg(test)]
#[path = "init_tests.rs"]
mod tests;
