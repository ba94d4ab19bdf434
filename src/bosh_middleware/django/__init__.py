"""Django: prebind an XMPP BOSH session for authenticated users' HTML pages.

    INSTALLED_APPS = [..., "bosh_middleware.django"]        # system checks (optional)
    MIDDLEWARE = [
        ...,
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "csp.middleware.CSPMiddleware",                     # if any: before this one
        "bosh_middleware.django.BOSHPrebindMiddleware",     # after auth/CSP, after GZip
        ...,
    ]
    BOSH_PREBIND = {
        "SERVICE_URL": "http://127.0.0.1:5280/http-bind",
        "CREDENTIALS": "myproject.xmpp.credentials",      # (user) -> Credentials | None
    }

``BOSH_PREBIND`` takes the keys of ``MiddlewareConfig`` and ``PrebindOptions``, upper-case by
convention but read in any case, plus ``ENABLED`` (``True`` or ``False``, default ``True``).
``CREDENTIALS`` is a dotted path or a callable, sync or async; a sync one runs through
``sync_to_async`` under ASGI, so it may use the ORM. Without ``BOSH_PREBIND`` the middleware
does nothing, and says so once on the ``bosh_middleware`` logger; ``ENABLED: False`` is quiet.
"""

from __future__ import annotations

try:
    import django  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in the no-framework env
    raise ImportError(
        "bosh_middleware.django needs Django: pip install 'bosh-middleware[django]'"
    ) from exc

from .middleware import BOSHPrebindMiddleware, load_config

__all__ = ["BOSHPrebindMiddleware", "load_config"]
