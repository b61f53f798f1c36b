//! Client for Keyless key servers: a small pool of multiplexed mTLS connections per
//! key server, request ids, many requests in flight per connection, per-request
//! timeouts, one retry on a fresh connection when a connection breaks, and
//! reconnection with exponential back-off.
//!
//! Key servers are tried in the order given (the first healthy one takes the traffic),
//! which is where priorities, weights and probing plug in.

mod conn;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyless_shared::{ErrorCode, Operation};
use rustls_pki_types::ServerName;
use tokio::sync::Mutex;

use conn::Conn;

/// Why a key-server call failed. Every variant says whether a retry elsewhere is safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No key server could be reached (all are down or backing off).
    #[error("no key server reachable: {0}")]
    Unavailable(String),
    /// The connection broke before the reply came.
    #[error("key server connection lost")]
    ConnectionLost,
    /// The key server did not answer in time.
    #[error("key server did not answer within {0:?}")]
    Timeout(Duration),
    /// The key server answered with a protocol error.
    #[error("key server refused: {0}")]
    Remote(ErrorCode),
    /// The request could not be encoded.
    #[error("request could not be encoded: {0}")]
    Encode(String),
}

impl ClientError {
    /// Whether the same request may be sent again (to this or another key server).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ClientError::Remote(_) | ClientError::Encode(_))
    }
}

/// One key server address.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `host:port` to connect to.
    pub addr: String,
    /// Name to verify the key server's certificate against.
    pub server_name: ServerName<'static>,
}

/// Settings of a [`KeyServerClient`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Key servers, most preferred first.
    pub endpoints: Vec<Endpoint>,
    /// The edge's mTLS identity and the key-server CA.
    pub tls: Arc<rustls::ClientConfig>,
    /// Connections kept per key server. Default 2.
    pub connections_per_server: usize,
    /// Deadline of each request. Default 2 s.
    pub request_timeout: Duration,
    /// Deadline of TCP connect + TLS handshake. Default 2 s.
    pub connect_timeout: Duration,
    /// Requests in flight per connection. Default 512.
    pub max_in_flight: usize,
    /// First reconnection delay after a failure; doubles up to `max_backoff`. Default 100 ms.
    pub min_backoff: Duration,
    /// Longest reconnection delay. Default 5 s.
    pub max_backoff: Duration,
}

impl ClientConfig {
    /// Defaults for `endpoints` with `tls`.
    pub fn new(endpoints: Vec<Endpoint>, tls: Arc<rustls::ClientConfig>) -> ClientConfig {
        ClientConfig {
            endpoints,
            tls,
            connections_per_server: 2,
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            max_in_flight: 512,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

struct Slot {
    conn: Option<Arc<Conn>>,
    /// No new connection attempt before this instant.
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
}

struct Server {
    endpoint: Endpoint,
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
}

/// A client for a set of key servers; cheap to share (`Arc`).
pub struct KeyServerClient {
    config: ClientConfig,
    servers: Vec<Server>,
}

impl KeyServerClient {
    /// Creates the client; connections are opened on first use.
    pub fn new(config: ClientConfig) -> KeyServerClient {
        let servers = config
            .endpoints
            .iter()
            .map(|endpoint| Server {
                endpoint: endpoint.clone(),
                slots: (0..config.connections_per_server.max(1))
                    .map(|_| {
                        Mutex::new(Slot {
                            conn: None,
                            retry_at: None,
                            backoff: config.min_backoff,
                            last_error: None,
                        })
                    })
                    .collect(),
                next: AtomicUsize::new(0),
            })
            .collect();
        KeyServerClient { config, servers }
    }

    /// Sends `op` and waits for its reply. A protocol error reply is
    /// [`ClientError::Remote`]. A request lost with its connection is sent once more on
    /// a fresh connection.
    pub async fn call(&self, op: Operation) -> Result<Operation, ClientError> {
        match self.call_once(op.clone()).await {
            Err(ClientError::ConnectionLost) => {
                tracing::debug!("key server connection lost; retrying once");
                self.call_once(op).await
            }
            other => other,
        }
    }

    async fn call_once(&self, op: Operation) -> Result<Operation, ClientError> {
        let conn = self.connection().await?;
        let reply = conn.call(op, self.config.request_timeout).await?;
        match reply.error_code() {
            Some(code) => Err(ClientError::Remote(code)),
            None => Ok(reply),
        }
    }

    /// A live connection to the most preferred reachable key server.
    async fn connection(&self) -> Result<Arc<Conn>, ClientError> {
        let mut errors = Vec::new();
        for server in &self.servers {
            let n = server.slots.len();
            let start = server.next.fetch_add(1, Ordering::Relaxed);
            for i in 0..n {
                let slot = &server.slots[(start + i) % n];
                match self.slot_conn(server, slot).await {
                    Ok(c) => return Ok(c),
                    Err(e) => errors.push(format!("{}: {e}", server.endpoint.addr)),
                }
            }
        }
        errors.dedup();
        Err(ClientError::Unavailable(errors.join("; ")))
    }

    async fn slot_conn(&self, server: &Server, slot: &Mutex<Slot>) -> Result<Arc<Conn>, String> {
        let mut slot = slot.lock().await;
        if let Some(c) = &slot.conn {
            if c.is_open() {
                return Ok(c.clone());
            }
            slot.conn = None;
        }
        if let Some(at) = slot.retry_at {
            if Instant::now() < at {
                return Err(slot
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "backing off".into()));
            }
        }
        match Conn::connect(&server.endpoint, &self.config).await {
            Ok(c) => {
                tracing::info!(keyserver = %server.endpoint.addr, "connected to key server");
                slot.retry_at = None;
                slot.backoff = self.config.min_backoff;
                slot.last_error = None;
                slot.conn = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                tracing::warn!(keyserver = %server.endpoint.addr, error = %e, backoff = ?slot.backoff, "cannot connect to key server");
                slot.retry_at = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(self.config.max_backoff);
                slot.last_error = Some(e.clone());
                Err(e)
            }
        }
    }
}
