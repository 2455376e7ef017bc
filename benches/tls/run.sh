#!/usr/bin/env bash
# TLS termination benchmark: markco vs Caddy vs nginx, each terminating TLS
# with the same certificate and proxying to the same single-worker nginx
# upstream, everything on 127.0.0.1. See benches/README.md for what it
# measures and how to read the output.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: benches/tls/run.sh [--help]

TLS-terminating reverse-proxy benchmark on 127.0.0.1. Every target serves
https://localhost:PORT/ with the same self-signed ECDSA P-256 certificate
(generated in the temp dir) and proxies to the same upstream nginx
(1 worker, `return 200`, 127.0.0.1:19401):
  markco   127.0.0.1:19443   rustls (Pingora), threads = 2
  floor    127.0.0.1:19445   not run by default: Pingora's TLS and HTTP/2 with
                             markco's upstream loop and nothing else, 2 threads
                             (benches/floor; FLOOR_BIN=PATH names its binary)
  caddy    127.0.0.1:19442   Go crypto/tls, GOMAXPROCS=2
  nginx    127.0.0.1:19444   OpenSSL, 2 workers              anchor of the ratios

Tests (each preceded by a 2 s warm-up; rounds interleaved, the target order
rotates by one each round):
  full     new connections, one request each, FULL handshakes: the bundled
           client (handshake_load.c, compiled into the temp dir; else
           handshake_load.py) with $CONNECTIONS concurrent closed loops of
           connect + TLS handshake + GET + read to EOF, never resuming
  resumed  the same with `wrk -t2 -c$CONNECTIONS -H 'Connection: close'`,
           which resumes TLS 1.3 sessions where the server allows it
  h2       keep-alive HTTP/2: `h2load -t2 -c$H2_CONNECTIONS -m$H2_STREAMS -D $DURATION`
All clients offer only TLS 1.3, the cipher TLS13_CIPHER and the group X25519
(an OPENSSL_CONF file in the temp dir), and do not verify certificates.

Environment:
  DURATION=10        seconds per measured run
  ROUNDS=3           interleaved rounds; the summary reports medians
  CONNECTIONS=32     concurrent connections for `full` and `resumed`
  H2_CONNECTIONS=32  h2load connections (-c)
  H2_STREAMS=10      h2load concurrent streams per connection (-m)
  ONLY="markco caddy nginx"
                     space-separated subset of targets
  TESTS="full resumed h2"
                     space-separated subset of tests
  TLS13_CIPHER=TLS_AES_128_GCM_SHA256
                     the one TLS 1.3 cipher suite the clients offer
  MARKCO_BIN=PATH    markco binary. Unset: $CARGO_TARGET_DIR/release/markco
                     (CARGO_TARGET_DIR defaults to /var/cache/markco/target),
                     built with `cargo build --release -p markco` only if it
                     is missing (or BUILD=1). The report warns when the binary
                     is older than the sources.
  MARKCO_SERVER_EXTRA="work_stealing = false"
                     extra [server] lines for markco (';' separates lines)
  BUILD=1            run `cargo build --release -p markco` first even if the
                     binary exists (a no-op when it is up to date); the same
                     for the floor (-p markco-floor)
  FLOOR_BIN=PATH     the floor's binary. Unset: $CARGO_TARGET_DIR/release/markco-floor,
                     built like markco's
  PORT_BASE=19400    shift every port: upstream +1, caddy +42, markco +43,
                     nginx +44, floor +45, caddy admin +19, markco admin +29,
                     nginx stub_status +39, markco plain HTTP +80
  KEEP_TMP=1         keep the temp dir (certificate, rendered configs, server
                     logs, raw client output); it is always kept after a
                     failure

Output: a Markdown report on stdout, also written to
benches/results/tls-<date>.md. Progress goes to stderr.
EOF
}

for arg in "$@"; do
	case $arg in
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "run.sh: unknown argument: $arg (settings are environment variables; see --help)" >&2
		exit 2
		;;
	esac
done

# Servers are started with setsid so each gets its own session (not hit by
# the terminal's Ctrl-C, and all its processes can be found by session id).
# setsid only avoids forking when the child is not a process-group leader,
# which holds as long as job control is off.
set +m

# Shared helpers (log, die, server start/stop, memory/CPU sampling, ...).
# shellcheck source=SCRIPTDIR/../lib.sh
. "$(dirname "$0")/../lib.sh"

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
BENCH_DIR=$(dirname -- "$SCRIPT_DIR")
REPO_DIR=$(dirname -- "$BENCH_DIR")
RESULTS_DIR=$BENCH_DIR/results

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-32}
H2_CONNECTIONS=${H2_CONNECTIONS:-32}
H2_STREAMS=${H2_STREAMS:-10}
ONLY=${ONLY:-markco caddy nginx}
TESTS=${TESTS:-full resumed h2}
TLS13_CIPHER=${TLS13_CIPHER:-TLS_AES_128_GCM_SHA256}
PORT_BASE=${PORT_BASE:-19400}
KEEP_TMP=${KEEP_TMP:-0}
BUILD=${BUILD:-0}
CLIENT_THREADS=2 # wrk -t, h2load -t, processes of the Python fallback client
WARMUP=2
READY_TIMEOUT=20 # seconds to wait for a server to answer
STOP_TIMEOUT=5   # seconds between SIGINT and SIGKILL

ALL_TARGETS=(markco floor caddy nginx)
ALL_TESTS=(full resumed h2)
ANCHOR=nginx

int_at_least "$DURATION" 1 || die "DURATION must be a positive number of seconds (got '$DURATION')"
int_at_least "$ROUNDS" 1 || die "ROUNDS must be a positive integer (got '$ROUNDS')"
int_at_least "$CONNECTIONS" "$CLIENT_THREADS" || die "CONNECTIONS must be an integer >= $CLIENT_THREADS (got '$CONNECTIONS')"
int_at_least "$H2_CONNECTIONS" "$CLIENT_THREADS" || die "H2_CONNECTIONS must be an integer >= $CLIENT_THREADS (got '$H2_CONNECTIONS')"
int_at_least "$H2_STREAMS" 1 || die "H2_STREAMS must be a positive integer (got '$H2_STREAMS')"
if ! int_at_least "$PORT_BASE" 1024 || ((10#$PORT_BASE + 80 > 65535)); then
	die "PORT_BASE must be an integer in 1024..65455 (got '$PORT_BASE')"
fi
[[ $TLS13_CIPHER =~ ^TLS_[A-Z0-9_]+$ ]] || die "TLS13_CIPHER must be one TLS 1.3 suite name such as TLS_AES_128_GCM_SHA256 (got '$TLS13_CIPHER')"
DURATION=$((10#$DURATION))
ROUNDS=$((10#$ROUNDS))
CONNECTIONS=$((10#$CONNECTIONS))
H2_CONNECTIONS=$((10#$H2_CONNECTIONS))
H2_STREAMS=$((10#$H2_STREAMS))
PORT_BASE=$((10#$PORT_BASE))

# Selected targets and tests, validated, deduplicated, in canonical order.
declare -A WANT=() WANT_TEST=()
read -r -a only_list <<<"$ONLY"
((${#only_list[@]} > 0)) || die "ONLY is empty"
for t in "${only_list[@]}"; do
	case $t in
	markco | floor | caddy | nginx) WANT[$t]=1 ;;
	*) die "unknown target in ONLY: '$t' (choose from: ${ALL_TARGETS[*]})" ;;
	esac
done
read -r -a tests_list <<<"$TESTS"
((${#tests_list[@]} > 0)) || die "TESTS is empty"
for t in "${tests_list[@]}"; do
	case $t in
	full | resumed | h2) WANT_TEST[$t]=1 ;;
	*) die "unknown test in TESTS: '$t' (choose from: ${ALL_TESTS[*]})" ;;
	esac
done
RUN_TESTS=()
for t in "${ALL_TESTS[@]}"; do [[ -z ${WANT_TEST[$t]:-} ]] || RUN_TESTS+=("$t"); done

P_UP=$((PORT_BASE + 1))
P_CADDY=$((PORT_BASE + 42))
P_MARKCO=$((PORT_BASE + 43))
P_NGINX=$((PORT_BASE + 44))
P_CADDY_ADMIN=$((PORT_BASE + 19))
P_MARKCO_ADMIN=$((PORT_BASE + 29))
P_NGINX_STATUS=$((PORT_BASE + 39))
P_MARKCO_HTTP=$((PORT_BASE + 80))
P_FLOOR=$((PORT_BASE + 45))

declare -A PORT=([markco]=$P_MARKCO [floor]=$P_FLOOR [caddy]=$P_CADDY [nginx]=$P_NGINX)
declare -A LABEL=([markco]="markco" [floor]="floor: Pingora + markco's upstream loop" [caddy]="caddy" [nginx]="nginx")
declare -A TEST_LABEL=([full]="full handshakes (new connection per request, no resumption)"
	[resumed]="wrk, new connection per request (resumes where the server allows)"
	[h2]="HTTP/2 keep-alive (h2load)")
declare -A SKIP=()  # target -> reason it is not measured
declare -A PIDS=()  # server name -> pid
declare -A IDLE=()  # target -> idle RSS (kB)
declare -A PEAK=()  # target -> peak RSS (kB)
declare -A TLSINFO=() # target -> "protocol|cipher|group|resumes|http version"
STARTED=()          # server names, in start order
CLIENT=""           # pid of the running load generator (see run_client)
EXPECTED_BODY="hello from upstream"

for tool in nginx wrk h2load openssl curl ps setsid timeout awk sed sort; do
	command -v "$tool" >/dev/null 2>&1 || die "required tool not found: $tool"
done

# ---------------------------------------------------------------------------
# Temp dir and cleanup
# ---------------------------------------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/markco-bench-tls.XXXXXX")
RAW=$TMP/raw
mkdir -p "$RAW"

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# render SRC : copies a committed config into the temp dir (same base name),
# moving the default ports (this bench's 194xx and the proxy bench upstream's
# 19001) to PORT_BASE in two passes so new ports never collide with old ones,
# replacing @TMP@ by the temp dir, and dropping `user root;` when nginx would
# only warn that it is ignored.
render() {
	local src=$1 dst
	dst=$TMP/$(basename -- "$src")
	[[ -f $src ]] || die "missing config: $src"
	sed -e 's/:19001\b/:@P_UP@/g' \
		-e 's/:19401\b/:@P_UP@/g' \
		-e 's/:19442\b/:@P_CADDY@/g' \
		-e 's/:19443\b/:@P_MARKCO@/g' \
		-e 's/:19444\b/:@P_NGINX@/g' \
		-e 's/:19419\b/:@P_CADDY_ADMIN@/g' \
		-e 's/:19429\b/:@P_MARKCO_ADMIN@/g' \
		-e 's/:19439\b/:@P_NGINX_STATUS@/g' \
		-e 's/:19480\b/:@P_MARKCO_HTTP@/g' \
		"$src" |
		sed -e "s/@P_UP@/$P_UP/g" \
			-e "s/@P_CADDY@/$P_CADDY/g" \
			-e "s/@P_MARKCO@/$P_MARKCO/g" \
			-e "s/@P_NGINX@/$P_NGINX/g" \
			-e "s/@P_CADDY_ADMIN@/$P_CADDY_ADMIN/g" \
			-e "s/@P_MARKCO_ADMIN@/$P_MARKCO_ADMIN/g" \
			-e "s/@P_NGINX_STATUS@/$P_NGINX_STATUS/g" \
			-e "s/@P_MARKCO_HTTP@/$P_MARKCO_HTTP/g" \
			-e "s|@TMP@|$TMP|g" >"$dst"
	if ((EUID != 0)); then
		sed -i -e '/^user root;$/d' "$dst"
	fi
	echo "$dst"
}

# wait_ready NAME URL LOGFILE : waits until GET URL answers 2xx with the
# upstream's body (so a proxy that answers but does not proxy fails here).
wait_ready() {
	local name=$1 url=$2 logfile=$3 pid body i
	pid=${PIDS[$name]}
	for ((i = 0; i < READY_TIMEOUT * 5; i++)); do
		if ! is_alive "$pid"; then
			log "$name exited during startup; last lines of $logfile:"
			tail -n 20 "$logfile" >&2 || true
			return 1
		fi
		if body=$(curl -skf --max-time 1 "$url" 2>/dev/null) &&
			[[ $body == "$EXPECTED_BODY" ]]; then
			return 0
		fi
		sleep 0.2
	done
	log "$name did not answer $url with '$EXPECTED_BODY' within ${READY_TIMEOUT}s; last lines of $logfile:"
	tail -n 20 "$logfile" >&2 || true
	return 1
}

# Replaces lib.sh's run_client (adds OPENSSL_CONF).
# run_client OUTFILE LIMIT CMD... : runs CMD under `timeout LIMIT` with the
# clients' OpenSSL config and waits for it. It runs in the background because
# wrk catches SIGINT and exits 0, and bash does not run an INT trap after a
# foreground child that survived the signal; `wait` is interrupted by the trap
# at once, and cleanup stops CLIENT.
run_client() {
	local outfile=$1 limit=$2 rc=0
	shift 2
	(OPENSSL_CONF=$CLIENT_CNF exec timeout "$limit" "$@" >"$outfile" 2>&1 </dev/null) &
	CLIENT=$!
	wait "$CLIENT" || rc=$?
	CLIENT=""
	return "$rc"
}

CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

# New connections the target has accepted so far ("NA" where it cannot be
# counted): markco's TLS handshake counter, nginx's stub_status accepts
# (which also counts the stub_status requests themselves).
conn_count() {
	local v=""
	case $1 in
	markco)
		v=$(curl -sf --max-time 2 "http://127.0.0.1:$P_MARKCO_ADMIN/metrics" 2>/dev/null |
			awk '/^markco_tls_handshakes_total\{/ && /result="ok"/ { s += $NF; n++ } END { if (n) printf "%d\n", s }') || v=""
		;;
	nginx)
		v=$(curl -sf --max-time 2 "http://127.0.0.1:$P_NGINX_STATUS/status" 2>/dev/null |
			awk 'NR == 3 { print $1 }') || v=""
		;;
	esac
	[[ $v =~ ^[0-9]+$ ]] && echo "$v" || echo NA
}

# parse_kv FILE : the handshake client's output -> "rps p50 p99 errors reused"
parse_kv() {
	awk '
	$1 == "rps" { rps = $2 } $1 == "p50_ms" { p50 = $2 } $1 == "p99_ms" { p99 = $2 }
	$1 == "errors" { err = $2 } $1 == "reused" { reused = $2 } $1 == "requests" { n = $2 }
	END {
		if (rps == "" || n + 0 == 0 || p50 == "") { print "NA NA NA NA NA NA"; exit }
		printf "%s %s %s %d %d %d\n", rps, p50, p99, err + 0, reused + 0, n
	}' "$1"
}

# parse_wrk FILE -> "req/s p50_ms p99_ms errors requests"
parse_wrk() {
	awk '
	function ms(v,   n, u) {
		n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
		if (u == "us") return n / 1000
		if (u == "ms") return n
		if (u == "s")  return n * 1000
		if (u == "m")  return n * 60000
		if (u == "h")  return n * 3600000
		return "NA"
	}
	/^Requests\/sec:/              { rps = $2 }
	/^[ \t]+50%[ \t]/              { p50 = ms($2) }
	/^[ \t]+99%[ \t]/              { p99 = ms($2) }
	/requests in/                  { n = $1 }
	/Non-2xx or 3xx responses:/    { non2xx = $NF }
	/Socket errors:/               { sockerr = ($4 + 0) + ($6 + 0) + ($8 + 0) + ($10 + 0) }
	END {
		if (rps == "" || p50 == "" || p99 == "") { print "NA NA NA NA NA"; exit }
		printf "%s %s %s %d %d\n", rps, p50, p99, non2xx + sockerr, n
	}' "$1"
}

# parse_h2load FILE LOGFILE -> "req/s p50_ms p99_ms errors requests"
# req/s from h2load's summary (measured period only, without the warm-up);
# percentiles from its per-request log (column 3: microseconds to the end of
# the response), which also covers only the measured period.
parse_h2load() {
	local out=$1 reqlog=$2 summary pcts
	summary=$(awk '
	/^finished in/ { rps = $4 }
	/^requests:/   { n = $2; failed = $10; errored = $12; timeout = $14 }
	/^status codes:/ { non2xx = $5 + $7 + $9 }
	END {
		if (rps == "" || n == "") { print "NA NA NA"; exit }
		printf "%s %d %d\n", rps, failed + errored + timeout + non2xx, n
	}' "$out")
	read -r rps errors n <<<"$summary"
	if [[ $rps == NA || ! -s $reqlog ]] || ((n == 0)); then
		echo "NA NA NA NA NA"
		return
	fi
	pcts=$(awk '{ print $3 }' "$reqlog" | sort -n | awk '{ a[NR] = $1 } END {
		i50 = int(0.50 * NR + 0.5); if (i50 < 1) i50 = 1
		i99 = int(0.99 * NR + 0.5); if (i99 < 1) i99 = 1
		printf "%.3f %.3f\n", a[i50] / 1000, a[i99] / 1000 }')
	echo "$rps $pcts $errors $n"
}

# ---------------------------------------------------------------------------
# markco binary
# ---------------------------------------------------------------------------

MARKCO=""
MARKCO_VERSION="not selected"
MARKCO_STALE=""
resolve_markco() {
	local target_dir bin newer
	target_dir=${CARGO_TARGET_DIR:-/var/cache/markco/target}
	bin=${MARKCO_BIN:-$target_dir/release/markco}
	if [[ -z ${MARKCO_BIN:-} && ( $BUILD == 1 || ! -x $bin ) ]]; then
		if ! command -v cargo >/dev/null 2>&1; then
			SKIP[markco]="$bin missing and cargo not found"
			return
		fi
		log "building markco: CARGO_TARGET_DIR=$target_dir cargo build --release -p markco"
		if ! (cd "$REPO_DIR" && CARGO_TARGET_DIR=$target_dir cargo build --release -p markco) >&2; then
			SKIP[markco]="cargo build --release -p markco failed (output above)"
			return
		fi
	fi
	if [[ -f $bin && -x $bin ]]; then
		MARKCO=$bin
	else
		SKIP[markco]="$bin is not an executable file"
		return
	fi
	MARKCO_VERSION=$(timeout 5 "$MARKCO" --version 2>/dev/null </dev/null | head -n 1) || MARKCO_VERSION=""
	[[ -n $MARKCO_VERSION ]] || MARKCO_VERSION="unknown ($MARKCO --version failed)"
	MARKCO_VERSION="$MARKCO_VERSION ($MARKCO, built $(date -u -r "$MARKCO" '+%Y-%m-%d %H:%M UTC'))"
	newer=$(find "$REPO_DIR" -path "$REPO_DIR/target" -prune -o -path "$REPO_DIR/benches" -prune -o \
		-type f \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -newer "$MARKCO" -print -quit 2>/dev/null) || newer=""
	if [[ -n $newer ]]; then
		MARKCO_STALE="the markco binary is older than ${newer#"$REPO_DIR"/} (and maybe other sources); rebuild or set BUILD=1"
		log "WARNING: $MARKCO_STALE"
	fi
}
[[ -z ${WANT[markco]:-} ]] || resolve_markco
# The floor (benches/floor, `own` kind, 2 threads as markco): Pingora's TLS and HTTP/2 with
# markco's upstream loop and nothing else; built like markco unless FLOOR_BIN names it.
if [[ -n ${WANT[floor]:-} ]]; then
	resolve_floor "$BUILD"
	[[ -z $FLOOR_WHY ]] || SKIP[floor]=$FLOOR_WHY
fi
if [[ -n ${WANT[caddy]:-} ]] && ! command -v caddy >/dev/null 2>&1; then
	SKIP[caddy]="caddy not found in PATH"
fi

TARGETS=()
for t in "${ALL_TARGETS[@]}"; do
	[[ -n ${WANT[$t]:-} ]] || continue
	if [[ -n ${SKIP[$t]:-} ]]; then
		log "SKIPPING $t: ${SKIP[$t]}"
		continue
	fi
	TARGETS+=("$t")
done
((${#TARGETS[@]} > 0)) || die "nothing to measure (selected: $ONLY)"

# ---------------------------------------------------------------------------
# Certificate, client TLS settings, handshake client
# ---------------------------------------------------------------------------

# One self-signed ECDSA P-256 certificate for every server.
if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	-keyout "$TMP/key.pem" -out "$TMP/cert.pem" -days 7 -subj "/CN=localhost" \
	-addext "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$TMP/openssl-req.log" 2>&1; then
	cat "$TMP/openssl-req.log" >&2
	die "openssl could not generate the certificate"
fi
chmod 600 "$TMP/key.pem"
CERT_DESC="self-signed, $(openssl x509 -in "$TMP/cert.pem" -noout -text |
	awk '/Public Key Algorithm/ { sub(/.*: /, ""); a = $0 } /NIST CURVE/ { c = $NF } /Signature Algorithm/ && !s { sub(/.*: /, ""); s = $0 }
	END { printf "%s %s, signed %s", a, c, s }'), CN=localhost, SAN localhost + 127.0.0.1"

# Every client (wrk, h2load, the handshake client, openssl s_client) reads
# this instead of the system OpenSSL config: TLS 1.3 only, one cipher suite,
# X25519 only, so every server negotiates the same parameters. The servers
# keep their own defaults.
CLIENT_CNF=$TMP/client-openssl.cnf
cat >"$CLIENT_CNF" <<EOF
openssl_conf = bench_conf
[bench_conf]
ssl_conf = bench_ssl
[bench_ssl]
system_default = bench_tls
[bench_tls]
MinProtocol = TLSv1.3
Ciphersuites = $TLS13_CIPHER
Groups = X25519
EOF

HS_CLIENT=()
HS_DESC=""
if [[ -n ${WANT_TEST[full]:-} ]]; then
	if command -v cc >/dev/null 2>&1 &&
		cc -O2 -o "$TMP/handshake_load" "$SCRIPT_DIR/handshake_load.c" -lssl -lcrypto -lpthread >"$TMP/cc.log" 2>&1; then
		HS_CLIENT=("$TMP/handshake_load")
		HS_DESC="handshake_load.c ($CONNECTIONS threads, blocking)"
	elif command -v python3 >/dev/null 2>&1; then
		log "could not compile handshake_load.c (no cc or no OpenSSL headers; see $TMP/cc.log); using handshake_load.py, which costs more client CPU"
		HS_CLIENT=(python3 "$SCRIPT_DIR/handshake_load.py")
		HS_DESC="handshake_load.py ($CLIENT_THREADS processes x $((CONNECTIONS / CLIENT_THREADS)) threads; the C client did not compile)"
	else
		die "test 'full' needs cc + OpenSSL headers or python3"
	fi
fi

# hs_argv PORT SECONDS : sets HS_ARGV to the handshake client's command line.
HS_ARGV=()
hs_argv() {
	if [[ ${HS_CLIENT[0]} == python3 ]]; then
		HS_ARGV=("${HS_CLIENT[@]}" --port "$1" --connections "$CONNECTIONS" --procs "$CLIENT_THREADS" --duration "$2" --sni localhost)
	else
		HS_ARGV=("${HS_CLIENT[@]}" "$1" "$CONNECTIONS" "$2" localhost / 127.0.0.1)
	fi
}

# ---------------------------------------------------------------------------
# Start servers
# ---------------------------------------------------------------------------

ports=("$P_UP")
for t in "${TARGETS[@]}"; do
	case $t in
	markco) ports+=("$P_MARKCO" "$P_MARKCO_ADMIN" "$P_MARKCO_HTTP") ;;
	caddy) ports+=("$P_CADDY" "$P_CADDY_ADMIN") ;;
	nginx) ports+=("$P_NGINX" "$P_NGINX_STATUS") ;;
	floor) ports+=("$P_FLOOR") ;;
	esac
done
require_free_ports "${ports[@]}"

start_nginx upstream "$BENCH_DIR/proxy/upstream-nginx.conf"
wait_ready upstream "http://127.0.0.1:$P_UP/" "$TMP/upstream/error.log" || die "upstream nginx failed to start"

declare -A NEEDS=()
for t in "${TARGETS[@]}"; do NEEDS[$t]=1; done
if [[ -n ${NEEDS[nginx]:-} ]]; then
	start_nginx nginx "$SCRIPT_DIR/tls-nginx.conf"
fi
if [[ -n ${NEEDS[caddy]:-} ]]; then
	caddyfile=$(render "$SCRIPT_DIR/Caddyfile")
	mkdir -p "$TMP/caddy/home" "$TMP/caddy/data" "$TMP/caddy/config"
	start_server caddy "$TMP/caddy.log" "$TMP/caddy" \
		env GOMAXPROCS=2 HOME="$TMP/caddy/home" \
		XDG_DATA_HOME="$TMP/caddy/data" XDG_CONFIG_HOME="$TMP/caddy/config" \
		caddy run --config "$caddyfile" --adapter caddyfile
fi
if [[ -n ${NEEDS[markco]:-} ]]; then
	markco_conf=$(render "$SCRIPT_DIR/markco.toml")
	server_extra "$markco_conf"
	mkdir -p "$TMP/markco"
	if ! "$MARKCO" check --config "$markco_conf" >"$TMP/markco.check.log" 2>&1; then
		cat "$TMP/markco.check.log" >&2
		die "markco check failed for $markco_conf"
	fi
	start_server markco "$TMP/markco.log" "$TMP/markco" "$MARKCO" run --config "$markco_conf"
fi
if [[ -n ${NEEDS[floor]:-} ]]; then
	mkdir -p "$TMP/floor"
	start_server floor "$TMP/floor.log" "$TMP/floor" "$FLOOR" own --threads 2 --listen "127.0.0.1:$P_FLOOR" \
		--upstream "127.0.0.1:$P_UP" --tls "$TMP/cert.pem" "$TMP/key.pem"
fi

for t in "${TARGETS[@]}"; do
	case $t in
	nginx) logfile=$TMP/nginx/error.log ;;
	*) logfile=$TMP/$t.log ;;
	esac
	wait_ready "$t" "https://localhost:${PORT[$t]}/" "$logfile" || die "$t failed to start"
done

# What each server negotiates with the clients' settings, whether it resumes a
# TLS 1.3 session (a second s_client offers the ticket the first one
# received), and whether curl gets HTTP/2 from it (ALPN h2).
probe_tls() {
	local t=$1 port=${PORT[$1]} out2 proto cipher group resumes h2
	local req="GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
	# shellcheck disable=SC2059 # the request is the format on purpose
	printf "$req" | OPENSSL_CONF=$CLIENT_CNF timeout 10 openssl s_client -connect "127.0.0.1:$port" \
		-servername localhost -ign_eof -sess_out "$TMP/$t.session.pem" \
		>"$RAW/$t.s_client.txt" 2>&1 || true
	out2=$RAW/$t.s_client-resume.txt
	# shellcheck disable=SC2059
	printf "$req" | OPENSSL_CONF=$CLIENT_CNF timeout 10 openssl s_client -connect "127.0.0.1:$port" \
		-servername localhost -ign_eof -sess_in "$TMP/$t.session.pem" >"$out2" 2>&1 || true
	proto=$(awk '/^ *Protocol *:/ { print $NF; exit }' "$RAW/$t.s_client.txt")
	cipher=$(awk '/^ *Cipher *:/ { print $NF; exit }' "$RAW/$t.s_client.txt")
	group=$(awk -F': ' '/^Server Temp Key:/ { sub(/,.*/, "", $2); print $2; exit }' "$RAW/$t.s_client.txt")
	if grep -q '^Reused, ' "$out2"; then
		resumes=yes
	elif grep -q '^New, ' "$out2"; then
		resumes=no
	else
		resumes="?"
	fi
	h2=$(OPENSSL_CONF=$CLIENT_CNF curl -sk --http2 --max-time 5 -o /dev/null -w '%{http_version}' "https://localhost:$port/" 2>/dev/null) || h2="?"
	TLSINFO[$t]="${proto:-?}|${cipher:-?}|${group:-?}|$resumes|${h2:-?}"
	log "$t: ${proto:-?} ${cipher:-?} ${group:-?}, resumes: $resumes, curl --http2 got HTTP/${h2:-?}"
}
for t in "${TARGETS[@]}"; do probe_tls "$t"; done

# Idle memory: after start-up (a few probe requests each), before any load.
for t in "${TARGETS[@]}"; do
	IDLE[$t]=$(mem_kb VmRSS "${PIDS[$t]}")
	PEAK[$t]=0
done

# ---------------------------------------------------------------------------
# Measure
# ---------------------------------------------------------------------------

n=${#TARGETS[@]}
log "targets: ${TARGETS[*]}; tests: ${RUN_TESTS[*]}; $ROUNDS round(s) x $n target(s) x ${#RUN_TESTS[@]} test(s) x (${WARMUP}s warm-up + ${DURATION}s) ~ $((ROUNDS * n * ${#RUN_TESTS[@]} * (WARMUP + DURATION)))s"

RESULTS=$TMP/results.tsv # round target test rps p50 p99 errors requests conns status cpu_us
: >"$RESULTS"
ORDERS=()
for ((r = 1; r <= ROUNDS; r++)); do
	order=()
	for ((i = 0; i < n; i++)); do
		order+=("${TARGETS[(i + r - 1) % n]}")
	done
	ORDERS+=("${order[*]}")
	log "round $r/$ROUNDS: ${order[*]}"
	for t in "${order[@]}"; do
		pid=${PIDS[$t]}
		port=${PORT[$t]}
		url="https://localhost:$port/"
		for test in "${RUN_TESTS[@]}"; do
			out=$RAW/round$r-$t-$test.txt
			if ! is_alive "$pid"; then
				log "  $t $test: server (pid $pid) is not running; recording the run as failed"
				printf '%s\t%s\t%s\tNA\tNA\tNA\tNA\tNA\tNA\tdown\tNA\n' "$r" "$t" "$test" >>"$RESULTS"
				continue
			fi
			status=ok
			reused=0
			case $test in
			full)
				hs_argv "$port" "$WARMUP"
				run_client "$RAW/round$r-$t-$test.warmup.txt" $((WARMUP + 30)) "${HS_ARGV[@]}" ||
					log "  $t $test: warm-up exited non-zero (see $RAW/round$r-$t-$test.warmup.txt)"
				before=$(conn_count "$t")
				ticks=$(cpu_ticks "$pid")
				hs_argv "$port" "$DURATION"
				run_client "$out" $((DURATION + 30)) "${HS_ARGV[@]}" || status=client-failed
				ticks_after=$(cpu_ticks "$pid")
				after=$(conn_count "$t")
				read -r rps p50 p99 errors reused requests < <(parse_kv "$out")
				;;
			resumed)
				run_client "$RAW/round$r-$t-$test.warmup.txt" $((WARMUP + 30)) \
					wrk -t"$CLIENT_THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -H 'Connection: close' "$url" ||
					log "  $t $test: warm-up wrk exited non-zero (see $RAW/round$r-$t-$test.warmup.txt)"
				before=$(conn_count "$t")
				ticks=$(cpu_ticks "$pid")
				run_client "$out" $((DURATION + 30)) \
					wrk -t"$CLIENT_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -H 'Connection: close' "$url" ||
					status=client-failed
				ticks_after=$(cpu_ticks "$pid")
				after=$(conn_count "$t")
				read -r rps p50 p99 errors requests < <(parse_wrk "$out")
				;;
			h2)
				h2opts=(-t"$CLIENT_THREADS" -c"$H2_CONNECTIONS" -m"$H2_STREAMS" --tls13-ciphers="$TLS13_CIPHER" --groups=X25519)
				run_client "$RAW/round$r-$t-$test.warmup.txt" $((WARMUP + 30)) h2load "${h2opts[@]}" -D "$WARMUP" "$url" ||
					log "  $t $test: warm-up h2load exited non-zero (see $RAW/round$r-$t-$test.warmup.txt)"
				reqlog=$TMP/h2load-requests.log
				rm -f "$reqlog"
				before=$(conn_count "$t")
				ticks=$(cpu_ticks "$pid")
				run_client "$out" $((DURATION + 30)) h2load "${h2opts[@]}" -D "$DURATION" \
					--log-file="$reqlog" "$url" || status=client-failed
				ticks_after=$(cpu_ticks "$pid")
				after=$(conn_count "$t")
				read -r rps p50 p99 errors requests < <(parse_h2load "$out" "$reqlog")
				rm -f "$reqlog"
				;;
			esac
			is_alive "$pid" || status=died
			hwm=$(mem_kb VmHWM "$pid")
			if ((hwm > PEAK[$t])); then PEAK[$t]=$hwm; fi
			if [[ $rps == NA && $status == ok ]]; then status=unparsed; fi
			if [[ $status == ok && ${reused:-0} != 0 && ${reused:-0} != NA ]]; then status=resumed-sessions; fi
			# New connections per completed request, from the server's counter
			# (h2: the warm-up's connections are included, spread over the run).
			conns=NA
			if [[ $before != NA && $after != NA && $requests != NA ]] && ((requests > 0)); then
				conns=$(awk -v a="$before" -v b="$after" -v n="$requests" -v t="$t" \
					'BEGIN { d = b - a; if (t == "nginx") d -= 1; printf "%.3f", d / n }')
			fi
			cpu=$(cpu_us_per_req "$ticks" "$ticks_after" "$requests")
			printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$test" "$rps" "$p50" "$p99" \
				"$errors" "$requests" "$conns" "$status" "$cpu" >>"$RESULTS"
			log "  $t $test: $(fmt '%.0f' "$rps") req/s, p50 $(fmt '%.2f' "$p50") ms, p99 $(fmt '%.2f' "$p99") ms, server CPU $cpu us/request, errors $errors, new conns/request $conns [$status]"
		done
	done
done

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

col() { # col TARGET TEST FIELD# : values of a column for a target's ok runs of a test
	awk -F'\t' -v t="$1" -v s="$2" -v c="$3" '$2 == t && $3 == s && $10 == "ok" { print $c }' "$RESULTS"
}

nginx_v=$(nginx -v 2>&1 | sed 's/^nginx version: nginx\///') || nginx_v=unknown
caddy_v=$( (command -v caddy >/dev/null && caddy version 2>/dev/null | head -n 1) || echo "not installed")
wrk_v=$( (wrk -v 2>&1 || true) | head -n 1 | sed -e 's/ Copyright.*//' -e 's/^wrk //')
h2load_v=$( (h2load --version 2>&1 || true) | head -n 1 | sed 's/^h2load //')
openssl_v=$(openssl version 2>/dev/null | awk '{ print $2 }')
caddy_go=$( (command -v caddy >/dev/null && caddy build-info 2>/dev/null | awk '$1 == "go" { print $2; exit }') || true)
rustls_v=$(awk '/^name = "rustls"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$REPO_DIR/Cargo.lock" 2>/dev/null || true)
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
stamp=$(date -u '+%Y-%m-%d %H:%M:%S UTC')

REPORT=$TMP/report.md
{
	echo "# TLS benchmark ($stamp)"
	echo
	echo "- Machine: $(nproc) CPUs (nproc), Linux $(uname -r) $(uname -m)${cpu_model:+, $cpu_model}; the clients, the TLS proxy and the upstream all share these CPUs"
	echo "- Versions: nginx $nginx_v; caddy $caddy_v${caddy_go:+ ($caddy_go crypto/tls)}; wrk $wrk_v; h2load $h2load_v; OpenSSL $openssl_v (the system library: nginx and every client); markco: $MARKCO_VERSION${rustls_v:+, rustls $rustls_v per Cargo.lock}"
	if [[ -n $MARKCO_STALE ]]; then echo "- **Warning:** $MARKCO_STALE"; fi
	echo "- Certificate (all servers): $CERT_DESC"
	echo "- Clients offer TLS 1.3 only, cipher $TLS13_CIPHER, group X25519 (OPENSSL_CONF), SNI localhost, no certificate verification"
	echo "- Upstream: nginx, 1 worker, 127.0.0.1:$P_UP, \`return 200 \"hello from upstream\\n\"\`; targets: markco :$P_MARKCO (threads = 2), caddy :$P_CADDY (GOMAXPROCS=2, HTTP/3 off), nginx :$P_NGINX (2 workers, upstream keepalive 128)"
	echo "- Rounds: $ROUNDS, interleaved; the target order is rotated left by one each round (round 1: ${ORDERS[0]}); within a target the tests run in the order ${RUN_TESTS[*]}"
	if [[ -n ${WANT_TEST[full]:-} ]]; then
		echo "- full: $HS_DESC, $CONNECTIONS concurrent connections for ${DURATION} s after a ${WARMUP} s warm-up: each request = new TCP connection + full TLS 1.3 handshake + GET with \`Connection: close\` + read to EOF; no session is ever offered, and every run checks that no connection was resumed"
	fi
	if [[ -n ${WANT_TEST[resumed]:-} ]]; then
		echo "- resumed: \`wrk -t$CLIENT_THREADS -c$CONNECTIONS -d${DURATION}s --latency -H 'Connection: close' https://localhost:PORT/\` after a ${WARMUP} s warm-up. wrk reconnects after every response and offers the session ticket of its previous connection, so this measures resumed (PSK + X25519) handshakes wherever the server resumes (column *resumes* below), full ones elsewhere"
	fi
	if [[ -n ${WANT_TEST[h2]:-} ]]; then
		echo "- h2: \`h2load -t$CLIENT_THREADS -c$H2_CONNECTIONS -m$H2_STREAMS -D $DURATION\` after a ${WARMUP} s warm-up (the same with \`-D $WARMUP\`); req/s from h2load's summary, p50/p99 from its per-request log (\`--log-file\`: time to the end of each response)"
	fi
	echo "- RSS: idle = sum of VmRSS over the server's processes after start-up, before any load; peak = sum of VmHWM over the same processes read after each run, max over all runs. Shared pages are counted once per process."
	for t in "${ALL_TARGETS[@]}"; do
		if [[ -n ${WANT[$t]:-} && -n ${SKIP[$t]:-} ]]; then echo "- Skipped: $t — ${SKIP[$t]}"; fi
	done
	echo
	echo "## Negotiated TLS (openssl s_client with the clients' settings)"
	echo
	echo "| target | protocol | cipher | key exchange | resumes a TLS 1.3 session | curl --http2 gets | RSS idle MB | RSS peak MB |"
	echo "|---|---|---|---|---|---|---:|---:|"
	for t in "${TARGETS[@]}"; do
		IFS='|' read -r proto cipher group resumes h2 <<<"${TLSINFO[$t]}"
		printf '| %s | %s | %s | %s | %s | HTTP/%s | %s | %s |\n' "${LABEL[$t]}" "$proto" "$cipher" "$group" \
			"$resumes" "$h2" "$(mb "${IDLE[$t]}")" "$(mb "${PEAK[$t]}")"
	done
	for test in "${RUN_TESTS[@]}"; do
		declare -A MED=()
		for t in "${TARGETS[@]}"; do MED[$t]=$(col "$t" "$test" 4 | median); done
		anchor_rps=${MED[$ANCHOR]:-NA}
		echo
		echo "## $test: ${TEST_LABEL[$test]} (medians over $ROUNDS round(s))"
		echo
		echo "| target | req/s | p50 ms | p99 ms | req/s vs nginx | server CPU µs/req | CPU vs nginx | new conns per request | errors |"
		echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
		for t in "${TARGETS[@]}"; do
			rps=${MED[$t]}
			p50=$(col "$t" "$test" 5 | median)
			p99=$(col "$t" "$test" 6 | median)
			conns=$(col "$t" "$test" 9 | grep -v '^NA$' | median || true)
			cpu=$(col "$t" "$test" 11 | grep -v '^NA$' | median || true)
			anchor_cpu=$(col "$ANCHOR" "$test" 11 | grep -v '^NA$' | median || true)
			if [[ $cpu == NA || $anchor_cpu == NA ]]; then
				cpu_ratio=n/a
			else
				cpu_ratio=$(awk -v a="$cpu" -v b="$anchor_cpu" 'BEGIN { printf "%.2f", a / b }')
			fi
			if [[ $rps == NA || $anchor_rps == NA ]]; then
				ratio=n/a
			else
				ratio=$(awk -v a="$rps" -v b="$anchor_rps" 'BEGIN { printf "%.2f", a / b }')
			fi
			[[ $conns == NA ]] && conns="n/a" || conns=$(fmt '%.3f' "$conns")
			errors=$(awk -F'\t' -v t="$t" -v s="$test" '$2 == t && $3 == s { e += ($7 == "NA" ? 0 : $7); if ($10 != "ok") f++ }
				END { s = e + 0; if (f) s = s " (" f " failed run" (f > 1 ? "s" : "") ")"; print s }' "$RESULTS")
			printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${LABEL[$t]}" \
				"$(fmt '%.0f' "$rps")" "$(fmt '%.2f' "$p50")" "$(fmt '%.2f' "$p99")" "$ratio" \
				"$(fmt '%.0f' "$cpu")" "$cpu_ratio" "$conns" "$errors"
		done
		unset MED
	done
	echo
	echo "*server CPU µs/req*: user + system CPU time of the target's processes (all threads; nginx: master + workers; not the upstream) during the run, from /proc/<pid>/stat, divided by the completed requests — what the server spends per request whatever the client can drive. *CPU vs nginx* is its ratio to nginx's; lower is cheaper."
	echo
	echo "*new conns per request*: (server's count after − before) / completed requests; markco: \`markco_tls_handshakes_total{result=\"ok\"}\` from its admin API, nginx: stub_status \`accepts\`, caddy and the floor: no counter (n/a). About 1.0 for full and resumed (a little more: connections cut at the end are not counted as requests); near 0 for h2 ($H2_CONNECTIONS connections for the whole run). errors = non-2xx responses + failed connections/handshakes/reads (timeouts included), summed over rounds; failed runs are left out of the medians."
	echo
	echo "## Raw per-round results"
	echo
	echo "| round | target | test | req/s | p50 ms | p99 ms | server CPU µs/req | errors | requests | new conns/req | status |"
	echo "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
	while IFS=$'\t' read -r r t test rps p50 p99 errors requests conns status cpu; do
		printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$r" "${LABEL[$t]}" "$test" \
			"$(fmt '%.0f' "$rps")" "$(fmt '%.2f' "$p50")" "$(fmt '%.2f' "$p99")" "$cpu" "$errors" "$requests" "$conns" "$status"
	done <"$RESULTS"
} >"$REPORT"

mkdir -p "$RESULTS_DIR"
result_file=$RESULTS_DIR/tls-$(date -u +%Y-%m-%d-%H%M%S).md
cp "$REPORT" "$result_file"
cat "$REPORT"
log "report written to $result_file"
