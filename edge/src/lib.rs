//! keyless edge: terminates TLS for customer sites while every private-key operation
//! is made by a key server.
//!
//! - [`tls`]: client handshakes, chains fetched by SNI, remote signing;
//! - [`keyserver`]: the multiplexed key-server client;
//! - [`proxy`]: HTTP/1.1 and h2 reverse proxy to origins resolved by DNS;
//! - [`admin`]: health and metrics.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod config;
pub mod httpdate;
pub mod keyserver;
pub mod metrics;
pub mod proxy;
pub mod sites;
pub mod tls;
