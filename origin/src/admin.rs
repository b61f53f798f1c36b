//! The operator's commands on the enrollment state: `token create|list|revoke` and
//! `edges list|revoke` (`ENROLL.md`). They read `--config` for the groups and
//! `state_dir`, and change the state files under the same lock the running key server
//! takes, which sees their changes at its next enrollment (tokens) or within
//! `tls_reload_interval` (revocations).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::Config;
use crate::state::{now_secs, StateDir};

/// `keyless-origin token ...` / `keyless-origin edges ...`.
#[derive(Debug, Parser)]
#[command(
    name = "keyless-origin",
    version,
    about = "Keyless key server: enrollment state"
)]
pub(crate) struct AdminCli {
    #[command(subcommand)]
    command: AdminCommand,
}

/// The first words of the admin commands, to tell them from a server command line.
pub(crate) const COMMANDS: [&str; 2] = ["token", "edges"];

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Bootstrap tokens for edge enrollment.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled edges.
    #[command(subcommand)]
    Edges(EdgesCommand),
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The key server's configuration file.
    #[arg(long, short = 'c')]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a single-use token; prints it (and nothing else) on stdout, once.
    Create {
        #[command(flatten)]
        config: ConfigArg,
        /// The group the edge joins (a [[group]] with a ca_key).
        #[arg(long)]
        group: String,
        /// How long the token may be used ("1h", "30m", "1s").
        #[arg(long, value_parser = parse_duration)]
        ttl: Duration,
        /// Bind the token to this edge id.
        #[arg(long)]
        edge_id: Option<String>,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke a token by id.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// The token's id (the part after `klt1.`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum EdgesCommand {
    /// List enrolled edges per group.
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke an edge: refused at its next connection and renewal.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// Only in this group (default: in every group).
        #[arg(long)]
        group: Option<String>,
        /// The edge id.
        id: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err("at least 1s".into());
    }
    Ok(d)
}

fn time(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

fn load(config: &ConfigArg) -> Result<(Config, StateDir)> {
    let c = Config::load(&config.config)?;
    let state = StateDir::new(&c.state_dir);
    Ok((c, state))
}

/// Runs an admin command, writing its output to `out`.
pub(crate) fn run(cli: AdminCli, out: &mut impl Write) -> Result<()> {
    match cli.command {
        AdminCommand::Token(TokenCommand::Create {
            config,
            group,
            ttl,
            edge_id,
        }) => token_create(&config, &group, ttl, edge_id, out),
        AdminCommand::Token(TokenCommand::List { config }) => token_list(&config, out),
        AdminCommand::Token(TokenCommand::Revoke { config, id }) => {
            let (_, state) = load(&config)?;
            let record = state.revoke_token(&id)?;
            writeln!(out, "token {} revoked", record.id)?;
            Ok(())
        }
        AdminCommand::Edges(EdgesCommand::List { config }) => edges_list(&config, out),
        AdminCommand::Edges(EdgesCommand::Revoke { config, group, id }) => {
            edges_revoke(&config, group, &id, out)
        }
    }
}

/// `token create`: the token on `out` (once), what it is for on stderr.
fn token_create(
    config: &ConfigArg,
    group: &str,
    ttl: Duration,
    edge_id: Option<String>,
    out: &mut impl Write,
) -> Result<()> {
    let (c, state) = load(config)?;
    let Some(g) = c.group(group) else {
        bail!(
            "no [[group]] named {group:?} in {}",
            config.config.display()
        );
    };
    if g.ca_key.is_none() {
        bail!("group {group:?} has no ca_key: the key server cannot enroll its edges");
    }
    if let Some(id) = &edge_id {
        if !crate::enroll::valid_edge_id(id) {
            bail!("--edge-id {id:?} is not a lowercase DNS name");
        }
    }
    let (token, record) = state
        .create_token(group, ttl, edge_id.as_deref())
        .context("creating the token")?;
    writeln!(out, "{}", token.to_text())?;
    eprintln!(
        "token {} for group {group} expires {}{}; it is shown only this once",
        record.id,
        time(record.expires),
        edge_id
            .map(|e| format!(", bound to edge {e}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// `token list`: every token record, never a secret.
fn token_list(config: &ConfigArg, out: &mut impl Write) -> Result<()> {
    let (_, state) = load(config)?;
    let now = now_secs();
    writeln!(
        out,
        "{:<16}  {:<12}  {:<8}  {:<20}  {:<20}  {:<20}  used by",
        "id", "group", "status", "edge id", "created", "expires"
    )?;
    for t in state.tokens()? {
        writeln!(
            out,
            "{:<16}  {:<12}  {:<8}  {:<20}  {:<20}  {:<20}  {}",
            t.id,
            t.group,
            t.status(now),
            t.edge_id.as_deref().unwrap_or("-"),
            time(t.created),
            time(t.expires),
            t.used
                .as_ref()
                .map(|u| format!("{} at {}", u.edge_id, time(u.at)))
                .unwrap_or_else(|| "-".into()),
        )?;
    }
    Ok(())
}

/// `edges list`: the enrolled edges per group with their status.
fn edges_list(config: &ConfigArg, out: &mut impl Write) -> Result<()> {
    let (_, state) = load(config)?;
    let revoked = state.revoked_set()?;
    let mut edges = state.edges()?;
    edges.sort_by(|a, b| (&a.group, &a.edge_id).cmp(&(&b.group, &b.edge_id)));
    writeln!(
        out,
        "{:<12}  {:<24}  {:<32}  {:<20}  {:<20}  status",
        "group", "edge id", "serial", "not after", "last seen"
    )?;
    for e in edges {
        let status = if revoked.contains(&e.group, &e.edge_id) {
            "revoked"
        } else if e.not_after <= now_secs() {
            "expired"
        } else {
            "active"
        };
        writeln!(
            out,
            "{:<12}  {:<24}  {:<32}  {:<20}  {:<20}  {status}",
            e.group,
            e.edge_id,
            e.serial,
            time(e.not_after),
            time(e.last_seen),
        )?;
    }
    Ok(())
}

/// `edges revoke`: adds the id to the revocation list (of one group or all).
fn edges_revoke(
    config: &ConfigArg,
    group: Option<String>,
    id: &str,
    out: &mut impl Write,
) -> Result<()> {
    let (c, state) = load(config)?;
    if let Some(g) = &group {
        if c.group(g).is_none() {
            bail!("no [[group]] named {g:?} in {}", config.config.display());
        }
    }
    let known = state
        .edges()?
        .iter()
        .any(|e| e.edge_id == id && group.as_ref().is_none_or(|g| *g == e.group));
    if !known {
        eprintln!("note: no enrolled edge {id:?} yet; revoking the id anyway");
    }
    let added = state.revoke_edge(id, group.as_deref())?;
    let scope = group
        .map(|g| format!("in group {g}"))
        .unwrap_or_else(|| "in every group".into());
    if added {
        writeln!(out, "edge {id} revoked {scope}")?;
    } else {
        writeln!(out, "edge {id} was already revoked {scope}")?;
    }
    Ok(())
}
