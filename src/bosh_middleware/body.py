"""Building and parsing BOSH ``<body/>`` wrappers (XEP-0124 / XEP-0206).

Requests are built from string templates: they are tiny, their shape is fixed, and a template is
an order of magnitude cheaper than building a tree. Responses come from an untrusted server, so
they are parsed by lxml as UTF-8 whatever they declare, with entity resolution, DTD loading,
network and file access all off, under a size cap, and any DTD at all is refused (RFC 6120
forbids them in XMPP).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from operator import itemgetter, methodcaller
from typing import TYPE_CHECKING, NoReturn, cast

from lxml import etree

from .errors import ProtocolError, ResponseTooLarge

__all__ = [
    "NS_BIND",
    "NS_CLIENT",
    "NS_HTTPBIND",
    "NS_SASL",
    "NS_SESSION",
    "NS_STREAMS",
    "NS_XBOSH",
    "ParsedBody",
    "create_body",
    "escape",
    "parse_body",
    "request_body",
    "restart_body",
    "terminate_body",
]

NS_HTTPBIND = "http://jabber.org/protocol/httpbind"
NS_XBOSH = "urn:xmpp:xbosh"
NS_CLIENT = "jabber:client"
NS_STREAMS = "http://etherx.jabber.org/streams"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"

_BODY_TAG = f"{{{NS_HTTPBIND}}}body"
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"})


#: Escape text for use in XML character data or a quoted attribute: ``value.translate`` with
#: the five entities, as a C callable (it runs for every request body built, right after a
#: wait, where a Python function call costs microseconds).
escape: Callable[[str], str] = methodcaller("translate", _ESCAPES)


def create_body(
    *,
    rid: int,
    to: str,
    wait: int,
    hold: int,
    lang: str,
    route: str | None = None,
    payload: str = "",
) -> bytes:
    route_attr = f" route='{escape(route)}'" if route else ""
    head = (
        f"<body content='text/xml; charset=utf-8' hold='{hold}' rid='{rid}'{route_attr}"
        f" to='{escape(to)}' ver='1.6' wait='{wait}' xml:lang='{escape(lang)}'"
        f" xmpp:version='1.0' xmlns='{NS_HTTPBIND}' xmlns:xmpp='{NS_XBOSH}'"
    )
    return (f"{head}>{payload}</body>" if payload else f"{head}/>").encode()


def request_body(*, rid: int, sid: str, payload: str = "") -> bytes:
    if not payload:
        return f"<body rid='{rid}' sid='{escape(sid)}' xmlns='{NS_HTTPBIND}'/>".encode()
    return (
        f"<body rid='{rid}' sid='{escape(sid)}' xmlns='{NS_HTTPBIND}'>{payload}</body>"
    ).encode()


def restart_body(*, rid: int, sid: str, to: str, lang: str, payload: str = "") -> bytes:
    head = (
        f"<body rid='{rid}' sid='{escape(sid)}' to='{escape(to)}' xml:lang='{escape(lang)}'"
        f" xmpp:restart='true' xmlns='{NS_HTTPBIND}' xmlns:xmpp='{NS_XBOSH}'"
    )
    return (f"{head}>{payload}</body>" if payload else f"{head}/>").encode()


def terminate_body(*, rid: int, sid: str) -> bytes:
    return (
        f"<body rid='{rid}' sid='{escape(sid)}' type='terminate' xmlns='{NS_HTTPBIND}'>"
        f"<presence type='unavailable' xmlns='{NS_CLIENT}'/></body>"
    ).encode()


class ParsedBody(tuple[etree._Element, list[etree._Element]]):
    """A parsed ``<body/>``: its root and element children, and its attributes read on demand
    (only the session creation response needs them all; the others are asked for ``type`` at
    most).

    A tuple made in C, with its fields read through C getters: one is made for every answer,
    right after a wait, when nothing the process runs is in the caches any more; there a
    class with an ``__init__`` cost 14 us where this costs 7 (on the VM of the benchmarks)."""

    __slots__ = ()

    if TYPE_CHECKING:

        @property
        def root(self) -> etree._Element: ...

        @property
        def children(self) -> list[etree._Element]: ...

    else:
        root = property(itemgetter(0))
        children = property(itemgetter(1))

    @property
    def attrs(self) -> dict[str, str]:
        # (name, value) pairs made in C; lxml gives str for both (its stubs allow bytes)
        return dict(cast("list[tuple[str, str]]", self[0].items()))

    def get(self, name: str) -> str | None:
        return self[0].get(name)

    @property
    def type(self) -> str | None:
        return self[0].get("type")

    @property
    def condition(self) -> str | None:
        return self[0].get("condition")

    def int_attr(self, name: str) -> int | None:
        value = self[0].get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise ProtocolError(f"BOSH attribute {name}={value!r} is not an integer") from None


_new = tuple.__new__


_local = threading.local()


class _RefuseExternal(etree.Resolver):
    """Refuses every external resource the parser asks for. ``load_dtd=False`` and
    ``no_network=True`` do not stop libxml2 from opening a local file named by a DOCTYPE's
    external subset or a parameter entity (a read of any file the web process can read, or a
    hang on a named pipe); this hook is where libxml2 goes for each of them."""

    def resolve(self, system_url: str, public_id: str, context: object = None) -> NoReturn:
        raise ProtocolError(
            f"BOSH response asks for an external resource ({str(system_url)[:80]!r})"
        )


def _parser() -> etree.XMLParser:
    # lxml parser objects must not be shared between threads.
    parser: etree.XMLParser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = etree.XMLParser(
            # XMPP is UTF-8 (RFC 6120 11.6). Fixed here so that a body the server declares in
            # another encoding is malformed rather than decoded: the DTD check in
            # ``parse_body`` looks for ASCII bytes, which a UTF-16 body would not contain.
            encoding="utf-8",
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            huge_tree=False,
            remove_comments=True,
            remove_pis=True,
            collect_ids=False,
        )
        parser.resolvers.add(_RefuseExternal())
        _local.parser = parser
    return parser


#: A namespace declaration in a start tag: its name and its value (in either quotes).
_DECLARATION = re.compile(rb"""\s+(xmlns(?::[\w.-]+)?)\s*=\s*(?:'([^'<]*)'|"([^"<]*)")""")


def _without_repeated_declarations(data: bytes) -> bytes | None:
    """``data`` without the repeats of a namespace declaration that the ``<body>`` start tag
    makes twice with the same value, or None where it makes none. ejabberd (23.01) does so in
    a session creation response that carries a stream error (its ``xmlns:stream`` is added
    again for the error): how it refuses a session at once, as mod_fail2ban does the web
    server's address after too many failed logins. Read as malformed XML, that refusal was
    logged as a broken server, its cause lost; the repeat says nothing the first did not."""
    start = data.find(b"<body")
    end = data.find(b">", start) if start >= 0 else -1
    if end < 0:
        return None
    seen: set[tuple[bytes, bytes]] = set()
    repeats: list[tuple[int, int]] = []
    for m in _DECLARATION.finditer(data, start, end):
        key = (m[1], m[2] if m[2] is not None else m[3])
        if key in seen:
            repeats.append(m.span())
        seen.add(key)
    if not repeats:
        return None
    kept, last = [], 0
    for begin, stop in repeats:
        kept.append(data[last:begin])
        last = stop
    kept.append(data[last:])
    return b"".join(kept)


def parse_body(data: bytes, *, max_size: int) -> ParsedBody:
    """Parse a BOSH response; every way it can be wrong becomes a ``ProtocolError``."""
    if len(data) > max_size:
        raise ResponseTooLarge(f"BOSH response of {len(data)} bytes exceeds {max_size}")
    if not data or data.isspace():  # (not strip(): that would copy the body)
        raise ProtocolError("empty BOSH response")
    if b"<!" in data and (b"<!DOCTYPE" in data or b"<!ENTITY" in data):  # (one scan, usually)
        raise ProtocolError("BOSH response contains a DTD, which XMPP forbids")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        repaired = _without_repeated_declarations(data)
        if repaired is None:
            raise ProtocolError(f"BOSH response is not well-formed XML: {exc}") from None
        try:
            root = etree.fromstring(repaired, _parser())
        except etree.XMLSyntaxError:
            raise ProtocolError(f"BOSH response is not well-formed XML: {exc}") from None
    except ValueError as exc:  # e.g. unicode string with an encoding declaration
        raise ProtocolError(f"BOSH response could not be parsed: {exc}") from None
    if root.tag != _BODY_TAG:
        raise ProtocolError(f"BOSH response root is {str(root.tag)[:80]!r}, not <body/>")
    # root[:] holds only elements: the parser drops comments and PIs, and with no DTD there
    # are no entity nodes (lxml's stubs know no slices)
    return _new(ParsedBody, (root, root[:]))  # type: ignore[index]
