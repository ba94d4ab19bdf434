"""The values the engine is configured with and the values it hands back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["PrebindOptions", "PrebindSession"]


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
        # A typo ("httpz") must fail when the engine is configured, not at the first prebind.
        if self.transport not in ("auto", "builtin", "httpx"):
            raise ValueError(
                f"transport must be 'auto', 'builtin' or 'httpx', not {self.transport!r}"
            )


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
    #: The pipelined attempt reached the server out of order and was redone sequentially.
    retried: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The shape converse.js's ``prebind_url`` expects: ``{"jid", "sid", "rid"}``."""
        return {"jid": self.jid, "sid": self.sid, "rid": self.rid}
