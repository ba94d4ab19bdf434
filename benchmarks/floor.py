"""The floor: the engine's wire exchange with as few Python operations as a working client can
do it in, for the CPU section to say how far above it the engine is.

Same requests as the engine sends for a warm SCRAM prebind against Prosody (quickstart:
create with client-first in it | client-final + restart with the bind in it, those two
pipelined; all on one keep-alive connection), and the same C work: lxml parses each answer,
``hmac`` computes the proof, the salted password is cached. What it leaves out is everything a
library needs and a measurement of the floor does not: a pool, locks, fork and staleness
checks, deadlines across steps, HTTP framing other than one Content-Length, size caps, error
conditions, logging, mechanism choice, the flow/driver split. It still checks the server's
signature and the bind result, and its sessions are checked live like the others. Not for use
anywhere else.

``FloorIOPrebinder`` is the shipped engine (its flows, SCRAM, XML checks and driver loop)
over the floor's I/O instead of ``http11``: the same one-Content-Length read, on one socket
(an ordered batch pipelined on it), and a second for the concurrent restart + bind of a
prebind that is not warm yet. Between the floor and the engine, it says which half of the
difference is the transport (pool, deadlines, strict HTTP framing) and which the protocol
layers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import socket
import time
from urllib.parse import urlsplit

from lxml import etree

from bosh_middleware import Prebinder, PrebindSession
from bosh_middleware.protocol import BOSHRequest, BOSHResponse
from bosh_middleware.scram import salted_password

__all__ = ["FloorIOPrebinder", "FloorPrebinder"]

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)
_BOSH = "xmlns='http://jabber.org/protocol/httpbind'"
_NS = "{urn:ietf:params:xml:ns:xmpp-sasl}"
_BIND = "{urn:ietf:params:xml:ns:xmpp-bind}"
_JID = f"{{jabber:client}}iq/{_BIND}bind/{_BIND}jid"


def _origin(service_url: str) -> tuple[tuple[str, int], bytes]:
    """(host, port), and each request's head up to its Content-Length."""
    u = urlsplit(service_url)
    prefix = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: text/xml; charset=utf-8\r\n"
    ).encode()
    return (u.hostname or "127.0.0.1", u.port or 80), prefix


def _connect(addr: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(addr, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_body(sock: socket.socket, data: bytes = b"") -> tuple[bytes, bytes]:
    """One answer's body, and the bytes after it (the next pipelined answer's): HTTP/1.1 200
    with a Content-Length, nothing else handled. ``data``: what came of it already."""
    if b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    match = _LENGTH.search(head)
    if match is None or not head.startswith(b"HTTP/1.1 200 "):
        raise ConnectionError(head[:200])
    length = int(match[1])
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed")
        body += more
    return body[:length], body[length:]


class FloorPrebinder:
    def __init__(self, service_url: str, mechanism: str = "SCRAM-SHA-1") -> None:
        if mechanism not in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
            raise ValueError(mechanism)
        self.url = service_url
        self.mechanism = mechanism
        self._hash = "sha1" if mechanism == "SCRAM-SHA-1" else "sha256"
        self._addr, self._prefix = _origin(service_url)
        self._sock = _connect(self._addr)
        self._keys: dict[tuple[str, bytes, int], tuple[bytes, bytes]] = {}

    def close(self) -> None:
        self._sock.close()

    def _round_trip(self, *bodies: str) -> list[etree._Element]:
        """POST the bodies back to back (HTTP/1.1 pipelining) and parse their answers."""
        request = b""
        for body in bodies:
            data = body.encode()
            request += b"%sContent-Length: %d\r\n\r\n%s" % (self._prefix, len(data), data)
        self._sock.sendall(request)
        roots, rest = [], b""
        for _ in bodies:
            answer, rest = _read_body(self._sock, rest)
            roots.append(etree.fromstring(answer, _PARSER))
        return roots

    def prebind(self, jid: str, password: str) -> PrebindSession:
        user, _, domain = jid.partition("@")
        rid = 2**32 + secrets.randbits(44)
        nonce = secrets.token_urlsafe(18)
        first_bare = f"n={user},r={nonce}".encode()
        first = base64.b64encode(b"n,," + first_bare).decode()
        (root,) = self._round_trip(
            f"<body content='text/xml; charset=utf-8' hold='1' rid='{rid}' to='{domain}'"
            f" ver='1.6' wait='60' xml:lang='en' xmpp:version='1.0' {_BOSH}"
            f" xmlns:xmpp='urn:xmpp:xbosh'><auth xmlns='{_NS[1:-1]}'"
            f" mechanism='{self.mechanism}'>{first}</auth></body>"
        )
        sid = root.get("sid")
        challenge = root.find(_NS + "challenge")
        if challenge is None:
            raise ConnectionError("no challenge in the creation response")
        server_first = base64.b64decode(challenge.text or "")
        attrs = dict(part.split(b"=", 1) for part in server_first.split(b","))
        if not attrs[b"r"].startswith(nonce.encode()):
            raise ConnectionError("nonce")
        salt, iterations = base64.b64decode(attrs[b"s"]), int(attrs[b"i"])
        keys = self._keys.get((password, salt, iterations))
        if keys is None:
            salted = salted_password(self._hash, password.encode(), salt, iterations)
            keys = self._keys[(password, salt, iterations)] = (
                hmac.digest(salted, b"Client Key", self._hash),
                hmac.digest(salted, b"Server Key", self._hash),
            )
        client_key, server_key = keys
        without_proof = b"c=biws,r=" + attrs[b"r"]
        message = first_bare + b"," + server_first + b"," + without_proof
        signature = hmac.digest(hashlib.new(self._hash, client_key).digest(), message, self._hash)
        proof = (int.from_bytes(client_key) ^ int.from_bytes(signature)).to_bytes(len(signature))
        final = base64.b64encode(without_proof + b",p=" + base64.b64encode(proof)).decode()
        root, restarted = self._round_trip(
            f"<body rid='{rid + 1}' sid='{sid}' {_BOSH}>"
            f"<response xmlns='{_NS[1:-1]}'>{final}</response></body>",
            f"<body rid='{rid + 2}' sid='{sid}' to='{domain}' xml:lang='en' xmpp:restart='true'"
            f" {_BOSH} xmlns:xmpp='urn:xmpp:xbosh'><iq id='bind_1' type='set'"
            " xmlns='jabber:client'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<resource>floor-{secrets.token_hex(6)}</resource></bind></iq></body>",
        )
        verifier = base64.b64decode(root[0].text or "")
        expected = b"v=" + base64.b64encode(hmac.digest(server_key, message, self._hash))
        if root[0].tag != _NS + "success" or not hmac.compare_digest(verifier, expected):
            raise ConnectionError("server signature")
        bound = restarted.find(_JID)
        if bound is None or not bound.text:
            raise ConnectionError("bind")
        return PrebindSession(
            jid=bound.text,
            sid=sid or "",
            rid=rid + 3,
            service_url=self.url,
            mechanism=self.mechanism,
            round_trips=2,
            request_count=3,
        )


class FloorIOPrebinder(Prebinder):
    """The engine's flows and driver over the floor's two sockets (see the module's doc)."""

    def __init__(self, service_url: str, mechanism: str = "SCRAM-SHA-1") -> None:
        super().__init__(service_url, mechanisms=[mechanism])
        self._addr, self._prefix = _origin(service_url)
        self._socks = [_connect(self._addr), _connect(self._addr)]

    def _request(self, body: bytes) -> bytes:
        return b"%sContent-Length: %d\r\n\r\n%s" % (self._prefix, len(body), body)

    def _send_batch(self, batch: list[BOSHRequest]) -> list[BOSHResponse | None]:
        s0, s1 = self._socks
        if batch[0].ordered:  # back to back on one connection
            s0.sendall(b"".join(self._request(r.body) for r in batch))
            answers: list[BOSHResponse | None] = []
            rest = b""
            for _ in batch:
                body, rest = _read_body(s0, rest)
                answers.append(BOSHResponse(200, body))
            return answers
        s0.sendall(self._request(batch[0].body))
        if len(batch) == 1:
            return [BOSHResponse(200, _read_body(s0)[0])]
        time.sleep(self.stagger)
        s1.sendall(self._request(batch[1].body))
        first = BOSHResponse(200, _read_body(s0)[0])
        settles = batch[0].settles
        if settles is not None and settles([first]):  # overtaken: the second one is held
            s1.close()
            self._socks[1] = _connect(self._addr)
            return [first, None]
        return [first, BOSHResponse(200, _read_body(s1)[0])]

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        super().close()
