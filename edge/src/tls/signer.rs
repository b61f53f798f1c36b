//! A rustls signing key whose private half lives on the key server.
//!
//! `SigningKey::choose_scheme` and `algorithm` are answered locally from the
//! certificate's public key; only `Signer::sign` goes over the network. rustls calls
//! `sign` synchronously: the request runs on the key-server client's own runtime while
//! the handshake's thread waits (announced to tokio with `block_in_place`, so the
//! runtime moves its other work elsewhere). Two bounds make that safe whatever the key
//! server does: a handshake waits no longer than its deadline, and at most
//! `max_concurrent_ops` signatures wait at once (a semaphore; the handshake takes its
//! permit before rustls starts, so an overloaded edge refuses with an alert at once
//! instead of queueing).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use keyless_shared::{digest_for, HashAlg, Opcode, Operation, Ski};
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::SubjectPublicKeyInfoDer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Protocol;
use crate::keyserver::{ClientError, KeyGroup};
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

/// What every remote signature needs besides the message and the key's group.
#[derive(Clone)]
pub(crate) struct RemoteContext {
    pub(crate) metrics: Arc<Metrics>,
    /// Remote private-key operations that may wait at once (one permit each).
    pub(crate) permits: Arc<Semaphore>,
}

impl RemoteContext {
    /// A permit for one remote operation, if the bound allows one now.
    pub(crate) fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics.remote_ops_rejected.inc();
        }
        permit
    }
}

/// One handshake's budget: its deadline and the permit taken for its signature.
#[derive(Debug)]
pub(crate) struct HandshakeBudget {
    deadline: Instant,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl HandshakeBudget {
    pub(crate) fn new(deadline: Instant, permit: OwnedSemaphorePermit) -> Arc<HandshakeBudget> {
        Arc::new(HandshakeBudget {
            deadline,
            permit: Mutex::new(Some(permit)),
        })
    }

    /// Gives the permit back if no signature took it (a resumed handshake, or one
    /// waiting for the client's second hello after a HelloRetryRequest).
    pub(crate) fn release(&self) {
        drop(self.take_permit());
    }

    fn take_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permit.lock().ok().and_then(|mut p| p.take())
    }
}

/// A site key held by the key server, identified by its SKI.
#[derive(Clone)]
pub struct RemoteKey {
    ski: Ski,
    key_type: KeyType,
    spki: Arc<[u8]>,
    sni: Arc<str>,
    /// The key servers that hold the key.
    group: KeyGroup,
    ctx: RemoteContext,
    /// Set on the per-handshake copy given to rustls.
    budget: Option<Arc<HandshakeBudget>>,
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
    /// The key's id at the key server.
    pub(crate) fn ski(&self) -> Ski {
        self.ski
    }

    pub(crate) fn new(
        ski: Ski,
        key_type: KeyType,
        spki: Vec<u8>,
        sni: Arc<str>,
        group: KeyGroup,
        ctx: RemoteContext,
    ) -> RemoteKey {
        RemoteKey {
            ski,
            key_type,
            spki: spki.into(),
            sni,
            group,
            ctx,
            budget: None,
        }
    }

    /// This key for one handshake: its signature waits no longer than the budget's
    /// deadline and uses the budget's permit.
    pub(crate) fn for_handshake(&self, budget: Arc<HandshakeBudget>) -> RemoteKey {
        RemoteKey {
            budget: Some(budget),
            ..self.clone()
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
            group: self.group.clone(),
            ctx: self.ctx.clone(),
            budget: self.budget.clone(),
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(&*self.spki))
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
    group: KeyGroup,
    ctx: RemoteContext,
    budget: Option<Arc<HandshakeBudget>>,
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
        // Reference key servers get bare digests: no extension tags.
        if self.group.protocol() == Protocol::Keyless {
            // Ed25519 signs the message itself; the tag still lets a strict key server
            // check that it is a TLS handshake message.
            op.signed_message = Some(message.to_vec().into());
        }
        // The handshake's permit; after a HelloRetryRequest it was given back, so try
        // for a fresh one.
        let permit = self
            .budget
            .as_ref()
            .and_then(|b| b.take_permit())
            .or_else(|| self.ctx.try_permit());
        let Some(_permit) = permit else {
            tracing::warn!(sni = %self.sni, "too many remote signatures in flight; refusing");
            return Err(rustls::Error::General(
                "edge overloaded: too many remote signatures in flight".into(),
            ));
        };
        // A span of the handshake's trace, whose context the key server continues.
        let span = match keyless_shared::telemetry::enabled() {
            true => {
                tracing::info_span!(target: keyless_shared::telemetry::TARGET, "keyserver.sign",
                opcode = opcode.name(), sni = %self.sni, group = self.group.name(), result = tracing::field::Empty)
            }
            false => tracing::Span::none(),
        };
        let _entered = span.enter();
        if self.group.protocol() == Protocol::Keyless {
            op.trace = keyless_shared::telemetry::context_of(&span);
        }
        let started = Instant::now();
        self.ctx.metrics.remote_ops_in_flight.inc();
        let result = self
            .group
            .call_blocking(op, self.budget.as_ref().map(|b| b.deadline));
        self.ctx.metrics.remote_ops_in_flight.dec();
        let took = started.elapsed();
        span.record(
            "result",
            result.as_ref().map_or_else(client_error_label, |_| "ok"),
        );
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
        ClientError::GroupDown(_) => "group-down",
        _ => "error",
    }
}
