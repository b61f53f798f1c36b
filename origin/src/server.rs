//! The mTLS listener and the per-connection request loop.
//!
//! A connection's client is its identity (what ACLs name) and its group (from the
//! certificate's group URI, checked against the group's CA in the handshake by
//! `tls::EdgeVerifier`): a key outside the group's keys is answered `not-in-group`
//! before ACLs are consulted.
//!
//! Bounds, from the socket in:
//! - connections still in their TLS handshake have their own budget
//!   (`max_unauthenticated_connections`) and deadline (`handshake_timeout`); when the
//!   budget is full the oldest pending handshake is dropped for the new one, so idle TCP
//!   connections cannot lock edges out. `max_connections` counts authenticated ones;
//!   one over the limit is closed after its handshake.
//! - each connection has a reader (this task) and a writer task. Every request read
//!   takes an in-flight permit that its reply gives back only once written to the
//!   socket, errors included, so a connection holds at most
//!   `max_in_flight_per_connection` requests and replies; the reply channel has room
//!   for exactly that many. With no permit free the connection is not read further,
//!   and a wait for one, like a write of replies, longer than `stall_timeout` closes it.
//! - private-key work: ECDSA and Ed25519 inline, RSA through the bounded worker queue
//!   (see `pool`).
//!
//! Drain (SIGTERM, `Shared::start_drain`): the accept loop has already stopped; each
//! connection queues one unsolicited go-away (id 0) behind the replies already waiting
//! and goes on serving until its edge closes it, and pongs say `draining`. The hard
//! stop (`shutdown`: SIGINT, or the end of the drain) closes connections at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use keyless_shared::serve::accept;
use keyless_shared::{
    check_signing_context, encode_message, log_safe, CodecError, ErrorCode, KeyPreference,
    KeylessCodec, Message, Opcode, Operation, PolicyError, Ski, MAX_BODY_LEN,
};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, IdentitySource};
use crate::keystore::{KeyEntry, Keystore, NameLookup};
use crate::metrics::Metrics;
use crate::pool::{Job, Pool};
use crate::tls::{GroupState, TlsState};

/// Everything a connection needs, shared.
pub(crate) struct Shared {
    pub(crate) keystore: RwLock<Arc<Keystore>>,
    pub(crate) tls: RwLock<Arc<TlsState>>,
    /// Bumped on every TLS reload; open connections re-check their certificate.
    pub(crate) tls_generation: watch::Sender<u64>,
    /// Held by each TLS rebuild from reading its configuration to installing the result
    /// (`watch::rebuild`), so rebuilds apply in order.
    pub(crate) rebuild_lock: tokio::sync::Mutex<()>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pool: Pool,
    pub(crate) require_handshake_context: bool,
    pub(crate) identity: IdentitySource,
    pub(crate) max_in_flight: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) stall_timeout: Duration,
    /// Cancelled when the key server starts draining (SIGTERM).
    pub(crate) drain: CancellationToken,
    /// Session-ticket keys of each group.
    pub(crate) tickets: crate::tickets::TicketKeys,
}

fn read<T: ?Sized>(lock: &RwLock<Arc<T>>) -> Arc<T> {
    // A poisoned lock only means a panic elsewhere while swapping an Arc; the Arc
    // inside is still whole.
    match lock.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn write<T: ?Sized>(lock: &RwLock<Arc<T>>, value: Arc<T>) {
    match lock.write() {
        Ok(mut g) => *g = value,
        Err(p) => *p.into_inner() = value,
    }
}

impl Shared {
    pub(crate) fn keystore(&self) -> Arc<Keystore> {
        read(&self.keystore)
    }

    pub(crate) fn install(&self, store: Keystore) {
        store.report(&self.metrics);
        write(&self.keystore, Arc::new(store));
    }

    pub(crate) fn tls(&self) -> Arc<TlsState> {
        read(&self.tls)
    }

    /// Installs a rebuilt TLS configuration: used for every new connection, and open
    /// connections re-check their client certificate against it.
    pub(crate) fn install_tls(&self, tls: TlsState) {
        write(&self.tls, Arc::new(tls));
        self.tls_generation.send_modify(|g| *g += 1);
    }

    /// Starts the drain: every open connection sends its edge a go-away and from then
    /// on pongs carry `draining`. The caller has stopped accepting connections.
    pub(crate) fn start_drain(&self) {
        self.metrics.draining.set(1);
        self.drain.cancel();
    }

    fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }
}

/// Handshakes in progress, oldest first; admitting one over the budget evicts the
/// oldest.
struct Pending {
    budget: usize,
    inner: Mutex<PendingInner>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct PendingInner {
    next: u64,
    by_age: BTreeMap<u64, CancellationToken>,
}

/// A handshake's place in [`Pending`]; dropping it leaves.
struct PendingSlot {
    pending: Arc<Pending>,
    seq: u64,
    evicted: CancellationToken,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingInner> {
        // Nothing in the critical sections can panic; recover the map if it ever did.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(self: &Arc<Self>) -> PendingSlot {
        let evicted = CancellationToken::new();
        let mut inner = self.lock();
        while inner.by_age.len() >= self.budget {
            match inner.by_age.pop_first() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        let seq = inner.next;
        inner.next += 1;
        inner.by_age.insert(seq, evicted.clone());
        self.metrics
            .connections_handshaking
            .set(inner.by_age.len() as i64);
        PendingSlot {
            pending: self.clone(),
            seq,
            evicted,
        }
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut inner = self.pending.lock();
        inner.by_age.remove(&self.seq);
        self.pending
            .metrics
            .connections_handshaking
            .set(inner.by_age.len() as i64);
    }
}

/// Accepts edge connections until `shutdown` or until dropped (dropping the future
/// closes the listener); connections are tracked by `tracker`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    config: &Config,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let authenticated = Arc::new(Semaphore::new(config.max_connections.get()));
    let pending = Arc::new(Pending {
        budget: config.max_unauthenticated_connections.get(),
        inner: Mutex::new(PendingInner::default()),
        metrics: shared.metrics.clone(),
    });
    // No connection bound at accept: pending handshakes have their own budget and
    // authenticated connections are counted after the handshake.
    while let Some((tcp, peer, _)) = accept(&listener, None, &shutdown).await {
        let slot = pending.admit();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let authenticated = authenticated.clone();
        tracker.spawn(async move {
            let Some((tls, client, permit)) =
                handshake(tcp, peer, slot, &authenticated, &shared, &shutdown).await
            else {
                return;
            };
            let _permit = permit;
            connection(tls, peer, client, shared, shutdown).await;
        });
    }
}

/// Who an authenticated connection is: the identity ACLs name and, for a certificate
/// with a group URI, its group (`None`: the implicit group of `[tls] client_ca`).
struct Client {
    identity: Arc<str>,
    group: Option<Arc<GroupState>>,
}

/// Runs the TLS handshake within its deadline and budget and names the client; `None`
/// when the connection is not to be served (the reason is logged and counted).
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: PendingSlot,
    authenticated: &Arc<Semaphore>,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Option<(TlsStream<TcpStream>, Client, OwnedSemaphorePermit)> {
    let metrics = &shared.metrics;
    let tls_state = shared.tls();
    let acceptor = TlsAcceptor::from(tls_state.keyless.clone());
    let accepted = tokio::select! {
        r = tokio::time::timeout(shared.handshake_timeout, acceptor.accept(tcp)) => r,
        () = slot.evicted.cancelled() => {
            tracing::debug!(%peer, "key server: pending handshake dropped for a newer connection");
            metrics.connection("handshake-evicted");
            return None;
        }
        () = shutdown.cancelled() => return None,
    };
    drop(slot);
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "key server: TLS handshake with edge failed");
            metrics.connection("handshake-failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "key server: TLS handshake with edge timed out");
            metrics.connection("handshake-timeout");
            return None;
        }
    };
    let (_, conn) = tls.get_ref();
    let cert = conn.peer_certificates().and_then(|c| c.first());
    let Some(identity) = crate::tls::client_identity(cert, shared.identity) else {
        tracing::warn!(%peer, source = ?shared.identity, "edge certificate has no identity in the configured field; closing");
        metrics.connection("no-identity");
        return None;
    };
    // The verifier has checked the group URI against the group's CA already; a group
    // missing here can only be one removed by a reload in between.
    let group = match cert.map(crate::tls::edge_name) {
        Some(Ok(Some(name))) => match tls_state.group(&name.group) {
            Some(g) => Some(g.clone()),
            None => {
                tracing::warn!(target: "audit", %peer, client = %log_safe(&identity), group = %log_safe(&name.group), "edge certificate names a group that is not configured; closing");
                metrics.connection("unknown-group");
                return None;
            }
        },
        // No certificate has no identity either: refused above.
        Some(Ok(None)) | None => None,
        Some(Err(reason)) => {
            tracing::warn!(target: "audit", %peer, client = %log_safe(&identity), %reason, "edge certificate has a malformed group URI; closing");
            metrics.connection("bad-group");
            return None;
        }
    };
    let Ok(permit) = authenticated.clone().try_acquire_owned() else {
        tracing::warn!(%peer, client = %log_safe(&identity), "max_connections reached; closing the new edge connection");
        metrics.connection("over-limit");
        return None;
    };
    let client = Client {
        identity: identity.into(),
        group,
    };
    Some((tls, client, permit))
}

async fn connection(
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    client: Client,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let Client { identity, group } = client;
    let metrics = shared.metrics.clone();
    let (_, conn) = tls.get_ref();
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    let peer_chain: Vec<CertificateDer<'static>> = conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    metrics.connection("accepted");
    metrics.connections_active.inc();
    let client = log_safe(&identity).to_string();
    let group_name = group_label(group.as_deref());
    tracing::info!(%peer, %client, group = %group_name, %version, "edge connected");

    let (rd, wr) = tokio::io::split(tls);
    let reader = FramedRead::new(rd, KeylessCodec);
    // Every reply holds an in-flight permit, so `max_in_flight` replies can be waiting
    // at most; the extra slot is the go-away's, sent once per connection.
    let (tx, rx) = mpsc::channel::<Outgoing>(shared.max_in_flight + 1);
    let alive = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        wr,
        rx,
        shared.stall_timeout,
        alive.clone(),
        client.clone(),
    ));
    let ctx = Arc::new(ConnCtx {
        identity: identity.clone(),
        group,
        tx,
        shared: shared.clone(),
        alive: alive.clone(),
    });
    let edge = Edge {
        addr: peer,
        client: &client,
        chain: &peer_chain,
    };
    let reason = read_loop(&ctx, reader, &edge, &shutdown).await;
    // The writer ends once every in-flight job has replied (each holds a sender), or
    // when a write stalls; jobs still queued for a dead writer are then skipped.
    drop(ctx);
    let _ = writer.await;
    alive.cancel();
    metrics.connections_active.dec();
    tracing::info!(%peer, %client, reason, "edge disconnected");
}

/// Who is at the other end of a connection, for logs and certificate re-checks.
struct Edge<'a> {
    addr: SocketAddr,
    /// The identity, escaped for logs.
    client: &'a str,
    /// The edge's certificate chain, re-checked when the TLS configuration changes.
    chain: &'a [CertificateDer<'static>],
}

/// Reads requests and hands them to [`handle`], each with an in-flight permit, until
/// the connection is to close; returns why.
async fn read_loop(
    ctx: &Arc<ConnCtx>,
    mut reader: FramedRead<ReadHalf<TlsStream<TcpStream>>, KeylessCodec>,
    edge: &Edge<'_>,
    shutdown: &CancellationToken,
) -> &'static str {
    let shared = &ctx.shared;
    let metrics = &shared.metrics;
    let (peer, client) = (edge.addr, edge.client);
    let permits = Arc::new(Semaphore::new(shared.max_in_flight));
    let mut tls_changed = shared.tls_generation.subscribe();
    let mut gone_away = false;
    loop {
        // Draining: the edge is told once, and the loop goes on answering what it still
        // sends (requests already in transit) until it closes the connection.
        if !gone_away && shared.draining() {
            gone_away = true;
            ctx.go_away();
            tracing::debug!(%peer, %client, "key server draining: go-away sent");
        }
        let permit = tokio::select! {
            p = tokio::time::timeout(shared.stall_timeout, permits.clone().acquire_owned()) => match p {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return "closed",
                Err(_) => return "stalled: no in-flight slot freed",
            },
            () = ctx.alive.cancelled() => return "replies could not be written",
            () = shutdown.cancelled() => return "shutdown",
            () = shared.drain.cancelled(), if !gone_away => continue,
        };
        let next = tokio::select! {
            n = tokio::time::timeout(shared.idle_timeout, reader.next()) => n,
            () = ctx.alive.cancelled() => return "replies could not be written",
            () = shutdown.cancelled() => return "shutdown",
            // Reading a frame is cancel-safe: a partial one stays in the reader's buffer.
            () = shared.drain.cancelled(), if !gone_away => continue,
            Ok(()) = tls_changed.changed() => {
                if shared.tls().still_valid(edge.chain) {
                    continue;
                }
                metrics.connection("revoked");
                tracing::warn!(%peer, %client, "edge certificate no longer accepted after reload (revoked or untrusted)");
                return "certificate no longer accepted";
            }
        };
        match next {
            Err(_) => return "idle timeout",
            Ok(None) => return "closed by edge",
            Ok(Some(Ok(msg))) => handle(ctx, msg, permit),
            Ok(Some(Err(CodecError::Io(e)))) => {
                tracing::debug!(%peer, %client, error = %e, "edge connection read failed");
                return "read error";
            }
            Ok(Some(Err(e))) => {
                metrics.frame_errors.inc();
                tracing::warn!(%peer, %client, error = %e, "malformed frame; closing connection");
                if let Some(id) = e.id() {
                    ctx.reply(id, Operation::error(e.code()), permit);
                }
                return "malformed frame";
            }
        }
    }
}

/// A reply on its way to the writer; the permit frees an in-flight slot once written.
/// Only the go-away, which answers no request, has none.
struct Outgoing {
    msg: Message,
    _permit: Option<OwnedSemaphorePermit>,
}

struct ConnCtx {
    identity: Arc<str>,
    /// The client's group; `None` for the implicit group (every key).
    group: Option<Arc<GroupState>>,
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    /// Cancelled when replies can no longer be written.
    alive: CancellationToken,
}

impl ConnCtx {
    /// Whether the client's group may use the key `entry`.
    fn in_group(&self, entry: &KeyEntry) -> bool {
        self.group
            .as_ref()
            .is_none_or(|g| g.config.allows_key(&entry.name))
    }

    fn reply(&self, id: u32, op: Operation, permit: OwnedSemaphorePermit) {
        self.send(Outgoing {
            msg: Message { id, op },
            _permit: Some(permit),
        });
    }

    /// Queues the unsolicited go-away (request id 0, no payload) behind the replies
    /// already waiting. Called at most once per connection, it takes the channel's one
    /// slot beyond the in-flight permits, so it never waits nor displaces a reply.
    fn go_away(&self) {
        self.send(Outgoing {
            msg: Message {
                id: 0,
                op: Operation {
                    opcode: Some(Opcode::GoAway),
                    ..Operation::default()
                },
            },
            _permit: None,
        });
    }

    fn send(&self, out: Outgoing) {
        match self.tx.try_send(out) {
            Ok(()) => {}
            // The writer is gone only when the edge went away or stalled; nothing to tell.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(out)) => {
                // Cannot happen: the channel has room for every permit and the go-away.
                tracing::error!(id = out.msg.id, "reply channel full; reply dropped");
            }
        }
    }
}

/// A pong: the ping's payload echoed, with `server-time` (the clock, read now) and
/// `draining` (PROTOCOL.md, "Extension: heartbeat and drain"). A payload so long that
/// the two items would not fit in a frame is echoed without them, as a reference key
/// server would echo it, rather than answered with an error.
fn pong(payload: Bytes, draining: bool) -> Operation {
    // Item header (tag, u16 length) and value of: opcode and payload, then
    // server-time and draining.
    const ECHO: usize = (3 + 1) + 3;
    const EXTENSIONS: usize = (3 + 8) + (3 + 1);
    let room = ECHO + payload.len() + EXTENSIONS <= MAX_BODY_LEN;
    let mut pong = Operation::new(Opcode::Pong, payload);
    if room {
        pong.server_time = unix_millis();
        pong.draining = draining;
    }
    pong
}

/// The wall clock in milliseconds since the Unix epoch, for a pong's `server-time`;
/// `None` for a clock set before the epoch.
fn unix_millis() -> Option<u64> {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?;
    Some(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// The group name for logs: `-` for the implicit group.
fn group_label(group: Option<&GroupState>) -> String {
    group.map_or_else(|| "-".to_owned(), |g| log_safe(&g.config.name).to_string())
}

/// What an audit line says about a request.
struct Audit {
    identity: Arc<str>,
    group: String,
    id: u32,
    sni: Option<String>,
    ski: Option<Ski>,
    opcode: Opcode,
    /// `message` when the request carried the whole to-be-signed message (extension
    /// tag 0x40), `digest` when only the digest: how strongly the operation is bound
    /// to a TLS handshake.
    context: &'static str,
    started: Instant,
}

impl Audit {
    fn log(&self, result: &'static str) {
        tracing::info!(
            target: "audit",
            client = %log_safe(&self.identity),
            group = %self.group,
            sni = %self.sni.as_deref().map(log_safe).map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            ski = %self.ski.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            op = %self.opcode,
            context = %self.context,
            result = %result,
            duration_us = self.started.elapsed().as_micros() as u64,
            id = self.id,
        );
    }
}

/// Answers `code`, audited and counted.
fn refuse(ctx: &ConnCtx, audit: &Audit, code: ErrorCode, permit: OwnedSemaphorePermit) {
    audit.log(code.name());
    ctx.shared.metrics.op(audit.opcode.name(), code.name());
    ctx.reply(audit.id, Operation::error(code), permit);
}

fn handle(ctx: &Arc<ConnCtx>, msg: Message, permit: OwnedSemaphorePermit) {
    let Message { id, op } = msg;
    let mut audit = Audit {
        identity: ctx.identity.clone(),
        group: group_label(ctx.group.as_deref()),
        id,
        sni: op.sni.clone(),
        ski: op.ski,
        opcode: op.opcode.unwrap_or(Opcode::Unknown(0)),
        context: if op.signed_message.is_some() {
            "message"
        } else {
            "digest"
        },
        started: Instant::now(),
    };
    let metrics = &ctx.shared.metrics;
    let Some(opcode) = op.opcode else {
        return refuse(ctx, &audit, ErrorCode::Format, permit);
    };
    match opcode {
        Opcode::Ping => {
            // Pings are liveness probes: counted, not audited.
            metrics.op(opcode.name(), "ok");
            let pong = pong(op.payload.unwrap_or_default(), ctx.shared.draining());
            ctx.reply(id, pong, permit);
        }
        Opcode::GetTicketKeys => {
            // Only this client's group's keys; never in a log.
            let group = ctx
                .group
                .as_ref()
                .map_or(crate::tickets::IMPLICIT_GROUP, |g| g.config.name.as_str());
            match ctx.shared.tickets.keys(group, std::time::SystemTime::now()) {
                Ok(keys) => {
                    audit.log("ok");
                    metrics.op(opcode.name(), "ok");
                    let payload = keyless_shared::tickets::encode_ticket_keys(&keys);
                    let reply = Operation::new(Opcode::Response, payload.to_vec());
                    ctx.reply(id, reply, permit);
                }
                Err(e) => {
                    tracing::error!(group, error = %e, "ticket keys unavailable");
                    refuse(ctx, &audit, ErrorCode::Internal, permit);
                }
            }
        }
        Opcode::GetCertificateChain => {
            let Some(sni) = op.sni.as_deref() else {
                return refuse(ctx, &audit, ErrorCode::Format, permit);
            };
            let prefs: Vec<KeyPreference> = op
                .payload()
                .iter()
                .filter_map(|b| KeyPreference::from_u8(*b))
                .collect();
            let store = ctx.shared.keystore();
            let entry = match store.by_name(sni, &prefs, &ctx.identity, |e| ctx.in_group(e)) {
                NameLookup::Found(entry) => entry,
                NameLookup::NotInGroup => {
                    tracing::warn!(target: "audit", client = %log_safe(&ctx.identity), group = %audit.group, sni = %log_safe(sni), result = "not-in-group", "certificate chain refused: every key for the name is outside the client's group");
                    return refuse(ctx, &audit, ErrorCode::NotInGroup, permit);
                }
                NameLookup::NotAuthorized => {
                    tracing::warn!(target: "audit", client = %log_safe(&ctx.identity), sni = %log_safe(sni), "certificate chain refused by key ACL");
                    return refuse(ctx, &audit, ErrorCode::NotAuthorized, permit);
                }
                NameLookup::NotFound => {
                    return refuse(ctx, &audit, ErrorCode::CertNotFound, permit)
                }
            };
            let Some(chain) = &entry.chain else {
                return refuse(ctx, &audit, ErrorCode::CertNotFound, permit);
            };
            audit.ski = Some(entry.key.ski);
            audit.log("ok");
            metrics.op(opcode.name(), "ok");
            let mut reply = Operation::new(Opcode::Response, chain.encoded.clone());
            reply.ski = Some(entry.key.ski);
            ctx.reply(id, reply, permit);
        }
        // Replies and the go-away only ever go from key server to edge.
        Opcode::Response | Opcode::Pong | Opcode::Error | Opcode::GoAway => {
            refuse(ctx, &audit, ErrorCode::UnexpectedOpcode, permit)
        }
        o if o.key_op().is_some() => key_op(ctx, o, op, audit, permit),
        _ => refuse(ctx, &audit, ErrorCode::BadOpcode, permit),
    }
}

/// Why the signing policy refused a request (logged; the edge gets `policy-refused`).
#[derive(Debug, thiserror::Error)]
enum PolicyRefusal {
    #[error("raw RSA decrypt is not enabled for this key ([[keys.policy]])")]
    DecryptNotEnabled,
    #[error(transparent)]
    Context(#[from] PolicyError),
    #[error("no handshake message")]
    NoHandshakeMessage,
}

/// The signing policy: `Err` with the reason when the request is refused.
///
/// - Raw RSA decrypt only for keys whose `[[keys.policy]]` allows it, in either mode
///   (it can never carry a handshake message; with one it is refused).
/// - A sign request with the handshake message (tag 0x40) must pass
///   `check_signing_context` (for Ed25519 the payload must be that message).
/// - Without it: refused when `require_handshake_context` (the default).
fn policy(
    shared: &Shared,
    allow_rsa_decrypt: bool,
    opcode: Opcode,
    payload: &[u8],
    message: Option<&[u8]>,
) -> Result<(), PolicyRefusal> {
    if opcode == Opcode::RsaDecrypt && !allow_rsa_decrypt {
        return Err(PolicyRefusal::DecryptNotEnabled);
    }
    match message {
        Some(message) => {
            check_signing_context(opcode, payload, message)?;
            Ok(())
        }
        None if opcode == Opcode::RsaDecrypt => Ok(()),
        None if shared.require_handshake_context => Err(PolicyRefusal::NoHandshakeMessage),
        None => Ok(()),
    }
}

fn key_op(
    ctx: &Arc<ConnCtx>,
    opcode: Opcode,
    op: Operation,
    audit: Audit,
    permit: OwnedSemaphorePermit,
) {
    let shared = &ctx.shared;
    let Some(ski) = op.ski else {
        return refuse(ctx, &audit, ErrorCode::Format, permit);
    };
    let store = shared.keystore();
    let Some(entry) = store.get(&ski) else {
        return refuse(ctx, &audit, ErrorCode::KeyNotFound, permit);
    };
    if !ctx.in_group(entry) {
        tracing::warn!(target: "audit", client = %log_safe(&ctx.identity), group = %audit.group, key = %entry.name, %ski, op = %opcode, result = "not-in-group", "refused: key outside the client's group");
        return refuse(ctx, &audit, ErrorCode::NotInGroup, permit);
    }
    if !entry.allows(&ctx.identity) {
        tracing::warn!(target: "audit", client = %log_safe(&ctx.identity), %ski, key = %entry.name, op = %opcode, "refused by key ACL");
        return refuse(ctx, &audit, ErrorCode::NotAuthorized, permit);
    }
    let payload = op.payload.unwrap_or_default();
    if let Err(code) = entry.key.precheck(opcode, &payload) {
        return refuse(ctx, &audit, code, permit);
    }
    if let Err(reason) = policy(
        shared,
        entry.allow_rsa_decrypt,
        opcode,
        &payload,
        op.signed_message.as_deref(),
    ) {
        tracing::warn!(target: "audit", client = %log_safe(&ctx.identity), %ski, op = %opcode, %reason, "refused by signing policy");
        return refuse(ctx, &audit, ErrorCode::PolicyRefused, permit);
    }

    let spans = OpSpans::new(op.trace.as_ref(), opcode, &entry.name);
    let ctx2 = ctx.clone();
    let op_span = spans.op.clone();
    let done = Box::new(
        move |res: Result<Vec<u8>, ErrorCode>, queue: Duration, exec: Duration| {
            let metrics = &ctx2.shared.metrics;
            metrics.timing(opcode.name(), queue, exec);
            let (op, result) = match res {
                Ok(sig) => (Operation::new(Opcode::Response, Bytes::from(sig)), "ok"),
                Err(code) => (Operation::error(code), code.name()),
            };
            op_span.record("result", result);
            audit.log(result);
            metrics.op(opcode.name(), result);
            ctx2.reply(audit.id, op, permit);
        },
    );
    let key = entry.clone();
    let message = op.signed_message;
    let job = Job {
        work: Box::new(move || {
            let _signing = spans.signing();
            key.key.perform(opcode, &payload, message.as_deref())
        }),
        alive: ctx.alive.clone(),
        done,
    };
    if let Some(token) = &entry.token {
        // A token's operations wait on the device: its own threads, one session each.
        token.submit(job, &shared.pool, &shared.metrics);
    } else if entry.key.algorithm.is_fast() {
        // An ECDSA or Ed25519 signature costs about what handing it to another thread
        // and back costs (measured: ~0.44 vs ~0.55 of raw ring throughput), so it runs
        // here; RSA (~1 ms) goes to the pool so it never stalls this connection's I/O.
        crate::pool::run_inline(job);
    } else {
        shared.pool.submit(job);
    }
}

/// The spans of one operation in its caller's trace (none unless tracing is on and the
/// request carried a trace context): the operation, its time queued and its time
/// signing, as children of the edge's span.
struct OpSpans {
    op: tracing::Span,
    queue: tracing::Span,
}

impl OpSpans {
    fn new(trace: Option<&keyless_shared::TraceContext>, opcode: Opcode, key: &str) -> OpSpans {
        use keyless_shared::telemetry::{self, TARGET};
        let (Some(remote), true) = (trace, telemetry::enabled()) else {
            return OpSpans {
                op: tracing::Span::none(),
                queue: tracing::Span::none(),
            };
        };
        let op = tracing::info_span!(target: TARGET, "keyserver.operation",
            opcode = opcode.name(), key = %key, result = tracing::field::Empty);
        telemetry::set_remote_parent(&op, remote);
        let queue = tracing::info_span!(target: TARGET, parent: &op, "queue");
        OpSpans { op, queue }
    }

    /// Ends the time queued and starts the time signing (until the guard drops).
    fn signing(self) -> tracing::span::EnteredSpan {
        drop(self.queue);
        if self.op.is_none() {
            return tracing::Span::none().entered();
        }
        tracing::info_span!(target: keyless_shared::telemetry::TARGET, parent: &self.op, "sign")
            .entered()
    }
}

/// Writes replies as they complete, coalescing whatever is ready into one TLS write.
/// A write that does not complete within `stall` (the edge does not read) ends the
/// connection; on any exit `alive` is cancelled.
async fn write_loop(
    mut wr: WriteHalf<TlsStream<TcpStream>>,
    mut rx: mpsc::Receiver<Outgoing>,
    stall: Duration,
    alive: CancellationToken,
    client: String,
) {
    const BATCH_BYTES: usize = 64 * 1024;
    let _cancel_on_exit = alive.drop_guard();
    let mut buf = BytesMut::with_capacity(BATCH_BYTES);
    // Replies being written keep their permits until the bytes are on the socket.
    let mut writing: Vec<Outgoing> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            if let Err(e) = encode_message(&out.msg, &mut buf) {
                tracing::error!(error = %e, id = out.msg.id, "reply could not be encoded");
                let err = Message {
                    id: out.msg.id,
                    op: Operation::error(ErrorCode::Internal),
                };
                let _ = encode_message(&err, &mut buf);
            }
            writing.push(out);
            if buf.len() < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        let written = tokio::time::timeout(stall, async {
            wr.write_all(&buf).await?;
            wr.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(%client, error = %e, "write to edge failed");
                return;
            }
            Err(_) => {
                tracing::warn!(%client, timeout = ?stall, "edge does not read its replies; closing the connection");
                return;
            }
        }
        buf.clear();
        writing.clear();
    }
    let _ = tokio::time::timeout(stall, wr.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(op: Operation) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_message(&Message { id: 7, op }, &mut buf).expect("the pong encodes");
        buf
    }

    #[test]
    fn pong_echoes_and_adds_the_clock_and_drain_state() {
        let before = unix_millis().expect("clock after 1970");
        let mut buf = encoded(pong(Bytes::from_static(b"probe"), true));
        let back = keyless_shared::decode_message(&mut buf)
            .expect("decodes")
            .expect("whole frame");
        assert_eq!(back.op.opcode, Some(Opcode::Pong));
        assert_eq!(back.op.payload(), b"probe");
        assert!(back.op.draining);
        let time = back.op.server_time.expect("server-time");
        assert!(time >= before && time <= unix_millis().expect("clock"));
        assert!(!pong(Bytes::new(), false).draining);
    }

    #[test]
    fn longest_ping_payload_is_still_echoed() {
        // The longest payload a ping can carry: the frame holds only its opcode and
        // payload items.
        let longest = MAX_BODY_LEN - (3 + 1) - 3;
        for len in [longest - 30, longest - 16, longest - 15, longest] {
            let payload = Bytes::from(vec![0xa5; len]);
            let mut buf = encoded(pong(payload.clone(), true));
            let back = keyless_shared::decode_message(&mut buf)
                .expect("decodes")
                .expect("whole frame");
            assert_eq!(back.op.payload, Some(payload), "payload of {len} bytes");
        }
        assert!(pong(Bytes::from(vec![0; longest - 15]), true).draining);
        assert!(pong(Bytes::from(vec![0; longest - 14]), true)
            .server_time
            .is_none());
    }
}
