"""What the web app tells us about a user's XMPP account, and helpers to produce it.

The app hands us a ``Credentials`` per user; it never reaches the page. ``repr()`` hides the
secret so that a ``Credentials`` in a traceback, a log line or a debugger does not leak it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Credentials",
    "SharedSecretCredentials",
    "StaticCredentials",
    "derive_password",
    "is_authenticated",
]

log = logging.getLogger("bosh_middleware")

#: XEP-0106 "JID Escaping": the characters a localpart cannot hold, as a backslash and 2 hex digits.
#: The backslash is escaped always (XEP-0106 escapes it only before what reads as an escape), so
#: that no two usernames map to one localpart.
_ESCAPED = " \"&'/:<>@\\"
_ESCAPE = str.maketrans({c: f"\\{ord(c):02x}" for c in _ESCAPED})
_UNESCAPE = {f"{ord(c):02x}": c for c in _ESCAPED}


#: Never in a JID handed to a page: whitespace, controls, quotes, markup, a backtick.
_UNSAFE = r"\s\x00-\x1f\x7f\"'<>&`"
_RESOURCE = re.compile(rf"[^{_UNSAFE}=]+")
#: localpart (may hold "=", never ":" or "/"), domain, resource: one match, a prebind's each time
_JID = re.compile(rf"[^{_UNSAFE}@/:]+@[^{_UNSAFE}@/=]+/[^{_UNSAFE}=]+")


#: Why a resource (or its prefix) is refused, as ``Credentials`` and the settings say it.
UNSAFE_RESOURCE = "holds whitespace, a quote, '<', '>', '&', '=' or '`': no page could carry it"


def page_safe_resource(resource: str) -> bool:
    return _RESOURCE.fullmatch(resource) is not None


def page_safe_jid(jid: str) -> bool:
    """Whether a full JID may go into a page as it is. The page puts it in a script, but a page
    may also put that script where an attribute value was meant to end (the injector does not
    read attribute values): its text must then make no attribute value and no markup. So "="
    only in the localpart, which holds no ":" or "/" (RFC 7622): no "javascript:" URL either."""
    return _JID.fullmatch(jid) is not None


@dataclass(frozen=True)
class Credentials:
    """An XMPP login: a JID and a secret, or an anonymous login on a domain.

    ``resource`` pins the bound resource; leave it ``None`` to get a fresh one per prebind (every
    browser tab needs its own, or tabs knock each other off). A resource in ``jid``
    (``alice@example.org/desk``) is not bound: only ``resource`` pins one, so that a full JID
    an app stores cannot make every tab of its user share (and fight over) one resource.
    """

    jid: str
    password: str | None = field(default=None, repr=False)
    resource: str | None = None
    is_anonymous: bool = False

    def __post_init__(self) -> None:
        # Checked here, not at the first login: PLAIN would send b"pw" as the text "b'pw'",
        # and SCRAM and the JID's parsing raise AttributeError, which names neither field.
        if not isinstance(self.jid, str):
            raise TypeError(f"Credentials jid must be a str, not {type(self.jid).__name__}")
        if not isinstance(self.password, (str, type(None))):
            # (its type only: the value is the secret)
            raise TypeError(
                f"Credentials password must be a str or None, not {type(self.password).__name__}"
            )
        if not isinstance(self.resource, (str, type(None))):
            raise TypeError(
                f"Credentials resource must be a str or None, not {type(self.resource).__name__}"
            )
        if self.is_anonymous:
            if not self.jid or "@" in self.jid or "/" in self.jid:
                raise ValueError(f"anonymous credentials take a bare domain, not {self.jid!r}")
        else:
            local, at, domain = self.jid.split("/", 1)[0].rpartition("@")
            if not (at and local and domain):
                raise ValueError(f"not a user JID: {self.jid!r}")
            if not self.password:
                raise ValueError("credentials need a password (or use Credentials.anonymous)")
        if self.resource is not None and not page_safe_resource(self.resource):
            raise ValueError(f"resource {self.resource!r} is empty or {UNSAFE_RESOURCE}")

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


def _usernames(user: Any) -> Iterator[str]:
    """What the user's login name is read from (Django's ``get_username()``, Flask-Login's and
    Starlette's ``username``, Starlette's ``identity``; the user itself, if it is a string),
    where it holds a string, in that order."""
    for attr in ("get_username", "username", "identity"):
        try:
            value = getattr(user, attr, None)
            if callable(value):
                value = value()
        except NotImplementedError:  # Starlette's BaseUser.identity, not overridden
            continue
        if isinstance(value, str):
            yield value
    if isinstance(user, str):
        yield user


#: User types the default lookup found no username on, already reported (once per type: the
#: same class answers the same way on every page).
_nameless_types: set[type] = set()


def is_authenticated(user: Any) -> bool:
    """Whether the app calls ``user`` logged in, as every adapter decides it (and, here, the
    default username lookup): its ``is_authenticated`` (an attribute or, older Django and
    custom classes, a method) if it has one, else its truth (a ``REMOTE_USER`` string)."""
    flag = getattr(user, "is_authenticated", None)
    if flag is True or flag is False:  # (Django's, Starlette's and Flask-Login's users: no call)
        return flag
    if flag is None:  # (None itself too)
        return bool(user)
    return bool(flag() if callable(flag) else flag)


def _default_username(user: Any) -> str | None:
    """The user's login name: one per user, which is what maps to an XMPP account (never a
    display name, which two users may share); an empty one is none.

    A user the app calls logged in whose class has no such attribute at all never gets a
    session, and a ``UserMixin`` with only ``id`` and ``email`` is easy to write: that is said
    once per class. Not for a logged-out user (Django's ``AnonymousUser``, Starlette's
    ``UnauthenticatedUser``), nor for an empty name, which is how such users have none. A
    ``username=`` callable that answers None means it."""
    empty = False
    for name in _usernames(user):  # (lazily: the first name found is the user's)
        if name:
            return name
        empty = True
    if not empty and type(user) not in _nameless_types and is_authenticated(user):
        _nameless_types.add(type(user))
        log.warning(
            "no XMPP session for users of type %s: they have no username (get_username(), "
            "username or identity); pass username= to the credentials helper",
            type(user).__qualname__,
        )
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
        username: Callable[[Any], str | None] = _default_username,
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


def _refusal(name: str) -> str | None:
    """Why ``name`` cannot be turned into a localpart, or ``None`` if it can.

    XEP-0106 cannot escape leading or trailing spaces (and a server would strip or refuse them),
    and no XMPP server takes control characters; lone surrogates cannot even be encoded.
    """
    if not name:
        return "it is empty"
    if name != name.strip():
        return "it starts or ends with whitespace"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        return "it contains control characters"
    return None


def escape_localpart(username: str) -> str:
    """The XMPP localpart ``SharedSecretCredentials`` uses for ``username``.

    Lower-cased (localparts are case-insensitive), then XEP-0106-escaped, so that ``@``, ``/``
    and the like stay part of the localpart instead of making the JID someone else's:
    ``"Alice Smith"`` -> ``"alice\\20smith"``, ``"bob@example.com"`` -> ``"bob\\40example.com"``.
    Raises ``ValueError`` for a name no localpart can stand for (empty, surrounding whitespace,
    control characters).
    """
    reason = _refusal(username)
    if reason is not None:
        raise ValueError(f"no XMPP localpart for this username: {reason}")
    return _escape(username)


def _escape(username: str) -> str:
    """``escape_localpart`` for a username ``_refusal`` has passed."""
    return username.lower().translate(_ESCAPE)


def is_bare_domain(domain: str) -> bool:
    """Whether ``domain`` can end a JID ``SharedSecretCredentials`` builds: not empty, and
    nothing that would make the JID another's or give it a resource (``@``, ``/``, a space, a
    backslash)."""
    return bool(domain) and not any(c in domain for c in "@/ \\")


def unescape_localpart(localpart: str) -> str:
    """The (lower-cased) username whose ``escape_localpart`` is ``localpart``.

    Raises ``ValueError`` if ``escape_localpart`` never produces ``localpart`` (an unescaped
    ``@``, ``/`` or space, a backslash that is not one of its escapes ...): a password derived
    for such a JID would belong to no web user.
    """
    out: list[str] = []
    i = 0
    while i < len(localpart):
        c = localpart[i]
        if c == "\\":
            code = localpart[i + 1 : i + 3].lower()
            if code not in _UNESCAPE:
                raise ValueError("a backslash must start an escape (\\5c for a backslash)")
            out.append(_UNESCAPE[code])
            i += 3
            continue
        if c in _ESCAPED:
            raise ValueError(f"{c!r} must be escaped as \\{ord(c):02x}")
        out.append(c)
        i += 1
    username = "".join(out).lower()
    reason = _refusal(username)
    if reason is not None:
        raise ValueError(f"no username maps to it: unescaped, {reason}")
    return username


def derive_password(secret: str | bytes, jid: str) -> str:
    """The XMPP password ``SharedSecretCredentials`` uses for ``jid``.

    ``jid`` is the JID as ``SharedSecretCredentials`` builds it, localpart escaped
    (``escape_localpart``). Provision accounts with it (``bosh-middleware derive-password``), or
    let an XMPP server auth module compute the same: HMAC-SHA256 over the lower-cased bare JID,
    as URL-safe base64 without the "=" padding (the README spells it out); either way the web
    app stores no XMPP passwords.
    """
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.digest(key, jid.split("/", 1)[0].lower().encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class SharedSecretCredentials:
    """Per-user XMPP passwords derived as HMAC-SHA256(secret, bare JID).

    The JID is ``<localpart>@<domain>``, the localpart being the username taken from the user
    object (or from ``username=`` if given) as ``escape_localpart`` makes it:

    * lower-cased, because XMPP localparts are case-insensitive: usernames that differ only in
      case (``Alice``, ``alice``) share one XMPP account. Keep usernames unique regardless of
      case (Django's ``UserCreationForm`` does since 4.2), or pass a ``username=`` that is;
    * XEP-0106-escaped (``\\20`` for a space, ``\\40`` for ``@``, ``\\2f`` for ``/``, ``\\5c``
      for a backslash ...), so that no username reads as another user's JID
      (``alice@example.org/x`` would otherwise log in as ``alice``). Accounts provisioned
      outside must use the same escaped JID (``bosh-middleware derive-password`` refuses one it
      is not).

    A username that cannot be a localpart (surrounding whitespace, control characters, or an
    empty one from ``username=``) gets no session, and a warning on the ``bosh_middleware``
    logger; a user with no username (the default lookup skips empty ones, as anonymous users
    have) gets none without it. The secret lives in the app's settings, never in a page.
    """

    def __init__(
        self,
        secret: str | bytes,
        domain: str,
        *,
        username: Callable[[Any], str | None] = _default_username,
    ) -> None:
        # Checked here, not at the first page: a secret of another type (pydantic's SecretStr,
        # a number from a settings file) made every page's derivation raise, and no one a session.
        if not isinstance(secret, (str, bytes, bytearray)):  # (its type only: not the secret)
            raise TypeError(
                "SharedSecretCredentials secret must be a str or bytes, not "
                f"{type(secret).__name__}"
            )
        if not secret:
            raise ValueError("SharedSecretCredentials needs a non-empty secret")
        # The domain is the operator's, but a typo such as "example.org/x" would make every JID
        # end in a resource: refuse it here rather than derive passwords for odd JIDs.
        if not isinstance(domain, str) or not is_bare_domain(domain):
            raise ValueError(f"SharedSecretCredentials needs a bare XMPP domain, not {domain!r}")
        self._secret = secret
        self._domain = domain
        self._username = username

    def __repr__(self) -> str:
        return f"<SharedSecretCredentials domain={self._domain!r}>"

    def __call__(self, user: Any) -> Credentials | None:
        name = self._username(user)
        if name is None:
            return None
        reason = _refusal(name) if isinstance(name, str) else "it is not a string"
        if reason is not None:
            # repr() keeps control characters out of the log line; nothing secret is in it.
            log.warning(
                "SharedSecretCredentials: no XMPP session for username %.80r: %s", name, reason
            )
            return None
        jid = f"{_escape(name)}@{self._domain}"
        return Credentials(jid=jid, password=derive_password(self._secret, jid))
