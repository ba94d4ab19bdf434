"""Raw ASGI (and WSGI) plumbing for tests: a message recorder (``httpx.ASGITransport`` joins
the body, so chunking and header timing can only be seen at this level), scopes, toy apps, a
header-based auth shim, and a PEP 3333 caller.

    rec = ASGIRecorder()
    await middleware(http_scope("/", user=alice), rec.receive, rec.send)
    rec.status, rec.header("content-type"), rec.body, rec.body_count
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NAV",
    "ASGIRecorder",
    "User",
    "WSGIResult",
    "call_wsgi",
    "chunked_app",
    "header_auth",
    "html_app",
    "http_scope",
    "wsgi_environ",
]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

#: Request headers of a browser navigation (what makes the middleware start early).
NAV = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8", "sec-fetch-dest": "document"}


@dataclass(frozen=True)
class User:
    """What ``scope["user"]`` holds (Starlette-style) and ``credentials()`` reads."""

    username: str
    is_authenticated: bool = True


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
    user: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    if user is not None:
        scope["user"] = user
    scope.update(extra)
    return scope


@dataclass
class ASGIRecorder:
    """``send`` records deep copies of messages with the time they arrived; ``receive`` gives
    one empty request, then waits (bounded) for the response to end and says disconnect."""

    messages: list[Message] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _requested: bool = False

    async def send(self, message: Message) -> None:
        self.messages.append(copy.deepcopy(dict(message)))
        self.times.append(time.monotonic())
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._done.set()

    async def receive(self) -> Message:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), 10)
        return {"type": "http.disconnect"}

    # -- what was sent ----------------------------------------------------------------------
    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one http.response.start, got {len(starts)}"
        return starts[0]

    @property
    def has_start(self) -> bool:
        return any(m["type"] == "http.response.start" for m in self.messages)

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(bytes(k), bytes(v)) for k, v in self.start.get("headers", [])]

    def header(self, name: str) -> str | None:
        values = self.headers(name)
        return values[0] if values else None

    def headers(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.raw_headers if k.lower() == key]

    @property
    def body_messages(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body_count(self) -> int:
        return len(self.body_messages)

    @property
    def chunks(self) -> list[bytes]:
        return [bytes(m.get("body", b"")) for m in self.body_messages]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def complete(self) -> bool:
        msgs = self.body_messages
        return bool(msgs) and not msgs[-1].get("more_body", False)


def html_app(
    body: bytes = b"<html><head><title>t</title></head><body><p>hi</p></body></html>",
    *,
    status: int = 200,
    content_type: str = "text/html; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
    delay: float = 0.0,
    content_length: bool = True,
) -> Callable[..., Awaitable[None]]:
    """A plain ASGI app answering every request with one whole body."""
    extra = list(headers)

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        if delay:
            await asyncio.sleep(delay)
        raw = [(b"content-type", content_type.encode("latin-1"))] if content_type else []
        if content_length:
            raw.append((b"content-length", str(len(body)).encode()))
        raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return app


def chunked_app(
    chunks: list[bytes],
    *,
    status: int = 200,
    content_type: str = "text/html; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
    after_start: Callable[[], Awaitable[None] | None] | None = None,
    after_chunk: Callable[[int], Awaitable[None] | None] | None = None,
) -> Callable[..., Awaitable[None]]:
    """A plain ASGI app streaming ``chunks`` (``more_body=True`` on all but the last).

    ``after_start()`` / ``after_chunk(i)`` run right after the corresponding ``send`` returned:
    the place to assert what the client has already received."""
    extra = list(headers)

    async def _call(hook: Any, *args: Any) -> None:
        if hook is not None:
            result = hook(*args)
            if asyncio.iscoroutine(result):
                await result

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raw = [(b"content-type", content_type.encode("latin-1"))]
        raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await _call(after_start)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            await _call(after_chunk, i)

    return app


def header_user(scope: dict[str, Any]) -> User | None:
    """Test-only auth: the user named by an ``X-User`` header (the last one), if any."""
    user = None
    for k, v in scope.get("headers", []):
        if k.lower() == b"x-user":
            user = User(v.decode())
    return user


def header_auth(app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """``header_user`` as ``scope["user"]``, for an app under httpx.ASGITransport."""

    async def wrapped(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            user = header_user(scope)
            if user is not None:
                scope = {**scope, "user": user}
        await app(scope, receive, send)

    return wrapped


# ------------------------------------------------------------------------------------------
# WSGI
# ------------------------------------------------------------------------------------------


def wsgi_environ(
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    user: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    import io
    import sys

    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for k, v in (headers or {}).items():
        environ["HTTP_" + k.upper().replace("-", "_")] = v
    if user is not None:
        environ["REMOTE_USER"] = user
    environ.update(extra)
    return environ


@dataclass
class WSGIResult:
    status: str
    headers: list[tuple[str, str]]
    chunks: list[bytes]
    iterable: Any
    start_calls: int = 0

    @property
    def code(self) -> int:
        return int(self.status.split()[0])

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: str) -> str | None:
        values = self.header_list(name)
        return values[0] if values else None

    def header_list(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def call_wsgi(app: Callable[..., Any], environ: dict[str, Any]) -> WSGIResult:
    """Run a WSGI app as a server would: start_response (with write), iterate, close."""
    out = WSGIResult(status="", headers=[], chunks=[], iterable=None)
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info is not None and out.chunks:
            raise exc_info[1].with_traceback(exc_info[2])
        out.status, out.headers = status, list(headers)
        out.start_calls += 1
        return written.append

    result = app(environ, start_response)
    out.iterable = result
    try:
        for chunk in result:
            if written:
                out.chunks += written
                written.clear()
            if chunk:
                out.chunks.append(chunk)
        out.chunks += written
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return out
