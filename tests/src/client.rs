//! A Keyless protocol client over mutual TLS, as an edge would connect.
//!
//! The TLS stream is split into a [`FramedRead`] and a [`FramedWrite`] with
//! [`KeylessCodec`], so requests can be written while replies are read (pipelining)
//! and raw bytes can be written underneath the codec for malformed-input tests.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use keyless_shared::{CodecError, KeylessCodec, Message, Opcode, Operation, Ski};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ProtocolVersion, RootCertStore};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::deployment::Deployment;

/// The TLS stream to the key server.
pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;
/// The reading half: a stream of reply [`Message`]s.
pub type Reader = FramedRead<ReadHalf<TlsStream>, KeylessCodec>;
/// The writing half: a sink of request [`Message`]s.
pub type Writer = FramedWrite<WriteHalf<TlsStream>, KeylessCodec>;

/// Default bound on connecting and on waiting for each reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS version to offer (only that one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The client's own certificates or keys could not be loaded (a test setup error).
    #[error("client setup: {0}")]
    Setup(String),
    /// TCP connect to the key server failed.
    #[error("connecting to the key server at {addr}: {source}")]
    Connect {
        /// The key server address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// The TLS handshake with the key server failed.
    #[error("TLS handshake with the key server: {0}")]
    Handshake(io::Error),
    /// Reading or writing the established connection failed (includes TLS alerts and
    /// resets after the handshake).
    #[error("key server connection: {0}")]
    Io(#[from] io::Error),
    /// The key server sent a frame the codec cannot decode.
    #[error("undecodable frame from the key server: {0}")]
    Codec(CodecError),
    /// The key server closed the connection.
    #[error("the key server closed the connection")]
    Closed,
    /// No reply within the time bound.
    #[error("no reply from the key server within {0:?}")]
    Timeout(Duration),
}

impl ClientError {
    /// Whether the connection is gone (closed cleanly, reset, or failed with an alert).
    pub fn is_closed(&self) -> bool {
        matches!(self, ClientError::Closed | ClientError::Io(_))
    }
}

impl From<CodecError> for ClientError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Io(e) => ClientError::Io(e),
            other => ClientError::Codec(other),
        }
    }
}

/// How to connect to a key server.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Key server address.
    pub addr: SocketAddr,
    /// Name checked against the key server's certificate.
    pub server_name: String,
    /// PEM file with the CA certificates the key server's certificate must chain to.
    pub roots: PathBuf,
    /// Client certificate chain and key (PEM); `None` connects without one.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// TLS version to offer.
    pub version: TlsVersion,
    /// Bound on connecting and on each reply.
    pub timeout: Duration,
}

impl ClientOptions {
    /// The edge's own settings in `deployment`, TLS 1.3.
    pub fn new(deployment: &Deployment) -> ClientOptions {
        ClientOptions {
            addr: deployment.listen(),
            server_name: "localhost".into(),
            roots: deployment.keyserver_ca(),
            identity: Some(deployment.edge_identity()),
            version: TlsVersion::Tls13,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Offers only `version`.
    pub fn version(mut self, version: TlsVersion) -> ClientOptions {
        self.version = version;
        self
    }

    /// Uses another client identity (or none).
    pub fn identity(mut self, identity: Option<(PathBuf, PathBuf)>) -> ClientOptions {
        self.identity = identity;
        self
    }

    /// Sets the time bound.
    pub fn timeout(mut self, timeout: Duration) -> ClientOptions {
        self.timeout = timeout;
        self
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, ClientError> {
        let setup =
            |what: &str, e: &dyn std::fmt::Display| ClientError::Setup(format!("{what}: {e}"));
        let mut roots = RootCertStore::empty();
        let ca_certs = CertificateDer::pem_file_iter(&self.roots)
            .map_err(|e| setup(&self.roots.display().to_string(), &e))?;
        for cert in ca_certs {
            let cert = cert.map_err(|e| setup(&self.roots.display().to_string(), &e))?;
            roots
                .add(cert)
                .map_err(|e| setup(&self.roots.display().to_string(), &e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&'static rustls::SupportedProtocolVersion] = match self.version {
            TlsVersion::Tls12 => &[&rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| setup("TLS versions", &e))?
            .with_root_certificates(roots);
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| setup(&cert.display().to_string(), &e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| setup(&cert.display().to_string(), &e))?;
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| setup(&key.display().to_string(), &e))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| setup("client certificate", &e))
            }
        }
    }

    /// Connects and completes the TLS handshake.
    pub async fn connect(&self) -> Result<KeyClient, ClientError> {
        let config = self.tls_config()?;
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| ClientError::Setup(format!("server name: {e}")))?;
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(
            self.timeout,
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| ClientError::Timeout(self.timeout))?
        .map_err(ClientError::Handshake)?;
        let version = tls.get_ref().1.protocol_version();
        let server_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        let (r, w) = tokio::io::split(tls);
        Ok(KeyClient {
            reader: FramedRead::new(r, KeylessCodec),
            writer: FramedWrite::new(w, KeylessCodec),
            next_id: 1,
            stash: HashMap::new(),
            timeout: self.timeout,
            version,
            server_cert,
        })
    }
}

/// A connection to the key server.
pub struct KeyClient {
    reader: Reader,
    writer: Writer,
    next_id: u32,
    stash: HashMap<u32, Operation>,
    timeout: Duration,
    version: Option<ProtocolVersion>,
    server_cert: Option<Vec<u8>>,
}

impl std::fmt::Debug for KeyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyClient")
            .field("next_id", &self.next_id)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl KeyClient {
    /// Connects as the deployment's edge over TLS 1.3.
    pub async fn connect(deployment: &Deployment) -> Result<KeyClient, ClientError> {
        ClientOptions::new(deployment).connect().await
    }

    /// The negotiated TLS version.
    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The key server's certificate (DER) this connection was opened with.
    pub fn server_certificate(&self) -> Option<&[u8]> {
        self.server_cert.as_deref()
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Sends `op` and waits for the reply with its id (other replies are kept for later).
    pub async fn call(&mut self, op: Operation) -> Result<Operation, ClientError> {
        let id = self.send(op).await?;
        self.recv_id(id).await
    }

    /// Pings with `payload`, returning the reply.
    pub async fn ping(&mut self, payload: &[u8]) -> Result<Operation, ClientError> {
        self.call(Operation::new(Opcode::Ping, payload.to_vec()))
            .await
    }

    /// Sends a sign request (`opcode`, `ski`, `payload`), optionally with the whole
    /// to-be-signed message, and returns the reply.
    pub async fn sign(
        &mut self,
        opcode: Opcode,
        ski: Ski,
        payload: &[u8],
        message: Option<&[u8]>,
    ) -> Result<Operation, ClientError> {
        self.call(sign_request(opcode, ski, payload, message)).await
    }

    /// Sends `op` with a fresh id and flushes; returns the id.
    pub async fn send(&mut self, op: Operation) -> Result<u32, ClientError> {
        let id = self.next_id();
        self.send_message(Message { id, op }).await?;
        Ok(id)
    }

    /// Sends a message with a caller-chosen id and flushes.
    pub async fn send_message(&mut self, msg: Message) -> Result<(), ClientError> {
        bounded(self.timeout, self.writer.send(msg)).await
    }

    /// Writes `bytes` as they are, below the codec, and flushes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let io = self.writer.get_mut();
        tokio::time::timeout(self.timeout, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await
        .map_err(|_| ClientError::Timeout(self.timeout))??;
        Ok(())
    }

    /// The next reply from the network (replies kept by [`KeyClient::call`] are not
    /// returned here).
    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.reader.next()).await {
            Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(None) => Err(ClientError::Closed),
            Ok(Some(res)) => Ok(res?),
        }
    }

    /// The reply to request `id`.
    pub async fn recv_id(&mut self, id: u32) -> Result<Operation, ClientError> {
        if let Some(op) = self.stash.remove(&id) {
            return Ok(op);
        }
        loop {
            let msg = self.recv().await?;
            if msg.id == id {
                return Ok(msg.op);
            }
            self.stash.insert(msg.id, msg.op);
        }
    }

    /// Writes all `ops` in one batch (one flush) and returns their ids; collect the
    /// replies with [`KeyClient::collect`]. For thousands of requests use
    /// [`KeyClient::pipeline`], which reads while it writes.
    pub async fn send_many(&mut self, ops: Vec<Operation>) -> Result<Vec<u32>, ClientError> {
        let mut ids = Vec::with_capacity(ops.len());
        for op in ops {
            let id = self.next_id();
            bounded(self.timeout, self.writer.feed(Message { id, op })).await?;
            ids.push(id);
        }
        bounded(self.timeout, SinkExt::<Message>::flush(&mut self.writer)).await?;
        Ok(ids)
    }

    /// The replies to `ids`, in the order of `ids`, whatever order they arrive in.
    pub async fn collect(&mut self, ids: &[u32]) -> Result<Vec<Operation>, ClientError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.recv_id(*id).await?);
        }
        Ok(out)
    }

    /// Sends all `ops` (batched writes) while reading replies, until as many replies as
    /// requests arrived. Returns the ids given to `ops` (same order) and the replies in
    /// arrival order.
    pub async fn pipeline(
        &mut self,
        ops: Vec<Operation>,
    ) -> Result<(Vec<u32>, Vec<Message>), ClientError> {
        let msgs: Vec<Message> = ops
            .into_iter()
            .map(|op| Message {
                id: self.next_id(),
                op,
            })
            .collect();
        let ids: Vec<u32> = msgs.iter().map(|m| m.id).collect();
        let n = msgs.len();
        let timeout = self.timeout;
        let KeyClient { reader, writer, .. } = self;
        let write = async {
            for msg in msgs {
                // `feed` writes out whenever the buffer passes its boundary.
                writer.feed(msg).await?;
            }
            SinkExt::<Message>::flush(writer).await?;
            Ok::<_, ClientError>(())
        };
        let read = async {
            let mut replies = Vec::with_capacity(n);
            while replies.len() < n {
                match tokio::time::timeout(timeout, reader.next()).await {
                    Err(_) => return Err(ClientError::Timeout(timeout)),
                    Ok(None) => return Err(ClientError::Closed),
                    Ok(Some(res)) => replies.push(res?),
                }
            }
            Ok(replies)
        };
        let ((), replies) = tokio::try_join!(write, read)?;
        Ok((ids, replies))
    }

    /// Reads until the key server closes the connection; returns what it sent before.
    ///
    /// `Err(Timeout)` means the connection stayed open; a reset or a TLS alert counts
    /// as closed.
    pub async fn expect_closed(&mut self) -> Result<Vec<Message>, ClientError> {
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                Ok(msg) => before.push(msg),
                Err(e) if e.is_closed() => return Ok(before),
                Err(e) => return Err(e),
            }
        }
    }

    /// The two halves, for callers that read and write from separate tasks.
    pub fn into_parts(self) -> (Reader, Writer) {
        (self.reader, self.writer)
    }
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, CodecError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
        .map_err(ClientError::from)
}

/// A sign request: opcode, SKI, payload and optionally the whole message (tag 0x40).
pub fn sign_request(opcode: Opcode, ski: Ski, payload: &[u8], message: Option<&[u8]>) -> Operation {
    let mut op = Operation::new(opcode, payload.to_vec());
    op.ski = Some(ski);
    op.signed_message = message.map(bytes::Bytes::copy_from_slice);
    op
}
