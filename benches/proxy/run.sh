#!/usr/bin/env bash
# Reverse-proxy load benchmark: markco vs Caddy vs nginx, each proxying to the
# same single-worker nginx upstream, everything on 127.0.0.1. See
# benches/README.md for what it measures and how to read the output.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: benches/proxy/run.sh [--help]

HTTP/1.1 reverse-proxy load benchmark on 127.0.0.1, driven by wrk:
  direct   wrk -> upstream nginx (127.0.0.1:19001)              baseline
  markco   wrk -> markco (127.0.0.1:19004) -> upstream
  markco1  the same with one worker thread (127.0.0.1:19005)
  floor-tokio, floor-app, floor-pingora, floor-own, floor-session
           not run by default: proxies that only proxy, one thread each
           (127.0.0.1:19006, 19009, 19007, 19008, 19010; benches/floor, see benches/README.md,
           "Floors"), to tell markco's own cost from its foundations'
  caddy    wrk -> Caddy  (127.0.0.1:19002) -> upstream
  nginx    wrk -> nginx  (127.0.0.1:19003) -> upstream

Every server is started here as a child process (configs in benches/proxy/,
rendered into a temp dir) and stopped on exit, Ctrl-C or failure.
For each target and round: 2 s warm-up, then
  wrk -t2 -c$CONNECTIONS -d${DURATION}s --latency http://127.0.0.1:PORT/
Rounds are interleaved and the target order rotates by one each round.

Environment:
  DURATION=10        seconds per measured wrk run
  ROUNDS=3           interleaved rounds; the summary reports medians
  CONNECTIONS=64     wrk connections (wrk threads are fixed at 2)
  ONLY="direct markco markco1 caddy nginx"
                     space-separated subset of targets to measure (add
                     floor-tokio floor-app floor-pingora floor-own floor-session
                     for the floors)
  MARKCO_BIN=PATH    markco binary to run. Unset: build it with
                     `cargo build --release -p markco` using
                     CARGO_TARGET_DIR (default /var/cache/markco/target) and
                     run $CARGO_TARGET_DIR/release/markco. A target whose
                     binary is missing (or fails to build) is skipped.
                     The floors are built the same way (-p markco-floor)
                     unless FLOOR_BIN names their binary.
  PORT_BASE=19000    shift every port: upstream +1, caddy +2, nginx +3,
                     markco +4, markco1 +5, floor-tokio +6, floor-pingora +7,
                     floor-own +8, floor-app +9, floor-session +10, caddy admin +19,
                     markco admin +29, markco1 admin +39
  MARKCO_SERVER_EXTRA="work_stealing = false"
                     extra [server] lines for both markco targets (';'
                     separates several)
  KEEP_TMP=1         keep the temp dir (rendered configs, server logs, raw
                     wrk output); it is always kept after a failure

Output: a Markdown report (summary + raw per-round table) on stdout, also
written to benches/results/proxy-<date>.md. Progress goes to stderr.
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
ONLY=${ONLY:-direct markco markco1 caddy nginx}
PORT_BASE=${PORT_BASE:-19000}
KEEP_TMP=${KEEP_TMP:-0}
WRK_THREADS=2
WARMUP=2
READY_TIMEOUT=20 # seconds to wait for a server to answer
STOP_TIMEOUT=5   # seconds between SIGINT and SIGKILL

FLOORS=(floor-tokio floor-app floor-pingora floor-own floor-session)
ALL_TARGETS=(direct markco markco1 "${FLOORS[@]}" caddy nginx)
CLK_TCK=$(getconf CLK_TCK)

int_at_least "$DURATION" 1 || die "DURATION must be a positive number of seconds (got '$DURATION')"
int_at_least "$ROUNDS" 1 || die "ROUNDS must be a positive integer (got '$ROUNDS')"
int_at_least "$CONNECTIONS" "$WRK_THREADS" || die "CONNECTIONS must be an integer >= $WRK_THREADS (got '$CONNECTIONS')"
if ! int_at_least "$PORT_BASE" 1024 || ((10#$PORT_BASE + 39 > 65535)); then
	die "PORT_BASE must be an integer in 1024..65496 (got '$PORT_BASE')"
fi
DURATION=$((10#$DURATION))
ROUNDS=$((10#$ROUNDS))
CONNECTIONS=$((10#$CONNECTIONS))
PORT_BASE=$((10#$PORT_BASE))

# Selected targets, validated, deduplicated, in canonical order.
declare -A WANT=()
read -r -a only_list <<<"$ONLY"
((${#only_list[@]} > 0)) || die "ONLY is empty"
for t in "${only_list[@]}"; do
	case $t in
	direct | markco | markco1 | floor-tokio | floor-app | floor-pingora | floor-own | floor-session | caddy | nginx) WANT[$t]=1 ;;
	*) die "unknown target in ONLY: '$t' (choose from: ${ALL_TARGETS[*]})" ;;
	esac
done

P_UP=$((PORT_BASE + 1))
P_CADDY=$((PORT_BASE + 2))
P_NGINX=$((PORT_BASE + 3))
P_MARKCO=$((PORT_BASE + 4))
P_CADDY_ADMIN=$((PORT_BASE + 19))
P_MARKCO_ADMIN=$((PORT_BASE + 29))
P_MARKCO1=$((PORT_BASE + 5))
P_MARKCO1_ADMIN=$((PORT_BASE + 39))
P_FLOOR_TOKIO=$((PORT_BASE + 6))
P_FLOOR_PINGORA=$((PORT_BASE + 7))
P_FLOOR_OWN=$((PORT_BASE + 8))
P_FLOOR_APP=$((PORT_BASE + 9))
P_FLOOR_SESSION=$((PORT_BASE + 10))

declare -A PORT=([direct]=$P_UP [markco]=$P_MARKCO [markco1]=$P_MARKCO1 [caddy]=$P_CADDY [nginx]=$P_NGINX
	[floor-tokio]=$P_FLOOR_TOKIO [floor-pingora]=$P_FLOOR_PINGORA [floor-own]=$P_FLOOR_OWN [floor-app]=$P_FLOOR_APP
	[floor-session]=$P_FLOOR_SESSION)
declare -A LABEL=([direct]="direct" [markco]="markco (2 threads)" [markco1]="markco (1 thread)" [caddy]="caddy" [nginx]="nginx-proxy"
	[floor-tokio]="floor: tokio + httparse (1 thread)" [floor-app]="floor: the same loop on Pingora's listener (1 thread)" [floor-pingora]="floor: bare Pingora (1 thread)"
	[floor-own]="floor: Pingora + markco's upstream loop (1 thread)"
	[floor-session]="floor: Pingora's HTTP/1 session, no HttpProxy, + markco's upstream loop (1 thread)")
declare -A SKIP=()  # target -> reason it is not measured
declare -A PIDS=()  # server name -> pid
declare -A IDLE=()  # target -> idle RSS (kB)
declare -A PEAK=()  # target -> peak RSS (kB)
STARTED=()          # server names, in start order
CLIENT=""           # pid of the running load generator (see run_client)
EXPECTED_BODY="hello from upstream"

for tool in nginx wrk curl ps setsid timeout awk sed sort; do
	command -v "$tool" >/dev/null 2>&1 || die "required tool not found: $tool"
done

# ---------------------------------------------------------------------------
# Temp dir and cleanup
# ---------------------------------------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/markco-bench.XXXXXX")
RAW=$TMP/wrk
mkdir -p "$RAW"

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# Copies a committed config into the temp dir, moving the default 127.0.0.1
# ports to PORT_BASE (two passes, so new ports never collide with old ones)
# and dropping `user root;` when nginx would only warn that it is ignored.
render() {
	local src=$SCRIPT_DIR/$1 dst=$TMP/$1
	[[ -f $src ]] || die "missing config: $src"
	sed -e 's/127\.0\.0\.1:19001\b/127.0.0.1:@P_UP@/g' \
		-e 's/127\.0\.0\.1:19002\b/127.0.0.1:@P_CADDY@/g' \
		-e 's/127\.0\.0\.1:19003\b/127.0.0.1:@P_NGINX@/g' \
		-e 's/127\.0\.0\.1:19004\b/127.0.0.1:@P_MARKCO@/g' \
		-e 's/127\.0\.0\.1:19019\b/127.0.0.1:@P_CADDY_ADMIN@/g' \
		-e 's/127\.0\.0\.1:19029\b/127.0.0.1:@P_MARKCO_ADMIN@/g' \
		"$src" |
		sed -e "s/@P_UP@/$P_UP/g" \
			-e "s/@P_CADDY@/$P_CADDY/g" \
			-e "s/@P_NGINX@/$P_NGINX/g" \
			-e "s/@P_MARKCO@/$P_MARKCO/g" \
			-e "s/@P_CADDY_ADMIN@/$P_CADDY_ADMIN/g" \
			-e "s/@P_MARKCO_ADMIN@/$P_MARKCO_ADMIN/g" >"$dst"
	if ((EUID != 0)); then
		sed -i -e '/^user root;$/d' "$dst"
	fi
	echo "$dst"
}

# wait_ready NAME PORT LOGFILE : waits until GET / answers 2xx with the
# upstream's body (so a proxy that answers but does not proxy fails here).
wait_ready() {
	local name=$1 port=$2 logfile=$3 pid body i
	pid=${PIDS[$name]}
	for ((i = 0; i < READY_TIMEOUT * 5; i++)); do
		if ! is_alive "$pid"; then
			log "$name exited during startup; last lines of $logfile:"
			tail -n 20 "$logfile" >&2 || true
			return 1
		fi
		if body=$(curl -sf --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null) &&
			[[ $body == "$EXPECTED_BODY" ]]; then
			return 0
		fi
		sleep 0.2
	done
	log "$name did not answer http://127.0.0.1:$port/ with '$EXPECTED_BODY' within ${READY_TIMEOUT}s; last lines of $logfile:"
	tail -n 20 "$logfile" >&2 || true
	return 1
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
	/requests in/                  { n = $1 }
	/^[ \t]+50%[ \t]/              { p50 = ms($2) }
	/^[ \t]+99%[ \t]/              { p99 = ms($2) }
	/Non-2xx or 3xx responses:/    { non2xx = $NF }
	/Socket errors:/               { sockerr = ($4 + 0) + ($6 + 0) + ($8 + 0) + ($10 + 0) }
	END {
		if (rps == "" || p50 == "" || p99 == "") { print "NA NA NA NA NA NA"; exit }
		printf "%s %s %s %d %d %s\n", rps, p50, p99, non2xx + 0, sockerr + 0, (n == "" ? "NA" : n)
	}' "$1"
}

server_of() { # target -> name of the server process measured for RSS
	case $1 in
	direct) echo upstream ;;
	*) echo "$1" ;;
	esac
}

# ---------------------------------------------------------------------------
# markco binary
# ---------------------------------------------------------------------------

MARKCO=""
MARKCO_VERSION="not selected"
resolve_markco() {
	local target_dir bin
	if [[ -n ${MARKCO_BIN:-} ]]; then
		if [[ -f $MARKCO_BIN && -x $MARKCO_BIN ]]; then
			MARKCO=$MARKCO_BIN
		else
			SKIP[markco]="MARKCO_BIN=$MARKCO_BIN is not an executable file"
		fi
	elif [[ -n ${WANT[markco]:-}${WANT[markco1]:-} ]]; then
		target_dir=${CARGO_TARGET_DIR:-/var/cache/markco/target}
		bin=$target_dir/release/markco
		if ! command -v cargo >/dev/null 2>&1; then
			SKIP[markco]="MARKCO_BIN unset and cargo not found"
		else
			log "building markco: CARGO_TARGET_DIR=$target_dir cargo build --release -p markco"
			if (cd "$REPO_DIR" && CARGO_TARGET_DIR=$target_dir cargo build --release -p markco) >&2; then
				if [[ -x $bin ]]; then
					MARKCO=$bin
				else
					SKIP[markco]="cargo build succeeded but $bin does not exist"
				fi
			else
				SKIP[markco]="cargo build --release -p markco failed (output above); not benchmarking a stale binary"
			fi
		fi
	fi
	if [[ -n $MARKCO ]]; then
		MARKCO_VERSION=$(timeout 5 "$MARKCO" --version 2>/dev/null </dev/null | head -n 1) || MARKCO_VERSION=""
		[[ -n $MARKCO_VERSION ]] || MARKCO_VERSION="unknown ($MARKCO --version failed)"
	elif [[ -n ${SKIP[markco]:-} ]]; then
		MARKCO_VERSION="missing: ${SKIP[markco]}"
	fi
	if [[ -n ${SKIP[markco]:-} ]]; then SKIP[markco1]=${SKIP[markco]}; fi
}
resolve_markco

# The floors' binary (benches/floor), built like markco's unless FLOOR_BIN names it.
for f in "${FLOORS[@]}"; do
	[[ -n ${WANT[$f]:-} ]] || continue
	resolve_floor 1
	if [[ -n $FLOOR_WHY ]]; then
		for g in "${FLOORS[@]}"; do SKIP[$g]=$FLOOR_WHY; done
	fi
	break
done
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
# Start servers
# ---------------------------------------------------------------------------

declare -A NEEDS=([upstream]=1)
for t in "${TARGETS[@]}"; do NEEDS[$(server_of "$t")]=1; done

ports=("$P_UP")
if [[ -n ${NEEDS[caddy]:-} ]]; then ports+=("$P_CADDY" "$P_CADDY_ADMIN"); fi
if [[ -n ${NEEDS[nginx]:-} ]]; then ports+=("$P_NGINX"); fi
if [[ -n ${NEEDS[markco]:-} ]]; then ports+=("$P_MARKCO" "$P_MARKCO_ADMIN"); fi
if [[ -n ${NEEDS[markco1]:-} ]]; then ports+=("$P_MARKCO1" "$P_MARKCO1_ADMIN"); fi
for f in "${FLOORS[@]}"; do
	if [[ -n ${NEEDS[$f]:-} ]]; then ports+=("${PORT[$f]}"); fi
done
require_free_ports "${ports[@]}"

start_nginx upstream upstream-nginx.conf
wait_ready upstream "$P_UP" "$TMP/upstream/error.log" || die "upstream nginx failed to start"

if [[ -n ${NEEDS[nginx]:-} ]]; then
	start_nginx nginx proxy-nginx.conf
fi
if [[ -n ${NEEDS[caddy]:-} ]]; then
	caddyfile=$(render Caddyfile)
	mkdir -p "$TMP/caddy/home" "$TMP/caddy/data" "$TMP/caddy/config"
	start_server caddy "$TMP/caddy.log" "$TMP/caddy" \
		env GOMAXPROCS=2 HOME="$TMP/caddy/home" \
		XDG_DATA_HOME="$TMP/caddy/data" XDG_CONFIG_HOME="$TMP/caddy/config" \
		caddy run --config "$caddyfile" --adapter caddyfile
fi
if [[ -n ${NEEDS[markco]:-}${NEEDS[markco1]:-} ]]; then
	markco_conf=$(render markco.toml)
	# Extra [server] settings for both markco targets (e.g. "work_stealing = false").
	server_extra "$markco_conf"
fi
if [[ -n ${NEEDS[markco]:-} ]]; then
	mkdir -p "$TMP/markco"
	start_server markco "$TMP/markco.log" "$TMP/markco" "$MARKCO" run --config "$markco_conf"
fi
if [[ -n ${NEEDS[markco1]:-} ]]; then
	# The same config on its own ports with one worker thread, and in a directory of its own:
	# the database is relative to the config file, and two gateways starting on one SQLite file
	# race to migrate it.
	mkdir -p "$TMP/markco1"
	markco1_conf=$TMP/markco1/markco1.toml
	sed -e "s/^threads = 2$/threads = 1/" -e "s/127\.0\.0\.1:$P_MARKCO\"/127.0.0.1:$P_MARKCO1\"/" \
		-e "s/127\.0\.0\.1:$P_MARKCO_ADMIN\"/127.0.0.1:$P_MARKCO1_ADMIN\"/" "$markco_conf" >"$markco1_conf"
	start_server markco1 "$TMP/markco1.log" "$TMP/markco1" "$MARKCO" run --config "$markco1_conf"
fi

for f in "${FLOORS[@]}"; do
	[[ -n ${NEEDS[$f]:-} ]] || continue
	mkdir -p "$TMP/$f"
	start_server "$f" "$TMP/$f.log" "$TMP/$f" "$FLOOR" "${f#floor-}" --threads 1 \
		--listen "127.0.0.1:${PORT[$f]}" --upstream "127.0.0.1:$P_UP"
done

for server in nginx caddy markco markco1 "${FLOORS[@]}"; do
	[[ -n ${NEEDS[$server]:-} ]] || continue
	case $server in
	floor-*) wait_ready "$server" "${PORT[$server]}" "$TMP/$server.log" || die "$server failed to start" ;;
	nginx) wait_ready nginx "$P_NGINX" "$TMP/nginx/error.log" || die "nginx proxy failed to start" ;;
	caddy) wait_ready caddy "$P_CADDY" "$TMP/caddy.log" || die "caddy failed to start" ;;
	markco) wait_ready markco "$P_MARKCO" "$TMP/markco.log" || die "markco failed to start" ;;
	markco1) wait_ready markco1 "$P_MARKCO1" "$TMP/markco1.log" || die "markco (1 thread) failed to start" ;;
	esac
done

# Idle memory: after start-up (one readiness request each), before any load.
for t in "${TARGETS[@]}"; do
	IDLE[$t]=$(mem_kb VmRSS "${PIDS[$(server_of "$t")]}")
	PEAK[$t]=0
done

# ---------------------------------------------------------------------------
# Measure
# ---------------------------------------------------------------------------

n=${#TARGETS[@]}
log "targets: ${TARGETS[*]}; $ROUNDS round(s) x $n target(s) x (${WARMUP}s warm-up + ${DURATION}s) ~ $((ROUNDS * n * (WARMUP + DURATION)))s"

RESULTS=$TMP/results.tsv # round target order_pos rps p50 p99 non2xx sockerr status
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
		server=$(server_of "$t")
		pid=${PIDS[$server]}
		url="http://127.0.0.1:${PORT[$t]}/"
		out=$RAW/round$r-$t.txt
		if ! is_alive "$pid"; then
			log "  $t: server $server (pid $pid) is not running; recording the run as failed"
			printf '%s\t%s\tNA\tNA\tNA\tNA\tNA\tdown\tNA\tNA\n' "$r" "$t" >>"$RESULTS"
			continue
		fi
		run_client "$RAW/round$r-$t.warmup.txt" $((WARMUP + 30)) \
			wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" "$url" ||
			log "  $t: warm-up wrk exited non-zero (see $RAW/round$r-$t.warmup.txt)"
		status=ok
		ticks=$(cpu_ticks "$pid")
		sys=$(sys_ticks "$pid")
		run_client "$out" $((DURATION + 30)) \
			wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url" || status=wrk-failed
		ticks_after=$(cpu_ticks "$pid")
		sys_after=$(sys_ticks "$pid")
		is_alive "$pid" || status=died
		hwm=$(mem_kb VmHWM "$pid")
		if ((hwm > PEAK[$t])); then PEAK[$t]=$hwm; fi
		read -r rps p50 p99 non2xx sockerr requests < <(parse_wrk "$out")
		if [[ $rps == NA && $status == ok ]]; then status=unparsed; fi
		cpu=$(cpu_us_per_req "$ticks" "$ticks_after" "$requests")
		sys_cpu=$(cpu_us_per_req "$sys" "$sys_after" "$requests")
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$rps" "$p50" "$p99" "$non2xx" "$sockerr" "$status" "$cpu" "$sys_cpu" >>"$RESULTS"
		log "  $t: $(fmt '%.0f' "$rps") req/s, p50 $(fmt '%.2f' "$p50") ms, p99 $(fmt '%.2f' "$p99") ms, $cpu us CPU/req, non-2xx $non2xx, socket errors $sockerr [$status]"
	done
done

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

col() { # col TARGET FIELD# : values of a column for a target's ok runs
	awk -F'\t' -v t="$1" -v c="$2" '$2 == t && $8 == "ok" { print $c }' "$RESULTS"
}

declare -A MED_RPS=()
for t in "${TARGETS[@]}"; do MED_RPS[$t]=$(col "$t" 3 | median); done
direct_rps=${MED_RPS[direct]:-NA}

nginx_v=$(nginx -v 2>&1 | sed 's/^nginx version: nginx\///') || nginx_v=unknown
caddy_v=$( (command -v caddy >/dev/null && caddy version 2>/dev/null | head -n 1) || echo "not installed")
wrk_v=$( (wrk -v 2>&1 || true) | head -n 1 | sed -e 's/ Copyright.*//' -e 's/^wrk //')
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
stamp=$(date -u '+%Y-%m-%d %H:%M:%S UTC')

REPORT=$TMP/report.md
{
	echo "# Reverse-proxy benchmark ($stamp)"
	echo
	echo "- Machine: $(nproc) CPUs (nproc), Linux $(uname -r) $(uname -m)${cpu_model:+, $cpu_model}; wrk, the proxy and the upstream all share these CPUs"
	echo "- Versions: nginx $nginx_v; caddy $caddy_v; wrk $wrk_v; markco: $MARKCO_VERSION"
	echo "- Load: \`wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s --latency http://127.0.0.1:PORT/\`, each run preceded by a ${WARMUP} s warm-up (\`wrk -t$WRK_THREADS -c$CONNECTIONS -d${WARMUP}s\`)"
	echo "- Rounds: $ROUNDS, interleaved; the target order is rotated left by one each round (round 1: ${ORDERS[0]})"
	echo "- Upstream: nginx, 1 worker, 127.0.0.1:$P_UP, \`return 200 \"hello from upstream\\n\"\` (20-byte body); proxies: markco :$P_MARKCO, caddy :$P_CADDY (GOMAXPROCS=2), nginx :$P_NGINX (2 workers, keepalive 128)"
	echo "- RSS: idle = sum of VmRSS over the server's processes (nginx: master + workers) after start-up, before any load; peak = sum of VmHWM over the same processes read right after each run, max over rounds. Pages shared between processes are counted in each of them, so multi-process sums overstate unique memory. For \`direct\` it is the upstream nginx, which also serves every proxy's traffic."
	for t in "${ALL_TARGETS[@]}"; do
		if [[ -n ${WANT[$t]:-} && -n ${SKIP[$t]:-} ]]; then echo "- Skipped: $t — ${SKIP[$t]}"; fi
	done
	echo
	echo "## Summary (medians over $ROUNDS round(s))"
	echo
	echo "| target | req/s | p50 ms | p99 ms | req/s vs direct | CPU µs/req | of which system | RSS idle MB | RSS peak MB | errors |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	for t in "${TARGETS[@]}"; do
		rps=${MED_RPS[$t]}
		p50=$(col "$t" 4 | median)
		p99=$(col "$t" 5 | median)
		if [[ $rps == NA || $direct_rps == NA ]]; then
			ratio=n/a
		else
			ratio=$(awk -v a="$rps" -v b="$direct_rps" 'BEGIN { printf "%.2f", a / b }')
		fi
		errors=$(awk -F'\t' -v t="$t" '$2 == t { e += ($6 == "NA" ? 0 : $6) + ($7 == "NA" ? 0 : $7); if ($8 != "ok") f++ }
			END { s = e + 0; if (f) s = s " (" f " failed run" (f > 1 ? "s" : "") ")"; print s }' "$RESULTS")
		cpu=$(col "$t" 9 | median)
		sys_cpu=$(col "$t" 10 | median)
		printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${LABEL[$t]}" \
			"$(fmt '%.0f' "$rps")" "$(fmt '%.2f' "$p50")" "$(fmt '%.2f' "$p99")" "$ratio" "$(fmt '%.1f' "$cpu")" "$(fmt '%.1f' "$sys_cpu")" \
			"$(mb "${IDLE[$t]}")" "$(mb "${PEAK[$t]}")" "$errors"
	done
	echo
	echo "errors = non-2xx/3xx responses + socket errors (connect/read/write/timeout) summed over rounds; runs that failed are left out of the medians."
	echo
	echo "CPU µs/req = the server's own user + system CPU time during the measured run (all its processes and threads, from /proc/<pid>/stat) divided by the requests wrk completed. For direct it is the upstream nginx alone; for a proxy it excludes the upstream. It holds steadier than req/s on shared cores. *of which system*: the part of it spent in the kernel (stime alone); the clock-tick sampling behind both makes it a few tenths of a µs coarse."
	echo
	echo "## Raw per-round results"
	echo
	echo "| round | target | req/s | p50 ms | p99 ms | CPU µs/req | of which system | non-2xx | socket errors | status |"
	echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"
	while IFS=$'\t' read -r r t rps p50 p99 non2xx sockerr status cpu sys_cpu; do
		printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$r" "${LABEL[$t]}" \
			"$(fmt '%.0f' "$rps")" "$(fmt '%.2f' "$p50")" "$(fmt '%.2f' "$p99")" "$(fmt '%.1f' "$cpu")" "$(fmt '%.1f' "$sys_cpu")" "$non2xx" "$sockerr" "$status"
	done <"$RESULTS"
} >"$REPORT"

mkdir -p "$RESULTS_DIR"
result_file=$RESULTS_DIR/proxy-$(date -u +%Y-%m-%d-%H%M%S).md
cp "$REPORT" "$result_file"
cat "$REPORT"
log "report written to $result_file"
