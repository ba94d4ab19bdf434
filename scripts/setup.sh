#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 / Ubuntu machine (as root, or with sudo available):
#   Debian packages: prosody, ejabberd (stock services kept stopped: the tests and the demo run
#   their own instances on 127.0.0.1), chromium (headless browser tests), node/npm if missing;
#   npm assets (strophe.js, converse.js) from package-lock.json; the Python package with its
#   test and framework extras, and tox + tox-uv.
# Usage: scripts/setup.sh [--demo]   (--demo: only what the demo needs: no ejabberd/chromium/tox)
set -euo pipefail
cd "$(dirname "$0")/.."

demo=0
[ "${1:-}" = "--demo" ] && demo=1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

need_apt=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# XMPP servers, without starting their stock services (they would listen on all interfaces).
if [ "$demo" = 1 ]; then
    have prosody || $SUDO env DEBIAN_FRONTEND=noninteractive bash tests/support/install-servers.sh --prosody-only
else
    $SUDO env DEBIAN_FRONTEND=noninteractive bash tests/support/install-servers.sh
fi

if [ "$demo" = 0 ]; then
    have chromium || need_apt+=(chromium)
    command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
fi
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ "${#need_apt[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# Browser-side assets (served from the project, never from a CDN).
if [ ! -d node_modules/strophe.js ] || [ ! -d node_modules/converse.js ] || [ package-lock.json -nt node_modules ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi

PY=${PYTHON:-python3}
if [ "$demo" = 1 ]; then
    $PY -m pip install -q --disable-pip-version-check -e '.[django]'
else
    $PY -m pip install -q --disable-pip-version-check -e '.[django,flask,starlette,fastapi,test,dev]'
fi
echo "setup: done"
