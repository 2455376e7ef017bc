#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for FUZZ_SECONDS each (default 60), starting from the
# committed seed corpus. A crash fails the run (and leaves its input in fuzz/artifacts/).
# cargo-fuzz needs the sanitizer flags of a nightly compiler; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them, since no other toolchain can be installed here.
#   ./scripts/fuzz.sh                 every target, 60 s each
#   FUZZ_SECONDS=10 ./scripts/fuzz.sh request_target
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null
fi
export RUSTC_BOOTSTRAP=1
# Its own build dir: the sanitizer build shares nothing with the normal one.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}-fuzz"
seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  # The corpus grows in a scratch copy; only the committed seeds are kept in the repo.
  work="$(mktemp -d)"
  cp -r "corpus/$t/." "$work/"
  echo "fuzz: $t for ${seconds}s"
  log="$work/fuzz.log"
  if ! cargo fuzz run "$t" "$work" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED (input saved under fuzz/artifacts/$t)"
    exit 1
  fi
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  echo "fuzz: $t ok, $runs runs"
  rm -rf "$work"
done
