"""The values the engine is configured with and the values it hands back."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .credentials import UNSAFE_RESOURCE, page_safe_resource
from .http11 import check_header, redact_url

__all__ = ["PrebindOptions", "PrebindSession"]

# Settings often come from os.environ, as strings: "False" is truthy, "5" is no count, and
# "SCRAM-SHA-256" iterates as 13 mechanisms. Each of these fails only later, quietly or at every
# prebind, so a value of the wrong type is refused when the configuration is built, with the
# setting's name in the message. Nothing is coerced: "False" is refused, not read as False.


def _type_name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {_type_name(value)}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # True is an int, but not a count
        raise TypeError(f"{name} must be an int, not {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value!r}")
    return value


#: The longest timeout (s) taken: a day. Longer ones are mistakes, and from about 25 days on
#: the sockets' waits (``poll`` counts milliseconds in a C int) raise OverflowError.
MAX_TIMEOUT = 86400.0


def check_float(
    name: str, value: Any, *, positive: bool = False, maximum: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number (int or float), not {_type_name(value)}")
    # inf is positive, but overflows the first socket timeout or deadline made of it: every
    # prebind would fail (OverflowError). NaN compares false to everything.
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int no float can hold
        finite = False
    if not finite or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {kind} number, not {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g}, not {value!r}")
    return value


def check_timeout(name: str, value: Any) -> float:
    return check_float(name, value, positive=True, maximum=MAX_TIMEOUT)


def check_str(name: str, value: Any, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a str{' or None' if optional else ''}, not {_type_name(value)}"
        )
    return value


def check_strs(name: str, value: Any, *, length: int | None = None) -> tuple[str, ...]:
    """A sequence of strings as a tuple. With ``length`` (names that come in a fixed number), a
    bare string is refused; without, it is one item, as "/static" is one path prefix."""
    if isinstance(value, str):
        if length is not None:
            raise TypeError(f"{name} must be a sequence of {length} strings, not a string")
        return (value,)
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{name} must be a sequence of strings, not {_type_name(value)}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must hold strings, not {_type_name(item)}")
    if length is not None and len(items) != length:
        raise ValueError(f"{name} must have {length} items, not {len(items)}: {items!r}")
    return items


def check_headers(name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a mapping of header names to values, not {type(value).__name__}"
        )
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            # (the value may be a secret: only its type is shown)
            raise TypeError(f"{name} must map str to str; {key!r} maps to a {type(item).__name__}")
        try:
            check_header(key, item)  # now, not at the first page: every page would fail
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return dict(value)


def redacted_repr(obj: Any, **shown: Callable[[Any], Any]) -> str:
    """``obj``'s dataclass repr, each field named in ``shown`` as its function shows it. The
    settings and sessions end up in debug pages, error reports and logs: a URL's password or
    a secret header must not."""
    parts = []
    for f in dataclasses.fields(obj):
        if f.repr:
            value = getattr(obj, f.name)
            parts.append(f"{f.name}={(shown[f.name](value) if f.name in shown else value)!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True)
class PrebindOptions:
    """How to talk to the BOSH endpoint. The defaults are what browser clients need."""

    #: Longest time (s) the server may hold a request. Strophe and converse.js abort a long poll
    #: after 1.1 x their own wait (about 60 s), so a larger value makes them loop.
    wait: int = 59
    hold: int = 1
    lang: str = "en"
    #: XEP-0124 ``route`` (e.g. ``xmpp:example.org:5222``); rarely needed.
    route: str | None = None
    #: SASL mechanisms allowed, in order of preference; ``None`` = the strongest the server offers.
    mechanisms: Sequence[str] | None = None
    #: PLAIN sends the password itself. It is refused over ``http://`` to anything but loopback
    #: unless this is set.
    allow_insecure_plain: bool = False
    #: Prefix of the per-prebind random resource (``<prefix>-<12 hex>``).
    resource_prefix: str = "web"
    #: Timeout (s) of each HTTP request to the BOSH endpoint.
    timeout: float = 10.0
    #: Largest BOSH response read, in bytes; larger ones are refused unread.
    max_response_size: int = 256 * 1024
    #: Send independent steps together (RID order keeps them in sequence at the server). Only
    #: turn off for a server that mishandles concurrent requests.
    pipeline: bool = True
    #: Send the first SASL message with the session creation request, once an earlier prebind
    #: has seen which mechanisms the server offers: one round trip fewer wherever the server
    #: answers it in the creation response (Prosody does). Tried once per domain elsewhere,
    #: then left off (see ``protocol.ServiceMemory``).
    quickstart: bool = True
    #: Upper bound of requests in flight, further bounded by the server's ``requests`` attribute.
    max_in_flight: int = 2
    #: Empty polls allowed while waiting for stream features or a SASL answer.
    max_polls: int = 4
    #: Extra HTTP headers for every BOSH request (e.g. a shared secret a reverse proxy checks).
    headers: dict[str, str] = field(default_factory=dict)
    #: HTTP client: ``"builtin"`` (lean keep-alive HTTP/1.1, a fraction of httpx's CPU per
    #: request), ``"httpx"`` (proxies, mocking) or ``"auto"``: builtin unless the environment
    #: sets a proxy for the endpoint or the driver is given an httpx client.
    transport: Literal["auto", "builtin", "httpx"] = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = OPTION_CHECKS[f.name](f.name, value)
            if checked is not value:  # (a list of mechanisms as a tuple, headers as a dict copy)
                object.__setattr__(self, f.name, checked)

    def __repr__(self) -> str:
        # ``headers`` is where a shared secret for a reverse proxy goes
        return redacted_repr(self, headers=lambda headers: dict.fromkeys(headers, "***"))


def _check_transport(name: str, value: Any) -> str:
    # A typo ("httpz") must fail when the engine is configured, not at the first prebind.
    if value not in ("auto", "builtin", "httpx"):
        raise ValueError(f"{name} must be 'auto', 'builtin' or 'httpx', not {value!r}")
    return str(value)


def _check_mechanisms(name: str, value: Any) -> tuple[str, ...] | None:
    return None if value is None else check_strs(name, value)


def _check_resource_prefix(name: str, value: Any) -> str | None:
    prefix = check_str(name, value)
    if not page_safe_resource(f"{prefix}-0"):  # (the prebind adds "-" and 12 hex digits)
        raise ValueError(f"{name} {prefix!r} {UNSAFE_RESOURCE}")
    return prefix


#: How each ``PrebindOptions`` field is checked (and normalised): ``(name, value) -> value``.
#: ``MiddlewareConfig.from_mapping`` runs them too, with the setting as the user spelt it.
OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "wait": lambda n, v: check_int(n, v, minimum=0),
    "hold": lambda n, v: check_int(n, v, minimum=0),
    "lang": check_str,
    "route": lambda n, v: check_str(n, v, optional=True),
    "mechanisms": _check_mechanisms,
    "allow_insecure_plain": check_bool,
    "resource_prefix": _check_resource_prefix,
    "timeout": check_timeout,
    "max_response_size": lambda n, v: check_int(n, v, minimum=1),
    "pipeline": check_bool,
    "quickstart": check_bool,
    "max_in_flight": lambda n, v: check_int(n, v, minimum=1),
    "max_polls": lambda n, v: check_int(n, v, minimum=0),
    "headers": check_headers,
    "transport": _check_transport,
}


@dataclass(frozen=True)
class PrebindSession:
    """A live, authenticated, bound BOSH session, ready for ``connection.attach()``.

    ``rid`` is **the RID the browser's next request must carry**: the last RID the prebinder sent
    plus one, with every request already answered. Strophe.js sends ``rid`` as is on its first
    request after ``attach(jid, sid, rid)`` and increments afterwards, so this is exactly the
    value to pass. (Handing out the last RID itself makes the server replay an old response and
    silently drop the browser's first request; last + 2 makes it wait forever.)
    """

    jid: str
    sid: str
    rid: int
    service_url: str
    #: Values the server negotiated; useful to schedule keep-alives or to debug.
    wait: int | None = None
    inactivity: int | None = None
    requests: int | None = None
    mechanism: str | None = None
    #: HTTP round trips and requests the prebind took.
    round_trips: int = 0
    request_count: int = 0
    #: Of them, empty polls for what the server had not said yet (ejabberd may send a login's
    #: stream features or bind result a poll late).
    polls: int = 0
    #: The pipelined attempt reached the server out of order and was redone sequentially.
    retried: bool = False

    def __repr__(self) -> str:
        return redacted_repr(self, service_url=redact_url)

    def as_dict(self) -> dict[str, Any]:
        """The shape converse.js's ``prebind_url`` expects: ``{"jid", "sid", "rid"}``."""
        return {"jid": self.jid, "sid": self.sid, "rid": self.rid}
