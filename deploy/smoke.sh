#!/usr/bin/env bash
# Smoke test of a markco deployment (or of Caddy today: the checks are what users see).
#
#   deploy/smoke.sh --url URL [--resolve HOST:PORT:ADDR] [--token TOKEN --user USERID]
#                   [--static PATH] [--cacert FILE] [--min-days N] [--timeout SECONDS]
#
#   deploy/smoke.sh --url https://markco.dev --resolve markco.dev:443:203.0.113.7 \
#       --token "$TOKEN" --user "$USER_ID" --static /static/mrmd.iife.js
#
# One line per step, PASS or FAIL with the reason; exit 0 only when every step passes (1 when
# one fails, 2 on bad usage). Needs curl; python3 for the websocket step; openssl for the
# certificate step of an https URL.
set -uo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

URL="" RESOLVE="" TOKEN="" USER_ID="" STATIC="" CACERT="" MIN_DAYS=14 TIMEOUT=20
while [ $# -gt 0 ]; do
    case "$1" in
        --url) URL="${2:-}"; shift 2 ;;
        --resolve) RESOLVE="${2:-}"; shift 2 ;;
        --token) TOKEN="${2:-}"; shift 2 ;;
        --user) USER_ID="${2:-}"; shift 2 ;;
        --static) STATIC="${2:-}"; shift 2 ;;
        --cacert) CACERT="${2:-}"; shift 2 ;;
        --min-days) MIN_DAYS="${2:-}"; shift 2 ;;
        --timeout) TIMEOUT="${2:-}"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "smoke: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$URL" ] || { echo "smoke: --url is required" >&2; usage; }
if [ -n "$USER_ID" ] && [ -z "$TOKEN" ]; then
    echo "smoke: --user needs --token (a session of that user)" >&2; exit 2
fi
if [[ ! "$URL" =~ ^(https?)://([^/:]+|\[[^]]+\])(:([0-9]+))?(/.*)?$ ]]; then
    echo "smoke: --url must look like https://markco.dev or http://127.0.0.1:8080" >&2; exit 2
fi
SCHEME="${BASH_REMATCH[1]}" HOST="${BASH_REMATCH[2]}" PORT="${BASH_REMATCH[4]}"
BASE="${URL%/}"
[ -n "$PORT" ] || { [ "$SCHEME" = https ] && PORT=443 || PORT=80; }
# Where to connect: the --resolve address for this host and port, or the host itself.
CONNECT="$HOST"
if [ -n "$RESOLVE" ]; then
    IFS=: read -r r_host r_port r_addr <<<"$RESOLVE"
    if [ "$r_host" = "$HOST" ] && [ "$r_port" = "$PORT" ] && [ -n "$r_addr" ]; then
        CONNECT="$r_addr"
    else
        echo "smoke: --resolve $RESOLVE does not name $HOST:$PORT from --url" >&2; exit 2
    fi
fi

command -v curl >/dev/null || { echo "smoke: curl is required" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

failed=0
pass() { printf 'PASS  %-10s %s\n' "$1" "$2"; }
fail() { printf 'FAIL  %-10s %s\n' "$1" "$2"; failed=$((failed + 1)); }

curl_base=(-sS --max-time "$TIMEOUT" -o "$tmp/body" -D "$tmp/headers" -w '%{http_code}')
[ -n "$RESOLVE" ] && curl_base+=(--resolve "$RESOLVE")
[ -n "$CACERT" ] && curl_base+=(--cacert "$CACERT")

# fetch PATH [curl args...]: sets CODE (000 when the request failed) and leaves body/headers.
fetch() {
    local path="$1"; shift
    : >"$tmp/body"; : >"$tmp/headers"
    CODE="$(curl "${curl_base[@]}" "$@" "$BASE$path" 2>"$tmp/err")" || CODE=000
}
# Why a fetch is not what we wanted, in one line.
why() {
    if [ "$CODE" = 000 ]; then
        printf 'request failed: %s' "$(tr '\n' ' ' <"$tmp/err" | cut -c1-200)"
    else
        printf 'HTTP %s: %s' "$CODE" "$(tr '\n' ' ' <"$tmp/body" | cut -c1-200)"
    fi
}
header() { grep -i "^$1:" "$tmp/headers" | head -1 | cut -d: -f2- | tr -d '\r' | sed 's/^ *//'; }
auth=(-H "Authorization: Bearer $TOKEN")

# 1. /api/health: 200 with a status, 503 when a service is down.
fetch /api/health
if [ "$CODE" = 200 ] && grep -q '"status"' "$tmp/body"; then
    pass health "/api/health 200 $(grep -o '"status":"[^"]*"' "$tmp/body" | head -1)"
else
    fail health "/api/health: $(why)"
fi

# 2. /api/services: 200 with services, and nobody's id or ports without the admin token.
fetch /api/services
if [ "$CODE" != 200 ] || ! grep -q '"services"' "$tmp/body"; then
    fail services "/api/services: $(why)"
elif grep -q '"editors"' "$tmp/body" || { [ -n "$USER_ID" ] && grep -qF "$USER_ID" "$tmp/body"; }; then
    fail services "/api/services lists users' workspaces without the admin token"
else
    pass services "/api/services 200, no user ids without the admin token"
fi

if [ -n "$TOKEN" ]; then
    # 3. The dashboard, signed in with a Bearer token.
    fetch /dashboard "${auth[@]}"
    if [[ "$CODE" =~ ^[23] ]]; then
        pass dashboard "/dashboard $CODE"
    else
        fail dashboard "/dashboard: $(why)"
    fi
fi

if [ -n "$USER_ID" ]; then
    # 4. The user's editor (a lazy start on first use).
    fetch "/u/$USER_ID/" "${auth[@]}"
    if [[ "$CODE" =~ ^[23] ]]; then
        pass workspace "/u/$USER_ID/ $CODE"
    else
        fail workspace "/u/$USER_ID/: $(why)"
    fi

    # 5. The editor's events websocket greets with {"event":"connected",...}.
    if ! command -v python3 >/dev/null; then
        fail websocket "python3 is needed for the websocket handshake"
    else
        ws_out="$(SMOKE_SCHEME="$SCHEME" SMOKE_HOST="$HOST" SMOKE_PORT="$PORT" SMOKE_CONNECT="$CONNECT" \
            SMOKE_PATH="/u/$USER_ID/events" SMOKE_TOKEN="$TOKEN" SMOKE_CACERT="$CACERT" SMOKE_TIMEOUT="$TIMEOUT" \
            python3 - 2>&1 <<'PY'
import base64, os, socket, ssl, sys
e = os.environ
host, port, timeout = e["SMOKE_HOST"].strip("[]"), int(e["SMOKE_PORT"]), float(e["SMOKE_TIMEOUT"])
try:
    sock = socket.create_connection((e["SMOKE_CONNECT"].strip("[]"), port), timeout=timeout)
    if e["SMOKE_SCHEME"] == "https":
        ctx = ssl.create_default_context(cafile=e["SMOKE_CACERT"] or None)
        ctx.set_alpn_protocols(["http/1.1"])
        sock = ctx.wrap_socket(sock, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    authority = host if port in (80, 443) else f"{e['SMOKE_HOST']}:{port}"
    sock.sendall((f"GET {e['SMOKE_PATH']} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {e['SMOKE_TOKEN']}\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            sys.exit(f"connection closed during the handshake: {buf[:200]!r}")
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 101 " not in status + " ":
        sys.exit(f"no upgrade: {status}")
    def need(n):
        global buf
        while len(buf) < n:
            chunk = sock.recv(4096)
            if not chunk:
                sys.exit("connection closed before the greeting")
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out
    b0, b1 = need(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(need(2), "big")
    elif n == 127:
        n = int.from_bytes(need(8), "big")
    payload = need(n)
    if b0 & 0x0F == 8:
        sys.exit(f"closed by the server: {payload[2:].decode(errors='replace')!r}")
    print(payload.decode(errors="replace")[:200])
except (OSError, ssl.SSLError) as err:
    sys.exit(f"{type(err).__name__}: {err}")
PY
        )"
        if [ $? -eq 0 ] && [[ "$ws_out" == *'"connected"'* ]]; then
            pass websocket "/u/$USER_ID/events greeted: $ws_out"
        else
            fail websocket "/u/$USER_ID/events: ${ws_out:-no greeting}"
        fi
    fi
fi

if [ -n "$STATIC" ]; then
    # 6. A static asset: 200, the MIME type its extension calls for, and nosniff.
    fetch "$STATIC"
    ctype="$(header content-type)"
    case "$STATIC" in
        *.js|*.mjs) want='javascript' ;;
        *.css) want='text/css' ;;
        *.html) want='text/html' ;;
        *.json|*.map) want='application/json' ;;
        *.wasm) want='application/wasm' ;;
        *.svg) want='image/svg+xml' ;;
        *) want='' ;;
    esac
    if [ "$CODE" != 200 ]; then
        fail static "$STATIC: $(why)"
    elif [ -n "$want" ] && [[ "$ctype" != *"$want"* ]]; then
        fail static "$STATIC is served as ${ctype:-no Content-Type}, want $want"
    elif [ "$(header x-content-type-options | tr A-Z a-z)" != nosniff ]; then
        fail static "$STATIC has no X-Content-Type-Options: nosniff"
    else
        pass static "$STATIC 200 $ctype, nosniff"
    fi
fi

if [ "$SCHEME" = https ]; then
    # 7. The certificate (valid: curl above verified it) and how long it has left.
    if ! command -v openssl >/dev/null; then
        fail cert "openssl is needed to read the certificate's expiry"
    else
        pem="$(openssl s_client -connect "$CONNECT:$PORT" -servername "$HOST" ${CACERT:+-CAfile "$CACERT"} \
            </dev/null 2>/dev/null | openssl x509 2>/dev/null)"
        end="$(printf '%s\n' "$pem" | openssl x509 -noout -enddate 2>/dev/null | cut -d= -f2)"
        if [ -z "$end" ]; then
            fail cert "no certificate from $CONNECT:$PORT for $HOST"
        else
            days=$(( ($(date -d "$end" +%s) - $(date +%s)) / 86400 ))
            if [ "$days" -lt "$MIN_DAYS" ]; then
                fail cert "the certificate for $HOST expires $end ($days days, want at least $MIN_DAYS)"
            else
                pass cert "the certificate for $HOST expires $end ($days days)"
            fi
        fi
    fi
fi

if [ "$failed" -eq 0 ]; then
    echo "smoke: all steps passed ($BASE)"
    exit 0
fi
echo "smoke: $failed step(s) failed ($BASE)"
exit 1
