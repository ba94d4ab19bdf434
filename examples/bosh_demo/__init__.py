"""Shared plumbing of the bosh-middleware examples (not part of the library).

* ``bosh_demo.xmpp``    a private Prosody on 127.0.0.1 with the demo users and a shared roster
* ``bosh_demo.apps``    start one of the example web apps (django, flask, starlette) as a child
* ``bosh_demo.check``   the headless-Chromium end-to-end check (Playwright)
* ``bosh_demo/static``  the chat page's JavaScript and CSS, used by every example

The example apps themselves only read environment variables (see ``ENV_*`` below); they do not
import this package, so each of them can be copied on its own.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = EXAMPLES_DIR.parent
STATIC_DIR = Path(__file__).resolve().parent / "static"
NODE_MODULES = REPO_ROOT / "node_modules"
STROPHE_DIST = NODE_MODULES / "strophe.js" / "dist"
CONVERSE_DIST = NODE_MODULES / "converse.js" / "dist"

#: The XMPP domain of the demo server.
DOMAIN = "localhost"
#: Demo users: web login name -> web password. Their XMPP passwords are derived from the shared
#: secret (bosh_middleware.derive_password), so the web apps store none.
DEMO_USERS = {"alice": "wonderland", "bob": "builder"}

# What the example apps read from the environment.
ENV_SERVICE_URL = "BOSH_SERVICE_URL"  # BOSH endpoint as the web server reaches it
ENV_PUBLIC_SERVICE_URL = "BOSH_PUBLIC_SERVICE_URL"  # ... and as browsers reach it
ENV_SHARED_SECRET = "BOSH_SHARED_SECRET"  # HMAC secret the XMPP passwords are derived from
ENV_DOMAIN = "XMPP_DOMAIN"
ENV_PARENT_PID = "BOSH_DEMO_PARENT_PID"  # the app exits when this process is gone

__all__ = [
    "CONVERSE_DIST",
    "DEMO_USERS",
    "DOMAIN",
    "EXAMPLES_DIR",
    "REPO_ROOT",
    "STATIC_DIR",
    "STROPHE_DIST",
]
