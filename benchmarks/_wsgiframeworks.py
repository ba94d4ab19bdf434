"""The pass-through section's routes as a Flask app and as a Django project, served by waitress
(``flask_<variant>`` and ``django_<variant>`` in benchmarks/_passapps.py call these).

Each variant is the same app with and without the middleware, added the one line the README
says (``BOSHPrebind(app)``; the Django middleware in ``MIDDLEWARE``), and with nothing else a
real project would have (sessions, CSRF, templates): the framework's own cost per request, and
so the ratio's denominator, as small as that framework gets. Logged in is the raw apps' rule: an
``X-User`` header (``REMOTE_USER`` from ``_passapps._wsgi_auth``, Flask's ``get_user`` and the
Django ``request.user`` read it).

Django's settings are the process's: one variant per server process, as waitress ``--call``
builds it.
"""

from __future__ import annotations

from typing import Any

from ._passapps import (
    _ANON,
    _USER,
    ROUTES,
    SERVICE_URL,
    _EmptyWSGI,
    _wsgi_auth,
)

#: The settings every variant with the middleware has (the raw apps' ``_with``), as each
#: framework spells them.
_SETTINGS = {"SERVICE_URL": SERVICE_URL, "EXCLUDE_PATHS": ("/static/",)}
_CREDENTIALS = "benchmarks._passapps.credentials"


# --- Flask -----------------------------------------------------------------------------------
def flask_app(variant: str) -> Any:
    """``variant``: without | empty | look | with | navonly."""
    from flask import Flask, Response, request

    app = Flask(__name__, static_folder=None)  # /static/app.js is one of the routes

    def route(path: str, ctype: bytes, body: bytes) -> None:
        def view() -> Response:
            return Response(body, content_type=ctype.decode())

        app.add_url_rule(path, path, view)

    for path, (ctype, body) in ROUTES.items():
        route(path, ctype, body)
    if variant == "empty":
        app.wsgi_app = _EmptyWSGI(app.wsgi_app)  # type: ignore[method-assign]
    elif variant == "look":
        # The least a Flask extension that needs the user before the view (to start work next
        # to it) and the response after it can be, on a request that may be a page: two
        # request hooks that do nothing, but for reading the response's Content-Type.
        def before() -> None:
            return None

        def after(response: Response) -> Response:
            response.headers.get("Content-Type")
            return response

        app.before_request(before)
        app.after_request(after)
    elif variant in ("with", "navonly"):
        from bosh_middleware.flask import BOSHPrebind

        app.config.update({f"BOSH_{k}": v for k, v in _SETTINGS.items()})
        app.config["BOSH_CREDENTIALS"] = _CREDENTIALS
        app.config["BOSH_NAVIGATION_ONLY"] = variant == "navonly"
        BOSHPrebind(app, get_user=lambda: _USER if "REMOTE_USER" in request.environ else _ANON)
    elif variant != "without":
        raise ValueError(variant)
    return _wsgi_auth(app)


# --- Django ----------------------------------------------------------------------------------
def auth_middleware(get_response: Any) -> Any:
    """``request.user`` from the auth layer's ``REMOTE_USER`` (as Django's
    ``RemoteUserMiddleware`` would, without its database)."""

    def middleware(request: Any) -> Any:
        request.user = _USER if "REMOTE_USER" in request.META else _ANON
        return get_response(request)

    return middleware


class LookMiddleware:
    """An empty middleware class that reads the response's Content-Type: the look floor."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        response = self.get_response(request)
        response.get("Content-Type")
        return response


class EmptyMiddleware:
    """The least a Django middleware class can be: the floor rows' one more call."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)


def _django_urls() -> list[Any]:
    from django.http import HttpResponse
    from django.urls import path

    def view(ctype: bytes, body: bytes) -> Any:
        def serve(request: Any) -> HttpResponse:
            return HttpResponse(body, content_type=ctype.decode())

        return serve

    return [path(p.lstrip("/"), view(*ROUTES[p])) for p in ROUTES]


def __getattr__(name: str) -> Any:
    # ROOT_URLCONF is this module: Django reads ``urlpatterns`` here once it is set up (and
    # importing this module for Flask must not import Django)
    if name == "urlpatterns":
        return _django_urls()
    raise AttributeError(name)


def django_app(variant: str) -> Any:
    """``variant``: without | empty | look | with | navonly."""
    from django.conf import settings

    middleware = [f"{__name__}.auth_middleware"]
    extra: dict[str, Any] = {}
    if variant == "empty":
        middleware.append(f"{__name__}.EmptyMiddleware")
    elif variant == "look":
        middleware.append(f"{__name__}.LookMiddleware")
    elif variant in ("with", "navonly"):
        middleware.append("bosh_middleware.django.BOSHPrebindMiddleware")
        extra["BOSH_PREBIND"] = {
            **_SETTINGS,
            "CREDENTIALS": _CREDENTIALS,
            "NAVIGATION_ONLY": variant == "navonly",
        }
    elif variant != "without":
        raise ValueError(variant)
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-only",
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=middleware,
        INSTALLED_APPS=[],
        USE_TZ=True,
        **extra,
    )
    from django.core.wsgi import get_wsgi_application

    return _wsgi_auth(get_wsgi_application())
