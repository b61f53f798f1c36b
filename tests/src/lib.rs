//! End-to-end test support for keyless: builds and starts the real binaries on free
//! loopback ports and drives them over real mutual TLS.
//!
//! - [`Deployment`]: a temporary directory filled by `keyless-certs init`.
//! - [`KeyServer`]: a running `keyless-origin` with its log captured to a file.
//! - [`KeyClient`]: a Keyless protocol client with an edge's client certificate.
//! - [`keys`]: site keys, extra key generation, digests and signature verification.
//! - [`Edge`] / [`EdgeConfig`]: a running `keyless-edge` and its `edge.toml`.
//! - [`TestOrigin`], [`Dns`]: the content origin and a real DNS server (dnsmasq) behind
//!   the edge; [`DelayProxy`]: a relay that slows the key server down.
//! - [`Curl`], [`SClient`], [`KeepAliveClient`]: real clients of the edge.
//! - [`Redis`]: a real Redis (or Redis Cluster node) for the edge's session store.
//! - [`ResumeClient`]: a returning visitor that offers its TLS session to any edge.
//! - [`memscan`]: looking for site key material in files and in process memory.
//! - [`enroll`]: a client of the key server's enrollment API ([`EnrollClient`]) and
//!   the operator's token and edges commands.
//!
//! Setup failures are `anyhow` errors (they are reported, never matched on); the client,
//! whose failures tests do match on, has the typed [`ClientError`].
#![forbid(unsafe_code)]

mod bins;
mod client;
mod delay_proxy;
mod deployment;
mod dns;
mod edge;
pub mod enroll;
mod flood;
pub mod hsm;
mod https;
pub mod keys;
pub mod memscan;
mod net;
mod process;
mod redis;
mod resume;
mod server;
mod test_origin;
mod tools;

pub use bins::{binary, certs_bin, ensure_built, origin_bin, target_dir, workspace_root, Profile};
pub use client::{
    sign_request, ClientError, ClientOptions, KeyClient, Reader, TlsStream, TlsVersion, Writer,
    DEFAULT_TIMEOUT,
};
pub use delay_proxy::DelayProxy;
pub use deployment::{
    add_acl, allow_rsa_decrypt, set_default_acl, set_permissive, set_tls, unique_temp_dir,
    Deployment, EDGE_NAME,
};
pub use dns::{Dns, SrvRecord};
pub use edge::{check_edge_config, edge_bin, metric_sum, Edge, EdgeConfig, SiteEntry};
pub use enroll::{EnrollClient, Tamper};
pub use flood::{
    handshake_flood, per_phase, FloodReport, HandshakeEnd, HandshakeLoad, HandshakeOutcome,
    LoadOutcome,
};
pub use https::{KeepAliveClient, KeepAliveResponse};
pub use net::{free_addr, free_port, http_get, wait_for_port};
pub use process::run_with_timeout;
pub use redis::Redis;
pub use resume::{ResumeBy, ResumeClient};
pub use server::{
    check_config, check_config_text, has_field, keyserver_ops_ok, strip_ansi, KeyServer, Signal,
};
pub use test_origin::{
    blob_range, http_date, parse_http_date, pattern_body, Scripted, SeenRequest, TestOrigin,
    BLOB_PAGE,
};
pub use tools::{Curl, CurlOutput, HttpVersion, SClient, SClientOutput};
