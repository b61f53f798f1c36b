//! Process hardening both binaries apply at start: no core dumps, not dumpable.
//!
//! A core dump of the key server would hold every site private key; one of the edge
//! holds ticket keys and its client identity. `RLIMIT_CORE` 0 stops the kernel from
//! writing one, and `PR_SET_DUMPABLE` 0 also stops non-root processes of the same user
//! from attaching with ptrace or reading `/proc/PID/mem`.

/// Why the process could not be hardened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardeningError {
    /// `setrlimit(RLIMIT_CORE, 0)` failed.
    #[error("cannot disable core dumps (setrlimit RLIMIT_CORE): {0}")]
    CoreLimit(std::io::Error),
    /// `prctl(PR_SET_DUMPABLE, 0)` failed.
    #[error("cannot mark the process non-dumpable (prctl PR_SET_DUMPABLE): {0}")]
    Dumpable(std::io::Error),
}

/// Disables core dumps for this process: soft and hard `RLIMIT_CORE` to 0 and, on
/// Linux, `PR_SET_DUMPABLE` 0. Call it first thing in `main`, before any secret is read.
pub fn disable_core_dumps() -> Result<(), HardeningError> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| HardeningError::CoreLimit(e.into()))?;
    #[cfg(target_os = "linux")]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| HardeningError::Dumpable(e.into()))?;
    Ok(())
}

/// Like [`disable_core_dumps`], but for `main`: on failure the binary prints the reason
/// and exits with status 1 rather than run with secrets that could end up in a core file.
pub fn disable_core_dumps_or_exit(binary: &str) {
    if let Err(e) = disable_core_dumps() {
        eprintln!("{binary}: error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_are_off_after_the_call() {
        disable_core_dumps().unwrap();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(limit.current, Some(0));
        assert_eq!(limit.maximum, Some(0));
        #[cfg(target_os = "linux")]
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
