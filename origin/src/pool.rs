//! The private-key worker pool: a fixed set of threads, one per core by default, so
//! that a slow RSA operation never runs on (and stalls) an I/O thread.
//!
//! The queue in front of the threads is bounded (`queue_size`): a job that finds it
//! full, or that would wait longer than `queue_deadline` by the queue's length and the
//! recent cost of a job, is answered `overloaded` at once. A queued job is skipped when
//! its connection has gone (nobody would read the result) and answered `overloaded`
//! without being performed when it waited longer than `queue_deadline` anyway (the
//! edge has given up by then), so a backlog drains at queue speed instead of burning
//! CPU on answers nobody wants.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyless_shared::ErrorCode;
use tokio_util::sync::CancellationToken;

use crate::keys::OpResult;
use crate::metrics::Metrics;

/// Called with the result, the time spent queued and the time spent computing.
pub(crate) type Done = Box<dyn FnOnce(OpResult, Duration, Duration) + Send>;

/// One private-key operation.
pub(crate) struct Job {
    /// Performs the operation (it owns the key entry and the request's bytes).
    pub(crate) work: Box<dyn FnOnce() -> OpResult + Send>,
    /// Cancelled once the requesting connection can no longer be written to.
    pub(crate) alive: CancellationToken,
    pub(crate) done: Done,
}

impl Job {
    fn perform(self, queued: Duration) {
        let started = Instant::now();
        let result = (self.work)();
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
    threads: u64,
    deadline: Duration,
    /// Moving average of a job's compute time, in nanoseconds.
    avg_exec_ns: Arc<AtomicU64>,
}

/// Folds `sample` into the moving average (weight 1/16). The average starts at zero
/// and so underestimates at first: a slow first operation (OpenSSL sets up a key's
/// Montgomery and blinding state lazily) must not make the pool refuse a burst that it
/// would serve in time; the deadline check when a job is dequeued still bounds waits.
fn update_average(avg: &AtomicU64, sample: Duration) {
    let sample = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX);
    let old = avg.load(Ordering::Relaxed);
    avg.store(old - old / 16 + sample / 16, Ordering::Relaxed);
}

impl Pool {
    /// Starts `threads` workers named `name-N` behind a queue of `queue_size`.
    pub(crate) fn start(
        name: &str,
        threads: usize,
        queue_size: usize,
        deadline: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Pool> {
        let (tx, rx) = crossbeam_channel::bounded::<(Job, Instant)>(queue_size.max(1));
        let avg_exec_ns = Arc::new(AtomicU64::new(0));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let metrics = metrics.clone();
            let avg = avg_exec_ns.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
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
                            let started = Instant::now();
                            job.perform(queued);
                            update_average(&avg, started.elapsed());
                        }
                    }
                })?;
        }
        Ok(Pool {
            tx,
            metrics,
            threads: threads.max(1) as u64,
            deadline,
            avg_exec_ns,
        })
    }

    /// The queue's capacity and deadline, for pools started like this one.
    pub(crate) fn limits(&self) -> (usize, Duration) {
        (self.tx.capacity().unwrap_or(1), self.deadline)
    }

    /// Queues `job`, or answers it `overloaded` at once when the queue is full or the
    /// job would not start before the deadline.
    pub(crate) fn submit(&self, job: Job) {
        let ahead = self.tx.len() as u64 + 1;
        let expected_wait = Duration::from_nanos(
            ahead.saturating_mul(self.avg_exec_ns.load(Ordering::Relaxed)) / self.threads,
        );
        if expected_wait > self.deadline {
            self.metrics.queue_dropped("predicted-late");
            (job.done)(Err(ErrorCode::Overloaded), Duration::ZERO, Duration::ZERO);
            return;
        }
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
