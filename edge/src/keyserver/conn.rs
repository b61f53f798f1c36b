//! One multiplexed connection to a key server: a writer task fed by a bounded channel
//! and a reader task that hands each reply to the request with its id.
//!
//! A `go-away` from the key server (PROTOCOL.md, "heartbeat and drain") closes the
//! connection to new requests; once the replies it is owed have come, the edge closes
//! it (TLS close_notify), which lets the draining key server exit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use futures_util::StreamExt;
use keyless_shared::{encode_message, KeylessCodec, Message, Opcode, Operation};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::FramedRead;

use tokio_util::sync::CancellationToken;

use super::{ClientError, Endpoint, Settings};

type Waiters = Mutex<HashMap<u32, oneshot::Sender<Operation>>>;
type KeyServerStream = TlsStream<TcpStream>;
/// Called once when the key server sends `go-away`.
pub(super) type OnGoAway = Box<dyn Fn() + Send + Sync>;

pub(super) struct Conn {
    tx: mpsc::Sender<Message>,
    waiters: Arc<Waiters>,
    state: Arc<ConnState>,
    next_id: AtomicU32,
    in_flight: Semaphore,
}

/// What the reader and writer tasks and the callers share.
struct ConnState {
    /// False once the connection broke or closed.
    open: AtomicBool,
    /// The key server sent go-away: no new requests.
    going_away: AtomicBool,
    /// Tells the writer to close the connection.
    close: CancellationToken,
}

/// Removes a waiter when its call ends early (timeout, cancellation).
struct WaiterGuard<'a> {
    waiters: &'a Waiters,
    id: u32,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(&self.id);
        }
    }
}

impl Conn {
    /// Opens an mTLS connection to `endpoint` and starts its writer and reader tasks.
    pub(super) async fn connect(
        endpoint: &Endpoint,
        tls: &Arc<rustls::ClientConfig>,
        settings: &Settings,
        on_go_away: OnGoAway,
    ) -> Result<Arc<Conn>, ConnectError> {
        let stream = open_tls(endpoint, tls, settings.connect_timeout).await?;
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel::<Message>(settings.max_in_flight.max(1));
        let waiters: Arc<Waiters> = Arc::default();
        let state = Arc::new(ConnState {
            open: AtomicBool::new(true),
            going_away: AtomicBool::new(false),
            close: CancellationToken::new(),
        });
        tokio::spawn(write_requests(wr, rx, state.clone(), endpoint.addr.clone()));
        tokio::spawn(read_replies(
            rd,
            waiters.clone(),
            state.clone(),
            endpoint.addr.clone(),
            on_go_away,
        ));
        Ok(Arc::new(Conn {
            tx,
            waiters,
            state,
            next_id: AtomicU32::new(1),
            in_flight: Semaphore::new(settings.max_in_flight.max(1)),
        }))
    }

    /// Whether new requests may be sent on this connection.
    pub(super) fn is_open(&self) -> bool {
        self.state.open.load(Ordering::Acquire)
            && !self.state.going_away.load(Ordering::Acquire)
            && !self.tx.is_closed()
    }

    /// Takes no new requests; closes once the replies owed have come (or at once).
    pub(super) fn retire(&self) {
        self.state.going_away.store(true, Ordering::Release);
        if self.waiters.lock().map(|w| w.is_empty()).unwrap_or(true) {
            self.state.close.cancel();
        }
    }

    /// Sends `op` and waits for its reply; the caller bounds the wait.
    pub(super) async fn call(&self, op: Operation) -> Result<Operation, ClientError> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| ClientError::ConnectionLost)?;
        // Id 0 is the key server's (go-away): never used for a request.
        let id = match self.next_id.fetch_add(1, Ordering::Relaxed) {
            0 => self.next_id.fetch_add(1, Ordering::Relaxed),
            id => id,
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        self.waiters
            .lock()
            .map_err(|_| ClientError::ConnectionLost)?
            .insert(id, reply_tx);
        let _guard = WaiterGuard {
            waiters: &self.waiters,
            id,
        };
        if !self.is_open() {
            return Err(ClientError::ConnectionLost);
        }
        self.tx
            .send(Message { id, op })
            .await
            .map_err(|_| ClientError::ConnectionLost)?;
        reply_rx.await.map_err(|_| ClientError::ConnectionLost)
    }
}

/// Why a connection to a key server could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    /// The TCP connection failed.
    #[error("connect: {0}")]
    Tcp(#[source] std::io::Error),
    /// The TLS handshake failed (e.g. the key server's certificate is not trusted).
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    /// Both did not complete within `connect_timeout`.
    #[error("no connection within {0:?}")]
    Timeout(std::time::Duration),
}

/// TCP connect and TLS handshake, within `connect_timeout`.
async fn open_tls(
    endpoint: &Endpoint,
    tls: &Arc<rustls::ClientConfig>,
    connect_timeout: std::time::Duration,
) -> Result<KeyServerStream, ConnectError> {
    let connect = async {
        let tcp = TcpStream::connect(&endpoint.addr)
            .await
            .map_err(ConnectError::Tcp)?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(tls.clone())
            .connect(endpoint.server_name.clone(), tcp)
            .await
            .map_err(ConnectError::Tls)
    };
    tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| ConnectError::Timeout(connect_timeout))?
}

/// Writer task: encodes queued requests, as many as are waiting (up to 64 KiB) per
/// write. Marks the connection closed when writing fails or every sender is gone;
/// closes it (close_notify, then FIN) when told to.
async fn write_requests(
    mut wr: WriteHalf<KeyServerStream>,
    mut rx: mpsc::Receiver<Message>,
    state: Arc<ConnState>,
    addr: String,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        let first = tokio::select! {
            first = rx.recv() => match first {
                Some(first) => first,
                None => break,
            },
            () = state.close.cancelled() => {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), wr.shutdown()).await;
                break;
            }
        };
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if let Err(e) = encode_message(&msg, &mut buf) {
                tracing::error!(error = %e, "request could not be encoded");
            }
            if buf.len() < 64 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = wr.write_all(&buf).await {
            tracing::warn!(keyserver = %addr, error = %e, "write to key server failed");
            break;
        }
        buf.clear();
        if wr.flush().await.is_err() {
            break;
        }
    }
    state.open.store(false, Ordering::Release);
}

/// Reader task: hands each reply to the call waiting for its id until the connection
/// ends, then marks it closed and wakes every pending call. After a go-away, asks the
/// writer to close the connection once no reply is owed.
async fn read_replies(
    rd: ReadHalf<KeyServerStream>,
    waiters: Arc<Waiters>,
    state: Arc<ConnState>,
    addr: String,
    on_go_away: OnGoAway,
) {
    let mut frames = FramedRead::new(rd, KeylessCodec);
    let reason = loop {
        match frames.next().await {
            Some(Ok(msg)) if msg.id == 0 && msg.op.opcode == Some(Opcode::GoAway) => {
                if !state.going_away.swap(true, Ordering::AcqRel) {
                    tracing::info!(keyserver = %addr, "key server going away: no new requests on this connection");
                    on_go_away();
                }
            }
            Some(Ok(msg)) => {
                let waiter = waiters.lock().ok().and_then(|mut w| w.remove(&msg.id));
                match waiter {
                    Some(w) => {
                        let _ = w.send(msg.op);
                    }
                    None => tracing::debug!(id = msg.id, "reply for no pending request"),
                }
            }
            Some(Err(keyless_shared::CodecError::Io(e))) => break format!("read failed: {e}"),
            Some(Err(e)) => break format!("malformed reply: {e}"),
            None => break "closed by key server".to_owned(),
        }
        if state.going_away.load(Ordering::Acquire)
            && waiters.lock().map(|w| w.is_empty()).unwrap_or(true)
        {
            // Nothing owed: close our side; the key server sees the end and exits.
            state.close.cancel();
        }
    };
    state.open.store(false, Ordering::Release);
    state.close.cancel();
    // Dropping the senders wakes every pending call with ConnectionLost.
    if let Ok(mut w) = waiters.lock() {
        w.clear();
    }
    tracing::info!(keyserver = %addr, reason, "key server connection ended");
}
