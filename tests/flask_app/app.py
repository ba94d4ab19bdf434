"""The Flask app of the adapter tests: Flask-Login over a dict of users, a login form, HTML
pages (plain, streamed, async, with a CSP nonce), a JSON view, and ``BOSHPrebind``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

from flask import Flask, current_app, g, jsonify, redirect, request, stream_with_context
from flask_login import LoginManager, UserMixin, login_user, logout_user

from bosh_middleware import Credentials, StaticCredentials, no_prebind
from bosh_middleware.flask import BOSHPrebind
from flask_app.checks import page

WEB_PASSWORD = "web-secret"


class User(UserMixin):
    def __init__(self, username: str) -> None:
        self.id = self.username = username


def credentials(user: Any) -> Credentials | None:
    """For ``BOSH_CREDENTIALS = "flask_app.app:credentials"`` (a dotted path)."""
    return StaticCredentials(current_app.config["TEST_ACCOUNTS"])(user)


def create_app(
    accounts: Mapping[str, tuple[str, str]],
    service_url: str,
    *,
    script_base: str | None = None,
    factory: bool = False,
    **bosh: Any,
) -> Flask:
    """``accounts``: web username -> XMPP (jid, password); every web password is WEB_PASSWORD.
    ``bosh``: extra ``BOSH_*`` config keys (without the prefix)."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="test",
        TEST_ACCOUNTS=dict(accounts),
        BOSH_SERVICE_URL=service_url,
        BOSH_CREDENTIALS=StaticCredentials(accounts),
    )
    app.config.update({f"BOSH_{k.upper()}": v for k, v in bosh.items()})
    login = LoginManager(app)

    @login.user_loader
    def load_user(user_id: str) -> User | None:
        return User(user_id) if user_id in current_app.config["TEST_ACCOUNTS"] else None

    if factory:
        ext = BOSHPrebind()
        ext.init_app(app)
    else:
        BOSHPrebind(app)

    @app.route("/login", methods=["GET", "POST"])
    def login_view() -> Any:
        if request.method == "POST":
            name = request.form.get("username", "")
            known = name in current_app.config["TEST_ACCOUNTS"]
            if known and request.form.get("password") == WEB_PASSWORD:
                login_user(User(name))
                return redirect(request.args.get("next", "/"))
        form = (
            "<form method='post'><input name='username'><input name='password' type='password'>"
            "<button type='submit'>log in</button></form>"
        )
        return page("login", form)

    @app.route("/logout")
    def logout_view() -> str:
        logout_user()
        return page("bye")

    @app.route("/")
    def index() -> str:
        return page("home", script_base=script_base)

    @app.route("/no-session")
    def no_session() -> str:
        no_prebind(request)  # (Flask's request proxy, as a view has it)
        return page("no session")

    @app.route("/nonce")
    def nonce_view() -> str:
        if request.args.get("where") == "request":
            request.csp_nonce = "talisman-nonce"  # type: ignore[attr-defined]  # flask-talisman
        else:
            g.csp_nonce = "g-nonce"
        return page("nonce")

    @app.route("/stream")
    def stream() -> Any:
        @stream_with_context
        def generate() -> Iterator[str]:
            yield "<!doctype html><html><head><title>streamed "
            yield request.path  # needs the request context: stream_with_context kept it
            yield "</title></he"
            yield "ad><body>streamed"
            yield "</body></html>"

        return app.response_class(generate(), mimetype="text/html")

    @app.route("/async")
    async def async_view() -> str:
        await asyncio.sleep(0)
        return page("async")

    @app.route("/api/data")
    def api() -> Any:
        return jsonify(items=[1, 2, 3], html="<head></head>")

    return app
