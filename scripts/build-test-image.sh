#!/usr/bin/env bash
# Builds the container image the workspace tests run as editor and runtime:
# localhost/markco-testupstream:test, FROM scratch with a statically linked test upstream (it
# speaks both contracts: /health and /mrp/v1/capabilities). Nothing is pulled.
# Rebuilds only when the binary changed. Uses its own target dir so the main cache is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
target_dir="${MARKCO_STATIC_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/static-testupstream}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p markco-testupstream \
  --target "$triple" --target-dir "$target_dir"
bin="$target_dir/$triple/release/markco-testupstream"
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/markco-testupstream"
cp testupstream/Containerfile "$ctx/Containerfile"
sum="$(sha256sum "$bin" | cut -c1-16)"
if podman image exists localhost/markco-testupstream:test \
  && [ "$(podman image inspect --format '{{ index .Labels "markco.build" }}' localhost/markco-testupstream:test 2>/dev/null)" = "$sum" ]; then
  exit 0
fi
podman build --quiet --label "markco.build=$sum" -t localhost/markco-testupstream:test "$ctx" >/dev/null
echo "built localhost/markco-testupstream:test ($sum)"
