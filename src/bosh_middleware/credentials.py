"""What the web app tells us about a user's XMPP account, and helpers to produce it.

The app hands us a ``Credentials`` per user; it never reaches the page. ``repr()`` hides the
secret so that a ``Credentials`` in a traceback, a log line or a debugger does not leak it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Credentials", "SharedSecretCredentials", "StaticCredentials", "derive_password"]


@dataclass(frozen=True)
class Credentials:
    """An XMPP login: a JID and a secret, or an anonymous login on a domain.

    ``resource`` pins the bound resource; leave it ``None`` to get a fresh one per prebind (every
    browser tab needs its own, or tabs knock each other off).
    """

    jid: str
    password: str | None = field(default=None, repr=False)
    resource: str | None = None
    is_anonymous: bool = False

    def __post_init__(self) -> None:
        if self.is_anonymous:
            if "@" in self.jid or "/" in self.jid:
                raise ValueError("anonymous credentials take a bare domain, not a JID")
        else:
            if "@" not in self.jid.split("/", 1)[0]:
                raise ValueError(f"not a user JID: {self.jid!r}")
            if not self.password:
                raise ValueError("credentials need a password (or use Credentials.anonymous)")

    @classmethod
    def anonymous(cls, domain: str) -> Credentials:
        """SASL ANONYMOUS on ``domain``: the server invents the JID."""
        return cls(jid=domain, is_anonymous=True)

    @property
    def domain(self) -> str:
        bare = self.jid.split("/", 1)[0]
        return bare.rsplit("@", 1)[-1]

    @property
    def localpart(self) -> str:
        bare = self.jid.split("/", 1)[0]
        return bare.rsplit("@", 1)[0] if "@" in bare else ""

    @property
    def user_key(self) -> str:
        """Who this login is for, safe to log."""
        return f"anonymous@{self.domain}" if self.is_anonymous else self.jid.split("/", 1)[0]


def _username_of(user: Any) -> str | None:
    for attr in ("get_username", "username", "identity", "display_name"):
        value = getattr(user, attr, None)
        if callable(value):
            value = value()
        if isinstance(value, str) and value:
            return value
    if isinstance(user, str) and user:
        return user
    return None


class StaticCredentials:
    """A fixed map from the app's username to an XMPP ``(jid, password)``: for demos and tests.

    ``StaticCredentials({"alice": ("alice@example.org", "secret")})`` is a valid ``credentials``
    callable for every adapter.
    """

    def __init__(
        self,
        accounts: Mapping[str, tuple[str, str]],
        *,
        username: Callable[[Any], str | None] = _username_of,
    ) -> None:
        self._accounts = dict(accounts)
        self._username = username

    def __repr__(self) -> str:
        return f"<StaticCredentials users={sorted(self._accounts)!r}>"

    def __call__(self, user: Any) -> Credentials | None:
        name = self._username(user)
        account = self._accounts.get(name) if name else None
        if account is None:
            return None
        return Credentials(jid=account[0], password=account[1])


def derive_password(secret: str | bytes, jid: str) -> str:
    """The XMPP password ``SharedSecretCredentials`` uses for ``jid``.

    Provision accounts with it (``bosh-middleware derive-password``), or let an XMPP server
    auth module compute the same HMAC; either way the web app stores no XMPP passwords.
    """
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.digest(key, jid.split("/", 1)[0].lower().encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class SharedSecretCredentials:
    """Per-user XMPP passwords derived as HMAC-SHA256(secret, bare JID).

    The JID is ``<username>@<domain>``, with the username taken from the user object (or from
    ``username=`` if given). The secret lives in the app's settings, never in a page.
    """

    def __init__(
        self,
        secret: str | bytes,
        domain: str,
        *,
        username: Callable[[Any], str | None] = _username_of,
    ) -> None:
        if not secret:
            raise ValueError("SharedSecretCredentials needs a non-empty secret")
        self._secret = secret
        self._domain = domain
        self._username = username

    def __repr__(self) -> str:
        return f"<SharedSecretCredentials domain={self._domain!r}>"

    def __call__(self, user: Any) -> Credentials | None:
        name = self._username(user)
        if not name:
            return None
        jid = f"{name.lower()}@{self._domain}"
        return Credentials(jid=jid, password=derive_password(self._secret, jid))
