//! PKCS#11 key stores with SoftHSM2: site keys imported into a token the test
//! initialises in its own directory; the key server's configuration names only the
//! token, never the key files (kept as the memory scan's needles).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keyless_shared::{ErrorCode, Opcode, Operation};
use keyless_tests::hsm::{hanging_module, SoftHsm, HANG_FILE_ENV, SOFTHSM_MODULE};
use keyless_tests::keys::{
    digest, install_key, random_bytes, KeyAlg, KeyEncoding, KeySpec, SiteKey,
};
use keyless_tests::memscan::{scan_process_memory, secret_needles, Needle};
use keyless_tests::{
    origin_bin, ClientOptions, Deployment, Edge, EdgeConfig, KeyClient, KeyServer, Signal,
    TlsVersion,
};

use crate::support::{ok_payload, DOMAIN};

/// A deployment whose site keys live only in a SoftHSM2 token: the key server reads
/// certificates from `origin/hsm-keys` and keys from the token.
struct HsmDeployment {
    d: Deployment,
    hsm: SoftHsm,
    config: PathBuf,
    /// The certificates-only keys directory.
    cert_dir: PathBuf,
}

/// A site whose only key is RSA.
const RSA_SITE: &str = "rsa.example.net";

impl HsmDeployment {
    fn new() -> Result<HsmDeployment> {
        HsmDeployment::init(Deployment::init(&[DOMAIN])?)
    }

    /// With [`RSA_SITE`] too, whose only key (RSA) is on the token as well.
    fn with_rsa_site() -> Result<HsmDeployment> {
        let d = Deployment::init(&[DOMAIN, RSA_SITE])?;
        for ext in ["key", "crt"] {
            std::fs::remove_file(d.keys_dir().join(format!("{RSA_SITE}-ecdsa.{ext}")))?;
        }
        HsmDeployment::init(d)
    }

    fn init(d: Deployment) -> Result<HsmDeployment> {
        let hsm = SoftHsm::init(&d.dir().join("hsm"), "sites")?;
        let cert_dir = d.keys_dir().with_file_name("hsm-keys");
        std::fs::create_dir_all(&cert_dir)?;
        for (i, key) in d.site_key_files()?.iter().enumerate() {
            let stem = stem(key);
            hsm.import(key, &stem, &format!("{:02x}", i + 1))?;
            let crt = key.with_extension("crt");
            std::fs::copy(&crt, cert_dir.join(format!("{stem}.crt")))
                .with_context(|| format!("copying {}", crt.display()))?;
        }
        let store = hsm.store_table();
        let config = d.write_config_variant("origin-hsm.toml", |t| {
            t.insert("require_handshake_context".into(), false.into());
            let keys = t
                .get_mut("keys")
                .and_then(|k| k.as_table_mut())
                .expect("origin.toml has [keys]");
            keys.insert("dir".into(), "origin/hsm-keys".into());
            keys.insert("store".into(), vec![toml::Value::Table(store)].into());
            let mut policy = toml::Table::new();
            policy.insert("key".into(), format!("{DOMAIN}-rsa").into());
            policy.insert("allow_rsa_decrypt".into(), true.into());
            keys.insert("policy".into(), vec![toml::Value::Table(policy)].into());
        })?;
        Ok(HsmDeployment {
            d,
            hsm,
            config,
            cert_dir,
        })
    }

    fn start(&self) -> Result<KeyServer> {
        let (k, v) = self.hsm.env();
        KeyServer::start_with_env(&self.d, &self.config, &[(k, &v)])
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Fails unless `key` answers `key-unavailable` to `signed` within `within` (its token
/// is down: answered at once, so that the edge tries another key server).
async fn unavailable_within(
    client: &mut KeyClient,
    key: &SiteKey,
    signed: &[u8],
    within: Duration,
) -> Result<()> {
    let started = std::time::Instant::now();
    let reply = client
        .sign(Opcode::EcdsaSignSha256, key.ski, signed, None)
        .await?;
    ensure!(
        reply.error_code() == Some(ErrorCode::KeyUnavailable),
        "a down token's key: {reply:?}"
    );
    ensure!(
        started.elapsed() < within,
        "a down token's key was answered after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Whether the key server reports its token up (`keyless_token_up`), if it reports one.
fn token_up(metrics: &str) -> Option<bool> {
    metrics
        .lines()
        .find(|l| l.starts_with("keyless_token_up{"))
        .map(|l| l.ends_with(" 1"))
}

/// Asks `key` (on a token that was down) to sign `signed` until it does, with a
/// signature that verifies, within `within`.
async fn signs_again_within(
    client: &mut KeyClient,
    key: &SiteKey,
    signed: &[u8],
    within: Duration,
) -> Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let reply = client
            .sign(Opcode::EcdsaSignSha256, key.ski, signed, None)
            .await?;
        if reply.opcode == Some(Opcode::Response) {
            ensure!(key.verify(Opcode::EcdsaSignSha256, signed, reply.payload())?);
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the token's key did not sign again within {within:?}: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Signs a fresh digest with every opcode `key` supports; each signature verifies
/// with the public key of its certificate.
async fn sign_all(client: &mut KeyClient, key: &SiteKey) -> Result<()> {
    for opcode in key.sign_opcodes() {
        let signed = digest(opcode, &random_bytes(100))?;
        let reply = client.sign(opcode, key.ski, &signed, None).await?;
        let sig = ok_payload(&reply).with_context(|| format!("{} {opcode}", key.stem))?;
        ensure!(
            key.verify(opcode, &signed, &sig)?,
            "{} {opcode}: the token's signature does not verify",
            key.stem
        );
    }
    Ok(())
}

#[tokio::test]
async fn keys_only_in_the_token_sign_every_op_and_200_pipelined_requests() -> Result<()> {
    let h = HsmDeployment::new()?;
    let server = h.start()?;
    let ecdsa = h.d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let rsa = h.d.site_key(DOMAIN, KeyAlg::Rsa)?;
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        let mut client = ClientOptions::new(&h.d).version(version).connect().await?;
        sign_all(&mut client, &ecdsa).await?;
        sign_all(&mut client, &rsa).await?;
    }
    // Raw RSA (allowed by policy for this key): the token decrypts.
    let mut client = KeyClient::connect(&h.d).await?;
    let mut premaster = vec![0x03, 0x03];
    premaster.extend(random_bytes(46));
    let mut op = Operation::new(Opcode::RsaDecrypt, rsa.rsa_encrypt_pkcs1(&premaster)?);
    op.ski = Some(rsa.ski);
    let plain = ok_payload(&client.call(op).await?)?;
    ensure!(
        plain.starts_with(&[0, 2]) && plain.ends_with(&premaster),
        "raw RSA result"
    );

    // 200 requests pipelined on one connection, on several sessions at once.
    let mut ops = Vec::new();
    for i in 0..200 {
        let key = if i % 2 == 0 { &ecdsa } else { &rsa };
        let opcode = if i % 2 == 0 {
            Opcode::EcdsaSignSha256
        } else {
            Opcode::RsaPssSignSha256
        };
        let mut op = Operation::new(opcode, digest(opcode, format!("request {i}").as_bytes())?);
        op.ski = Some(key.ski);
        ops.push(op);
    }
    let (ids, replies) = client.pipeline(ops.clone()).await?;
    ensure!(replies.len() == 200, "{} replies", replies.len());
    for (i, (id, request)) in ids.iter().zip(&ops).enumerate() {
        let reply = replies
            .iter()
            .find(|r| r.id == *id)
            .with_context(|| format!("no reply to request {i}"))?;
        let key = if i % 2 == 0 { &ecdsa } else { &rsa };
        let opcode = request.opcode.context("request opcode")?;
        ensure!(
            key.verify(opcode, request.payload(), &ok_payload(&reply.op)?)?,
            "request {i}: signature does not verify"
        );
    }
    let threads = token_threads(server.pid())?;
    ensure!(
        threads >= 2,
        "the token's operations ran on {threads} thread(s)"
    );
    server.assert_no_panic();
    Ok(())
}

/// Worker threads of `pid` that have run token operations (named like the key
/// server's crypto threads, beyond its per-core ones: counted from /proc).
fn token_threads(pid: u32) -> Result<usize> {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("keyless-token") {
            n += 1;
        }
    }
    Ok(n)
}

#[test]
fn an_edge_completes_tls_13_and_12_handshakes_with_token_keys() -> Result<()> {
    let h = HsmDeployment::with_rsa_site()?;
    let server = h.start()?;
    // No origin behind the sites (a handshake test): HTTP answers are 502s.
    let config = EdgeConfig::new(&h.d)?
        .site(&[DOMAIN], "http://127.0.0.1:9")
        .site(&[RSA_SITE], "http://127.0.0.1:9");
    let edge = Edge::start_with(&h.d, &config)?;
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        // curl to the RSA-only site: the token's RSA key signs.
        let out = edge
            .curl(RSA_SITE)
            .tls(version)
            .get(&edge.url(RSA_SITE, "/"))?;
        ensure!(
            out.status != 0,
            "curl to {RSA_SITE} over {version:?} got no response: {}",
            out.stderr
        );
        let out = edge.curl(DOMAIN).tls(version).get(&edge.url(DOMAIN, "/"))?;
        ensure!(
            out.status != 0,
            "curl over {version:?} got no response: {}",
            out.stderr
        );
        // RSA: a client that offers only RSA-PSS signatures.
        let rsa = edge
            .s_client(DOMAIN)
            .tls(version)
            .sigalgs("rsa_pss_rsae_sha256:RSA+SHA256")
            .run()?;
        rsa.expect_verified()
            .with_context(|| format!("RSA handshake over {version:?}"))?;
    }
    let ops = server.metrics_text()?;
    let signed = |opcode: &str| {
        ops.lines().any(|l| {
            l.starts_with("keyless_ops_total") && l.contains(opcode) && l.contains("result=\"ok\"")
        })
    };
    ensure!(
        signed("ecdsa-sign-sha256"),
        "no ECDSA signature counted:\n{ops}"
    );
    ensure!(
        signed("rsa-pss-sign-sha256"),
        "no RSA-PSS signature counted:\n{ops}"
    );
    Ok(())
}

#[test]
fn the_test_flag_lists_the_token_keys() -> Result<()> {
    let h = HsmDeployment::new()?;
    let (k, v) = h.hsm.env();
    let out = Command::new(origin_bin()?)
        .arg("--config")
        .arg(&h.config)
        .arg("--test")
        .env(k, v)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "--test failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ecdsa = h.d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    ensure!(
        text.contains("PKCS#11 token pkcs11:token=sites: 2 key(s)"),
        "{text}"
    );
    ensure!(
        text.contains(&ecdsa.ski.to_string()),
        "no SKI of the ECDSA key: {text}"
    );
    ensure!(!text.contains("246810"), "--test printed the PIN");
    Ok(())
}

/// Makes an ECDSA key for `name` in `dir/staging`, imports it into the token with
/// `CKA_ID` `id` and puts its certificate in `cert_dir`.
fn token_key(h: &HsmDeployment, name: &str, id: &str, cert_dir: &Path) -> Result<SiteKey> {
    let staging = h.d.dir().join("staging");
    std::fs::create_dir_all(&staging)?;
    let stem = format!("{name}-ecdsa");
    let key = install_key(
        &staging,
        &stem,
        KeySpec::EcP256,
        KeyEncoding::Pkcs8,
        &[name],
    )?;
    h.hsm
        .import(&staging.join(format!("{stem}.key")), &stem, id)?;
    std::fs::copy(
        staging.join(format!("{stem}.crt")),
        cert_dir.join(format!("{stem}.crt")),
    )?;
    Ok(key)
}

#[tokio::test]
async fn a_key_added_to_the_token_is_used_after_sighup() -> Result<()> {
    let h = HsmDeployment::new()?;
    let server = h.start()?;
    let added = token_key(&h, "added.test", "7f", &h.cert_dir)?;
    server.signal(Signal::Hup)?;
    server.wait_for_log(Duration::from_secs(10), |l| l.contains("keystore reloaded"))?;
    let mut client = KeyClient::connect(&h.d).await?;
    sign_all(&mut client, &added).await?;
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn token_failures_give_clean_errors_while_file_keys_keep_working() -> Result<()> {
    // File keys of the deployment's site, and one key on the token.
    let h = HsmDeployment::new()?;
    let on_token = token_key(&h, "hsm.test", "70", &h.d.keys_dir())?;
    let store = h.hsm.store_table();
    let config = h.d.write_config_variant("origin-mixed.toml", |t| {
        t.insert("require_handshake_context".into(), false.into());
        let keys = t
            .get_mut("keys")
            .and_then(|k| k.as_table_mut())
            .expect("[keys]");
        let mut uri = store.clone();
        // Only the one key: the token also holds the site's keys (imported above).
        if let Some(toml::Value::String(u)) = uri.get_mut("uri") {
            *u = u.replacen("token=sites", "token=sites;object=hsm.test-ecdsa", 1);
        }
        keys.insert("store".into(), vec![toml::Value::Table(uri)].into());
    })?;
    let (k, v) = h.hsm.env();
    let server = KeyServer::start_with_env(&h.d, &config, &[(k, &v)])?;
    let file_key = h.d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let mut client = KeyClient::connect(&h.d).await?;
    sign_all(&mut client, &on_token).await?;
    sign_all(&mut client, &file_key).await?;

    // A wrong PIN on reload: refused and said; every key keeps working.
    std::fs::write(h.hsm.pin_file(), "000000\n")?;
    server.signal(Signal::Hup)?;
    let log = server.wait_for_log(Duration::from_secs(10), |l| {
        l.contains("keystore reload failed")
    })?;
    let line = log
        .lines()
        .find(|l| l.contains("keystore reload failed"))
        .unwrap_or_default();
    ensure!(
        line.contains("PKCS#11") && line.contains("PIN"),
        "the failure does not say why: {line}"
    );
    ensure!(
        !log.contains("000000") && !log.contains("246810"),
        "the log holds a PIN"
    );
    sign_all(&mut client, &on_token).await?;
    sign_all(&mut client, &file_key).await?;

    // The token's files gone: its key answers key-unavailable at once (the edge tries
    // another key server), the token is reported down, the file keys are not affected.
    let away = h.hsm.tokens_dir().with_extension("away");
    std::fs::rename(h.hsm.tokens_dir(), &away)?;
    let started = std::time::Instant::now();
    let signed = digest(Opcode::EcdsaSignSha256, b"after the token went")?;
    unavailable_within(&mut client, &on_token, &signed, Duration::from_secs(2)).await?;
    ensure!(
        token_up(&server.metrics_text()?) == Some(false),
        "the token is not reported down"
    );
    sign_all(&mut client, &file_key).await?;
    // Still answered at once while the token is in its back-off, and still clean.
    unavailable_within(&mut client, &on_token, &signed, Duration::from_secs(2)).await?;
    // Back: after the back-off the token is opened again (SoftHSM2 needs its module
    // initialised again for that), with no restart.
    std::fs::rename(&away, h.hsm.tokens_dir())?;
    signs_again_within(&mut client, &on_token, &signed, Duration::from_secs(20)).await?;
    eprintln!("token back after {:?}", started.elapsed());
    ensure!(
        token_up(&server.metrics_text()?) == Some(true),
        "the token is not reported up again"
    );
    sign_all(&mut client, &on_token).await?;
    sign_all(&mut client, &file_key).await?;
    server.assert_no_panic();
    Ok(())
}

/// A token that stops answering without failing (its `C_Sign` hangs, as a wedged HSM's
/// would): every waiting request is answered `key-unavailable` by the queue deadline
/// plus `sign_timeout` (not never), then the token is down and its key answers at once,
/// the file keys are not affected; when the token answers again, so does its key.
#[tokio::test]
async fn a_hung_token_costs_its_requests_a_bounded_wait_and_recovers() -> Result<()> {
    let h = HsmDeployment::new()?;
    let on_token = token_key(&h, "hsm.test", "71", &h.d.keys_dir())?;
    let module = hanging_module(&h.d.dir().join("module"))?;
    let hang = h.d.dir().join("token-hangs");
    let mut store = h.hsm.store_table();
    if let Some(toml::Value::String(u)) = store.get_mut("uri") {
        *u = u
            .replacen("token=sites", "token=sites;object=hsm.test-ecdsa", 1)
            .replacen(SOFTHSM_MODULE, &module.to_string_lossy(), 1);
    }
    store.insert("sessions".into(), 2.into());
    store.insert("sign_timeout".into(), "1s".into());
    let config = h.d.write_config_variant("origin-hanging.toml", |t| {
        t.insert("require_handshake_context".into(), false.into());
        t.insert("queue_deadline".into(), "1s".into());
        let keys = t
            .get_mut("keys")
            .and_then(|k| k.as_table_mut())
            .expect("[keys]");
        keys.insert("store".into(), vec![toml::Value::Table(store)].into());
    })?;
    let (k, v) = h.hsm.env();
    let server =
        KeyServer::start_with_env(&h.d, &config, &[(k, &v), (HANG_FILE_ENV, hang.as_os_str())])?;
    let file_key = h.d.site_key(DOMAIN, KeyAlg::Ecdsa)?;
    let mut client = KeyClient::connect(&h.d).await?;
    sign_all(&mut client, &on_token).await?;

    // The token hangs: 2 requests on its 2 stuck sessions, 4 queued behind them.
    std::fs::write(&hang, b"")?;
    let signed = digest(Opcode::EcdsaSignSha256, b"while the token hangs")?;
    let ops: Vec<Operation> = (0..6)
        .map(|_| {
            let mut op = Operation::new(Opcode::EcdsaSignSha256, signed.clone());
            op.ski = Some(on_token.ski);
            op
        })
        .collect();
    let started = std::time::Instant::now();
    let (_, replies) = client.pipeline(ops).await?;
    let waited = started.elapsed();
    ensure!(replies.len() == 6, "{} replies", replies.len());
    for reply in &replies {
        ensure!(
            reply.op.error_code() == Some(ErrorCode::KeyUnavailable),
            "hung token: {:?}",
            reply.op
        );
    }
    // queue_deadline 1 s + sign_timeout 1 s, checked every 50 ms.
    ensure!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
        "answered after {waited:?}, expected about 2 s"
    );

    // Down now (its threads still stuck): answered at once; file keys unaffected.
    unavailable_within(&mut client, &on_token, &signed, Duration::from_millis(500)).await?;
    sign_all(&mut client, &file_key).await?;
    let metrics = server.metrics_text()?;
    ensure!(
        token_up(&metrics) == Some(false),
        "the hung token is not reported down"
    );
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("keyless_queue_dropped_total{reason=\"token-timeout\"}")),
        "no token-timeout counted"
    );
    server.wait_for_log(Duration::from_secs(5), |l| l.contains("the token hangs"))?;

    // The token answers again: after its back-off its key signs again, no restart.
    std::fs::remove_file(&hang)?;
    signs_again_within(&mut client, &on_token, &signed, Duration::from_secs(15)).await?;
    sign_all(&mut client, &on_token).await?;
    server.assert_no_panic();
    Ok(())
}

#[tokio::test]
async fn no_token_key_in_the_key_server_memory() -> Result<()> {
    let h = HsmDeployment::new()?;
    let server = h.start()?;
    let mut client = KeyClient::connect(&h.d).await?;
    let keys = [
        h.d.site_key(DOMAIN, KeyAlg::Ecdsa)?,
        h.d.site_key(DOMAIN, KeyAlg::Rsa)?,
    ];
    for key in &keys {
        sign_all(&mut client, key).await?;
    }
    let mut needles: Vec<Needle> = Vec::new();
    for file in h.d.site_key_files()? {
        needles.extend(secret_needles(&file)?);
    }
    // Controls: what the key server must hold, so that a blind scan fails: its own
    // TLS key and the certificates it serves.
    let own_key = h.d.dir().join("origin/keyserver.key");
    let mut controls: Vec<Needle> = secret_needles(&own_key)?
        .into_iter()
        .filter(|n| n.name.contains("Montgomery form (little-endian)"))
        .collect();
    for key in &keys {
        let leaf = key.chain.first().context("empty chain")?.clone();
        controls.push(Needle::new(
            format!("{}: leaf certificate", key.stem),
            leaf,
        )?);
    }
    ensure!(
        !controls.is_empty(),
        "no control needle for the key server's own key"
    );
    let mut all = controls.clone();
    all.extend(needles.iter().cloned());
    let scan = scan_process_memory(server.pid(), &all)?;
    for c in &controls {
        ensure!(
            scan.found(&c.name),
            "the scan missed {}: it is blind",
            c.name
        );
    }
    let leaks: Vec<_> = needles
        .iter()
        .filter(|n| scan.found(&n.name))
        .map(|n| &n.name)
        .collect();
    ensure!(
        leaks.is_empty(),
        "token key material in the key server's memory: {leaks:?}"
    );
    Ok(())
}
