#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 / Ubuntu machine (as root, or with sudo available):
#   Debian packages: prosody, ejabberd, nginx (stock services kept stopped: the tests and the demo run
#   their own instances on 127.0.0.1), chromium (headless browser tests), node/npm if missing;
#   npm assets (strophe.js, converse.js) from package-lock.json; the Python package with its
#   test and framework extras, and tox + tox-uv (into .venv when python3 is the distribution's
#   own, which takes no pip install: see scripts/_python.sh).
# Usage: scripts/setup.sh [--demo [DEMO ARGS]]   (--demo: only what the demo needs, no ejabberd
#   or tox; the demo's own arguments say what else: --check needs Chromium and Playwright)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh

demo=0 check=0
if [ "${1:-}" = "--demo" ]; then
    demo=1
    shift
    for arg in "$@"; do [ "$arg" = "--check" ] && check=1; done
fi

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
    command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
fi
if [ "$demo" = 0 ] || [ "$check" = 1 ]; then
    have chromium || need_apt+=(chromium)
fi
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
PY=$(project_python)
venv=0
if ! pip_installable "$PY"; then
    [ -n "${PYTHON:-}" ] && { echo "setup: $PYTHON cannot pip-install (no pip, or externally managed)" >&2; exit 1; }
    venv=1
    command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
    have python3-venv || need_apt+=(python3-venv)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# Browser-side assets (served from the project, never from a CDN).
if [ ! -d node_modules/strophe.js ] || [ ! -d node_modules/converse.js ] || [ package-lock.json -nt node_modules ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi

if [ "$venv" = 1 ]; then
    python3 -m venv .venv
    PY=$(project_python)
fi
if [ "$demo" = 1 ]; then
    # every framework of the demo's --framework, and the browser driver for --check
    $PY -m pip install -q --disable-pip-version-check -e '.[django,flask,starlette]' \
        flask-login itsdangerous uvicorn $([ "$check" = 1 ] && echo playwright)
else
    $PY -m pip install -q --disable-pip-version-check -e '.[django,flask,starlette,fastapi,test,dev]'
fi
echo "setup: done"
