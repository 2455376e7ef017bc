#!/usr/bin/env bash
# Per-user route benchmark: what markco's /u/<id>/ route (session check on a
# warm cache, owner check, per-user upstream lookup) costs next to a plain
# proxy route, both to the same single-worker nginx upstream on 127.0.0.1.
# See benches/README.md for what it measures and how to read the output.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: benches/user_route/run.sh [--help]

markco alone (127.0.0.1:19504), two routes to the same upstream nginx
(1 worker, `return 200`, 127.0.0.1:19501), driven by wrk:
  plain   GET /plain       route "plain": match ["/*"], proxy = upstream
  user    GET /u/<id>/     route "user": match ["/u/*"], workspace = true;
                           the session token (Authorization: Bearer) is looked
                           up in the session cache, must belong to <id>, and
                           <id>'s workspace (registered with
                           PUT /api/admin/workspaces/<id>) names the upstream
Both runs send the same Authorization header. The user and its session are
created with `markco user add --json` in a SQLite database in the temp dir;
the session cache TTL is SESSION_CACHE_TTL, so after the warm-up every
measured request is a cache hit.

For each route and round: 2 s warm-up, then
  wrk -t2 -c$CONNECTIONS -d${DURATION}s --latency -H 'Authorization: Bearer <token>' URL
Rounds are interleaved and the route order alternates each round.

Environment:
  DURATION=10        seconds per measured wrk run
  ROUNDS=3           interleaved rounds; the summary reports medians
  CONNECTIONS=64     wrk connections (wrk threads are fixed at 2)
  ONLY="plain user"  space-separated subset of routes to measure
  SESSION_CACHE_TTL=1h
                     [sessions] cache_ttl for markco; "30s" is markco's
                     default and adds a database lookup every 30 s
  MARKCO_BIN=PATH    markco binary. Unset: $CARGO_TARGET_DIR/release/markco
                     (CARGO_TARGET_DIR defaults to /var/cache/markco/target),
                     built with `cargo build --release -p markco` only if it
                     is missing (or BUILD=1). The report warns when the binary
                     is older than the sources.
  BUILD=1            run `cargo build --release -p markco` first even if the
                     binary exists (a no-op when it is up to date)
  PORT_BASE=19500    shift every port: upstream +1, markco +4, markco admin +29
  KEEP_TMP=1         keep the temp dir (rendered configs, database, server
                     logs, raw wrk output); it is always kept after a failure

Output: a Markdown report on stdout, also written to
benches/results/user_route-<date>.md. Progress goes to stderr.
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
CONNECTIONS=${CONNECTIONS:-64}
ONLY=${ONLY:-plain user}
SESSION_CACHE_TTL=${SESSION_CACHE_TTL:-1h}
PORT_BASE=${PORT_BASE:-19500}
KEEP_TMP=${KEEP_TMP:-0}
BUILD=${BUILD:-0}
WRK_THREADS=2
WARMUP=2
READY_TIMEOUT=20 # seconds to wait for a server to answer
STOP_TIMEOUT=5   # seconds between SIGINT and SIGKILL

ALL_TARGETS=(plain user)

int_at_least "$DURATION" 1 || die "DURATION must be a positive number of seconds (got '$DURATION')"
int_at_least "$ROUNDS" 1 || die "ROUNDS must be a positive integer (got '$ROUNDS')"
int_at_least "$CONNECTIONS" "$WRK_THREADS" || die "CONNECTIONS must be an integer >= $WRK_THREADS (got '$CONNECTIONS')"
if ! int_at_least "$PORT_BASE" 1024 || ((10#$PORT_BASE + 29 > 65535)); then
	die "PORT_BASE must be an integer in 1024..65506 (got '$PORT_BASE')"
fi
[[ $SESSION_CACHE_TTL =~ ^[0-9]+(ms|s|m|h|d)$ ]] || die "SESSION_CACHE_TTL must look like 30s, 5m or 1h (got '$SESSION_CACHE_TTL')"
DURATION=$((10#$DURATION))
ROUNDS=$((10#$ROUNDS))
CONNECTIONS=$((10#$CONNECTIONS))
PORT_BASE=$((10#$PORT_BASE))

# Selected routes, validated, deduplicated, in canonical order.
declare -A WANT=()
read -r -a only_list <<<"$ONLY"
((${#only_list[@]} > 0)) || die "ONLY is empty"
for t in "${only_list[@]}"; do
	case $t in
	plain | user) WANT[$t]=1 ;;
	*) die "unknown route in ONLY: '$t' (choose from: ${ALL_TARGETS[*]})" ;;
	esac
done
TARGETS=()
for t in "${ALL_TARGETS[@]}"; do [[ -z ${WANT[$t]:-} ]] || TARGETS+=("$t"); done

P_UP=$((PORT_BASE + 1))
P_MARKCO=$((PORT_BASE + 4))
P_MARKCO_ADMIN=$((PORT_BASE + 29))

declare -A PATH_OF=([plain]="/plain") # user: /u/<id>/, set once the user exists
declare -A PIDS=()                    # server name -> pid
STARTED=()                            # server names, in start order
CLIENT=""                             # pid of the running load generator (see run_client)
EXPECTED_BODY="hello from upstream"

for tool in nginx wrk curl ps setsid timeout awk sed sort; do
	command -v "$tool" >/dev/null 2>&1 || die "required tool not found: $tool"
done

# ---------------------------------------------------------------------------
# Temp dir and cleanup
# ---------------------------------------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/markco-bench-user.XXXXXX")
RAW=$TMP/wrk
mkdir -p "$RAW"

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# render SRC : copies a committed config into the temp dir (same base name),
# moving the default ports (this bench's 195xx and the proxy bench upstream's
# 19001) to PORT_BASE in two passes so new ports never collide with old ones,
# filling in @CACHE_TTL@, and dropping `user root;` when nginx would only
# warn that it is ignored.
render() {
	local src=$1 dst
	dst=$TMP/$(basename -- "$src")
	[[ -f $src ]] || die "missing config: $src"
	sed -e 's/127\.0\.0\.1:19001\b/127.0.0.1:@P_UP@/g' \
		-e 's/127\.0\.0\.1:19501\b/127.0.0.1:@P_UP@/g' \
		-e 's/127\.0\.0\.1:19504\b/127.0.0.1:@P_MARKCO@/g' \
		-e 's/127\.0\.0\.1:19529\b/127.0.0.1:@P_MARKCO_ADMIN@/g' \
		"$src" |
		sed -e "s/@P_UP@/$P_UP/g" \
			-e "s/@P_MARKCO@/$P_MARKCO/g" \
			-e "s/@P_MARKCO_ADMIN@/$P_MARKCO_ADMIN/g" \
			-e "s/@CACHE_TTL@/$SESSION_CACHE_TTL/g" >"$dst"
	if ((EUID != 0)); then
		sed -i -e '/^user root;$/d' "$dst"
	fi
	echo "$dst"
}

# wait_up NAME URL LOGFILE : waits until URL answers (any status).
wait_up() {
	local name=$1 url=$2 logfile=$3 pid i
	pid=${PIDS[$name]}
	for ((i = 0; i < READY_TIMEOUT * 5; i++)); do
		if ! is_alive "$pid"; then
			log "$name exited during startup; last lines of $logfile:"
			tail -n 20 "$logfile" >&2 || true
			return 1
		fi
		if curl -s -o /dev/null --max-time 1 "$url" 2>/dev/null; then
			return 0
		fi
		sleep 0.2
	done
	log "$name did not answer $url within ${READY_TIMEOUT}s; last lines of $logfile:"
	tail -n 20 "$logfile" >&2 || true
	return 1
}

# expect NAME WANT_STATUS WANT_BODY CURL_ARGS... : one request; dies unless
# it gets WANT_STATUS (and WANT_BODY, when not empty).
expect() {
	local name=$1 want_status=$2 want_body=$3 out status body
	shift 3
	out=$(curl -s --max-time 5 -w '\n%{http_code}' "$@" 2>&1) || die "check '$name': curl failed: $out"
	status=${out##*$'\n'}
	body=$(printf '%s' "${out%$'\n'*}") # without the trailing newline(s)
	local with=""
	[[ -z $want_body ]] || with=" with body \"$want_body\""
	if [[ $status != "$want_status" || (-n $want_body && $body != "$want_body") ]]; then
		die "check '$name': expected $want_status$with, got $status with body \"${body:0:200}\""
	fi
	log "check '$name': $status$with"
}

CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

# routed_2xx ROUTE : markco's count of 2xx answers on a route so far ("NA"
# when the admin API does not answer).
routed_2xx() {
	local v
	v=$(curl -sf --max-time 2 "http://127.0.0.1:$P_MARKCO_ADMIN/metrics" 2>/dev/null |
		awk -v r="route=\"$1\"" '/^markco_http_requests_total\{/ && index($0, r) && /status_class="2xx"/ { s += $NF; n++ }
			END { if (n) printf "%d\n", s; else print 0 }') || v=""
	[[ $v =~ ^[0-9]+$ ]] && echo "$v" || echo NA
}

# parse_wrk FILE -> "req/s p50_ms p99_ms non2xx socket_errors requests"
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
		if (rps == "" || p50 == "" || p99 == "") { print "NA NA NA NA NA NA"; exit }
		printf "%s %s %s %d %d %d\n", rps, p50, p99, non2xx + 0, sockerr + 0, n
	}' "$1"
}

ratio() { # ratio A B -> A/B with 2 decimals, "n/a" if either is NA
	if [[ $1 == NA || $2 == NA ]]; then echo n/a; else awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; fi
}

# ---------------------------------------------------------------------------
# markco binary
# ---------------------------------------------------------------------------

MARKCO=""
MARKCO_VERSION=""
MARKCO_STALE=""
target_dir=${CARGO_TARGET_DIR:-/var/cache/markco/target}
bin=${MARKCO_BIN:-$target_dir/release/markco}
if [[ -z ${MARKCO_BIN:-} && ($BUILD == 1 || ! -x $bin) ]]; then
	command -v cargo >/dev/null 2>&1 || die "$bin is missing and cargo was not found; set MARKCO_BIN"
	log "building markco: CARGO_TARGET_DIR=$target_dir cargo build --release -p markco"
	(cd "$REPO_DIR" && CARGO_TARGET_DIR=$target_dir cargo build --release -p markco) >&2 ||
		die "cargo build --release -p markco failed (output above)"
fi
[[ -f $bin && -x $bin ]] || die "markco binary $bin is not an executable file; set MARKCO_BIN"
MARKCO=$bin
MARKCO_VERSION=$(timeout 5 "$MARKCO" --version 2>/dev/null </dev/null | head -n 1) || MARKCO_VERSION=""
[[ -n $MARKCO_VERSION ]] || MARKCO_VERSION="unknown ($MARKCO --version failed)"
MARKCO_VERSION="$MARKCO_VERSION ($MARKCO, built $(date -u -r "$MARKCO" '+%Y-%m-%d %H:%M UTC'))"
newer=$(find "$REPO_DIR" -path "$REPO_DIR/target" -prune -o -path "$REPO_DIR/benches" -prune -o \
	-type f \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -newer "$MARKCO" -print -quit 2>/dev/null) || newer=""
if [[ -n $newer ]]; then
	MARKCO_STALE="the markco binary is older than ${newer#"$REPO_DIR"/} (and maybe other sources); rebuild or set BUILD=1"
	log "WARNING: $MARKCO_STALE"
fi

# ---------------------------------------------------------------------------
# Start servers, create the user and its workspace
# ---------------------------------------------------------------------------

require_free_ports "$P_UP" "$P_MARKCO" "$P_MARKCO_ADMIN"

up_conf=$(render "$BENCH_DIR/proxy/upstream-nginx.conf")
mkdir -p "$TMP/upstream"
if ! nginx -q -t -p "$TMP/upstream/" -c "$up_conf" -e "$TMP/upstream/error.log" 2>"$TMP/upstream.configtest.log"; then
	cat "$TMP/upstream.configtest.log" >&2
	die "upstream: nginx -t failed for $up_conf"
fi
start_server upstream "$TMP/upstream.log" "$TMP/upstream" nginx -p "$TMP/upstream/" -c "$up_conf" -e "$TMP/upstream/error.log"
wait_up upstream "http://127.0.0.1:$P_UP/" "$TMP/upstream/error.log" || die "upstream nginx failed to start"
expect "upstream answers" 200 "$EXPECTED_BODY" "http://127.0.0.1:$P_UP/"

markco_conf=$(render "$SCRIPT_DIR/markco.toml")
mkdir -p "$TMP/markco"
if ! "$MARKCO" check --config "$markco_conf" >"$TMP/markco.check.log" 2>&1; then
	cat "$TMP/markco.check.log" >&2
	die "markco check failed for $markco_conf"
fi
# The user and a session (valid 30 days), straight into the SQLite database
# (this also runs the migrations).
if ! user_json=$(timeout 60 "$MARKCO" user add bench@example.com --json --config "$markco_conf" 2>"$TMP/user-add.log"); then
	cat "$TMP/user-add.log" >&2
	die "markco user add failed"
fi
USER_ID=$(sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' <<<"$user_json")
TOKEN=$(sed -n 's/.*"token": *"\([^"]*\)".*/\1/p' <<<"$user_json")
[[ -n $USER_ID && -n $TOKEN ]] || die "could not read id and token from markco user add: $user_json"
[[ $USER_ID =~ ^[A-Za-z0-9_-]+$ ]] || die "unexpected user id from markco user add: $USER_ID"
PATH_OF[user]="/u/$USER_ID/"
log "user $USER_ID created"

start_server markco "$TMP/markco.log" "$TMP/markco" "$MARKCO" run --config "$markco_conf"
wait_up markco "http://127.0.0.1:$P_MARKCO_ADMIN/health" "$TMP/markco.log" || die "markco failed to start"
wait_up markco "http://127.0.0.1:$P_MARKCO/plain" "$TMP/markco.log" || die "markco failed to start"

# Register the workspace: editor and runtime are both the upstream nginx.
expect "register workspace" 200 "" -X PUT -H 'Content-Type: application/json' \
	--data "{\"editor\":\"127.0.0.1:$P_UP\",\"runtime\":\"127.0.0.1:$P_UP\"}" \
	"http://127.0.0.1:$P_MARKCO_ADMIN/api/admin/workspaces/$USER_ID"

# Both routes must reach the upstream; the user route must really check the
# session (so it is not the plain route in disguise).
AUTH="Authorization: Bearer $TOKEN"
expect "plain route" 200 "$EXPECTED_BODY" -H "$AUTH" "http://127.0.0.1:$P_MARKCO/plain"
# (Accept: JSON, or markco answers a browser-like request with 302 /login.)
expect "user route, no token" 401 "" -H 'Accept: application/json' "http://127.0.0.1:$P_MARKCO${PATH_OF[user]}"
expect "user route, other user's path" 403 "" -H "$AUTH" "http://127.0.0.1:$P_MARKCO/u/someone-else/"
expect "user route" 200 "$EXPECTED_BODY" -H "$AUTH" "http://127.0.0.1:$P_MARKCO${PATH_OF[user]}"

IDLE=$(mem_kb VmRSS "${PIDS[markco]}")
PEAK=0

# ---------------------------------------------------------------------------
# Measure
# ---------------------------------------------------------------------------

n=${#TARGETS[@]}
log "routes: ${TARGETS[*]}; $ROUNDS round(s) x $n route(s) x (${WARMUP}s warm-up + ${DURATION}s) ~ $((ROUNDS * n * (WARMUP + DURATION)))s"

RESULTS=$TMP/results.tsv # round route rps p50 p99 non2xx sockerr requests routed status cpu_us
: >"$RESULTS"
ORDERS=()
pid=${PIDS[markco]}
for ((r = 1; r <= ROUNDS; r++)); do
	order=()
	for ((i = 0; i < n; i++)); do
		order+=("${TARGETS[(i + r - 1) % n]}")
	done
	ORDERS+=("${order[*]}")
	log "round $r/$ROUNDS: ${order[*]}"
	for t in "${order[@]}"; do
		url="http://127.0.0.1:$P_MARKCO${PATH_OF[$t]}"
		out=$RAW/round$r-$t.txt
		if ! is_alive "$pid"; then
			log "  $t: markco (pid $pid) is not running; recording the run as failed"
			printf '%s\t%s\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tdown\tNA\n' "$r" "$t" >>"$RESULTS"
			continue
		fi
		run_client "$RAW/round$r-$t.warmup.txt" $((WARMUP + 30)) \
			wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -H "$AUTH" "$url" ||
			log "  $t: warm-up wrk exited non-zero (see $RAW/round$r-$t.warmup.txt)"
		status=ok
		before=$(routed_2xx "$t")
		ticks=$(cpu_ticks "$pid")
		run_client "$out" $((DURATION + 30)) \
			wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "$AUTH" "$url" || status=wrk-failed
		ticks_after=$(cpu_ticks "$pid")
		after=$(routed_2xx "$t")
		is_alive "$pid" || status=died
		hwm=$(mem_kb VmHWM "$pid")
		if ((hwm > PEAK)); then PEAK=$hwm; fi
		read -r rps p50 p99 non2xx sockerr requests < <(parse_wrk "$out")
		if [[ $rps == NA && $status == ok ]]; then status=unparsed; fi
		# 2xx answers markco counted on this route per request wrk completed:
		# about 1 (a little more: requests cut at the end are not in wrk's count).
		routed=NA
		if [[ $before != NA && $after != NA && $requests != NA ]] && ((requests > 0)); then
			routed=$(awk -v a="$before" -v b="$after" -v n="$requests" 'BEGIN { printf "%.3f", (b - a) / n }')
		fi
		cpu=$(cpu_us_per_req "$ticks" "$ticks_after" "$requests")
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$rps" "$p50" "$p99" "$non2xx" "$sockerr" \
			"$requests" "$routed" "$status" "$cpu" >>"$RESULTS"
		log "  $t: $(fmt '%.0f' "$rps") req/s, p50 $(fmt '%.2f' "$p50") ms, p99 $(fmt '%.2f' "$p99") ms, markco CPU $cpu us/request, non-2xx $non2xx, socket errors $sockerr, routed 2xx/request $routed [$status]"
	done
done

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

col() { # col ROUTE FIELD# : values of a column for a route's ok runs
	awk -F'\t' -v t="$1" -v c="$2" '$2 == t && $10 == "ok" { print $c }' "$RESULTS"
}

declare -A MED_RPS=() MED_P50=() MED_P99=() MED_CPU=()
for t in "${TARGETS[@]}"; do
	MED_RPS[$t]=$(col "$t" 3 | median)
	MED_CPU[$t]=$(col "$t" 11 | grep -v '^NA$' | median || true)
	MED_P50[$t]=$(col "$t" 4 | median)
	MED_P99[$t]=$(col "$t" 5 | median)
done

nginx_v=$(nginx -v 2>&1 | sed 's/^nginx version: nginx\///') || nginx_v=unknown
wrk_v=$( (wrk -v 2>&1 || true) | head -n 1 | sed -e 's/ Copyright.*//' -e 's/^wrk //')
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
stamp=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
declare -A LABEL=([plain]="plain \`/plain\`" [user]="user \`/u/<id>/\`")

REPORT=$TMP/report.md
{
	echo "# Per-user route benchmark ($stamp)"
	echo
	echo "- Machine: $(nproc) CPUs (nproc), Linux $(uname -r) $(uname -m)${cpu_model:+, $cpu_model}; wrk, markco and the upstream all share these CPUs"
	echo "- Versions: nginx $nginx_v; wrk $wrk_v; markco: $MARKCO_VERSION"
	if [[ -n $MARKCO_STALE ]]; then echo "- **Warning:** $MARKCO_STALE"; fi
	echo "- markco: 127.0.0.1:$P_MARKCO, threads = 2, no access log, SQLite database in the temp dir, session cache TTL $SESSION_CACHE_TTL; routes \`user\` (match [\"/u/*\"], workspace = true) and \`plain\` (match [\"/*\"], proxy)"
	echo "- Upstream (both routes; the workspace's editor and runtime): nginx, 1 worker, 127.0.0.1:$P_UP, \`return 200 \"hello from upstream\\n\"\`"
	echo "- Load: \`wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s --latency -H 'Authorization: Bearer <token>' http://127.0.0.1:$P_MARKCO/PATH\` (the same header on both routes), each run preceded by a ${WARMUP} s warm-up with the same command"
	echo "- Rounds: $ROUNDS, interleaved; the route order alternates each round (round 1: ${ORDERS[0]})"
	echo "- Checks before measuring: both routes answer 200 with the upstream's body; the user route answers 401 without a token and 403 on another user's path"
	echo "- markco RSS: idle $(mb "$IDLE") MB (VmRSS after start-up, before load), peak $(mb "$PEAK") MB (VmHWM, max over runs)"
	echo
	echo "## Summary (medians over $ROUNDS round(s))"
	echo
	echo "| route | req/s | p50 ms | p99 ms | req/s vs plain | p50 vs plain | p99 vs plain | markco CPU µs/req | CPU vs plain | routed 2xx per request | errors |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	for t in "${TARGETS[@]}"; do
		routed=$(col "$t" 9 | grep -v '^NA$' | median || true)
		errors=$(awk -F'\t' -v t="$t" '$2 == t { e += ($6 == "NA" ? 0 : $6) + ($7 == "NA" ? 0 : $7); if ($10 != "ok") f++ }
			END { s = e + 0; if (f) s = s " (" f " failed run" (f > 1 ? "s" : "") ")"; print s }' "$RESULTS")
		printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${LABEL[$t]}" \
			"$(fmt '%.0f' "${MED_RPS[$t]}")" "$(fmt '%.2f' "${MED_P50[$t]}")" "$(fmt '%.2f' "${MED_P99[$t]}")" \
			"$(ratio "${MED_RPS[$t]}" "${MED_RPS[plain]:-NA}")" "$(ratio "${MED_P50[$t]}" "${MED_P50[plain]:-NA}")" \
			"$(ratio "${MED_P99[$t]}" "${MED_P99[plain]:-NA}")" "$(fmt '%.0f' "${MED_CPU[$t]}")" \
			"$(ratio "${MED_CPU[$t]}" "${MED_CPU[plain]:-NA}")" "$(fmt '%.3f' "$routed")" "$errors"
	done
	echo
	echo "*markco CPU µs/req*: user + system CPU time of the markco process (all threads) during the run, from /proc/<pid>/stat, divided by the requests wrk completed. Unlike req/s it does not depend on how much CPU wrk and the upstream leave to markco, so it is the most direct measure of the route's cost."
	echo
	echo "*routed 2xx per request*: the increase of markco's \`markco_http_requests_total{route=…,status_class=\"2xx\"}\` during the run divided by the requests wrk completed; about 1.0 shows the requests took the intended route and succeeded. errors = non-2xx/3xx responses + socket errors summed over rounds; failed runs are left out of the medians."
	echo
	echo "## Raw per-round results"
	echo
	echo "| round | route | req/s | p50 ms | p99 ms | markco CPU µs/req | non-2xx | socket errors | requests | routed 2xx/req | status |"
	echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
	while IFS=$'\t' read -r r t rps p50 p99 non2xx sockerr requests routed status cpu; do
		printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$r" "$t" \
			"$(fmt '%.0f' "$rps")" "$(fmt '%.2f' "$p50")" "$(fmt '%.2f' "$p99")" "$cpu" "$non2xx" "$sockerr" "$requests" "$routed" "$status"
	done <"$RESULTS"
} >"$REPORT"

mkdir -p "$RESULTS_DIR"
result_file=$RESULTS_DIR/user_route-$(date -u +%Y-%m-%d-%H%M%S).md
cp "$REPORT" "$result_file"
cat "$REPORT"
log "report written to $result_file"
