#!/usr/bin/env bash
# Installs what markco needs on Debian/Ubuntu. Safe to run again. Uses sudo when not root.
#   ./scripts/setup.sh          build needs: C toolchain and cmake (Pingora's zlib-ng), curl, Rust
#   ./scripts/setup.sh --test   also what the tests use, and starts their services:
#                               PostgreSQL (started, password set for the tests), pebble (ACME
#                               test server), wrk, psql, python3, chromium (the operator page's
#                               tests), and podman with its API service (scripts/podman-setup.sh)
set -euo pipefail

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

packages=(build-essential cmake pkg-config curl ca-certificates python3)
if [ "${1:-}" = "--test" ]; then
  packages+=(postgresql postgresql-client pebble wrk procps chromium)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: cargo is in ~/.cargo/bin; add it to PATH (source ~/.cargo/env)"
  else
    echo "setup: installing Rust with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  fi
fi

if [ "${1:-}" = "--test" ]; then
  # PostgreSQL for the tests: the distribution's cluster, started if it is not running, with a
  # password for the postgres role on loopback (the tests connect as postgres:postgres).
  if command -v pg_lsclusters >/dev/null 2>&1; then
    read -r ver cluster _ < <(pg_lsclusters -h | head -n 1) || true
    if [ -n "${ver:-}" ] && ! pg_lsclusters -h | grep -q online; then
      echo "setup: starting PostgreSQL $ver/$cluster"
      $SUDO pg_ctlcluster "$ver" "$cluster" start
    fi
    for _ in $(seq 1 30); do
      $SUDO -u postgres psql -qAtc 'select 1' >/dev/null 2>&1 && break
      sleep 0.5
    done
    if [ -z "$SUDO" ]; then
      su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
    else
      sudo -u postgres psql -qc "ALTER USER postgres PASSWORD 'postgres'" >/dev/null
    fi
  fi
fi
if [ "${1:-}" = "--test" ]; then
  "$(dirname "$0")/podman-setup.sh"
fi
echo "setup: done"
