//! End-to-end tests of the key server: each test starts its own `keyless-origin` on free
//! loopback ports with a fresh `keyless-certs init` deployment and talks to it over
//! real mutual TLS. Tests run in parallel.

mod auth;
mod cache_purge;
mod cache_rfc;
mod cache_safety;
mod cache_semantics;
mod cache_stale;
mod cache_storage;
mod cache_support;
mod cache_validation;
mod certs;
mod chain;
mod config;
mod edge;
mod edge_faults;
mod edge_invariant;
mod edge_ops;
mod edge_reload;
mod edge_strict;
mod edge_support;
mod enroll_edge;
mod enroll_keyserver;
mod errors;
mod fleet;
mod hsm;
mod interim;
mod keyserver_drain;
mod keyserver_hardening;
mod keyserver_rotation;
mod lifecycle;
mod malformed;
mod ops;
mod ops_metrics;
mod packages;
mod pipelining;
mod resumption;
mod session_store;
mod support;
mod tracing_otlp;
mod upgrade;
