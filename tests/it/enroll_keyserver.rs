//! The key server's side of edge enrollment (`shared/ENROLL.md`): tokens, the
//! enrollment API and each of its refusals, group confinement on the Keyless listener,
//! renewal, revocation, and reload of the key server's certificate from disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keyless_shared::enroll::{base64url_encode, Token, SECRET_LEN};
use keyless_shared::{ErrorCode, KeyPreference, Opcode, Operation};
use keyless_tests::enroll::{create_token, origin_admin, replace_file, Attempt, TestCa};
use keyless_tests::keys::KeyAlg;
use keyless_tests::{
    check_config, has_field, ClientError, ClientOptions, Deployment, EnrollClient, KeyClient,
    KeyServer, Signal, Tamper,
};

use crate::support::{assert_ping, expect_error, handshake_sign_request, ok_payload, DOMAIN};

const LOG_WAIT: Duration = Duration::from_secs(15);

/// A key server of a deployment made with `--enroll`, its config variant and a client
/// of its enrollment API.
struct Setup {
    d: Deployment,
    server: KeyServer,
    config: PathBuf,
    api: EnrollClient,
}

/// Starts the key server with `origin.toml` changed by `edit` (files are polled every
/// 200 ms so that tests of reloads are quick).
fn start(edit: impl FnOnce(&mut toml::Table)) -> Result<Setup> {
    let d = Deployment::init_enroll(&[DOMAIN])?;
    let config = d.write_config_variant("origin-enroll.toml", |t| {
        t.insert("tls_reload_interval".into(), "200ms".into());
        edit(t);
    })?;
    let server = KeyServer::start_with_config(&d, &config)?;
    let addr = d.enroll_addr().context("no enrollment address")?;
    let api = EnrollClient::new(addr, &d.keyserver_ca());
    Ok(Setup {
        d,
        server,
        config,
        api,
    })
}

/// The `[[group]]` table named `name` of a config.
pub(crate) fn group_mut<'a>(t: &'a mut toml::Table, name: &str) -> Option<&'a mut toml::Table> {
    t.get_mut("group")?
        .as_array_mut()?
        .iter_mut()
        .filter_map(|g| g.as_table_mut())
        .find(|g| g.get("name").and_then(|n| n.as_str()) == Some(name))
}

/// Confines group `default` to the ECDSA key of [`DOMAIN`].
fn ecdsa_only(t: &mut toml::Table) {
    if let Some(g) = group_mut(t, "default") {
        g.insert(
            "keys".into(),
            toml::Value::Array(vec![format!("{DOMAIN}-ecdsa").into()]),
        );
    }
}

impl Setup {
    fn token(&self, ttl: &str, edge_id: Option<&str>) -> Result<Token> {
        create_token(&self.config, "default", ttl, edge_id)
    }

    fn admin(&self, args: &[&str]) -> Result<String> {
        let config = self.config.to_string_lossy();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", &config]);
        let out = origin_admin(&all)?;
        ensure!(
            out.status.success(),
            "keyless-origin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn edges_json(&self) -> Result<String> {
        let path = self.d.dir().join("state/edges.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Enrolls `edge_id` with a fresh token and writes its identity.
    async fn enrolled(&self, edge_id: &str) -> Result<(PathBuf, PathBuf)> {
        let token = self.token("1h", None)?;
        let attempt = self.api.enroll(&token, edge_id, &Tamper::default()).await?;
        attempt.write_identity(&self.d.dir().join("enrolled"), edge_id)
    }

    fn client(&self, identity: &(PathBuf, PathBuf)) -> ClientOptions {
        ClientOptions::new(&self.d).identity(Some(identity.clone()))
    }
}

/// Checks that `attempt` was refused with `status` and `code`.
fn refused(attempt: &Attempt, status: u16, code: &str) -> Result<()> {
    ensure!(
        attempt.reply.status == status && attempt.code().as_deref() == Some(code),
        "expected {status} {code}, got {} {}",
        attempt.reply.status,
        attempt.reply.text()
    );
    Ok(())
}

/// Whether the connection is refused: no handshake, or closed before any answer.
pub(crate) async fn connection_refused(options: &ClientOptions) -> Result<bool> {
    match options.connect().await {
        Err(ClientError::Handshake(_)) => Ok(true),
        Err(e) => bail!("unexpected connect error: {e}"),
        Ok(mut client) => match client.ping(b"let me in").await {
            Err(e) if e.is_closed() => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => bail!("unexpected error: {e}"),
        },
    }
}

#[tokio::test]
async fn each_refusal_has_its_code_and_issues_nothing() -> Result<()> {
    let s = start(|_| {})?;
    let api = &s.api;
    let good = s.token("1h", None)?;
    let none = Tamper::default();

    // bad-request: not an EnrollRequest.
    let raw = Tamper {
        raw_body: Some(b"{\"token_id\": 1".to_vec()),
        ..Tamper::default()
    };
    refused(
        &api.enroll(&good, "e-bad-request", &raw).await?,
        400,
        "bad-request",
    )?;

    // nonce-unknown: never issued; and a nonce used by a refused request.
    let never = Tamper {
        server_nonce: Some(keyless_tests::keys::random_bytes(32)),
        ..Tamper::default()
    };
    refused(
        &api.enroll(&good, "e-nonce", &never).await?,
        401,
        "nonce-unknown",
    )?;
    let bad_mac = Tamper {
        flip_mac: true,
        ..Tamper::default()
    };
    let first = api.enroll(&good, "e-proof", &bad_mac).await?;
    refused(&first, 401, "bad-proof")?;
    let reused = Tamper {
        server_nonce: Some(first.server_nonce.clone()),
        ..Tamper::default()
    };
    refused(
        &api.enroll(&good, "e-nonce", &reused).await?,
        401,
        "nonce-unknown",
    )?;

    // token-unknown, token-revoked, token-expired, token-used.
    let unknown = Token {
        id: "0123456789abcdef".into(),
        secret: vec![7; SECRET_LEN],
    };
    refused(
        &api.enroll(&unknown, "e-unknown", &none).await?,
        401,
        "token-unknown",
    )?;
    let revoked = s.token("1h", None)?;
    let printed = s.admin(&["token", "revoke", &revoked.id])?;
    ensure!(printed.contains("revoked"), "{printed}");
    refused(
        &api.enroll(&revoked, "e-revoked", &none).await?,
        401,
        "token-revoked",
    )?;
    let short = s.token("1s", None)?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    refused(
        &api.enroll(&short, "e-expired", &none).await?,
        401,
        "token-expired",
    )?;
    let once = s.token("1h", None)?;
    api.enroll(&once, "e-first", &none).await?.response()?;
    refused(
        &api.enroll(&once, "e-second", &none).await?,
        401,
        "token-used",
    )?;

    // clock-skew: ten minutes behind (max_clock_offset is 5m).
    let late = Tamper {
        clock_offset_ms: -600_000,
        ..Tamper::default()
    };
    refused(
        &api.enroll(&good, "e-clock", &late).await?,
        401,
        "clock-skew",
    )?;

    // edge-id-mismatch: a token bound to another edge, and a CSR naming another id.
    let bound = s.token("1h", Some("e-bound"))?;
    refused(
        &api.enroll(&bound, "e-other", &none).await?,
        403,
        "edge-id-mismatch",
    )?;
    let other_csr = Tamper {
        csr_edge_id: Some("someone-else".into()),
        ..Tamper::default()
    };
    refused(
        &api.enroll(&good, "e-csr", &other_csr).await?,
        403,
        "edge-id-mismatch",
    )?;

    // bad-csr: the CSR's signature does not verify with its own key.
    let bad_sig = Tamper {
        bad_csr_signature: true,
        ..Tamper::default()
    };
    refused(&api.enroll(&good, "e-sig", &bad_sig).await?, 400, "bad-csr")?;

    // edge-revoked.
    s.admin(&["edges", "revoke", "e-gone"])?;
    refused(
        &api.enroll(&good, "e-gone", &none).await?,
        403,
        "edge-revoked",
    )?;

    // None of these used the good token: it still enrolls, once.
    let ok = api.enroll(&good, "e-ok", &none).await?.response()?;
    ensure!(ok.group == "default" && ok.edge_id == "e-ok");
    api.enroll(&bound, "e-bound", &none).await?.response()?;

    // Only the successful enrollments are recorded.
    let edges = s.edges_json()?;
    for id in ["e-first", "e-ok", "e-bound"] {
        ensure!(
            edges.contains(&format!("\"{id}\"")),
            "{id} missing:\n{edges}"
        );
    }
    for id in [
        "e-bad-request",
        "e-nonce",
        "e-proof",
        "e-unknown",
        "e-revoked",
        "e-expired",
        "e-second",
        "e-clock",
        "e-other",
        "e-csr",
        "e-sig",
        "e-gone",
    ] {
        ensure!(
            !edges.contains(&format!("\"{id}\"")),
            "{id} recorded:\n{edges}"
        );
    }
    // Every refusal is audited with its code, and counted.
    let log = s.server.log();
    let metrics = s.server.metrics_text()?;
    for code in [
        "bad-request",
        "nonce-unknown",
        "token-unknown",
        "token-revoked",
        "token-expired",
        "token-used",
        "bad-proof",
        "clock-skew",
        "edge-id-mismatch",
        "bad-csr",
        "edge-revoked",
    ] {
        ensure!(
            log.lines().any(|l| l.contains("audit")
                && l.contains("enrollment refused")
                && has_field(l, "result", code)),
            "no audit line for {code}:\n{log}"
        );
        ensure!(
            metrics.contains(&format!(
                "keyless_enrollments_total{{op=\"enroll\",result=\"{code}\"}}"
            )),
            "no metric for {code}:\n{metrics}"
        );
    }
    ensure!(log
        .lines()
        .any(|l| l.contains("edge certificate issued") && has_field(l, "edge_id", "e-ok")));
    s.server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn a_token_is_single_use_across_a_restart() -> Result<()> {
    let mut s = start(|_| {})?;
    // Created after the key server started: it sees it.
    let token = s.token("1h", None)?;
    s.api
        .enroll(&token, "e-restart", &Tamper::default())
        .await?
        .response()?;
    s.server.signal(Signal::Term)?;
    s.server.wait_exit(Duration::from_secs(20))?;
    let server = s.server.restart()?;
    refused(
        &s.api
            .enroll(&token, "e-restart-2", &Tamper::default())
            .await?,
        401,
        "token-used",
    )?;
    server.assert_no_panic();
    s.server = server;
    Ok(())
}

#[tokio::test]
async fn token_list_never_prints_a_secret() -> Result<()> {
    let s = start(|_| {})?;
    let bound = s.token("1h", Some("e-list"))?;
    let free = s.token("30m", None)?;
    let config = s.config.to_string_lossy().into_owned();
    let out = origin_admin(&["token", "list", "--config", &config])?;
    ensure!(out.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = std::fs::read_to_string(s.d.dir().join("state/tokens.json"))?;
    for token in [&bound, &free] {
        ensure!(
            printed.contains(&token.id),
            "{} not listed:\n{printed}",
            token.id
        );
        let secret = base64url_encode(&token.secret);
        ensure!(!printed.contains(&secret), "token list printed a secret");
        ensure!(!stored.contains(&secret), "tokens.json holds a secret");
        ensure!(stored.contains(&token.secret_hash()));
    }
    ensure!(
        printed.contains("e-list") && printed.contains("active"),
        "{printed}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.d.dir().join("state/tokens.json"))?
        .permissions()
        .mode();
    ensure!(mode & 0o777 == 0o600, "tokens.json mode {mode:o}");
    let dir_mode = std::fs::metadata(s.d.dir().join("state"))?
        .permissions()
        .mode();
    ensure!(dir_mode & 0o777 == 0o700, "state dir mode {dir_mode:o}");
    // A group that does not exist gets no token.
    let out = origin_admin(&[
        "token", "create", "--config", &config, "--group", "nope", "--ttl", "1h",
    ])?;
    ensure!(!out.status.success() && out.stdout.is_empty());
    Ok(())
}

#[tokio::test]
async fn an_enrolled_edge_uses_the_keys_of_its_group_only() -> Result<()> {
    let s = start(ecdsa_only)?;
    let identity = s.enrolled("e-keys").await?;
    let mut client = s.client(&identity).connect().await?;
    let ecdsa = s.d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = s.d.site_key(DOMAIN, KeyAlg::Rsa)?;
    let (op, payload) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
    let sig = ok_payload(&client.call(op).await?)?;
    ensure!(ecdsa.verify(Opcode::EcdsaSignSha256, &payload, &sig)?);
    let (op, _) = handshake_sign_request(Opcode::RsaPssSignSha256, rsa.ski)?;
    expect_error(&client.call(op).await?, ErrorCode::NotInGroup)?;
    s.server.wait_for_log(LOG_WAIT, |l| {
        l.contains("audit")
            && has_field(l, "result", "not-in-group")
            && has_field(l, "group", "default")
            && has_field(l, "client", "e-keys")
            && has_field(l, "key", &format!("{DOMAIN}-rsa"))
    })?;
    // Certificate chains: the RSA one only is outside the group.
    let mut chain = Operation::new(
        Opcode::GetCertificateChain,
        vec![KeyPreference::Rsa.to_u8()],
    );
    chain.sni = Some(DOMAIN.into());
    expect_error(&client.call(chain).await?, ErrorCode::NotInGroup)?;
    let mut chain = Operation::new(Opcode::GetCertificateChain, Vec::new());
    chain.sni = Some(DOMAIN.into());
    ok_payload(&client.call(chain).await?)?;
    // The edge of the implicit group ([tls] client_ca) still uses every key.
    let mut edge = KeyClient::connect(&s.d).await?;
    let (op, _) = handshake_sign_request(Opcode::RsaPssSignSha256, rsa.ski)?;
    ok_payload(&edge.call(op).await?)?;
    // The group's CA certificates.
    let cacerts = s.api.cacerts("default").await?;
    ensure!(cacerts.status == 200);
    ensure!(cacerts.text() == std::fs::read_to_string(s.d.dir().join("origin/edge-ca.crt"))?);
    ensure!(s.api.cacerts("nope").await?.status == 404);
    s.server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn renewal_needs_the_current_certificate() -> Result<()> {
    let s = start(|_| {})?;
    let identity = s.enrolled("e-renew").await?;
    let before = s.edges_json()?;
    let none = Tamper::default();

    let renewed = s.api.reenroll(Some(&identity), "e-renew", &none).await?;
    let response = renewed.response()?;
    ensure!(response.edge_id == "e-renew" && response.group == "default");
    ensure!(response.certificate != std::fs::read_to_string(&identity.0)?);
    let new_identity = renewed.write_identity(&s.d.dir().join("renewed"), "e-renew")?;
    assert_ping(&mut s.client(&new_identity).connect().await?).await?;
    let after = s.edges_json()?;
    ensure!(before != after, "edges.json not updated by the renewal");

    refused(
        &s.api.reenroll(None, "e-renew", &none).await?,
        401,
        "no-client-certificate",
    )?;
    let other = Tamper {
        csr_edge_id: Some("e-other".into()),
        ..Tamper::default()
    };
    refused(
        &s.api
            .reenroll(Some(&new_identity), "e-renew", &other)
            .await?,
        403,
        "edge-id-mismatch",
    )?;
    let bad_sig = Tamper {
        bad_csr_signature: true,
        ..Tamper::default()
    };
    refused(
        &s.api
            .reenroll(Some(&new_identity), "e-renew", &bad_sig)
            .await?,
        400,
        "bad-csr",
    )?;
    // A certificate without a group cannot renew: the listener refuses it.
    let implicit = s.d.edge_identity();
    ensure!(s
        .api
        .reenroll(Some(&implicit), "edge-1", &none)
        .await
        .is_err());
    s.server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn a_revoked_edge_is_refused_at_its_next_connection() -> Result<()> {
    let s = start(|_| {})?;
    let identity = s.enrolled("e-revoke").await?;
    let options = s.client(&identity);
    let mut open = options.connect().await?;
    assert_ping(&mut open).await?;

    let printed = s.admin(&["edges", "revoke", "e-revoke"])?;
    ensure!(printed.contains("revoked"), "{printed}");
    // The open connection is closed when the list is re-read (file change)...
    ensure!(
        open.expect_closed().await.is_ok(),
        "the revoked edge's connection stayed open"
    );
    s.server
        .wait_for_log(LOG_WAIT, |l| l.contains("no longer accepted after reload"))?;
    // ...new ones are refused, and so is renewal.
    ensure!(
        connection_refused(&options).await?,
        "a revoked edge was served"
    );
    refused(
        &s.api
            .reenroll(Some(&identity), "e-revoke", &Tamper::default())
            .await?,
        403,
        "edge-revoked",
    )?;
    let listed = s.admin(&["edges", "list"])?;
    ensure!(
        listed
            .lines()
            .any(|l| l.contains("e-revoke") && l.contains("revoked")),
        "{listed}"
    );
    // Other edges are untouched.
    assert_ping(&mut KeyClient::connect(&s.d).await?).await?;
    s.server.assert_no_panic();
    Ok(())
}

/// Adds group `other` with a CA of its own (no key: it checks edges only), confined
/// to keys that do not exist.
fn add_other_group(t: &mut toml::Table) {
    let mut g = toml::Table::new();
    g.insert("name".into(), "other".into());
    g.insert("ca_cert".into(), "origin/other-ca.crt".into());
    g.insert("keys".into(), toml::Value::Array(vec!["nothing-*".into()]));
    if let Some(groups) = t.get_mut("group").and_then(|g| g.as_array_mut()) {
        groups.push(toml::Value::Table(g));
    }
}

#[tokio::test]
async fn a_group_certificate_must_come_from_its_group_ca() -> Result<()> {
    let d = Deployment::init_enroll(&[DOMAIN])?;
    let other = TestCa::generate("other edge CA")?;
    std::fs::write(d.dir().join("origin/other-ca.crt"), &other.cert_pem)?;
    let config = d.write_config_variant("origin-groups.toml", add_other_group)?;
    // --test reports both groups and the pattern that matches nothing.
    let out = check_config(&config)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{text}");
    ensure!(
        text.contains("group default:") && text.contains("group other:"),
        "{text}"
    );
    ensure!(text.contains("checks edges only"), "{text}");
    ensure!(
        text.contains("WARNING: group other: key pattern \"nothing-*\" matches no loaded key"),
        "{text}"
    );
    // A group without ca_key cannot enroll: no token for it.
    let out = origin_admin(&[
        "token",
        "create",
        "--config",
        &config.to_string_lossy(),
        "--group",
        "other",
        "--ttl",
        "1h",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && out.stdout.is_empty() && err.contains("ca_key"),
        "{err}"
    );
    let server = KeyServer::start_with_config(&d, &config)?;
    let edge_ca = TestCa::load(d.dir(), "edge-ca")?;
    let dir = d.dir().join("forged");
    let uri = |g: &str| format!("keyless://group/{g}/edge/e-x");
    let options = |id: (PathBuf, PathBuf)| ClientOptions::new(&d).identity(Some(id));

    // Named group and issuing CA disagree: refused, whichever way round.
    let wrong = edge_ca.issue_client(&dir, "wrong1", "e-x", Some(&uri("other")))?;
    ensure!(
        connection_refused(&options(wrong)).await?,
        "other group via the default CA"
    );
    let wrong = other.issue_client(&dir, "wrong2", "e-x", Some(&uri("default")))?;
    ensure!(
        connection_refused(&options(wrong)).await?,
        "default group via another CA"
    );
    let unknown = edge_ca.issue_client(&dir, "wrong3", "e-x", Some(&uri("nope")))?;
    ensure!(
        connection_refused(&options(unknown)).await?,
        "an unknown group"
    );
    server.wait_for_log(LOG_WAIT, |l| {
        l.contains("does not verify against the group's CA")
    })?;

    // The right CA: served, with the group's (no) keys.
    let right = other.issue_client(&dir, "right", "e-x", Some(&uri("other")))?;
    let mut client = options(right).connect().await?;
    assert_ping(&mut client).await?;
    let ecdsa = d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let (op, _) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
    expect_error(&client.call(op).await?, ErrorCode::NotInGroup)?;
    server.assert_no_panic();
    Ok(())
}

/// Waits until a new connection is served with the certificate `der`.
async fn wait_for_server_cert(d: &Deployment, der: &[u8]) -> Result<KeyClient> {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let client = KeyClient::connect(d).await?;
        if client.server_certificate() == Some(der) {
            return Ok(client);
        }
        if Instant::now() >= deadline {
            bail!("new connections still see the old key-server certificate");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pem_der(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    Ok(
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())?
            .as_ref()
            .to_vec(),
    )
}

fn replace_identity(dir: &Path, cert: &str, key: &str) -> Result<()> {
    // Key first, then the certificate: in between the pair does not match, and the key
    // server keeps its current identity until the certificate follows.
    replace_file(&dir.join("origin/keyserver.key"), key)?;
    replace_file(&dir.join("origin/keyserver.crt"), cert)
}

#[tokio::test]
async fn key_server_certificate_replaced_on_disk_is_used_without_dropping_connections() -> Result<()>
{
    let s = start(|_| {})?;
    let mut open = KeyClient::connect(&s.d).await?;
    let old = open
        .server_certificate()
        .context("no server certificate")?
        .to_vec();
    let ca = TestCa::load(s.d.dir(), "keyserver-ca")?;
    let (cert, key) = ca.issue(&["localhost"], None, true)?;
    let new = pem_der(&cert)?;
    ensure!(new != old);
    replace_identity(s.d.dir(), &cert, &key)?;
    s.server.wait_for_log(LOG_WAIT, |l| {
        l.contains("files changed: TLS configuration reloaded")
    })?;
    let mut fresh = wait_for_server_cert(&s.d, &new).await?;
    assert_ping(&mut fresh).await?;
    // The connection from before the change is still served.
    assert_ping(&mut open).await?;
    let ecdsa = s.d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let (op, _) = handshake_sign_request(Opcode::EcdsaSignSha256, ecdsa.ski)?;
    ok_payload(&open.call(op).await?)?;
    // The enrollment listener uses the new identity too (same CA, so it still works).
    s.api.nonce().await?;
    s.server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn bad_group_files_are_named_by_the_config_test() -> Result<()> {
    let d = Deployment::init_enroll(&[DOMAIN])?;
    for (name, field, value, expect) in [
        // The key server's own key is no key of the edge CA.
        (
            "origin-g-mismatch.toml",
            "ca_key",
            "origin/keyserver.key",
            "does not match",
        ),
        (
            "origin-g-missing.toml",
            "ca_cert",
            "origin/no-such-ca.crt",
            "no-such-ca.crt",
        ),
    ] {
        let config = d.write_config_variant(name, |t| {
            if let Some(g) = group_mut(t, "default") {
                g.insert(field.into(), value.into());
            }
        })?;
        let (ok, text) = keyless_tests::check_config_text(&config)?;
        ensure!(!ok, "{name} accepted:\n{text}");
        ensure!(text.contains(expect), "{name}: {text}");
    }
    Ok(())
}

#[tokio::test]
async fn the_edge_enrolls_and_renews_with_this_key_server() -> Result<()> {
    use keyless_edge::enroll::{enroll, renew, EnrollServer};
    let s = start(|_| {})?;
    let token = s.token("1h", Some("e-real"))?;
    let server = EnrollServer {
        addr: s
            .d
            .enroll_addr()
            .context("no enrollment address")?
            .to_string(),
        server_name: rustls::pki_types::ServerName::try_from("localhost")?,
        ca: s.d.keyserver_ca(),
    };
    let out = s.d.dir().join("real-edge");
    std::fs::create_dir_all(&out)?;
    let enrolled = enroll(&server, &token, "e-real", &out).await?;
    ensure!(enrolled.response.group == "default" && enrolled.response.edge_id == "e-real");
    let identity = (
        enrolled.credential.cert.clone(),
        enrolled.credential.key.clone(),
    );
    assert_ping(&mut s.client(&identity).connect().await?).await?;
    let renewed = renew(&server, &enrolled.credential, "e-real").await?;
    ensure!(renewed.edge_id == "e-real");
    // The token was used by the edge's enrollment.
    match enroll(&server, &token, "e-real", &out).await {
        Err(keyless_edge::enroll::EnrollFailure::Refused { code, .. }) if code == "token-used" => {}
        other => bail!("expected token-used, got {other:?}"),
    }
    s.server.assert_no_panic();
    Ok(())
}
