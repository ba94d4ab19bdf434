"""Typed errors a caller can act on.

The split matters to the middleware: ``ServiceUnavailable`` means "the XMPP server is down or
sick" (count it towards the circuit breaker, serve the page without a session), while
``AuthenticationFailed`` means "this user's login was refused" (log it, but the server is fine).
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "BOSHError",
    "ConfigurationError",
    "MechanismUnavailable",
    "ProtocolError",
    "ResponseTooLarge",
    "ServiceUnavailable",
]


class BOSHError(Exception):
    """Base class of everything the engine raises on purpose."""

    #: The transport's: the answers (status, body) of a pipeline that came, in order, before
    #: it failed. The server has acted on those requests (a SASL failure in one is the
    #: prebind's outcome, not a reason to log in again).
    answers: tuple[tuple[int, bytes], ...] = ()

    def __init__(self, message: str, *, condition: str | None = None) -> None:
        super().__init__(message)
        #: A machine-readable cause: a SASL condition (``not-authorized``), a BOSH terminate
        #: condition (``host-unknown``), ``timeout``, ``http-503``, ``connection-refused`` ...
        self.condition = condition


class ServiceUnavailable(BOSHError):
    """The BOSH endpoint could not be used: HTTP error, refused connection, timeout, or the
    server ended the session (``type="terminate"``)."""


class AuthenticationFailed(BOSHError):
    """The server refused the login; ``condition`` is the SASL failure condition."""


class MechanismUnavailable(AuthenticationFailed):
    """No SASL mechanism that is both offered and allowed by the configuration."""


class ProtocolError(BOSHError):
    """The server said something the protocol does not allow (bad XML, wrong element, a wrong
    SCRAM server signature ...)."""


class ResponseTooLarge(ProtocolError):
    """A response exceeded the configured size limit; it was not read to the end."""


class ConfigurationError(BOSHError, ValueError):
    """The caller asked for something unsafe or impossible (e.g. PLAIN over plain HTTP)."""
