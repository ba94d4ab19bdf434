"""A minimal HTTP/1.1 client for BOSH: keep-alive ``POST`` s to one endpoint, sync and async.

The drivers use it unless they are given an httpx client. It exists for speed: a BOSH exchange
is a small POST and a small answer, and a generic client spends most of a prebind's CPU in its
own machinery (httpx + httpcore + h11 + anyio: ~300 us per request; this: ~15 us).

* One pool of idle keep-alive connections per endpoint (per event loop for async). An idle
  connection that has become readable (the server closed it) or has been idle for 30 s (as
  httpx's ``keepalive_expiry``: see ``_IDLE_EXPIRY``) is dropped before reuse, and a
  request on a reused connection that gets no byte back is retried once on a new one.
* ``batch()`` sends a concurrent batch as the httpx path does (one connection per request, in
  RID order with a stagger, read until the batch settles, a request still held closed and
  answered ``None``), but with no thread or event-loop hand-off.
* ``pipeline()`` sends an ordered batch back to back on one connection (HTTP/1.1 pipelining)
  and reads every answer in order. Not for any server: ejabberd 23.01 reads a second pipelined
  request into the body of the first and answers 400. The flow asks for it only where the
  server has shown itself Prosody-like (see ``protocol.ServiceMemory``), and stops where it
  fails.
* Responses are framed by Content-Length, chunked coding or connection close, and read under a
  size limit and one deadline per exchange (DNS lookup, connect, TLS handshake, send and read
  included). Framing is parsed strictly, since a lenient parser is how a hostile or broken server
  desynchronises a keep-alive connection: a response that is not exactly one well-framed
  HTTP/1.x message is an ``http-error``, never a guess.
* https uses ``verify`` as httpx (0.25-0.28) does: True: ``$SSL_CERT_FILE``, else
  ``$SSL_CERT_DIR``, else certifi's CA bundle; a CA file or directory path; an
  ``ssl.SSLContext`` as given; False: no verification. The host name is checked unless False.
* Errors map to ``ServiceUnavailable`` conditions as httpx's do in ``client.py``: anything that
  fails while connecting (refused, DNS, unreachable, TLS handshake or certificate) is
  ``connection-failed``, a deadline ``timeout``, the rest ``http-error``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, TypeVar
from urllib.parse import SplitResult, quote, unquote, urlsplit

from .errors import BOSHError, ProtocolError, ResponseTooLarge, ServiceUnavailable

__all__ = [
    "SUPPORTED",
    "AsyncPool",
    "Origin",
    "Response",
    "SyncPool",
    "origin",
    "redact_url",
    "settle",
    "ssl_context",
]

_MAX_HEAD = 64 * 1024
_MAX_IDLE = 128
#: Seconds a connection may be idle and still be reused, as the httpx transport's
#: ``keepalive_expiry`` (client.py). A NAT, firewall or load balancer on the way may forget an
#: idle connection without a word to either end (no FIN, no RST): nothing shows it is gone,
#: and a request sent on it is never answered, so the page would wait its whole timeout.
_IDLE_EXPIRY = 30.0
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([0-9]{3})(?:[ \t][^\r\n]*)?")
_FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*")
#: Header lines, each with its CRLF, every one of the ``_FIELD_LINE`` shape: one regex call
#: validates a whole head (the common case; obs-fold and errors go line by line).
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r\n)*")
#: The only fields that matter here: the framing, whether the connection can be reused, and a
#: content coding (refused: see ``_Parser._head``).
_FRAMING_FIELDS = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"content-encoding"}
)
#: The status line and header lines of an HTTP/1.1 head, every line well-formed (as
#: ``_STATUS_LINE`` and ``_FIELD_LINES`` want them), through its empty line: ``_Parser._whole``.
#: Only a final status that may have a body (200-599 but 204 and 304). Possessive: no
#: backtracking state kept per line.
_SIMPLE_HEAD = re.compile(
    rb"HTTP/1\.1 (?!204|304)([2-5][0-9]{2})(?:[ \t][^\r\n]*+)?\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]++:[^\r\n]*+\r\n)*+)\r\n"
)
# In the lowercased header lines of such a head, each with the CRLF before it: every line
# starts with a literal, which the regex engine finds fast (IGNORECASE and ``^`` would make it
# try every position).
#: Each Content-Length line's value, where it is plain digits (18 at most) ...
_LENGTH_LINE = re.compile(rb"\r\ncontent-length:[ \t]*+([0-9]{1,18})[ \t]*+(?=\r\n)")
#: ... and any framing line but those and ``Connection: keep-alive`` (chunked, close, an odd
#: length ...), or a content coding but ``identity``: a head with one is left to the general
#: parser. (``content-`` once: Content-Encoding costs the usual head nothing more to look for.)
_ODD_FRAMING = re.compile(
    rb"\r\n(?:transfer-encoding:"
    rb"|content-(?:length:(?![ \t]*[0-9]{1,18}[ \t]*\r\n)|encoding:(?![ \t]*identity[ \t]*\r\n))"
    rb"|connection:(?![ \t]*keep-alive[ \t]*\r\n))"
)
#: The framing fields' lines in a head that ``_FIELD_LINES`` has found well-formed: (name,
#: value), for the general parser (which strips each value's items itself).
_FRAMING_LINES = re.compile(
    rb"^(content-length|transfer-encoding|connection|content-encoding):([^\r\n]*)\r\n",
    re.IGNORECASE | re.MULTILINE,
)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")  # 16 hex digits: anything larger is absurd
#: Characters left as they are in the request target (RFC 3986 pchar, "/", "?" and existing
#: %-escapes); anything else (space, controls, non-ASCII) is %-encoded, as httpx does.
_TARGET_SAFE = "!$&'()*+,;=:@/?%"

#: The sync pool waits with poll(), which Windows lacks: there, "auto" picks httpx.
SUPPORTED = hasattr(select, "poll")
_POLLIN_PRI = select.POLLIN | select.POLLPRI if SUPPORTED else 0

R = TypeVar("R")
Response = tuple[int, bytes]  # (status, body)
Settles = Callable[[list[Response]], bool]


def _is_port(text: str) -> bool:
    """Whether urlsplit takes ``text`` for a port (else the authority was cut short)."""
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) < 65536


def redact_url(url: str) -> str:
    """``url`` as it may be shown (error messages, log lines, reprs): the password of its
    userinfo (``user:pw@host``, sent as Basic auth) replaced by ``***``, and a user name alone
    too (it may be a token). The authority ends where ``urlsplit`` and httpx end it (the first
    ``/``, ``?`` or ``#``), its userinfo at the last ``@``; but a password with one of those
    unescaped ends it early, at a "port" that is no number (``user:s3cr/et@host``), which
    ``check_url`` refuses with this shown in its message: there the userinfo runs to the last
    ``@`` of the URL (more hidden than needed, if the path or query has one, never less).
    Never raises: it is called while reporting other errors, also about URLs that do not
    parse."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = len(rest)
    for c in "/?#":
        i = rest.find(c, 0, end)
        if i >= 0:
            end = i
    at = rest.rfind("@", 0, end)
    _, colon, port = rest[at + 1 : end].rpartition("]")[2].rpartition(":")
    if colon and not _is_port(port) and "@" in rest[end:]:
        at = rest.rfind("@")
    if at < 0:
        return url
    user, colon, _ = rest[:at].partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}{sep}{shown}{rest[at:]}"


@dataclass(frozen=True)
class Origin:
    #: for error messages only, and so with its password redacted (``redact_url``): made once
    url: str
    host: str
    port: int
    tls: ssl.SSLContext | None
    #: "POST <target> HTTP/1.1\r\nHost: ...\r\n<headers>\r\n" without Content-Length; not in the
    #: repr, since it has the Authorization header
    prefix: bytes = field(repr=False)

    def request(self, body: bytes) -> bytes:
        return b"%sContent-Length: %d\r\n\r\n%s" % (self.prefix, len(body), body)


def ssl_context(verify: Any) -> ssl.SSLContext:
    """``verify`` as httpx's ``create_ssl_context`` (0.28, ``trust_env=True``) reads it, so that
    the two transports trust the same CAs. Only ``False`` turns verification off: any other
    value that is not a path or a context verifies against the default CAs."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if isinstance(verify, (str, os.PathLike)):
        path = os.fspath(verify)
        if os.path.isdir(path):
            return ssl.create_default_context(capath=path)
        return ssl.create_default_context(cafile=path)
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    try:
        import certifi  # what httpx uses by default (and depends on)

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - httpx requires certifi
        return ssl.create_default_context()


def check_url(url: str) -> SplitResult:
    """``url`` split, if it can be a BOSH endpoint's (http or https, a host name the resolver
    takes, a port that is a number); ``ValueError`` otherwise, naming the URL without its
    password. Run when the settings are made: "a..b" would otherwise raise UnicodeError, no
    BOSHError, from the lookup at the first page."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {redact_url(url)!r}")
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        raise ValueError(f"not a valid host name in {redact_url(url)!r}") from None
    try:
        _ = parts.port  # (a port that is no number in 0-65535 raises ValueError)
    except ValueError:
        # (not urlsplit's message: it quotes the "port", which is the start of the password
        # where that has an unescaped "/", "?" or "#", ending the authority there)
        port = parts.netloc.rpartition(":")[2]
        why = (
            "port out of range 0-65535" if port.isascii() and port.isdigit() else "not a valid port"
        )
        cut = "@" in parts.path + parts.query + parts.fragment
        hint = " (a '/', '?' or '#' in a password must be percent-encoded)" if cut else ""
        raise ValueError(f"{why} in {redact_url(url)!r}{hint}") from None
    return parts


def check_header(name: str, value: str) -> None:
    """Raise ValueError for a header field that cannot go on the wire as it is, naming it but
    never showing its value (it may be a secret). A line break in a configured value would
    smuggle lines into every request; a character outside Latin-1 has no byte there."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"not an HTTP header name: {name!r}")
    if any(c in value for c in "\r\n\0") or not all(ord(c) < 256 for c in value):
        raise ValueError(
            f"HTTP header {name!r}: its value has a line break, a NUL or a character"
            " outside Latin-1"
        )


def basic_auth(url: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """``url`` without its ``user:password@``, and ``headers`` with the Basic auth that it
    means (as in httpx: a reverse proxy in front), unless they have an Authorization already.
    The password then never is part of a URL that an HTTP client may log (httpx logs each
    request's URL at INFO)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, headers
    fields = dict(headers)
    if not any(k.lower() == "authorization" for k in fields):
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        fields["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl(), fields


def origin(url: str, headers: dict[str, str], verify: Any) -> Origin:
    parts = check_url(url)
    tls = parts.scheme == "https"
    # %-encode what cannot go on the request line as is (a space would split it)
    target = quote(parts.path or "/", safe=_TARGET_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_TARGET_SAFE)
    _, fields = basic_auth(url, headers)
    host = parts.netloc.rsplit("@", 1)[-1]
    if not host.isascii():  # an internationalised domain name goes on the wire as IDNA
        host = host.encode("idna").decode("ascii")
    # a configured Host header wins, as in httpx (a virtual host behind a bare IP address)
    host = next((v for k, v in fields.items() if k.lower() == "host"), host)
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}"]
    for k, v in fields.items():
        check_header(k, v)
        if k.lower() not in ("host", "content-length", "transfer-encoding"):
            lines.append(f"{k}: {v}")
    prefix = ("\r\n".join(lines) + "\r\n").encode("latin-1")
    port = parts.port or (443 if tls else 80)
    tls_context = ssl_context(verify) if tls else None
    assert parts.hostname  # (check_url refused a URL without one)
    return Origin(redact_url(url), parts.hostname, port, tls_context, prefix)


class _Stale(Exception):
    """A reused connection closed before answering: the request can be sent again."""


def _http_error(message: str) -> ServiceUnavailable:
    return ServiceUnavailable(message, condition="http-error")


class _Parser:
    """The bytes of one HTTP/1.1 response in, ``done`` once complete; extra bytes are kept for
    the next response of a pipeline (``leftover()``).

    Strict where framing is concerned (RFC 9112 section 6): a status line that is not
    ``HTTP/1.x NNN``, a malformed header line, a Content-Length that is not digits or is given
    twice with different values, a transfer coding other than exactly ``chunked``, a chunk size
    that is not hex, or chunk data not followed by CRLF are errors, not guesses; so is a content
    coding other than ``identity``, which no request asks for (a ``ProtocolError``). Bytes are
    bounded: the head and each chunk-size or trailer line by 64 KiB, the body by ``limit``
    (a declared Content-Length or chunk size over it is refused before its bytes are read)."""

    # Defaults as class attributes (no __slots__): a new parser sets three attributes, not
    # eleven, and one is made for every request.
    _framing = "head"  # head | length | chunked | close
    _remaining = 0  # length: body bytes left; chunked: trailer bytes allowed
    _chunk = -1  # chunked: -1 = size line next, -2 = trailers, n >= 0 = bytes left
    _scan = 0  # where to resume looking for a line end: a trickled head stays O(n)
    status = 0
    keep_alive = False
    done = False
    got = False

    def __init__(self, limit: int, leftover: bytes = b"") -> None:
        self._limit = limit
        self._buf = bytearray()
        self.body: bytes | bytearray = bytearray()  # bytes when taken in one pass
        if leftover:
            self.feed(leftover)

    def leftover(self) -> bytes:
        return bytes(self._buf)

    def feed(self, data: bytes) -> None:
        if self._framing == "head" and not self._buf and data and self._whole(data):
            return
        if data:
            self.got = True
            self._buf += data
        while not self.done:
            before = (self._framing, self._chunk, len(self._buf))
            if self._framing == "head":
                self._head()
            elif self._framing == "length":
                take = min(self._remaining, len(self._buf))
                self._add(self._buf[:take])
                del self._buf[:take]
                self._remaining -= take
                self.done = self._remaining == 0
            elif self._framing == "chunked":
                self._chunked()
            else:
                self._add(self._buf)
                self._buf.clear()
            if (self._framing, self._chunk, len(self._buf)) == before and not self.done:
                return

    def _whole(self, data: bytes) -> bool:
        """The usual answer, in full in one read: HTTP/1.1, a well-formed head whose framing is
        one plain Content-Length (and maybe ``Connection: keep-alive``), and all of its body.
        Taken in one pass; anything else (or anything odd) is left to the general parser, with
        nothing consumed, which reaches the same result or the same error the long way."""
        head = _SIMPLE_HEAD.match(data)
        if head is None:
            return False
        start = head.end()
        if start > _MAX_HEAD:
            return False
        # framing in C: exactly one plain Content-Length, and no other framing line
        lines = data[head.start(2) - 2 : start].lower()
        lengths = _LENGTH_LINE.findall(lines)
        if len(lengths) != 1 or _ODD_FRAMING.search(lines):
            return False
        end = start + int(lengths[0])
        if end - start > self._limit or len(data) < end:
            return False
        self.got = self.done = self.keep_alive = True
        self.status = int(head[1])
        self.body = data[start:end]
        if end < len(data):
            self._buf += memoryview(data)[end:]
        return True

    def eof(self) -> None:
        if self.done:
            return
        if self._framing == "close":
            self.done = True
        elif not self.got:
            raise _Stale
        else:
            raise _http_error("BOSH connection closed mid-response")

    def _add(self, data: bytes | bytearray) -> None:
        self.body += data
        if len(self.body) > self._limit:
            raise ResponseTooLarge(f"BOSH response exceeds {self._limit} bytes")

    def _find(self, sep: bytes, what: str) -> int:
        """Index of ``sep`` in the buffer, or -1 (more bytes needed); at most 64 KiB ahead."""
        end = self._buf.find(sep, self._scan)
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                raise _http_error(f"BOSH response {what} too large")
            self._scan = max(0, len(self._buf) - len(sep) + 1)
            return -1
        if end > _MAX_HEAD:  # found, but only after too much (a single large read)
            raise _http_error(f"BOSH response {what} too large")
        self._scan = 0
        return end

    def _head(self) -> None:
        end = self._find(b"\r\n\r\n", "head")
        if end < 0:
            return
        block = bytes(self._buf[: end + 2])  # the status line and header lines, each with CRLF
        del self._buf[: end + 4]
        first = block.find(b"\r\n") + 2  # where the header lines start (block ends with CRLF)
        status = _STATUS_LINE.fullmatch(block, 0, first - 2)
        if status is None:  # also a head that starts with header lines (no status line)
            raise _http_error("malformed HTTP status line")
        http11, self.status = status[1] != b"0", int(status[2])
        if self.status == 101:  # only an Upgrade request may get it, and this sends none
            raise _http_error("unexpected 101 Switching Protocols")
        if 100 <= self.status < 200:  # interim: the real response follows
            return
        fields: list[tuple[bytes, bytes]] = []
        if _FIELD_LINES.fullmatch(block, first):
            # every line well-formed (the usual case): only the framing fields are read, and
            # found in C rather than by a Python loop over every line
            fields = [(n.lower(), v) for n, v in _FRAMING_LINES.findall(block, first)]
        else:
            for line in block[first:-2].split(b"\r\n"):
                if line[:1] in (b" ", b"\t") and fields:  # obs-fold: a continuation, read as SP
                    name, value = fields[-1]
                    fields[-1] = (name, value + b" " + line.strip(b" \t"))
                    continue
                match = _FIELD_LINE.fullmatch(line)
                if match is None:
                    raise _http_error("malformed HTTP header line")
                fields.append((match[1].lower(), match[2]))
        lengths: set[bytes] = set()
        codings: list[bytes] = []
        connection: set[bytes] = set()
        for name, value in fields:
            if name not in _FRAMING_FIELDS:
                continue
            items = [v.strip(b" \t").lower() for v in value.split(b",")]
            if name == b"content-length":
                lengths.update(items)
            elif name == b"transfer-encoding":
                codings += [c for c in items if c]
            elif name == b"connection":
                connection.update(items)
            elif any(c not in (b"", b"identity") for c in items):
                # Every request asks for identity. A compressed body would reach the XML
                # parser as garbage, and only its compressed size would be held to the limit
                # (the httpx transport refuses it too: client.py).
                coding = value.strip(b" \t")[:40].decode("latin-1")
                raise ProtocolError(f"BOSH response has Content-Encoding {coding!r}")
        self.keep_alive = b"close" not in connection if http11 else b"keep-alive" in connection
        if self.status in (204, 304):  # never a body, whatever the headers say
            self.done = True
        elif codings:
            # Only chunked can be decoded (no TE header is sent, so no other coding may be
            # used); HTTP/1.0 has no Transfer-Encoding at all (RFC 9112 6.1: faulty framing).
            if codings != [b"chunked"] or not http11:
                raise _http_error(f"unsupported Transfer-Encoding: {b', '.join(codings)!r}")
            self._framing, self._remaining = "chunked", _MAX_HEAD
            if lengths:  # both: chunked wins, but the sender is confused - do not reuse
                self.keep_alive = False
        elif lengths:
            (length,) = lengths if len(lengths) == 1 else (b"",)  # "5, 5" is one length
            if not length.isdigit():  # also rejects "-5", "+5", "0x5", " 5 5", "1_0"
                raise _http_error("bad or conflicting Content-Length")
            if len(length) > 18 or int(length) > self._limit:
                raise ResponseTooLarge(
                    f"BOSH response declares {length[:24].decode()} bytes, limit is {self._limit}"
                )
            self._framing, self._remaining = "length", int(length)
            self.done = self._remaining == 0
        else:
            self._framing, self.keep_alive = "close", False

    def _chunked(self) -> None:
        if self._chunk in (-1, -2):
            end = self._find(b"\r\n", "chunk framing")
            if end < 0:
                return
            line = bytes(self._buf[:end])
            del self._buf[: end + 2]
            if self._chunk == -2:
                # trailers (ignored) end with an empty line; their total is bounded too
                self._remaining -= end + 2
                if self._remaining < 0:
                    raise _http_error("BOSH response trailers too large")
                self.done = not line
                return
            size = line.split(b";", 1)[0].strip(b" \t")  # chunk extensions are ignored
            if not _CHUNK_SIZE.fullmatch(size):  # int(x, 16) takes "-5", "+5", "0x5", "1_0"
                raise _http_error("bad chunk size")
            chunk = int(size, 16)
            if chunk > self._limit - len(self.body):
                raise ResponseTooLarge(f"BOSH response chunk exceeds the {self._limit}-byte limit")
            self._chunk = chunk if chunk else -2
            return
        take = min(len(self._buf), self._chunk)
        if take:
            self._add(self._buf[:take])
            del self._buf[:take]
            self._chunk -= take
        if self._chunk or len(self._buf) < 2:
            return
        if self._buf[:2] != b"\r\n":  # chunk data longer than its size said: out of step
            raise _http_error("chunk data not followed by CRLF")
        del self._buf[:2]
        self._chunk = -1


# --- sync ----------------------------------------------------------------------------------------
#: A reused connection that fails like this before any byte of the answer has come back was
#: closed by the server while idle (a race with the readability check): send again, once, on a
#: new connection. Safe for BOSH: a request the server did get is answered again for its RID.
_RETRYABLE = (_Stale, ConnectionError)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _with_answers(exc: BOSHError, answers: Sequence[Response]) -> BOSHError:
    """``exc`` of a pipeline that failed after some of its answers had come: those answers,
    in order, go with it (``exc.answers``), since the server has acted on those requests (a
    SASL failure in the first one must be reported, not the request made again)."""
    if answers:
        exc.answers = tuple(answers)
    return exc


def _connect_failed(url: str, exc: OSError) -> ServiceUnavailable:
    return ServiceUnavailable(f"cannot connect to {url}: {exc}", condition="connection-failed")


def _readable(sock: Any) -> bool:
    """An idle keep-alive socket with something to read has been closed by the server (or is
    out of step): either way not reusable. poll(), not select(): a busy process has fds > 1023.
    TLS bytes already decrypted are invisible to poll(), hence ``pending()``."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        poller = select.poll()
        poller.register(sock, _POLLIN_PRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


#: fork()s this process has gone through, as its child: a pool made before one holds the
#: parent's sockets. (Counted, not read with getpid(): that would be two syscalls a request.)
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_forked)

_resolver: ThreadPoolExecutor | None = None
_resolver_pid = 0
_resolver_lock = threading.Lock()


def resolve(host: str, port: int, timeout: float) -> list[Any]:
    """``getaddrinfo`` within ``timeout``. The C resolver takes no timeout: with a DNS server
    that does not answer it blocks for its own (5 s per try and server by default), and the
    page with it. So a name is looked up on a small thread pool (one per process: threads do
    not survive fork()), and a lookup that overruns is left to finish there. An IP address
    needs no lookup."""
    global _resolver, _resolver_pid
    try:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    with _resolver_lock:
        if _resolver is None or _resolver_pid != os.getpid():
            _resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bosh-dns")
            _resolver_pid = os.getpid()
        resolver = _resolver
    future = resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()  # if it has not started yet
        raise TimeoutError(f"DNS lookup of {host} took over {timeout:.2f} s") from None


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """``socket.create_connection`` with the lookup bounded too, and one deadline for all."""
    errors: list[OSError] = []
    for family, kind, proto, _, address in resolve(host, port, _left(deadline)):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            errors.append(exc)
    raise errors[0] if errors else OSError(f"{host} has no address")


class SyncPool:
    """Idle keep-alive sockets to one origin; thread-safe; not inherited across fork()."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        #: (socket, when it was given back), the most recent last
        self._idle: list[tuple[socket.socket, float]] = []
        self._lock = threading.Lock()
        self._forks = _forks

    def _acquire(self, deadline: float) -> tuple[socket.socket, bool]:
        """An idle connection (reused=True) or a new one, connected by ``deadline``.
        Any failure to connect (refused, DNS, TLS handshake or certificate) is
        ``connection-failed``, as httpx's ConnectError is; running out of time is a timeout."""
        if self._forks != _forks:
            with self._lock:
                if self._forks != _forks:
                    # The parent's sockets: not ours to use. Closing our copy of the
                    # descriptor does not close the parent's connection.
                    idle, self._idle, self._forks = self._idle, [], _forks
                    for sock, _ in idle:
                        sock.close()
        idle = self._idle
        while idle:
            try:
                sock, since = idle.pop()  # atomic (as append in _release): no lock here
            except IndexError:  # another thread took the last one
                break
            if time.monotonic() - since < _IDLE_EXPIRY and not _readable(sock):
                return sock, True
            sock.close()
        o = self.origin
        raw: socket.socket | None = None
        try:
            raw = _connect(o.host, o.port, deadline)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if o.tls is not None:  # the blocking handshake: what is left, not the connect's
                raw.settimeout(_left(deadline))  # timeout again (a slow connect doubled it)
            sock = raw if o.tls is None else o.tls.wrap_socket(raw, server_hostname=o.host)
            sock.setblocking(False)  # from now on, deadlines are kept by _wait (see _send)
            return sock, False
        except OSError as exc:
            if raw is not None:
                raw.close()
            if isinstance(exc, TimeoutError):
                raise
            raise _connect_failed(o.url, exc) from None

    def _release(self, sock: socket.socket) -> None:
        if len(self._idle) < _MAX_IDLE and self._forks == _forks:
            self._idle.append((sock, time.monotonic()))
        else:
            sock.close()

    def close(self) -> None:
        """Close the idle connections (also what a stale one means for its siblings: the server
        restarted or timed them out, so the retry must not pick another of them)."""
        # One pop at a time, as _acquire takes them: a socket is either closed here or taken
        # there, never both (swapping the list would let _acquire take one being closed).
        idle = self._idle
        for _ in range(len(idle)):  # (those given back meanwhile are new: they may stay)
            try:
                sock, _ = idle.pop()
            except IndexError:
                break
            sock.close()

    def __del__(self) -> None:
        # Dropped unclosed (its middleware discarded: WSGI has no shutdown, and PrebindCore
        # closes it at exit only): the idle sockets go with it, closed, rather than found open
        # by the garbage collector, which warns of each (ResourceWarning).
        self.close()

    def exchange(self, body: bytes, timeout: float, limit: int) -> Response:
        """POST ``body``; ``timeout`` bounds the whole exchange, connecting included."""
        return self._pipeline((body,), timeout, limit)[0]

    def pipeline(self, bodies: Sequence[bytes], timeout: float, limit: int) -> list[Response]:
        """POST the bodies back to back on one connection (HTTP/1.1 pipelining: the server
        reads them in order) and read every answer, in order; ``timeout`` bounds it all. As in
        ``exchange``, when a reused connection turns out closed before any byte came back, the
        whole pipeline goes again, once, on a new connection. A connection that ends after an
        answer with more to come is an ``http-error``: something on the way does not
        pipeline."""
        # (``exchange`` runs ``_pipeline`` too, not this: a wrapper of either sees only its own)
        return self._pipeline(bodies, timeout, limit)

    def _pipeline(self, bodies: Sequence[bytes], timeout: float, limit: int) -> list[Response]:
        results: list[Response] = []
        try:
            deadline = time.monotonic() + timeout
            origin = self.origin
            request = b"".join([origin.request(body) for body in bodies])
            for _attempt in range(2):
                sock, reused = self._acquire(deadline)
                parser = _Parser(limit)
                results = []
                try:
                    _round_trip(sock, request, parser, deadline)
                    results.append((parser.status, bytes(parser.body)))
                    while len(results) < len(bodies):
                        if not parser.keep_alive:
                            raise _http_error("BOSH server ended a pipelined connection early")
                        parser = _Parser(limit, parser.leftover())
                        _read(sock, parser, deadline)
                        results.append((parser.status, bytes(parser.body)))
                except _RETRYABLE as exc:
                    sock.close()
                    # (a request on a reused connection the server had closed: sent again)
                    if reused and not results and not parser.got:
                        self.close()
                        continue
                    if isinstance(exc, _Stale):
                        raise _http_error("BOSH server closed the connection") from None
                    raise
                except BaseException:
                    sock.close()
                    raise
                self._finish(sock, parser)
                return results
            raise _http_error("BOSH server keeps closing connections")
        except OSError as exc:  # (ServiceUnavailable is no OSError)
            raise _with_answers(_unavailable(exc, origin.url), results) from None
        except BOSHError as exc:
            _with_answers(exc, results)
            raise

    def batch(
        self,
        bodies: Sequence[bytes],
        timeout: float,
        limit: int,
        settles: Settles | None,
        stagger: float,
    ) -> list[Response | None]:
        """POST each body on its own connection, in order, ``stagger`` s apart, and read the
        answers until ``settles`` says they are enough; a request the server still holds is
        closed (so the server drops it) and answers ``None``. ``timeout`` bounds it all. As in
        ``exchange``, a request on a reused connection that the server closed before any byte
        of the answer is sent again, once, on a new connection."""
        try:
            deadline = time.monotonic() + timeout
            socks: list[socket.socket] = []
            parsers: list[_Parser] = []
            reused: list[bool] = []
            results: list[Response | None] = [None] * len(bodies)
            poller = select.poll()  # no selector object: no epoll fd to make and close
            index: dict[int, int] = {}

            def start(i: int) -> None:
                sock, again = self._acquire(deadline)
                if i == len(socks):
                    socks.append(sock)
                    parsers.append(_Parser(limit))
                    reused.append(again)
                else:  # sent again: the stale connection is already closed
                    socks[i], parsers[i], reused[i] = sock, _Parser(limit), False
                try:
                    _send(sock, self.origin.request(bodies[i]), deadline)
                except ConnectionError:
                    if not reused[i]:
                        raise
                    restart(i)
                    return
                poller.register(sock, select.POLLIN)
                index[sock.fileno()] = i

            def restart(i: int) -> None:
                old = socks[i]
                index.pop(old.fileno(), None)
                with contextlib.suppress(KeyError, ValueError):
                    poller.unregister(old)
                old.close()
                self.close()  # its idle siblings are as stale (see close())
                start(i)  # (on a new connection: not reused)

            try:
                for i in range(len(bodies)):
                    if i and stagger:
                        time.sleep(stagger)
                    start(i)
                pending = set(range(len(bodies)))
                while pending:
                    events = poller.poll(_left(deadline) * 1000)
                    if not events:
                        raise TimeoutError
                    for fd, _ in events:
                        i = index[fd]
                        try:
                            chunk = _recv_all(socks[i])
                        except (BlockingIOError, ssl.SSLWantReadError):
                            continue  # readable, but not a whole TLS record yet
                        except ssl.SSLWantWriteError:
                            _wait(socks[i], select.POLLOUT, deadline)
                            continue
                        except ConnectionError:
                            if reused[i] and not parsers[i].got:
                                restart(i)
                                continue
                            raise
                        if chunk:
                            parsers[i].feed(chunk)
                        else:
                            try:
                                parsers[i].eof()
                            except _Stale:
                                if reused[i]:
                                    restart(i)
                                    continue
                                raise _http_error("BOSH server closed the connection") from None
                        if parsers[i].done:
                            results[i] = (parsers[i].status, bytes(parsers[i].body))
                            poller.unregister(socks[i])
                            pending.discard(i)
                    if settles is not None and settles([r for r in results if r is not None]):
                        break
            finally:
                for sock, parser in zip(socks, parsers, strict=False):
                    self._finish(sock, parser)
            return results
        except OSError as exc:  # (ServiceUnavailable is no OSError)
            raise _unavailable(exc, self.origin.url) from None

    def _finish(self, sock: socket.socket, parser: _Parser) -> None:
        if parser.done and parser.keep_alive and not parser._buf:  # (no leftover bytes)
            self._release(sock)
        else:
            sock.close()  # unusable, or a request the server still holds: closing drops it


def _wait(sock: socket.socket, event: int, deadline: float) -> None:
    """Until ``sock`` is ready for ``event`` (or has failed: the next call says how), at most
    until ``deadline``. The sockets are non-blocking and this is their only wait: one poll()
    per wait, where a socket with a timeout would cost an ioctl and a poll() per call."""
    poller = select.poll()
    poller.register(sock, event)
    if not poller.poll(_left(deadline) * 1000):
        raise TimeoutError


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            _wait(sock, select.POLLOUT, deadline)
            continue
        except ssl.SSLWantReadError:  # TLS wants the peer's bytes first (renegotiation)
            _wait(sock, select.POLLIN, deadline)
            continue
        view = view[sent:]


def _recv_all(sock: socket.socket) -> bytes:
    """What is readable now, including what TLS has already decrypted: poll() cannot see
    bytes buffered inside an SSL object, and would wait for more that may never come."""
    chunk = sock.recv(65536)
    if chunk and isinstance(sock, ssl.SSLSocket):
        while sock.pending():
            chunk += sock.recv(65536)
    return chunk


def _round_trip(sock: socket.socket, request: bytes, parser: _Parser, deadline: float) -> None:
    """Send ``request`` and read its answer into ``parser``. The usual exchange is one send(),
    one wait and one recv(): one poll object serves every wait of the read, where ``_wait``
    would make one per wait."""
    _send(sock, request, deadline)
    _read(sock, parser, deadline)


def _read(sock: socket.socket, parser: _Parser, deadline: float) -> None:
    """Read an answer into ``parser`` (which may have it already: a pipelined answer that
    came with the one before)."""
    if parser.done:
        return
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while not parser.done:
        # wait first: an answer is never back within the microseconds since the send
        if not poller.poll(_left(deadline) * 1000):
            raise TimeoutError
        try:
            chunk = _recv_all(sock)
        except (BlockingIOError, ssl.SSLWantReadError):
            continue  # readable, but not a whole TLS record yet
        except ssl.SSLWantWriteError:
            _wait(sock, select.POLLOUT, deadline)
            continue
        if not chunk:
            parser.eof()
            return
        parser.feed(chunk)


# --- async ---------------------------------------------------------------------------------------
#: Read buffer of an async connection. BOSH answers are small; a larger one takes more reads.
_READ_SIZE = 16 * 1024


def call_later_not_sooner(
    loop: asyncio.AbstractEventLoop, delay: float, callback: Callable[..., object], *args: Any
) -> asyncio.Handle | _NotSooner:
    """``loop.call_later`` that does not go off before ``delay``, even on uvloop.

    libuv keeps timers in whole milliseconds, and uvloop rounds the delay to the nearest one:
    a 0.5 ms stagger becomes 0, and the callback runs in the loop's next turn. Sent that soon,
    the pipelined bind overtook its restart at Prosody in 12 % of prebinds, and each of those
    was redone one request at a time. uvloop hands back a plain ``Handle`` (no ``when()``) when
    it has rounded a delay away; such a delay is kept by ``_NotSooner`` instead."""
    handle = loop.call_later(delay, callback, *args)
    if delay > 0 and not hasattr(handle, "when"):
        handle.cancel()
        return _NotSooner(loop, delay, callback, args)
    return handle


class _NotSooner:
    """A timer for less than a millisecond on uvloop: its shortest timer (1 ms) can still go
    off early, since libuv counts from the time it read at the start of the loop's turn, so
    the clock is checked when it does, and the timer set again if it is early."""

    __slots__ = ("_args", "_callback", "_due", "_handle", "_loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        delay: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:
        self._loop, self._callback, self._args = loop, callback, args
        self._due = time.monotonic() + delay
        self._handle = loop.call_later(0.001, self._fire)

    def _fire(self) -> None:
        if time.monotonic() < self._due:
            self._handle = self._loop.call_later(0.001, self._fire)
            return
        self._callback(*self._args)

    def cancel(self) -> None:
        self._handle.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def sleep_not_sooner(delay: float) -> None:
    """``asyncio.sleep(delay)`` that does not end early on uvloop (see
    ``call_later_not_sooner``)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    handle = call_later_not_sooner(loop, delay, _wake, future)
    try:
        await future
    finally:
        handle.cancel()


class _Conn(asyncio.BufferedProtocol):
    """One keep-alive connection whose bytes go straight into the current exchange's
    ``_Parser``: no StreamReader between the socket and the parser, and no future either. The
    exchange's ``callback`` is called from the loop's read callback once the answer is
    complete or has failed, so the next request of a prebind goes out in the same turn of the
    loop (see ``_Batch``).

    Buffered: the socket is read into this connection's own buffer. A plain ``Protocol``
    gets a new bytes object from each read, which asyncio allocates at 256 KiB before
    trimming it: above glibc's mmap threshold, that can be an mmap, two page faults, an
    mremap and a munmap for every answer (0.3-0.4 ms of CPU per prebind on a VM here),
    depending only on what the process freed before."""

    __slots__ = ("_view", "callback", "dead", "idle_since", "parser", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: _Parser | None = None
        self.callback: Callable[[_Conn, BaseException | None], None] | None = None
        #: closed, at EOF, or sent bytes while idle (e.g. a 408 before closing, which would
        #: be read as the answer to the next request): never to be reused
        self.dead = False
        #: when it was last given back to the pool (``_IDLE_EXPIRY``)
        self.idle_since = 0.0
        # a view, not the bytearray: the TLS layer fills it through slices of what it gets
        self._view = memoryview(bytearray(_READ_SIZE))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._view[:nbytes]))

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or parser.done:
            self.dead = True
            return
        try:
            parser.feed(data)
        except Exception as exc:  # handed to the exchange that waits for this answer
            self._settle(exc)
            return
        if parser.done:
            self._settle(None)

    def eof_received(self) -> bool | None:
        self.dead = True
        self._ended()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if exc is not None:
            self._settle(exc)
        else:
            self._ended()

    def _ended(self) -> None:
        """The server closed its side: a close-delimited answer is complete, anything else
        that is not is stale (nothing came back) or cut short (see ``_Parser.eof``)."""
        parser = self.parser
        if parser is None or parser.done:
            return
        try:
            parser.eof()
        except Exception as exc:  # handed to the exchange that waits for this answer
            self._settle(exc)
            return
        self._settle(None)

    def _settle(self, exc: BaseException | None) -> None:
        callback = self.callback
        if callback is not None:
            self.callback = None
            callback(self, exc)

    def send(
        self, request: bytes, limit: int, callback: Callable[[_Conn, BaseException | None], None]
    ) -> None:
        """Start an exchange: its parser and callback are in place before the request leaves,
        so no byte of the answer can come before them."""
        assert self.transport is not None
        self.parser = _Parser(limit)
        self.callback = callback
        self.transport.write(request)

    def usable(self) -> bool:
        """Idle, open and quiet: bytes or a FIN that the event loop has not read yet (it has
        not run since they came) are looked for on the socket itself."""
        transport = self.transport
        if self.dead or transport is None or transport.is_closing():
            return False
        sock = transport.get_extra_info("socket")
        return sock is None or not _readable(sock)

    def abort(self) -> None:
        """Close now, dropping unsent bytes: ``close()`` would wait for a server that does not
        read to take them first, and keep the socket open meanwhile."""
        self.dead = True
        self.callback = None
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.dead = True
        self.callback = None
        if self.transport is not None:
            self.transport.close()


#: ``_Batch``'s ``done``: (answers, None) or (None, the error as ``ServiceUnavailable`` ...).
Done = Callable[[list[Response | None] | None, BaseException | None], None]


class _Batch:
    """One exchange or one pipelined batch, run from callbacks: the connections' (an answer
    is complete) and the loop's (the stagger, the pool's watchdog). ``done`` is called once, from
    one of them, never from ``start``.

    No task and no future per request: an answer that completes the batch is handed to
    ``done`` in the loop turn that read it, where awaiting a future costs a second turn and
    the resumption of every coroutine frame between the task and the future, on each of a
    prebind's five answers (see docs/benchmarks.md). A new connection is the exception: it is
    made by a task (``create_connection`` is a coroutine), which then goes on as the others."""

    __slots__ = (
        "_conns",
        "_done",
        "_limit",
        "_loop",
        "_next",
        "_ordered",
        "_over",
        "_pending",
        "_pool",
        "_requests",
        "_results",
        "_retried",
        "_reused",
        "_settles",
        "_stagger",
        "_tasks",
        "_unsent",
        "deadline",
    )

    def __init__(
        self,
        pool: AsyncPool,
        bodies: Sequence[bytes],
        timeout: float,
        limit: int,
        settles: Settles | None,
        stagger: float,
        done: Done,
        ordered: bool = False,
    ) -> None:
        self._pool = pool
        self._loop = loop = pool.loop()
        self._requests = [pool.origin.request(body) for body in bodies]
        n = len(bodies)
        #: Ordered: all the requests in one write on one connection (HTTP/1.1 pipelining),
        #: sent as request 0; their answers come on it in order (see ``_answered``).
        self._ordered = ordered
        if ordered:
            self._requests = [b"".join(self._requests)]
        sent = len(self._requests)
        self._conns: list[_Conn | None] = [None] * sent
        self._reused = [False] * sent
        self._retried = [False] * sent
        self._results: list[Response | None] = [None] * n
        self._tasks: list[asyncio.Task[None]] = []
        self._pending = n
        self._unsent = sent
        self._limit = limit
        self._settles = settles
        self._stagger = stagger
        self._done = done
        self._over = False
        self._next: asyncio.Handle | _NotSooner | None = None
        #: on the loop's clock: every connect, send and answer of the batch is bounded by it
        self.deadline = loop.time() + timeout

    def start(self) -> _Batch:
        self._pool._watch(self)
        try:
            self._start(0)
        except BaseException as exc:  # (never ``done`` from here: see the class)
            self._loop.call_soon(self._fail, exc)
        return self

    def cancel(self) -> None:
        """From the caller, which no longer waits for ``done``: every request still open is
        closed, so the server drops it."""
        if not self._over:
            self._over = True
            self._clean_up()

    def _start(self, i: int) -> None:
        conn = self._pool._take()
        if conn is None:
            self._tasks.append(self._loop.create_task(self._connect(i)))
        else:
            self._send(i, conn, True)

    def _start_later(self, i: int) -> None:
        self._next = None
        try:
            self._start(i)
        except BaseException as exc:
            self._fail(exc)

    async def _connect(self, i: int) -> None:
        try:
            conn, reused = await self._pool._acquire(self.deadline)
            if self._over:
                conn.close()
                return
            self._send(i, conn, reused)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    def _send(self, i: int, conn: _Conn, reused: bool) -> None:
        """Request ``i`` on ``conn``, then the next one, ``stagger`` s later: in order on the
        wire (the next one is started only once this one is sent)."""
        self._conns[i] = conn
        self._reused[i] = reused
        conn.send(self._requests[i], self._limit, self._answered)
        if self._retried[i]:
            return
        self._unsent -= 1
        if self._unsent:
            if self._stagger:
                self._next = call_later_not_sooner(
                    self._loop, self._stagger, self._start_later, i + 1
                )
            else:
                self._start(i + 1)
        elif self._pending < len(self._requests):  # (never within ``start``: no answer yet)
            self._maybe_end()

    def _answered(self, conn: _Conn, exc: BaseException | None) -> None:
        i = self._conns.index(conn)
        parser = conn.parser
        assert parser is not None
        if exc is not None:
            # As in ``SyncPool.exchange``: a request on a reused connection that the server
            # closed before any byte of the answer is sent again, once, on a new connection
            # (an ordered batch: only before its first answer).
            if (
                isinstance(exc, _RETRYABLE)
                and self._reused[i]
                and not parser.got
                and (not self._ordered or self._pending == len(self._results))
            ):
                conn.abort()
                self._conns[i] = None
                self._retried[i] = True
                self._reused[i] = False
                self._pool.close()  # its idle siblings are as stale
                self._tasks.append(self._loop.create_task(self._connect(i)))
                return
            self._fail(exc)
            return
        # (an ordered batch's answers come in order, all on its one connection)
        answer = len(self._results) - self._pending if self._ordered else i
        self._results[answer] = (parser.status, bytes(parser.body))
        self._pending -= 1
        if self._ordered and self._pending:  # more to come, on this connection
            self._next_answer(conn, parser)
            return
        self._conns[i] = None
        conn.parser = None
        if parser.keep_alive and not parser._buf:  # (no leftover bytes)
            self._pool._release(conn)
        else:
            conn.close()
        self._maybe_end()

    def _next_answer(self, conn: _Conn, parser: _Parser) -> None:
        """An ordered batch's next answer, from the bytes that came after the last one (it may
        be complete already) and those still to come."""
        if not parser.keep_alive:
            self._fail(_http_error("BOSH server ended a pipelined connection early"))
            return
        try:
            conn.parser = nxt = _Parser(self._limit, parser.leftover())
        except Exception as exc:
            self._fail(exc)
            return
        if nxt.done:
            self._answered(conn, None)
        else:
            conn.callback = self._answered

    def _maybe_end(self) -> None:
        """Done once every answer is in, or once ``settles`` says the answers in are enough,
        but never before every request is sent: a BOSH server that never saw a RID would
        wait for it, where one it saw and lost the connection of has moved past it."""
        if self._unsent or (
            self._pending
            and (
                self._settles is None
                or not self._settles([r for r in self._results if r is not None])
            )
        ):
            return
        self._over = True
        self._clean_up()
        self._done(self._results, None)

    def _fail(self, exc: BaseException) -> None:
        if self._over:
            return
        self._over = True
        self._clean_up()
        if isinstance(exc, _Stale):
            exc = _http_error("BOSH server closed the connection")
        elif isinstance(exc, OSError):  # (ServiceUnavailable is no OSError)
            exc = _unavailable(exc, self._pool.origin.url)
        if self._ordered and isinstance(exc, BOSHError):  # (the answers in, in order)
            _with_answers(exc, [r for r in self._results if r is not None])
        self._done(None, exc)

    def _clean_up(self) -> None:
        """Stop the timers and tasks, and close every connection that still has a request
        open: a request the server still holds after the batch settled (it drops it then),
        or all of them after a failure."""
        self._pool._running.discard(self)
        if self._next is not None:
            self._next.cancel()
            self._next = None
        for task in self._tasks:
            task.cancel()
        for i, conn in enumerate(self._conns):
            if conn is not None:
                self._conns[i] = None
                conn.abort()


_deadline = attrgetter("deadline")


class AsyncPool:
    """Idle keep-alive connections to one origin, for one event loop."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._idle: list[_Conn] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the batches under way, and one timer for all their deadlines (``_watch``)
        self._running: set[_Batch] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_at = float("inf")

    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this pool's connections belong to: the running one, when first
        asked. (Kept: on Python 3.11 each ``asyncio.get_running_loop()`` is a ``getpid()``
        syscall, and a prebind would ask six times.)"""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _watch(self, batch: _Batch) -> None:
        """Fail ``batch`` with a timeout at its deadline. One timer serves every batch: it is
        set for the earliest deadline it knows of, and when it goes off it fails the batches
        that are due and is set again for the earliest of the rest. A batch's deadline is
        seconds away and its answers come in milliseconds, so the timer is set again about
        once per timeout, where a timer per batch is made and cancelled on every request."""
        self._running.add(batch)
        if batch.deadline < self._watch_at:  # (the first batch, or a shorter timeout)
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watch_at = batch.deadline
            self._watchdog = self.loop().call_at(batch.deadline, self._expire)

    def _expire(self) -> None:
        self._watchdog = None
        self._watch_at = float("inf")
        now = self.loop().time()
        for batch in [b for b in self._running if b.deadline <= now]:
            batch._fail(TimeoutError())  # (which takes it out of _running)
        if self._running:
            self._watch(min(self._running, key=_deadline))

    def _take(self) -> _Conn | None:
        """An idle connection that can be reused, if there is one."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if time.monotonic() - conn.idle_since < _IDLE_EXPIRY and conn.usable():
                return conn
            conn.close()
        return None

    async def _acquire(self, deadline: float | None = None) -> tuple[_Conn, bool]:
        """As ``SyncPool._acquire``. A connect is bounded by ``deadline`` (the loop's clock),
        or else by the caller's ``asyncio.timeout``."""
        conn = self._take()
        if conn is not None:
            return conn, True
        o = self.origin
        try:
            async with asyncio.timeout_at(deadline):
                transport, conn = await self.loop().create_connection(
                    _Conn, o.host, o.port, ssl=o.tls, server_hostname=o.host if o.tls else None
                )
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise _connect_failed(o.url, exc) from None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, False

    def _release(self, conn: _Conn) -> None:
        # (no look at the socket here: that is done once, when it is taken again)
        if len(self._idle) < _MAX_IDLE and not conn.dead:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        # Aborted: an idle connection has nothing left to send, and a TLS close would wait for
        # the server's close_notify, which a loop about to close (``AsyncPrebinder``'s pools
        # are closed at their loop's end) never reads: its socket would be left open.
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    def start(
        self,
        bodies: Sequence[bytes],
        timeout: float,
        limit: int,
        settles: Settles | None,
        stagger: float,
        done: Done,
        ordered: bool = False,
    ) -> _Batch:
        """``batch`` (or ``pipeline``, when ``ordered``) without a coroutine: ``done(answers,
        None)`` or ``done(None, error)`` is called later, from the event loop, once.
        ``cancel()`` on what this returns closes what is still open, and ``done`` is then not
        called. The async driver runs a whole prebind this way, each batch started from the
        ``done`` of the one before."""
        return _Batch(self, bodies, timeout, limit, settles, stagger, done, ordered).start()

    async def exchange(self, body: bytes, timeout: float, limit: int) -> Response:  # noqa: ASYNC109
        """As ``SyncPool.exchange``; cancelling it closes its connection. (The drivers use
        ``start``; this and ``batch`` are the pool's awaitable face, as the sync pool has
        it, through which the transport tests drive both pools alike.)"""
        (answer,) = await self.batch((body,), timeout, limit, None, 0.0)
        assert answer is not None
        return answer

    async def pipeline(
        self,
        bodies: Sequence[bytes],
        timeout: float,  # noqa: ASYNC109 - bounds the whole batch, as in SyncPool.pipeline
        limit: int,
    ) -> list[Response]:
        """As ``SyncPool.pipeline``; cancelling it closes its connection."""
        answers = await self.batch(bodies, timeout, limit, None, 0.0, ordered=True)
        return [a for a in answers if a is not None]

    async def batch(
        self,
        bodies: Sequence[bytes],
        timeout: float,  # noqa: ASYNC109 - bounds the whole batch, as in SyncPool.batch
        limit: int,
        settles: Settles | None,
        stagger: float,
        *,
        ordered: bool = False,
    ) -> list[Response | None]:
        """As ``SyncPool.batch``; cancelling it closes its connections."""
        future: asyncio.Future[list[Response | None]] = self.loop().create_future()

        def done(answers: list[Response | None] | None, exc: BaseException | None) -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(answers)  # type: ignore[arg-type]

        batch = self.start(bodies, timeout, limit, settles, stagger, done, ordered)
        try:
            return await future
        except BaseException:
            batch.cancel()
            raise


async def settle(
    tasks: Sequence[asyncio.Future[R]], settles: Callable[[list[R]], bool] | None
) -> list[R | None]:
    """The answers of a pipelined batch's requests (``tasks``, in RID order), collected until
    ``settles`` says they are enough. A request the server still holds after that is cancelled,
    which closes its connection so that the server drops it, and waited for: the session must
    not be handed out while a request of it is open. Its answer is ``None``. Used by the httpx
    transport's async batches (the builtin one settles in ``_Batch``)."""
    results: list[R | None] = [None] * len(tasks)
    waiting = {task: i for i, task in enumerate(tasks)}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                results[waiting.pop(task)] = task.result()
            if settles is not None and settles([r for r in results if r is not None]):
                break
    finally:
        held = [task for task in tasks if not task.done()]
        for task in held:
            task.cancel()
        if held:
            await asyncio.wait(held)
        for task in tasks:  # failures no one looked at: else "exception never retrieved"
            if task.done() and not task.cancelled():
                task.exception()
    return results


def _unavailable(exc: OSError, url: str) -> ServiceUnavailable:
    """A socket, TLS or timeout error as ServiceUnavailable, with the conditions httpx's get.
    (Each pool method catches ``OSError`` (TLS errors and timeouts are OSErrors too) and raises
    this ``from None``: a ``try`` costs nothing until something fails, where a context manager
    was three Python calls for every exchange.)"""
    if isinstance(exc, TimeoutError):  # (asyncio.TimeoutError is TimeoutError)
        return ServiceUnavailable(f"BOSH request to {url} timed out", condition="timeout")
    if isinstance(exc, (ConnectionRefusedError, socket.gaierror, ssl.SSLCertVerificationError)):
        return ServiceUnavailable(f"cannot connect to {url}: {exc}", condition="connection-failed")
    return ServiceUnavailable(
        f"BOSH request to {url} failed: {type(exc).__name__}: {exc}", condition="http-error"
    )
