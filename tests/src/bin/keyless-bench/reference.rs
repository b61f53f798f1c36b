//! `keyless-bench reference-server`: the local-key reference of `edge`. A tokio-rustls
//! server that holds the site key itself and, like the edge, forwards each HTTP/1.1
//! request to the origin over pooled keep-alive connections and streams the answer
//! back. It runs as its own process (this binary re-executed) so that its CPU time is
//! accounted for exactly like the edge's.
//!
//! Its TLS settings copy the edge's (`edge/src/tls/mod.rs`): ring, TLS 1.3 and 1.2,
//! a 100 000-entry session cache and a ring ticketer; only the key is local.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use bytes::Bytes;
use clap::Args;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{header, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ServerSessionMemoryCache;
use rustls::sign::{CertifiedKey, Signer, SigningKey, SingleCertAndKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

/// Deadline of a client handshake (the edge's default).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failures logged at most (the bench counts them on its side).
const MAX_LOGGED_ERRORS: usize = 20;

#[derive(Args, Clone)]
pub(crate) struct ReferenceArgs {
    /// Site certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Site private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The origin, as an address (plain HTTP).
    #[arg(long)]
    origin: SocketAddr,
    /// Tokio worker threads; default one per core, like the edge's runtime.
    #[arg(long)]
    threads: Option<usize>,
    /// Where signatures are made (`thread-*` are diagnostics of the edge's bridge).
    #[arg(long, value_enum, default_value_t = SignVia::Local)]
    sign_via: SignVia,
}

/// How the reference makes its signatures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SignVia {
    /// On the handshake's own thread, as any TLS server does.
    Local,
    /// On a signer thread, the handshake waiting for the reply inside `block_in_place`
    /// and `Handle::block_on`: the edge's bridge to its key-server client, without
    /// the network.
    ThreadBlockInPlace,
    /// On a signer thread, the handshake's worker thread blocked until the reply.
    ThreadBlocking,
}

type Body = BoxBody<Bytes, hyper::Error>;

pub(crate) fn run(args: ReferenceArgs) -> Result<()> {
    let certs = CertificateDer::pem_file_iter(&args.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("{}: {e}", args.cert.display()))?;
    ensure!(!certs.is_empty(), "{}: no certificate", args.cert.display());
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .map_err(|e| anyhow!("{}: {e}", args.key.display()))?;
    // The edge's cipher suites and order, so that both sides run the same key schedule.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = keyless_edge::tls::preferred_suites();
    let provider = Arc::new(provider);
    let mut signing_key = provider
        .key_provider
        .load_private_key(key)
        .context("the site key is not usable")?;
    if args.sign_via != SignVia::Local {
        signing_key = Arc::new(OffThread::start(signing_key, args.sign_via));
    }
    let certified = CertifiedKey::new(certs, signing_key);
    certified
        .keys_match()
        .context("the site certificate does not match the key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    config.session_storage = ServerSessionMemoryCache::new(100_000);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n.max(1));
    }
    runtime
        .enable_all()
        .thread_name("reference-server")
        .build()?
        .block_on(serve(args.listen, args.origin, Arc::new(config)))
}

async fn serve(
    listen: SocketAddr,
    origin: SocketAddr,
    config: Arc<rustls::ServerConfig>,
) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("reference server listening on {listen}, origin http://{origin}");
    let acceptor = TlsAcceptor::from(config);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector);
    let errors = Arc::new(AtomicUsize::new(0));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("accept failed: {e}; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let client = client.clone();
        let errors = errors.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    log_error(&errors, format_args!("{peer}: TLS handshake failed: {e}"));
                    return;
                }
                Err(_) => {
                    log_error(&errors, format_args!("{peer}: TLS handshake timed out"));
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| forward(client.clone(), origin, req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                log_error(&errors, format_args!("{peer}: HTTP: {e}"));
            }
        });
    }
}

fn log_error(count: &AtomicUsize, what: std::fmt::Arguments<'_>) {
    if count.fetch_add(1, Ordering::Relaxed) < MAX_LOGGED_ERRORS {
        eprintln!("{what}");
    }
}

/// Sends `req` to the origin (hop-by-hop `Connection` removed, `Host` kept) and
/// streams its response back; `502` if the origin fails.
async fn forward(
    client: Client<HttpConnector, Incoming>,
    origin: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("http://{origin}{path}").parse::<Uri>() {
        Ok(uri) => uri,
        Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "bad request target\n")),
    };
    parts.headers.remove(header::CONNECTION);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => Ok(resp.map(BodyExt::boxed)),
        Err(e) => {
            eprintln!("origin request failed: {e}");
            Ok(text(StatusCode::BAD_GATEWAY, "origin request failed\n"))
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp
}

/// A local key whose signatures a dedicated thread makes, the handshake waiting for
/// them the way `mode` says (the edge waits the same way for its key server).
#[derive(Debug)]
struct OffThread {
    key: Arc<dyn SigningKey>,
    jobs: mpsc::Sender<Job>,
    mode: SignVia,
}

struct Job {
    scheme: SignatureScheme,
    message: Vec<u8>,
    reply: Reply,
}

enum Reply {
    Async(oneshot::Sender<Result<Vec<u8>, rustls::Error>>),
    Blocking(mpsc::SyncSender<Result<Vec<u8>, rustls::Error>>),
}

impl OffThread {
    fn start(key: Arc<dyn SigningKey>, mode: SignVia) -> OffThread {
        let (jobs, rx) = mpsc::channel::<Job>();
        let signer_key = key.clone();
        std::thread::spawn(move || {
            for job in rx {
                let result = match signer_key.choose_scheme(&[job.scheme]) {
                    Some(signer) => signer.sign(&job.message),
                    None => Err(rustls::Error::General("scheme not supported".into())),
                };
                match job.reply {
                    Reply::Async(tx) => {
                        let _ = tx.send(result);
                    }
                    Reply::Blocking(tx) => {
                        let _ = tx.send(result);
                    }
                }
            }
        });
        OffThread { key, jobs, mode }
    }
}

impl SigningKey for OffThread {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.key.choose_scheme(offered)?.scheme();
        Some(Box::new(OffThreadSigner {
            scheme,
            jobs: self.jobs.clone(),
            mode: self.mode,
        }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.key.algorithm()
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        self.key.public_key()
    }
}

#[derive(Debug)]
struct OffThreadSigner {
    scheme: SignatureScheme,
    jobs: mpsc::Sender<Job>,
    mode: SignVia,
}

impl Signer for OffThreadSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let gone = || rustls::Error::General("the signer thread is gone".into());
        let job = |reply| Job {
            scheme: self.scheme,
            message: message.to_vec(),
            reply,
        };
        if self.mode == SignVia::ThreadBlocking {
            let (tx, rx) = mpsc::sync_channel(1);
            self.jobs
                .send(job(Reply::Blocking(tx)))
                .map_err(|_| gone())?;
            return rx.recv().map_err(|_| gone())?;
        }
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| rustls::Error::General("signing needs a tokio runtime".into()))?;
        let (tx, rx) = oneshot::channel();
        self.jobs.send(job(Reply::Async(tx))).map_err(|_| gone())?;
        tokio::task::block_in_place(|| handle.block_on(rx)).map_err(|_| gone())?
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}
