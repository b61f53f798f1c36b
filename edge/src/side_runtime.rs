//! Small runtimes of their own for I/O the handshake waits on synchronously (key
//! servers, the session store), and the waiting itself: rustls asks synchronously, so a
//! handshake's thread waits for work running on such a runtime, never for work queued
//! behind it on the runtime that serves clients.

/// A runtime owned by a component; shut down in the background when dropped (which is
/// allowed from async code, unlike dropping a runtime).
pub(crate) struct SideRuntime {
    /// Always `Some` until drop.
    runtime: Option<tokio::runtime::Runtime>,
    pub(crate) handle: tokio::runtime::Handle,
}

impl SideRuntime {
    /// A multi-thread runtime of `threads` workers named `name`, with I/O and timers.
    pub(crate) fn new(name: &str, threads: usize) -> std::io::Result<SideRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(SideRuntime {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs the blocking `wait` (a bounded wait for a side runtime's answer). On a
/// multi-thread tokio runtime it is announced with `block_in_place`, so the runtime
/// moves its other work to another thread; callers bound how many such waits run at
/// once. Outside tokio, or on a current-thread runtime (where `block_in_place` panics),
/// it simply runs: the side runtime is separate, so waiting cannot deadlock it.
pub(crate) fn wait_blocking<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}
