//! A client of the key server's enrollment API (`shared/ENROLL.md`), as an edge drives
//! it, with knobs that break one thing at a time (a MAC byte, the clock, the nonce, the
//! CSR's signature or names), and helpers for the operator's side (`keyless-origin
//! token ...`, `edges ...`) and for certificates the tests issue themselves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use keyless_shared::enroll::{
    base64url_decode, base64url_encode, EnrollError, EnrollRequest, EnrollResponse, NonceResponse,
    ProofInput, ReenrollRequest, Token, EST_PREFIX,
};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::bins;

/// Bound on each enrollment request (connect, TLS, answer).
pub const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);

/// An HTTP answer of the enrollment API.
#[derive(Clone, Debug)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Bytes,
}

impl HttpReply {
    /// The `error` code of a refusal (`EnrollError`), if the body is one.
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_slice::<EnrollError>(&self.body)
            .ok()
            .map(|e| e.error)
    }

    /// The body as text, for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What to break in an enrollment (default: nothing).
#[derive(Clone, Debug, Default)]
pub struct Tamper {
    /// Flip a bit of the MAC.
    pub flip_mac: bool,
    /// Added to the edge's clock, in milliseconds.
    pub clock_offset_ms: i64,
    /// Send this server nonce instead of fetching a fresh one (a used, stale or
    /// never-issued nonce).
    pub server_nonce: Option<Vec<u8>>,
    /// Corrupt the CSR's signature (it still parses, but does not verify with its key).
    pub bad_csr_signature: bool,
    /// The id the CSR names, when it is to differ from the edge id asked for.
    pub csr_edge_id: Option<String>,
    /// Send this body instead of a well-formed request.
    pub raw_body: Option<Vec<u8>>,
}

/// One enrollment or renewal attempt: the answer and what the client made for it.
#[derive(Debug)]
pub struct Attempt {
    /// The key server's answer.
    pub reply: HttpReply,
    /// The private key of the CSR, PKCS#8 PEM.
    pub key_pem: String,
    /// The server nonce the request named (enrollment only; empty for renewal).
    pub server_nonce: Vec<u8>,
}

impl Attempt {
    /// The refusal's code, if refused.
    pub fn code(&self) -> Option<String> {
        self.reply.error_code()
    }

    /// The successful answer; an error naming the refusal otherwise.
    pub fn response(&self) -> Result<EnrollResponse> {
        if self.reply.status != 200 {
            bail!(
                "enrollment refused: {} {}",
                self.reply.status,
                self.reply.text()
            );
        }
        serde_json::from_slice(&self.reply.body).context("parsing the EnrollResponse")
    }

    /// Writes the issued certificate and the key as `<dir>/<name>.crt` and `.key`, a
    /// client identity for [`crate::ClientOptions::identity`].
    pub fn write_identity(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        let response = self.response()?;
        std::fs::create_dir_all(dir)?;
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &response.certificate)?;
        std::fs::write(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

/// A client of one key server's enrollment API.
#[derive(Clone, Debug)]
pub struct EnrollClient {
    addr: SocketAddr,
    roots: PathBuf,
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A CSR of a fresh ECDSA P-256 key naming `edge_id` (CN and DNS SAN): PEM and DER,
/// and the key's PEM.
pub fn make_csr(edge_id: &str, bad_signature: bool) -> Result<(String, Vec<u8>, String)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![edge_id.to_owned()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, edge_id);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    let mut der = csr.der().to_vec();
    if bad_signature {
        // The last byte is inside the signature's s INTEGER: the CSR still parses.
        if let Some(last) = der.last_mut() {
            *last ^= 0x01;
        }
    }
    Ok((pem("CERTIFICATE REQUEST", &der), der, key.serialize_pem()))
}

/// PEM text of `der` under `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = openssl::base64::encode_block(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl EnrollClient {
    /// A client of the API at `addr`, whose certificate must chain to `roots` and name
    /// `localhost`.
    pub fn new(addr: SocketAddr, roots: &Path) -> EnrollClient {
        EnrollClient {
            addr,
            roots: roots.to_owned(),
        }
    }

    /// One request on a new connection, with `identity` as client certificate.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        identity: Option<&(PathBuf, PathBuf)>,
    ) -> Result<HttpReply> {
        tokio::time::timeout(
            ENROLL_TIMEOUT,
            self.request_inner(method, path, body, identity),
        )
        .await
        .with_context(|| format!("{method} {path}: no answer within {ENROLL_TIMEOUT:?}"))?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        identity: Option<&(PathBuf, PathBuf)>,
    ) -> Result<HttpReply> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.roots)? {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
                builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key)?)?
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to the enrollment API at {}", self.addr))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost")?, tcp)
            .await
            .context("TLS handshake with the enrollment API")?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP/1.1 handshake")?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        connection.abort();
        Ok(HttpReply { status, body })
    }

    /// `POST /.well-known/est/nonce`.
    pub async fn nonce(&self) -> Result<NonceResponse> {
        let reply = self
            .request("POST", &format!("{EST_PREFIX}/nonce"), None, None)
            .await?;
        if reply.status != 200 {
            bail!("nonce: {} {}", reply.status, reply.text());
        }
        serde_json::from_slice(&reply.body).context("parsing the NonceResponse")
    }

    /// A fresh server nonce, decoded.
    pub async fn fresh_nonce(&self) -> Result<Vec<u8>> {
        let n = self.nonce().await?;
        base64url_decode(&n.nonce).context("the nonce is not base64url")
    }

    /// `POST /.well-known/est/simpleenroll` as `edge_id` with `token`, broken as
    /// `tamper` says.
    pub async fn enroll(&self, token: &Token, edge_id: &str, tamper: &Tamper) -> Result<Attempt> {
        let server_nonce = match &tamper.server_nonce {
            Some(n) => n.clone(),
            None => self.fresh_nonce().await?,
        };
        let csr_id = tamper.csr_edge_id.as_deref().unwrap_or(edge_id);
        let (csr_pem, csr_der, key_pem) = make_csr(csr_id, tamper.bad_csr_signature)?;
        let edge_nonce = crate::keys::random_bytes(32);
        let edge_time_ms = unix_millis().saturating_add_signed(tamper.clock_offset_ms);
        let digest = ring::digest::digest(&ring::digest::SHA256, &csr_der);
        // ENROLL.md: the MAC is keyed with SHA-256 of the token's secret.
        let key = token.proof_key();
        let mut mac = ProofInput {
            token_id: &token.id,
            server_nonce: &server_nonce,
            edge_nonce: &edge_nonce,
            edge_id,
            csr_digest: digest.as_ref(),
            edge_time_ms,
        }
        .sign(&key);
        if tamper.flip_mac {
            if let Some(b) = mac.first_mut() {
                *b ^= 0x01;
            }
        }
        let body = match &tamper.raw_body {
            Some(raw) => raw.clone(),
            None => serde_json::to_vec(&EnrollRequest {
                token_id: token.id.clone(),
                edge_id: edge_id.to_owned(),
                server_nonce: base64url_encode(&server_nonce),
                edge_nonce: base64url_encode(&edge_nonce),
                edge_time_ms,
                csr: csr_pem,
                mac: base64url_encode(&mac),
            })?,
        };
        let reply = self
            .request(
                "POST",
                &format!("{EST_PREFIX}/simpleenroll"),
                Some(body),
                None,
            )
            .await?;
        Ok(Attempt {
            reply,
            key_pem,
            server_nonce,
        })
    }

    /// `POST /.well-known/est/simplereenroll` with `identity` as client certificate and
    /// a CSR of a new key naming `edge_id`.
    pub async fn reenroll(
        &self,
        identity: Option<&(PathBuf, PathBuf)>,
        edge_id: &str,
        tamper: &Tamper,
    ) -> Result<Attempt> {
        let csr_id = tamper.csr_edge_id.as_deref().unwrap_or(edge_id);
        let (csr, _, key_pem) = make_csr(csr_id, tamper.bad_csr_signature)?;
        let body = match &tamper.raw_body {
            Some(raw) => raw.clone(),
            None => serde_json::to_vec(&ReenrollRequest { csr })?,
        };
        let reply = self
            .request(
                "POST",
                &format!("{EST_PREFIX}/simplereenroll"),
                Some(body),
                identity,
            )
            .await?;
        Ok(Attempt {
            reply,
            key_pem,
            server_nonce: Vec::new(),
        })
    }

    /// `GET /.well-known/est/<group>/cacerts`.
    pub async fn cacerts(&self, group: &str) -> Result<HttpReply> {
        self.request("GET", &format!("{EST_PREFIX}/{group}/cacerts"), None, None)
            .await
    }
}

/// Runs `keyless-origin <args>` (an admin command) and returns its output.
pub fn origin_admin(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(bins::origin_bin()?);
    cmd.args(args).env("NO_COLOR", "1").env_remove("RUST_LOG");
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// `keyless-origin token create --config CONFIG --group GROUP --ttl TTL [--edge-id ID]`:
/// the token it printed.
pub fn create_token(config: &Path, group: &str, ttl: &str, edge_id: Option<&str>) -> Result<Token> {
    let config = config.to_string_lossy();
    let mut args = vec![
        "token", "create", "--config", &config, "--group", group, "--ttl", ttl,
    ];
    if let Some(id) = edge_id {
        args.extend(["--edge-id", id]);
    }
    let out = origin_admin(&args)?;
    if !out.status.success() {
        bail!(
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8(out.stdout)?;
    if stdout.lines().count() != 1 {
        bail!("token create printed more than the token: {stdout:?}");
    }
    Token::parse(&stdout).context("token create printed no token")
}

/// A CA made by the test (not by `keyless-certs init`): certificate and key, PEM.
#[derive(Debug)]
pub struct TestCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA key, PEM.
    pub key_pem: String,
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn generate(name: &str) -> Result<TestCa> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA `keyless-certs init` wrote as `<dir>/ca/<name>.{crt,key}`.
    pub fn load(dir: &Path, name: &str) -> Result<TestCa> {
        Ok(TestCa {
            cert_pem: std::fs::read_to_string(dir.join(format!("ca/{name}.crt")))?,
            key_pem: std::fs::read_to_string(dir.join(format!("ca/{name}.key")))?,
        })
    }

    /// Issues a certificate for a new key: CN and DNS SANs `dns` (the first is the CN),
    /// URI SAN `uri` when given, for `server` or client use. Returns the certificate
    /// and key PEM.
    pub fn issue(&self, dns: &[&str], uri: Option<&str>, server: bool) -> Result<(String, String)> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, KeyPair::from_pem(&self.key_pem)?)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns.first().copied().unwrap_or("test"));
        params.distinguished_name = dn;
        if server {
            params
                .subject_alt_names
                .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        }
        if let Some(uri) = uri {
            params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        }
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Like [`TestCa::issue`] for a client, written as `<dir>/<name>.crt` and `.key`.
    pub fn issue_client(
        &self,
        dir: &Path,
        name: &str,
        dns: &str,
        uri: Option<&str>,
    ) -> Result<(PathBuf, PathBuf)> {
        let (cert, key) = self.issue(&[dns], uri, false)?;
        std::fs::create_dir_all(dir)?;
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert)?;
        std::fs::write(&k, key)?;
        Ok((c, k))
    }
}

/// Replaces `path` with `contents` by writing a temporary file and renaming it over
/// the old one, as an operator's deploy tool would.
pub fn replace_file(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("tmp-replace");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming over {}", path.display()))
}
