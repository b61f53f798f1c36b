//! The edge's side of enrollment (`shared/ENROLL.md`): `keyless-edge enroll` joins an
//! edge to a key-server group with a one-time token, and [`renew`] replaces its
//! certificate with a new key pair before it expires. The private key is generated
//! here and never leaves the edge; the token's secret never crosses the network (only
//! its id and a MAC over a server nonce do).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use keyless_shared::enroll::{
    base64url_decode, base64url_encode, EnrollError, EnrollRequest, EnrollResponse, NonceResponse,
    ProofInput, ReenrollRequest, Token, EST_PREFIX, SECRET_LEN,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Longest answer of the enrollment API read.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Deadline of each exchange with the enrollment API.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why enrollment or renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollFailure {
    /// The key server refused, with its code (`token-used`, `bad-proof`, ...).
    #[error("the key server refused: {code}: {message}")]
    Refused {
        /// The stable code of `ENROLL.md`.
        code: String,
        /// Its explanation.
        message: String,
    },
    /// The key server could not be reached or answered something unusable.
    #[error("enrollment API at {server}: {reason}")]
    Exchange {
        /// `host:port`.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// A local file or key could not be read, made or written.
    #[error("{0}")]
    Local(String),
}

/// Where the enrollment API is and how its certificate is checked.
#[derive(Clone, Debug)]
pub struct EnrollServer {
    /// `host:port` of the key server's `enroll_listen`.
    pub addr: String,
    /// Name its certificate must carry.
    pub server_name: ServerName<'static>,
    /// CA certificates its certificate chains to.
    pub ca: PathBuf,
}

/// The files an enrolled edge's `[[keyserver.group]]` names.
#[derive(Clone, Debug)]
pub struct Credential {
    /// The client certificate (PEM chain).
    pub cert: PathBuf,
    /// Its key (PEM, 0600).
    pub key: PathBuf,
}

/// What enrollment returned and wrote.
#[derive(Debug)]
pub struct Enrolled {
    /// The server's answer.
    pub response: EnrollResponse,
    /// Where the credential was written.
    pub credential: Credential,
}

/// A new ECDSA P-256 key pair and a CSR naming `edge_id` (subject CN and DNS SAN).
fn key_and_csr(edge_id: &str) -> Result<(rcgen::KeyPair, Vec<u8>, String), EnrollFailure> {
    let local = |e: rcgen::Error| EnrollFailure::Local(format!("cannot make the CSR: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(local)?;
    let mut params = rcgen::CertificateParams::new(vec![edge_id.to_owned()]).map_err(local)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, edge_id);
    let csr = params.serialize_request(&key).map_err(local)?;
    let pem = csr.pem().map_err(local)?;
    Ok((key, csr.der().to_vec(), pem))
}

/// Enrolls `edge_id` with `token` and writes its credential into `out`: `edge.key`
/// (0600) and `edge.crt`, plus `edge-ca.crt` (the group's CA bundle, for reference).
pub async fn enroll(
    server: &EnrollServer,
    token: &Token,
    edge_id: &str,
    out: &Path,
) -> Result<Enrolled, EnrollFailure> {
    // The directory first: a token spent on a certificate that cannot be written is lost.
    std::fs::create_dir_all(out)
        .map_err(|e| EnrollFailure::Local(format!("cannot create {}: {e}", out.display())))?;
    write_file(&out.join(".write-test"), b"", 0o600)?;
    let _ = std::fs::remove_file(out.join(".write-test"));
    let client = Client::new(server, None)?;
    let nonce: NonceResponse = client.post(&format!("{EST_PREFIX}/nonce"), &()).await?;
    let server_nonce = base64url_decode(&nonce.nonce)
        .ok_or_else(|| client.exchange_error("the nonce is not base64url"))?;
    let (key, csr_der, csr_pem) = key_and_csr(edge_id)?;
    let edge_nonce = ring_random(SECRET_LEN)?;
    let edge_time_ms = unix_millis();
    let digest = ring::digest::digest(&ring::digest::SHA256, &csr_der);
    let proof = ProofInput {
        token_id: &token.id,
        server_nonce: &server_nonce,
        edge_nonce: &edge_nonce,
        edge_id,
        csr_digest: digest.as_ref(),
        edge_time_ms,
    };
    let request = EnrollRequest {
        token_id: token.id.clone(),
        edge_id: edge_id.to_owned(),
        server_nonce: nonce.nonce.clone(),
        edge_nonce: base64url_encode(&edge_nonce),
        edge_time_ms,
        csr: csr_pem,
        mac: base64url_encode(&proof.sign(&token.proof_key())),
    };
    let response: EnrollResponse = client
        .post(&format!("{EST_PREFIX}/simpleenroll"), &request)
        .await?;
    let credential = Credential {
        cert: out.join("edge.crt"),
        key: out.join("edge.key"),
    };
    write_credential(&credential, &key, &response)?;
    write_file(
        &out.join("edge-ca.crt"),
        response.ca_bundle.as_bytes(),
        0o644,
    )?;
    Ok(Enrolled {
        response,
        credential,
    })
}

/// Renews `credential` over mTLS with itself: a new key pair and CSR, the new
/// certificate and key written in place (each file replaced atomically, the key first
/// kept 0600). Returns the answer.
pub async fn renew(
    server: &EnrollServer,
    credential: &Credential,
    edge_id: &str,
) -> Result<EnrollResponse, EnrollFailure> {
    let client = Client::new(server, Some(credential))?;
    let (key, _der, csr) = key_and_csr(edge_id)?;
    let response: EnrollResponse = client
        .post(
            &format!("{EST_PREFIX}/simplereenroll"),
            &ReenrollRequest { csr },
        )
        .await?;
    write_credential(credential, &key, &response)?;
    Ok(response)
}

/// Writes the key, then the certificate, each to a temporary file renamed into place.
fn write_credential(
    credential: &Credential,
    key: &rcgen::KeyPair,
    response: &EnrollResponse,
) -> Result<(), EnrollFailure> {
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    write_file(&credential.key, key_pem.as_bytes(), 0o600)?;
    write_file(&credential.cert, response.certificate.as_bytes(), 0o644)
}

/// `data` into `path` through a temporary file in the same directory (mode `mode`,
/// synced, renamed): a reader sees the old file or the new one, never half of one.
pub(crate) fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), EnrollFailure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let local =
        |e: std::io::Error| EnrollFailure::Local(format!("cannot write {}: {e}", path.display()));
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(local)?;
    f.write_all(data).map_err(local)?;
    f.sync_all().map_err(local)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(local)
}

fn ring_random(n: usize) -> Result<Vec<u8>, EnrollFailure> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| EnrollFailure::Local("no randomness".into()))?;
    Ok(buf)
}

/// Milliseconds since the Unix epoch by this machine's clock.
fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An HTTPS client of the enrollment API: one request per connection.
struct Client {
    server: EnrollServer,
    connector: TlsConnector,
}

impl Client {
    /// Trusts `server.ca`; presents `identity` as client certificate if given.
    fn new(server: &EnrollServer, identity: Option<&Credential>) -> Result<Client, EnrollFailure> {
        let local = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
            EnrollFailure::Local(format!("{what} {}: {e}", path.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(&server.ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| local("cannot read the key-server CA", &server.ca, &e))?;
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| local("unusable key-server CA", &server.ca, &e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| EnrollFailure::Local(e.to_string()))?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let chain = CertificateDer::pem_file_iter(&c.cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| local("cannot read the certificate", &c.cert, &e))?;
                let key = PrivateKeyDer::from_pem_file(&c.key)
                    .map_err(|e| local("cannot read the key", &c.key, &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| local("unusable credential", &c.cert, &e))?
            }
        };
        Ok(Client {
            server: server.clone(),
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    fn exchange_error(&self, reason: impl Into<String>) -> EnrollFailure {
        EnrollFailure::Exchange {
            server: self.server.addr.clone(),
            reason: reason.into(),
        }
    }

    /// POSTs `body` as JSON to `path`; a 200 answer is parsed as `T`, any other as an
    /// [`EnrollError`].
    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, EnrollFailure> {
        let json = serde_json::to_vec(body).map_err(|e| self.exchange_error(e.to_string()))?;
        let exchange = async {
            let tcp = TcpStream::connect(&self.server.addr)
                .await
                .map_err(|e| self.exchange_error(format!("connect: {e}")))?;
            let tls = self
                .connector
                .connect(self.server.server_name.clone(), tcp)
                .await
                .map_err(|e| self.exchange_error(format!("TLS: {e}")))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| self.exchange_error(format!("HTTP: {e}")))?;
            tokio::spawn(conn);
            let request = http::Request::post(path)
                .header(http::header::HOST, self.server.addr.as_str())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json)))
                .map_err(|e| self.exchange_error(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| self.exchange_error(format!("HTTP: {e}")))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| self.exchange_error(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, EnrollFailure>((status, body))
        };
        let (status, body) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| self.exchange_error(format!("no answer within {EXCHANGE_TIMEOUT:?}")))??;
        if status == http::StatusCode::OK {
            return serde_json::from_slice(&body)
                .map_err(|e| self.exchange_error(format!("unusable answer: {e}")));
        }
        match serde_json::from_slice::<EnrollError>(&body) {
            Ok(e) => Err(EnrollFailure::Refused {
                code: e.error,
                message: e.message,
            }),
            Err(_) => Err(self.exchange_error(format!(
                "HTTP {status}: {}",
                keyless_shared::log_safe(&String::from_utf8_lossy(&body[..body.len().min(200)]))
            ))),
        }
    }
}
