//! Load tests of the edge: a handshake flood while the key server hangs or is slow.
//! They measure how fast the edge keeps answering, so they run in a test binary of
//! their own (cargo runs test binaries one after another) and one at a time.

mod edge_overload;
// The `it` binary's stack builder; this binary uses only part of it.
#[allow(dead_code)]
#[path = "../it/edge_support.rs"]
mod edge_support;
