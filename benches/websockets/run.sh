#!/usr/bin/env bash
# Idle websocket memory: markco, nginx and Caddy side by side, each proxying COUNT idle upgraded
# connections (default 4000) to the same websocket echo upstream (the project's test upstream);
# plain for all three, and over TLS for markco and nginx. Reports KiB of proxy RSS per connection
# (RSS with the connections open, less RSS before them, over COUNT; nginx: master + workers), and
# checks that every connection still relays a message after idling.
#   benches/websockets/run.sh            COUNT=4000 ONLY="markco nginx caddy markco-tls nginx-tls"
# Needs nginx, caddy, openssl, python3; everything listens on 127.0.0.1 (ports 19101-19129).
set -euo pipefail
set +m
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname -- "$(dirname -- "$HERE")")
COUNT=${COUNT:-4000}
ONLY=${ONLY:-markco nginx caddy markco-tls nginx-tls}
HOLD=${HOLD:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/markco/target}
log() { printf '[ws-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
for t in nginx caddy openssl python3 curl setsid; do command -v "$t" >/dev/null || die "missing tool: $t"; done
if [[ -z ${MARKCO_BIN:-} ]]; then
	log "building markco and the test upstream (release)"
	(cd "$REPO" && cargo build --release -q -p markco -p markco-testupstream) || die "build failed"
	MARKCO_BIN=$CARGO_TARGET_DIR/release/markco
fi
UPSTREAM_BIN=${UPSTREAM_BIN:-$CARGO_TARGET_DIR/release/markco-testupstream}
[[ -x $MARKCO_BIN && -x $UPSTREAM_BIN ]] || die "missing binaries ($MARKCO_BIN, $UPSTREAM_BIN)"
need=$((COUNT * 2 + 512))
(($(ulimit -n) >= need)) || ulimit -n "$need" 2>/dev/null || die "need $need open files (ulimit -n is $(ulimit -n))"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/markco-ws-bench.XXXXXX")
declare -A PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
	sleep 1
	for p in "${PIDS[@]}"; do pkill -KILL -s "$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true; done
	[[ ${KEEP_TMP:-0} == 1 ]] || rm -rf "$TMP"
}
trap cleanup EXIT
start() { # start NAME CMD...
	local name=$1
	shift
	setsid "$@" >"$TMP/$name.log" 2>&1 &
	PIDS[$name]=$!
}
members() { ps -o pid= -s "$1" 2>/dev/null | tr -d ' ' | paste -sd, -; }
wait_port() { # wait_port PORT [https]
	local i scheme=${2:-http}
	for ((i = 0; i < 100; i++)); do
		curl -skf -o /dev/null --max-time 1 --resolve "localhost:$1:127.0.0.1" "$scheme://localhost:$1/" && return 0
		sleep 0.2
	done
	die "nothing answers on port $1 (logs in $TMP; KEEP_TMP=1 keeps them)"
}

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
	-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null

start upstream "$UPSTREAM_BIN" --listen 127.0.0.1:19101 --name ws
cat >"$TMP/markco.toml" <<CONF
[server]
http = "127.0.0.1:19104"
https = "127.0.0.1:19105"
admin = "127.0.0.1:19129"
threads = 2
redirect_to_https = false
upstream_connect_timeout = "10s"
max_connections_per_ip = $((COUNT + 100))
upgrade_sock = "$TMP/upgrade.sock"
pid_file = "$TMP/markco.pid"
[log]
access_log = false
[[site]]
hosts = ["localhost", "127.0.0.1"]
tls = { cert = "$TMP/cert.pem", key = "$TMP/key.pem" }
  [[site.route]]
  match = ["/*"]
  proxy = "127.0.0.1:19101"
CONF
start markco "$MARKCO_BIN" run --config "$TMP/markco.toml"
cat >"$TMP/nginx.conf" <<CONF
worker_processes 2;
worker_rlimit_nofile $need;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log;
daemon off;
events { worker_connections $need; }
http {
  access_log off;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
  upstream ws { server 127.0.0.1:19101; }
  server {
    listen 127.0.0.1:19103;
    listen 127.0.0.1:19106 ssl;
    ssl_certificate $TMP/cert.pem;
    ssl_certificate_key $TMP/key.pem;
    location / {
      proxy_pass http://ws;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_read_timeout 1h;
    }
  }
}
CONF
start nginx nginx -p "$TMP" -c "$TMP/nginx.conf"
cat >"$TMP/Caddyfile" <<CONF
{
	admin 127.0.0.1:19119
	auto_https off
}
http://:19102 {
	bind 127.0.0.1
	reverse_proxy 127.0.0.1:19101
}
CONF
start caddy env GOMAXPROCS=2 caddy run --config "$TMP/Caddyfile" --adapter caddyfile
wait_port 19101
wait_port 19104
wait_port 19105 https
wait_port 19103
wait_port 19106 https
wait_port 19102

declare -A PORT=([markco]=19104 [markco-tls]=19105 [nginx]=19103 [nginx-tls]=19106 [caddy]=19102)
declare -A PROC=([markco]=markco [markco-tls]=markco [nginx]=nginx [nginx-tls]=nginx [caddy]=caddy)
results=()
for target in $ONLY; do
	[[ -n ${PORT[$target]:-} ]] || die "unknown target $target"
	tls=()
	[[ $target == *-tls ]] && tls=(--tls)
	pids=$(members "${PIDS[${PROC[$target]}]}")
	log "$target: $COUNT idle websockets"
	line=$(python3 "$HERE/idle_ws.py" --port "${PORT[$target]}" --pids "$pids" --count "$COUNT" --hold "$HOLD" "${tls[@]}") ||
		die "$target: not every websocket relayed after idling: $line"
	results+=("$target $line")
	sleep 2 # the connections close before the next target
done

date_utc=$(date -u +%Y-%m-%d-%H%M%S)
out="$REPO/benches/results/websockets-$date_utc.md"
{
	echo "# Idle websocket memory, $date_utc"
	echo
	echo "- $COUNT idle upgraded connections per target through the proxy to one echo upstream; each relayed a message after ${HOLD}s idle"
	echo "- Machine: $(nproc) CPUs, Linux $(uname -r); markco threads = 2, nginx worker_processes 2, Caddy GOMAXPROCS=2"
	echo
	echo "| target | KiB per connection | RSS before (MiB) | RSS with $COUNT open (MiB) | relayed after idling |"
	echo "|---|---|---|---|---|"
	for r in "${results[@]}"; do
		set -- $r
		t=$1
		declare -A kv=()
		for f in "${@:2}"; do kv[${f%%=*}]=${f#*=}; done
		awk -v t="$t" -v k="${kv[kib_per_conn]}" -v b="${kv[rss_before_kib]}" -v a="${kv[rss_after_kib]}" -v ok="${kv[ok]}" -v n="${kv[count]}" \
			'BEGIN { printf "| %s | %.1f | %.1f | %.1f | %d/%d |\n", t, k, b / 1024, a / 1024, ok, n }'
	done
} | tee "$out"
log "written to $out"
