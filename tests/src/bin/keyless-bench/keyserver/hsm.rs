//! `keyless-bench keyserver --store pkcs11`: the keys in a SoftHSM2 token, and the
//! reference, direct PKCS#11 signing on the same token.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use keyless_tests::hsm::{SoftHsm, SOFTHSM_MODULE, SOFTHSM_PIN};
use keyless_tests::keys::{digest, KeyAlg};
use keyless_tests::Deployment;

use super::{measure_threads, Case, Throughput};

/// The token's label.
const TOKEN: &str = "bench";

/// DigestInfo of SHA-256 (RFC 8017 §9.2), before the digest for `CKM_RSA_PKCS`.
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// Imports the deployment's site keys into a new token, points this process (and so
/// the key server it starts) at it, and writes the key server's config; its path.
pub(super) fn setup(deployment: &Deployment, sessions: usize) -> Result<PathBuf> {
    let hsm = SoftHsm::init(&deployment.dir().join("hsm"), TOKEN)?;
    let certs = deployment.keys_dir().with_file_name("hsm-keys");
    std::fs::create_dir_all(&certs)?;
    for (i, key) in deployment.site_key_files()?.iter().enumerate() {
        let stem = key
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        hsm.import(key, &stem, &format!("{:02x}", i + 1))?;
        std::fs::copy(key.with_extension("crt"), certs.join(format!("{stem}.crt")))?;
    }
    // Before any thread starts: the key server and this process's module read it.
    let (name, value) = hsm.env();
    std::env::set_var(name, value);
    let mut store = hsm.store_table();
    store.insert("sessions".into(), i64::try_from(sessions)?.into());
    deployment.write_config_variant("origin-bench-hsm.toml", |t| {
        if let Some(keys) = t.get_mut("keys").and_then(|k| k.as_table_mut()) {
            keys.insert("dir".into(), "origin/hsm-keys".into());
            keys.insert("store".into(), vec![toml::Value::Table(store)].into());
        }
    })
}

/// Direct PKCS#11 signing of the case's digests on `threads` threads, each with its
/// own session, with the mechanisms the key server uses.
pub(super) fn measure_direct(
    case: &Case,
    threads: usize,
    duration: Duration,
) -> Result<Throughput> {
    let ctx = Pkcs11::new(SOFTHSM_MODULE).context("loading SoftHSM2")?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    let slot = ctx
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == TOKEN)
        })
        .context("the benchmark token is not in SoftHSM2's slots")?;
    let pin = AuthPin::new(SOFTHSM_PIN.into());
    let inputs: Vec<Vec<u8>> = (0..256)
        .map(|_| {
            let d = digest(case.opcode, &(case.message)())?;
            Ok(match case.key.alg() {
                KeyAlg::Rsa => [&SHA256_DIGEST_INFO[..], &d].concat(),
                _ => d,
            })
        })
        .collect::<Result<_>>()?;
    let alg = case.key.alg();
    if alg == KeyAlg::Ed25519 {
        bail!("no PKCS#11 reference for Ed25519 here");
    }
    measure_threads(
        threads,
        duration,
        || {
            let session = ctx.open_ro_session(slot)?;
            match session.login(UserType::User, Some(&pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(e.into()),
            }
            let key = *session
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Label(case.key.stem.as_bytes().to_vec()),
                ])?
                .first()
                .context("the key is not on the token")?;
            // Mechanisms hold raw pointers (not Sync): one per thread.
            let mechanism = match alg {
                KeyAlg::Rsa => Mechanism::RsaPkcs,
                _ => Mechanism::Ecdsa,
            };
            Ok((session, key, mechanism))
        },
        |(session, key, mechanism), i| {
            let input = inputs.get(i % inputs.len()).map_or(&[][..], Vec::as_slice);
            session.sign(mechanism, *key, input)?;
            Ok(())
        },
    )
}
