//! Tests that move gigabytes through the edge (a 1 GiB object streamed through the disk
//! tier, sliced and assembled): a binary of their own, so that cargo runs them after
//! `it`, not beside its timing-sensitive tests (handshake deadlines of a few hundred ms),
//! which they would starve of CPU and disk.

mod cache_large;
// The `it` binary's helpers; this binary uses only part of them.
#[allow(dead_code)]
#[path = "../it/cache_support.rs"]
mod cache_support;
#[allow(dead_code)]
#[path = "../it/edge_support.rs"]
mod edge_support;
