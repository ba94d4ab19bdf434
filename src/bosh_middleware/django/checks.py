"""System checks: ``bosh_prebind.E001`` (settings), ``W002`` and ``W003`` (MIDDLEWARE order)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .middleware import _SELF, BOSHPrebindMiddleware, MissingSetting, load_config

# Response processing runs bottom-up: these must be listed before (above) the middleware.
# What goes wrong when one is listed after ours, checked by tests/django_app/test_checks.py.
_NO_USER = (
    "request.user is not set yet when it runs, so a page's prebind starts only after the view "
    "instead of alongside it (the page waits for the whole XMPP login), and its JSON endpoint "
    "(ENDPOINT_PATH) answers everyone 401 (not authenticated)."
)
_OUTER = {
    "django.contrib.sessions.middleware.SessionMiddleware": _NO_USER,
    "django.contrib.auth.middleware.AuthenticationMiddleware": _NO_USER,
    # (sets request.user from the web server's REMOTE_USER; PersistentRemoteUserMiddleware,
    # its subclass, too)
    "django.contrib.auth.middleware.RemoteUserMiddleware": _NO_USER,
    "csp.middleware.CSPMiddleware": (
        "the CSP header is written before it asks for a nonce for its script, so django-csp "
        "refuses one (CSPNonceError) for every page whose view used no nonce, and such pages "
        "go out without a session."
    ),
    "django.middleware.csp.ContentSecurityPolicyMiddleware": (
        "the CSP header is written before it asks for a nonce for its script, so a prebound "
        "page whose view used no nonce gets a header without it: browsers block the script."
    ),
}
_GZIP = "django.middleware.gzip.GZipMiddleware"
#: For a missing setting only: with any other mistake, the message says what to change.
_EXAMPLE = (
    'e.g. BOSH_PREBIND = {"SERVICE_URL": "https://xmpp.example.org/http-bind", '
    '"CREDENTIALS": "myproject.xmpp.credentials"}'
)


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``load_config``'s verdict, so that the check and the middleware cannot disagree."""
    values = getattr(settings, "BOSH_PREBIND", None)
    if values is None:
        return [checks.Error("BOSH_PREBIND is not set.", hint=_EXAMPLE, id="bosh_prebind.E001")]
    try:
        load_config(values)
    except MissingSetting as exc:
        return [checks.Error(str(exc), hint=_EXAMPLE, id="bosh_prebind.E001")]
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="bosh_prebind.E001")]
    return []


def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    middleware = list(settings.MIDDLEWARE)
    ours = [i for i, path in enumerate(middleware) if _is(path, _SELF, BOSHPrebindMiddleware)]
    if not ours:
        return []
    here = ours[0]
    messages: list[checks.CheckMessage] = []
    for i, path in enumerate(middleware[here + 1 :], here + 1):
        outer = next((name for name in _OUTER if _is(path, name)), None)
        if outer is not None:
            messages.append(
                checks.Warning(
                    f"{_SELF} is listed before {outer}: {_OUTER[outer]}",
                    hint=f"Move it below {middleware[i]} in MIDDLEWARE.",
                    id="bosh_prebind.W002",
                )
            )
        elif _is(path, _GZIP):
            messages.append(
                checks.Warning(
                    f"{_SELF} is listed before {_GZIP}: pages are compressed before the session "
                    "can be injected, so they never get one.",
                    hint=f"Move {middleware[i]} above it in MIDDLEWARE.",
                    id="bosh_prebind.W003",
                )
            )
    return messages


def _is(path: str, dotted: str, cls: type | None = None) -> bool:
    """``path`` names ``dotted`` or a subclass of it (without failing on either's import)."""
    if path == dotted:
        return True
    try:
        imported = import_string(path)
        target = cls or import_string(dotted)
    except ImportError:
        return False
    return isinstance(imported, type) and issubclass(imported, target)
