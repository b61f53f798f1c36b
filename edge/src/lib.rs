//! keyless edge: terminates TLS for customer sites while every private-key operation
//! is made by a key server, and serves their HTTP through a cache.
//!
//! A request flows one way, each layer importing only those below it:
//!
//! - [`serve`]: listeners, client connections (TLS through [`tls`], HTTP/1.1 and h2),
//!   site by host, the request rewritten into its upstream form;
//! - [`cache`]: the HTTP cache, reaching the origin through the
//!   [`exchange::Fetch`] interface only;
//! - [`upstream`]: the origin client (DNS, pooled connections).
//!
//! Beside them: [`tls`] (handshakes, chains by SNI, remote signing), [`keyserver`]
//! (the multiplexed key-server client), [`admin`] (health, metrics, purge, reload),
//! [`config`] (parsed into typed values at start and on each reload) and
//! [`run`](mod@run) (assembly; `reload` rebuilds the fronts from a new configuration).
#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod config;
pub mod dns;
pub mod enroll;
pub mod exchange;
pub mod httpdate;
pub mod keyserver;
pub mod metrics;
mod reload;
pub mod run;
pub mod serve;
pub mod sessions;
mod side_runtime;
pub mod sites;
pub mod tickets;
pub mod tls;
pub mod upstream;

pub use run::{check, run, runtime, Stop};
