//! Reload of the TLS configuration when its files change on disk, and the key server's
//! certificate rotation (`[tls] rotate_every`, see `rotate`).
//!
//! The key server's certificate and key, the client CA and CRL, every group's CA files
//! and `revoked.json` are polled every `tls_reload_interval` (modification time, size
//! and inode, so a rename over the file counts). A change rebuilds both listeners'
//! configurations as SIGHUP does; open connections keep their TLS session and re-check
//! their certificate against the new configuration. A rebuild that fails (say, the
//! certificate was replaced before its key) keeps the current configuration and is
//! tried again at the next change.
//!
//! A rotation is such a change, made by the key server itself: the same task writes the
//! new key and certificate and reloads them through the same path as a change found by
//! polling, then takes the files' new stamps so that the change is not reloaded twice.
//!
//! Every rebuild (polling, rotation, SIGHUP) goes through [`rebuild`], which holds a
//! lock from reading the configuration to installing the result, so rebuilds apply in
//! order and a rebuild never undoes the `[[group]]`s a SIGHUP installed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::rotate::{Rotated, Rotation};
use crate::server::Shared;
use crate::tls;

/// What identifies a version of a file; `None` while it is missing.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamps(files: &[PathBuf]) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

/// What a successful rebuild installed, for the logs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rebuilt {
    pub(crate) crls: usize,
    pub(crate) revoked: usize,
}

/// Rebuilds the TLS configuration from the files `config` names (by default the
/// configuration the running one was built from) and installs it: used for every new
/// connection, and open connections re-check their client certificate against it. On
/// error the running configuration stays.
pub(crate) async fn rebuild(shared: &Shared, config: Option<Config>) -> Result<Rebuilt, String> {
    let _in_order = shared.rebuild_lock.lock().await;
    let config = match config {
        Some(c) => Arc::new(c),
        None => shared.tls().config.clone(),
    };
    let built = tokio::task::spawn_blocking(move || tls::build(&config)).await;
    match built {
        Ok(Ok(state)) => {
            let rebuilt = Rebuilt {
                crls: state.crls,
                revoked: state.revoked.len(),
            };
            shared.install_tls(state);
            Ok(rebuilt)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("TLS rebuild task failed: {e}")),
    }
}

/// Reloads after `changed` files changed: the one path of changes found by polling and
/// of rotations. Counted in `keyless_tls_reloads_total`; `false` when the rebuild failed.
async fn files_changed(shared: &Shared, changed: &[String]) -> bool {
    let label = |result| crate::metrics::ResultLabel { result };
    match rebuild(shared, None).await {
        Ok(rebuilt) => {
            shared.metrics.tls_reloads.get_or_create(&label("ok")).inc();
            tracing::info!(
                ?changed,
                client_crls = rebuilt.crls,
                revoked_edges = rebuilt.revoked,
                "files changed: TLS configuration reloaded"
            );
            true
        }
        Err(e) => {
            shared
                .metrics
                .tls_reloads
                .get_or_create(&label("error"))
                .inc();
            tracing::error!(?changed, error = %e, "files changed but the TLS configuration does not load; keeping the current one");
            false
        }
    }
}

/// The rotation and when it is next due.
struct Schedule {
    rotation: Rotation,
    /// The last rotation, or the start.
    since: SystemTime,
    due: SystemTime,
}

impl Schedule {
    fn new(rotation: Rotation) -> Schedule {
        let now = SystemTime::now();
        let due = match rotation.current_info() {
            Ok(current) => rotation.due(now, &current),
            // Unreadable now: the rotation will say why.
            Err(_) => now,
        };
        Schedule {
            rotation,
            since: now,
            due,
        }
    }

    /// The due time as a tokio instant (at once when it has passed).
    fn deadline(&self) -> tokio::time::Instant {
        let wait = self
            .due
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::Instant::now() + wait
    }

    /// After `[tls] cert` changed on disk by another hand: due earlier if the new
    /// certificate is short of half a period.
    fn cert_replaced(&mut self) {
        if let Ok(current) = self.rotation.current_info() {
            self.due = self.due.min(self.rotation.due(self.since, &current));
        }
    }
}

/// Counts a rotation done at start, before the listeners opened (it logged itself).
pub(crate) fn count_start_rotation(shared: &Shared, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    shared
        .metrics
        .tls_rotations
        .get_or_create(&crate::metrics::ResultLabel { result })
        .inc();
}

/// Logs a completed rotation; `when` is `start` (before the listeners opened) or
/// `scheduled`.
pub(crate) fn log_rotated(rotated: &Rotated, when: &str, next: Option<SystemTime>) {
    use humantime_serde::re::humantime::format_rfc3339_seconds;
    tracing::info!(
        old_serial = %rotated.old.serial,
        old_not_after = %format_rfc3339_seconds(rotated.old.not_after),
        new_serial = %rotated.new.serial,
        new_not_after = %format_rfc3339_seconds(rotated.new.not_after),
        next_rotation = %next.map_or_else(|| "-".to_owned(), |t| format_rfc3339_seconds(t).to_string()),
        when,
        "key server certificate rotated"
    );
}

/// Rotates now, reloads, and plans the next rotation.
async fn rotate(shared: &Shared, schedule: &mut Schedule) {
    let label = |result| crate::metrics::ResultLabel { result };
    let rotation = schedule.rotation.clone();
    let outcome = match tokio::task::spawn_blocking(move || rotation.rotate()).await {
        Ok(Ok(rotated)) => Ok(rotated),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("rotation task failed: {e}")),
    };
    let now = SystemTime::now();
    let rotated = match outcome {
        Ok(rotated) => {
            let changed: Vec<String> = schedule
                .rotation
                .files()
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            if files_changed(shared, &changed).await {
                Ok(rotated)
            } else {
                Err(format!(
                    "the new certificate (serial {}) was written but does not load",
                    rotated.new.serial
                ))
            }
        }
        Err(e) => Err(e),
    };
    match rotated {
        Ok(rotated) => {
            schedule.since = now;
            schedule.due = schedule.rotation.due(now, &rotated.new);
            shared
                .metrics
                .tls_rotations
                .get_or_create(&label("ok"))
                .inc();
            log_rotated(&rotated, "scheduled", Some(schedule.due));
        }
        Err(e) => {
            let retry = schedule.rotation.retry_after();
            schedule.due = now + retry;
            shared
                .metrics
                .tls_rotations
                .get_or_create(&label("error"))
                .inc();
            tracing::error!(error = %e, ?retry, "key server certificate rotation failed; keeping the current certificate");
        }
    }
}

/// Waits until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Polls the files, and rotates the key server's certificate when `rotation` is set,
/// until `shutdown`.
pub(crate) async fn watch(
    shared: Arc<Shared>,
    rotation: Option<Rotation>,
    shutdown: CancellationToken,
) {
    let config = shared.tls().config.clone();
    let mut files = tls::watched_files(&config);
    let mut seen = stamps(&files);
    let mut interval = tokio::time::interval(config.tls_reload_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut schedule = rotation.map(Schedule::new);
    loop {
        let rotate_at = schedule.as_ref().map(Schedule::deadline);
        tokio::select! {
            _ = interval.tick() => {}
            () = sleep_until(rotate_at) => {
                if let Some(schedule) = &mut schedule {
                    rotate(&shared, schedule).await;
                    seen = stamps(&files);
                }
                continue;
            }
            () = shutdown.cancelled() => return,
        }
        // A SIGHUP may have changed the groups, and with them the files.
        let current = tls::watched_files(&shared.tls().config);
        if current != files {
            files = current;
            seen = stamps(&files);
            continue;
        }
        let now = stamps(&files);
        if now == seen {
            continue;
        }
        let changed: Vec<String> = files
            .iter()
            .zip(now.iter().zip(&seen))
            .filter(|(_, (a, b))| a != b)
            .map(|(f, _)| f.display().to_string())
            .collect();
        seen = now;
        files_changed(&shared, &changed).await;
        if let Some(schedule) = &mut schedule {
            schedule.cert_replaced();
        }
    }
}
