#!/usr/bin/env bash
# Install Prosody, ejabberd and nginx for the test-suite on Debian 12 / Ubuntu, as root.
# (--prosody-only: Prosody alone, what the demo needs.)
#
# The tests start their own private server instances on 127.0.0.1
# (tests/support/xmpp_servers.py; nginx as a reverse proxy in front of Prosody:
# tests/support/reverse_proxy.py); the stock services must NOT run: they would
# listen on all interfaces with the distribution's config (nginx: 0.0.0.0:80). So:
#   * a policy-rc.d forbids service starts during the install (removed
#     afterwards only if this script created it),
#   * the stock services (and the socket-activated epmd) are stopped and disabled.
# Only the stock daemons are touched (by unit or by their /run pid file), never
# other prosody/beam/nginx processes.
#
# nginx: the plain "nginx" package. (On bookworm "nginx-light" is no lighter: a
# metapackage of nginx plus the echo module.) Idempotent: safe to run again.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-servers.sh: must run as root (try: sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
PACKAGES=(prosody ejabberd nginx util-linux iproute2 procps)
if [ "${1:-}" = "--prosody-only" ]; then
    PACKAGES=(prosody util-linux iproute2 procps)
fi
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0

cleanup() {
    if [ "$CREATED_POLICY" = 1 ]; then
        rm -f "$POLICY"
    fi
}
trap cleanup EXIT

systemd_running() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\n# temporary, from tests/support/install-servers.sh\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        CREATED_POLICY=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if systemd_running; then
    # erlang-base enables a socket-activated epmd listening on all interfaces; the
    # tests do not need it (their ejabberd uses ERL_DIST_PORT on 127.0.0.1).
    for unit in prosody.service ejabberd.service nginx.service epmd.socket epmd.service; do
        systemctl stop "$unit" >/dev/null 2>&1 || true
        systemctl disable "$unit" >/dev/null 2>&1 || true
    done
else
    for svc in prosody ejabberd nginx; do
        if command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    done
fi

# A stock daemon started without systemd (init script): stop it via its pid file.
# (Not via "/etc/init.d/ejabberd stop": ejabberdctl would spawn an epmd on all interfaces.)
for pidfile in /run/prosody/prosody.pid /run/ejabberd/ejabberd.pid /run/nginx.pid; do
    if [ -s "$pidfile" ]; then
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 30); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
        fi
    fi
done

installed=()
for pkg in prosody ejabberd nginx; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        installed+=("$pkg $(dpkg-query -W -f='${Version}' "$pkg")")
    fi
done
summary=$(printf '%s, ' "${installed[@]}")
echo "install-servers.sh: ${summary%, } installed; stock services stopped/disabled."
