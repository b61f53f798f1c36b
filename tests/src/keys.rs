//! Site keys as the tests see them: loading a key's certificate, generating extra keys
//! in every encoding the key store accepts, hashing per opcode and verifying the key
//! server's signatures with the certificate's public key (OpenSSL for pre-hashed
//! signatures, `ring` where the whole message is known).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keyless_shared::{HashAlg, KeyKind, Opcode, Ski, TLS13_SERVER_CONTEXT};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::{hash, MessageDigest};
use openssl::md::Md;
use openssl::nid::Nid;
use openssl::pkey::{HasPublic, Id, PKey, PKeyRef, Private, Public};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::{Padding, Rsa};
use openssl::sign::{RsaPssSaltlen, Verifier};
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName, SubjectKeyIdentifier};
use openssl::x509::{X509Builder, X509NameBuilder, X509NameRef, X509};

/// A key's signature algorithm family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlg {
    /// RSA (PKCS#1 v1.5, PSS, raw decrypt).
    Rsa,
    /// ECDSA.
    Ecdsa,
    /// Ed25519.
    Ed25519,
}

/// A key to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpec {
    /// RSA with this many bits.
    Rsa(u32),
    /// ECDSA P-256.
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// Ed25519.
    Ed25519,
}

/// How a generated private key is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyEncoding {
    /// `BEGIN PRIVATE KEY` (PKCS#8).
    Pkcs8,
    /// The algorithm's own format: `BEGIN RSA PRIVATE KEY` (PKCS#1) or
    /// `BEGIN EC PRIVATE KEY` (SEC1), as `openssl rsa -traditional` / `openssl ec` write.
    Traditional,
}

/// A site key of the key server, known to the tests by its certificate.
#[derive(Clone, Debug)]
pub struct SiteKey {
    /// File stem in the keys directory.
    pub stem: String,
    /// The private key file (the tests only read it to check nothing leaks it).
    pub key_path: PathBuf,
    /// The certificate file.
    pub cert_path: PathBuf,
    /// The certificate chain in DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's public key.
    pub public: PKey<Public>,
    /// The protocol's key identifier.
    pub ski: Ski,
    /// The contents of the leaf's SubjectPublicKey BIT STRING (what `ring` verifies with).
    pub public_key_bits: Vec<u8>,
}

impl SiteKey {
    /// Loads `DIR/<stem>.crt` (and remembers `DIR/<stem>.key`).
    pub fn load(dir: &Path, stem: &str) -> Result<SiteKey> {
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        let pem = std::fs::read(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let certs = X509::stack_from_pem(&pem)
            .with_context(|| format!("parsing {}", cert_path.display()))?;
        let leaf = certs
            .first()
            .with_context(|| format!("no certificate in {}", cert_path.display()))?;
        let chain = certs
            .iter()
            .map(|c| c.to_der())
            .collect::<Result<Vec<_>, _>>()?;
        let public = leaf.public_key()?;
        let (ski, public_key_bits) = ski_of_cert(&leaf.to_der()?)?;
        Ok(SiteKey {
            stem: stem.to_owned(),
            key_path,
            cert_path,
            chain,
            public,
            ski,
            public_key_bits,
        })
    }

    /// The key's algorithm family.
    pub fn alg(&self) -> KeyAlg {
        match self.public.id() {
            Id::RSA => KeyAlg::Rsa,
            Id::ED25519 => KeyAlg::Ed25519,
            _ => KeyAlg::Ecdsa,
        }
    }

    /// Size of the key in bits (modulus or curve).
    pub fn bits(&self) -> u32 {
        self.public.bits()
    }

    /// The sign opcodes this key supports.
    pub fn sign_opcodes(&self) -> Vec<Opcode> {
        Opcode::ALL
            .iter()
            .copied()
            .filter(|op| {
                matches!(
                    (op.key_op(), self.alg()),
                    (Some((KeyKind::RsaPkcs1 | KeyKind::RsaPss, _)), KeyAlg::Rsa)
                        | (Some((KeyKind::Ecdsa, _)), KeyAlg::Ecdsa)
                        | (Some((KeyKind::Ed25519, _)), KeyAlg::Ed25519)
                )
            })
            .collect()
    }

    /// Verifies `sig` for a sign `opcode`: `signed` is the digest sent as payload (for
    /// Ed25519: the message).
    pub fn verify(&self, opcode: Opcode, signed: &[u8], sig: &[u8]) -> Result<bool> {
        let Some((kind, hash_alg)) = opcode.key_op() else {
            bail!("{opcode} is not a sign opcode");
        };
        if kind == KeyKind::Ed25519 {
            let mut v = Verifier::new_without_digest(&self.public)?;
            return Ok(v.verify_oneshot(sig, signed)?);
        }
        let mut ctx = PkeyCtx::new(&self.public)?;
        ctx.verify_init()?;
        match kind {
            KeyKind::RsaPkcs1 => {
                ctx.set_rsa_padding(Padding::PKCS1)?;
                // MD5‖SHA-1 signatures carry no DigestInfo: leave the md unset.
                if let Some(md) = hash_alg.and_then(md_of) {
                    ctx.set_signature_md(md)?;
                }
            }
            KeyKind::RsaPss => {
                let md = hash_alg.and_then(md_of).context("PSS without a hash")?;
                ctx.set_rsa_padding(Padding::PKCS1_PSS)?;
                ctx.set_signature_md(md)?;
                ctx.set_rsa_mgf1_md(md)?;
                ctx.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
            }
            // ECDSA verifies the (truncated) digest whatever hash made it.
            KeyKind::Ecdsa => {}
            _ => bail!("{opcode} is not a sign opcode"),
        }
        // OpenSSL reports a bad signature as an error on some paths: both mean "no".
        Ok(ctx.verify(signed, sig).unwrap_or(false))
    }

    /// Verifies a signature over a whole `message` with `ring`.
    pub fn verify_message_ring(
        &self,
        alg: &'static dyn ring::signature::VerificationAlgorithm,
        message: &[u8],
        sig: &[u8],
    ) -> bool {
        ring::signature::UnparsedPublicKey::new(alg, &self.public_key_bits)
            .verify(message, sig)
            .is_ok()
    }

    /// RSA-encrypts `message` with PKCS#1 v1.5 padding under the certificate's key.
    pub fn rsa_encrypt_pkcs1(&self, message: &[u8]) -> Result<Vec<u8>> {
        let rsa = self.public.rsa().context("not an RSA key")?;
        let mut out = vec![0u8; rsa.size() as usize];
        let n = rsa.public_encrypt(message, &mut out, Padding::PKCS1)?;
        out.truncate(n);
        Ok(out)
    }

    /// The private key as PKCS#8 DER (for the bench's in-process `ring` reference).
    pub fn private_pkcs8_der(&self) -> Result<Vec<u8>> {
        let pem = std::fs::read(&self.key_path)
            .with_context(|| format!("reading {}", self.key_path.display()))?;
        let key = PKey::private_key_from_pem(&pem)
            .with_context(|| format!("parsing {}", self.key_path.display()))?;
        Ok(key.private_key_to_pkcs8()?)
    }
}

/// SKI and public key bits of a DER certificate.
pub fn ski_of_cert(der: &[u8]) -> Result<(Ski, Vec<u8>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("parsing certificate: {e}"))?;
    let bits = cert.public_key().subject_public_key.data.to_vec();
    Ok((Ski::from_public_key_bits(&bits), bits))
}

fn md_of(h: HashAlg) -> Option<&'static openssl::md::MdRef> {
    Some(match h {
        HashAlg::Md5Sha1 => return None,
        HashAlg::Sha1 => Md::sha1(),
        HashAlg::Sha224 => Md::sha224(),
        HashAlg::Sha256 => Md::sha256(),
        HashAlg::Sha384 => Md::sha384(),
        HashAlg::Sha512 => Md::sha512(),
    })
}

/// What a sign `opcode` expects as payload for `message`: its digest (MD5‖SHA-1 for the
/// legacy opcodes), or the message itself for Ed25519.
pub fn digest(opcode: Opcode, message: &[u8]) -> Result<Vec<u8>> {
    let Some((_, hash_alg)) = opcode.key_op() else {
        bail!("{opcode} is not a sign opcode");
    };
    let Some(h) = hash_alg else {
        return Ok(message.to_vec());
    };
    let one = |md| -> Result<Vec<u8>> { Ok(hash(md, message)?.to_vec()) };
    Ok(match h {
        HashAlg::Md5Sha1 => {
            let mut d = one(MessageDigest::md5())?;
            d.extend(one(MessageDigest::sha1())?);
            d
        }
        HashAlg::Sha1 => one(MessageDigest::sha1())?,
        HashAlg::Sha224 => one(MessageDigest::sha224())?,
        HashAlg::Sha256 => one(MessageDigest::sha256())?,
        HashAlg::Sha384 => one(MessageDigest::sha384())?,
        HashAlg::Sha512 => one(MessageDigest::sha512())?,
    })
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    // Failing to get randomness from OpenSSL would make every test meaningless.
    #[allow(clippy::expect_used)]
    openssl::rand::rand_bytes(&mut out).expect("OpenSSL randomness");
    out
}

/// A TLS 1.3 server CertificateVerify input: 64 × 0x20 ‖ context ‖ 0 ‖ transcript hash.
pub fn tls13_server_signed_message(transcript_hash: &[u8]) -> Vec<u8> {
    let mut m = vec![0x20u8; 64];
    m.extend_from_slice(TLS13_SERVER_CONTEXT);
    m.push(0);
    m.extend_from_slice(transcript_hash);
    m
}

/// A TLS 1.2 ECDHE ServerKeyExchange input with random randoms and an X25519 share:
/// client_random ‖ server_random ‖ 03 00 1d 20 ‖ 32-byte point.
pub fn tls12_x25519_signed_message() -> Vec<u8> {
    let mut m = random_bytes(64);
    m.extend_from_slice(&[0x03, 0x00, 0x1d, 0x20]);
    m.extend(random_bytes(32));
    m
}

/// Generates a private key.
pub fn generate_key(spec: KeySpec) -> Result<PKey<Private>> {
    Ok(match spec {
        KeySpec::Rsa(bits) => PKey::from_rsa(Rsa::generate(bits)?)?,
        KeySpec::EcP256 | KeySpec::EcP384 => {
            let nid = if spec == KeySpec::EcP256 {
                Nid::X9_62_PRIME256V1
            } else {
                Nid::SECP384R1
            };
            let group = EcGroup::from_curve_name(nid)?;
            PKey::from_ec_key(EcKey::generate(&group)?)?
        }
        KeySpec::Ed25519 => PKey::generate_ed25519()?,
    })
}

/// PEM of a private key in the given encoding (Ed25519 only has PKCS#8).
pub fn private_key_pem(key: &PKey<Private>, encoding: KeyEncoding) -> Result<Vec<u8>> {
    Ok(match (encoding, key.id()) {
        (KeyEncoding::Traditional, Id::RSA) => key.rsa()?.private_key_to_pem()?,
        (KeyEncoding::Traditional, Id::EC) => key.ec_key()?.private_key_to_pem()?,
        _ => key.private_key_to_pem_pkcs8()?,
    })
}

/// A v3 certificate builder for `key` with subject `CN = cn`, a random serial, valid
/// from now for `days`, issued by `issuer` (self-issued when `None`); extensions and
/// the signature are the caller's.
pub fn cert_builder<T: HasPublic>(
    key: &PKeyRef<T>,
    cn: &str,
    issuer: Option<&X509NameRef>,
    days: u32,
) -> Result<X509Builder> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", cn)?;
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(63, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(issuer.unwrap_or(&name))?;
    b.set_pubkey(key)?;
    let not_before = Asn1Time::days_from_now(0)?;
    let not_after = Asn1Time::days_from_now(days)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    Ok(b)
}

/// A self-signed leaf certificate for `key` with `names` as DNS SANs (first = CN).
pub fn self_signed_cert(key: &PKey<Private>, names: &[&str]) -> Result<X509> {
    let cn = names.first().copied().unwrap_or("keyless test");
    let mut b = cert_builder(key, cn, None, 90)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    let mut san = SubjectAlternativeName::new();
    for n in names {
        san.dns(n);
    }
    let san = san.build(&b.x509v3_context(None, None))?;
    b.append_extension(san)?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    let md = if key.id() == Id::ED25519 {
        MessageDigest::null()
    } else {
        MessageDigest::sha256()
    };
    b.sign(key, md)?;
    Ok(b.build())
}

/// Generates a key and a self-signed certificate for `names` and writes them as
/// `DIR/<stem>.key` and `DIR/<stem>.crt` (certificate first, so a key file never
/// appears without its certificate).
pub fn install_key(
    dir: &Path,
    stem: &str,
    spec: KeySpec,
    encoding: KeyEncoding,
    names: &[&str],
) -> Result<SiteKey> {
    let key = generate_key(spec)?;
    let cert = self_signed_cert(&key, names)?;
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_path, cert.to_pem()?)
        .with_context(|| format!("writing {}", cert_path.display()))?;
    std::fs::write(&key_path, private_key_pem(&key, encoding)?)
        .with_context(|| format!("writing {}", key_path.display()))?;
    SiteKey::load(dir, stem)
}

/// Splits a get-certificate-chain payload (u24 BE length ‖ DER, repeated).
pub fn parse_chain(payload: &[u8]) -> Result<Vec<Vec<u8>>> {
    let certs = keyless_shared::decode_chain(payload).context("malformed certificate chain")?;
    Ok(certs.into_iter().map(<[u8]>::to_vec).collect())
}
