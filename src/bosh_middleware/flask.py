"""Flask: ``BOSHPrebind(app)`` (or ``ext = BOSHPrebind(); ext.init_app(app)``).

Settings are ``app.config["BOSH_<FIELD>"]`` for every ``MiddlewareConfig`` field and engine
option (``BOSH_SERVICE_URL``, ``BOSH_CREDENTIALS`` as a callable or a dotted path, ``BOSH_MODE``,
``BOSH_TIMEOUT``, ``BOSH_WAIT`` ...), read once by ``init_app``: set them before. The user is
Flask-Login's ``current_user`` when the app has a login manager, unless ``get_user=`` says
otherwise. A CSP nonce is read from ``g.csp_nonce`` or ``request.csp_nonce`` (flask-talisman);
``BOSH_NONCE_ATTRIBUTE`` renames it. ``BOSH_ENABLED = False`` leaves the app alone. Other
``BOSH_*`` keys are the app's own, ignored (one close to a setting's name is logged as a likely
typo). ``init_app`` writes each setting's default into ``app.config``, where it can be read.

All of it happens in Flask's request hooks, on Flask's ``Response``, as Flask's own extensions
that edit responses do: one ``before_request`` hook tells a request that may be a page from the
rest (static files, ``fetch()`` calls), starts the prebind next to the view for a browser
navigation, and asks for an ``after_this_request`` function, which settles the credentials
after the view (it may have logged the user in or out) and writes the session into the page.
That function runs before the app's own ``after_request`` hooks, so a compressing one
(Flask-Compress) compresses the page with the session in it, and a hook that sets
``Cache-Control`` on every page has the last word over the ``no-store`` a prebound page gets.
A response returned by an app's ``before_request`` hook that runs before the extension's, one
registered ahead of it, is served as it is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable, Iterable
from typing import Any

try:
    from flask import (
        Flask,
        Response,
        after_this_request,
        current_app,
        g,
        got_request_exception,
        request,
    )
    from werkzeug.utils import import_string
except ImportError as exc:  # pragma: no cover - exercised in the no-framework env
    raise ImportError(
        "bosh_middleware.flask needs Flask: pip install 'bosh-middleware[flask]'"
    ) from exc

from .config import MiddlewareConfig, did_you_mean
from .core import (
    NAVIGATION,
    NOT_A_PAGE,
    PrebindCore,
    SyncPending,
    drop_validators,
    is_injectable,
    page_injector,
)
from .credentials import Credentials, is_authenticated
from .inject import injected_stream, sent_with_a_byte
from .optout import opted_out
from .session import PrebindSession
from .wsgi import header_getter, may_be_html

__all__ = ["BOSHPrebind", "flask_login_user"]

EXTENSION_KEY = "bosh_prebind"
PREFIX = "BOSH_"
log = logging.getLogger("bosh_middleware")
#: This adapter's own settings, not ``MiddlewareConfig`` ones, and their keys.
_ADAPTER_SETTINGS = frozenset({"nonce_attribute", "enabled"})
_ADAPTER_KEYS = frozenset(f"{PREFIX}{name.upper()}" for name in _ADAPTER_SETTINGS)
_UNSET = object()


def flask_login_user() -> Any:
    """Flask-Login's ``current_user`` if the app has a login manager, else ``None``."""
    if getattr(current_app, "login_manager", None) is None:
        _say_nobody_once()
        return None
    from flask_login import current_user  # type: ignore[import-untyped, unused-ignore]

    return current_user._get_current_object()


def _say_nobody_once() -> None:
    """An app with its own session login that missed ``get_user=`` would otherwise serve every
    page without a session, and nothing would say why."""
    state: _State | None = current_app.extensions.get(EXTENSION_KEY)
    if state is not None and not state.said_nobody:
        state.said_nobody = True
        log.warning(
            "BOSHPrebind finds no user: the app has no Flask-Login login manager (%s); pass "
            "BOSHPrebind(app, get_user=...) to say who the user is. No session is prebound",
            "flask_login.LoginManager(app)"
            if importlib.util.find_spec("flask_login") is not None
            else "flask-login is not installed",
        )


@dataclasses.dataclass
class _State:
    core: PrebindCore
    get_user: Callable[[], Any]
    nonce_attribute: str
    said_nobody: bool = False  # (see ``_say_nobody_once``)


def _config(app: Flask) -> MiddlewareConfig:
    for f in dataclasses.fields(MiddlewareConfig):
        if f.default is not dataclasses.MISSING:
            app.config.setdefault(f"{PREFIX}{f.name.upper()}", f.default)
    app.config.setdefault(f"{PREFIX}NONCE_ATTRIBUTE", "csp_nonce")
    # app.config is the app's namespace too: a BOSH_ key of its own (BOSH_SHARED_SECRET for
    # its credentials function, say) is left alone; one that looks like a misspelt setting of
    # ours is logged, as a setting that silently did nothing would be a puzzle.
    known = MiddlewareConfig.setting_names()
    values = {}
    for key, value in app.config.items():
        if not key.startswith(PREFIX) or key in _ADAPTER_KEYS:
            continue
        if key[len(PREFIX) :].lower() in known:
            values[key] = value
        elif hint := did_you_mean(key, PREFIX, _ADAPTER_SETTINGS):
            log.warning("app.config[%r] is no bosh-middleware setting%s", key, hint)
    for required in ("SERVICE_URL", "CREDENTIALS"):
        if not values.get(PREFIX + required):
            raise RuntimeError(f"BOSHPrebind needs app.config['{PREFIX}{required}']")
    credentials = values[f"{PREFIX}CREDENTIALS"]
    if isinstance(credentials, str):
        values[f"{PREFIX}CREDENTIALS"] = import_string(credentials)
    return MiddlewareConfig.from_mapping(values, prefix=PREFIX)


class BOSHPrebind:
    """Prebind an XMPP BOSH session for authenticated users' HTML pages."""

    def __init__(
        self, app: Flask | None = None, *, get_user: Callable[[], Any] | None = None
    ) -> None:
        self.get_user = get_user
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("BOSHPrebind is already initialised on this app")
        # As Django's ENABLED: one switch (per environment, say) that leaves the app as if
        # the extension were not there, without editing the code that adds it.
        enabled = app.config.get(f"{PREFIX}ENABLED", True)
        if not isinstance(enabled, bool):  # ("False" from the environment is truthy)
            raise TypeError(f"{PREFIX}ENABLED must be True or False, not {type(enabled).__name__}")
        if not enabled:
            log.info("BOSHPrebind is off: app.config['%sENABLED'] is False", PREFIX)
            return
        config = _config(app)  # (writes the defaults, BOSH_NONCE_ATTRIBUTE's among them)
        nonce_attribute = app.config[f"{PREFIX}NONCE_ATTRIBUTE"]
        if not isinstance(nonce_attribute, str):  # (None: every prebound page's getattr raised)
            raise TypeError(
                f"{PREFIX}NONCE_ATTRIBUTE must be a str, not {type(nonce_attribute).__name__}"
            )
        core = PrebindCore(config)
        state = app.extensions[EXTENSION_KEY] = _State(
            core, self.get_user or flask_login_user, nonce_attribute
        )
        app.before_request(_before_request_hook(state))
        # A view that raises with PROPAGATE_EXCEPTIONS (debug, testing) skips the after
        # functions: the prebind started next to it is ended here. (A signal, sent only then:
        # no cost to a request that does not fail.)
        got_request_exception.connect(_view_failed, app, weak=False)
        if core.config.endpoint_path is not None:
            app.add_url_rule(core.config.endpoint_path, EXTENSION_KEY, _endpoint, methods=["GET"])


def _state() -> _State:
    state: _State = current_app.extensions[EXTENSION_KEY]
    return state


#: Where a navigation's started prebind waits for the view (see ``_view_failed``).
_PENDING_KEY = "bosh_middleware.pending"


def _before_request_hook(state: _State) -> Callable[[], None]:
    """The extension's one app-wide hook, with this app's state bound in: no lookup through
    ``current_app`` on every request, and no second call (a closure, not a partial, which
    Flask's ``ensure_sync`` would unwrap on every call)."""
    core = state.core
    endpoint_path = core.config.endpoint_path

    def before_request() -> None:
        # The request itself, not the ``request`` proxy: each access through one of Flask's
        # proxies took 30-50 bytecodes, and every request passes this hook. Path and method
        # first, then the request headers, straight from the environ (``request.headers``
        # would read them through werkzeug's ``EnvironHeaders``).
        req = request._get_current_object()  # type: ignore[attr-defined]
        environ = req.environ
        path = environ.get("PATH_INFO", "")
        if not core.wants_path(environ.get("REQUEST_METHOD", ""), path) or path == endpoint_path:
            return
        kind = core.kind_of(environ)
        if kind == NOT_A_PAGE:
            return
        before: Any = _UNSET  # the user the prebind next to the view was started for
        credentials: Credentials | None = None
        pending: SyncPending | None = None

        def after_request(response: Response) -> Response:
            return _after_request(state, req, before, credentials, pending, response)

        # Asked for here, by a request that may be a page, rather than as an app-wide hook:
        # static files and ``fetch()`` calls, most of what an app serves, pay for one hook,
        # not two. It runs before the app's own after_request hooks (see the module's doc).
        after_this_request(after_request)
        if kind != NAVIGATION:
            return
        before = state.get_user()
        credentials = core.credentials_sync(before)
        if credentials is not None:
            pending = core.start_sync(credentials)
            if pending is not None:
                environ[_PENDING_KEY] = pending
                drop_validators(environ)  # (answered in full: see there)

    return before_request


def _view_failed(sender: Flask, exception: BaseException, **extra: Any) -> None:
    """A prebind started next to a view that raised will not reach a page: with
    PROPAGATE_EXCEPTIONS no after function runs to end it, and it would stay live at the
    XMPP server until that times it out."""
    pending = request.environ.pop(_PENDING_KEY, None)
    if pending is not None:
        pending.discard()


def _after_request(
    state: _State,
    req: Any,
    before: Any,
    credentials: Credentials | None,
    pending: SyncPending | None,
    response: Response,
) -> Response:
    environ = req.environ
    headers = response.headers
    core = state.core
    if opted_out(environ) or (before is _UNSET and not may_be_html(headers)):
        # A request that did not say what it wants got no page (a JSON answer to a script,
        # say): no user to ask for (Flask-Login's reads the session, or a remember cookie and
        # the database). A navigation's answer is a page, almost always: for it the user
        # comes first.
        if pending is not None:
            pending.discard()
        return response
    user = state.get_user()
    if credentials is None and not is_authenticated(user):
        # An anonymous visitor's page, the most common request of most sites: no session was
        # started and none will be, so its response is not looked at further
        return response
    get = header_getter(headers)
    if not is_injectable(req.method, response.status_code, get):
        core.check_compressed(response.status_code, get)
        if pending is not None:
            pending.discard()
        return response
    if user != before:  # not a navigation, or logged in/out by the view
        # ... or a user object made anew for each call (no ``__eq__``): the same account, and
        # the prebind started before the view is theirs (ended and made again, it cost a
        # second login and the overlap with the view)
        now = core.credentials_sync(user)
        if now is None or now != credentials:
            if pending is not None:
                pending.discard()
            credentials, pending = now, None
    if credentials is None:
        return response
    if pending is None:
        pending = core.start_sync(credentials)
    session = pending.session() if pending is not None else None
    if session is None:  # fail open: the page as the view made it
        return response
    _rewrite(state, req, response, session, get)
    return response


def _rewrite(
    state: _State,
    req: Any,
    response: Response,
    session: PrebindSession,
    get: Callable[[str], str | None],
) -> None:
    """The session into ``response``, in place (as Django's adapter does to its responses):
    an in-memory body whole, with its exact Content-Length; a streamed one chunk by chunk."""
    core = state.core
    streamed = not response.is_sequence
    length = None
    keep = core.sends_headers  # the headers carry the session whether or not the body can

    def unsent() -> None:
        core.terminate_sync(session)

    chunks: Iterable[bytes] = ()
    if streamed:
        original = response.response
        close = getattr(original, "close", None)
        if close is not None:  # (werkzeug closes the iterable it holds: ours, from now on)
            response.call_on_close(close)
        # A file handed over as it is (``send_file``) is read through ours instead; a body of
        # str (a generator of template parts) is encoded as werkzeug would have
        response.direct_passthrough = False
        chunks = response.iter_encoded()
    if core.rewrites_body:
        nonce = g.get(state.nonce_attribute) or getattr(req, state.nonce_attribute, None)
        injector = page_injector(
            core.snippet(session, str(nonce) if nonce else None), get("content-type")
        )
        if streamed:
            chunks = injected_stream(chunks, injector, None if keep else unsent)
        else:
            body = injector.feed(response.get_data()) + injector.finish()
            response.set_data(body)
            length = len(body)
            if not injector.done and not keep:  # (a charset that cannot carry it)
                unsent()
    if streamed:
        response.response = sent_with_a_byte(chunks, unsent) if keep else chunks
    sets, removes = core.header_edits(get, session, body_length=length, streaming=streamed)
    headers = response.headers
    for name in removes:
        headers.remove(name)
    for name, value in sets:
        headers[name] = value


def _endpoint() -> Response:
    if request.method != "GET":  # HEAD: Flask routes it here, but it must not cost a session
        return Response(status=405, headers={"Allow": "GET"})
    state = _state()
    environ = request.environ
    status, headers, body = state.core.endpoint_sync(
        state.get_user(), environ.get("HTTP_SEC_FETCH_SITE"), environ.get("HTTP_SEC_FETCH_DEST")
    )
    return Response(body, status=status, headers=headers)
