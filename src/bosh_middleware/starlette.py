"""Starlette / FastAPI:
``app.add_middleware(BOSHPrebindMiddleware, service_url=..., credentials=...)``.

The user is ``scope["user"]`` as set by Starlette's ``AuthenticationMiddleware``. ``add_middleware``
prepends, so add this one *before* ``AuthenticationMiddleware`` in code (or list it after it in
``middleware=[...]``): authentication should wrap it. Added the other way round (the README's
line in an app that lists its middleware in ``Starlette(middleware=[...])``), pages still get
a session: the user, which ``AuthenticationMiddleware`` sets in the same scope, is read once
the response starts. But the prebind can then only start after the view, not next to it, and
the JSON endpoint, which answers before any inner middleware runs, finds nobody; the first
such request logs a warning about the order. A CSP nonce is read from
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
        if user is None and "user" not in scope:
            if not self._warned:
                self._warned = True
                log.warning(
                    "BOSHPrebindMiddleware sees no scope['user']: AuthenticationMiddleware is "
                    "inside it, or missing. Pages get a session once the response starts, but "
                    "the prebind cannot overlap the view and the JSON endpoint finds nobody: "
                    "call app.add_middleware(BOSHPrebindMiddleware, ...) before "
                    "app.add_middleware(AuthenticationMiddleware, ...), or list it after it "
                    "in middleware=[...]"
                )
            return True  # (read once the response starts: see the base class's hook)
        return super()._authenticated(user, scope)
