#!/usr/bin/env bash
# Prepares podman for markco's podman tests (control/tests/podman.rs) on Debian/Ubuntu. Safe to
# run again. Uses sudo when not root.
#   - installs podman, runc, catatonit (podman builds its pod infra image, localhost/podman-pause,
#     from it: no image is pulled), slirp4netns, uidmap
#   - writes /etc/containers/containers.conf for THIS TEST MACHINE (if it has no such file):
#     runc, and nofile/nproc ulimits no higher than the host's (otherwise every container,
#     including the pod infra container, fails with "error setting rlimit type 7: operation not
#     permitted")
#   - starts the API service on unix:///run/podman/podman.sock if it does not answer
#     (log: /tmp/podman-service.log) and waits for GET /_ping
#   - checks that a pod publishing a 127.0.0.1 port starts
# Env: MARKCO_PODMAN_SOCKET (default /run/podman/podman.sock).
set -euo pipefail

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

SOCKET="${MARKCO_PODMAN_SOCKET:-/run/podman/podman.sock}"
SOCKET="${SOCKET#unix://}"
CONF=/etc/containers/containers.conf
MARKER="# markco test machine settings (scripts/podman-setup.sh)"
LOG=/tmp/podman-service.log

packages=(podman runc catatonit slirp4netns uidmap curl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "podman-setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

ping_ok() {
  [ -S "$SOCKET" ] && [ "$($SUDO curl -s --max-time 2 --unix-socket "$SOCKET" http://d/_ping 2>/dev/null)" = "OK" ]
}

wrote_conf=0
if [ ! -e "$CONF" ]; then
  echo "podman-setup: writing $CONF (settings for this test machine, not for production)"
  $SUDO mkdir -p /etc/containers
  $SUDO tee "$CONF" >/dev/null <<EOF
$MARKER
# Written for the machine that runs markco's podman tests, not a production setting:
# - containers may not raise nofile/nproc above the host's limits here (runc fails with
#   "error setting rlimit type 7/6: operation not permitted", pod infra containers included);
# - crun does not work on this kernel: runc.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
EOF
  wrote_conf=1
elif grep -qF "$MARKER" "$CONF"; then
  echo "podman-setup: $CONF already has markco's test settings"
elif grep -q '^[[:space:]]*default_ulimits' "$CONF"; then
  echo "podman-setup: $CONF exists and sets default_ulimits; left as is"
else
  echo "podman-setup: WARNING: $CONF exists without default_ulimits; left as is. If containers fail with" >&2
  echo "  'error setting rlimit type 7: operation not permitted', add to its [containers] table:" >&2
  echo '  default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]' >&2
fi

if ping_ok; then
  if [ "$wrote_conf" = 1 ]; then
    echo "podman-setup: WARNING: the service on $SOCKET was started before $CONF was written;" >&2
    echo "  restart it so that it reads the new settings" >&2
  fi
  echo "podman-setup: podman API answers on $SOCKET"
else
  echo "podman-setup: starting podman system service on unix://$SOCKET (log: $LOG)"
  $SUDO mkdir -p "$(dirname "$SOCKET")"
  [ -e "$SOCKET" ] && $SUDO rm -f "$SOCKET"
  # setsid + nohup: the service outlives this script and its terminal. Started in /: conmon
  # needs the service's working directory, and a checkout it was started from may be deleted
  # (every container then fails with "Failed to get working directory").
  (cd / && exec $SUDO setsid nohup podman system service --time=0 "unix://$SOCKET") >>"$LOG" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    ping_ok && break
    sleep 0.5
  done
  if ! ping_ok; then
    echo "podman-setup: the podman API does not answer on $SOCKET; see $LOG" >&2
    exit 1
  fi
  echo "podman-setup: podman API answers on $SOCKET"
fi
$SUDO curl -s --max-time 5 --unix-socket "$SOCKET" http://d/v4.0.0/libpod/version | head -c 300
echo

# Smoke check: a pod (its infra container is built locally from catatonit) publishing a
# 127.0.0.1 port starts. The first run also builds localhost/podman-pause.
probe="markco-setup-probe-$$"
if $SUDO podman pod create --name "$probe" -p 127.0.0.1::8080 >/dev/null &&
  $SUDO podman pod start "$probe" >/dev/null; then
  infra="$($SUDO podman pod inspect "$probe" --format '{{.InfraContainerID}}' 2>/dev/null || true)"
  echo "podman-setup: a pod starts (infra image: $($SUDO podman container inspect "$infra" --format '{{.ImageName}}' 2>/dev/null || echo '?'))"
  $SUDO podman pod rm -f "$probe" >/dev/null
else
  $SUDO podman pod rm -f "$probe" >/dev/null 2>&1 || true
  echo "podman-setup: a test pod does not start; see the error above" >&2
  exit 1
fi
echo "podman-setup: done"
