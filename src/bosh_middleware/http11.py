"""A minimal HTTP/1.1 client for BOSH: keep-alive ``POST`` s to one endpoint, sync and async.

The drivers use it unless they are given an httpx client. It exists for speed: a BOSH exchange
is a small POST and a small answer, and a generic client spends most of a prebind's CPU in its
own machinery (httpx + httpcore + h11 + anyio: ~300 us per request; this: ~15 us).

* One pool of idle keep-alive connections per endpoint (per event loop for async). An idle
  connection that has become readable (the server closed it) is dropped before reuse, and a
  request on a reused connection that gets no byte back is retried once on a new one.
* ``batch()`` sends a pipelined batch as the httpx path does (one connection per request, in
  RID order with a stagger, read until the batch settles, a request still held closed and
  answered ``None``), but with no thread or event-loop hand-off. (HTTP/1.1 pipelining on one
  connection is not an option: ejabberd 23.01 reads a second pipelined request into the body
  of the first and answers 400.)
* Responses are framed by Content-Length, chunked coding or connection close, and read under a
  size limit; https uses ``verify`` as httpx does (True: certifi's CA bundle when installed,
  else the system's; a CA bundle path; an ``ssl.SSLContext``; False).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import select
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import ResponseTooLarge, ServiceUnavailable

__all__ = ["AsyncPool", "Origin", "Response", "SyncPool", "origin"]

_MAX_HEAD = 64 * 1024
_MAX_IDLE = 128
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

Response = tuple[int, bytes]  # (status, body)
Settles = Callable[[list[Response]], bool]


@dataclass(frozen=True)
class Origin:
    url: str
    host: str
    port: int
    tls: ssl.SSLContext | None
    prefix: bytes  # "POST <target> HTTP/1.1\r\nHost: ...\r\n<headers>\r\n" without Content-Length

    def request(self, body: bytes) -> bytes:
        return b"%sContent-Length: %d\r\n\r\n%s" % (self.prefix, len(body), body)


def _ssl_context(verify: Any) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if isinstance(verify, (str, os.PathLike)):
        return ssl.create_default_context(cafile=os.fspath(verify))
    try:
        import certifi  # what httpx uses by default

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


def origin(url: str, headers: dict[str, str], verify: Any) -> Origin:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields = dict(headers)
    if parts.username is not None and not any(k.lower() == "authorization" for k in fields):
        # user:password@ in the URL means Basic auth, as in httpx (a reverse proxy in front)
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        fields["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
    lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc.rsplit('@', 1)[-1]}"]
    for k, v in fields.items():
        if not _TOKEN.fullmatch(k) or any(c in v for c in "\r\n\0"):
            # a newline in a configured header would smuggle lines into every request
            raise ValueError(f"invalid HTTP header for the BOSH requests: {k!r}")
        if k.lower() not in ("host", "content-length", "transfer-encoding"):
            lines.append(f"{k}: {v}")
    prefix = ("\r\n".join(lines) + "\r\n").encode("latin-1")
    port = parts.port or (443 if tls else 80)
    return Origin(url, parts.hostname, port, _ssl_context(verify) if tls else None, prefix)


class _Stale(Exception):
    """A reused connection closed before answering: the request can be sent again."""


def _http_error(message: str) -> ServiceUnavailable:
    return ServiceUnavailable(message, condition="http-error")


class _Parser:
    """The bytes of one HTTP/1.1 response in, ``done`` once complete; extra bytes are kept for
    the next response of a pipeline (``leftover()``)."""

    __slots__ = (
        "_buf",
        "_chunk",
        "_framing",
        "_limit",
        "_remaining",
        "body",
        "done",
        "got",
        "keep_alive",
        "status",
    )

    def __init__(self, limit: int, leftover: bytes = b"") -> None:
        self._limit = limit
        self._buf = bytearray()
        self._framing = "head"  # head | length | chunked | close
        self._remaining = 0
        self._chunk = -1  # chunked: -1 = size line next, -2 = trailers, n = bytes left + CRLF
        self.body = bytearray()
        self.status = 0
        self.keep_alive = False
        self.done = False
        self.got = False
        if leftover:
            self.feed(leftover)

    def leftover(self) -> bytes:
        return bytes(self._buf)

    def feed(self, data: bytes) -> None:
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

    def _head(self) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                raise _http_error("BOSH response head too large")
            return
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        try:
            version, code = lines[0].split(None, 2)[:2]
            self.status = int(code)
        except ValueError:
            raise _http_error("malformed HTTP status line") from None
        if 100 <= self.status < 200:  # interim: the real response follows
            return
        length: int | None = None
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise _http_error("bad Content-Length") from None
                if length > self._limit:
                    raise ResponseTooLarge(
                        f"BOSH response declares {length} bytes, limit is {self._limit}"
                    )
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                connection = value.strip().lower()
        self.keep_alive = (
            connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
        )
        if self.status in (204, 304):
            self.done = True
        elif chunked:
            self._framing = "chunked"
        elif length is not None:
            self._framing, self._remaining, self.done = "length", length, length == 0
        else:
            self._framing, self.keep_alive = "close", False

    def _chunked(self) -> None:
        if self._chunk in (-1, -2):
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:  # a size or trailer line that never ends
                    raise _http_error("BOSH response chunk framing too large")
                return
            line = bytes(self._buf[:end])
            del self._buf[: end + 2]
            if self._chunk == -2:
                self.done = not line  # trailers end with an empty line
                return
            try:
                self._chunk = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _http_error("bad chunk size") from None
            if self._chunk == 0:
                self._chunk = -2
            return
        if len(self._buf) < self._chunk + 2:
            take = min(len(self._buf), self._chunk)
            self._add(self._buf[:take])
            del self._buf[:take]
            self._chunk -= take
            return
        self._add(self._buf[: self._chunk])
        del self._buf[: self._chunk + 2]
        self._chunk = -1


# --- sync ----------------------------------------------------------------------------------------
def _readable(sock: socket.socket) -> bool:
    """An idle keep-alive socket with something to read has been closed by the server (or is
    out of step): either way not reusable. poll(), not select(): a busy process has fds > 1023."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class SyncPool:
    """Idle keep-alive sockets to one origin; thread-safe; not inherited across fork()."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _acquire(self, timeout: float) -> tuple[socket.socket, bool]:
        with self._lock:
            if self._pid != os.getpid():  # the parent's sockets: not ours to use
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                sock = self._idle.pop()
                if not _readable(sock):
                    return sock, True
                sock.close()
        o = self.origin
        sock = socket.create_connection((o.host, o.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if o.tls is not None:
            sock = o.tls.wrap_socket(sock, server_hostname=o.host)
        return sock, False

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < _MAX_IDLE and self._pid == os.getpid():
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def exchange(self, body: bytes, timeout: float, limit: int) -> Response:
        """POST ``body``; ``timeout`` bounds the whole exchange."""
        with _errors(self.origin.url):
            deadline = time.monotonic() + timeout
            for _attempt in range(2):
                sock, reused = self._acquire(timeout)
                parser = _Parser(limit)
                try:
                    sock.sendall(self.origin.request(body))
                    _read(sock, parser, deadline)
                except _Stale:
                    sock.close()
                    if reused:
                        continue
                    raise _http_error("BOSH server closed the connection") from None
                except BaseException:
                    sock.close()
                    raise
                self._finish(sock, parser)
                return parser.status, bytes(parser.body)
            raise _http_error("BOSH server keeps closing connections")

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
        closed (so the server drops it) and answers ``None``."""
        with _errors(self.origin.url):
            deadline = time.monotonic() + timeout
            socks: list[socket.socket] = []
            parsers: list[_Parser] = []
            results: list[Response | None] = [None] * len(bodies)
            sel = selectors.DefaultSelector()
            try:
                for i, body in enumerate(bodies):
                    if i and stagger:
                        time.sleep(stagger)
                    sock, _ = self._acquire(timeout)
                    socks.append(sock)
                    parsers.append(_Parser(limit))
                    sock.settimeout(timeout)
                    sock.sendall(self.origin.request(body))
                    sel.register(sock, selectors.EVENT_READ, i)
                pending = set(range(len(bodies)))
                while pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    for key, _ in sel.select(left):
                        i = key.data
                        chunk = _recv_all(socks[i])
                        if chunk:
                            parsers[i].feed(chunk)
                        else:
                            try:
                                parsers[i].eof()
                            except _Stale:
                                raise _http_error("BOSH server closed the connection") from None
                        if parsers[i].done:
                            results[i] = (parsers[i].status, bytes(parsers[i].body))
                            sel.unregister(socks[i])
                            pending.discard(i)
                    if settles is not None and settles([r for r in results if r is not None]):
                        break
            finally:
                sel.close()
                for sock, parser in zip(socks, parsers, strict=False):
                    self._finish(sock, parser)
            return results

    def _finish(self, sock: socket.socket, parser: _Parser) -> None:
        if parser.done and parser.keep_alive and not parser.leftover():
            self._release(sock)
        else:
            sock.close()  # unusable, or a request the server still holds: closing drops it


def _recv_all(sock: socket.socket) -> bytes:
    """What is readable now, including what TLS has already decrypted: the selector cannot see
    bytes buffered inside an SSL object, and would wait for more that may never come."""
    chunk = sock.recv(65536)
    if chunk and isinstance(sock, ssl.SSLSocket):
        while sock.pending():
            chunk += sock.recv(65536)
    return chunk


def _read(sock: socket.socket, parser: _Parser, deadline: float) -> None:
    while not parser.done:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            parser.eof()
            return
        parser.feed(chunk)


# --- async ---------------------------------------------------------------------------------------
_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class AsyncPool:
    """Idle keep-alive connections to one origin, for one event loop."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._idle: list[_Conn] = []

    async def _acquire(self) -> tuple[_Conn, bool]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not (reader.at_eof() or writer.is_closing()):
                return (reader, writer), True
            writer.close()
        o = self.origin
        reader, writer = await asyncio.open_connection(
            o.host, o.port, ssl=o.tls, server_hostname=o.host if o.tls else None, limit=2**20
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return (reader, writer), False

    def _release(self, conn: _Conn) -> None:
        if len(self._idle) < _MAX_IDLE and not conn[1].is_closing():
            self._idle.append(conn)
        else:
            conn[1].close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()

    async def exchange(self, body: bytes, timeout: float, limit: int) -> Response:  # noqa: ASYNC109
        """As ``SyncPool.exchange``; cancelling it closes its connection."""
        with _errors(self.origin.url):
            return await asyncio.wait_for(self._exchange(body, limit), timeout)

    async def _exchange(self, body: bytes, limit: int) -> Response:
        for _attempt in range(2):
            conn, reused = await self._acquire()
            try:
                conn[1].write(self.origin.request(body))
                return await self._read(conn, limit)
            except _Stale:
                if reused:
                    continue
                raise _http_error("BOSH server closed the connection") from None
        raise _http_error("BOSH server keeps closing connections")

    async def _read(self, conn: _Conn, limit: int) -> Response:
        reader, writer = conn
        parser = _Parser(limit)
        try:
            await writer.drain()
            while not parser.done:
                chunk = await reader.read(65536)
                if not chunk:
                    parser.eof()
                    break
                parser.feed(chunk)
        except BaseException:
            writer.close()  # also on cancellation: the server drops a request it holds
            raise
        if parser.keep_alive and not parser.leftover():
            self._release(conn)
        else:
            writer.close()
        return parser.status, bytes(parser.body)

    async def batch(
        self,
        bodies: Sequence[bytes],
        timeout: float,  # noqa: ASYNC109 - bounds the whole batch, as in SyncPool.batch
        limit: int,
        settles: Settles | None,
        stagger: float,
    ) -> list[Response | None]:
        """As ``SyncPool.batch``."""
        with _errors(self.origin.url):
            return await asyncio.wait_for(self._batch(bodies, limit, settles, stagger), timeout)

    async def _batch(
        self, bodies: Sequence[bytes], limit: int, settles: Settles | None, stagger: float
    ) -> list[Response | None]:
        conns: list[_Conn] = []
        try:
            for i, body in enumerate(bodies):
                if i and stagger:
                    await asyncio.sleep(stagger)
                conn, _ = await self._acquire()
                conn[1].write(self.origin.request(body))
                await conn[1].drain()
                conns.append(conn)
        except BaseException:
            for _, writer in conns:
                writer.close()
            raise
        tasks = [asyncio.ensure_future(self._read(c, limit)) for c in conns]
        results: list[Response | None] = [None] * len(bodies)
        waiting = {task: i for i, task in enumerate(tasks)}
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    try:
                        results[waiting.pop(task)] = task.result()
                    except _Stale:
                        raise _http_error("BOSH server closed the connection") from None
                if settles is not None and settles([r for r in results if r is not None]):
                    break
        finally:
            held = [task for task in tasks if not task.done()]
            for task in held:
                task.cancel()  # closes its connection, so the server drops the held request
            if held:
                await asyncio.wait(held)
        return results


class _errors:
    """Socket, TLS and timeout errors -> ServiceUnavailable with the conditions httpx's get."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> None:
        if exc is None or isinstance(exc, ServiceUnavailable):
            return
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            raise ServiceUnavailable(
                f"BOSH request to {self.url} timed out", condition="timeout"
            ) from None
        if isinstance(exc, (ConnectionRefusedError, socket.gaierror, ssl.SSLCertVerificationError)):
            raise ServiceUnavailable(
                f"cannot connect to {self.url}: {exc}", condition="connection-failed"
            ) from None
        if isinstance(exc, (OSError, ssl.SSLError)):
            raise ServiceUnavailable(
                f"BOSH request to {self.url} failed: {type(exc).__name__}: {exc}",
                condition="http-error",
            ) from None
