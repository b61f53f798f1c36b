//! The mTLS listener and the per-connection request loop.
//!
//! Each connection has a reader (this task) and a writer task. Requests are decoded,
//! checked (key, ACL, policy) on the reader, private-key work goes to the worker pool,
//! and replies reach the writer in completion order: out of order, ids preserved. A
//! semaphore bounds the requests in flight per connection; when it is exhausted the
//! connection is simply not read further.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use keyless_shared::{
    check_signing_context, encode_message, CodecError, ErrorCode, KeylessCodec, Message, Opcode,
    Operation, Ski,
};
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::keystore::{KeyPreference, Keystore};
use crate::metrics::Metrics;
use crate::pool::{Job, Pool};

/// Everything a connection needs, shared.
pub(crate) struct Shared {
    pub(crate) keystore: RwLock<Arc<Keystore>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pool: Pool,
    pub(crate) require_handshake_context: bool,
    pub(crate) max_in_flight: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

impl Shared {
    pub(crate) fn keystore(&self) -> Arc<Keystore> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc; the Arc
        // inside is still whole.
        match self.keystore.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn install(&self, store: Keystore) {
        self.metrics.keystore(&store);
        let store = Arc::new(store);
        match self.keystore.write() {
            Ok(mut g) => *g = store,
            Err(p) => *p.into_inner() = store,
        }
    }
}

/// Accepts edge connections until `shutdown`; connections are tracked by `tracker`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    config: &Config,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(config.max_connections.get()));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            () = shutdown.cancelled() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            connection(tcp, peer, acceptor, shared, shutdown).await;
        });
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let metrics = shared.metrics.clone();
    let tls = match tokio::time::timeout(shared.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "key server: TLS handshake with edge failed");
            metrics
                .connections
                .get_or_create(&result("handshake-failed"))
                .inc();
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "key server: TLS handshake with edge timed out");
            metrics
                .connections
                .get_or_create(&result("handshake-timeout"))
                .inc();
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    let identity: Arc<str> =
        crate::tls::client_identity(conn.peer_certificates().and_then(|c| c.first())).into();
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    metrics.connections.get_or_create(&result("accepted")).inc();
    metrics.connections_active.inc();
    tracing::info!(%peer, client = %identity, %version, "edge connected");

    let (rd, wr) = tokio::io::split(tls);
    let mut reader = FramedRead::new(rd, KeylessCodec);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(write_loop(wr, rx));
    let permits = Arc::new(Semaphore::new(shared.max_in_flight));
    let ctx = Arc::new(ConnCtx {
        identity: identity.clone(),
        tx,
        shared: shared.clone(),
    });

    let reason = loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break "closed" },
            () = shutdown.cancelled() => break "shutdown",
        };
        let next = tokio::select! {
            n = tokio::time::timeout(shared.idle_timeout, reader.next()) => n,
            () = shutdown.cancelled() => break "shutdown",
        };
        match next {
            Err(_) => break "idle timeout",
            Ok(None) => break "closed by edge",
            Ok(Some(Ok(msg))) => handle(&ctx, msg, permit),
            Ok(Some(Err(CodecError::Io(e)))) => {
                tracing::debug!(%peer, client = %identity, error = %e, "edge connection read failed");
                break "read error";
            }
            Ok(Some(Err(e))) => {
                metrics.frame_errors.inc();
                tracing::warn!(%peer, client = %identity, error = %e, "malformed frame; closing connection");
                if let Some(id) = e.id() {
                    ctx.reply(id, Operation::error(e.code()), None);
                }
                break "malformed frame";
            }
        }
    };
    // The writer ends once every in-flight job has replied (each holds a sender).
    drop(ctx);
    let _ = writer.await;
    metrics.connections_active.dec();
    tracing::info!(%peer, client = %identity, reason, "edge disconnected");
}

fn result(result: &'static str) -> crate::metrics::ResultLabel {
    crate::metrics::ResultLabel { result }
}

/// A reply on its way to the writer; the permit frees an in-flight slot once sent.
struct Outgoing {
    msg: Message,
    _permit: Option<OwnedSemaphorePermit>,
}

struct ConnCtx {
    identity: Arc<str>,
    tx: mpsc::UnboundedSender<Outgoing>,
    shared: Arc<Shared>,
}

impl ConnCtx {
    fn reply(&self, id: u32, op: Operation, permit: Option<OwnedSemaphorePermit>) {
        // The writer is gone only when the edge went away; nothing to tell it then.
        let _ = self.tx.send(Outgoing {
            msg: Message { id, op },
            _permit: permit,
        });
    }
}

/// What an audit line says about a request.
struct Audit {
    identity: Arc<str>,
    id: u32,
    sni: Option<String>,
    ski: Option<Ski>,
    opcode: Opcode,
    started: Instant,
}

impl Audit {
    fn log(&self, result: &'static str) {
        tracing::info!(
            target: "audit",
            client = %self.identity,
            sni = %self.sni.as_deref().unwrap_or("-"),
            ski = %self.ski.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            op = %self.opcode,
            result = %result,
            duration_us = self.started.elapsed().as_micros() as u64,
            id = self.id,
        );
    }
}

fn handle(ctx: &Arc<ConnCtx>, msg: Message, permit: OwnedSemaphorePermit) {
    let Message { id, op } = msg;
    let mut audit = Audit {
        identity: ctx.identity.clone(),
        id,
        sni: op.sni.clone(),
        ski: op.ski,
        opcode: op.opcode.unwrap_or(Opcode::Unknown(0)),
        started: Instant::now(),
    };
    let metrics = &ctx.shared.metrics;
    let fail = |audit: &Audit, code: ErrorCode| {
        audit.log(code.name());
        metrics.op(audit.opcode.name(), code.name());
        ctx.reply(id, Operation::error(code), None);
    };
    let Some(opcode) = op.opcode else {
        return fail(&audit, ErrorCode::Format);
    };
    match opcode {
        Opcode::Ping => {
            // Pings are liveness probes: counted, not audited.
            metrics.op(opcode.name(), "ok");
            let pong = Operation::new(Opcode::Pong, op.payload.unwrap_or_default());
            ctx.reply(id, pong, Some(permit));
        }
        Opcode::GetCertificateChain => {
            let Some(sni) = op.sni.as_deref() else {
                return fail(&audit, ErrorCode::Format);
            };
            let prefs: Vec<KeyPreference> = op
                .payload()
                .iter()
                .filter_map(|b| KeyPreference::from_u8(*b))
                .collect();
            let store = ctx.shared.keystore();
            let Some(entry) = store.by_name(sni, &prefs) else {
                return fail(&audit, ErrorCode::CertNotFound);
            };
            let Some(chain) = &entry.chain else {
                return fail(&audit, ErrorCode::CertNotFound);
            };
            audit.ski = Some(entry.key.ski);
            audit.log("ok");
            metrics.op(opcode.name(), "ok");
            let mut reply = Operation::new(Opcode::Response, chain.encoded.clone());
            reply.ski = Some(entry.key.ski);
            ctx.reply(id, reply, Some(permit));
        }
        Opcode::Response | Opcode::Pong | Opcode::Error => {
            fail(&audit, ErrorCode::UnexpectedOpcode)
        }
        o if o.key_op().is_some() => key_op(ctx, id, o, op, audit, permit),
        _ => fail(&audit, ErrorCode::BadOpcode),
    }
}

fn key_op(
    ctx: &Arc<ConnCtx>,
    id: u32,
    opcode: Opcode,
    op: Operation,
    audit: Audit,
    permit: OwnedSemaphorePermit,
) {
    let shared = &ctx.shared;
    let fail = |code: ErrorCode| {
        audit.log(code.name());
        shared.metrics.op(opcode.name(), code.name());
        ctx.reply(id, Operation::error(code), None);
    };
    let Some(ski) = op.ski else {
        return fail(ErrorCode::Format);
    };
    let store = shared.keystore();
    let Some(entry) = store.get(&ski) else {
        return fail(ErrorCode::KeyNotFound);
    };
    if !entry.allows(&ctx.identity) {
        tracing::warn!(target: "audit", client = %ctx.identity, %ski, key = %entry.name, op = %opcode, "refused by key ACL");
        return fail(ErrorCode::NotAuthorized);
    }
    let payload = op.payload.unwrap_or_default();
    if let Err(code) = entry.key.precheck(opcode, &payload) {
        return fail(code);
    }
    match &op.signed_message {
        Some(message) => {
            if let Err(e) = check_signing_context(opcode, &payload, message) {
                tracing::warn!(target: "audit", client = %ctx.identity, %ski, op = %opcode, reason = %e, "refused by signing policy");
                return fail(ErrorCode::PolicyRefused);
            }
        }
        None if shared.require_handshake_context => {
            tracing::warn!(target: "audit", client = %ctx.identity, %ski, op = %opcode, "refused by signing policy: no handshake message");
            return fail(ErrorCode::PolicyRefused);
        }
        None => {}
    }

    let ctx2 = ctx.clone();
    let done = Box::new(
        move |res: Result<Vec<u8>, ErrorCode>, queue: Duration, exec: Duration| {
            let metrics = &ctx2.shared.metrics;
            metrics.timing(opcode.name(), queue, exec);
            let (op, result) = match res {
                Ok(sig) => (Operation::new(Opcode::Response, Bytes::from(sig)), "ok"),
                Err(code) => (Operation::error(code), code.name()),
            };
            audit.log(result);
            metrics.op(opcode.name(), result);
            ctx2.reply(id, op, Some(permit));
        },
    );
    let job = Job {
        entry: entry.clone(),
        opcode,
        payload,
        message: op.signed_message,
        done,
    };
    if entry.key.algorithm.is_fast() {
        // An ECDSA or Ed25519 signature costs about what handing it to another thread
        // and back costs (measured: ~0.44 vs ~0.55 of raw ring throughput), so it runs
        // here; RSA (~1 ms) goes to the pool so it never stalls this connection's I/O.
        crate::pool::run_inline(job);
    } else {
        shared.pool.submit(job);
    }
}

/// Writes replies as they complete, coalescing whatever is ready into one TLS write.
async fn write_loop(
    mut wr: WriteHalf<TlsStream<TcpStream>>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    const BATCH_BYTES: usize = 64 * 1024;
    let mut buf = BytesMut::with_capacity(BATCH_BYTES);
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
            if buf.len() < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = wr.write_all(&buf).await {
            tracing::debug!(error = %e, "write to edge failed");
            return;
        }
        buf.clear();
        if wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}
