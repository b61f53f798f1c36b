//! Objects larger than the memory tier takes, written to the disk tier while their
//! body streams to the client: never held whole in memory, committed only when whole.
//!
//! The response body's poll hands each chunk to a [`Spool`], a bounded channel to a
//! writer task that gathers a block ([`BLOCK`]) at a time and writes it on a blocking
//! thread. The channel's bound is the back-pressure: while the disk lags, the body is
//! not polled, so the origin transfer waits too (memory per object stays about two
//! blocks). The writer publishes how much of the body is on disk; requests coalesced on
//! the same object read the growing file behind it ([`Growing::body`]) instead of
//! waiting for the end or fetching it again.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::PollSender;

use super::blocks::{read_at, BLOCK};
use super::disk::DiskStream;
use super::object::Entry;
use crate::exchange::{BodyError, EdgeBody};

/// Chunks queued between a body and its writer task (with hyper's reads of at most a
/// few hundred KiB, a few MiB at worst).
const QUEUE: usize = 16;

/// How far the writer of a growing object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// This many body bytes are on disk and readable.
    Writing(u64),
    /// The whole body, of this length, is on disk.
    Done(u64),
    /// Writing stopped: the object will not be complete.
    Failed,
}

/// A large object being written, as the requests coalesced on it read it.
#[derive(Debug)]
pub(crate) struct Growing {
    /// The stored response without its body: status, header fields, times.
    pub(crate) entry: Arc<Entry>,
    file: Arc<File>,
    body_start: u64,
    progress: watch::Receiver<Progress>,
}

impl Growing {
    /// The body from its start, following the writer: each block is read once it is
    /// on disk. Ends at the body's end, or with an error if the writer fails.
    pub(crate) fn body(&self) -> EdgeBody {
        let state = (
            self.file.clone(),
            self.body_start,
            self.progress.clone(),
            0u64,
        );
        let frames = futures_util::stream::unfold(state, |(file, start, mut rx, pos)| async move {
            let data = match next_written(&file, start, &mut rx, pos).await? {
                Ok(data) => data,
                Err(e) => return Some((Err(e), (file, start, rx, u64::MAX))),
            };
            let next = pos + data.len() as u64;
            Some((Ok(Frame::data(data)), (file, start, rx, next)))
        });
        StreamBody::new(frames).boxed_unsync()
    }
}

/// The body bytes from `pos` on (at most a block) once they are on disk; `None` at the
/// end.
async fn next_written(
    file: &Arc<File>,
    body_start: u64,
    rx: &mut watch::Receiver<Progress>,
    pos: u64,
) -> Option<Result<Bytes, BodyError>> {
    if pos == u64::MAX {
        return None;
    }
    let until = loop {
        let progress = *rx.borrow_and_update();
        match progress {
            Progress::Writing(n) | Progress::Done(n) if n > pos => break n,
            Progress::Done(_) => return None,
            Progress::Failed => return Some(Err("the object's transfer failed".into())),
            Progress::Writing(_) => {
                if rx.changed().await.is_err() {
                    return Some(Err("the object's writer stopped".into()));
                }
            }
        }
    };
    let len = usize::try_from((until - pos).min(BLOCK)).unwrap_or(0);
    let file = file.clone();
    match tokio::task::spawn_blocking(move || read_at(&file, body_start + pos, len)).await {
        Ok(Ok(data)) => Some(Ok(data)),
        Ok(Err(e)) => Some(Err(e.into())),
        Err(e) => Some(Err(e.into())),
    }
}

/// The receiving end of a large object's body: see the module docs.
pub(crate) struct Spool {
    tx: PollSender<Bytes>,
    /// Set (before `tx` is dropped) when the body arrived whole.
    whole: Arc<AtomicBool>,
    len: u64,
    max: u64,
}

/// Called once the writer is done, with whether the object was stored.
pub(crate) type OnDone = Box<dyn FnOnce(bool) + Send>;

impl Spool {
    /// Starts the writer task of `stream`, which first writes `first` (what was
    /// collected before the object turned out large). The body may grow to `max`
    /// bytes. `done` runs when the writer ends; `entry` describes the response to the
    /// readers of the growing file.
    pub(crate) fn start(
        mut stream: DiskStream,
        first: Vec<Bytes>,
        max: u64,
        entry: Arc<Entry>,
        done: OnDone,
    ) -> Option<(Spool, Arc<Growing>)> {
        let writer = stream.writer()?;
        let (file, body_start) = (writer.file().clone(), writer.body_start());
        let len = first.iter().map(|b| b.len() as u64).sum();
        let (tx, rx) = mpsc::channel(QUEUE);
        let (progress_tx, progress) = watch::channel(Progress::Writing(0));
        let whole = Arc::new(AtomicBool::new(false));
        let task = Writer {
            rx,
            whole: whole.clone(),
            progress: progress_tx,
        };
        tokio::spawn(task.run(stream, first, done));
        let spool = Spool {
            tx: PollSender::new(tx),
            whole,
            len,
            max,
        };
        let growing = Growing {
            entry,
            file,
            body_start,
            progress,
        };
        Some((spool, Arc::new(growing)))
    }

    /// Ready for the next chunk (the writer has room); false when the writer is gone.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        self.tx.poll_reserve(cx).map(|r| r.is_ok())
    }

    /// Takes a chunk (after [`poll_ready`](Self::poll_ready)); false when the object
    /// grew past its bound or the writer is gone: it will not be stored.
    pub(crate) fn push(&mut self, data: &Bytes) -> bool {
        let n = data.len() as u64;
        if self.len + n > self.max {
            return false;
        }
        self.len += n;
        self.tx.send_item(data.clone()).is_ok()
    }

    /// The body is whole: the writer commits the object once it has written it.
    pub(crate) fn finish(self) {
        self.whole.store(true, Ordering::Release);
    }
}

/// The writer task of a [`Spool`].
struct Writer {
    rx: mpsc::Receiver<Bytes>,
    whole: Arc<AtomicBool>,
    progress: watch::Sender<Progress>,
}

impl Writer {
    async fn run(mut self, mut stream: DiskStream, mut batch: Vec<Bytes>, done: OnDone) {
        loop {
            let mut size: u64 = batch.iter().map(|b| b.len() as u64).sum();
            let mut open = true;
            while size < BLOCK {
                match self.rx.recv().await {
                    Some(b) => {
                        size += b.len() as u64;
                        batch.push(b);
                    }
                    None => {
                        open = false;
                        break;
                    }
                }
            }
            let chunks = std::mem::take(&mut batch);
            let written = tokio::task::spawn_blocking(move || {
                let result = write_chunks(&mut stream, &chunks);
                (stream, result)
            })
            .await;
            let Ok((back, result)) = written else {
                return self.fail(done);
            };
            stream = back;
            match result {
                Ok(readable) => {
                    self.progress.send_replace(Progress::Writing(readable));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "writing a large object to the disk cache failed");
                    return self.fail(done);
                }
            }
            if !open {
                break;
            }
        }
        // The sender is gone: the body ended, whole or not.
        if !self.whole.load(Ordering::Acquire) {
            return self.fail(done);
        }
        let committed = tokio::task::spawn_blocking(move || stream.commit()).await;
        match committed {
            Ok((Some(len), stored)) => {
                self.progress.send_replace(Progress::Done(len));
                done(stored);
            }
            _ => self.fail(done),
        }
    }

    /// Ends a write that will not be stored (dropping the stream removes its file).
    fn fail(self, done: OnDone) {
        self.progress.send_replace(Progress::Failed);
        done(false);
    }
}

/// Appends `chunks` to the stream's file; the bytes readable after.
fn write_chunks(stream: &mut DiskStream, chunks: &[Bytes]) -> std::io::Result<u64> {
    let writer = stream
        .writer()
        .ok_or_else(|| std::io::Error::other("disk stream already finished"))?;
    for c in chunks {
        writer.write(c)?;
    }
    Ok(writer.readable())
}
