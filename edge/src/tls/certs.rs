//! Certificate chains by SNI, fetched from the key server (get-certificate-chain) and
//! cached: a chain is used for `ttl`, then refreshed in the background while the old
//! one keeps serving; one fetch per name at a time; the cache is bounded in entries.
//!
//! The handshake fetches asynchronously *before* rustls runs and hands the chain to
//! rustls through a [`Fixed`] resolver, so rustls never waits for the network to
//! resolve a certificate.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyless_shared::{decode_chain, ChainError, KeyPreference, Opcode, Operation, Ski};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::*;

use super::signer::{client_error_label, HandshakeBudget, KeyType, RemoteContext, RemoteKey};
use crate::keyserver::{ClientError, KeyGroup};

/// Cache entries at most (names × key classes).
const MAX_ENTRIES: u64 = 10_000;

/// Key classes a client can use, in our preference order (ECDSA, Ed25519, RSA), as the
/// get-certificate-chain request payload.
pub(crate) fn key_preference(schemes: &[SignatureScheme]) -> Vec<u8> {
    use SignatureScheme as S;
    let mut prefs = Vec::with_capacity(3);
    if schemes
        .iter()
        .any(|s| matches!(s, S::ECDSA_NISTP256_SHA256 | S::ECDSA_NISTP384_SHA384))
    {
        prefs.push(KeyPreference::Ecdsa.to_u8());
    }
    if schemes.contains(&S::ED25519) {
        prefs.push(KeyPreference::Ed25519.to_u8());
    }
    if schemes.iter().any(|s| {
        matches!(
            s,
            S::RSA_PSS_SHA256
                | S::RSA_PSS_SHA384
                | S::RSA_PSS_SHA512
                | S::RSA_PKCS1_SHA256
                | S::RSA_PKCS1_SHA384
                | S::RSA_PKCS1_SHA512
        )
    }) {
        prefs.push(KeyPreference::Rsa.to_u8());
    }
    prefs
}

/// Why no chain could be had for a name.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("key server has no certificate for this name")]
    NotFound,
    #[error("key server: {0}")]
    KeyServer(#[from] ClientError),
    #[error("key server sent an unusable chain: {0}")]
    BadChain(&'static str),
    #[error("key server sent an unusable chain: {0}")]
    MalformedChain(#[from] ChainError),
}

impl FetchError {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            FetchError::NotFound => "cert-not-found",
            FetchError::KeyServer(e) => client_error_label(e),
            FetchError::BadChain(_) | FetchError::MalformedChain(_) => "bad-chain",
        }
    }
}

/// A site's chain and its remote key, as fetched.
pub(crate) struct SiteChain {
    certs: Vec<CertificateDer<'static>>,
    key: RemoteKey,
}

impl SiteChain {
    /// The chain and key for one handshake, signing within `budget`.
    pub(crate) fn for_handshake(&self, budget: Arc<HandshakeBudget>) -> Arc<CertifiedKey> {
        Arc::new(CertifiedKey::new(
            self.certs.clone(),
            Arc::new(self.key.for_handshake(budget)),
        ))
    }
}

/// Where a site's chain comes from: its group's key servers, or a local file (the
/// group still signs).
#[derive(Clone, Copy)]
pub(crate) struct ChainSource<'a> {
    pub(crate) group: &'a KeyGroup,
    pub(crate) local: Option<&'a Arc<[CertificateDer<'static>]>>,
}

impl ChainSource<'_> {
    fn to_owned(self) -> OwnedSource {
        OwnedSource {
            group: self.group.clone(),
            local: self.local.cloned(),
        }
    }
}

struct OwnedSource {
    group: KeyGroup,
    local: Option<Arc<[CertificateDer<'static>]>>,
}

#[derive(Clone)]
struct Cached {
    chain: Arc<SiteChain>,
    fetched: Instant,
}

type CacheKey = (Arc<str>, Vec<u8>);

/// The chain cache; also the rustls certificate resolver.
pub(crate) struct CertStore {
    cache: moka::future::Cache<CacheKey, Cached>,
    refreshing: moka::sync::Cache<CacheKey, ()>,
    ttl: Duration,
    ctx: RemoteContext,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl CertStore {
    pub(crate) fn new(ttl: Duration, ctx: RemoteContext) -> Arc<CertStore> {
        Arc::new(CertStore {
            // A stale chain may serve for up to 10 × ttl while the key server is away.
            cache: moka::future::Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_live(ttl.saturating_mul(10))
                .build(),
            refreshing: moka::sync::Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_live(Duration::from_secs(60))
                .build(),
            ttl,
            ctx,
        })
    }

    /// Drops the chains cached for the names `keep` refuses (the sites a reload
    /// removed or changed); how many.
    pub(crate) async fn retain(&self, keep: impl Fn(&str) -> bool) -> usize {
        let gone: Vec<Arc<CacheKey>> = self
            .cache
            .iter()
            .filter(|(key, _)| !keep(&key.0))
            .map(|(key, _)| key)
            .collect();
        for key in &gone {
            self.cache.invalidate(key.as_ref()).await;
        }
        self.ctx
            .metrics
            .certs_cached
            .set(self.cache.entry_count() as i64);
        gone.len()
    }

    /// What remote signatures of these chains' keys use.
    pub(crate) fn ctx(&self) -> &RemoteContext {
        &self.ctx
    }

    /// The chain for `sni` usable with `prefs`: the site's `local` chain, or fetched
    /// from `group` if it is not cached.
    pub(crate) async fn get(
        self: &Arc<Self>,
        sni: &str,
        source: ChainSource<'_>,
        prefs: Vec<u8>,
    ) -> Result<Arc<SiteChain>, Arc<FetchError>> {
        let key: CacheKey = (Arc::from(sni), prefs);
        let me = self.clone();
        let k2 = key.clone();
        let owned = source.to_owned();
        let cached = self
            .cache
            .try_get_with(key.clone(), async move { me.fetch(&k2, &owned).await })
            .await?;
        if cached.fetched.elapsed() > self.ttl && self.refreshing.get(&key).is_none() {
            self.refreshing.insert(key.clone(), ());
            let me = self.clone();
            let owned = source.to_owned();
            tokio::spawn(async move {
                match me.fetch(&key, &owned).await {
                    Ok(fresh) => me.cache.insert(key.clone(), fresh).await,
                    Err(e) => {
                        tracing::warn!(sni = %key.0, error = %e, "certificate refresh failed; serving the cached chain")
                    }
                }
                me.refreshing.invalidate(&key);
            });
        }
        self.ctx
            .metrics
            .certs_cached
            .set(self.cache.entry_count() as i64);
        Ok(cached.chain)
    }

    async fn fetch(&self, key: &CacheKey, source: &OwnedSource) -> Result<Cached, FetchError> {
        let (sni, prefs) = key;
        let group = &source.group;
        if let Some(local) = &source.local {
            let chain = self.site_chain(local.to_vec(), None, sni, group)?;
            return Ok(Cached {
                chain: Arc::new(chain),
                fetched: Instant::now(),
            });
        }
        let mut op = Operation::new(Opcode::GetCertificateChain, prefs.clone());
        op.sni = Some(sni.to_string());
        let started = Instant::now();
        let reply = group.call(op, None).await;
        let took = started.elapsed();
        let reply = match reply {
            Ok(r) => r,
            Err(ClientError::Remote(keyless_shared::ErrorCode::CertNotFound)) => {
                self.ctx
                    .metrics
                    .keyserver_op("get-certificate-chain", "cert-not-found", took);
                return Err(FetchError::NotFound);
            }
            Err(e) => {
                self.ctx.metrics.keyserver_op(
                    "get-certificate-chain",
                    client_error_label(&e),
                    took,
                );
                return Err(e.into());
            }
        };
        self.ctx
            .metrics
            .keyserver_op("get-certificate-chain", "ok", took);
        let certs: Vec<CertificateDer<'static>> = decode_chain(reply.payload())?
            .into_iter()
            .map(|der| CertificateDer::from(der.to_vec()))
            .collect();
        let chain = self.site_chain(certs, reply.ski, sni, group)?;
        tracing::info!(%sni, ski = %chain.key.ski(), group = group.name(), "certificate chain fetched from key server");
        Ok(Cached {
            chain: Arc::new(chain),
            fetched: Instant::now(),
        })
    }

    /// The chain with its remote key, named by the leaf's public key; `ski`, if the
    /// key server named one, must match it.
    fn site_chain(
        &self,
        certs: Vec<CertificateDer<'static>>,
        ski: Option<Ski>,
        sni: &Arc<str>,
        group: &KeyGroup,
    ) -> Result<SiteChain, FetchError> {
        let leaf = certs.first().ok_or(FetchError::BadChain("empty chain"))?;
        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|_| FetchError::BadChain("leaf is not X.509"))?;
        let spki = parsed.public_key().raw.to_vec();
        let key_type =
            KeyType::from_spki(&spki).ok_or(FetchError::BadChain("unsupported key type"))?;
        let leaf_ski = Ski::from_public_key_bits(&parsed.public_key().subject_public_key.data);
        if ski.is_some_and(|s| s != leaf_ski) {
            return Err(FetchError::BadChain(
                "SKI does not match the leaf certificate",
            ));
        }
        let remote = RemoteKey::new(
            leaf_ski,
            key_type,
            spki,
            sni.clone(),
            group.clone(),
            self.ctx.clone(),
        );
        Ok(SiteChain { certs, key: remote })
    }
}

/// Resolver for one handshake whose chain was fetched already (e.g. a client without
/// SNI served by the default site).
#[derive(Debug)]
pub(crate) struct Fixed(pub(crate) Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
