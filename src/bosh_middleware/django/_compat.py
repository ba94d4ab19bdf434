"""Version-dependent Django imports (kept in the form django-upgrade can remove later)."""

from __future__ import annotations

from typing import Any

import django

if django.VERSION >= (6, 0):
    from django.middleware.csp import get_nonce as django_csp_nonce
else:

    def django_csp_nonce(request: Any) -> Any:  # type: ignore[misc]
        return None


def csp_nonce(request: Any) -> str | None:
    """The request's CSP nonce from django-csp (``request.csp_nonce``) or Django 6's
    ``ContentSecurityPolicyMiddleware``, generating it if nothing used it yet: we run before
    the CSP middleware writes its header (W002 checks the order)."""
    nonce = getattr(request, "csp_nonce", None)
    if nonce is None:
        nonce = django_csp_nonce(request)
    return str(nonce) if nonce is not None else None
