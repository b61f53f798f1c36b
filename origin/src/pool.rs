//! The private-key worker pool: a fixed set of threads, one per core by default, so
//! that a slow RSA operation never runs on (and stalls) an I/O thread.
//!
//! The queue in front of the threads is bounded (`queue_size`): a job that finds it
//! full is answered `overloaded` at once. A queued job is skipped when its connection
//! has gone (nobody would read the result) and answered `overloaded` without being
//! performed when it waited longer than `queue_deadline` (the edge's handshake has
//! given up by then), so a backlog drains at queue speed instead of burning CPU on
//! answers nobody wants.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyless_shared::{ErrorCode, Opcode};
use tokio_util::sync::CancellationToken;

use crate::keys::OpResult;
use crate::keystore::KeyEntry;
use crate::metrics::Metrics;

/// Called with the result, the time spent queued and the time spent computing.
pub(crate) type Done = Box<dyn FnOnce(OpResult, Duration, Duration) + Send>;

/// One private-key operation.
pub(crate) struct Job {
    pub(crate) entry: Arc<KeyEntry>,
    pub(crate) opcode: Opcode,
    pub(crate) payload: Bytes,
    /// The checked to-be-signed message, when the request carried one.
    pub(crate) message: Option<Bytes>,
    /// Cancelled once the requesting connection can no longer be written to.
    pub(crate) alive: CancellationToken,
    pub(crate) done: Done,
}

impl Job {
    fn perform(self, queued: Duration) {
        let started = Instant::now();
        let result = self
            .entry
            .key
            .perform(self.opcode, &self.payload, self.message.as_deref());
        (self.done)(result, queued, started.elapsed());
    }
}

/// Runs `job` on the calling thread (for operations too cheap to be worth a handoff).
pub(crate) fn run_inline(job: Job) {
    job.perform(Duration::ZERO);
}

/// Handle to the pool; dropping every handle stops the threads once the queue is empty.
#[derive(Clone)]
pub(crate) struct Pool {
    tx: crossbeam_channel::Sender<(Job, Instant)>,
    metrics: Arc<Metrics>,
}

impl Pool {
    pub(crate) fn start(
        threads: usize,
        queue_size: usize,
        deadline: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Pool> {
        let (tx, rx) = crossbeam_channel::bounded::<(Job, Instant)>(queue_size.max(1));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("keyless-crypto-{i}"))
                .spawn(move || {
                    for (job, enqueued) in rx {
                        let queued = enqueued.elapsed();
                        if job.alive.is_cancelled() {
                            // Dropping the job frees its in-flight slot; nobody reads a reply.
                            metrics.queue_dropped("requester-gone");
                        } else if queued > deadline {
                            metrics.queue_dropped("deadline");
                            (job.done)(Err(ErrorCode::Overloaded), queued, Duration::ZERO);
                        } else {
                            job.perform(queued);
                        }
                    }
                })?;
        }
        Ok(Pool { tx, metrics })
    }

    /// Queues `job`, or answers it `overloaded` at once when the queue is full.
    pub(crate) fn submit(&self, job: Job) {
        match self.tx.try_send((job, Instant::now())) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full((job, _))) => {
                self.metrics.queue_dropped("full");
                (job.done)(Err(ErrorCode::Overloaded), Duration::ZERO, Duration::ZERO);
            }
            Err(crossbeam_channel::TrySendError::Disconnected((job, _))) => {
                // Only after every worker died, which a panic-free worker never does.
                (job.done)(Err(ErrorCode::Internal), Duration::ZERO, Duration::ZERO);
            }
        }
    }
}
