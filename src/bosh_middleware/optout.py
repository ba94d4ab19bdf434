"""A view's word that its page carries no session: ``no_prebind(request)``.

The middleware decides from the request and the response's start, but only the view knows
some pages must not carry one. The one that matters most is a logout page: Starlette's
``scope["user"]`` (and plain ASGI/WSGI's user) was read before the view ran, so a page that
says "you are logged out" would otherwise carry a live session of the user who just left.
(Django and Flask read the user again after the view and need no help there.)

The word is a key in the request's own mapping, which the view and the middleware share: the
ASGI scope, the WSGI environ, Django's ``request.META``.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["NO_PREBIND", "no_prebind", "opted_out"]

#: The key ``no_prebind`` sets (dotted, as PEP 3333 asks of keys a middleware adds to the
#: environ).
NO_PREBIND = "bosh_middleware.no_prebind"


def _mapping(request: Any) -> MutableMapping[str, Any]:
    if isinstance(request, MutableMapping):  # an ASGI scope, a WSGI environ
        return request
    # Django's HttpRequest (META: the environ under WSGI, its own dict under ASGI), then
    # Starlette's Request (scope), then Werkzeug's and so Flask's request (environ).
    for name in ("META", "scope", "environ"):
        found = getattr(request, name, None)
        if isinstance(found, MutableMapping):
            return found
    raise TypeError(
        "no_prebind() takes the view's request (Django, Flask, Starlette), an ASGI scope or"
        f" a WSGI environ, not {type(request).__name__}"
    )


def no_prebind(request: Any) -> None:
    """Serve this response without a session. Called from the view (or anything that runs
    before the response starts); a prebind the middleware started next to the view is ended
    unused, so the XMPP server sees a login and its logout at once, and nothing lingers.

    For a page that cannot carry a session on purpose, ``EXCLUDE_PATHS`` costs nothing at
    all; this is for what only the view knows, such as a page that logs the user out."""
    _mapping(request)[NO_PREBIND] = True


def opted_out(mapping: Mapping[str, Any]) -> bool:
    """Whether the view called ``no_prebind`` on the request behind ``mapping``."""
    return mapping.get(NO_PREBIND) is True
