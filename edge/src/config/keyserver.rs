//! `[keyserver]` and its `[[keyserver.group]]` sections: which key servers hold the
//! sites' keys, how the edge finds them (a static list or DNS SRV), how it probes them
//! and how it talks to them.
//!
//! The single-group form of earlier versions (`servers`, `ca`, `cert`, `key` directly
//! under `[keyserver]`) is read as one group named `default` whose servers are
//! preferred in the order listed.

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{
    default_2s, default_ks_connections, default_max_concurrent_ops, KeyServerAddr, SiteConfig,
};

/// `[keyserver]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyServerConfig {
    /// Single-group form: `host:port` of each key server, most preferred first.
    #[serde(default)]
    servers: Vec<KeyServerAddr>,
    /// Single-group form: CA that key-server certificates chain to.
    #[serde(default)]
    ca: Option<PathBuf>,
    /// Single-group form: the edge's client certificate (PEM chain).
    #[serde(default)]
    cert: Option<PathBuf>,
    /// Single-group form: the edge's client key (PEM).
    #[serde(default)]
    key: Option<PathBuf>,
    /// Single-group form: name to verify key-server certificates against.
    #[serde(default)]
    server_name: Option<String>,
    /// The key-server groups (after loading, also the single-group form's).
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// Connections per key server. Default 2.
    #[serde(default = "default_ks_connections")]
    pub connections: NonZeroUsize,
    /// Deadline of each key-server request, and of each probe. Default "2s".
    #[serde(default = "default_2s", with = "humantime_serde")]
    pub timeout: Duration,
    /// Deadline of connecting to a key server. Default "2s".
    #[serde(default = "default_2s", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Remote private-key operations (handshake signatures) that may wait for key
    /// servers at once; a handshake beyond it is refused at once with an alert. Each
    /// waiting signature holds a thread, so at most
    /// [`MAX_CONCURRENT_OPS_LIMIT`](super::MAX_CONCURRENT_OPS_LIMIT). Default 128.
    #[serde(default = "default_max_concurrent_ops")]
    pub max_concurrent_ops: NonZeroUsize,
    /// Interval of the heartbeat ping to every key server. Default "2s".
    #[serde(default = "default_2s", with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Longest interval between probes of a server that is down (the interval doubles
    /// from `probe_interval` while its probes fail). Default "10s".
    #[serde(default = "default_probe_max_interval", with = "humantime_serde")]
    pub probe_max_interval: Duration,
    /// Consecutive failed probes or requests that mark a server down. Default 3.
    #[serde(default = "default_threshold")]
    pub down_after: NonZeroU32,
    /// Consecutive successful probes that mark a down server up again. Default 3.
    #[serde(default = "default_threshold")]
    pub up_after: NonZeroU32,
}

/// `[[keyserver.group]]`: key servers that hold the same keys, and the edge's identity
/// towards them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// The group's name, as sites name it (`keyserver_group`).
    pub name: String,
    /// CA that the group's key-server certificates chain to.
    pub ca: PathBuf,
    /// The edge's client certificate towards this group (PEM chain).
    pub cert: PathBuf,
    /// The edge's client key towards this group (PEM).
    pub key: PathBuf,
    /// Name to verify key-server certificates against. Default: each server's host
    /// (for SRV: the target name).
    #[serde(default)]
    pub server_name: Option<String>,
    /// A static list of servers (or `srv`).
    #[serde(default)]
    servers: Option<Vec<ServerEntry>>,
    /// The name whose SRV records `_keyless._tcp.<srv>` list the servers (or `servers`).
    #[serde(default)]
    srv: Option<String>,
    /// `keyless` (default): our extensions are used; `reference`: the reference
    /// protocol only, for key servers such as Cloudflare's gokeyless.
    #[serde(default)]
    pub protocol: Protocol,
    /// `host:port` of the group's enrollment API: the edge renews `cert` and `key` there
    /// at 2/3 of the certificate's lifetime (`keyless-edge enroll` prints this line).
    /// None: the credential is not renewed by the edge.
    #[serde(default)]
    pub enroll: Option<KeyServerAddr>,
}

/// Where a group's servers come from.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupServers<'a> {
    /// `servers = [{ addr = "host:port", priority = 10, weight = 1 }, ...]`.
    Static {
        /// The servers.
        servers: &'a [ServerEntry],
    },
    /// `srv = "keyservers.example"`: the SRV records of `_keyless._tcp.<name>`,
    /// re-resolved when their TTL expires.
    Srv {
        /// The name under `_keyless._tcp.`.
        srv: &'a str,
    },
}

/// One key server of a static list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    /// `host:port`.
    pub addr: KeyServerAddr,
    /// Lower values are preferred (as in SRV). Default 10.
    #[serde(default = "default_priority")]
    pub priority: u16,
    /// Share of the requests among servers of the same priority. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u16,
}

/// The dialect a group's key servers speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Keyless protocol v1 with our extensions (signed-message, get-certificate-chain,
    /// heartbeat with the server's clock, drain).
    #[default]
    Keyless,
    /// The reference protocol only: bare digests, no extension tags; each site's chain
    /// comes from its `chain` file.
    Reference,
}

fn default_probe_max_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_threshold() -> NonZeroU32 {
    NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN)
}

fn default_priority() -> u16 {
    10
}

fn default_weight() -> u16 {
    1
}

impl KeyServerConfig {
    /// Turns the single-group form into a group, makes relative paths relative to
    /// `base`, and checks the groups and the sites' references to them (each site gets
    /// its group's name and an absolute chain path).
    pub(super) fn resolve(&mut self, base: &Path, sites: &mut [SiteConfig]) -> Result<(), String> {
        self.single_group()?;
        if self.groups.is_empty() {
            return Err(
                "[keyserver] needs `servers` (with ca, cert, key) or [[keyserver.group]] sections"
                    .into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for g in &mut self.groups {
            if !names.insert(g.name.clone()) {
                return Err(format!("key-server group {:?} is defined twice", g.name));
            }
            g.check()?;
            for p in [&mut g.ca, &mut g.cert, &mut g.key] {
                absolute(base, p);
            }
        }
        if self.probe_max_interval < self.probe_interval {
            return Err("[keyserver] probe_max_interval is shorter than probe_interval".into());
        }
        for site in sites {
            let name = site.domains.first().cloned().unwrap_or_default();
            let group = match &site.keyserver_group {
                Some(g) => self
                    .groups
                    .iter()
                    .find(|c| &c.name == g)
                    .ok_or_else(|| format!("site {name}: keyserver_group {g:?} is not a [[keyserver.group]]"))?,
                None if self.groups.len() == 1 => &self.groups[0],
                None => {
                    return Err(format!(
                        "site {name}: keyserver_group is required when several key-server groups are configured"
                    ))
                }
            };
            site.keyserver_group = Some(group.name.clone());
            if let Some(chain) = site.chain.as_mut() {
                absolute(base, chain);
            } else if group.protocol == Protocol::Reference {
                return Err(format!(
                    "site {name}: group {:?} speaks the reference protocol, so the site needs a local `chain` file",
                    group.name
                ));
            }
        }
        Ok(())
    }

    /// The single-group form as the group `default`, its servers preferred in order.
    fn single_group(&mut self) -> Result<(), String> {
        let single = !self.servers.is_empty()
            || self.ca.is_some()
            || self.cert.is_some()
            || self.key.is_some();
        if !single {
            return Ok(());
        }
        if !self.groups.is_empty() {
            return Err("[keyserver] takes either `servers`, `ca`, `cert`, `key` or [[keyserver.group]] sections, not both".into());
        }
        let (Some(ca), Some(cert), Some(key)) = (self.ca.take(), self.cert.take(), self.key.take())
        else {
            return Err("[keyserver] needs ca, cert and key with `servers`".into());
        };
        let servers = std::mem::take(&mut self.servers)
            .into_iter()
            .enumerate()
            .map(|(i, addr)| ServerEntry {
                addr,
                priority: u16::try_from(i).unwrap_or(u16::MAX),
                weight: 1,
            })
            .collect();
        self.groups.push(GroupConfig {
            name: "default".into(),
            ca,
            cert,
            key,
            server_name: self.server_name.take(),
            servers: Some(servers),
            srv: None,
            protocol: Protocol::Keyless,
            enroll: None,
        });
        Ok(())
    }

    /// Key servers of every static group, for summaries.
    pub fn static_servers(&self) -> impl Iterator<Item = &KeyServerAddr> {
        self.groups.iter().flat_map(|g| match g.source() {
            GroupServers::Static { servers } => servers.iter().map(|s| &s.addr).collect(),
            GroupServers::Srv { .. } => Vec::new(),
        })
    }
}

impl GroupConfig {
    /// Where the group's servers come from (checked when the file was loaded: exactly
    /// one of `servers` and `srv`).
    pub fn source(&self) -> GroupServers<'_> {
        match (&self.servers, &self.srv) {
            (_, Some(srv)) => GroupServers::Srv { srv },
            (Some(servers), None) => GroupServers::Static { servers },
            (None, None) => GroupServers::Static { servers: &[] },
        }
    }

    fn check(&self) -> Result<(), String> {
        let name = &self.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "key-server group name {name:?}: use letters, digits, '-', '_', '.'"
            ));
        }
        match (&self.servers, &self.srv) {
            (Some(_), Some(_)) => Err(format!(
                "key-server group {name:?} takes `servers` or `srv`, not both"
            )),
            (None, None) => Err(format!(
                "key-server group {name:?} needs `servers` or `srv`"
            )),
            (Some(servers), None) if servers.is_empty() => {
                Err(format!("key-server group {name:?} has no servers"))
            }
            (None, Some(srv)) if srv.is_empty() || srv.contains(char::is_whitespace) => Err(
                format!("key-server group {name:?}: srv {srv:?} is not a DNS name"),
            ),
            _ => Ok(()),
        }
    }
}

fn absolute(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn parse(keyserver: &str, sites: &str) -> Result<Config, String> {
        let text = format!("[listen]\n{keyserver}\n{sites}");
        Config::parse(&text, Path::new("/etc/keyless/edge.toml")).map_err(|e| e.to_string())
    }

    const SITE: &str = "[[site]]\ndomains = [\"a.example\"]\norigin = \"http://o:80\"\n";

    #[test]
    fn the_single_group_form_is_the_default_group_in_order() {
        let c = parse(
            "[keyserver]\nservers = [\"k1:1\", \"k2:1\"]\nca = \"ca.pem\"\ncert = \"e.pem\"\nkey = \"e.key\"\n",
            SITE,
        )
        .unwrap();
        let [g] = &c.keyserver.groups[..] else {
            panic!("one group")
        };
        assert_eq!(g.name, "default");
        assert_eq!(g.ca, Path::new("/etc/keyless/ca.pem"));
        let GroupServers::Static { servers } = g.source() else {
            panic!("static")
        };
        let order: Vec<_> = servers
            .iter()
            .map(|s| (s.addr.as_str(), s.priority))
            .collect();
        assert_eq!(order, [("k1:1", 0), ("k2:1", 1)]);
        assert_eq!(c.sites[0].keyserver_group.as_deref(), Some("default"));
    }

    #[test]
    fn groups_with_static_servers_and_srv() {
        let ks = r#"
[keyserver]
probe_interval = "500ms"
[[keyserver.group]]
name = "acme"
ca = "ca.pem"
cert = "e.pem"
key = "e.key"
servers = [{ addr = "k1:2407", priority = 10, weight = 3 }, { addr = "k2:2407" }]
[[keyserver.group]]
name = "bank"
ca = "/b/ca.pem"
cert = "/b/e.pem"
key = "/b/e.key"
srv = "ks.bank.example"
protocol = "reference"
"#;
        let sites = "[[site]]\ndomains = [\"a.example\"]\norigin = \"http://o:80\"\nkeyserver_group = \"acme\"\n[[site]]\ndomains = [\"b.example\"]\norigin = \"http://o:80\"\nkeyserver_group = \"bank\"\nchain = \"b.pem\"\n";
        let c = parse(ks, sites).unwrap();
        assert_eq!(c.keyserver.probe_interval, Duration::from_millis(500));
        let GroupServers::Static { servers } = c.keyserver.groups[0].source() else {
            panic!()
        };
        assert_eq!((servers[0].priority, servers[0].weight), (10, 3));
        assert_eq!((servers[1].priority, servers[1].weight), (10, 1));
        assert!(
            matches!(c.keyserver.groups[1].source(), GroupServers::Srv { srv } if srv == "ks.bank.example")
        );
        assert_eq!(c.keyserver.groups[1].protocol, Protocol::Reference);
        assert_eq!(
            c.sites[1].chain.as_deref(),
            Some(Path::new("/etc/keyless/b.pem"))
        );
    }

    #[test]
    fn group_mistakes_are_named() {
        let group = |name: &str, extra: &str| {
            format!("[[keyserver.group]]\nname = \"{name}\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n{extra}\n")
        };
        let two = format!(
            "[keyserver]\n{}{}",
            group("a", "srv = \"x.example\""),
            group("b", "srv = \"y.example\"")
        );
        let err = parse(&two, SITE).unwrap_err();
        assert!(err.contains("keyserver_group is required"), "{err}");
        let dup = format!(
            "[keyserver]\n{}{}",
            group("a", "srv = \"x\""),
            group("a", "srv = \"y\"")
        );
        assert!(parse(&dup, SITE).unwrap_err().contains("defined twice"));
        let reference = format!(
            "[keyserver]\n{}",
            group("a", "srv = \"x\"\nprotocol = \"reference\"")
        );
        assert!(parse(&reference, SITE)
            .unwrap_err()
            .contains("local `chain`"));
        let unknown = format!("[keyserver]\n{}", group("a", "srv = \"x\""));
        let site = format!("{SITE}keyserver_group = \"nope\"\n");
        assert!(parse(&unknown, &site).unwrap_err().contains("\"nope\""));
        let both = format!(
            "[keyserver]\nservers = [\"k:1\"]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n{}",
            group("a", "srv = \"x\"")
        );
        assert!(parse(&both, SITE).unwrap_err().contains("not both"));
        assert!(parse("[keyserver]\n", SITE).unwrap_err().contains("needs"));
        let empty = format!("[keyserver]\n{}", group("a", "servers = []"));
        assert!(parse(&empty, SITE).unwrap_err().contains("no servers"));
    }
}
