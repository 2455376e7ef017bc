#!/usr/bin/env bash
# Workspace start-to-ready time and the gateway's memory per managed workspace, with real podman.
#
# markco (release) manages N users' workspaces (editor + runtime, each the project's test upstream
# in a FROM scratch image, as scripts/build-test-image.sh builds it). For each user in turn the
# script times the first request to /u/<id>/ (start of both containers, both ready, answer through
# them), then reports p50/p95 over N, and markco's RSS before and after (per workspace).
#   USERS (20), MARKCO_BIN, PORT_BASE (19600), MARKCO_PODMAN_SOCKET (/run/podman/podman.sock)
set -euo pipefail
cd "$(dirname "$0")/../.."
USERS="${USERS:-20}"
PORT_BASE="${PORT_BASE:-19600}"
SOCKET="${MARKCO_PODMAN_SOCKET:-/run/podman/podman.sock}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/markco/target}"
MARKCO_BIN="${MARKCO_BIN:-$CARGO_TARGET_DIR/release/markco}"
if [ "${1:-}" = "--help" ]; then sed -n '2,9p' "$0"; exit 0; fi
[ -x "$MARKCO_BIN" ] || { echo "no markco binary at $MARKCO_BIN: cargo build --release -p markco" >&2; exit 1; }
./scripts/build-test-image.sh
tmp="$(mktemp -d /tmp/markco-wsbench.XXXXXX)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  for u in "${users[@]:-}"; do [ -n "$u" ] && podman pod rm -f "markco-ws-$u" >/dev/null 2>&1 || true; done
  rm -rf "$tmp"
}
users=()
trap cleanup EXIT
http="127.0.0.1:$PORT_BASE"; admin="127.0.0.1:$((PORT_BASE + 1))"
cat > "$tmp/markco.toml" <<CONF
[server]
http = "$http"
admin = "$admin"
threads = 2
upgrade_sock = "$tmp/u.sock"
pid_file = "$tmp/m.pid"
[log]
access_log = false
[database]
url = "sqlite://$tmp/m.db"
[workspaces]
engine = "unix://$SOCKET"
data_dir = "$tmp/users"
editor_image = "localhost/markco-testupstream:test"
runtime_image = "localhost/markco-testupstream:test"
editor_ports = "$((PORT_BASE + 100))-$((PORT_BASE + 199))"
runtime_ports = "$((PORT_BASE + 200))-$((PORT_BASE + 399))"
editor_command = []
runtime_command = []
editor_env = { PORT = "{port}" }
runtime_env = { PORT = "{port}" }
idle_timeout = "0s"
[[site]]
hosts = ["*"]
  [[site.route]]
  match = ["/u/*"]
  workspace = true
CONF
tokens=()
for i in $(seq 1 "$USERS"); do
  out="$("$MARKCO_BIN" user add "bench$i@example.com" --json --config "$tmp/markco.toml")"
  users+=("$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$out")")
  tokens+=("$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$out")")
done
"$MARKCO_BIN" run --config "$tmp/markco.toml" > "$tmp/markco.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do curl -sf "http://$admin/health" >/dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
rss0="$(rss)"
times=()
for i in "${!users[@]}"; do
  t="$(curl -s -o /dev/null -w '%{http_code} %{time_total}' -H "Authorization: Bearer ${tokens[$i]}" "http://$http/u/${users[$i]}/")"
  [ "${t%% *}" = "200" ] || { echo "user $i: $t" >&2; tail -20 "$tmp/markco.log" >&2; exit 1; }
  times+=("${t#* }")
done
sleep 1
rss1="$(rss)"
python3 - "$rss0" "$rss1" "$USERS" "${times[@]}" <<'PY'
import statistics, sys
rss0, rss1, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
t = sorted(float(x) * 1000 for x in sys.argv[4:])
p = lambda q: t[min(len(t) - 1, int(round(q * (len(t) - 1))))]
print(f"| workspaces | start-to-ready p50 ms | p95 ms | max ms | markco RSS idle MB | RSS with {n} MB | KiB per workspace |")
print("|---:|---:|---:|---:|---:|---:|---:|")
print(f"| {n} | {p(0.5):.0f} | {p(0.95):.0f} | {t[-1]:.0f} | {rss0/1024:.1f} | {rss1/1024:.1f} | {(rss1-rss0)/n:.0f} |")
PY
