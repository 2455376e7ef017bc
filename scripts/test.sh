#!/usr/bin/env bash
# Builds everything and runs every test: formatting, lints, unit tests and the integration tests
# that start the real markco binary against real peers (PostgreSQL, pebble, wrk; see
# `./scripts/setup.sh --test`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# The statically linked test upstream for the container image gets its own target dir (other
# RUSTFLAGS would invalidate the main cache), inside the main one so the clone stays clean.
export MARKCO_STATIC_TARGET_DIR="${MARKCO_STATIC_TARGET_DIR:-$CARGO_TARGET_DIR/static-testupstream}"
export MARKCO_PODMAN_SOCKET="${MARKCO_PODMAN_SOCKET:-/run/podman/podman.sock}"
export MARKCO_TEST_PG_URL="${MARKCO_TEST_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
# Hundreds of sockets are opened by the websocket tests.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests start the test upstream binary, so build every binary first.
cargo build --workspace --bins --locked
# The workspace tests run the test upstream as a container image built here (nothing is pulled).
./scripts/build-test-image.sh
cargo test --workspace --locked
