//! The enrollment API (`ENROLL.md`): HTTPS on `enroll_listen` with the key server's
//! own identity, client certificates optional (required for renewal).
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections, each with the TLS handshake
//! deadline of the Keyless listener, [`HEADER_TIMEOUT`] for its request headers and
//! [`CONNECTION_TIMEOUT`] in all; request bodies of [`MAX_BODY`] bytes at most, read
//! within [`REQUEST_TIMEOUT`]; outstanding nonces bounded (see [`nonces`]). State
//! changes run on blocking threads under the state directory's lock.

pub(crate) mod issue;
mod nonces;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use keyless_shared::enroll::{
    base64url_decode, base64url_encode, EnrollError, EnrollRequest, EnrollResponse, NonceResponse,
    ProofInput, ReenrollRequest, EST_PREFIX,
};
use keyless_shared::log_safe;
use keyless_shared::serve::accept;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::*;

use crate::server::Shared;
use crate::state::{now_secs, EdgeRecord, StateDir, TokenUse};
use crate::tls::{edge_name, EdgeName, GroupState};

pub(crate) use nonces::{Nonces, MAX_NONCES, NONCE_LIFETIME};

/// Connections to the enrollment API at most; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
/// A request body larger than this is refused (a CSR is about 1 KiB).
const MAX_BODY: usize = 64 * 1024;
/// Time for a client to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to read a request body and answer it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection's whole life at most.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// A refusal: the HTTP status, the code of `ENROLL.md`'s table and a message for the
/// operator (logged, and sent: it says what was wrong with the request, nothing of the
/// key server's secrets).
#[derive(Debug)]
pub(crate) struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn refusal(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

fn bad_request(message: impl Into<String>) -> Refusal {
    refusal(StatusCode::BAD_REQUEST, "bad-request", message)
}

fn internal(message: impl Into<String>) -> Refusal {
    refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
}

/// The enrollment service.
pub(crate) struct Enroll {
    shared: Arc<Shared>,
    state: StateDir,
    nonces: Mutex<Nonces>,
}

impl Enroll {
    pub(crate) fn new(shared: Arc<Shared>, state: StateDir) -> Enroll {
        Enroll {
            shared,
            state,
            nonces: Mutex::new(Nonces::new(MAX_NONCES, NONCE_LIFETIME)),
        }
    }

    fn nonces(&self) -> std::sync::MutexGuard<'_, Nonces> {
        // Nothing in the critical sections panics; recover the map if it ever did.
        self.nonces.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves the enrollment API on `listener` until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, enroll: Arc<Enroll>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, peer, permit)) = accept(&listener, Some(&limit), &shutdown).await {
        let enroll = enroll.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = connection(tcp, peer, enroll) => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

async fn connection(tcp: tokio::net::TcpStream, peer: SocketAddr, enroll: Arc<Enroll>) {
    let acceptor = TlsAcceptor::from(enroll.shared.tls().enroll_config.clone());
    let tls =
        match tokio::time::timeout(enroll.shared.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "enrollment: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "enrollment: TLS handshake timed out");
                return;
            }
        };
    let client_cert: Option<Arc<CertificateDer<'static>>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Arc::new(c.clone().into_owned()));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let enroll = enroll.clone();
        let client_cert = client_cert.clone();
        async move {
            let reply = match tokio::time::timeout(
                REQUEST_TIMEOUT,
                route(req, &enroll, peer, client_cert.as_deref()),
            )
            .await
            {
                Ok(reply) => reply,
                Err(_) => error_response(&refusal(
                    StatusCode::REQUEST_TIMEOUT,
                    "bad-request",
                    "request not received in time",
                )),
            };
            Ok::<_, Infallible>(reply)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "enrollment: connection ended"),
        Err(_) => tracing::debug!(%peer, "enrollment: connection timed out"),
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn ok_json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => error_response(&internal(format!("encoding the answer: {e}"))),
    }
}

fn error_response(r: &Refusal) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&EnrollError {
        error: r.code.to_owned(),
        message: r.message.clone(),
    })
    .unwrap_or_default();
    json_response(r.status, body)
}

async fn route(
    req: Request<Incoming>,
    enroll: &Arc<Enroll>,
    peer: SocketAddr,
    client_cert: Option<&CertificateDer<'static>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(EST_PREFIX) else {
        return error_response(&refusal(StatusCode::NOT_FOUND, "not-found", "no such path"));
    };
    let method = req.method().clone();
    match (rest, &method) {
        ("/nonce", &Method::POST) => nonce(enroll),
        ("/simpleenroll", &Method::POST) => match body(req).await {
            Ok(body) => simpleenroll(enroll, body, peer).await,
            Err(r) => error_response(&r),
        },
        ("/simplereenroll", &Method::POST) => {
            let body = body(req).await;
            reenroll(enroll, body, peer, client_cert).await
        }
        ("/nonce" | "/simpleenroll" | "/simplereenroll", _) => error_response(&refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "bad-request",
            "use POST",
        )),
        (rest, &Method::GET) => match rest
            .strip_suffix("/cacerts")
            .and_then(|g| g.strip_prefix('/'))
        {
            Some(group) => cacerts(enroll, group),
            None => error_response(&refusal(StatusCode::NOT_FOUND, "not-found", "no such path")),
        },
        _ => error_response(&refusal(StatusCode::NOT_FOUND, "not-found", "no such path")),
    }
}

/// The request body, at most [`MAX_BODY`] bytes.
async fn body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "bad-request",
            format!("body larger than {MAX_BODY} bytes"),
        )),
        Err(e) => Err(bad_request(format!("reading the body: {e}"))),
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn nonce(enroll: &Enroll) -> Response<Full<Bytes>> {
    let Some(nonce) = enroll.nonces().issue(Instant::now()) else {
        return error_response(&internal("the random number generator failed"));
    };
    ok_json(&NonceResponse {
        nonce: base64url_encode(&nonce),
        server_time_ms: unix_millis(),
        expires_in: NONCE_LIFETIME.as_secs(),
    })
}

fn cacerts(enroll: &Enroll, group: &str) -> Response<Full<Bytes>> {
    let tls = enroll.shared.tls();
    let Some(g) = tls.group(group) else {
        return error_response(&refusal(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such group",
        ));
    };
    let mut resp = Response::new(Full::new(Bytes::from(g.ca_pem.clone())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/pem-certificate-chain"),
    );
    resp
}

/// Whether `id` can be an edge id: a lowercase DNS name (it becomes the certificate's
/// CN and DNS SAN, and a segment of its group URI).
pub(crate) fn valid_edge_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// The DER of a PEM CSR field; `None` if it is not one PEM certificate request.
fn csr_der(pem: &str) -> Option<Vec<u8>> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|der| der.as_ref().to_vec())
}

/// An enrollment request with its fields decoded.
struct Decoded {
    req: EnrollRequest,
    server_nonce: Vec<u8>,
    edge_nonce: Vec<u8>,
    mac: Vec<u8>,
    csr: Vec<u8>,
}

/// What an audit line of an enrollment says.
struct AuditCtx<'a> {
    op: &'static str,
    peer: SocketAddr,
    group: Option<&'a str>,
    edge_id: Option<&'a str>,
    token_id: Option<&'a str>,
}

impl AuditCtx<'_> {
    fn refused(&self, enroll: &Enroll, r: &Refusal) {
        enroll.shared.metrics.enrollment(self.op, r.code);
        tracing::warn!(
            target: "audit",
            op = self.op,
            result = r.code,
            peer = %self.peer,
            group = %self.group.map(log_safe).map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            edge_id = %self.edge_id.map(log_safe).map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            token_id = %self.token_id.map(log_safe).map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            reason = %log_safe(&r.message),
            "enrollment refused"
        );
    }

    fn issued(&self, enroll: &Enroll, serial: &str, not_after: u64) {
        enroll.shared.metrics.enrollment(self.op, "ok");
        tracing::info!(
            target: "audit",
            op = self.op,
            result = "ok",
            peer = %self.peer,
            group = %self.group.map(log_safe).map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            edge_id = %self.edge_id.map(log_safe).map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            token_id = %self.token_id.map(log_safe).map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            serial,
            not_after,
            "edge certificate issued"
        );
    }
}

async fn simpleenroll(
    enroll: &Arc<Enroll>,
    body: Bytes,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let req: Result<EnrollRequest, _> = serde_json::from_slice(&body);
    let mut audit = AuditCtx {
        op: "enroll",
        peer,
        group: None,
        edge_id: None,
        token_id: None,
    };
    let req = match req {
        Ok(req) => req,
        Err(e) => {
            let r = bad_request(format!("not an EnrollRequest: {e}"));
            audit.refused(enroll, &r);
            return error_response(&r);
        }
    };
    // The nonce is consumed by the first request that names it, whatever follows.
    let server_nonce = base64url_decode(&req.server_nonce);
    let nonce_ok = server_nonce
        .as_deref()
        .is_some_and(|n| enroll.nonces().take(n, Instant::now()));
    let edge_id = req.edge_id.clone();
    let token_id = req.token_id.clone();
    audit.edge_id = Some(&edge_id);
    audit.token_id = Some(&token_id);
    let decoded = match decode(req, server_nonce) {
        Ok(d) => d,
        Err(r) => {
            audit.refused(enroll, &r);
            return error_response(&r);
        }
    };
    if !nonce_ok {
        let r = refusal(
            StatusCode::UNAUTHORIZED,
            "nonce-unknown",
            "the server nonce was never issued, has expired or was used already",
        );
        audit.refused(enroll, &r);
        return error_response(&r);
    }
    let task = enroll.clone();
    let outcome = tokio::task::spawn_blocking(move || task.enroll_blocking(decoded))
        .await
        .unwrap_or_else(|e| Err((None, internal(format!("enrollment task failed: {e}")))));
    match outcome {
        Ok((group, resp, serial)) => {
            audit.group = Some(&group);
            audit.issued(enroll, &serial, resp.not_after);
            ok_json(&resp)
        }
        Err((group, r)) => {
            audit.group = group.as_deref();
            audit.refused(enroll, &r);
            error_response(&r)
        }
    }
}

/// Decodes the fields of `req` (`bad-request` if one is malformed).
fn decode(req: EnrollRequest, server_nonce: Option<Vec<u8>>) -> Result<Decoded, Refusal> {
    let server_nonce = server_nonce.ok_or_else(|| bad_request("server_nonce: not base64url"))?;
    if req.token_id.is_empty()
        || req.token_id.len() > 64
        || !req.token_id.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(bad_request("token_id: not a token id"));
    }
    if !valid_edge_id(&req.edge_id) {
        return Err(bad_request("edge_id: not a lowercase DNS name"));
    }
    let edge_nonce = base64url_decode(&req.edge_nonce)
        .filter(|n| (16..=64).contains(&n.len()))
        .ok_or_else(|| bad_request("edge_nonce: not 16 to 64 bytes of base64url"))?;
    let mac = base64url_decode(&req.mac)
        .filter(|m| m.len() == 32)
        .ok_or_else(|| bad_request("mac: not 32 bytes of base64url"))?;
    let csr = csr_der(&req.csr).ok_or_else(|| bad_request("csr: not a PEM CERTIFICATE REQUEST"))?;
    Ok(Decoded {
        req,
        server_nonce,
        edge_nonce,
        mac,
        csr,
    })
}

type Outcome = Result<(String, EnrollResponse, String), (Option<String>, Refusal)>;

impl Enroll {
    /// The checks of `ENROLL.md` after the nonce, in its order, then the issuance; under
    /// the state lock, so a token cannot be used twice by racing requests (or processes).
    fn enroll_blocking(&self, d: Decoded) -> Outcome {
        let lock = self
            .state
            .lock()
            .map_err(|e| (None, internal(e.to_string())))?;
        let mut tokens = self
            .state
            .tokens()
            .map_err(|e| (None, internal(e.to_string())))?;
        let token_id = d.req.token_id.to_ascii_lowercase();
        let unauthorized = |code, message: &str| refusal(StatusCode::UNAUTHORIZED, code, message);
        let Some(token) = tokens.iter_mut().find(|t| t.id == token_id) else {
            return Err((None, unauthorized("token-unknown", "no token with that id")));
        };
        let group = token.group.clone();
        let fail = |r: Refusal| (Some(group.clone()), r);
        let now = now_secs();
        check_token(token, &d, now).map_err(&fail)?;
        let tls = self.shared.tls();
        let Some(g) = tls.group(&group) else {
            return Err(fail(internal("the token's group is not configured")));
        };
        let offset = unix_millis().abs_diff(d.req.edge_time_ms);
        let allowed = u64::try_from(g.config.max_clock_offset.as_millis()).unwrap_or(u64::MAX);
        if offset > allowed {
            return Err(fail(unauthorized(
                "clock-skew",
                &format!(
                    "the edge's clock is {offset} ms from the key server's (at most {allowed} ms)"
                ),
            )));
        }
        if token
            .edge_id
            .as_ref()
            .is_some_and(|bound| *bound != d.req.edge_id)
        {
            return Err(fail(refusal(
                StatusCode::FORBIDDEN,
                "edge-id-mismatch",
                "the token is bound to another edge id",
            )));
        }
        let csr = check_csr(&d.csr, &d.req.edge_id).map_err(&fail)?;
        let revoked = self
            .state
            .revoked_set()
            .map_err(|e| fail(internal(e.to_string())))?;
        if revoked.contains(&group, &d.req.edge_id) {
            return Err(fail(refusal(
                StatusCode::FORBIDDEN,
                "edge-revoked",
                "the edge id is revoked",
            )));
        }
        let issued =
            issue::issue(g, &d.req.edge_id, &csr).map_err(|e| fail(internal(e.to_string())))?;
        token.used = Some(TokenUse {
            at: now,
            edge_id: d.req.edge_id.clone(),
        });
        // Marked used on disk before anything is answered.
        self.state
            .write_tokens(tokens, &lock)
            .map_err(|e| fail(internal(e.to_string())))?;
        self.record(g, &d.req.edge_id, &issued, false, &lock)
            .map_err(&fail)?;
        let resp = response(g, &d.req.edge_id, &issued);
        Ok((group, resp, issued.serial))
    }

    fn record(
        &self,
        g: &GroupState,
        edge_id: &str,
        issued: &issue::Issued,
        renewal: bool,
        lock: &crate::state::StateLock,
    ) -> Result<(), Refusal> {
        let now = now_secs();
        self.state
            .record_edge(
                EdgeRecord {
                    group: g.config.name.clone(),
                    edge_id: edge_id.to_owned(),
                    serial: issued.serial.clone(),
                    not_after: issued.not_after,
                    enrolled: now,
                    last_seen: now,
                },
                renewal,
                lock,
            )
            .map_err(|e| internal(e.to_string()))
    }

    /// Renewal: the client certificate names the edge; its CSR must name it too.
    fn reenroll_blocking(
        &self,
        name: &EdgeName,
        csr: &[u8],
    ) -> Result<(EnrollResponse, String), Refusal> {
        let tls = self.shared.tls();
        let Some(g) = tls.group(&name.group) else {
            return Err(internal("the certificate's group is not configured"));
        };
        let lock = self.state.lock().map_err(|e| internal(e.to_string()))?;
        let revoked = self
            .state
            .revoked_set()
            .map_err(|e| internal(e.to_string()))?;
        if revoked.contains(&name.group, &name.edge_id) {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "edge-revoked",
                "the edge id is revoked",
            ));
        }
        let csr = check_csr(csr, &name.edge_id)?;
        let issued = issue::issue(g, &name.edge_id, &csr).map_err(|e| internal(e.to_string()))?;
        self.record(g, &name.edge_id, &issued, true, &lock)?;
        Ok((response(g, &name.edge_id, &issued), issued.serial))
    }
}

/// `edge-id-mismatch` if the CSR names another id, `bad-csr` if it does not parse or
/// its signature does not verify with its own key.
fn check_csr(der: &[u8], edge_id: &str) -> Result<rcgen::CertificateSigningRequestParams, Refusal> {
    if !issue::csr_names_only(der, edge_id) {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "edge-id-mismatch",
            "the CSR names another id",
        ));
    }
    issue::parse_csr(der).map_err(|e| {
        refusal(
            StatusCode::BAD_REQUEST,
            "bad-csr",
            format!("the CSR does not parse or its signature does not verify: {e}"),
        )
    })
}

fn response(g: &GroupState, edge_id: &str, issued: &issue::Issued) -> EnrollResponse {
    EnrollResponse {
        group: g.config.name.clone(),
        edge_id: edge_id.to_owned(),
        certificate: issued.pem.clone(),
        ca_bundle: g.ca_pem.clone(),
        not_after: issued.not_after,
    }
}

/// Whether the certificate's `notAfter` has passed.
fn expired(cert: &CertificateDer<'_>) -> bool {
    X509Certificate::from_der(cert)
        .map(|(_, c)| {
            c.validity().not_after.timestamp() <= i64::try_from(now_secs()).unwrap_or(i64::MAX)
        })
        .unwrap_or(true)
}

async fn reenroll(
    enroll: &Arc<Enroll>,
    body: Result<Bytes, Refusal>,
    peer: SocketAddr,
    client_cert: Option<&CertificateDer<'static>>,
) -> Response<Full<Bytes>> {
    let mut audit = AuditCtx {
        op: "reenroll",
        peer,
        group: None,
        edge_id: None,
        token_id: None,
    };
    // The handshake verified the certificate against its group's CA; a certificate
    // without a group URI never gets this far on this listener.
    let name = client_cert
        .filter(|c| !expired(c))
        .and_then(|c| edge_name(c).ok().flatten());
    let Some(name) = name else {
        let r = refusal(
            StatusCode::UNAUTHORIZED,
            "no-client-certificate",
            "renewal needs the edge's current, unexpired certificate as TLS client certificate",
        );
        audit.refused(enroll, &r);
        return error_response(&r);
    };
    audit.group = Some(&name.group);
    audit.edge_id = Some(&name.edge_id);
    let csr = body.and_then(|body| {
        let req: ReenrollRequest = serde_json::from_slice(&body)
            .map_err(|e| bad_request(format!("not a ReenrollRequest: {e}")))?;
        csr_der(&req.csr).ok_or_else(|| bad_request("csr: not a PEM CERTIFICATE REQUEST"))
    });
    let csr = match csr {
        Ok(csr) => csr,
        Err(r) => {
            audit.refused(enroll, &r);
            return error_response(&r);
        }
    };
    let task = enroll.clone();
    let task_name = name.clone();
    let outcome = tokio::task::spawn_blocking(move || task.reenroll_blocking(&task_name, &csr))
        .await
        .unwrap_or_else(|e| Err(internal(format!("renewal task failed: {e}"))));
    match outcome {
        Ok((resp, serial)) => {
            audit.issued(enroll, &serial, resp.not_after);
            ok_json(&resp)
        }
        Err(r) => {
            audit.refused(enroll, &r);
            error_response(&r)
        }
    }
}

/// The token's state (revoked, expired, used, in that order) and the proof made with
/// it, compared in constant time.
fn check_token(token: &crate::state::TokenRecord, d: &Decoded, now: u64) -> Result<(), Refusal> {
    let unauthorized = |code, message: &str| refusal(StatusCode::UNAUTHORIZED, code, message);
    if token.revoked.is_some() {
        return Err(unauthorized("token-revoked", "the token was revoked"));
    }
    if now >= token.expires {
        return Err(unauthorized("token-expired", "the token has expired"));
    }
    if token.used.is_some() {
        return Err(unauthorized("token-used", "the token was used already"));
    }
    let key = hex::decode(&token.secret_sha256)
        .map_err(|_| internal("tokens.json: secret_sha256 is not hex"))?;
    let csr_digest = ring::digest::digest(&ring::digest::SHA256, &d.csr);
    let proof = ProofInput {
        token_id: &d.req.token_id,
        server_nonce: &d.server_nonce,
        edge_nonce: &d.edge_nonce,
        edge_id: &d.req.edge_id,
        csr_digest: csr_digest.as_ref(),
        edge_time_ms: d.req.edge_time_ms,
    };
    if !proof.verify(&key, &d.mac) {
        return Err(unauthorized("bad-proof", "the proof does not verify"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_ids_are_lowercase_dns_names() {
        for ok in ["edge-1", "e", "a.b-c.d0"] {
            assert!(valid_edge_id(ok), "{ok}");
        }
        for bad in ["", "Edge", "a/b", "a..b", "-a", "a-", "a b", "é"] {
            assert!(!valid_edge_id(bad), "{bad}");
        }
    }
}
