"""System checks: ``bosh_prebind.E001`` (settings), ``W002`` and ``W003`` (MIDDLEWARE order)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .middleware import BOSHPrebindMiddleware, load_config

# Response processing runs bottom-up: these must be listed before (above) the middleware.
_OUTER = (
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "csp.middleware.CSPMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
)
_GZIP = "django.middleware.gzip.GZipMiddleware"
_SELF = "bosh_middleware.django.BOSHPrebindMiddleware"


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    values = getattr(settings, "BOSH_PREBIND", None)
    hint = (
        'e.g. BOSH_PREBIND = {"SERVICE_URL": "https://xmpp.example.org/http-bind", '
        '"CREDENTIALS": "myproject.xmpp.credentials"}'
    )
    if values is None:
        return [checks.Error("BOSH_PREBIND is not set.", hint=hint, id="bosh_prebind.E001")]
    if not values.get("ENABLED", True):
        return []
    problem = None
    if not values.get("SERVICE_URL"):
        problem = "BOSH_PREBIND has no SERVICE_URL."
    elif values.get("CREDENTIALS") is None:
        problem = "BOSH_PREBIND has no CREDENTIALS."
    else:
        try:
            load_config(values)
        except ImproperlyConfigured as exc:
            problem = str(exc)
    return [checks.Error(problem, hint=hint, id="bosh_prebind.E001")] if problem else []


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
                    f"{_SELF} is listed before {outer}: it cannot see the user or add a CSP nonce.",
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
