//! Client-facing TLS: read the ClientHello, find the site by SNI, fetch its chain from
//! the key server (asynchronously, cached), then let rustls finish the handshake with a
//! [`signer::RemoteKey`] whose signatures the key server makes.

mod certs;
pub mod signer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::server::{Acceptor, ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout_at;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};

use crate::config::{KeyServerConfig, TlsConfig};
use crate::keyserver::{KeyGroup, KeyServerClient};
use crate::metrics::{HandshakeLabels, Metrics};
use crate::sessions::{HandshakeSessions, SessionStore};
use crate::sites::{Site, Sites};
use certs::{key_preference, CertStore, ChainSource, FetchError, Fixed, SiteChain};
pub use signer::KeyType;
use signer::{HandshakeBudget, RemoteContext};

/// TLS alert descriptions we send ourselves before rustls is involved.
const ALERT_HANDSHAKE_FAILURE: u8 = 40;
const ALERT_INTERNAL_ERROR: u8 = 80;
const ALERT_UNRECOGNIZED_NAME: u8 = 112;

#[derive(Debug)]
struct NoCertificate;

impl ResolvesServerCert for NoCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// Issues no ticket and opens none (`[sessions] tickets = false`): TLS 1.2 resumes by
/// session id, TLS 1.3 by tickets that name sessions in the store.
#[derive(Debug)]
struct NoTickets;

impl ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// The cipher suites in the edge's order of preference, applied over the client's
/// (`ignore_client_order`): AES-128-GCM, then ChaCha20-Poly1305, then AES-256-GCM, in
/// TLS 1.3 and 1.2. Every client offers the first two; their SHA-256 key schedule has
/// CPU instructions (SHA-NI, ARMv8) that the SHA-384 of AES-256-GCM lacks, and OpenSSL
/// and rustls clients list AES-256-GCM first: every handshake, full or resumed, then
/// costs less. All are AEADs with forward-secret key exchange. (Public so that the
/// benchmarks' reference server uses the same order.)
pub fn preferred_suites() -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ]
}

/// Settings of the TLS front.
pub struct TlsFrontConfig {
    /// Site for clients that send no SNI.
    pub default_site: Option<String>,
    /// Deadline of the whole handshake, chain fetch included.
    pub handshake_timeout: Duration,
    /// How long a fetched chain is used before a background refresh.
    pub cert_ttl: Duration,
    /// Remote private-key operations that may wait for the key server at once.
    pub max_concurrent_ops: usize,
}

impl TlsFrontConfig {
    /// The settings of `[tls]`, with `[keyserver] max_concurrent_ops`.
    pub fn from_config(tls: &TlsConfig, keyserver: &KeyServerConfig) -> TlsFrontConfig {
        TlsFrontConfig {
            default_site: tls.default_site.clone(),
            handshake_timeout: tls.handshake_timeout,
            cert_ttl: tls.cert_ttl,
            max_concurrent_ops: keyserver.max_concurrent_ops.get(),
        }
    }
}

/// Accepts client TLS connections for the configured sites.
pub struct TlsFront {
    template: ServerConfig,
    certs: Arc<CertStore>,
    sites: Arc<Sites>,
    /// Key-server groups by name.
    client: Arc<KeyServerClient>,
    /// Session ids (and stateful TLS 1.3 sessions), in memory and Redis.
    sessions: Arc<SessionStore>,
    default_site: Option<(String, Arc<Site>)>,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
}

/// Why a client handshake did not complete (already logged and counted).
#[derive(Debug)]
pub struct HandshakeFailed;

/// Why the TLS front could not be built (a startup error of the edge; no retry helps).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFrontError {
    /// rustls refused TLS 1.3 and 1.2 with the ring provider.
    #[error("cannot enable TLS 1.3 and 1.2")]
    ProtocolVersions(#[source] rustls::Error),
    /// The session-ticket encrypter could not be made.
    #[error("cannot create the session-ticket key")]
    Ticketer(#[source] rustls::Error),
    /// `[tls] default_site` names no configured site.
    #[error("[tls] default_site {0:?} is not a configured domain")]
    UnknownDefaultSite(String),
    /// A site names a key-server group the client does not have.
    #[error("site {site}: no key-server group {group:?}")]
    UnknownGroup {
        /// The site.
        site: String,
        /// The group it names.
        group: String,
    },
}

/// A handshake refused before rustls ran (already logged): its metric label and the
/// alert to send.
struct Refusal {
    label: &'static str,
    alert: u8,
}

/// The client and the clock of one handshake, for its steps and their logs.
#[derive(Clone, Copy)]
struct Attempt {
    peer: SocketAddr,
    started: Instant,
    /// Of the whole handshake, chain fetch and remote signature included.
    deadline: tokio::time::Instant,
}

impl TlsFront {
    /// Builds the front; fails if `default_site` names no configured site.
    pub fn new(
        config: TlsFrontConfig,
        sites: Arc<Sites>,
        client: Arc<KeyServerClient>,
        sessions: Arc<SessionStore>,
        metrics: Arc<Metrics>,
    ) -> Result<TlsFront, TlsFrontError> {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = preferred_suites();
        let mut template = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsFrontError::ProtocolVersions)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCertificate));
        template.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        template.ignore_client_order = true;
        // Resumed handshakes need no signature: the cheapest key-server call is none.
        // Each handshake gets the session store and its group's ticket keys; this
        // edge's own ticket key serves groups whose key servers hand out none.
        template.ticketer = if sessions.tickets() {
            rustls::crypto::ring::Ticketer::new().map_err(TlsFrontError::Ticketer)?
        } else {
            Arc::new(NoTickets)
        };
        let default_site = match config.default_site {
            Some(name) => {
                let site = sites
                    .lookup(&name)
                    .ok_or_else(|| TlsFrontError::UnknownDefaultSite(name.clone()))?
                    .clone();
                Some((name.to_ascii_lowercase(), site))
            }
            None => None,
        };
        for site in sites.all() {
            if client.group(&site.keyserver_group).is_none() {
                return Err(TlsFrontError::UnknownGroup {
                    site: site.name().to_owned(),
                    group: site.keyserver_group.clone(),
                });
            }
        }
        let ctx = RemoteContext {
            metrics: metrics.clone(),
            permits: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_ops.max(1),
            )),
        };
        Ok(TlsFront {
            template,
            certs: CertStore::new(config.cert_ttl, ctx),
            sites,
            client,
            sessions,
            default_site,
            metrics,
            handshake_timeout: config.handshake_timeout,
        })
    }

    /// The key-server groups the sites of this front use.
    pub fn keyservers(&self) -> &Arc<KeyServerClient> {
        &self.client
    }

    /// Takes over `previous`'s own session-ticket key, so that the tickets it issued
    /// still resume after a reload (`[sessions]` does not change on reload).
    pub fn keep_ticket_key(&mut self, previous: &TlsFront) {
        self.template.ticketer = previous.template.ticketer.clone();
    }

    /// Takes over the chains `previous` has cached (and its bound on waiting remote
    /// operations), except for the names `keep` refuses; how many were dropped. For a
    /// reload that keeps `[tls]`, `[keyserver]` and the key-server client: only the
    /// sites it removed or changed need their chains fetched again.
    pub async fn adopt_chains(
        &mut self,
        previous: &TlsFront,
        keep: impl Fn(&str) -> bool,
    ) -> usize {
        self.certs = previous.certs.clone();
        self.certs.retain(keep).await
    }

    fn count(&self, result: &'static str, version: &'static str) {
        self.metrics
            .handshakes
            .get_or_create(&HandshakeLabels { result, version })
            .inc();
    }

    /// Runs the server side of a handshake on `tcp`. On success returns the stream
    /// and the site chosen by SNI.
    /// With tracing on, the handshake is a span (`tls.handshake`) whose children are its
    /// key-server operations.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<(TlsStream<TcpStream>, Arc<Site>), HandshakeFailed> {
        if !keyless_shared::telemetry::enabled() {
            return self.handshake(tcp, peer).await;
        }
        use tracing::Instrument as _;
        let span = tracing::info_span!(target: keyless_shared::telemetry::TARGET, "tls.handshake",
            sni = tracing::field::Empty, result = tracing::field::Empty);
        let result = self.handshake(tcp, peer).instrument(span.clone()).await;
        match &result {
            Ok((_, site)) => {
                span.record("sni", site.name());
                span.record("result", "ok");
            }
            Err(_) => {
                span.record("result", "failed");
            }
        }
        result
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<(TlsStream<TcpStream>, Arc<Site>), HandshakeFailed> {
        let started = Instant::now();
        let at = Attempt {
            peer,
            started,
            deadline: tokio::time::Instant::from_std(started + self.handshake_timeout),
        };
        let start = self.read_client_hello(tcp, &at).await?;
        let hello = start.client_hello();
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        let prefs = key_preference(hello.signature_schemes());
        let prepared = async {
            let (name, site) = self.site_for(sni, &at)?;
            let group = self.group_for(&name, &site, &at)?;
            let source = ChainSource {
                group,
                local: site.chain.as_ref(),
            };
            let chain = self.chain_for(&name, source, prefs, &at).await?;
            let permit = self.remote_permit(&name, &at)?;
            let ticketer = group.ticketer();
            let sessions =
                self.sessions
                    .for_handshake(group.name(), ticketer.clone(), at.deadline.into_std());
            let ticketer = ticketer.filter(|_| self.sessions.tickets());
            Ok::<_, Refusal>((name, site, chain, permit, (ticketer, sessions)))
        };
        let (name, site, chain, permit, resumption) = match prepared.await {
            Ok(prepared) => prepared,
            Err(Refusal { label, alert: desc }) => {
                self.count(label, "-");
                alert(start.io, desc).await;
                return Err(HandshakeFailed);
            }
        };
        let stream = self
            .complete(start, &chain, permit, resumption, &name, &at)
            .await?;
        Ok((stream, site))
    }

    /// Reads the ClientHello, within the handshake deadline.
    async fn read_client_hello(
        &self,
        tcp: TcpStream,
        at: &Attempt,
    ) -> Result<StartHandshake<TcpStream>, HandshakeFailed> {
        let acceptor = LazyConfigAcceptor::new(Acceptor::default(), tcp);
        tokio::pin!(acceptor);
        match timeout_at(at.deadline, acceptor.as_mut()).await {
            Ok(Ok(start)) => Ok(start),
            Ok(Err(e)) => {
                tracing::debug!(peer = %at.peer, error = %e, "not a TLS ClientHello");
                self.count("failed", "-");
                Err(HandshakeFailed)
            }
            Err(_) => {
                self.count("timeout", "-");
                Err(HandshakeFailed)
            }
        }
    }

    /// The site named by the (lowercased) SNI, or the default site when there is none.
    fn site_for(&self, sni: Option<String>, at: &Attempt) -> Result<(String, Arc<Site>), Refusal> {
        match (sni, &self.default_site) {
            (Some(n), _) => match self.sites.lookup(&n) {
                Some(site) => Ok((n, site.clone())),
                None => {
                    tracing::warn!(peer = %at.peer, sni = %n, "unknown SNI: sending unrecognized_name");
                    Err(Refusal {
                        label: "unknown-sni",
                        alert: ALERT_UNRECOGNIZED_NAME,
                    })
                }
            },
            (None, Some((name, site))) => Ok((name.clone(), site.clone())),
            (None, None) => {
                tracing::warn!(peer = %at.peer, "client sent no SNI and no default_site is configured");
                Err(Refusal {
                    label: "no-sni",
                    alert: ALERT_HANDSHAKE_FAILURE,
                })
            }
        }
    }

    /// The key-server group of `site`, if any of its servers is up. Fail closed: with
    /// every server of the group down, the handshake is refused at once with
    /// handshake_failure instead of waiting for a key server that will not answer.
    fn group_for(&self, name: &str, site: &Site, at: &Attempt) -> Result<&KeyGroup, Refusal> {
        let refuse = |label| Refusal {
            label,
            alert: ALERT_HANDSHAKE_FAILURE,
        };
        // Every site's group was checked to exist when the front was built.
        let group = self
            .client
            .group(&site.keyserver_group)
            .ok_or_else(|| refuse("keyserver-down"))?;
        if !group.is_usable() {
            tracing::debug!(peer = %at.peer, sni = %name, group = group.name(), "every key server of the site's group is down: refusing handshake");
            return Err(refuse("keyserver-down"));
        }
        Ok(group)
    }

    /// The chain of `name` for a client that accepts the key types `prefs`: the site's
    /// local chain, or cached, or fetched from the key server within the handshake
    /// deadline.
    async fn chain_for(
        &self,
        name: &str,
        source: ChainSource<'_>,
        prefs: Vec<u8>,
        at: &Attempt,
    ) -> Result<Arc<SiteChain>, Refusal> {
        let fetched = match timeout_at(at.deadline, self.certs.get(name, source, prefs)).await {
            // The site exists but has no key of the kinds the client listed: take the
            // key server's choice and let rustls refuse with handshake_failure.
            Ok(Err(e)) if matches!(*e, FetchError::NotFound) => {
                timeout_at(at.deadline, self.certs.get(name, source, Vec::new())).await
            }
            other => other,
        };
        match fetched {
            Ok(Ok(chain)) => Ok(chain),
            Ok(Err(e)) => {
                let (label, alert) = match *e {
                    FetchError::NotFound => ("unknown-sni", ALERT_UNRECOGNIZED_NAME),
                    _ => ("keyserver-error", ALERT_INTERNAL_ERROR),
                };
                tracing::warn!(peer = %at.peer, sni = %name, error = %e, reason = e.label(), "no certificate chain for handshake");
                Err(Refusal { label, alert })
            }
            Err(_) => {
                tracing::warn!(peer = %at.peer, sni = %name, "timed out fetching the certificate chain");
                Err(Refusal {
                    label: "timeout",
                    alert: ALERT_INTERNAL_ERROR,
                })
            }
        }
    }

    /// A full handshake needs a remote signature: its permit is taken before rustls
    /// starts, so that an edge with `max_concurrent_ops` signatures waiting refuses with
    /// an alert at once, before rustls has sent anything.
    fn remote_permit(&self, name: &str, at: &Attempt) -> Result<OwnedSemaphorePermit, Refusal> {
        self.certs.ctx().try_permit().ok_or_else(|| {
            tracing::warn!(peer = %at.peer, sni = %name, "too many remote signatures in flight; refusing handshake");
            Refusal {
                label: "overloaded",
                alert: ALERT_INTERNAL_ERROR,
            }
        })
    }

    /// Lets rustls finish the handshake with `chain`, signing remotely within the
    /// deadline, sealing and opening tickets with the group's shared keys when it has
    /// some (else this edge's own), resuming from the session store, and counts the
    /// result.
    async fn complete(
        &self,
        start: StartHandshake<TcpStream>,
        chain: &SiteChain,
        permit: OwnedSemaphorePermit,
        (ticketer, sessions): (
            Option<Arc<crate::tickets::SharedTicketer>>,
            Arc<HandshakeSessions>,
        ),
        name: &str,
        at: &Attempt,
    ) -> Result<TlsStream<TcpStream>, HandshakeFailed> {
        let budget = HandshakeBudget::new(at.deadline.into_std(), permit);
        let mut config = self.template.clone();
        config.cert_resolver = Arc::new(Fixed(chain.for_handshake(budget.clone())));
        if let Some(t) = ticketer {
            config.ticketer = t;
        }
        config.session_storage = sessions.clone();
        // rustls signs inside `into_stream` (and, after a HelloRetryRequest, inside the
        // future); the signer waits at most until the deadline.
        let accept = start.into_stream(Arc::new(config));
        budget.release();
        match timeout_at(at.deadline, accept).await {
            Ok(Ok(stream)) => {
                let version = match stream.get_ref().1.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1_3",
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1_2",
                    _ => "-",
                };
                self.count("ok", version);
                self.metrics
                    .handshake_seconds
                    .observe(at.started.elapsed().as_secs_f64());
                let resumed = sessions.resumption(
                    stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                );
                self.sessions.count(resumed);
                let resumed = resumed.map_or("no", |r| r.label());
                tracing::debug!(peer = %at.peer, sni = %name, version, resumed, "handshake complete");
                Ok(stream)
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %at.peer, sni = %name, error = %e, "TLS handshake failed");
                self.count("failed", "-");
                Err(HandshakeFailed)
            }
            Err(_) => {
                tracing::warn!(peer = %at.peer, sni = %name, "TLS handshake timed out");
                self.count("timeout", "-");
                Err(HandshakeFailed)
            }
        }
    }
}

/// Sends a fatal alert in a plaintext record (before any key is agreed) and closes.
async fn alert(mut io: TcpStream, description: u8) {
    let record = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = io.write_all(&record).await;
        let _ = io.shutdown().await;
    })
    .await;
}
