"""The apps the pass-through section serves with uvicorn / waitress (imported by the servers).

Raw ASGI/WSGI (no framework), so that the server and the app cost as little as possible and the
middleware's share of each request is as large as it can be. A tiny auth layer outside the
middleware marks requests carrying ``X-User`` as logged in (``scope["user"]`` /
``REMOTE_USER``); both variants have it, so the middleware is the only difference.

* ``/static/app.js`` - a static file (logged-in user; the path is in ``exclude_paths``);
* ``/api/items``     - a JSON API for a logged-in user, requested twice over: as a browser's
  ``fetch()`` sends it (``Accept: application/json``, ``Sec-Fetch-Dest: empty``, ``Sec-Fetch-Mode:
  cors``: the middleware can tell from the request that no page will carry a session) and with
  no browser headers at all (as wrk sends it: the middleware has to look at the response's
  start before it lets it through, the residual cost of response inspection), and a third
  time with only ``Accept: */*``, what curl, requests and httpx send by default (inspected
  too: ``*/*`` takes HTML);
* ``/``              - an HTML page for an anonymous user;
* ``/static/files/app.js`` - the Starlette app only: the same JavaScript as a file on disk
  (benchmarks/static/), served by Starlette's ``StaticFiles``, as a Starlette app serves its
  static files (``STARLETTE_SCENARIOS``).

``SCENARIOS`` lists them once for the load generator (benchmarks/passthrough.py) and the
in-process table (benchmarks/_micro.py).

``BENCH_SERVICE_URL`` (env) is the BOSH URL; nothing here should ever contact it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from bosh_middleware import Credentials
from bosh_middleware.asgi import BOSHPrebindMiddleware as ASGIMiddleware
from bosh_middleware.wsgi import BOSHPrebindMiddleware as WSGIMiddleware

SERVICE_URL = os.environ.get("BENCH_SERVICE_URL", "http://127.0.0.1:9/http-bind")
JS = b"/* app */ " + b"console.log('x');" * 120
JSON = (
    b'{"items": [' + b",".join(b'{"id": %d, "name": "item %d"}' % (i, i) for i in range(6)) + b"]}"
)
HTML = (
    b"<!doctype html><html><head><title>t</title></head><body>"
    + b"<p>hello</p>" * 150
    + b"</body></html>"
)

#: What a browser's ``fetch()`` of a JSON API sends (besides Host, cookies, User-Agent ...).
FETCH_HEADERS = (
    ("Accept", "application/json"),
    ("Sec-Fetch-Dest", "empty"),
    ("Sec-Fetch-Mode", "cors"),
)
LOGGED_IN = (("X-User", "bench"),)
#: What a browser's navigation sends (Chromium's Accept): the commonest request of most sites,
#: from an anonymous visitor, is one of these.
NAVIGATION_HEADERS = (
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("Sec-Fetch-Dest", "document"),
    ("Sec-Fetch-Mode", "navigate"),
)

#: (row name, key in the JSON results, path, request headers beyond Host).
SCENARIOS: list[tuple[str, str, str, tuple[tuple[str, str], ...]]] = [
    ("static file (logged in, excluded path)", "static", "/static/app.js", LOGGED_IN),
    ("JSON API (logged in)", "json-fetch", "/api/items", (*LOGGED_IN, *FETCH_HEADERS)),
    ("JSON API (logged in, no browser headers)", "json-bare", "/api/items", LOGGED_IN),
    ("HTML page (anonymous)", "html-anonymous", "/", ()),
    (
        "JSON API (logged in, Accept: */*)",
        "json-curl",
        "/api/items",
        (*LOGGED_IN, ("Accept", "*/*")),
    ),
    ("HTML page (anonymous, browser navigation)", "html-anonymous-nav", "/", NAVIGATION_HEADERS),
]

#: Served by the Starlette app alone (its ``StaticFiles``); the same row names and keys.
STARLETTE_SCENARIOS: list[tuple[str, str, str, tuple[tuple[str, str], ...]]] = [
    (
        "static file, Starlette's StaticFiles (logged in, excluded path)",
        "staticfiles",
        "/static/files/app.js",
        LOGGED_IN,
    ),
]
STATIC_DIR = Path(__file__).resolve().parent / "static"

ROUTES = {
    "/static/app.js": (b"application/javascript", JS),
    "/api/items": (b"application/json", JSON),
    "/": (b"text/html; charset=utf-8", HTML),
}


def credentials(user: Any) -> Credentials:
    return Credentials("bench@localhost", "secret")


class _User:
    is_authenticated = True
    username = "bench"


class _Anonymous:
    is_authenticated = False


_USER, _ANON = _User(), _Anonymous()


# --- ASGI ----------------------------------------------------------------------------------------
async def _inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        return
    ctype, body = ROUTES.get(scope["path"], (b"text/plain", b"not found"))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _asgi_auth(app: Any) -> Any:
    async def auth(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            logged_in = any(k == b"x-user" for k, _ in scope["headers"])
            scope["user"] = _USER if logged_in else _ANON
        await app(scope, receive, send)

    return auth


class _Empty:
    """The least an ASGI middleware class can be: one more ``await`` around the app. Served as
    the pass-through section's *floor* rows: what any middleware costs there at all."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class _Look:
    """The least an ASGI middleware that must see what a response is can be: ``_Empty`` plus a
    ``send`` of its own that reads the start's ``Content-Type``, as a rewriting middleware must
    before it can tell a page from anything else. The *look* floor rows: what looking at a
    response at all costs, where the middleware has to (the requests that say nothing)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        def look(message: Any) -> Any:
            if message["type"] == "http.response.start":
                for name, value in message["headers"]:
                    if name == b"content-type" and b"html" in value:
                        break
            return send(message)

        await self.app(scope, receive, look)


asgi_without = _asgi_auth(_inner)
asgi_empty = _asgi_auth(_Empty(_inner))
asgi_look = _asgi_auth(_Look(_inner))


def _with(auth: Any, middleware: Any, app: Any, **settings: Any) -> Any:
    """``app`` in ``middleware`` (the ASGI or the WSGI one) with the section's settings, behind
    the auth layer ``auth``."""
    return auth(
        middleware(
            app,
            service_url=SERVICE_URL,
            credentials=credentials,
            exclude_paths=("/static/",),
            **settings,
        )
    )


asgi_with = _with(_asgi_auth, ASGIMiddleware, _inner)
#: The middleware with ``navigation_only=True``: a request that says nothing is not looked at.
asgi_navonly = _with(_asgi_auth, ASGIMiddleware, _inner, navigation_only=True)


# --- WSGI ----------------------------------------------------------------------------------------
def _wsgi_inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    ctype, body = ROUTES.get(environ.get("PATH_INFO", ""), (b"text/plain", b"not found"))
    start_response("200 OK", [("Content-Type", ctype.decode()), ("Content-Length", str(len(body)))])
    return [body]


def _wsgi_auth(app: Any) -> Any:
    def auth(environ: dict[str, Any], start_response: Any) -> Any:
        if "HTTP_X_USER" in environ:
            environ["REMOTE_USER"] = "bench"
        else:
            environ.pop("REMOTE_USER", None)
        return app(environ, start_response)

    return auth


class _EmptyWSGI:
    """As ``_Empty``, for WSGI: one more call around the app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return self.app(environ, start_response)


class _LookWSGI:
    """As ``_Look``, for WSGI: a ``start_response`` of its own that reads ``Content-Type``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        def look(status: str, headers: Any, exc_info: Any = None) -> Any:
            for name, value in headers:
                if name.lower() == "content-type" and "html" in value:
                    break
            return start_response(status, headers, exc_info)

        return self.app(environ, look)


wsgi_without = _wsgi_auth(_wsgi_inner)
wsgi_empty = _wsgi_auth(_EmptyWSGI(_wsgi_inner))
wsgi_look = _wsgi_auth(_LookWSGI(_wsgi_inner))


wsgi_with = _with(_wsgi_auth, WSGIMiddleware, _wsgi_inner)
wsgi_navonly = _with(_wsgi_auth, WSGIMiddleware, _wsgi_inner, navigation_only=True)


def _starlette_app(*middleware: Any) -> Any:
    """The routes as a Starlette app, with ``middleware`` in its own stack, where
    ``app.add_middleware`` puts it (inside Starlette's error handling); the auth layer wraps
    it all, as ``AuthenticationMiddleware`` must wrap the adapter."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def route(path: str) -> Route:
        ctype, body = ROUTES[path]

        async def endpoint(request: Any) -> Response:
            return Response(body, media_type=ctype.decode().split(";")[0])

        return Route(path, endpoint)

    routes = [route(p) for p in ROUTES]
    routes.append(Mount("/static/files", StaticFiles(directory=STATIC_DIR)))
    return _asgi_auth(Starlette(routes=routes, middleware=list(middleware)))


def starlette_without() -> Any:
    return _starlette_app()


def starlette_empty() -> Any:
    from starlette.middleware import Middleware

    return _starlette_app(Middleware(_Empty))


def starlette_look() -> Any:
    from starlette.middleware import Middleware

    return _starlette_app(Middleware(_Look))


def starlette_with(**settings: Any) -> Any:
    """The Starlette adapter (bosh_middleware.starlette), added as its docs say."""
    from starlette.middleware import Middleware

    from bosh_middleware.starlette import BOSHPrebindMiddleware

    return _starlette_app(
        Middleware(
            BOSHPrebindMiddleware,
            service_url=SERVICE_URL,
            credentials=credentials,
            exclude_paths=("/static/",),
            **settings,
        )
    )


def starlette_navonly() -> Any:
    return starlette_with(navigation_only=True)


# --- Flask and Django (benchmarks/_wsgiframeworks.py), built by waitress --call -------------
def _framework(framework: str, variant: str) -> Any:
    from . import _wsgiframeworks

    return getattr(_wsgiframeworks, f"{framework}_app")(variant)


_VARIANTS = ("without", "empty", "look", "with", "navonly")
flask_without, flask_empty, flask_look, flask_with, flask_navonly = (
    functools.partial(_framework, "flask", v) for v in _VARIANTS
)
django_without, django_empty, django_look, django_with, django_navonly = (
    functools.partial(_framework, "django", v) for v in _VARIANTS
)
