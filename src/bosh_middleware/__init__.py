"""Prebind XMPP BOSH sessions server-side and hand ``(jid, sid, rid)`` to the browser.

The core imports no web framework; the adapters live in ``bosh_middleware.asgi``, ``.wsgi``,
``.starlette``, ``.django`` and ``.flask``.
"""

from __future__ import annotations

from .client import AsyncPrebinder, Prebinder, aprebind, prebind
from .credentials import Credentials, SharedSecretCredentials, StaticCredentials, derive_password
from .errors import (
    AuthenticationFailed,
    BOSHError,
    ConfigurationError,
    MechanismUnavailable,
    ProtocolError,
    ResponseTooLarge,
    ServiceUnavailable,
)
from .optout import no_prebind
from .session import PrebindOptions, PrebindSession

__version__ = "0.1.0"

__all__ = [
    "AsyncPrebinder",
    "AuthenticationFailed",
    "BOSHError",
    "ConfigurationError",
    "Credentials",
    "MechanismUnavailable",
    "PrebindOptions",
    "PrebindSession",
    "Prebinder",
    "ProtocolError",
    "ResponseTooLarge",
    "ServiceUnavailable",
    "SharedSecretCredentials",
    "StaticCredentials",
    "aprebind",
    "derive_password",
    "no_prebind",
    "prebind",
]
