"""The builtin HTTP/1.1 transport (``bosh_middleware/http11.py``) on its own: the response parser
against well-formed and hostile bytes, the sync and async pools against a raw-socket server on
127.0.0.1 (keep-alive, stale connections, timeouts, batches, the bytes on the wire), TLS
verification as httpx does it, and the choice of transport in ``client._wants_builtin``.

The end-to-end view (real Prosody/ejabberd, the fault-injecting fake BOSH server) is in
test_prebind_servers.py and test_faults.py; this file pins down the transport's own contract.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import gc
import ipaddress
import os
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bosh_middleware import (
    AsyncPrebinder,
    Prebinder,
    ProtocolError,
    ResponseTooLarge,
    ServiceUnavailable,
    http11,
)
from bosh_middleware.client import _wants_builtin
from bosh_middleware.credentials import Credentials
from bosh_middleware.session import PrebindOptions, PrebindSession

LIMIT = 64 * 1024
SOCKET_TIMEOUT = 5.0  # server side: no handler blocks longer than this


# ==========================================================================================
# Parser
# ==========================================================================================


def parse(data: bytes, *, bytewise: bool, limit: int = LIMIT, eof: bool = False) -> Any:
    """Feed ``data`` whole or one byte at a time; ``eof`` then signals the connection's end."""
    parser = http11._Parser(limit)
    if bytewise:
        for i in range(len(data)):
            parser.feed(data[i : i + 1])
    else:
        parser.feed(data)
    if eof:
        parser.eof()
    return parser


FEEDS = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n"
    b'6 ; ext ; other="q"\r\n world\r\n'
    b"A\r\n0123456789\r\n"
    b"0\r\nX-Trailer: 1\r\nOther-Trailer: two\r\n\r\n"
)

WELL_FORMED = {
    # name: (bytes, eof?, status, body, keep_alive)
    "content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 5\r\n\r\nhello",
        False,
        200,
        b"hello",
        True,
    ),
    "content-length-0": (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, 200, b"", True),
    "repeated-equal-content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nok",
        False,
        200,
        b"ok",
        True,
    ),
    "chunked-with-extensions-and-trailers": (CHUNKED, False, 200, b"hello world0123456789", True),
    "close-delimited": (
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
        True,
        200,
        b"until the end",
        False,
    ),
    "interim-1xx-then-200": (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        False,
        200,
        b"ok",
        True,
    ),
    "204-ignores-content-length": (
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        False,
        204,
        b"",
        True,
    ),
    "304-ignores-transfer-encoding": (
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        False,
        304,
        b"",
        True,
    ),
    "http11-connection-close": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1\r\n\r\nx",
        False,
        200,
        b"x",
        False,
    ),
    "http10-default-close": (
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
        False,
        200,
        b"x",
        False,
    ),
    "http10-keep-alive": (
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\nx",
        False,
        200,
        b"x",
        True,
    ),
    "http10-close-delimited": (b"HTTP/1.0 200 OK\r\n\r\nabc", True, 200, b"abc", False),
    "status-line-without-reason": (
        b"HTTP/1.1 503\r\nContent-Length: 4\r\n\r\ndown",
        False,
        503,
        b"down",
        True,
    ),
    "obs-fold-header": (
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n\tb\r\nContent-Length: 2\r\n\r\nok",
        False,
        200,
        b"ok",
        True,
    ),
    "chunked-and-content-length": (  # chunked wins; the connection is not reused
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        False,
        200,
        b"ok",
        False,
    ),
}


@FEEDS
@pytest.mark.parametrize("case", list(WELL_FORMED))
def test_parser_well_formed(case: str, bytewise: bool) -> None:
    data, eof, status, body, keep_alive = WELL_FORMED[case]
    parser = parse(data, bytewise=bytewise)
    assert parser.done is not eof  # a close-delimited body is complete only at EOF
    if eof:
        parser.eof()
    assert parser.done
    assert (parser.status, bytes(parser.body), parser.keep_alive) == (status, body, keep_alive)
    assert parser.leftover() == b""


@FEEDS
def test_parser_keeps_leftover_bytes_for_the_next_response(bytewise: bool) -> None:
    second = b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\ntwo"
    parser = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none" + second, bytewise=bytewise)
    assert parser.done and bytes(parser.body) == b"one"
    assert parser.leftover() == second
    nxt = http11._Parser(LIMIT, parser.leftover())
    assert (nxt.done, nxt.status, bytes(nxt.body), nxt.leftover()) == (True, 201, b"two", b"")

    chunked = parse(CHUNKED + b"EXTRA", bytewise=bytewise)
    assert chunked.done and chunked.leftover() == b"EXTRA"


@FEEDS
def test_parser_is_not_done_before_the_last_byte(bytewise: bool) -> None:
    for data in (WELL_FORMED["content-length"][0], CHUNKED):
        parser = parse(data[:-1], bytewise=bytewise)
        assert not parser.done
        parser.feed(data[-1:])
        assert parser.done


#: Prosody's answer to a BOSH request, as it comes: what the one-pass path is for.
PROSODY_ANSWER = (
    b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Headers: Content-Type\r\n"
    b"Access-Control-Max-Age: 7200\r\nContent-Length: 7\r\nConnection: Keep-Alive\r\n"
    b"Date: Mon, 30 Nov 2026 11:03:59 GMT\r\nContent-Type: text/xml; charset=utf-8\r\n"
    b"Access-Control-Allow-Origin: *\r\n\r\n<body/>"
)
#: Heads near the one-pass path's edges: each must come out exactly as the general parser
#: (fed byte by byte) has it, whether the one-pass path takes it or leaves it.
EDGES = {
    "prosody": PROSODY_ANSWER,
    "with-the-next-response": PROSODY_ANSWER + b"HTTP/1.1 200 OK\r\n",
    "short-body": PROSODY_ANSWER[:-1],
    "lower-case-names": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok",
    "spaces": b"HTTP/1.1 200 OK\r\nContent-Length:   2 \t\r\n\r\nok",
    "no-reason": b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
    "connection-close": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    "connection-list": b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok",
    "length-twice-same": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "length-twice-different": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    "length-signed": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "length-over-limit": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\nok",
    "length-absurd": b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789012\r\n\r\n",
    "no-length": b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nok",
    "chunked": CHUNKED,
    "chunked-and-length": WELL_FORMED["chunked-and-content-length"][0],
    "http10": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    "status-204": b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nok",
    "status-304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\n",
    "status-100-first": b"HTTP/1.1 100 Continue\r\n\r\n" + PROSODY_ANSWER,
    "status-101": b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0\r\n\r\n",
    "status-503": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown",
    "bad-header-line": b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 2\r\n\r\nok",
    "obs-fold": WELL_FORMED["obs-fold-header"][0],
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "length-in-a-value": b"HTTP/1.1 200 OK\r\nX-A: Content-Length: 9\r\nContent-Length: 2\r\n\r\nok",
    "identity": b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Length: 2\r\n\r\nok",
    "identity-spaced": b"HTTP/1.1 200 OK\r\ncontent-encoding:IDENTITY \r\nContent-Length: 2\r\n\r\nok",
    "gzip": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nok",
    "identity-then-gzip": (
        b"HTTP/1.1 200 OK\r\nContent-Encoding: identity, gzip\r\nContent-Length: 2\r\n\r\nok"
    ),
}


def _outcome(data: bytes, *, bytewise: bool) -> Any:
    try:
        p = parse(data, bytewise=bytewise, limit=1 << 20)
    except Exception as exc:  # the outcome compared is the error's kind
        return type(exc).__name__, getattr(exc, "condition", None)
    return p.done, p.status, bytes(p.body), p.keep_alive, p.leftover()


@pytest.mark.parametrize("case", list(EDGES))
def test_one_pass_path_agrees_with_the_general_parser(case: str) -> None:
    data = EDGES[case]
    assert _outcome(data, bytewise=False) == _outcome(data, bytewise=True)


#: Pieces of the random heads below: statuses and header lines around the framing rules.
_STATUSES = [b"200 OK", b"200", b"204 No Content", b"304 NM", b"404 Not Found", b"599 X", b"600 X"]
_LINES = [
    b"Content-Length: 5",
    b"content-length:5",
    b"CONTENT-LENGTH: 5",
    b"Content-Length: \t5 \t",
    b"Content-Length: 05",
    b"Content-Length: 000000000000000005",
    b"Content-Length: 0000000000000000005",
    b"Content-Length: 5x",
    b"Content-Length: 5, 5",
    b"Content-Length: 6",
    b"Content-Length : 5",
    b"Connection: keep-alive",
    b"Connection:Keep-Alive ",
    b"Connection: close",
    b"Connection: keep-alive, close",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding : chunked",
    b"Date: Mon, 30 Nov 2026 11:03:59 GMT",
    b"X-A: content-length: 9",
    b"Content-Type: text/xml",
    b"Content-Encoding: identity",
    b"Content-Encoding: gzip",
    b"Content-Encodings: gzip",
]


def test_one_pass_path_agrees_on_random_heads() -> None:
    """3,000 seeded random heads of those pieces (repeated and adjacent framing lines among
    them), each answered whole and byte by byte: the same outcome both ways."""
    rng = random.Random(20261130)
    taken = 0
    for _ in range(3000):
        lines = rng.choices(_LINES, k=rng.randint(0, 4))
        body = rng.choice([b"hello", b"helloEXTRA", b"5\r\nhello\r\n0\r\n\r\n"])
        data = b"HTTP/1.1 %s\r\n%s\r\n%s" % (
            rng.choice(_STATUSES),
            b"".join(line + b"\r\n" for line in lines),
            body,
        )
        assert _outcome(data, bytewise=False) == _outcome(data, bytewise=True), data
        taken += http11._Parser(LIMIT)._whole(data)
    assert taken > 100  # (the one-pass path itself was exercised, not only refused)


def test_one_pass_path_takes_the_usual_answer() -> None:
    """Prosody's answers take the one-pass path (else it would quietly cost what it saves)."""
    for data in (PROSODY_ANSWER, EDGES["with-the-next-response"], EDGES["lower-case-names"]):
        parser = http11._Parser(LIMIT)
        assert parser._whole(data) and parser.done, data
    for case in ("short-body", "connection-close", "chunked", "http10", "length-twice-same"):
        assert not http11._Parser(LIMIT)._whole(EDGES[case]), case


def http_error(fn: Callable[[], object]) -> ServiceUnavailable:
    with pytest.raises(ServiceUnavailable) as info:
        fn()
    assert info.value.condition == "http-error", info.value
    return info.value


MALFORMED = {
    "no-status-line": b"Content-Length: 5\r\n\r\nhello",  # once read as status 5
    "empty-head": b"\r\n\r\n",
    "status-word": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "status-signed": b"HTTP/1.1 +20 OK\r\nContent-Length: 0\r\n\r\n",
    "status-too-long": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "not-http": b"ICY 200 OK\r\nContent-Length: 0\r\n\r\n",
    "http2-version": b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n",
    "garbage-version": b"garbage 200 OK\r\nContent-Length: 0\r\n\r\n",
    "101-without-upgrade": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    "header-without-colon": b"HTTP/1.1 200 OK\r\nNot a header\r\nContent-Length: 0\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "whitespace-before-first-header": b"HTTP/1.1 200 OK\r\n Content-Length: 0\r\n\r\n",
    "content-length-word": b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello",
    "content-length-negative": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    "content-length-plus": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "content-length-hex": b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello",
    "content-length-underscore": b"HTTP/1.1 200 OK\r\nContent-Length: 0_5\r\n\r\nhello",
    "content-length-empty": b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\nhello",
    "content-length-conflicting": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "content-length-conflicting-list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
    "chunked-not-last": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "gzip-only": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx",
    "chunked-twice": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
    "chunked-in-http10": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}
BAD_CHUNK_SIZES = [b"zz", b"-5", b"-2", b"-1", b"+5", b"0x5", b"1_0", b"", b" ", b"1" * 17]


@FEEDS
@pytest.mark.parametrize("case", list(MALFORMED))
def test_parser_malformed_head(case: str, bytewise: bool) -> None:
    http_error(lambda: parse(MALFORMED[case], bytewise=bytewise))


@FEEDS
@pytest.mark.parametrize("size", BAD_CHUNK_SIZES, ids=lambda s: repr(s))
def test_parser_bad_chunk_size(size: bytes, bytewise: bool) -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n"
    )
    error = http_error(lambda: parse(data, bytewise=bytewise))
    assert "chunk size" in str(error)


@FEEDS
def test_parser_chunk_longer_than_its_size(bytewise: bool) -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"
    http_error(lambda: parse(data, bytewise=bytewise))


def test_parser_head_over_64_kib() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024)
    http_error(lambda: parse(head, bytewise=False))  # never ends
    # ... or ends, but only after 64 KiB, in a single read
    http_error(lambda: parse(head + b"\r\nContent-Length: 0\r\n\r\n", bytewise=False))
    # just under the limit is fine
    ok = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (60 * 1024) + b"\r\nContent-Length: 0\r\n\r\n"
    assert parse(ok, bytewise=False).done


def test_parser_chunk_framing_lines_are_bounded() -> None:
    start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    http_error(lambda: parse(start + b"1;" + b"e" * (70 * 1024), bytewise=False))
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))  # 80 KB total
    http_error(lambda: parse(start + b"0\r\n" + trailers + b"\r\n", bytewise=False))


@FEEDS
def test_parser_body_over_the_limit(bytewise: bool) -> None:
    for data in (
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11,  # close-delimited
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nxxxxxx\r\n6\r\nxxxxxx\r\n",
    ):
        with pytest.raises(ResponseTooLarge):
            parse(data, bytewise=bytewise, limit=10)
    # exactly the limit is fine
    assert (
        bytes(
            parse(
                b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 10, bytewise=bytewise, limit=10, eof=True
            ).body
        )
        == b"x" * 10
    )


def test_parser_refuses_a_declared_size_over_the_limit_before_reading_the_body() -> None:
    parser = http11._Parser(10)
    with pytest.raises(ResponseTooLarge, match="declares 11 bytes"):
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")  # no body byte yet
    with pytest.raises(ResponseTooLarge):
        http11._Parser(10).feed(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\n")
    with pytest.raises(ResponseTooLarge):  # more digits than int() converts by default
        http11._Parser(10).feed(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 9000 + b"\r\n\r\n")
    parser = http11._Parser(10)
    with pytest.raises(ResponseTooLarge):  # a chunk size over the limit: refused as announced
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\n")
    assert bytes(parser.body) == b""


@FEEDS
@pytest.mark.parametrize(
    "coding", [b"gzip", b"deflate", b"br", b"x-gzip", b"identity, gzip", b"GZIP", b"aes128gcm"]
)
def test_parser_refuses_a_content_coding(coding: bytes, bytewise: bool) -> None:
    """No request asks for one (``Accept-Encoding: identity``): a compressed body would reach
    the XML parser as garbage, its decoded size unbounded. Refused before the body is read, as
    the httpx transport refuses it."""
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: 4\r\n\r\n" % coding
    with pytest.raises(ProtocolError, match="Content-Encoding") as info:
        parse(head, bytewise=bytewise)  # (no body byte yet)
    assert not isinstance(info.value, ServiceUnavailable)
    for fine in (b"identity", b" Identity ", b""):
        answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: 2\r\n\r\nok" % fine
        assert bytes(parse(answer, bytewise=bytewise).body) == b"ok"


def test_parser_eof() -> None:
    with pytest.raises(http11._Stale):  # no byte at all: the caller may retry
        http11._Parser(LIMIT).eof()
    for partial in (
        b"HTTP/1.1 200",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ):
        parser = http11._Parser(LIMIT)
        parser.feed(partial)
        error = http_error(parser.eof)
        assert "mid-response" in str(error)


# ==========================================================================================
# A raw-socket server on 127.0.0.1 (threads, everything bounded)
# ==========================================================================================

Handler = Callable[[int, socket.socket, "RawServer"], None]


class RawServer:
    """Runs ``handler(index, sock, server)`` on its own thread for each connection it accepts
    (``index`` counts connections from 0). ``stop()`` shuts every connection down and joins
    every thread; a handler that raised fails the test there."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler, self.tls = handler, tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.finished = 0  # handlers returned
        self.errors: list[BaseException] = []
        self.handshake_errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.eof_seen = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/http-bind"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(SOCKET_TIMEOUT)
            with self._lock:
                index, self.connections = self.connections, self.connections + 1
                self._socks.append(sock)
                thread = threading.Thread(target=self._run, args=(index, sock), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _run(self, index: int, sock: socket.socket) -> None:
        try:
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError) as exc:  # the client refused our certificate
                    self.handshake_errors.append(exc)
                    return
                with self._lock:
                    self._socks.append(sock)
            self.handler(index, sock, self)
        except BaseException as exc:
            if not self.stopping.is_set():
                self.errors.append(exc)
        finally:
            sock.close()
            with self._lock:
                self.finished += 1

    def wait_finished(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.finished < count:
            assert time.monotonic() < deadline, f"{self.finished} of {count} handlers finished"
            time.sleep(0.005)

    def stop(self) -> None:
        self.stopping.set()
        self._acceptor.join(timeout=5)
        self.listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=SOCKET_TIMEOUT + 1)
            assert not thread.is_alive()
        assert not self._acceptor.is_alive()
        assert not self.errors, self.errors


def read_request(sock: socket.socket) -> bytes | None:
    """One request (head and Content-Length body), or None if the client closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            assert not data, data
            return None
        data += chunk
        assert len(data) < 1 << 20
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
    assert match is not None, head
    while len(body) < int(match[1]):
        chunk = sock.recv(65536)
        assert chunk, "client closed mid-request"
        body += chunk
    return head + b"\r\n\r\n" + body


def body_of(request: bytes) -> bytes:
    return request.partition(b"\r\n\r\n")[2]


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


def serve_keepalive(index: int, sock: socket.socket, server: RawServer) -> None:
    """Answer ``<connection index>:<request body>`` for as long as the client sends."""
    while (request := read_request(sock)) is not None:
        server.requests.append(request)
        sock.sendall(ok(b"%d:%s" % (index, body_of(request))))


def rst_close(sock: socket.socket) -> None:
    """Close with a TCP reset rather than a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(handler: Handler, tls: ssl.SSLContext | None = None) -> RawServer:
        servers.append(RawServer(handler, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ==========================================================================================
# Pools: one driver for the sync and the async pool
# ==========================================================================================


class Pool:
    """``SyncPool`` or ``AsyncPool`` behind one synchronous interface; the async pool lives on
    one event loop (``asyncio.Runner``) for the whole test, as in an ASGI worker."""

    def __init__(self, mode: str, url: str, headers: dict[str, str] | None, verify: Any) -> None:
        self.mode = mode
        origin = http11.origin(url, headers or {}, verify)
        self.runner = asyncio.Runner() if mode == "async" else None
        self.sync = http11.SyncPool(origin) if mode == "sync" else None
        self.aio = http11.AsyncPool(origin) if mode == "async" else None

    def exchange(self, body: bytes, timeout: float = 3.0, limit: int = LIMIT) -> http11.Response:
        if self.sync is not None:
            return self.sync.exchange(body, timeout, limit)
        assert self.runner is not None and self.aio is not None
        return self.runner.run(self.aio.exchange(body, timeout, limit))

    def batch(
        self, bodies: list[bytes], settles: http11.Settles | None, timeout: float = 3.0
    ) -> list[http11.Response | None]:
        if self.sync is not None:
            return self.sync.batch(bodies, timeout, LIMIT, settles, 0.02)
        assert self.runner is not None and self.aio is not None
        return self.runner.run(self.aio.batch(bodies, timeout, LIMIT, settles, 0.02))

    def pipeline(self, bodies: list[bytes], timeout: float = 3.0) -> list[http11.Response]:
        if self.sync is not None:
            return self.sync.pipeline(bodies, timeout, LIMIT)
        assert self.runner is not None and self.aio is not None
        return self.runner.run(self.aio.pipeline(bodies, timeout, LIMIT))

    def idle(self, seconds: float, *, loop_running: bool = True) -> None:
        """Let time pass between requests; for the async pool, with its event loop running
        (as in a server) or not (bytes that came meanwhile are then still in the socket)."""
        if self.runner is not None and loop_running:
            self.runner.run(asyncio.sleep(seconds))
        else:
            time.sleep(seconds)

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
        if self.runner is not None and self.aio is not None:

            async def close() -> None:
                assert self.aio is not None
                self.aio.close()
                await asyncio.sleep(0.01)  # let the transports finish closing

            self.runner.run(close())
            self.runner.close()


@pytest.fixture(params=["sync", "async"])
def pool(request: pytest.FixtureRequest) -> Iterator[Callable[..., Pool]]:
    made: list[Pool] = []

    def make(url: str, headers: dict[str, str] | None = None, verify: Any = True) -> Pool:
        made.append(Pool(request.param, url, headers, verify))
        return made[-1]

    yield make
    for p in made:
        p.close()


def unavailable(fn: Callable[[], object], condition: str) -> ServiceUnavailable:
    with pytest.raises(ServiceUnavailable) as info:
        fn()
    assert info.value.condition == condition, info.value
    return info.value


def test_keep_alive_reuses_one_connection(serve, pool) -> None:
    server = serve(serve_keepalive)
    client = pool(server.url)
    answers = [client.exchange(b"req-%d" % i) for i in range(8)]
    assert answers == [(200, b"0:req-%d" % i) for i in range(8)]
    assert server.connections == 1


def test_threads_share_the_sync_pool_while_it_is_closed(serve) -> None:
    """Sockets are taken and given back without a lock: a socket is either handed out or
    closed by ``close()`` (as a stale retry does), never both, and every exchange answers."""
    server = serve(serve_keepalive)
    sync = http11.SyncPool(http11.origin(server.url, {}, True))
    failures: list[BaseException] = []
    done = threading.Event()

    def work(n: int) -> None:
        try:
            for i in range(60):
                status, body = sync.exchange(b"%d-%d" % (n, i), 5.0, LIMIT)
                assert status == 200 and body.endswith(b":%d-%d" % (n, i)), body
        except BaseException as exc:
            failures.append(exc)

    def closer() -> None:
        while not done.wait(0.0005):
            sync.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    closing = threading.Thread(target=closer)
    closing.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    done.set()
    closing.join(timeout=5)
    sync.close()
    assert not failures, failures[:3]
    assert len(server.requests) == 6 * 60


def test_connection_the_server_closed_while_idle_is_replaced(serve, pool) -> None:
    def one_per_connection(index: int, sock: socket.socket, server: RawServer) -> None:
        request = read_request(sock)
        assert request is not None
        server.requests.append(request)
        sock.sendall(ok(b"%d" % index))  # says keep-alive, then closes: an idle timeout

    server = serve(one_per_connection)
    client = pool(server.url)
    assert client.exchange(b"a") == (200, b"0")
    server.wait_finished(1)
    client.idle(0.05)
    assert client.exchange(b"b") == (200, b"1")
    server.wait_finished(2)
    client.idle(0.05, loop_running=False)  # async: the FIN is in the socket, not yet read
    assert client.exchange(b"c") == (200, b"2")
    assert server.connections == 3
    assert [body_of(r) for r in server.requests] == [b"a", b"b", b"c"]  # each sent once


def test_a_connection_idle_past_the_keep_alive_expiry_is_not_reused(
    serve, pool, monkeypatch
) -> None:
    """A NAT, firewall or load balancer on the way may forget a connection that was idle for
    a while without a word to either end (no FIN, no RST: Azure's load balancer after 4
    minutes, a cloud firewall's connection tracking): a request sent on it is never answered,
    and the page waited its whole timeout, to be served without a session. So, as the httpx
    transport (``keepalive_expiry``), a connection idle longer than ``_IDLE_EXPIRY`` is closed,
    not reused."""
    monkeypatch.setattr(http11, "_IDLE_EXPIRY", 0.2, raising=False)

    def answer_once_then_black_hole(index: int, sock: socket.socket, server: RawServer) -> None:
        if index:
            return serve_keepalive(index, sock, server)
        request = read_request(sock)
        assert request is not None
        sock.sendall(ok(b"0:" + body_of(request)))
        server.stopping.wait(SOCKET_TIMEOUT)  # what comes next is read and answered by nobody
        return None

    server = serve(answer_once_then_black_hole)
    client = pool(server.url)
    assert client.exchange(b"a") == (200, b"0:a")
    client.idle(0.4)
    assert client.exchange(b"b", timeout=1.0) == (200, b"1:b")
    assert client.exchange(b"c", timeout=1.0) == (200, b"1:c")  # within it: reused
    assert server.connections == 2


@pytest.mark.parametrize("loop_running", [True, False])
def test_a_connection_closed_just_after_its_answer_is_replaced(serve, pool, loop_running) -> None:
    """The server closes right after answering and the next request goes out at once: whether
    the FIN is seen before the send or the send fails, the request is answered, once, on a
    new connection."""

    def one_per_connection(index: int, sock: socket.socket, server: RawServer) -> None:
        request = read_request(sock)
        assert request is not None
        server.requests.append(request)
        sock.sendall(ok(b"%d" % index))  # says keep-alive, then closes

    server = serve(one_per_connection)
    client = pool(server.url)
    for i, body in enumerate([b"a", b"b", b"c"]):
        assert client.exchange(body) == (200, b"%d" % i)
        server.wait_finished(i + 1)
        client.idle(0.001, loop_running=loop_running)
    assert server.connections == 3
    assert [body_of(r) for r in server.requests] == [b"a", b"b", b"c"]  # each answered once


@pytest.mark.parametrize("loop_running", [True, False])
def test_idle_connection_with_unsolicited_bytes_is_not_reused(serve, pool, loop_running) -> None:
    """A server that writes a 408 on an idle connection before closing it: those bytes are not
    the answer to the next request."""

    def answer_then_408(index: int, sock: socket.socket, server: RawServer) -> None:
        request = read_request(sock)
        assert request is not None
        sock.sendall(ok(b"%d" % index))
        if index == 0:
            time.sleep(0.05)  # after the client has read the answer: not a leftover of it
            sock.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            server.eof_seen.wait(SOCKET_TIMEOUT)  # keep the connection open: no FIN to see

    server = serve(answer_then_408)
    client = pool(server.url)
    assert client.exchange(b"a") == (200, b"0")
    client.idle(0.2, loop_running=loop_running)
    assert client.exchange(b"b") == (200, b"1")
    server.eof_seen.set()


def drop_second(how: str) -> Handler:
    """A server whose first connection answers one request, then reads the next and closes
    (``how``: FIN or RST) without answering: an idle keep-alive connection the server closed
    just as a request went out on it. Later connections answer everything."""

    def handler(index: int, sock: socket.socket, server: RawServer) -> None:
        if index:
            return serve_keepalive(index, sock, server)
        first = read_request(sock)
        assert first is not None
        server.requests.append(first)
        sock.sendall(ok(b"0:" + body_of(first)))
        second = read_request(sock)  # read, then dropped unanswered
        assert second is not None
        server.requests.append(second)
        if how == "rst":
            rst_close(sock)

    return handler


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_reused_connection_closed_without_answer_is_retried_once(serve, pool, how) -> None:
    server = serve(drop_second(how))
    client = pool(server.url)
    assert client.exchange(b"first") == (200, b"0:first")
    assert client.exchange(b"second") == (200, b"1:second")  # on a new connection
    assert server.connections == 2
    assert [body_of(r) for r in server.requests] == [b"first", b"second", b"second"]


def test_fresh_connection_closed_without_answer_is_an_http_error(serve, pool) -> None:
    def drop(index: int, sock: socket.socket, server: RawServer) -> None:
        request = read_request(sock)
        assert request is not None
        server.requests.append(request)

    server = serve(drop)
    client = pool(server.url)
    unavailable(lambda: client.exchange(b"x"), "http-error")
    assert server.connections == 1  # not retried: a new connection that fails is an answer


def test_connection_reset_mid_response_is_an_http_error(serve, pool) -> None:
    def half_then_reset(index: int, sock: socket.socket, server: RawServer) -> None:
        assert read_request(sock) is not None
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        time.sleep(0.05)
        rst_close(sock)

    server = serve(half_then_reset)
    client = pool(server.url)
    unavailable(lambda: client.exchange(b"x"), "http-error")
    assert server.connections == 1


def test_trickling_server_times_out_on_the_deadline(serve, pool) -> None:
    def trickle(index: int, sock: socket.socket, server: RawServer) -> None:
        assert read_request(sock) is not None
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(200):  # at most 10 s, but the client gives up long before
            if server.stopping.wait(0.05):
                return
            try:
                sock.sendall(b"x")
            except OSError:
                return

    server = serve(trickle)
    client = pool(server.url)
    start = time.monotonic()
    unavailable(lambda: client.exchange(b"x", timeout=0.5), "timeout")
    assert 0.4 < time.monotonic() - start < 1.5


def serve_slow_when_asked(index: int, sock: socket.socket, server: RawServer) -> None:
    """As ``serve_keepalive``, but a request whose body starts with ``slow`` is answered
    after 0.4 s."""
    while (request := read_request(sock)) is not None:
        server.requests.append(request)
        if body_of(request).startswith(b"slow") and server.stopping.wait(0.4):
            return
        sock.sendall(ok(b"%d:%s" % (index, body_of(request))))


def test_a_finished_exchange_leaves_no_deadline_behind(serve, pool) -> None:
    """The async connection keeps the exchange's deadline as a timer of its own: once the
    answer is in, the timer is gone, and cannot fail the next exchange on the connection."""
    server = serve(serve_slow_when_asked)
    client = pool(server.url)
    assert client.exchange(b"quick", timeout=0.2) == (200, b"0:quick")
    assert client.exchange(b"slow", timeout=5.0) == (200, b"0:slow")  # past 0.2 s: still fine
    assert server.connections == 1


def test_a_shorter_deadline_after_a_longer_one_is_kept(serve, pool) -> None:
    """The async pool keeps every deadline with one timer, set for the earliest it knows of:
    a later exchange with a shorter timeout must move it earlier, not wait for the first."""
    server = serve(serve_slow_when_asked)
    client = pool(server.url)
    assert client.exchange(b"quick", timeout=30.0) == (200, b"0:quick")
    # answered at 0.4 s: with the first exchange's deadline still in force, this would succeed
    start = time.monotonic()
    unavailable(lambda: client.exchange(b"slow", timeout=0.15), "timeout")
    assert time.monotonic() - start < 1.0


def test_exchanges_under_way_together_keep_their_own_deadlines(serve) -> None:
    """Two exchanges at once on one async pool, the first with the shorter deadline: it times
    out, the other gets its answer after that (the timer is set again for it, not dropped)."""
    server = serve(serve_slow_when_asked)
    pool = http11.AsyncPool(http11.origin(server.url, {}, True))

    async def both() -> list[object]:
        try:
            return await asyncio.gather(
                pool.exchange(b"slow-a", 0.15, LIMIT),
                pool.exchange(b"slow-b", 5.0, LIMIT),
                pool.exchange(b"quick", 1.0, LIMIT),
                return_exceptions=True,
            )
        finally:
            pool.close()

    short, long, quick = asyncio.run(both())
    assert isinstance(short, ServiceUnavailable) and short.condition == "timeout", short
    assert isinstance(long, tuple) and long[0] == 200 and long[1].endswith(b":slow-b"), long
    assert isinstance(quick, tuple) and quick[1].endswith(b":quick"), quick
    assert not pool._running  # each batch is gone from the watchdog's set


def test_server_that_never_answers_times_out(serve, pool) -> None:
    def silent(index: int, sock: socket.socket, server: RawServer) -> None:
        assert read_request(sock) is not None
        server.stopping.wait(SOCKET_TIMEOUT)

    server = serve(silent)
    client = pool(server.url)
    start = time.monotonic()
    unavailable(lambda: client.exchange(b"x", timeout=0.3), "timeout")
    assert time.monotonic() - start < 1.3


def slow_reader(index: int, sock: socket.socket, server: RawServer) -> None:
    """Reads each request in small bites with pauses (the client's send buffer fills up and it
    must wait to send the rest), then answers with the body's length."""
    while True:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
        assert match is not None
        while len(body) < int(match[1]):
            if server.stopping.wait(0.001):
                return
            chunk = sock.recv(65536)
            assert chunk, "client closed mid-request"
            body += chunk
        sock.sendall(ok(b"%d" % len(body)))


BIG = 4 * 1024 * 1024  # larger than any socket send buffer: sent in parts


def test_a_big_request_is_sent_in_parts_as_the_server_reads(serve, pool) -> None:
    server = serve(slow_reader)
    client = pool(server.url)
    assert client.exchange(b"x" * BIG, timeout=20) == (200, b"%d" % BIG)
    assert client.exchange(b"y", timeout=5) == (200, b"1")  # and the connection is reusable
    assert server.connections == 1


def test_a_big_request_over_tls(serve, pool, pki, no_env_cas) -> None:
    server = serve(slow_reader, tls=pki.good)
    client = pool(server.url, verify=str(pki.ca))
    assert client.exchange(b"x" * BIG, timeout=20) == (200, b"%d" % BIG)
    assert server.connections == 1


def serve_big_answers(index: int, sock: socket.socket, server: RawServer) -> None:
    """Answer each request with ``BIG_ANSWER`` bytes of a pattern, keep-alive: the first
    half in sends of 1,000 bytes (over TLS, a record each: many fit in one read), the rest in
    one send (full-size records)."""
    while (request := read_request(sock)) is not None:
        server.requests.append(request)
        answer = ok(big_answer(body_of(request)))
        half = len(answer) // 2
        for i in range(0, half, 1000):
            sock.sendall(answer[i : min(i + 1000, half)])
        sock.sendall(answer[half:])


BIG_ANSWER = 300 * 1024  # many times the async connection's read buffer (http11._READ_SIZE)


def big_answer(seed: bytes) -> bytes:
    return (seed + b"|" + bytes(range(256)) * 2) * (BIG_ANSWER // (len(seed) + 513)) + b"end"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_answers_larger_than_the_read_buffer_arrive_whole(serve, pool, pki, no_env_cas, tls):
    """The async connection reads into a buffer of its own, and TLS fills it through slices:
    an answer many times its size comes in many reads, each byte once, in order."""
    assert BIG_ANSWER > 10 * http11._READ_SIZE
    server = serve(serve_big_answers, tls=pki.good if tls else None)
    client = pool(server.url, verify=str(pki.ca))
    for i in range(3):
        assert client.exchange(b"r%d" % i, limit=2 * BIG_ANSWER) == (200, big_answer(b"r%d" % i))
    assert server.connections == 1  # and the connection stays reusable after them


def test_reading_an_answer_allocates_no_large_block(serve, pool) -> None:
    """An asyncio ``Protocol`` gets each read as a new bytes object that asyncio allocates at
    256 KiB and then trims: above glibc's mmap threshold (128 KiB) that may be an mmap, page
    faults and a munmap per answer. The pools read at most 64 KiB at a time (the sync one
    into a new bytes object, the async one into its connection's buffer)."""
    server = serve(serve_keepalive)
    client = pool(server.url)
    client.exchange(b"warm-up")  # connection made, pool and loop set up
    tracemalloc.start()
    try:
        for i in range(5):
            assert client.exchange(b"%d" % i) == (200, b"0:%d" % i)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 192 * 1024, peak  # a 256 KiB read buffer would show


def test_a_server_that_never_reads_times_out(serve, pool) -> None:
    """The send itself is bounded by the deadline, not only the wait for the answer, and the
    connection is closed then, its unsent bytes dropped (an asyncio transport's close() would
    wait for the server to read them, and keep the socket open)."""
    timed_out = threading.Event()

    def deaf(index: int, sock: socket.socket, server: RawServer) -> None:
        if not timed_out.wait(SOCKET_TIMEOUT):
            return
        sock.settimeout(3.0)  # now drain: the client's end must be gone
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(1 << 20):
                pass
        server.eof_seen.set()

    server = serve(deaf)
    client = pool(server.url)
    start = time.monotonic()
    unavailable(lambda: client.exchange(b"x" * (4 * BIG), timeout=0.5), "timeout")
    assert 0.4 < time.monotonic() - start < 1.5
    timed_out.set()
    assert server.eof_seen.wait(5.0), "the connection stayed open after the timeout"


def test_a_host_name_is_looked_up_and_connected(serve, pool) -> None:
    server = serve(serve_keepalive)
    client = pool(f"http://localhost:{server.port}/http-bind")
    assert client.exchange(b"x") == (200, b"0:x")


def test_a_dns_lookup_that_hangs_is_a_timeout(monkeypatch) -> None:
    """The sync pool's lookup is bounded by the exchange's deadline (the C resolver is not):
    a DNS server that does not answer must not hold the page for its own timeouts."""
    real = socket.getaddrinfo
    release = threading.Event()

    def hanging(host: Any, *args: Any) -> Any:
        if host == "dns-hangs.example" and not (len(args) > 4 and args[4]):  # not numeric-only
            release.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "gave up")
        return real(host, *args)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    pool = http11.SyncPool(http11.origin("http://dns-hangs.example:5280/http-bind", {}, True))
    start = time.monotonic()
    try:
        error = unavailable(lambda: pool.exchange(b"x", 0.5, LIMIT), "timeout")
        assert 0.4 < time.monotonic() - start < 1.5
        assert "dns-hangs.example" in str(error) or "timed out" in str(error)
    finally:
        release.set()


def test_a_dns_lookup_that_fails_is_connection_failed() -> None:
    pool = http11.SyncPool(http11.origin("http://no-such-host.invalid:5280/b", {}, True))
    unavailable(lambda: pool.exchange(b"x", 5.0, LIMIT), "connection-failed")


def test_a_forked_child_makes_its_own_connections_and_lookups(serve) -> None:
    """After fork() the child must not use the parent's idle sockets (both would read the same
    connection) nor its lookup threads (they do not survive fork; a pre-forking server such as
    gunicorn --preload forks after the app has been used)."""
    server = serve(serve_keepalive)
    pool = http11.SyncPool(http11.origin(f"http://localhost:{server.port}/b", {}, True))
    assert pool.exchange(b"parent", 3.0, LIMIT) == (200, b"0:parent")  # connection 0 is idle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork() with threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if pool.exchange(b"child", 3.0, LIMIT) == (200, b"1:child") else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        assert time.monotonic() < deadline, "the forked child hangs"
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert pool.exchange(b"again", 3.0, LIMIT) == (200, b"0:again")  # the parent's is intact
    pool.close()


def test_connection_refused(pool) -> None:
    client = pool(f"http://127.0.0.1:{free_port()}/http-bind")
    error = unavailable(lambda: client.exchange(b"x"), "connection-failed")
    assert "cannot connect" in str(error)


def test_too_large_response_through_the_pool(serve, pool) -> None:
    server = serve(serve_keepalive)
    client = pool(server.url)
    with pytest.raises(ResponseTooLarge):
        client.exchange(b"x" * 100, limit=10)
    assert client.exchange(b"y", limit=10) == (200, b"1:y")  # that connection was not reused
    assert server.connections == 2


def hold_or_answer(index: int, sock: socket.socket, server: RawServer) -> None:
    """A batch server: a ``hold`` request is held until the client closes its connection (the
    server records that it saw EOF); any other is answered."""
    request = read_request(sock)
    assert request is not None
    server.requests.append(request)
    if body_of(request) != b"hold":
        sock.sendall(ok(b"answer:" + body_of(request)))
        return
    try:
        if sock.recv(1) == b"":
            server.eof_seen.set()
    except ConnectionError:
        server.eof_seen.set()


def test_batch_closes_the_held_request_once_settled(serve, pool) -> None:
    server = serve(hold_or_answer)
    client = pool(server.url)
    start = time.monotonic()
    results = client.batch([b"first", b"hold"], settles=lambda answers: len(answers) >= 1)
    assert results == [(200, b"answer:first"), None]
    assert time.monotonic() - start < 2.0  # settled, not timed out
    assert server.eof_seen.wait(3.0), "the held request's connection was not closed"
    assert [body_of(r) for r in server.requests] == [b"first", b"hold"]  # in order, staggered
    assert server.connections == 2


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_batch_sends_again_what_a_stale_reused_connection_dropped(serve, pool, how) -> None:
    """The race ``exchange`` survives (the server closes an idle connection just as a request
    goes out on it) must not fail a pipelined batch either: that request is sent again, once,
    on a new connection, and every answer still comes back."""

    server = serve(drop_second(how))
    client = pool(server.url)
    assert client.exchange(b"warm") == (200, b"0:warm")  # now idle in the pool
    results = client.batch([b"a", b"b"], settles=None)
    assert [r is not None and r[0] for r in results] == [200, 200]
    assert [r[1].split(b":", 1)[1] for r in results if r is not None] == [b"a", b"b"]
    assert all(not r[1].startswith(b"0:") for r in results if r is not None)
    # the dropped one, one for a sent again, and one for b, unless (async) a's new connection
    # has its answer, and is idle again, by the time b goes out
    assert server.connections in (2, 3)
    assert sorted(body_of(r) for r in server.requests) == [b"a", b"a", b"b", b"warm"]


def test_batch_does_not_send_again_on_a_fresh_connection(serve, pool) -> None:
    def drop(index: int, sock: socket.socket, server: RawServer) -> None:
        request = read_request(sock)
        assert request is not None
        server.requests.append(request)
        if body_of(request) != b"drop":
            sock.sendall(ok(b"answer"))

    server = serve(drop)
    client = pool(server.url)
    unavailable(lambda: client.batch([b"drop", b"b"], settles=None), "http-error")
    assert [body_of(r) for r in server.requests].count(b"drop") == 1


def test_batch_reads_every_answer_without_settles(serve, pool) -> None:
    server = serve(hold_or_answer)
    client = pool(server.url)
    assert client.batch([b"a", b"b", b"c"], settles=None) == [
        (200, b"answer:a"),
        (200, b"answer:b"),
        (200, b"answer:c"),
    ]


def test_batch_times_out_if_nothing_settles(serve, pool) -> None:
    server = serve(hold_or_answer)
    client = pool(server.url)
    start = time.monotonic()
    unavailable(lambda: client.batch([b"hold"], settles=lambda a: False, timeout=0.3), "timeout")
    assert time.monotonic() - start < 1.3
    assert server.eof_seen.wait(3.0)


class Requests:
    """The requests of one connection, pipelined or not: what ``read_request`` would drop of
    a second request that came in the same segment is kept for the next call."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def next(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                assert not self.buf, self.buf
                return None
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
        assert match is not None, head
        while len(rest) < int(match[1]):
            chunk = self.sock.recv(65536)
            assert chunk, "client closed mid-request"
            rest += chunk
        body, self.buf = rest[: int(match[1])], rest[int(match[1]) :]
        return head + b"\r\n\r\n" + body


def serve_pipelined(how: str) -> Handler:
    """Answers every request of a connection with ``<index>:<body>``, in order, the second
    of a pair: with the first in one write ("together"), 20 ms after it ("apart"), both a few
    bytes at a time ("trickle"), chunked ("chunked"); or the connection ends after the first
    answer, said ("close": Connection: close) or not ("drop"); or the second is never
    answered ("hang")."""

    def handler(index: int, sock: socket.socket, server: RawServer) -> None:
        requests = Requests(sock)
        while True:
            pair = [requests.next(), requests.next()]
            if pair[0] is None:
                return
            assert pair[1] is not None, "the second request of the pair never came"
            server.requests += pair  # type: ignore[arg-type]
            first, second = (b"%d:%s" % (index, body_of(r)) for r in pair)  # type: ignore[arg-type]
            if how == "together":
                sock.sendall(ok(first) + ok(second))
            elif how == "apart":
                sock.sendall(ok(first))
                time.sleep(0.02)
                sock.sendall(ok(second))
            elif how == "trickle":
                data = ok(first) + ok(second)
                for i in range(0, len(data), 7):
                    sock.sendall(data[i : i + 7])
                    time.sleep(0.001)
            elif how == "chunked":
                sock.sendall(
                    ok(first)
                    + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second)
                )
            elif how == "close":
                sock.sendall(ok(first, b"Connection: close\r\n"))
                return
            elif how == "drop":
                sock.sendall(ok(first))
                return
            else:
                assert how == "hang", how
                sock.sendall(ok(first))
                with contextlib.suppress(OSError):
                    sock.recv(1)  # until the client gives up
                return

    return handler


@pytest.mark.parametrize("how", ["together", "apart", "trickle", "chunked"])
def test_pipeline_answers_in_order_on_one_connection(serve, pool, how) -> None:
    server = serve(serve_pipelined(how))
    client = pool(server.url)
    for round_ in range(2):  # and the connection is kept for the next pipeline
        answers = client.pipeline([b"a%d" % round_, b"b%d" % round_])
        assert answers == [(200, b"0:a%d" % round_), (200, b"0:b%d" % round_)]
    assert server.connections == 1
    assert [body_of(r) for r in server.requests] == [b"a0", b"b0", b"a1", b"b1"]


@pytest.mark.parametrize("how", ["close", "drop", "hang"])
def test_pipeline_whose_second_answer_never_comes_fails(serve, pool, how) -> None:
    """A connection that ends after the first answer (or a server that never answers the
    second): an http-error (a timeout), and nothing is sent twice: the server has handled the
    first request, and may have handled the second."""
    server = serve(serve_pipelined(how))
    client = pool(server.url)
    start = time.monotonic()
    unavailable(
        lambda: client.pipeline([b"a", b"b"], timeout=0.5),
        "timeout" if how == "hang" else "http-error",
    )
    assert time.monotonic() - start < 2.0
    assert [body_of(r) for r in server.requests] == [b"a", b"b"]
    assert server.connections == 1


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_pipeline_sent_again_whole_when_a_stale_reused_connection_dropped_it(
    serve, pool, how
) -> None:
    """As ``exchange`` does: the idle connection the server closed just as the pipeline went
    out on it got no answer at all, so both requests go again, once, on a new connection."""
    dropping = drop_second(how)
    pipelined = serve_pipelined("together")

    def handler(index: int, sock: socket.socket, server: RawServer) -> None:
        (dropping if index == 0 else pipelined)(index, sock, server)

    server = serve(handler)
    client = pool(server.url)
    assert client.exchange(b"warm") == (200, b"0:warm")
    assert client.pipeline([b"a", b"b"]) == [(200, b"1:a"), (200, b"1:b")]
    assert server.connections == 2


def pair_handler(respond):
    def handler(index, sock, server):
        requests = Requests(sock)
        while True:
            pair = [requests.next(), requests.next()]
            if pair[0] is None:
                return
            server.requests += pair
            bodies = [b"%d:%s" % (index, body_of(r)) for r in pair]
            if respond(sock, bodies) is False:
                return

    return handler


def bytewise(sock, bodies):
    data = ok(bodies[0]) + ok(bodies[1])
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(data)):
        sock.sendall(data[i : i + 1])
        time.sleep(0.0005)


def interim(sock, bodies):
    sock.sendall(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        + ok(bodies[0])
        + b"HTTP/1.1 102 Processing\r\nX: y\r\n\r\n"
        + ok(bodies[1])
    )


def http10(sock, bodies):
    sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(bodies[0]), bodies[0]))
    return False


def garbage_after(sock, bodies):
    sock.sendall(ok(bodies[0]) + ok(bodies[1]) + b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("how", [bytewise, interim])
def test_pipeline_odd_framing(serve, pool, how) -> None:
    server = serve(pair_handler(how))
    client = pool(server.url)
    for r in range(2):
        assert client.pipeline([b"a%d" % r, b"b%d" % r], timeout=5) == [
            (200, b"0:a%d" % r),
            (200, b"0:b%d" % r),
        ]
    assert server.connections == 1


def test_pipeline_http10_first_answer_is_http_error_with_the_answer(serve, pool) -> None:
    server = serve(pair_handler(http10))
    client = pool(server.url)
    err = unavailable(lambda: client.pipeline([b"a", b"b"]), "http-error")
    assert err.answers == ((200, b"0:a"),)  # (review fix: the first answer goes with it)
    assert [body_of(r) for r in server.requests] == [b"a", b"b"]


def test_pipeline_garbage_after_last_answer_not_reused(serve, pool) -> None:
    server = serve(pair_handler(garbage_after))
    client = pool(server.url)
    assert client.pipeline([b"a", b"b"]) == [(200, b"0:a"), (200, b"0:b")]
    assert client.pipeline([b"c", b"d"]) == [(200, b"1:c"), (200, b"1:d")]
    assert server.connections == 2


def test_pipeline_over_tls(serve, pool, pki) -> None:
    server = serve(pair_handler(lambda s, b: s.sendall(ok(b[0]) + ok(b[1]))), tls=pki.good)
    client = pool(server.url, verify=str(pki.ca))
    for r in range(3):
        assert client.pipeline([b"a%d" % r, b"b%d" % r]) == [
            (200, b"0:a%d" % r),
            (200, b"0:b%d" % r),
        ]
    assert server.connections == 1


def test_pipeline_over_tls_apart(serve, pool, pki) -> None:
    def apart(sock, bodies):
        sock.sendall(ok(bodies[0]))
        time.sleep(0.05)
        sock.sendall(ok(bodies[1]))

    server = serve(pair_handler(apart), tls=pki.good)
    client = pool(server.url, verify=str(pki.ca))
    assert client.pipeline([b"a", b"b"]) == [(200, b"0:a"), (200, b"0:b")]


def test_pipeline_deadline_bounds_a_trickling_second_answer(serve, pool) -> None:
    def trickle_second(sock, bodies):
        sock.sendall(ok(bodies[0]) + b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        try:
            for _ in range(200):
                sock.sendall(b"x")
                time.sleep(0.05)
        except OSError:
            pass
        return False

    server = serve(pair_handler(trickle_second))
    client = pool(server.url)
    t = time.monotonic()
    err = unavailable(lambda: client.pipeline([b"a", b"b"], timeout=0.5), "timeout")
    assert time.monotonic() - t < 1.5
    assert err.answers == ((200, b"0:a"),)


def test_async_pipeline_cancelled_after_first_answer_closes_connection(serve) -> None:
    seen_eof = []

    def hang(sock, bodies):
        sock.sendall(ok(bodies[0]))
        sock.settimeout(3)
        try:
            seen_eof.append(sock.recv(1) == b"")
        except OSError:
            seen_eof.append(True)
        return False

    server = serve(pair_handler(hang))
    aio = http11.AsyncPool(http11.origin(server.url, {}, True))

    async def go():
        task = asyncio.ensure_future(aio.pipeline([b"a", b"b"], 5.0, 65536))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        assert not aio._idle
        aio.close()

    asyncio.run(go())
    assert seen_eof == [True]


def test_pipeline_over_tls_two_records_back_to_back(serve, pool, pki) -> None:
    def two_records(sock, bodies):
        sock.sendall(ok(bodies[0]))
        sock.sendall(ok(bodies[1]))

    server = serve(pair_handler(two_records), tls=pki.good)
    client = pool(server.url, verify=str(pki.ca))
    for r in range(5):
        assert client.pipeline([b"a%d" % r, b"b%d" % r], timeout=2) == [
            (200, b"0:a%d" % r),
            (200, b"0:b%d" % r),
        ]


def test_pipeline_over_tls_bytewise(serve, pool, pki) -> None:
    server = serve(pair_handler(bytewise), tls=pki.good)
    client = pool(server.url, verify=str(pki.ca))
    assert client.pipeline([b"a", b"b"], timeout=5) == [(200, b"0:a"), (200, b"0:b")]


def test_request_bytes_on_the_wire(serve, pool) -> None:
    server = serve(serve_keepalive)
    url = f"http://us%65r:p%40ss:w@127.0.0.1:{server.port}/http-bind/a b?x=1&y=ä"
    client = pool(url, {"Content-Type": "text/xml; charset=utf-8", "X-Secret": "s3"})
    assert client.exchange(b"<body/>") == (200, b"0:<body/>")
    basic = base64.b64encode(b"user:p@ss:w").decode()
    assert server.requests == [
        b"POST /http-bind/a%20b?x=1&y=%C3%A4 HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"Content-Type: text/xml; charset=utf-8\r\n"
        + b"X-Secret: s3\r\n"
        + f"Authorization: Basic {basic}\r\n".encode()
        + b"Content-Length: 7\r\n\r\n<body/>"
    ]


# ==========================================================================================
# origin()
# ==========================================================================================


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\0b"])
def test_origin_refuses_a_header_value_that_would_split_the_request(value: str) -> None:
    with pytest.raises(ValueError, match="HTTP header"):
        http11.origin("http://127.0.0.1/http-bind", {"X-Secret": value}, True)


@pytest.mark.parametrize("name", ["X Secret", "X:Secret", "", "X\r\nY"])
def test_origin_refuses_a_bad_header_name(name: str) -> None:
    with pytest.raises(ValueError, match="HTTP header"):
        http11.origin("http://127.0.0.1/http-bind", {name: "v"}, True)


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/http-bind", "127.0.0.1/http-bind", "http:///http-bind", "ws://h/x"]
)
def test_origin_refuses_a_non_http_url(url: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        http11.origin(url, {}, True)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@host:5280/http-bind", "http://user:***@host:5280/http-bind"),
        ("https://user:p%40ss:w@host/b?x=@y#@z", "https://user:***@host/b?x=@y#@z"),
        ("http://user:p@ss@host/", "http://user:***@host/"),  # as urlsplit: the last @
        ("http://token@host/", "http://***@host/"),  # a user name alone may be a secret too
        ("http://user:@host/", "http://user:***@host/"),
        ("user:pw@host/b", "user:***@host/b"),
        ("http://host/a@b", "http://host/a@b"),  # an @ in the path is no userinfo
        ("http://[::1]:5280/b", "http://[::1]:5280/b"),
        ("http://host", "http://host"),
        ("", ""),
        # a password with an unescaped "/", "?" or "#" ends the authority early (urlsplit
        # then reads "s3cr" as the port): the userinfo runs to the last "@"
        ("https://alice:s3cr/et@xmpp.example.org/b", "https://alice:***@xmpp.example.org/b"),
        ("https://alice:s3cr?et@xmpp.example.org/b", "https://alice:***@xmpp.example.org/b"),
        ("https://alice:s3cr#et@xmpp.example.org/b", "https://alice:***@xmpp.example.org/b"),
        ("https://alice:99999/x@host/b", "https://alice:***@host/b"),  # no port either
        ("https://alice:s3cr/et@host/b?x=@y", "https://alice:***@y"),  # more hidden, not less
        ("http://host:5280/a@b", "http://host:5280/a@b"),  # a port: the authority is whole
        ("http://[::1]/a@b", "http://[::1]/a@b"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert http11.redact_url(url) == shown


@pytest.mark.parametrize("c", ["/", "?", "#"])
def test_check_url_refuses_a_password_that_ends_the_authority_early(c: str) -> None:
    """urlsplit takes "alice" for the host and the password's start for the port, and its
    ValueError quotes that "port": check_url's own names the URL without the password."""
    url = f"https://alice:s3cr{c}et@xmpp.example.org/http-bind"
    with pytest.raises(ValueError, match="percent-encoded") as info:
        http11.check_url(url)
    message = str(info.value)
    assert "s3cr" not in message and "alice:***@xmpp.example.org/http-bind" in message
    assert info.value.__suppress_context__
    with pytest.raises(ValueError) as info:
        Prebinder(url)
    assert "s3cr" not in str(info.value)
    with pytest.raises(ValueError, match="out of range") as info:
        http11.check_url(f"https://alice:99999{c}x@xmpp.example.org/http-bind")
    assert "99999" not in str(info.value)


def test_origin_shows_no_password() -> None:
    """The URL the pool names in its errors, and the repr, are without the password (the
    request has it, as Basic auth)."""
    o = http11.origin("http://user:S3cret@127.0.0.1:5280/b", {}, True)
    assert o.url == "http://user:***@127.0.0.1:5280/b"
    assert "S3cret" not in repr(o) and base64.b64encode(b"user:S3cret").decode() not in repr(o)
    assert b"Authorization: Basic " + base64.b64encode(b"user:S3cret") in o.prefix
    with pytest.raises(ValueError, match="not an http") as info:
        http11.origin("ftp://user:S3cret@127.0.0.1/b", {}, True)
    assert "S3cret" not in str(info.value)


def test_pool_errors_show_no_password(pool) -> None:
    client = pool(f"http://user:S3cret@127.0.0.1:{free_port()}/http-bind")
    error = unavailable(lambda: client.exchange(b"x"), "connection-failed")
    assert "S3cret" not in str(error) and "user:***@127.0.0.1" in str(error)


def test_origin_prefix() -> None:
    o = http11.origin(
        "https://bücher.example/bosh",
        {"Content-Length": "1", "transfer-encoding": "chunked", "X-A": "b"},
        True,
    )
    assert (o.host, o.port, o.tls is not None) == ("bücher.example", 443, True)
    # framing headers are the client's alone; an IDN goes on the wire as IDNA
    assert o.prefix == b"POST /bosh HTTP/1.1\r\nHost: xn--bcher-kva.example\r\nX-A: b\r\n"
    assert o.request(b"xy").endswith(b"\r\nContent-Length: 2\r\n\r\nxy")
    # a configured Host header wins, as in httpx
    o = http11.origin("http://10.0.0.1:5280", {"host": "xmpp.example.org"}, True)
    assert (o.port, o.tls) == (5280, None)
    assert o.prefix == b"POST / HTTP/1.1\r\nHost: xmpp.example.org\r\n"


# ==========================================================================================
# TLS
# ==========================================================================================


@dataclasses.dataclass
class PKI:
    ca: Path
    ca_dir: Path  # the CA as an OpenSSL hashed directory (SSL_CERT_DIR / capath)
    good: ssl.SSLContext  # server context: a certificate for 127.0.0.1 and localhost
    wrong_host: ssl.SSLContext  # server context: a certificate for wrong.example only


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    tmp = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("bosh-middleware test CA"))
        .issuer_name(name("bosh-middleware test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca = tmp / "ca.pem"
    ca.write_bytes(ca_pem)
    ca_dir = tmp / "ca-dir"
    ca_dir.mkdir()
    (ca_dir / "ca.pem").write_bytes(ca_pem)
    openssl = shutil.which("openssl")
    if openssl is not None:
        subprocess.run([openssl, "rehash", str(ca_dir)], check=True, timeout=30)

    def server(label: str, sans: list[Any]) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(label))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        certfile, keyfile = tmp / f"{label}.pem", tmp / f"{label}.key"
        certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certfile, keyfile)
        return ctx

    good = server(
        "good",
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    wrong = server("wrong", [x509.DNSName("wrong.example")])
    return PKI(ca, ca_dir, good, wrong)


@pytest.fixture
def no_env_cas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def test_tls_verify_true_refuses_an_unknown_ca(serve, pool, pki, no_env_cas) -> None:
    server = serve(serve_keepalive, tls=pki.good)
    client = pool(server.url, verify=True)
    error = unavailable(lambda: client.exchange(b"x"), "connection-failed")
    assert "certificate" in str(error).lower()
    assert server.requests == []


@pytest.mark.parametrize("how", ["path-str", "path", "directory", "context"])
def test_tls_verify_with_the_ca(serve, pool, pki, no_env_cas, how) -> None:
    if how == "directory" and not any(pki.ca_dir.glob("*.0")):
        pytest.skip("needs `openssl rehash`")
    verify: Any = {
        "path-str": str(pki.ca),
        "path": pki.ca,
        "directory": str(pki.ca_dir),
        "context": ssl.create_default_context(cafile=pki.ca),
    }[how]
    server = serve(serve_keepalive, tls=pki.good)
    client = pool(server.url, verify=verify)
    assert [client.exchange(b"%d" % i) for i in range(3)] == [
        (200, b"0:0"),
        (200, b"0:1"),
        (200, b"0:2"),
    ]
    assert server.connections == 1  # keep-alive over TLS too


@pytest.mark.parametrize("verify", ["path", "false"])
def test_httpx_transport_gets_the_same_tls_settings(serve, pki, no_env_cas, verify) -> None:
    """transport="httpx" builds its client's TLS context as http11 does: a CA bundle path works
    (without httpx 0.28's deprecation warning, an error here), and verify=False skips the check
    of a certificate for another host name."""
    from bosh_middleware import Prebinder

    good = verify == "path"
    server = serve(serve_keepalive, tls=pki.good if good else pki.wrong_host)
    with Prebinder(
        server.url, transport="httpx", verify=str(pki.ca) if good else False
    ) as prebinder:
        response = prebinder._http().post(server.url, content=b"x")
    assert (response.status_code, response.content) == (200, b"0:x")


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_tls_verify_true_honours_the_environment_as_httpx_does(
    serve, pool, pki, monkeypatch, variable
) -> None:
    if variable == "SSL_CERT_DIR" and not any(pki.ca_dir.glob("*.0")):
        pytest.skip("needs `openssl rehash`")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv(variable, str(pki.ca if variable == "SSL_CERT_FILE" else pki.ca_dir))
    server = serve(serve_keepalive, tls=pki.good)
    client = pool(server.url, verify=True)
    assert client.exchange(b"x") == (200, b"0:x")


def test_tls_wrong_host_name_is_refused_unless_verify_false(serve, pool, pki, no_env_cas) -> None:
    server = serve(serve_keepalive, tls=pki.wrong_host)
    checked = pool(server.url, verify=str(pki.ca))
    error = unavailable(lambda: checked.exchange(b"x"), "connection-failed")
    assert "127.0.0.1" in str(error) or "mismatch" in str(error).lower()
    unchecked = pool(server.url, verify=False)
    assert unchecked.exchange(b"y") == (200, b"1:y")


def test_tls_to_a_plain_http_server_is_connection_failed(serve, pool, no_env_cas) -> None:
    def plain_400(index: int, sock: socket.socket, server: RawServer) -> None:
        sock.recv(4096)  # a TLS ClientHello: not HTTP
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    server = serve(plain_400)
    client = pool(server.url.replace("http://", "https://"), verify=False)
    unavailable(lambda: client.exchange(b"x"), "connection-failed")


def test_a_slow_connect_leaves_the_tls_handshake_only_what_is_left(pool) -> None:
    """An overloaded server lets a connect wait (its accept queue is full: the client's SYN
    is dropped and sent again seconds later; 2 s here), then stalls the TLS handshake. The
    handshake must end at the exchange's deadline, not get the whole timeout again after the
    slow connect (the sync pool's blocking handshake kept the socket timeout it was given
    before connecting: 2 s late here)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # room for one connection not yet accepted
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    stop = threading.Event()
    accepted: list[float] = []  # when each connection was taken: the filler, then the client
    held: list[socket.socket] = [filler]

    def accept_late_and_say_nothing() -> None:
        stop.wait(1.5)  # the client's first two SYNs have come and been dropped by now
        while not stop.is_set() and len(accepted) < 2:
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])
                accepted.append(time.monotonic())

    thread = threading.Thread(target=accept_late_and_say_nothing, daemon=True)
    client = pool(f"https://127.0.0.1:{port}/http-bind", verify=False)
    try:
        start = time.monotonic()
        thread.start()
        unavailable(lambda: client.exchange(b"x", timeout=3.5), "timeout")
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join(SOCKET_TIMEOUT)
        for sock in held:
            sock.close()
        listener.close()
    assert len(accepted) == 2 and accepted[1] - start > 1.5, "the connect was not slowed"
    assert elapsed < 4.5, elapsed  # 5.5 s when the handshake has the whole timeout again


def test_ssl_context_choices(pki, monkeypatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    for verify in (True, None, 1, "", str(pki.ca), pki.ca):
        ctx = http11.ssl_context(verify)
        assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True), verify
    off = http11.ssl_context(False)
    assert (off.verify_mode, off.check_hostname) == (ssl.CERT_NONE, False)
    given = ssl.create_default_context()
    assert http11.ssl_context(given) is given
    # plain http gets no context at all
    assert http11.origin("http://127.0.0.1/", {}, False).tls is None


# ==========================================================================================
# client._wants_builtin and PrebindOptions.transport
# ==========================================================================================

PROXY_VARIABLES = [
    f"{scheme}_{case}" for scheme in ("http", "https", "all", "no") for case in ("proxy", "PROXY")
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for variable in [
        *(v.lower() for v in PROXY_VARIABLES),
        *(v.upper() for v in PROXY_VARIABLES),
        "REQUEST_METHOD",
    ]:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


HTTP_URL = "http://xmpp.example.org:5280/http-bind"
HTTPS_URL = "https://xmpp.example.org/http-bind"
AUTO = PrebindOptions()


@pytest.mark.parametrize(
    ("env", "url", "builtin"),
    [
        ({}, HTTP_URL, True),
        ({}, HTTPS_URL, True),
        ({"HTTP_PROXY": "http://proxy:3128"}, HTTP_URL, False),
        ({"http_proxy": "http://proxy:3128"}, HTTP_URL, False),
        ({"HTTP_PROXY": "http://proxy:3128"}, HTTPS_URL, True),  # not for https
        ({"HTTPS_PROXY": "http://proxy:3128"}, HTTPS_URL, False),
        ({"HTTPS_PROXY": "http://proxy:3128"}, HTTP_URL, True),
        ({"ALL_PROXY": "socks5://proxy:1080"}, HTTP_URL, False),
        ({"all_proxy": "socks5://proxy:1080"}, HTTPS_URL, False),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "xmpp.example.org"}, HTTPS_URL, True),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.org"}, HTTPS_URL, True),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "other.org, example.org"}, HTTPS_URL, True),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "*"}, HTTP_URL, True),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "other.example.org"}, HTTPS_URL, False),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1"}, "http://127.0.0.1:5280/b", True),
    ],
)
def test_wants_builtin_follows_the_proxy_environment(clean_env, env, url, builtin) -> None:
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert _wants_builtin(url, AUTO, None) is builtin


def test_wants_builtin_explicit_choices(clean_env) -> None:
    assert _wants_builtin(HTTP_URL, AUTO, client=object()) is False
    assert _wants_builtin(HTTP_URL, PrebindOptions(transport="httpx"), None) is False
    assert _wants_builtin(HTTP_URL, PrebindOptions(transport="builtin"), None) is True
    # an explicit client wins over transport="builtin"
    assert _wants_builtin(HTTP_URL, PrebindOptions(transport="builtin"), client=object()) is False
    clean_env.setenv("HTTP_PROXY", "http://proxy:3128")
    assert _wants_builtin(HTTP_URL, PrebindOptions(transport="builtin"), None) is True
    assert _wants_builtin(HTTP_URL, AUTO, None) is False


def test_the_stagger_grows_after_a_redone_prebind_and_eases_back() -> None:
    from bosh_middleware.client import _MAX_STAGGER, _PIPELINE_STAGGER
    from bosh_middleware.session import PrebindSession

    def session(retried: bool) -> PrebindSession:
        return PrebindSession(jid="a@b/c", sid="s", rid=1, service_url=HTTP_URL, retried=retried)

    p = Prebinder(HTTP_URL)
    a = AsyncPrebinder(HTTP_URL)
    try:
        for client in (p, a):
            assert client.stagger == _PIPELINE_STAGGER
            client._learn(session(retried=True))
            assert client.stagger == 2 * _PIPELINE_STAGGER
            for _ in range(10):
                client._learn(session(retried=True))
            assert client.stagger == _MAX_STAGGER  # bounded
            client._learn(session(retried=False))
            assert client.stagger == pytest.approx(0.9 * _MAX_STAGGER)
            for _ in range(100):
                client._learn(session(retried=False))
            assert client.stagger == _PIPELINE_STAGGER  # back to the floor, not below
        assert Prebinder(HTTP_URL).stagger == _PIPELINE_STAGGER  # per client
    finally:
        p.close()


def test_auto_picks_httpx_where_poll_is_missing(clean_env) -> None:
    """Windows has no select.poll(), which the builtin sync pool waits with."""
    clean_env.setattr(http11, "SUPPORTED", False)
    assert _wants_builtin(HTTP_URL, AUTO, None) is False
    assert _wants_builtin(HTTP_URL, PrebindOptions(transport="builtin"), None) is True


def test_a_misspelt_transport_fails_when_configured(clean_env) -> None:
    with pytest.raises(ValueError, match="transport must be"):
        PrebindOptions(transport="httpz")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transport must be"):
        dataclasses.replace(AUTO, transport="Builtin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transport must be"):
        Prebinder(HTTP_URL, transport="http11")
    with pytest.raises(ValueError, match="transport must be"):
        AsyncPrebinder(HTTP_URL, transport="")
    # and _wants_builtin still checks what it is given
    bogus = PrebindOptions()
    object.__setattr__(bogus, "transport", "httpz")
    with pytest.raises(ValueError, match="transport must be"):
        _wants_builtin(HTTP_URL, bogus, None)


def test_drivers_pick_the_transport(clean_env) -> None:
    with Prebinder(HTTP_URL) as p:
        assert p._builtin is not None
    assert AsyncPrebinder(HTTP_URL)._origin is not None
    clean_env.setenv("HTTP_PROXY", "http://proxy:3128")
    with Prebinder(HTTP_URL) as p:
        assert p._builtin is None
    assert AsyncPrebinder(HTTP_URL)._origin is None


def test_httpx_through_a_proxy_keeps_the_deadline(clean_env, serve) -> None:
    """A proxy is what "auto" picks httpx for: one that trickles the response head (each read
    well within httpx's per-read timeout) is held to the exchange's deadline too."""

    def trickling_proxy(index: int, sock: socket.socket, server: RawServer) -> None:
        request = read_request(sock)
        if request is None:
            return
        server.requests.append(request)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nX-Pad: " + b"a" * 30:
            if server.stopping.wait(0.2):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return

    server = serve(trickling_proxy)
    clean_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    with Prebinder(HTTP_URL, timeout=1.0) as p:
        assert p._builtin is None
        start = time.monotonic()
        unavailable(lambda: p.prebind(Credentials("alice@example.org", "pw")), "timeout")
        assert time.monotonic() - start < 2.0
    assert server.requests[0].startswith(b"POST http://xmpp.example.org:5280/http-bind ")


def serve_bosh_offering_plain(index: int, sock: socket.socket, server: RawServer) -> None:
    """A BOSH server (or a proxy in front of one) that offers PLAIN only and refuses it."""
    hb, sasl = "http://jabber.org/protocol/httpbind", "urn:ietf:params:xml:ns:xmpp-sasl"
    while (request := read_request(sock)) is not None:
        server.requests.append(request)
        body = body_of(request)
        if b"<auth " in body:
            answer = f"<body xmlns='{hb}'><failure xmlns='{sasl}'><not-authorized/></failure>"
        elif b" sid=" not in body:
            answer = (
                f"<body xmlns='{hb}' xmlns:stream='http://etherx.jabber.org/streams' sid='s1'"
                f" requests='2' wait='59'><stream:features><mechanisms xmlns='{sasl}'>"
                "<mechanism>PLAIN</mechanism></mechanisms></stream:features>"
            )
        else:
            answer = f"<body xmlns='{hb}' type='terminate'"
        sock.sendall(ok(answer.encode() + (b"</body>" if answer.endswith(">") else b"/>")))


def test_a_middleware_dropped_unclosed_closes_its_sockets(serve) -> None:
    """A WSGI middleware discarded without ``close()`` (a Django test client's, each app an
    app factory makes: WSGI has no shutdown, and ``close()`` runs at exit): its engine's idle
    keep-alive sockets are closed with its pool, not found open by the garbage collector, which
    warns of each (a ResourceWarning: an error in a test suite that turns warnings into them)."""
    from bosh_middleware import wsgi

    server = serve(serve_bosh_offering_plain)
    session = PrebindSession(jid="a@example.org/r", sid="s1", rid=10, service_url=server.url)
    mw = wsgi.BOSHPrebindMiddleware(lambda environ, start: [], server.url, lambda user: None)
    assert mw.core.prebinder.terminate(session)
    assert mw.core.prebinder._builtin is not None and mw.core.prebinder._builtin._idle
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del mw
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_plain_to_loopback_through_a_proxy_is_refused(clean_env, serve, driver: str) -> None:
    """Plain HTTP to 127.0.0.1 is secure enough for PLAIN, but not once a proxy carries it
    (httpx sends loopback URLs to one too): the password would leave the machine. Refused,
    as to a remote host, unless allowed explicitly; straight to loopback it still goes."""
    from bosh_middleware import AuthenticationFailed, MechanismUnavailable

    proxy = serve(serve_bosh_offering_plain)
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    url = f"http://127.0.0.1:{free_port()}/http-bind"  # nothing there: only the proxy answers
    creds = Credentials("alice@example.org", "s3cret-pencil")

    def prebind(*, given_proxy: str | None = None, **options: Any) -> None:
        if driver == "sync":
            client = None if given_proxy is None else httpx.Client(proxy=given_proxy)
            with contextlib.ExitStack() as stack:
                if client is not None:
                    stack.enter_context(client)
                p = stack.enter_context(Prebinder(url, timeout=3.0, client=client, **options))
                assert p._builtin is None
                p.prebind(creds)
            return

        async def run() -> None:
            client = None if given_proxy is None else httpx.AsyncClient(proxy=given_proxy)
            async with contextlib.AsyncExitStack() as stack:
                if client is not None:
                    await stack.enter_async_context(client)
                p = await stack.enter_async_context(
                    AsyncPrebinder(url, timeout=3.0, client=client, **options)
                )
                assert p._origin is None
                await p.prebind(creds)

        asyncio.run(run())

    def auths(server: RawServer) -> list[bytes]:
        return [r for r in server.requests if b"<auth " in r]

    # a proxy the caller's client was given
    with pytest.raises(MechanismUnavailable, match="through a proxy"):
        prebind(given_proxy=proxy_url)
    # the environment's, which "auto" picks httpx for
    clean_env.setenv("HTTP_PROXY", proxy_url)
    with pytest.raises(MechanismUnavailable, match="through a proxy"):
        prebind()
    assert len(proxy.requests) == 4 and not auths(proxy)  # (create, terminate) * 2
    # allowed explicitly: PLAIN goes (and is refused, by the scripted server)
    with pytest.raises(AuthenticationFailed, match="not-authorized"):
        prebind(allow_insecure_plain=True)
    assert len(auths(proxy)) == 1
    # straight to loopback, with httpx too: PLAIN goes, as before
    clean_env.setenv("NO_PROXY", "127.0.0.1")
    direct = serve(serve_bosh_offering_plain)
    url = direct.url
    with pytest.raises(AuthenticationFailed, match="not-authorized"):
        prebind(transport="httpx")
    assert len(auths(direct)) == 1 and len(auths(proxy)) == 1


def test_only_an_httpx_client_that_sends_to_a_proxy_makes_loopback_http_insecure(
    clean_env,
) -> None:
    from bosh_middleware.client import _through_proxy

    url = "http://127.0.0.1:5280/http-bind"
    with httpx.Client() as client:
        assert not _through_proxy(client, url)
    with httpx.Client(proxy="http://127.0.0.1:3128") as client:
        assert _through_proxy(client, url)
    clean_env.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    with httpx.Client() as client:
        assert _through_proxy(client, url)
        assert _through_proxy(client, "http://localhost/b")
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as client:
        assert not _through_proxy(client, url)  # (a given transport takes no proxy)
    clean_env.setenv("NO_PROXY", "127.0.0.1")
    with httpx.Client() as client:
        assert not _through_proxy(client, url)
        assert _through_proxy(client, "http://localhost/b")  # (httpx's rules, not urllib's)
    assert _through_proxy(object(), url)  # type: ignore[arg-type]  # (cannot say: taken to)


# ==========================================================================================
# The stagger on every event loop
# ==========================================================================================

LOOPS = ["asyncio", "uvloop"]


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop  # a test dependency: uvicorn[standard] runs ASGI apps on it

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.mark.parametrize("kind", LOOPS)
def test_the_stagger_never_goes_off_early(kind: str) -> None:
    """uvloop rounds a timer to whole milliseconds, so a 0.5 ms ``call_later`` runs in the
    next turn; the stagger's timer and sleep must still wait at least their delay."""
    loop = new_loop(kind)

    async def timer() -> float:
        fired: asyncio.Future[float] = loop.create_future()
        t0 = time.perf_counter()
        http11.call_later_not_sooner(loop, 0.0005, lambda: fired.set_result(time.perf_counter()))
        return await fired - t0

    async def sleep() -> float:
        t0 = time.perf_counter()
        await http11.sleep_not_sooner(0.0005)
        return time.perf_counter() - t0

    try:
        for measure in (timer, sleep):
            waited = [loop.run_until_complete(measure()) for _ in range(20)]
            assert min(waited) >= 0.00045, (measure.__name__, waited)
            assert max(waited) < 1.0  # (a loaded machine, not a timer set for seconds)
        # a cancelled one never runs, whichever handle it became
        ran: list[int] = []
        http11.call_later_not_sooner(loop, 0.0005, ran.append, 1).cancel()
        loop.run_until_complete(asyncio.sleep(0.005))
        assert ran == []
    finally:
        loop.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_a_pipelined_batch_is_staggered_on_every_loop(
    serve, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second request of a batch leaves ``stagger`` after the first (on uvloop it went out
    in the same loop turn, and Prosody then often took the bind before the restart)."""
    server = serve(serve_keepalive)
    sent: list[float] = []
    real_send = http11._Conn.send

    def timed_send(self, request, limit, callback):  # type: ignore[no-untyped-def]
        sent.append(time.perf_counter())
        real_send(self, request, limit, callback)

    monkeypatch.setattr(http11._Conn, "send", timed_send)
    pool = http11.AsyncPool(http11.origin(server.url, {}, True))
    loop = new_loop(kind)
    try:
        gaps = []
        for _ in range(10):
            sent.clear()
            answers = loop.run_until_complete(pool.batch([b"a", b"b"], 3.0, LIMIT, None, 0.0005))
            assert [a[1].partition(b":")[2] if a else None for a in answers] == [b"a", b"b"]
            gaps.append(sent[1] - sent[0])
        assert min(gaps) >= 0.00045, gaps
    finally:
        pool.close()
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_the_pool_of_a_loop_closed_without_its_end_goes_with_the_next_loop(
    serve, kind: str
) -> None:
    """A loop closed by ``loop.close()`` alone (no ``shutdown_asyncgens``, in which
    ``asyncio.run`` closes the loop's pool: test_concurrency.py) cannot close its pool's
    sockets any more; its pool is dropped when the prebinder sees the next loop, and the loop
    and the sockets go with it: one such pool at most, not one per loop ever seen."""
    server = serve(serve_bosh_offering_plain)
    prebinder = AsyncPrebinder(server.url)
    session = PrebindSession(jid="a@example.org/r", sid="s1", rid=10, service_url=server.url)
    new_loop(kind).close()  # (what the first loop makes once: uvloop's)
    before = len(os.listdir("/proc/self/fd"))
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    with warnings.catch_warnings():
        # asyncio's and uvloop's own, of each transport such a loop's owner left open
        warnings.simplefilter("ignore", ResourceWarning)
        for _ in range(20):
            loop = new_loop(kind)
            loops.append(weakref.ref(loop))
            assert loop.run_until_complete(prebinder.terminate(session))
            loop.close()
            del loop
            assert len(prebinder._pools) == 1
        gc.collect()
        assert [ref() for ref in loops[:-1]] == [None] * 19
        # a loop that ends as asyncio.run ends it takes the last one away, and its own
        assert asyncio.run(prebinder.terminate(session))
        gc.collect()
    assert not prebinder._pools and loops[-1]() is None
    assert len(os.listdir("/proc/self/fd")) <= before + 2
