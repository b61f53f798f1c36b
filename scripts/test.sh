#!/usr/bin/env bash
# The test command of the README: installs what the tests need on a fresh Debian
# machine, then runs every check CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
install_deps

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== fuzz target builds"
cargo build --locked --manifest-path fuzz/Cargo.toml
echo "== cargo test"
cargo test --workspace --locked
