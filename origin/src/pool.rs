//! The private-key worker pool: a fixed set of threads, one per core by default, so
//! that a slow RSA operation never runs on (and stalls) an I/O thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyless_shared::Opcode;

use crate::keys::OpResult;
use crate::keystore::KeyEntry;

/// Called on the worker with the result, the time spent queued and the time spent
/// computing.
pub(crate) type Done = Box<dyn FnOnce(OpResult, Duration, Duration) + Send>;

/// One private-key operation.
pub(crate) struct Job {
    pub(crate) entry: Arc<KeyEntry>,
    pub(crate) opcode: Opcode,
    pub(crate) payload: Bytes,
    /// The checked to-be-signed message, when the request carried one.
    pub(crate) message: Option<Bytes>,
    pub(crate) done: Done,
}

/// Runs `job` on the calling thread (for operations too cheap to be worth a handoff).
pub(crate) fn run_inline(job: Job) {
    let started = Instant::now();
    let result = job
        .entry
        .key
        .perform(job.opcode, &job.payload, job.message.as_deref());
    (job.done)(result, Duration::ZERO, started.elapsed());
}

/// Handle to the pool; dropping every handle stops the threads once the queue is empty.
#[derive(Clone)]
pub(crate) struct Pool {
    tx: crossbeam_channel::Sender<(Job, Instant)>,
}

impl Pool {
    pub(crate) fn start(threads: usize) -> std::io::Result<Pool> {
        // Unbounded here; the bound is upstream: connections × in-flight per connection.
        let (tx, rx) = crossbeam_channel::unbounded::<(Job, Instant)>();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("keyless-crypto-{i}"))
                .spawn(move || {
                    for (job, enqueued) in rx {
                        let started = Instant::now();
                        let result =
                            job.entry
                                .key
                                .perform(job.opcode, &job.payload, job.message.as_deref());
                        let finished = Instant::now();
                        (job.done)(result, started - enqueued, finished - started);
                    }
                })?;
        }
        Ok(Pool { tx })
    }

    pub(crate) fn submit(&self, job: Job) {
        if let Err(crossbeam_channel::SendError((job, _))) = self.tx.send((job, Instant::now())) {
            // Only after every worker died, which a panic-free worker never does.
            (job.done)(
                Err(keyless_shared::ErrorCode::Internal),
                Duration::ZERO,
                Duration::ZERO,
            );
        }
    }
}
