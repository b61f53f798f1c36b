//! One site private key and the operations it can perform.
//!
//! Signatures over a full handshake message (our extension) are made with `ring`,
//! the fastest constant-time implementation at hand. `ring` cannot sign a bare
//! digest nor do a raw RSA private operation, which the reference protocol needs, so
//! those go through OpenSSL (libcrypto 3): its RSA private operation is constant-time
//! (`BN_FLG_CONSTTIME`, Montgomery ladder) and blinded by default, and its ECDSA uses
//! constant-time scalar multiplication. The pure-Rust `rsa` crate was not chosen: its
//! released versions carry RUSTSEC-2023-0071 (Marvin timing side channel).

use keyless_shared::{digest_for, ErrorCode, HashAlg, KeyKind, Opcode, Ski};
use openssl::md::{Md, MdRef};
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::Padding;
use openssl::sign::RsaPssSaltlen;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use zeroize::Zeroizing;

/// The algorithm family and size of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Rsa { bits: u32 },
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl Algorithm {
    pub(crate) fn name(self) -> String {
        match self {
            Algorithm::Rsa { bits } => format!("RSA-{bits}"),
            Algorithm::EcdsaP256 => "ECDSA-P256".into(),
            Algorithm::EcdsaP384 => "ECDSA-P384".into(),
            Algorithm::Ed25519 => "Ed25519".into(),
        }
    }

    /// Whether a private-key operation with this key takes microseconds, not a
    /// millisecond (everything but RSA).
    pub(crate) fn is_fast(self) -> bool {
        !matches!(self, Algorithm::Rsa { .. })
    }

    fn supports(self, kind: KeyKind) -> bool {
        matches!(
            (self, kind),
            (
                Algorithm::Rsa { .. },
                KeyKind::RsaPkcs1 | KeyKind::RsaPss | KeyKind::RsaRaw
            ) | (Algorithm::EcdsaP256 | Algorithm::EcdsaP384, KeyKind::Ecdsa)
                | (Algorithm::Ed25519, KeyKind::Ed25519)
        )
    }
}

enum RingKey {
    Rsa(RsaKeyPair),
    /// Keyed for the curve's natural hash (P-256/SHA-256, P-384/SHA-384).
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// The key-store interface of a key: its private operations, wherever the key is. A
/// key store yields keys (with their public key, name and certificates) whose
/// operations implement this: the directory store's [`FileKey`] (this process), the
/// PKCS#11 store's `TokenKey` (an HSM); a cloud KMS store would be one
/// more implementation.
pub(crate) trait PrivateOps: Send + Sync {
    /// Performs `kind` with `hash` on `payload` (a digest; the message for Ed25519; the
    /// ciphertext for the raw RSA operation). `message` is the checked whole
    /// to-be-signed message when the request carried one.
    fn perform(
        &self,
        kind: KeyKind,
        hash: Option<HashAlg>,
        payload: &[u8],
        message: Option<&[u8]>,
    ) -> OpResult;
}

/// A key read from a file: `ring` and OpenSSL in this process.
struct FileKey {
    ski: Ski,
    algorithm: Algorithm,
    ring: RingKey,
    openssl: PKey<Private>,
}

/// A loaded site private key.
///
/// Key hygiene (file keys): the file bytes, base64 text, DER and PKCS#8 it was decoded from are
/// `Zeroizing` buffers (see `keystore::read_pem_file`), and OpenSSL clears the private
/// components of `openssl` when it is freed (`BN_clear_free`, secure heap for Ed25519).
/// `ring`'s key pairs offer no way to wipe them and the workspace forbids `unsafe`, so
/// their memory is released uncleared: the process is non-dumpable and writes no core
/// files (`keyless_shared::process`), which keeps that memory from leaving the process.
pub(crate) struct SiteKey {
    pub(crate) ski: Ski,
    pub(crate) algorithm: Algorithm,
    ops: Box<dyn PrivateOps>,
}

impl std::fmt::Debug for SiteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteKey")
            .field("ski", &self.ski)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("not a readable private key: {0}")]
    Parse(String),
    #[error("unsupported key type: {0} (supported: RSA 2048-4096, ECDSA P-256/P-384, Ed25519)")]
    Unsupported(String),
}

/// What an operation failed with, as the wire reports it.
pub(crate) type OpResult = Result<Vec<u8>, ErrorCode>;

impl SiteKey {
    /// Parses a DER private key in PKCS#8, SEC1 or PKCS#1 form.
    pub(crate) fn from_der(der: &[u8]) -> Result<SiteKey, KeyError> {
        let pkey = PKey::private_key_from_der(der).map_err(|e| KeyError::Parse(e.to_string()))?;
        let algorithm = match pkey.id() {
            Id::RSA => {
                let bits = pkey.bits();
                if !(2048..=4096).contains(&bits) {
                    return Err(KeyError::Unsupported(format!("RSA-{bits}")));
                }
                Algorithm::Rsa { bits }
            }
            Id::EC => {
                let ec = pkey.ec_key().map_err(|e| KeyError::Parse(e.to_string()))?;
                match ec.group().curve_name() {
                    Some(Nid::X9_62_PRIME256V1) => Algorithm::EcdsaP256,
                    Some(Nid::SECP384R1) => Algorithm::EcdsaP384,
                    other => {
                        return Err(KeyError::Unsupported(format!(
                            "ECDSA on curve {}",
                            other.and_then(|n| n.short_name().ok()).unwrap_or("unknown")
                        )))
                    }
                }
            }
            Id::ED25519 => Algorithm::Ed25519,
            other => return Err(KeyError::Unsupported(format!("key id {}", other.as_raw()))),
        };
        let spki = pkey
            .public_key_to_der()
            .map_err(|e| KeyError::Parse(e.to_string()))?;
        let ski = Ski::from_spki_der(&spki).map_err(|e| KeyError::Parse(e.to_string()))?;
        let pkcs8 = Zeroizing::new(
            pkey.private_key_to_pkcs8()
                .map_err(|e| KeyError::Parse(e.to_string()))?,
        );
        let rng = SystemRandom::new();
        let ring_err = |e: &dyn std::fmt::Display| KeyError::Parse(format!("ring: {e}"));
        let ring = match algorithm {
            Algorithm::Rsa { .. } => {
                RingKey::Rsa(RsaKeyPair::from_pkcs8(&pkcs8).map_err(|e| ring_err(&e))?)
            }
            Algorithm::EcdsaP256 => RingKey::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
                    .map_err(|e| ring_err(&e))?,
            ),
            Algorithm::EcdsaP384 => RingKey::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P384_SHA384_ASN1_SIGNING, &pkcs8, &rng)
                    .map_err(|e| ring_err(&e))?,
            ),
            Algorithm::Ed25519 => RingKey::Ed25519(
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).map_err(|e| ring_err(&e))?,
            ),
        };
        Ok(SiteKey {
            ski,
            algorithm,
            ops: Box::new(FileKey {
                ski,
                algorithm,
                ring,
                openssl: pkey,
            }),
        })
    }

    /// A key held elsewhere (a token): `ops` performs its operations.
    pub(crate) fn held(ski: Ski, algorithm: Algorithm, ops: Box<dyn PrivateOps>) -> SiteKey {
        SiteKey {
            ski,
            algorithm,
            ops,
        }
    }

    /// Checks that `opcode` suits this key and `payload` its length, before queueing.
    pub(crate) fn precheck(&self, opcode: Opcode, payload: &[u8]) -> Result<(), ErrorCode> {
        let (kind, hash) = opcode.key_op().ok_or(ErrorCode::BadOpcode)?;
        if !self.algorithm.supports(kind) {
            return Err(ErrorCode::BadOpcode);
        }
        match (kind, hash) {
            (KeyKind::RsaRaw, _) => {
                let Algorithm::Rsa { bits } = self.algorithm else {
                    return Err(ErrorCode::BadOpcode);
                };
                if payload.len() != (bits as usize).div_ceil(8) {
                    return Err(ErrorCode::Format);
                }
            }
            (_, Some(h)) if payload.len() != h.len() => return Err(ErrorCode::Format),
            (KeyKind::Ed25519, _) if payload.is_empty() => return Err(ErrorCode::Format),
            _ => {}
        }
        Ok(())
    }

    /// Performs `opcode`. `message` is the checked full to-be-signed message, when
    /// the request carried one: signing it with `ring` is faster than OpenSSL.
    pub(crate) fn perform(
        &self,
        opcode: Opcode,
        payload: &[u8],
        message: Option<&[u8]>,
    ) -> OpResult {
        self.precheck(opcode, payload)?;
        let (kind, hash) = opcode.key_op().ok_or(ErrorCode::BadOpcode)?;
        self.ops.perform(kind, hash, payload, message)
    }
}

impl PrivateOps for FileKey {
    fn perform(
        &self,
        kind: KeyKind,
        hash: Option<HashAlg>,
        payload: &[u8],
        message: Option<&[u8]>,
    ) -> OpResult {
        if let Some(out) = self.ring_sign(kind, hash, payload, message) {
            return out;
        }
        match kind {
            KeyKind::RsaRaw => rsa_raw(&self.openssl, payload),
            KeyKind::Ed25519 => Err(ErrorCode::Internal), // always handled by ring
            _ => self.openssl_sign(kind, hash, payload),
        }
    }
}

impl FileKey {
    fn ring_sign(
        &self,
        kind: KeyKind,
        hash: Option<HashAlg>,
        payload: &[u8],
        message: Option<&[u8]>,
    ) -> Option<OpResult> {
        let rng = SystemRandom::new();
        let crypto = |_| ErrorCode::Crypto;
        match (&self.ring, kind, hash) {
            (RingKey::Ed25519(k), KeyKind::Ed25519, _) => {
                Some(Ok(k.sign(payload).as_ref().to_vec()))
            }
            (RingKey::Ecdsa(k), KeyKind::Ecdsa, Some(h)) => {
                let natural = match self.algorithm {
                    Algorithm::EcdsaP256 => HashAlg::Sha256,
                    _ => HashAlg::Sha384,
                };
                let m = message.filter(|m| h == natural && digest_matches(h, payload, m))?;
                Some(k.sign(&rng, m).map(|s| s.as_ref().to_vec()).map_err(crypto))
            }
            (RingKey::Rsa(k), KeyKind::RsaPkcs1 | KeyKind::RsaPss, Some(h)) => {
                let pss = kind == KeyKind::RsaPss;
                let alg: &'static dyn sig::RsaEncoding = match (pss, h) {
                    (false, HashAlg::Sha256) => &sig::RSA_PKCS1_SHA256,
                    (false, HashAlg::Sha384) => &sig::RSA_PKCS1_SHA384,
                    (false, HashAlg::Sha512) => &sig::RSA_PKCS1_SHA512,
                    (true, HashAlg::Sha256) => &sig::RSA_PSS_SHA256,
                    (true, HashAlg::Sha384) => &sig::RSA_PSS_SHA384,
                    (true, HashAlg::Sha512) => &sig::RSA_PSS_SHA512,
                    _ => return None,
                };
                let m = message.filter(|m| digest_matches(h, payload, m))?;
                let mut out = vec![0u8; k.public().modulus_len()];
                Some(k.sign(alg, &rng, m, &mut out).map(|()| out).map_err(crypto))
            }
            _ => None,
        }
    }

    fn openssl_sign(&self, kind: KeyKind, hash: Option<HashAlg>, digest: &[u8]) -> OpResult {
        let fail = |e: openssl::error::ErrorStack| {
            tracing::warn!(ski = %self.ski, error = %e, "signing failed");
            ErrorCode::Crypto
        };
        let mut ctx = PkeyCtx::new(&self.openssl).map_err(fail)?;
        ctx.sign_init().map_err(fail)?;
        let md = match hash {
            Some(h) => Some(message_digest(h).ok_or(ErrorCode::BadOpcode)?),
            None => None,
        };
        match kind {
            KeyKind::RsaPkcs1 => {
                ctx.set_rsa_padding(Padding::PKCS1).map_err(fail)?;
                if let Some(md) = md {
                    ctx.set_signature_md(md).map_err(fail)?;
                }
            }
            KeyKind::RsaPss => {
                let md = md.ok_or(ErrorCode::BadOpcode)?;
                ctx.set_rsa_padding(Padding::PKCS1_PSS).map_err(fail)?;
                ctx.set_signature_md(md).map_err(fail)?;
                ctx.set_rsa_mgf1_md(md).map_err(fail)?;
                ctx.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)
                    .map_err(fail)?;
            }
            // ECDSA signs the digest as given (truncated to the order's size).
            KeyKind::Ecdsa => {}
            _ => return Err(ErrorCode::BadOpcode),
        }
        let mut out = Vec::new();
        ctx.sign_to_vec(digest, &mut out).map_err(fail)?;
        Ok(out)
    }
}

fn rsa_raw(key: &PKey<Private>, ciphertext: &[u8]) -> OpResult {
    let rsa = key.rsa().map_err(|_| ErrorCode::BadOpcode)?;
    let mut out = vec![0u8; rsa.size() as usize];
    // Raw private operation: the caller (the edge's TLS stack) checks the padding,
    // so no padding oracle lives here. A ciphertext ≥ the modulus is refused.
    let n = rsa
        .private_decrypt(ciphertext, &mut out, Padding::NONE)
        .map_err(|_| ErrorCode::Crypto)?;
    out.truncate(n);
    Ok(out)
}

fn message_digest(h: HashAlg) -> Option<&'static MdRef> {
    Some(match h {
        HashAlg::Md5Sha1 => return Md::from_nid(Nid::MD5_SHA1),
        HashAlg::Sha1 => Md::sha1(),
        HashAlg::Sha224 => Md::sha224(),
        HashAlg::Sha256 => Md::sha256(),
        HashAlg::Sha384 => Md::sha384(),
        HashAlg::Sha512 => Md::sha512(),
    })
}

fn digest_matches(h: HashAlg, digest: &[u8], message: &[u8]) -> bool {
    digest_for(h, message).is_some_and(|d| d.as_ref() == digest)
}
