#!/usr/bin/env bash
# Builds and runs markco (release). With no arguments: the embedded default, a welcome page on
# http://127.0.0.1:8080 and the admin API on http://127.0.0.1:2019, state in ./data/markco.db.
# Arguments go to `markco run`, e.g. ./scripts/run.sh --config deploy/markco.example.toml
set -euo pipefail
cd "$(dirname "$0")/.."
# A Rust toolchain that setup.sh just installed is not on this shell's PATH yet.
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
exec cargo run --release -p markco -- run "$@"
