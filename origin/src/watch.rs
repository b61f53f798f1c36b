//! Reload of the TLS configuration when its files change on disk: the key server's
//! certificate and key, the client CA and CRL, every group's CA files and
//! `revoked.json` are polled every `tls_reload_interval` (modification time, size and
//! inode, so a rename over the file counts). A change rebuilds both listeners'
//! configurations as SIGHUP does; open connections keep their TLS session and re-check
//! their certificate against the new configuration. A rebuild that fails (say, the
//! certificate was replaced before its key) keeps the current configuration and is
//! tried again at the next change.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
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

/// Polls the files until `shutdown`.
pub(crate) async fn watch(shared: Arc<Shared>, config: Arc<Config>, shutdown: CancellationToken) {
    let files = tls::watched_files(&config);
    let mut seen = stamps(&files);
    let mut interval = tokio::time::interval(config.tls_reload_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
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
        let task_config = config.clone();
        let built = tokio::task::spawn_blocking(move || tls::build(&task_config)).await;
        let label = |result| crate::metrics::ResultLabel { result };
        match built {
            Ok(Ok(state)) => {
                let (crls, revoked) = (state.crls, state.revoked.len());
                shared.install_tls(state);
                shared.metrics.tls_reloads.get_or_create(&label("ok")).inc();
                tracing::info!(
                    ?changed,
                    client_crls = crls,
                    revoked_edges = revoked,
                    "files changed: TLS configuration reloaded"
                );
            }
            Ok(Err(e)) => {
                shared
                    .metrics
                    .tls_reloads
                    .get_or_create(&label("error"))
                    .inc();
                tracing::error!(?changed, error = %e, "files changed but the TLS configuration does not load; keeping the current one");
            }
            Err(e) => {
                shared
                    .metrics
                    .tls_reloads
                    .get_or_create(&label("error"))
                    .inc();
                tracing::error!(error = %e, "TLS reload task failed; keeping the current configuration");
            }
        }
    }
}
