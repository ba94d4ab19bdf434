"""bosh-middleware with Starlette: log in, and every page carries a prebound XMPP session.

Starlette's ``SessionMiddleware`` keeps the login in a signed cookie, ``AuthenticationMiddleware``
turns it into ``request.user``, and ``BOSHPrebindMiddleware`` (inside both) prebinds a BOSH
session for each authenticated HTML page and writes ``BOSH_JID``, ``BOSH_SID``, ``BOSH_RID`` and
``BOSH_SERVICE`` into its ``<head>``. The chat page attaches to it with Strophe.js.

Run it with ``python examples/demo.py --framework starlette`` (starts Prosody too), or against
your own XMPP server (see README.md)::

    BOSH_SERVICE_URL=http://127.0.0.1:5280/http-bind BOSH_SHARED_SECRET=... \\
        python examples/starlette/app.py --port 8000
"""

from __future__ import annotations

import argparse
import hmac
import html
import logging
import os
import secrets
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    BaseUser,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bosh_middleware import SharedSecretCredentials
from bosh_middleware.starlette import BOSHPrebindMiddleware

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STROPHE_DIST = REPO / "node_modules" / "strophe.js" / "dist"
SHARED_STATIC = HERE.parent / "bosh_demo" / "static"  # chat.js, chat.css (shared by the examples)


def without_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` (Basic auth for a proxy in front of the XMPP
    server, which only this server sends): the public URL is written into every page."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


# --- settings (environment) ------------------------------------------------------------------
#: BOSH endpoint as this server reaches it, and as browsers reach it.
SERVICE_URL = os.environ.get("BOSH_SERVICE_URL", "http://127.0.0.1:5280/http-bind")
PUBLIC_SERVICE_URL = os.environ.get("BOSH_PUBLIC_SERVICE_URL", without_userinfo(SERVICE_URL))
#: XMPP passwords are HMAC(secret, JID): provision the XMPP accounts with
#: ``bosh_middleware.derive_password(secret, jid)``; this app stores no XMPP password.
SHARED_SECRET = os.environ.get("BOSH_SHARED_SECRET", "")
XMPP_DOMAIN = os.environ.get("XMPP_DOMAIN", "localhost")
SESSION_SECRET = os.environ.get("DEMO_SECRET_KEY") or secrets.token_urlsafe(32)

#: The demo's web users (name -> web password). A real app has a user store with hashed
#: passwords; the XMPP side only needs the user name.
USERS = {"alice": "wonderland", "bob": "builder"}


# --- authentication ----------------------------------------------------------------------------
class SessionBackend(AuthenticationBackend):
    """``request.user`` from the name the login view put into the session."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.session.get("user")
        if name in USERS:
            return AuthCredentials(["authenticated"]), SimpleUser(name)
        return None


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return str(token)


async def form_data(request: Request) -> dict[str, str]:
    """An url-encoded form (parsed here: no python-multipart needed for two fields)."""
    body = (await request.body())[:4096].decode("utf-8", "replace")
    return dict(parse_qsl(body, keep_blank_values=True))


def csrf_ok(request: Request, form: dict[str, str]) -> bool:
    expected = request.session.get("csrf")
    return bool(expected) and hmac.compare_digest(str(expected), form.get("csrf", ""))


def safe_next(target: str | None) -> str:
    """Only same-site paths: no open redirect through ``?next=``."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    parts = urlsplit(target)
    return "/" if parts.scheme or parts.netloc else target


# --- pages -------------------------------------------------------------------------------------
def page(request: Request, title: str, body: str, *, scripts: str = "") -> HTMLResponse:
    user = request.user
    e = html.escape
    if user.is_authenticated:
        account = (
            f"<span>Logged in as <b>{e(user.display_name)}</b></span>"
            f'<form method="post" action="/logout"><input type="hidden" name="csrf" '
            f'value="{e(csrf_token(request))}"><button>Log out</button></form>'
        )
    else:
        account = ""
    return HTMLResponse(
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{e(title)} · bosh-middleware Starlette example</title>"
        "<link rel='icon' href='data:,'>"
        "<link rel='stylesheet' href='/static/demo/chat.css'></head>\n<body>"
        f"<header class='site'><h1>bosh-middleware · Starlette</h1>{account}</header>\n"
        f"<main>{body}</main>\n{scripts}</body></html>\n"
    )


CHAT = """
<section id="chat" data-state="loading" data-bosh-service="{service}">
  <p id="xmpp-status" data-state="loading">Loading…</p>
  <aside>
    <h2>Contacts</h2>
    <ul id="roster"></ul>
    <form id="add-form"><input id="add-jid" placeholder="someone@{domain}"
      aria-label="JID of a contact to add"><button>Add contact</button></form>
    <p class="hint">You are <span id="me">…</span></p>
  </aside>
  <div>
    <ol id="messages" aria-live="polite"></ol>
    <form id="send-form"><span>To: <b id="send-to">nobody yet</b></span>
      <input id="message" autocomplete="off" placeholder="Message" aria-label="Message">
      <button>Send</button></form>
  </div>
</section>
"""


async def chat(request: Request) -> Response:
    if not request.user.is_authenticated:
        return RedirectResponse("/login?next=/", status_code=303)
    body = CHAT.format(service=html.escape(PUBLIC_SERVICE_URL), domain=html.escape(XMPP_DOMAIN))
    scripts = (
        '<script src="/static/strophe/strophe.umd.min.js"></script>\n'
        '<script src="/static/demo/chat.js"></script>\n'
    )
    return page(request, "Chat", body, scripts=scripts)


def login_form(
    request: Request, *, error: str = "", username: str = "", status: int = 200
) -> Response:
    e = html.escape
    next_url = safe_next(request.query_params.get("next"))
    body = (
        "<form class='login' method='post' action='/login?next=" + e(next_url) + "'>"
        "<h2>Log in</h2>"
        + (f"<p class='errors'>{e(error)}</p>" if error else "")
        + f"<input type='hidden' name='csrf' value='{e(csrf_token(request))}'>"
        f"<label for='username'>User name</label><input id='username' name='username' "
        f"value='{e(username)}' autocomplete='username' required autofocus>"
        "<label for='password'>Password</label><input id='password' name='password' "
        "type='password' autocomplete='current-password' required>"
        "<button type='submit'>Log in</button>"
        "<p class='hint'>Demo users: alice / wonderland, bob / builder</p></form>"
    )
    response = page(request, "Log in", body)
    response.status_code = status
    return response


async def login(request: Request) -> Response:
    if request.method == "GET":
        return login_form(request)
    form = await form_data(request)
    if not csrf_ok(request, form):
        return PlainTextResponse("CSRF check failed: reload the login page", status_code=403)
    name, password = form.get("username", "").strip().lower(), form.get("password", "")
    expected = USERS.get(name)
    if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
        return login_form(request, error="Wrong user name or password.", username=name, status=400)
    request.session.clear()  # a fresh session (and CSRF token) for the logged-in user
    request.session["user"] = name
    return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)


async def logout(request: Request) -> Response:
    if not csrf_ok(request, await form_data(request)):
        return PlainTextResponse("CSRF check failed", status_code=403)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# --- the app -----------------------------------------------------------------------------------
def create_app() -> Starlette:
    if not SHARED_SECRET:
        raise RuntimeError(
            "BOSH_SHARED_SECRET is not set: run `python examples/demo.py --framework starlette`, "
            "or see examples/starlette/README.md"
        )
    return Starlette(
        routes=[
            Route("/", chat),
            Route("/login", login, methods=["GET", "POST"]),
            Route("/logout", logout, methods=["POST"]),
            Mount("/static/strophe", StaticFiles(directory=STROPHE_DIST), name="strophe"),
            Mount("/static/demo", StaticFiles(directory=SHARED_STATIC), name="demo"),
        ],
        # Outermost first: the session, then the user, then the prebind (which reads the user).
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=SESSION_SECRET,
                same_site="lax",
                session_cookie="starlette_session",
            ),
            Middleware(AuthenticationMiddleware, backend=SessionBackend()),
            Middleware(
                BOSHPrebindMiddleware,
                service_url=SERVICE_URL,
                credentials=SharedSecretCredentials(SHARED_SECRET, XMPP_DOMAIN),
                public_service_url=PUBLIC_SERVICE_URL,
                exclude_paths=("/static/",),
            ),
        ],
    )


app = create_app()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--quiet", action="store_true", help="no access log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per BOSH request
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=not args.quiet,
        log_level="warning" if args.quiet else "info",
        timeout_graceful_shutdown=3,
    )


if __name__ == "__main__":
    main()
