"""bosh-middleware with Flask and Flask-Login: every page of a logged-in user carries a prebound
XMPP session, and converse.js gets one from the JSON endpoint ``/bosh/prebind``.

* ``/``          chat page: Strophe.js attaches to the session the extension wrote into <head>
* ``/converse``  converse.js 14 (``authentication: 'prebind'``, ``prebind_url: '/bosh/prebind'``)

Run it with ``python examples/demo.py --framework flask`` (starts Prosody too), or against your
own XMPP server (see README.md)::

    BOSH_SERVICE_URL=http://127.0.0.1:5280/http-bind BOSH_SHARED_SECRET=... \\
        python examples/flask/app.py --port 8000
"""

from __future__ import annotations

import argparse
import hmac
import logging
import mimetypes
import os
import secrets
import signal
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Flask,
    abort,
    redirect,
    render_template,
    request,
    send_from_directory,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import (
    LoginManager,
    UserMixin,
    current_user,
    login_required,
    login_user,
    logout_user,
)
from werkzeug.security import check_password_hash, generate_password_hash

from bosh_middleware import SharedSecretCredentials
from bosh_middleware.flask import BOSHPrebind

HERE = Path(__file__).resolve().parent
NODE_MODULES = HERE.parent.parent / "node_modules"
ASSETS = {
    "strophe": NODE_MODULES / "strophe.js" / "dist",
    "converse": NODE_MODULES / "converse.js" / "dist",  # whole dist/: it loads its own chunks
    "demo": HERE.parent / "bosh_demo" / "static",  # chat.js, chat.css (shared by the examples)
}
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("application/wasm", ".wasm")


def without_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` (Basic auth for a proxy in front of the XMPP
    server, which only this server sends): the public URL is written into every page."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


# --- settings (environment) ------------------------------------------------------------------
SERVICE_URL = os.environ.get("BOSH_SERVICE_URL", "http://127.0.0.1:5280/http-bind")
PUBLIC_SERVICE_URL = os.environ.get("BOSH_PUBLIC_SERVICE_URL", without_userinfo(SERVICE_URL))
SHARED_SECRET = os.environ.get("BOSH_SHARED_SECRET", "")
XMPP_DOMAIN = os.environ.get("XMPP_DOMAIN", "localhost")

#: The demo's web users, with hashed web passwords. XMPP passwords are derived from the shared
#: secret (SharedSecretCredentials): the app stores none.
USERS = {
    name: generate_password_hash(pw)
    for name, pw in {"alice": "wonderland", "bob": "builder"}.items()
}


class User(UserMixin):
    def __init__(self, username: str) -> None:
        self.id = self.username = username  # SharedSecretCredentials reads .username


def safe_next(target: str | None) -> str:
    """Only same-site paths: no open redirect through ``?next=``."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return url_for("chat")
    parts = urlsplit(target)
    return url_for("chat") if parts.scheme or parts.netloc else target


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return str(session["csrf"])


def check_csrf() -> None:
    expected = session.get("csrf")
    if not expected or not hmac.compare_digest(str(expected), request.form.get("csrf", "")):
        abort(403, "CSRF check failed: reload the page")


def create_app() -> Flask:
    if not SHARED_SECRET:
        raise RuntimeError(
            "BOSH_SHARED_SECRET is not set: run `python examples/demo.py --framework flask`, "
            "or see examples/flask/README.md"
        )
    app = Flask(__name__, static_folder=None)
    app.config.update(
        SECRET_KEY=os.environ.get("DEMO_SECRET_KEY") or secrets.token_urlsafe(32),
        SESSION_COOKIE_SAMESITE="Lax",
        # bosh-middleware: BOSH_<FIELD> for each setting, read by BOSHPrebind(app).
        BOSH_SERVICE_URL=SERVICE_URL,
        BOSH_CREDENTIALS=SharedSecretCredentials(SHARED_SECRET, XMPP_DOMAIN),
        BOSH_PUBLIC_SERVICE_URL=PUBLIC_SERVICE_URL,
        # converse.js asks /bosh/prebind for its own session: its page needs none injected.
        BOSH_EXCLUDE_PATHS=["/static/", "/converse"],
    )
    app.jinja_env.globals["csrf_token"] = csrf_token

    login_manager = LoginManager(app)
    login_manager.login_view = "login"

    @login_manager.user_loader
    def load_user(user_id: str) -> User | None:
        return User(user_id) if user_id in USERS else None

    BOSHPrebind(app)  # after the login manager: the user is Flask-Login's current_user

    @app.get("/")
    @login_required
    def chat() -> ResponseReturnValue:
        return render_template(
            "chat.html", bosh_service=PUBLIC_SERVICE_URL, xmpp_domain=XMPP_DOMAIN
        )

    @app.get("/converse")
    @login_required
    def converse() -> ResponseReturnValue:
        return render_template(
            "converse.html",
            bosh_service=PUBLIC_SERVICE_URL,
            jid=f"{current_user.username}@{XMPP_DOMAIN}",
        )

    @app.route("/login", methods=["GET", "POST"])
    def login() -> ResponseReturnValue:
        if current_user.is_authenticated:
            return redirect(url_for("chat"))
        error, username = None, ""
        if request.method == "POST":
            check_csrf()
            username = request.form.get("username", "").strip().lower()
            hashed = USERS.get(username)
            if hashed and check_password_hash(hashed, request.form.get("password", "")):
                session.clear()  # fresh session (and CSRF token) for the logged-in user
                login_user(User(username))
                return redirect(safe_next(request.args.get("next")))
            error = "Wrong user name or password."
        status = 400 if error else 200
        return render_template("login.html", error=error, username=username), status

    @app.post("/logout")
    def logout() -> ResponseReturnValue:
        check_csrf()
        logout_user()
        session.clear()
        return redirect(url_for("login"))

    @app.get("/static/<any(strophe, converse, demo):kind>/<path:filename>")
    def assets(kind: str, filename: str) -> ResponseReturnValue:
        return send_from_directory(ASSETS[kind], filename, max_age=300)

    return app


app = create_app()


def main() -> None:
    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--quiet", action="store_true", help="no access log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per BOSH request
    if args.quiet:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    def stop(signum: int, frame: FrameType | None) -> Any:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    server = make_server(args.host, args.port, app, threaded=True)
    print(f"Flask example on http://{args.host}:{args.port}/", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
