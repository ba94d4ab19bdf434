"""PROTOTYPE OF A PROPOSED src PATCH (not part of the library yet): a lean HTTP/1.1 keep-alive
transport for the two engine drivers, measured side by side with the shipped engine.

Why: profiling (py-spy --gil, 1,000s of warm prebinds) puts > 85 % of the client CPU of a
prebind in the generic HTTP stack (httpx + httpcore + h11 + anyio, plus the thread hand-off of
the pipelined pair), and < 10 % in the engine itself. On this machine one keep-alive POST to
Prosody costs ~295 us of CPU with ``httpx.Client.stream``, ~67 us with ``http.client``, ~14 us
with a socket and a 40-line parser. A prebind is 4-5 POSTs.

What: the same drivers (``Prebinder`` / ``AsyncPrebinder``: same flows, same options, same
errors), with ``_send`` / ``_send_batch`` on a minimal HTTP/1.1 client:

* one pool of idle keep-alive sockets per origin (per event loop for async); a pooled socket
  that has become readable (the server closed it) is discarded before reuse, and a request on
  a reused socket that gets no byte back is retried once on a fresh one;
* requests are ``POST`` with ``Content-Length``; responses are framed by ``Content-Length``,
  ``chunked`` or connection close, read under ``max_response_size``;
* the pipelined pair (restart + bind) as the shipped drivers send it (one connection per
  request, in RID order with the same stagger; a request the server still holds is closed and
  answers ``None``, and the flow redoes the prebind sequentially), but without a thread or an
  event-loop hand-off: the sync driver writes both requests and reads them with a selector.
  (HTTP/1.1 pipelining on one connection would order the pair by construction, but ejabberd
  23.01's HTTP server reads a second pipelined request into the first one's body: 400.)
* https with ``verify`` as today (``True``: default CA store, a CA bundle path, an
  ``ssl.SSLContext``, or ``False``).

The same change as a patch to src/ is ``benchmarks/proposed-src.patch`` (new ``http11.py``; the
drivers keep httpx only for a caller that passes ``client=``: proxies, mTLS, mocking with
``httpx.MockTransport``). The pass-through fast path once prototyped here is merged into
``asgi.py`` / ``wsgi.py``.
"""

from __future__ import annotations

import asyncio
import os
import select
import selectors
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bosh_middleware.client import AsyncPrebinder, Prebinder, _log_batch
from bosh_middleware.errors import ResponseTooLarge, ServiceUnavailable
from bosh_middleware.protocol import BOSHRequest, BOSHResponse

from . import _wire

__all__ = ["LeanAsyncPrebinder", "LeanPrebinder"]

try:  # the shipped drivers' gap between the requests of a pipelined batch
    from bosh_middleware.client import _PIPELINE_STAGGER as _STAGGER
except ImportError:
    _STAGGER = 0.0005

_MAX_HEAD = 64 * 1024
_IDLE_PER_ORIGIN = 128


# --- origin, TLS, request bytes -----------------------------------------------------------------
@dataclass(frozen=True)
class _Origin:
    host: str
    port: int
    tls: ssl.SSLContext | None
    prefix: bytes  # "POST <path> HTTP/1.1\r\nHost: ...\r\n<headers>" (no Content-Length)


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
    return ssl.create_default_context()


def _origin(url: str, headers: dict[str, str], verify: Any) -> _Origin:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host_header = parts.netloc.rsplit("@", 1)[-1]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {target} HTTP/1.1", f"Host: {host_header}"]
    lines += [
        f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")
    ]
    prefix = ("\r\n".join(lines) + "\r\n").encode("latin-1")
    return _Origin(parts.hostname, port, _ssl_context(verify) if tls else None, prefix)


def _request_bytes(origin: _Origin, body: bytes) -> bytes:
    return b"%sContent-Length: %d\r\n\r\n%s" % (origin.prefix, len(body), body)


# --- response parser (sans-I/O) -----------------------------------------------------------------
class _Stale(Exception):
    """A reused connection was closed by the server before it answered: safe to retry."""


class _Parser:
    """Feed the bytes of one HTTP/1.1 response; ``done`` once it is complete."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_framing",
        "_limit",
        "_remaining",
        "body",
        "done",
        "got_bytes",
        "keep_alive",
        "status",
    )

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._framing = "head"  # head | length | chunked | close
        self._remaining = 0
        self._chunk_left = -1
        self.body = bytearray()
        self.status = 0
        self.keep_alive = False
        self.done = False
        self.got_bytes = False

    def feed(self, data: bytes) -> None:
        if data:
            self.got_bytes = True
        self._buf += data
        while not self.done:
            before = (self._framing, len(self._buf))
            if self._framing == "head":
                self._head()
            elif self._framing == "length":
                take = min(self._remaining, len(self._buf))
                self._append(self._buf[:take])
                del self._buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self.done = True
            elif self._framing == "chunked":
                self._chunked()
            else:  # close-delimited
                self._append(self._buf)
                self._buf.clear()
            if (self._framing, len(self._buf)) == before and not self.done:
                return

    def leftover(self) -> bytes:
        """Bytes received past the end of this response (the next pipelined response)."""
        return bytes(self._buf)

    def eof(self) -> None:
        if self.done:
            return
        if self._framing == "close":
            self.done = True
            return
        if not self.got_bytes:
            raise _Stale
        raise ServiceUnavailable("BOSH connection closed mid-response", condition="http-error")

    def _append(self, data: bytes | bytearray) -> None:
        self.body += data
        if len(self.body) > self._limit:
            raise ResponseTooLarge(f"BOSH response exceeds {self._limit} bytes")

    def _head(self) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                raise ServiceUnavailable("BOSH response head too large", condition="http-error")
            return
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        try:
            version, code = lines[0].split(None, 2)[:2]
            self.status = int(code)
        except ValueError:
            raise ServiceUnavailable("malformed HTTP status line", condition="http-error") from None
        if 100 <= self.status < 200:  # interim response: the real one follows
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
                    raise ServiceUnavailable("bad Content-Length", condition="http-error") from None
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
            self._framing, self._remaining = "length", length
            self.done = length == 0
        else:
            self._framing, self.keep_alive = "close", False

    def _chunked(self) -> None:
        if self._chunk_left < 0:  # expecting a size line
            end = self._buf.find(b"\r\n")
            if end < 0:
                return
            size = bytes(self._buf[:end]).split(b";", 1)[0].strip()
            del self._buf[: end + 2]
            try:
                self._chunk_left = int(size, 16)
            except ValueError:
                raise ServiceUnavailable("bad chunk size", condition="http-error") from None
            if self._chunk_left == 0:
                self._chunk_left = -2  # trailers until an empty line
            return
        if self._chunk_left == -2:
            end = self._buf.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self._buf[:end])
            del self._buf[: end + 2]
            if not line:
                self.done = True
            return
        if len(self._buf) < self._chunk_left + 2:
            take = min(len(self._buf), self._chunk_left)
            if take:
                self._append(self._buf[:take])
                del self._buf[:take]
                self._chunk_left -= take
            return
        self._append(self._buf[: self._chunk_left])
        del self._buf[: self._chunk_left + 2]
        self._chunk_left = -1


# --- sync driver --------------------------------------------------------------------------------
def _readable(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has been closed (or sent junk): drop it."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class _SyncPool:
    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def acquire(self, timeout: float) -> tuple[socket.socket, bool]:
        with self._lock:
            if self._pid != os.getpid():  # inherited through fork(): not ours to use
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                sock = self._idle.pop()
                if _readable(sock):
                    sock.close()
                    continue
                return sock, True
        o = self.origin
        sock = socket.create_connection((o.host, o.port), timeout=timeout)
        wire = _wire.current()  # benchmark accounting
        if wire is not None:
            wire.connected()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if o.tls is not None:
            sock = o.tls.wrap_socket(sock, server_hostname=o.host)
        return sock, False

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < _IDLE_PER_ORIGIN and self._pid == os.getpid():
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


class LeanPrebinder(Prebinder):
    """``Prebinder`` on the lean transport (used unless a ``client=`` is given)."""

    def __init__(self, service_url: str, **kw: Any) -> None:
        super().__init__(service_url, **kw)
        self._lean = _SyncPool(_origin(service_url, self._headers, self._verify))

    def _exchange(self, req: BOSHRequest) -> BOSHResponse:
        timeout = self._timeout(req)
        data = _request_bytes(self._lean.origin, req.body)
        for _attempt in range(2):
            sock, reused = self._lean.acquire(timeout)
            parser = _Parser(self.options.max_response_size)
            wire = _wire.current()
            rec = wire.begin() if wire is not None else None
            try:
                sock.settimeout(timeout)
                sock.sendall(data)
                while not parser.done:
                    chunk = sock.recv(65536)
                    if not chunk:
                        parser.eof()
                        break
                    parser.feed(chunk)
                if rec is not None:
                    rec.end = time.perf_counter()
            except _Stale:
                sock.close()
                if reused:
                    continue
                raise ServiceUnavailable(
                    "BOSH server closed the connection", condition="http-error"
                ) from None
            except BaseException:
                sock.close()
                raise
            if parser.keep_alive:
                self._lean.release(sock)
            else:
                sock.close()
            return BOSHResponse(parser.status, bytes(parser.body))
        raise ServiceUnavailable("BOSH server keeps closing connections", condition="http-error")

    def _send(self, req: BOSHRequest, *args: Any) -> BOSHResponse:
        if self._given_client is not None:
            return super()._send(req, *args)
        try:
            return self._exchange(req)
        except TimeoutError:
            raise ServiceUnavailable(
                f"BOSH request to {self.service_url} timed out", condition="timeout"
            ) from None
        except ConnectionRefusedError as exc:
            raise ServiceUnavailable(
                f"cannot connect to {self.service_url}: {exc}", condition="connection-failed"
            ) from None
        except OSError as exc:
            raise ServiceUnavailable(
                f"BOSH request to {self.service_url} failed: {exc}", condition="http-error"
            ) from None

    def _send_batch(self, batch: list[BOSHRequest]) -> list[BOSHResponse | None]:
        if self._given_client is not None or len(batch) == 1:
            return super()._send_batch(batch)
        try:
            return self._pipelined(batch)
        except TimeoutError:
            raise ServiceUnavailable(
                f"BOSH request to {self.service_url} timed out", condition="timeout"
            ) from None
        except OSError as exc:
            raise ServiceUnavailable(
                f"BOSH request to {self.service_url} failed: {exc}", condition="http-error"
            ) from None

    def _pipelined(self, batch: list[BOSHRequest]) -> list[BOSHResponse | None]:
        """The batch on one connection per request, in RID order with the engine's stagger, read
        with a selector until it settles; a request still held is closed and answers ``None``
        (the flow then redoes the prebind sequentially), as the shipped drivers do."""
        _log_batch(batch)
        timeout = max(self._timeout(r) for r in batch)
        deadline = time.monotonic() + timeout
        limit = self.options.max_response_size
        wire = _wire.current()
        socks: list[socket.socket] = []
        parsers: list[_Parser] = []
        recs = []
        results: list[BOSHResponse | None] = [None] * len(batch)
        sel = selectors.DefaultSelector()
        try:
            for i, req in enumerate(batch):
                if i:
                    time.sleep(_STAGGER)
                sock, _ = self._lean.acquire(timeout)
                socks.append(sock)
                parsers.append(_Parser(limit))
                sock.settimeout(timeout)
                if wire is not None:
                    recs.append(wire.begin())
                sock.sendall(_request_bytes(self._lean.origin, req.body))
                sel.register(sock, selectors.EVENT_READ, i)
            settles = batch[0].settles
            pending = set(range(len(batch)))
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                for key, _ in sel.select(left):
                    i = key.data
                    chunk = socks[i].recv(65536)
                    if chunk:
                        parsers[i].feed(chunk)
                    else:
                        try:
                            parsers[i].eof()
                        except _Stale:
                            raise ServiceUnavailable(
                                "BOSH server closed the connection", condition="http-error"
                            ) from None
                    if parsers[i].done:
                        if recs:
                            recs[i].end = time.perf_counter()
                        results[i] = BOSHResponse(parsers[i].status, bytes(parsers[i].body))
                        sel.unregister(socks[i])
                        pending.discard(i)
                if settles is not None and settles([r for r in results if r is not None]):
                    break
        finally:
            sel.close()
            for i, sock in enumerate(socks):
                p = parsers[i]
                if p.done and p.keep_alive and not p.leftover():
                    self._lean.release(sock)
                else:
                    sock.close()  # still held by the server (or unusable): closing drops it
        return results

    def close(self) -> None:
        self._lean.close()
        super().close()


# --- async driver -------------------------------------------------------------------------------
_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _AsyncPool:
    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self._idle: list[_Conn] = []

    async def acquire(self) -> tuple[_Conn, bool]:
        while self._idle:
            reader, writer = self._idle.pop()
            if reader.at_eof() or writer.is_closing() or len(reader._buffer):
                writer.close()
                continue
            return (reader, writer), True
        o = self.origin
        reader, writer = await asyncio.open_connection(
            o.host,
            o.port,
            ssl=o.tls,
            server_hostname=o.host if o.tls else None,
            limit=2**20,
        )
        wire = _wire.current()
        if wire is not None:
            wire.connected()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return (reader, writer), False

    def release(self, conn: _Conn) -> None:
        if len(self._idle) < _IDLE_PER_ORIGIN and not conn[1].is_closing():
            self._idle.append(conn)
        else:
            conn[1].close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()


class LeanAsyncPrebinder(AsyncPrebinder):
    """``AsyncPrebinder`` on the lean transport (used unless a ``client=`` is given)."""

    def __init__(self, service_url: str, **kw: Any) -> None:
        super().__init__(service_url, **kw)
        self._lean_origin = _origin(service_url, self._headers, self._verify)
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncPool] = (
            weakref.WeakKeyDictionary()
        )
        self._recs: dict[asyncio.StreamWriter, Any] = {}

    def _pool(self) -> _AsyncPool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = self._pools[loop] = _AsyncPool(self._lean_origin)
        return pool

    async def _write(self, req: BOSHRequest) -> tuple[_Conn, bool]:
        conn, reused = await self._pool().acquire()
        wire = _wire.current()
        if wire is not None:
            self._recs[conn[1]] = wire.begin()
        conn[1].write(_request_bytes(self._lean_origin, req.body))
        await conn[1].drain()
        return conn, reused

    async def _read(self, conn: _Conn) -> BOSHResponse:
        reader, writer = conn
        parser = _Parser(self.options.max_response_size)
        rec = self._recs.pop(writer, None) if self._recs else None
        try:
            while not parser.done:
                chunk = await reader.read(65536)
                if not chunk:
                    parser.eof()
                    break
                parser.feed(chunk)
            if rec is not None:
                rec.end = time.perf_counter()
        except BaseException:
            writer.close()  # also on cancellation: the server drops a held request
            raise
        if parser.keep_alive:
            self._pool().release(conn)
        else:
            writer.close()
        return BOSHResponse(parser.status, bytes(parser.body))

    async def _once(self, req: BOSHRequest) -> BOSHResponse:
        for _attempt in range(2):
            conn, reused = await self._write(req)
            try:
                return await self._read(conn)
            except _Stale:
                if reused:
                    continue
                raise ServiceUnavailable(
                    "BOSH server closed the connection", condition="http-error"
                ) from None
        raise ServiceUnavailable("BOSH server keeps closing connections", condition="http-error")

    async def _guard(self, coro: Any, timeout: float) -> Any:  # noqa: ASYNC109
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            raise ServiceUnavailable(
                f"BOSH request to {self.service_url} timed out", condition="timeout"
            ) from None
        except _Stale:
            raise ServiceUnavailable(
                "BOSH server closed the connection", condition="http-error"
            ) from None
        except ConnectionRefusedError as exc:
            raise ServiceUnavailable(
                f"cannot connect to {self.service_url}: {exc}", condition="connection-failed"
            ) from None
        except OSError as exc:
            raise ServiceUnavailable(
                f"BOSH request to {self.service_url} failed: {exc}", condition="http-error"
            ) from None

    async def _send(self, req: BOSHRequest, *args: Any) -> BOSHResponse:
        if self._given_client is not None:
            return await super()._send(req, *args)
        result: BOSHResponse = await self._guard(self._once(req), self._timeout(req))
        return result

    async def _send_batch(self, batch: list[BOSHRequest]) -> list[BOSHResponse | None]:
        if self._given_client is not None or len(batch) == 1:
            return await super()._send_batch(batch)
        _log_batch(batch)
        timeout = max(self._timeout(r) for r in batch)
        conns: list[_Conn] = []
        try:
            for i, req in enumerate(batch):  # in RID order, with the engine's stagger
                if i:
                    await asyncio.sleep(_STAGGER)
                conn, _ = await self._guard(self._write(req), timeout)
                conns.append(conn)
        except BaseException:
            for _, writer in conns:
                writer.close()
            raise
        tasks = [asyncio.ensure_future(self._guard(self._read(c), timeout)) for c in conns]
        results: list[BOSHResponse | None] = [None] * len(batch)
        settles = batch[0].settles
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
                task.cancel()  # closes its connection: the server drops the held request
            if held:
                await asyncio.wait(held)
        return results

    async def aclose(self) -> None:
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            pool.close()
        await super().aclose()
