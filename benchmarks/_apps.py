"""Small in-process ASGI/WSGI apps, requests and helpers shared by the middleware sections."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

from bosh_middleware import PrebindSession

PAGE = (
    b"<!doctype html><html><head><meta charset='utf-8'><title>bench</title></head>"
    b"<body><h1>Hello</h1>" + b"<p>lorem ipsum dolor sit amet</p>" * 60 + b"</body></html>"
)
NAV_HEADERS = [(b"accept", b"text/html,application/xhtml+xml"), (b"sec-fetch-dest", b"document")]


class User:
    is_authenticated = True
    username = "bench"


def asgi_scope(path: str = "/", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(NAV_HEADERS if headers is None else headers),
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "user": User(),
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class Sink:
    """An ASGI ``send`` that keeps the body (or only counts it) and the time of the last byte."""

    def __init__(self, keep: bool = True, on_body: Callable[[int], None] | None = None) -> None:
        self.keep = keep
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.done_at = 0.0
        self.on_body = on_body

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = message.get("headers", [])
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            self.size += len(body)
            if self.keep:
                self.chunks.append(bytes(body))
            if self.on_body is not None:
                self.on_body(len(body))
            if not message.get("more_body", False):
                self.done_at = time.perf_counter()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


async def call_asgi(app: Any, scope: dict[str, Any], sink: Any) -> float:
    """Run one request; seconds until the last body byte was sent."""
    t0 = time.perf_counter()
    await app(scope, _receive, sink)
    return (getattr(sink, "done_at", 0.0) or time.perf_counter()) - t0


def wsgi_environ(
    path: str = "/", navigation: bool = True, user: str | None = "bench"
) -> dict[str, Any]:
    import io
    import sys

    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if user:
        env["REMOTE_USER"] = user
    if navigation:
        env["HTTP_ACCEPT"] = "text/html,application/xhtml+xml"
        env["HTTP_SEC_FETCH_DEST"] = "document"
    return env


def call_wsgi(app: Any, environ: dict[str, Any]) -> tuple[float, str, bytes]:
    t0 = time.perf_counter()
    status: list[str] = []

    def start_response(s: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return time.perf_counter() - t0, status[0] if status else "", body


_VARS = re.compile(rb'BOSH_JID="([^"]+)",BOSH_SID="([^"]+)",BOSH_RID=(\d+)')


def session_in(body: bytes, service_url: str) -> PrebindSession | None:
    """The session the middleware wrote into a page (None if the page carries none)."""
    m = _VARS.search(body)
    if m is None:
        return None
    return PrebindSession(
        jid=m.group(1).decode(),
        sid=m.group(2).decode(),
        rid=int(m.group(3)),
        service_url=service_url,
    )


def sleep_view_asgi(delay: float, page: bytes = PAGE) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(delay)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/html; charset=utf-8"),
                    (b"content-length", str(len(page)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": page})

    return app


def sleep_view_wsgi(delay: float, page: bytes = PAGE) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        time.sleep(delay)
        start_response(
            "200 OK",
            [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page)))],
        )
        return [page]

    return app
