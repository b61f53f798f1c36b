//! A TCP relay that can slow one direction down: put between the edge and the key
//! server, it makes the key server look slow without touching either.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Relays every connection to an upstream address; bytes from the client (the edge)
/// towards the upstream (the key server) are held for the current delay, chunk by
/// chunk, while replies pass straight through. Dropping it closes every relayed
/// connection.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    delayed_chunks: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on a free loopback port and relays to `upstream`, with no delay yet.
    /// Must be called inside a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the delay proxy")?;
        let addr = listener.local_addr()?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delayed_chunks = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            delay_ms.clone(),
            delayed_chunks.clone(),
        ));
        Ok(DelayProxy {
            addr,
            delay_ms,
            delayed_chunks,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds each later chunk towards the upstream for `delay` (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// How many chunks have been held back so far.
    pub fn delayed_chunks(&self) -> usize {
        self.delayed_chunks.load(Ordering::SeqCst)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        // The accept task owns the relays' JoinSet: aborting it aborts them all.
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    delayed: Arc<AtomicUsize>,
) {
    let mut relays = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                relays.spawn(relay(client, upstream, delay_ms.clone(), delayed.clone()));
            }
            // Reap finished relays so the set does not grow.
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
        }
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    delayed: Arc<AtomicUsize>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let ms = delay_ms.load(Ordering::SeqCst);
            if ms > 0 {
                delayed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let Some(chunk) = buf.get(..n) else { break };
            if server_w.write_all(chunk).await.is_err() {
                break;
            }
        }
        let _ = server_w.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut server_r, &mut client_w).await;
        let _ = client_w.shutdown().await;
    };
    tokio::join!(up, down);
}
