//! Reloading the edge's configuration, on `SIGHUP` or `POST /reload` on the admin
//! listener (what `keyless-edge reload` calls).
//!
//! A reload reads and checks the whole file, builds new fronts from it and makes them
//! current ([`LiveFronts`]): connections accepted from then on use them, connections
//! and requests in progress finish with the fronts they started with. A file that
//! does not parse, fails a check, or changes what only a restart can change (`[listen]`
//! addresses and upgrade socket, `[cache]`, `[sessions]`, `[tracing]`, `[proxy]
//! max_connections`)
//! changes nothing: the running configuration
//! stays, and the reload says why (log line, `keyless_edge_config_reloads_total`, the
//! answer to `POST /reload`).
//!
//! What survives a reload: the cache (memory and disk), the session store, and —
//! when `[keyserver]`, `[dns]` and `[tls]` are unchanged — the key-server client with
//! its connections, probes and ticket keys, and the certificate chains cached for the
//! sites the reload did not remove or change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hyper::StatusCode;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::ReloadCall;
use crate::cache::Cache;
use crate::config::{Config, SiteConfig};
use crate::keyserver::{ClientConfig, KeyServerClient};
use crate::metrics::Metrics;
use crate::serve::{Fronts, HttpFront, LiveFronts};
use crate::sessions::SessionStore;
use crate::sites::Sites;
use crate::tls::{TlsFront, TlsFrontConfig};
use crate::upstream::OriginClient;

/// Reload calls waiting for the reloader (each waits for its answer).
pub(crate) const RELOAD_QUEUE: usize = 4;

/// What every configuration's fronts share: built once, at start.
#[derive(Clone)]
pub(crate) struct Lasting {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) cache: Option<Arc<Cache>>,
    pub(crate) sessions: Arc<SessionStore>,
}

/// The running configuration and what was built from it besides the fronts.
#[derive(Clone)]
pub(crate) struct Running {
    pub(crate) config: Config,
    pub(crate) origin: Arc<OriginClient>,
}

/// The fronts of `config`, reusing what `previous` (the running configuration and its
/// fronts) has that `config` does not change; what was reused, in words.
pub(crate) async fn build(
    config: &Config,
    lasting: &Lasting,
    previous: Option<(&Running, &Fronts)>,
) -> anyhow::Result<(Fronts, Arc<OriginClient>, Vec<String>)> {
    let mut notes = Vec::new();
    let sites = Arc::new(Sites::new(&config.sites)?);
    let keep_keyservers = previous.filter(|(running, _)| {
        running.config.keyserver == config.keyserver && running.config.dns == config.dns
    });
    let keyservers = match keep_keyservers {
        Some((_, fronts)) => fronts.tls.keyservers().clone(),
        None => {
            let mut ks = ClientConfig::from_config(&config.keyserver, &config.dns)?;
            ks.settings.metrics = Some(lasting.metrics.clone());
            if previous.is_some() {
                notes.push("key-server client rebuilt".to_owned());
            }
            Arc::new(KeyServerClient::new(ks).context("cannot start the key-server client")?)
        }
    };
    let mut tls = TlsFront::new(
        TlsFrontConfig::from_config(&config.tls, &config.keyserver),
        sites.clone(),
        keyservers,
        lasting.sessions.clone(),
        lasting.metrics.clone(),
    )?;
    if let Some((_, fronts)) = previous {
        tls.keep_ticket_key(&fronts.tls);
    }
    if let Some((running, fronts)) = keep_keyservers.filter(|(r, _)| r.config.tls == config.tls) {
        let unchanged = unchanged_sites(&running.config.sites, &config.sites);
        let old_sites = Sites::new(&running.config.sites)?;
        let dropped = tls
            .adopt_chains(&fronts.tls, |sni| {
                old_sites
                    .lookup(sni)
                    .is_some_and(|site| unchanged.iter().any(|n| n == site.name()))
            })
            .await;
        notes.push(format!("{dropped} cached chain(s) dropped"));
    }
    let origin = match previous {
        Some((running, _))
            if running.config.proxy == config.proxy && running.config.dns == config.dns =>
        {
            running.origin.clone()
        }
        _ => Arc::new(
            OriginClient::new(&config.proxy, &config.dns, lasting.metrics.clone())
                .context("cannot set up the origin client")?,
        ),
    };
    let http = HttpFront::new(
        &config.proxy,
        sites,
        lasting.cache.clone(),
        origin.clone(),
        lasting.metrics.clone(),
    );
    let fronts = Fronts {
        tls: Arc::new(tls),
        http: Arc::new(http),
    };
    Ok((fronts, origin, notes))
}

/// The names (first domain) of the sites whose configuration `new` keeps as it was.
fn unchanged_sites(old: &[SiteConfig], new: &[SiteConfig]) -> Vec<String> {
    let old = by_name(old);
    by_name(new)
        .into_iter()
        .filter(|(name, site)| old.get(name) == Some(site))
        .map(|(name, _)| name)
        .collect()
}

/// Sites by their name (their first domain, as [`crate::sites::Site::name`]).
fn by_name(sites: &[SiteConfig]) -> BTreeMap<String, &SiteConfig> {
    sites
        .iter()
        .filter_map(|s| {
            let name = s.domains.first()?;
            Some((crate::sites::normalize(name), s))
        })
        .collect()
}

/// What a reload changes of the sites, in words (`added a, b; removed c`).
fn site_changes(old: &[SiteConfig], new: &[SiteConfig]) -> String {
    let (old, new) = (by_name(old), by_name(new));
    let list = |names: Vec<&String>| {
        names
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let added = list(new.keys().filter(|n| !old.contains_key(*n)).collect());
    let removed = list(old.keys().filter(|n| !new.contains_key(*n)).collect());
    let changed = list(
        new.iter()
            .filter(|(n, s)| old.get(*n).is_some_and(|o| o != *s))
            .map(|(n, _)| n)
            .collect(),
    );
    let mut parts = vec![format!("{} site(s)", new.len())];
    for (what, names) in [("added", added), ("removed", removed), ("changed", changed)] {
        if !names.is_empty() {
            parts.push(format!("{what} {names}"));
        }
    }
    parts.join("; ")
}

/// The parts of `new` that differ from `old` and take a restart (or an upgrade).
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut parts = Vec::new();
    if !old.listen.same_sockets(&new.listen) {
        parts.push("[listen] addresses");
    }
    if old.listen.upgrade_socket != new.listen.upgrade_socket {
        parts.push("[listen] upgrade_socket");
    }
    if old.cache != new.cache {
        parts.push("[cache]");
    }
    if old.sessions != new.sessions {
        parts.push("[sessions]");
    }
    if old.tracing != new.tracing {
        parts.push("[tracing]");
    }
    if old.proxy.max_connections != new.proxy.max_connections {
        parts.push("[proxy] max_connections");
    }
    parts
}

/// Serves reloads of the file `path` — `SIGHUP` and the admin listener's calls — one
/// at a time, until `shutdown`.
pub(crate) async fn serve(
    path: PathBuf,
    mut running: Running,
    fronts: Arc<LiveFronts>,
    lasting: Lasting,
    mut calls: mpsc::Receiver<ReloadCall>,
    shutdown: CancellationToken,
) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => Some(hup),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler: reload through the admin listener only");
            None
        }
    };
    loop {
        let call = tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(()) = async { hup.as_mut()?.recv().await } => None,
            Some(call) = calls.recv() => Some(call),
        };
        let by = if call.is_some() { "admin" } else { "SIGHUP" };
        if let Some(c) = call
            .as_ref()
            .filter(|c| !authorized(&running.config, &c.token))
        {
            let (status, text) = match running.config.listen.admin_token {
                None => (
                    StatusCode::NOT_FOUND,
                    "reload API disabled: no [listen] admin_token\n",
                ),
                Some(_) => (StatusCode::UNAUTHORIZED, "bad or missing token\n"),
            };
            tracing::warn!(target: "audit", client = %c.client, "reload refused: {}", text.trim_end());
            if let Some(call) = call {
                let _ = call.reply.send((status, text.to_owned()));
            }
            continue;
        }
        let result = reload(&path, &mut running, &fronts, &lasting).await;
        let (status, text) = match &result {
            Ok(summary) => {
                lasting.metrics.config_reload("ok");
                tracing::info!(by, config = %path.display(), %summary, "configuration reloaded");
                (StatusCode::OK, format!("reloaded: {summary}\n"))
            }
            Err(e) => {
                lasting.metrics.config_reload("error");
                let why = format!("{e:#}");
                // One log line, whatever the error quotes (a TOML error shows the line).
                let line = why.split_whitespace().collect::<Vec<_>>().join(" ");
                tracing::error!(by, config = %path.display(), error = %line, "configuration reload failed; the running configuration stays");
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("reload failed: {why}\n"),
                )
            }
        };
        if let Some(call) = call {
            let _ = call.reply.send((status, text));
        }
    }
}

/// Whether `token` is the configured admin token (compared in constant time).
fn authorized(config: &Config, token: &str) -> bool {
    config
        .listen
        .admin_token
        .as_deref()
        .is_some_and(|want| keyless_shared::serve::token_matches(want, token.as_bytes()))
}

/// Reads `path`, and makes its configuration current unless it fails or changes what
/// takes a restart; a summary of what changed.
async fn reload(
    path: &std::path::Path,
    running: &mut Running,
    fronts: &LiveFronts,
    lasting: &Lasting,
) -> anyhow::Result<String> {
    let config = Config::load(path)?;
    let restart = restart_only(&running.config, &config);
    if !restart.is_empty() {
        anyhow::bail!(
            "{} changed: that takes a restart; nothing was reloaded",
            restart.join(", ")
        );
    }
    let current = fronts.get();
    let (new, origin, notes) = build(&config, lasting, Some((running, &current))).await?;
    let mut summary = site_changes(&running.config.sites, &config.sites);
    for note in notes {
        summary.push_str("; ");
        summary.push_str(&note);
    }
    fronts.replace(new);
    *running = Running { config, origin };
    Ok(summary)
}
