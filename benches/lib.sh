# shellcheck shell=bash
# Helpers shared by the benchmark scripts benches/*/run.sh, which source this
# file near the top (after `set -euo pipefail` and `set +m`). It only defines
# functions; they use these globals, which the sourcing script sets:
#   PIDS (assoc: server name -> pid), STARTED (server names, start order),
#   CLIENT (pid of the running load generator), TMP, KEEP_TMP, STOP_TIMEOUT,
#   CLK_TCK (cpu_us_per_req), REPO_DIR (resolve_floor), and render()
#   (start_nginx).
# run.sh scripts may redefine a function after sourcing (tls overrides
# run_client).
# shellcheck disable=SC2154 # the globals above are set by the sourcing script

log() { printf '[bench] %s\n' "$*" >&2; }
die() {
	printf '[bench] error: %s\n' "$*" >&2
	exit 1
}

# int_at_least VALUE MIN : VALUE is a decimal integer >= MIN.
int_at_least() { [[ $1 =~ ^[0-9]{1,9}$ ]] && ((10#$1 >= $2)); }

# Prints the pids of every process belonging to a server we started: its
# session (setsid made the server the session leader) or, failing that, its
# descendants.
members() {
	local pid=$1 sid c
	sid=$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ') || sid=
	if [[ $sid == "$pid" ]]; then
		ps -o pid= -s "$pid" 2>/dev/null | tr -d ' ' || true
	else
		[[ -d /proc/$pid ]] && echo "$pid"
		for c in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
			members "$c"
		done
	fi
}

is_alive() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != Z ]]
}

stop_server() {
	local name=$1 pid pids p i
	pid=${PIDS[$name]:-}
	[[ -n $pid ]] || return 0
	pids=$(members "$pid")
	if is_alive "$pid"; then
		# SIGINT: fast shutdown for nginx and Pingora (whose SIGTERM waits out
		# a long grace period), graceful for Caddy.
		kill -INT "$pid" 2>/dev/null || true
		for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
			is_alive "$pid" || break
			sleep 0.1
		done
	fi
	for p in $pids; do
		if is_alive "$p"; then
			log "$name: pid $p still running after ${STOP_TIMEOUT}s, sending SIGKILL"
			kill -KILL "$p" 2>/dev/null || true
		fi
	done
	wait "$pid" 2>/dev/null || true
	unset "PIDS[$name]"
}

cleanup() {
	local rc=$? i
	trap - EXIT INT TERM HUP
	set +eu
	if [[ -n $CLIENT ]]; then
		kill -TERM "$CLIENT" 2>/dev/null # timeout forwards it to the client
		wait "$CLIENT" 2>/dev/null
	fi
	for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
		stop_server "${STARTED[i]}"
	done
	if ((rc == 129 || rc == 130 || rc == 143)); then
		log "interrupted; all servers stopped"
	fi
	if ((rc != 0 && rc != 129 && rc != 130 && rc != 143)); then
		log "exit status $rc; temp dir kept for inspection: $TMP"
	elif [[ $KEEP_TMP == 1 ]]; then
		log "temp dir kept: $TMP"
	else
		rm -rf -- "$TMP"
	fi
	exit "$rc"
}

port_in_use() {
	# shellcheck disable=SC2016 # $1 is expanded by the inner bash
	timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

require_free_ports() {
	local p
	for p in "$@"; do
		if port_in_use "$p"; then
			die "127.0.0.1:$p is already in use; stop whatever listens there or set PORT_BASE"
		fi
	done
}

# start_server NAME LOGFILE DIR CMD... : runs CMD in DIR, in its own session,
# stdin closed, stdout+stderr to LOGFILE.
start_server() {
	local name=$1 logfile=$2 dir=$3
	shift 3
	(cd "$dir" && exec setsid "$@" >"$logfile" 2>&1 </dev/null) &
	# shellcheck disable=SC2004 # PIDS is an associative array (declared by the caller)
	PIDS[$name]=$!
	STARTED+=("$name")
	log "$name: started pid ${PIDS[$name]} ($*)"
}

start_nginx() { # start_nginx NAME CONF
	local name=$1 conf prefix
	conf=$(render "$2")
	prefix=$TMP/$name
	mkdir -p "$prefix"
	# -e: error log from the very start (before the config is read) goes to
	# the temp dir, not to the compiled-in default.
	if ! nginx -q -t -p "$prefix/" -c "$conf" -e "$prefix/error.log" 2>"$TMP/$name.configtest.log"; then
		cat "$TMP/$name.configtest.log" >&2
		die "$name: nginx -t failed for $conf"
	fi
	start_server "$name" "$TMP/$name.log" "$prefix" nginx -p "$prefix/" -c "$conf" -e "$prefix/error.log"
}

# run_client OUTFILE LIMIT CMD... : runs CMD under `timeout LIMIT` and waits for
# it. It runs in the background because wrk catches SIGINT and exits 0, and
# bash does not run an INT trap after a foreground child that survived the
# signal; `wait` is interrupted by the trap at once, and cleanup stops CLIENT.
run_client() {
	local outfile=$1 limit=$2 rc=0
	shift 2
	(exec timeout "$limit" "$@" >"$outfile" 2>&1 </dev/null) &
	CLIENT=$!
	wait "$CLIENT" || rc=$?
	CLIENT=""
	return "$rc"
}

# mem_kb FIELD PID : sum of FIELD (VmRSS, VmHWM) in kB over the server's processes.
mem_kb() {
	local field=$1 pid=$2 sum=0 p v
	for p in $(members "$pid"); do
		v=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$p/status" 2>/dev/null) || v=
		sum=$((sum + ${v:-0}))
	done
	echo "$sum"
}

mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# cpu_ticks PID : user + system CPU time (clock ticks) used so far by the
# server's processes (all their threads).
cpu_ticks() {
	local sum=0 p stat f
	for p in $(members "$1"); do
		stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
		read -r -a f <<<"${stat##*) }" # f[0] is field 3 (state): utime = f[11], stime = f[12]
		sum=$((sum + ${f[11]:-0} + ${f[12]:-0}))
	done
	echo "$sum"
}

# sys_ticks PID : the system (kernel) part of cpu_ticks alone.
sys_ticks() {
	local sum=0 p stat f
	for p in $(members "$1"); do
		stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
		read -r -a f <<<"${stat##*) }"
		sum=$((sum + ${f[12]:-0}))
	done
	echo "$sum"
}

# cpu_us_per_req TICKS_BEFORE TICKS_AFTER REQUESTS -> microseconds of server CPU per request
cpu_us_per_req() {
	if [[ $3 == NA ]] || (($3 == 0)); then
		echo NA
	else
		awk -v a="$1" -v b="$2" -v n="$3" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", (b - a) / hz * 1e6 / n }'
	fi
}

# median of the numbers on stdin ("NA" when none).
median() {
	sort -g | awk '{ a[NR] = $1 } END {
		if (NR == 0) print "NA"
		else if (NR % 2) print a[(NR + 1) / 2]
		else print (a[NR / 2] + a[NR / 2 + 1]) / 2
	}'
}

fmt() { # fmt PRINTF_FORMAT VALUE (passes NA through)
	if [[ $2 == NA ]]; then echo NA; else awk -v f="$1" -v v="$2" 'BEGIN { printf f, v }'; fi
}

# server_extra CONF : adds $MARKCO_SERVER_EXTRA (';'-separated lines, e.g. "work_stealing = false")
# to a markco config's [server] section, right after its `threads = ` line.
server_extra() {
	[[ -n ${MARKCO_SERVER_EXTRA:-} ]] || return 0
	awk -v extra="$MARKCO_SERVER_EXTRA" '{ print } /^threads = / { n = split(extra, l, ";"); for (i = 1; i <= n; i++) print l[i] }' \
		"$1" >"$1.tmp" && mv "$1.tmp" "$1"
}

# resolve_floor BUILD_FIRST : sets FLOOR to the floors' binary (benches/floor):
# FLOOR_BIN if set, else $CARGO_TARGET_DIR/release/markco-floor, built first
# when BUILD_FIRST is 1 or it is missing. Without one, FLOOR is empty and
# FLOOR_WHY says why.
resolve_floor() {
	local target_dir=${CARGO_TARGET_DIR:-/var/cache/markco/target} bin
	bin=${FLOOR_BIN:-$target_dir/release/markco-floor}
	FLOOR=""
	FLOOR_WHY=""
	if [[ -z ${FLOOR_BIN:-} && ($1 == 1 || ! -x $bin) ]]; then
		if ! command -v cargo >/dev/null 2>&1; then
			FLOOR_WHY="FLOOR_BIN unset and cargo not found"
			return
		fi
		log "building the floors: CARGO_TARGET_DIR=$target_dir cargo build --release -p markco-floor"
		if ! (cd "$REPO_DIR" && CARGO_TARGET_DIR=$target_dir cargo build --release -p markco-floor) >&2; then
			FLOOR_WHY="cargo build --release -p markco-floor failed (output above)"
			return
		fi
	fi
	if [[ -f $bin && -x $bin ]]; then
		FLOOR=$bin
	else
		FLOOR_WHY="$bin is not an executable file"
	fi
}
