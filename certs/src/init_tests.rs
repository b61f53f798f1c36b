use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use keyless_shared::Ski;
use openssl::pkey::PKey;
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::pem::Pem;

use super::{edge_toml, enroll_origin_toml, origin_toml, parse_dns_name};
use crate::testutil::{run_init, TempDir};

const DOMAINS: [&str; 2] = ["example.com", "other.org"];

fn init_two_domains(tag: &str) -> Result<(TempDir, String)> {
    let dir = TempDir::new(tag);
    let printed = run_init(
        dir.path(),
        &["--domain", "example.com", "--domain", "other.org"],
    )?;
    Ok((dir, printed))
}

fn site_files(alg: &str) -> Vec<(String, String)> {
    DOMAINS
        .iter()
        .map(|d| {
            (
                format!("origin/keys/{d}-{alg}.key"),
                format!("origin/keys/{d}-{alg}.crt"),
            )
        })
        .collect()
}

fn read(dir: &Path, rel: &str) -> Result<String> {
    fs::read_to_string(dir.join(rel)).with_context(|| format!("reading {rel}"))
}

fn mode(dir: &Path, rel: &str) -> Result<u32> {
    Ok(fs::metadata(dir.join(rel))
        .with_context(|| format!("stat {rel}"))?
        .permissions()
        .mode()
        & 0o777)
}

/// The DER of the first PEM block of a file.
fn pem_der(dir: &Path, rel: &str) -> Result<Vec<u8>> {
    let data = fs::read(dir.join(rel)).with_context(|| format!("reading {rel}"))?;
    let pem = Pem::iter_from_buffer(&data)
        .next()
        .ok_or_else(|| anyhow!("{rel}: no PEM block"))??;
    Ok(pem.contents)
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)?;
    Ok(cert)
}

fn dns_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>> {
    let san = cert
        .subject_alternative_name()?
        .ok_or_else(|| anyhow!("no SAN extension"))?;
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect())
}

fn ip_sans(cert: &X509Certificate<'_>) -> Result<Vec<IpAddr>> {
    let san = cert
        .subject_alternative_name()?
        .ok_or_else(|| anyhow!("no SAN extension"))?;
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::IPAddress(b) => <[u8; 4]>::try_from(*b)
                .map(IpAddr::from)
                .ok()
                .or_else(|| <[u8; 16]>::try_from(*b).map(IpAddr::from).ok()),
            _ => None,
        })
        .collect())
}

fn ski_extension<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a [u8]> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
            _ => None,
        })
}

fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// Checks a leaf: issued and signed by `ca`, matching private key, SKI, validity.
fn check_leaf(
    dir: &Path,
    cert_rel: &str,
    key_rel: &str,
    ca_rel: &str,
    valid_days: i64,
) -> Result<()> {
    let ca_der = pem_der(dir, ca_rel)?;
    let ca = parse_cert(&ca_der)?;
    let der = pem_der(dir, cert_rel)?;
    let cert = parse_cert(&der)?;

    cert.verify_signature(Some(ca.public_key()))
        .map_err(|e| anyhow!("{cert_rel} does not verify against {ca_rel}: {e}"))?;
    ensure!(
        cert.issuer() == ca.subject(),
        "{cert_rel}: issuer is not {ca_rel}"
    );
    ensure!(!cert.is_ca(), "{cert_rel} is a CA");

    // The private key on disk belongs to the certificate.
    let key = PKey::private_key_from_pem(read(dir, key_rel)?.as_bytes())?;
    ensure!(
        key.public_key_to_der()? == cert.public_key().raw,
        "{key_rel} does not match {cert_rel}"
    );

    let ski = Ski::from_spki_der(cert.public_key().raw).map_err(|e| anyhow!("{e}"))?;
    ensure!(
        ski_extension(&cert) == Some(ski.0.as_slice()),
        "{cert_rel}: SKI extension is not the protocol SKI"
    );

    let now = OffsetDateTime::now_utc();
    let nb = cert.validity().not_before.to_datetime();
    let na = cert.validity().not_after.to_datetime();
    ensure!(
        nb <= now - Duration::minutes(59),
        "{cert_rel}: not backdated"
    );
    ensure!(
        nb >= now - Duration::minutes(70),
        "{cert_rel}: backdated too far"
    );
    let expected = now + Duration::days(valid_days);
    ensure!(
        (na - expected).abs() < Duration::minutes(10),
        "{cert_rel}: not after {na} is not {valid_days} days away"
    );
    Ok(())
}

#[test]
fn writes_the_whole_layout_with_private_keys_0600() -> Result<()> {
    let (dir, printed) = init_two_domains("layout")?;
    let dir = dir.path();

    let mut secrets = vec![
        "ca/site-ca.key".to_owned(),
        "ca/keyserver-ca.key".to_owned(),
        "ca/edge-ca.key".to_owned(),
        "origin/keyserver.key".to_owned(),
        "edge/edge.key".to_owned(),
    ];
    let mut public = vec![
        "ca/site-ca.crt".to_owned(),
        "ca/keyserver-ca.crt".to_owned(),
        "ca/edge-ca.crt".to_owned(),
        "client/ca.pem".to_owned(),
        "origin/keyserver.crt".to_owned(),
        "origin/edge-ca.crt".to_owned(),
        "edge/edge.crt".to_owned(),
        "edge/keyserver-ca.crt".to_owned(),
        "origin.toml".to_owned(),
        "edge.toml".to_owned(),
    ];
    for alg in ["ecdsa", "rsa"] {
        for (key, crt) in site_files(alg) {
            secrets.push(key);
            public.push(crt);
        }
    }
    for rel in &secrets {
        ensure!(mode(dir, rel)? == 0o600, "{rel} is not 0600");
        ensure!(
            printed.contains(rel.as_str()),
            "summary does not list {rel}"
        );
    }
    for rel in &public {
        ensure!(mode(dir, rel)? == 0o644, "{rel} is not 0644");
        ensure!(
            printed.contains(rel.as_str()),
            "summary does not list {rel}"
        );
    }
    ensure!(
        !printed.contains("PRIVATE KEY"),
        "summary prints key material"
    );

    // Exactly these files: nothing stray for the key server to pick up.
    let mut on_disk = Vec::new();
    for sub in ["", "ca", "client", "origin", "origin/keys", "edge"] {
        for entry in fs::read_dir(dir.join(sub))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                let name = entry.file_name().to_string_lossy().into_owned();
                on_disk.push(if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                });
            }
        }
    }
    on_disk.sort();
    let mut expected: Vec<String> = secrets.into_iter().chain(public).collect();
    expected.sort();
    assert_eq!(on_disk, expected);

    // The client trusts the site CA.
    ensure!(read(dir, "client/ca.pem")? == read(dir, "ca/site-ca.crt")?);
    ensure!(read(dir, "origin/edge-ca.crt")? == read(dir, "ca/edge-ca.crt")?);
    ensure!(read(dir, "edge/keyserver-ca.crt")? == read(dir, "ca/keyserver-ca.crt")?);
    Ok(())
}

#[test]
fn every_certificate_verifies_against_its_ca() -> Result<()> {
    let (dir, _) = init_two_domains("verify")?;
    let dir = dir.path();

    let mut serials = Vec::new();
    let mut names = Vec::new();
    for (name, cn) in [
        ("site-ca", "keyless site CA"),
        ("keyserver-ca", "keyless key-server CA"),
        ("edge-ca", "keyless edge CA"),
    ] {
        let rel = format!("ca/{name}.crt");
        let der = pem_der(dir, &rel)?;
        let ca = parse_cert(&der)?;
        ca.verify_signature(None)
            .map_err(|e| anyhow!("{rel} is not self-signed: {e}"))?;
        ensure!(common_name(&ca).as_deref() == Some(cn), "{rel}: CN");
        ensure!(ca.is_ca(), "{rel}: not a CA");
        let ku = ca
            .key_usage()?
            .ok_or_else(|| anyhow!("{rel}: no key usage"))?;
        ensure!(
            ku.value.key_cert_sign() && ku.value.crl_sign(),
            "{rel}: key usage"
        );
        let days = (ca.validity().not_after.to_datetime() - OffsetDateTime::now_utc()).whole_days();
        ensure!(
            (3640..=3650).contains(&days),
            "{rel}: valid for {days} days"
        );
        let ski = Ski::from_spki_der(ca.public_key().raw).map_err(|e| anyhow!("{e}"))?;
        ensure!(ski_extension(&ca) == Some(ski.0.as_slice()), "{rel}: SKI");
        let key = PKey::private_key_from_pem(read(dir, &format!("ca/{name}.key"))?.as_bytes())?;
        ensure!(
            key.public_key_to_der()? == ca.public_key().raw,
            "{rel}: key mismatch"
        );
        serials.push(ca.raw_serial().to_vec());
        names.push(ca.subject().to_string());
    }
    names.sort();
    names.dedup();
    ensure!(names.len() == 3, "CA names are not distinct");

    for alg in ["ecdsa", "rsa"] {
        for (i, (key, crt)) in site_files(alg).into_iter().enumerate() {
            check_leaf(dir, &crt, &key, "ca/site-ca.crt", 90)?;
            let der = pem_der(dir, &crt)?;
            let cert = parse_cert(&der)?;
            let domain = DOMAINS[i];
            ensure!(common_name(&cert).as_deref() == Some(domain), "{crt}: CN");
            assert_eq!(
                dns_sans(&cert)?,
                vec![domain.to_owned(), format!("*.{domain}")]
            );
            let eku = cert
                .extended_key_usage()?
                .ok_or_else(|| anyhow!("{crt}: no EKU"))?;
            ensure!(
                eku.value.server_auth && !eku.value.client_auth,
                "{crt}: EKU"
            );
            // A site certificate must not verify against another CA.
            let other = pem_der(dir, "ca/edge-ca.crt")?;
            ensure!(cert
                .verify_signature(Some(parse_cert(&other)?.public_key()))
                .is_err());
            serials.push(cert.raw_serial().to_vec());
        }
    }
    let key_alg = |rel: &str| -> Result<(openssl::pkey::Id, u32)> {
        let key = PKey::private_key_from_pem(read(dir, rel)?.as_bytes())?;
        Ok((key.id(), key.bits()))
    };
    assert_eq!(
        key_alg("origin/keys/example.com-rsa.key")?,
        (openssl::pkey::Id::RSA, 2048)
    );
    assert_eq!(
        key_alg("origin/keys/example.com-ecdsa.key")?,
        (openssl::pkey::Id::EC, 256)
    );
    for (key, _) in site_files("ecdsa").into_iter().chain(site_files("rsa")) {
        ensure!(
            read(dir, &key)?.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{key}: not PKCS#8"
        );
    }

    check_leaf(
        dir,
        "origin/keyserver.crt",
        "origin/keyserver.key",
        "ca/keyserver-ca.crt",
        90,
    )?;
    let der = pem_der(dir, "origin/keyserver.crt")?;
    let ks = parse_cert(&der)?;
    assert_eq!(dns_sans(&ks)?, vec!["localhost".to_owned()]);
    assert_eq!(
        ip_sans(&ks)?,
        vec![IpAddr::from([127, 0, 0, 1]), "::1".parse::<IpAddr>()?]
    );
    let eku = ks
        .extended_key_usage()?
        .ok_or_else(|| anyhow!("keyserver: no EKU"))?;
    ensure!(eku.value.server_auth, "keyserver: EKU");
    serials.push(ks.raw_serial().to_vec());

    check_leaf(
        dir,
        "edge/edge.crt",
        "edge/edge.key",
        "origin/edge-ca.crt",
        30,
    )?;
    let der = pem_der(dir, "edge/edge.crt")?;
    let edge = parse_cert(&der)?;
    ensure!(common_name(&edge).as_deref() == Some("edge-1"), "edge CN");
    assert_eq!(dns_sans(&edge)?, vec!["edge-1".to_owned()]);
    let eku = edge
        .extended_key_usage()?
        .ok_or_else(|| anyhow!("edge: no EKU"))?;
    ensure!(eku.value.client_auth && !eku.value.server_auth, "edge: EKU");
    serials.push(edge.raw_serial().to_vec());

    let n = serials.len();
    serials.sort();
    serials.dedup();
    ensure!(serials.len() == n, "serial numbers repeat");
    Ok(())
}

#[test]
fn no_site_key_outside_the_key_server_keys_dir() -> Result<()> {
    let (dir, _) = init_two_domains("nokeys")?;
    let dir = dir.path();

    let mut site_keys = Vec::new();
    for (key, _) in site_files("ecdsa").into_iter().chain(site_files("rsa")) {
        let pem = read(dir, &key)?;
        // Any base64 line of the key body gives the key away (or a large part of it).
        let body: Vec<String> = pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 40)
            .map(str::to_owned)
            .collect();
        ensure!(!body.is_empty());
        site_keys.push((key, pem, body));
    }

    for sub in ["edge", "client", "ca", "origin"] {
        for entry in fs::read_dir(dir.join(sub))? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let text = fs::read_to_string(entry.path())?;
            for (key, pem, body) in &site_keys {
                let path = entry.path();
                ensure!(
                    !text.contains(pem.as_str()),
                    "{} holds {key}",
                    path.display()
                );
                for l in body {
                    ensure!(
                        !text.contains(l.as_str()),
                        "{} holds part of {key}",
                        path.display()
                    );
                }
            }
        }
    }
    for rel in ["edge.toml", "origin.toml"] {
        ensure!(
            !read(dir, rel)?.contains("PRIVATE KEY"),
            "{rel} holds a key"
        );
    }
    Ok(())
}

#[test]
fn configs_parse_and_point_at_the_written_files() -> Result<()> {
    let dir = TempDir::new("configs");
    run_init(
        dir.path(),
        &[
            "--domain",
            "Example.COM",
            "--keyserver-listen",
            "127.0.0.1:3407",
            "--metrics-listen",
            "127.0.0.1:3406",
            "--edge-name",
            "edge-7",
        ],
    )?;
    let dir = dir.path();

    let origin: toml::Table = read(dir, "origin.toml")?.parse()?;
    ensure!(origin["listen"].as_str() == Some("127.0.0.1:3407"));
    ensure!(origin["metrics_listen"].as_str() == Some("127.0.0.1:3406"));
    // Secure by default: the strict signing policy, SAN identities, open ACL for
    // unlisted keys.
    ensure!(origin["require_handshake_context"].as_bool() == Some(true));
    ensure!(origin["tls"]["identity"].as_str() == Some("san"));
    ensure!(origin["keys"]["default_acl"].as_str() == Some("allow"));
    ensure!(origin["keys"].get("policy").is_none());
    for path in [
        &origin["tls"]["cert"],
        &origin["tls"]["key"],
        &origin["tls"]["client_ca"],
    ] {
        let rel = path.as_str().ok_or_else(|| anyhow!("not a string"))?;
        ensure!(dir.join(rel).is_file(), "origin.toml names missing {rel}");
    }
    let keys = origin["keys"]["dir"]
        .as_str()
        .ok_or_else(|| anyhow!("keys.dir"))?;
    ensure!(dir.join(keys).join("example.com-ecdsa.key").is_file());

    let edge: toml::Table = read(dir, "edge.toml")?.parse()?;
    let servers = edge["keyserver"]["servers"]
        .as_array()
        .ok_or_else(|| anyhow!("servers"))?;
    ensure!(servers.len() == 1 && servers[0].as_str() == Some("localhost:3407"));
    for key in ["ca", "cert", "key"] {
        let rel = edge["keyserver"][key]
            .as_str()
            .ok_or_else(|| anyhow!("keyserver.{key}"))?;
        ensure!(
            rel.starts_with("edge/") && dir.join(rel).is_file(),
            "edge.toml: {rel}"
        );
    }
    let sites = edge["site"].as_array().ok_or_else(|| anyhow!("site"))?;
    ensure!(sites.len() == 1);
    let domains: Vec<&str> = sites[0]["domains"]
        .as_array()
        .ok_or_else(|| anyhow!("domains"))?
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    assert_eq!(domains, ["example.com", "*.example.com"]);
    ensure!(sites[0]["origin"].as_str() == Some("http://origin.example.com:8000"));

    let der = pem_der(dir, "edge/edge.crt")?;
    ensure!(common_name(&parse_cert(&der)?).as_deref() == Some("edge-7"));
    // The key server names edges by their first DNS SAN.
    ensure!(dns_sans(&parse_cert(&der)?)? == ["edge-7"]);
    Ok(())
}

#[test]
fn default_origin_toml_is_exactly_the_documented_one() -> Result<()> {
    let expected = r#"# keyless-origin configuration (written by keyless-certs init)
listen = "127.0.0.1:2407"          # from --keyserver-listen
metrics_listen = "127.0.0.1:2406"  # from --metrics-listen
# Refuse signatures unless the request carries the whole TLS handshake message
# (false serves reference Keyless clients that send bare digests; logged as a risk).
require_handshake_context = true

[tls]
cert = "origin/keyserver.crt"
key = "origin/keyserver.key"
client_ca = "origin/edge-ca.crt"
# An edge is named (in [[keys.acl]]) by the first DNS SAN of its certificate.
identity = "san"
# Revoked edge certificates (keyless-certs revoke writes it; re-read on SIGHUP):
# client_crl = "origin/edge-ca.crl"
# Rotate this certificate on a schedule, signed by the key-server CA (whose key
# the key server then holds; it writes cert and key itself and reloads them):
# rotate_every = "24h"
# ca_cert = "ca/keyserver-ca.crt"
# ca_key = "ca/keyserver-ca.key"

[keys]
dir = "origin/keys"
# Keys without a [[keys.acl]] entry may be used by every edge ("allow") or none ("deny").
default_acl = "allow"
# Raw RSA decrypt (opcode 0x01) is refused unless enabled per key:
# [[keys.policy]]
# key = "example.com-rsa"
# allow_rsa_decrypt = true
"#;
    assert_eq!(
        origin_toml("127.0.0.1:2407".parse()?, "127.0.0.1:2406".parse()?),
        expected
    );

    let edge = edge_toml(2407, &["example.com".to_owned()]);
    ensure!(edge.contains("servers = [\"localhost:2407\"]"));
    ensure!(edge.contains("[[site]]\ndomains = [\"example.com\", \"*.example.com\"]\n"));
    Ok(())
}

#[test]
fn refuses_a_non_empty_directory_unless_forced() -> Result<()> {
    let dir = TempDir::new("force");
    fs::create_dir_all(dir.path().join("edge"))?;
    fs::write(dir.path().join("notes.txt"), "keep me")?;
    // A stale, world-readable key where init will write one.
    fs::write(dir.path().join("edge/edge.key"), "stale")?;
    fs::set_permissions(
        dir.path().join("edge/edge.key"),
        fs::Permissions::from_mode(0o644),
    )?;

    let err = run_init(dir.path(), &["--domain", "example.com"])
        .err()
        .ok_or_else(|| anyhow!("init wrote into a non-empty directory"))?;
    let msg = format!("{err:#}");
    ensure!(
        msg.contains(&*dir.path().to_string_lossy()) && msg.contains("--force"),
        "{msg}"
    );
    ensure!(
        !dir.path().join("ca").exists(),
        "wrote files before refusing"
    );

    run_init(dir.path(), &["--domain", "example.com", "--force"])?;
    ensure!(
        mode(dir.path(), "edge/edge.key")? == 0o600,
        "replaced key kept mode 0644"
    );
    ensure!(read(dir.path(), "edge/edge.key")?.contains("PRIVATE KEY"));
    ensure!(read(dir.path(), "notes.txt")? == "keep me");

    // An empty existing directory is fine without --force.
    let empty = TempDir::new("empty");
    fs::create_dir_all(empty.path())?;
    run_init(empty.path(), &["--domain", "example.com"])?;
    Ok(())
}

#[test]
fn rejects_bad_arguments() -> Result<()> {
    assert_eq!(parse_dns_name("Example.COM").as_deref(), Ok("example.com"));
    assert_eq!(
        parse_dns_name("a-b.c0.example").as_deref(),
        Ok("a-b.c0.example")
    );
    for bad in [
        "",
        "*.example.com",
        "../etc",
        "a/b",
        "a..b",
        "-a.com",
        "a-.com",
        "a b",
        "é.com",
    ] {
        ensure!(parse_dns_name(bad).is_err(), "{bad:?} accepted");
    }
    ensure!(parse_dns_name(&format!("{}.com", "a".repeat(64))).is_err());

    let dir = TempDir::new("badargs");
    ensure!(run_init(dir.path(), &[]).is_err(), "no --domain accepted");
    ensure!(run_init(dir.path(), &["--domain", "a.com", "--domain", "A.com"]).is_err());
    ensure!(run_init(
        dir.path(),
        &["--domain", "a.com", "--keyserver-listen", "127.0.0.1:0"]
    )
    .is_err());
    ensure!(run_init(
        dir.path(),
        &["--domain", "a.com", "--edge-name", "bad name"]
    )
    .is_err());
    ensure!(
        !dir.path().exists(),
        "bad arguments still created the directory"
    );
    Ok(())
}

#[test]
fn enroll_adds_a_default_group_with_the_edge_ca_and_its_key() -> Result<()> {
    let dir = TempDir::new("enroll");
    run_init(
        dir.path(),
        &[
            "--domain",
            "example.com",
            "--enroll",
            "--enroll-listen",
            "127.0.0.1:3408",
        ],
    )?;
    let dir = dir.path();
    let origin: toml::Table = read(dir, "origin.toml")?.parse()?;
    ensure!(origin["enroll_listen"].as_str() == Some("127.0.0.1:3408"));
    // The implicit group keeps working for the edge init made.
    ensure!(origin["tls"]["client_ca"].as_str() == Some("origin/edge-ca.crt"));
    let groups = origin["group"]
        .as_array()
        .ok_or_else(|| anyhow!("no [[group]]"))?;
    ensure!(groups.len() == 1);
    let g = &groups[0];
    ensure!(g["name"].as_str() == Some("default"));
    ensure!(g["ca_cert"].as_str() == Some("origin/edge-ca.crt"));
    ensure!(g["ca_key"].as_str() == Some("origin/edge-ca.key"));
    ensure!(mode(dir, "origin/edge-ca.key")? == 0o600);
    ensure!(read(dir, "origin/edge-ca.key")? == read(dir, "ca/edge-ca.key")?);

    // Without --enroll: no group, no CA key beside the key server, the documented file.
    let plain = TempDir::new("plain");
    run_init(plain.path(), &["--domain", "example.com"])?;
    ensure!(!plain.path().join("origin/edge-ca.key").exists());
    let origin: toml::Table = read(plain.path(), "origin.toml")?.parse()?;
    ensure!(origin.get("group").is_none() && origin.get("enroll_listen").is_none());
    // --enroll-listen alone is refused.
    let lone = TempDir::new("lone");
    ensure!(run_init(
        lone.path(),
        &[
            "--domain",
            "example.com",
            "--enroll-listen",
            "127.0.0.1:3408"
        ]
    )
    .is_err());
    let text = enroll_origin_toml(
        &origin_toml("127.0.0.1:2407".parse()?, "127.0.0.1:2406".parse()?),
        "127.0.0.1:2408".parse()?,
    );
    ensure!(text.contains("metrics_listen = \"127.0.0.1:2406\"  # from --metrics-listen\nenroll_listen = \"127.0.0.1:2408\""), "{text}");
    Ok(())
}
