//! A rustls signing key whose private half lives on the key server.
//!
//! `SigningKey::choose_scheme` and `algorithm` are answered locally from the
//! certificate's public key; only `Signer::sign` goes over the network. rustls calls
//! `sign` synchronously, so the call is bridged with `block_in_place`: the runtime
//! hands this worker's other tasks to another thread while the handshake waits for the
//! key server, so a slow key server never stalls other connections.

use std::sync::Arc;
use std::time::Instant;

use keyless_shared::{digest_for, HashAlg, Opcode, Operation, Ski};
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::SubjectPublicKeyInfoDer;

use crate::keyserver::{ClientError, KeyServerClient};
use crate::metrics::Metrics;

/// Public-key family of a site certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// RSA of any supported size.
    Rsa,
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// Reads the key type from a DER SubjectPublicKeyInfo.
    pub fn from_spki(spki: &[u8]) -> Option<KeyType> {
        use x509_parser::prelude::FromDer;
        use x509_parser::x509::SubjectPublicKeyInfo;
        let (_, info) = SubjectPublicKeyInfo::from_der(spki).ok()?;
        let alg = info.algorithm.algorithm.to_id_string();
        match alg.as_str() {
            "1.2.840.113549.1.1.1" => Some(KeyType::Rsa),
            "1.3.101.112" => Some(KeyType::Ed25519),
            "1.2.840.10045.2.1" => {
                let curve = info
                    .algorithm
                    .parameters
                    .as_ref()?
                    .as_oid()
                    .ok()?
                    .to_id_string();
                match curve.as_str() {
                    "1.2.840.10045.3.1.7" => Some(KeyType::EcdsaP256),
                    "1.3.132.0.34" => Some(KeyType::EcdsaP384),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The schemes this key can sign with, most preferred first.
    fn schemes(self) -> &'static [SignatureScheme] {
        use SignatureScheme as S;
        match self {
            KeyType::Rsa => &[
                S::RSA_PSS_SHA256,
                S::RSA_PSS_SHA384,
                S::RSA_PSS_SHA512,
                S::RSA_PKCS1_SHA256,
                S::RSA_PKCS1_SHA384,
                S::RSA_PKCS1_SHA512,
            ],
            KeyType::EcdsaP256 => &[S::ECDSA_NISTP256_SHA256],
            KeyType::EcdsaP384 => &[S::ECDSA_NISTP384_SHA384],
            KeyType::Ed25519 => &[S::ED25519],
        }
    }
}

/// The key-server opcode and digest for a scheme.
fn opcode_for(scheme: SignatureScheme) -> Option<(Opcode, Option<HashAlg>)> {
    use SignatureScheme as S;
    Some(match scheme {
        S::RSA_PSS_SHA256 => (Opcode::RsaPssSignSha256, Some(HashAlg::Sha256)),
        S::RSA_PSS_SHA384 => (Opcode::RsaPssSignSha384, Some(HashAlg::Sha384)),
        S::RSA_PSS_SHA512 => (Opcode::RsaPssSignSha512, Some(HashAlg::Sha512)),
        S::RSA_PKCS1_SHA256 => (Opcode::RsaSignSha256, Some(HashAlg::Sha256)),
        S::RSA_PKCS1_SHA384 => (Opcode::RsaSignSha384, Some(HashAlg::Sha384)),
        S::RSA_PKCS1_SHA512 => (Opcode::RsaSignSha512, Some(HashAlg::Sha512)),
        S::ECDSA_NISTP256_SHA256 => (Opcode::EcdsaSignSha256, Some(HashAlg::Sha256)),
        S::ECDSA_NISTP384_SHA384 => (Opcode::EcdsaSignSha384, Some(HashAlg::Sha384)),
        S::ED25519 => (Opcode::Ed25519Sign, None),
        _ => return None,
    })
}

/// What a remote signature needs besides the message.
#[derive(Clone)]
pub(crate) struct RemoteContext {
    pub(crate) client: Arc<KeyServerClient>,
    pub(crate) metrics: Arc<Metrics>,
    /// Send the whole to-be-signed message (tag 0x40) so the key server can check it.
    pub(crate) send_message: bool,
}

/// A site key held by the key server, identified by its SKI.
pub struct RemoteKey {
    ski: Ski,
    key_type: KeyType,
    spki: Vec<u8>,
    sni: Arc<str>,
    ctx: RemoteContext,
}

impl std::fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKey")
            .field("ski", &self.ski)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl RemoteKey {
    pub(crate) fn new(
        ski: Ski,
        key_type: KeyType,
        spki: Vec<u8>,
        sni: Arc<str>,
        ctx: RemoteContext,
    ) -> RemoteKey {
        RemoteKey {
            ski,
            key_type,
            spki,
            sni,
            ctx,
        }
    }
}

impl SigningKey for RemoteKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self
            .key_type
            .schemes()
            .iter()
            .find(|s| offered.contains(s))?;
        Some(Box::new(RemoteSigner {
            scheme: *scheme,
            ski: self.ski,
            sni: self.sni.clone(),
            ctx: self.ctx.clone(),
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.key_type {
            KeyType::Rsa => SignatureAlgorithm::RSA,
            KeyType::EcdsaP256 | KeyType::EcdsaP384 => SignatureAlgorithm::ECDSA,
            KeyType::Ed25519 => SignatureAlgorithm::ED25519,
        }
    }
}

struct RemoteSigner {
    scheme: SignatureScheme,
    ski: Ski,
    sni: Arc<str>,
    ctx: RemoteContext,
}

impl std::fmt::Debug for RemoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSigner")
            .field("scheme", &self.scheme)
            .field("ski", &self.ski)
            .finish()
    }
}

impl Signer for RemoteSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let (opcode, hash) = opcode_for(self.scheme)
            .ok_or_else(|| rustls::Error::General("unsupported signature scheme".into()))?;
        let payload = match hash {
            Some(h) => digest_for(h, message)
                .ok_or_else(|| rustls::Error::General("unsupported hash".into()))?
                .as_ref()
                .to_vec(),
            None => message.to_vec(),
        };
        let mut op = Operation::new(opcode, payload);
        op.ski = Some(self.ski);
        op.sni = Some(self.sni.to_string());
        if self.ctx.send_message && hash.is_some() {
            op.signed_message = Some(message.to_vec().into());
        }
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| rustls::Error::General("remote signing needs a tokio runtime".into()))?;
        let client = self.ctx.client.clone();
        let started = Instant::now();
        let result = tokio::task::block_in_place(|| handle.block_on(client.call(op)));
        let took = started.elapsed();
        match result {
            Ok(reply) => {
                self.ctx.metrics.keyserver_op(opcode.name(), "ok", took);
                Ok(reply.payload().to_vec())
            }
            Err(e) => {
                self.ctx
                    .metrics
                    .keyserver_op(opcode.name(), client_error_label(&e), took);
                tracing::warn!(sni = %self.sni, ski = %self.ski, op = %opcode, error = %e, "remote signing failed");
                Err(rustls::Error::General(format!("key server: {e}")))
            }
        }
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// Metric label of a key-server failure.
pub(crate) fn client_error_label(e: &ClientError) -> &'static str {
    match e {
        ClientError::Unavailable(_) => "unavailable",
        ClientError::ConnectionLost => "connection-lost",
        ClientError::Timeout(_) => "timeout",
        ClientError::Remote(code) => code.name(),
        _ => "error",
    }
}
