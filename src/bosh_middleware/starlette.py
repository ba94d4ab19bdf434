"""Starlette / FastAPI:
``app.add_middleware(BOSHPrebindMiddleware, service_url=..., credentials=...)``.

The user is ``scope["user"]`` as set by Starlette's ``AuthenticationMiddleware``. ``add_middleware``
prepends, so add this one *before* ``AuthenticationMiddleware`` in code (or list it after it in
``middleware=[...]``): authentication must wrap it. Without a ``scope["user"]`` nobody is
authenticated, and the first such request logs a warning about the order. A CSP nonce is read from
``request.state.csp_nonce`` (``scope["state"]["csp_nonce"]``).
"""

from __future__ import annotations

from typing import Any

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in the no-framework env
    raise ImportError(
        "bosh_middleware.starlette needs Starlette: pip install 'bosh-middleware[starlette]'"
    ) from exc

from . import asgi
from .core import log

__all__ = ["BOSHPrebindMiddleware"]


class BOSHPrebindMiddleware(asgi.BOSHPrebindMiddleware):
    """The ASGI middleware, reading Starlette's ``scope["user"]`` (without ``request.user``'s
    assertion when authentication is missing: then nobody is authenticated)."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        self._warned = False
        kwargs.setdefault("get_nonce", asgi.scope_nonce)
        super().__init__(app, **kwargs)

    def _authenticated(self, user: Any, scope: asgi.Scope) -> bool:
        # (only requests whose user is no plain True/False get here: never Starlette's own)
        if user is None and not self._warned and "user" not in scope:
            self._warned = True
            log.warning(
                "BOSHPrebindMiddleware sees no scope['user']: AuthenticationMiddleware must wrap "
                "it (call app.add_middleware(BOSHPrebindMiddleware, ...) before "
                "app.add_middleware(AuthenticationMiddleware, ...)); no session is prebound"
            )
        return super()._authenticated(user, scope)
