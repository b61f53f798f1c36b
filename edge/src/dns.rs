//! Name resolution through hickory, for origin host names and key-server SRV records:
//! the name servers of `[dns]` or the system's (`/etc/resolv.conf`, `/etc/hosts`), with
//! a bounded cache that keeps each answer for its TTL.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use crate::config::DnsConfig;
use crate::config::NameServer;

/// A name that did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("{name} did not resolve: {reason}")]
pub struct DnsError {
    /// The name asked for.
    pub name: String,
    /// The resolver's answer.
    pub reason: String,
}

/// The resolver of `[dns]` cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct ResolverError(#[source] hickory_resolver::net::NetError);

/// One SRV record (RFC 2782).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvTarget {
    /// Lower is preferred.
    pub priority: u16,
    /// Share among targets of one priority.
    pub weight: u16,
    /// The port to connect to.
    pub port: u16,
    /// The target host, without the trailing dot.
    pub target: String,
}

/// Answers kept at most (names × record types); each expires with its TTL.
const CACHE_SIZE: u64 = 1024;
/// Deadline of one DNS query when `[dns] timeout` is not set.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// A name that does not exist is asked again after at most this long, so that an
/// origin whose record was just created is found quickly.
const NEGATIVE_MAX_TTL: Duration = Duration::from_secs(30);

/// Resolves host names to the addresses to connect to, and SRV records.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// Builds the resolver of `[dns]`: its name servers (UDP, and TCP for truncated
    /// answers), or the system configuration when none are listed.
    pub fn new(config: &DnsConfig) -> Result<Resolver, ResolverError> {
        let mut builder = if config.nameservers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(builder) => builder,
                Err(e) => {
                    // A host without resolv.conf can still proxy to IP-literal origins
                    // and to names in /etc/hosts; names needing DNS fail per request.
                    tracing::warn!(error = %e, "system DNS configuration unreadable; origin names resolve from /etc/hosts only");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(Vec::new()),
                        TokioRuntimeProvider::default(),
                    )
                }
            }
        } else {
            let servers = config
                .nameservers
                .iter()
                .copied()
                .map(name_server)
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = config.timeout.unwrap_or(DEFAULT_TIMEOUT);
        opts.cache_size = CACHE_SIZE;
        // Positive answers live exactly their TTL (no floor, hickory's one-day cap).
        opts.positive_min_ttl = None;
        opts.negative_max_ttl = Some(NEGATIVE_MAX_TTL);
        // Both families, IPv4 first: the connector tries them in this order.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let inner = builder.build().map_err(ResolverError)?;
        Ok(Resolver { inner })
    }

    /// The addresses of `host` (a name, an IP literal, or a bracketed IPv6 literal) with
    /// `port`, in the order to try them. IP literals are returned without a query.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let dns_error = |reason: String| DnsError {
            name: host.to_owned(),
            reason,
        };
        let lookup = self
            .inner
            .lookup_ip(bare)
            .await
            .map_err(|e| dns_error(e.to_string()))?;
        let addrs: Vec<SocketAddr> = lookup
            .iter()
            .map(|ip| SocketAddr::new(ip.to_canonical(), port))
            .collect();
        if addrs.is_empty() {
            return Err(dns_error("no addresses".into()));
        }
        Ok(addrs)
    }

    /// The SRV records of `name`, and until when the answer may be used (its TTL).
    pub async fn srv(&self, name: &str) -> Result<(Vec<SrvTarget>, Instant), DnsError> {
        let dns_error = |reason: String| DnsError {
            name: name.to_owned(),
            reason,
        };
        let lookup = self
            .inner
            .srv_lookup(name)
            .await
            .map_err(|e| dns_error(e.to_string()))?;
        let targets: Vec<SrvTarget> = lookup
            .answers()
            .iter()
            .filter_map(|rec| match &rec.data {
                RData::SRV(srv) => Some(SrvTarget {
                    priority: srv.priority,
                    weight: srv.weight,
                    port: srv.port,
                    target: srv.target.to_string().trim_end_matches('.').to_owned(),
                }),
                _ => None,
            })
            .collect();
        if targets.is_empty() {
            return Err(dns_error("no SRV records".into()));
        }
        Ok((targets, lookup.valid_until()))
    }
}

/// The hickory configuration of one name server (UDP, and TCP for truncated answers).
fn name_server(NameServer(addr): NameServer) -> NameServerConfig {
    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
    for conn in &mut server.connections {
        conn.port = addr.port();
    }
    server
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literals_bypass_dns() {
        let r = Resolver::new(&DnsConfig::default()).unwrap();
        assert_eq!(
            r.resolve("127.0.0.1", 8080).await.unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 8080))]
        );
        let v6 = r.resolve("[::1]", 443).await.unwrap();
        assert_eq!(v6, vec!["[::1]:443".parse::<SocketAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback() {
        let r = Resolver::new(&DnsConfig::default()).unwrap();
        // Tolerant: some sandboxes have neither /etc/hosts entries nor a resolver.
        match r.resolve("localhost", 80).await {
            Ok(addrs) => {
                assert!(!addrs.is_empty());
                assert!(
                    addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 80),
                    "{addrs:?}"
                );
            }
            Err(e) => eprintln!("localhost did not resolve here: {e}"),
        }
    }

    #[test]
    fn name_servers_configure_udp_and_tcp_on_their_port() {
        let ns = |s: &str| s.parse::<NameServer>().unwrap();
        let config = DnsConfig {
            nameservers: ["10.0.0.1", "127.0.0.1:5353", "[::1]:53", "::1"]
                .map(ns)
                .to_vec(),
            timeout: Some(Duration::from_millis(500)),
        };
        assert!(Resolver::new(&config).is_ok());
        let s = name_server(ns("127.0.0.1:5353"));
        assert!(s.connections.iter().all(|c| c.port == 5353));
        assert_eq!(s.connections.len(), 2);
        assert!(name_server(ns("10.0.0.1"))
            .connections
            .iter()
            .all(|c| c.port == 53));
    }
}
