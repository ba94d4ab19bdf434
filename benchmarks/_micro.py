"""In-process cost of the middleware on requests it does not touch, in microseconds per request:
the same request through the bare app, an empty pass-through wrapper (the floor for any
middleware) and the middleware. No server, no sockets: the difference is the middleware.

The requests are ``_passapps.SCENARIOS``, with the headers the load generator sends (plus Host
and User-Agent).

Paired, not one long loop per app: on a shared VM the speed of the machine drifts by tens of
per cent within seconds, more than the differences measured here. So short chunks of calls
(``CHUNK``) through each app are interleaved, and each difference is the median over ``PAIRS``
of (app chunk - bare chunk), measured back to back: drift cancels within a pair."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import statistics
import sys
import time
from typing import Any

from ._passapps import _asgi_auth, _inner, _wsgi_auth, _wsgi_inner, credentials
from ._util import Bytecodes

Headers = tuple[tuple[str, str], ...]
_BASE_HEADERS = (("Host", "127.0.0.1:8000"), ("User-Agent", "wrk"))


def _asgi_apps() -> dict[str, Any]:
    from bosh_middleware.asgi import BOSHPrebindMiddleware

    async def empty(scope: Any, receive: Any, send: Any) -> None:
        await _inner(scope, receive, send)

    return {
        "bare": _asgi_auth(_inner),
        "empty wrapper": _asgi_auth(empty),
        "middleware": _asgi_auth(
            BOSHPrebindMiddleware(
                _inner,
                service_url="http://127.0.0.1:9/http-bind",
                credentials=credentials,
                exclude_paths=("/static/",),
            )
        ),
    }


def _wsgi_apps() -> dict[str, Any]:
    from bosh_middleware.wsgi import BOSHPrebindMiddleware

    def empty(environ: Any, start_response: Any) -> Any:
        return _wsgi_inner(environ, start_response)

    return {
        "bare": _wsgi_auth(_wsgi_inner),
        "empty wrapper": _wsgi_auth(empty),
        "middleware": _wsgi_auth(
            BOSHPrebindMiddleware(
                _wsgi_inner,
                service_url="http://127.0.0.1:9/http-bind",
                credentials=credentials,
                exclude_paths=("/static/",),
            )
        ),
    }


#: Calls per chunk, and chunks per app: about 0.5 s per app and scenario on a slow VM.
CHUNK = 200
PAIRS = 300


def _paired(timers: dict[str, Any], pairs: int) -> dict[str, float]:
    """us per call: the bare app's median chunk, and each other app's as bare + the median of
    its paired differences."""
    bare = timers["bare"]
    chunks: list[float] = []
    diffs: dict[str, list[float]] = {k: [] for k in timers if k != "bare"}
    for timer in timers.values():  # warm-up
        timer()
    gc.disable()
    try:
        for _ in range(pairs):
            for name in diffs:
                b = bare()
                chunks.append(b)
                diffs[name].append(timers[name]() - b)
    finally:
        gc.enable()
    base = statistics.median(chunks)
    out = {"bare": base * 1e6}
    out.update({k: (base + statistics.median(v)) * 1e6 for k, v in diffs.items()})
    return out


def _asgi_scope(path: str, request_headers: Headers) -> dict[str, Any]:
    """The scope of a GET with the load generator's headers (copy it per call)."""
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
        "headers": [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in (*_BASE_HEADERS, *request_headers)
        ],
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    return None


def _wsgi_environ(path: str, request_headers: Headers) -> dict[str, Any]:
    """The environ of the same GET (copy it per call)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for k, v in (*_BASE_HEADERS, *request_headers):
        environ["HTTP_" + k.upper().replace("-", "_")] = v
    return environ


def _start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
    return None


def _wsgi_request(app: Any, environ: dict[str, Any]) -> None:
    """One request through ``app``, as a server runs it: the body read, ``close()`` called."""
    result = app(dict(environ), _start_response)
    for _chunk in result:
        pass
    close = getattr(result, "close", None)
    if close is not None:
        close()


def asgi_cost(path: str, request_headers: Headers, pairs: int = PAIRS) -> dict[str, float]:
    scope = _asgi_scope(path, request_headers)

    async def chunk(app: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(CHUNK):
            await app(dict(scope), _receive, _send)
        return (time.perf_counter() - t0) / CHUNK

    loop = asyncio.new_event_loop()
    try:
        timers = {
            name: (lambda app=app: loop.run_until_complete(chunk(app)))
            for name, app in _asgi_apps().items()
        }
        return _paired(timers, pairs)
    finally:
        loop.close()


def wsgi_cost(path: str, request_headers: Headers, pairs: int = PAIRS) -> dict[str, float]:
    environ = _wsgi_environ(path, request_headers)

    def timer(app: Any) -> Any:
        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(CHUNK):
                _wsgi_request(app, environ)
            return (time.perf_counter() - t0) / CHUNK

        return run

    return _paired({k: timer(v) for k, v in _wsgi_apps().items()}, pairs)


def asgi_bytecodes(path: str, request_headers: Headers) -> dict[str, int]:
    """Bytecodes per request, by app (see ``_util.Bytecodes``), for the ``asgi_cost`` request."""
    scope = _asgi_scope(path, request_headers)

    def one(app: Any) -> int:
        coro = app(dict(scope), _receive, _send)
        with contextlib.suppress(StopIteration), Bytecodes() as counts:
            coro.send(None)  # nothing here ever suspends: one step runs it all
        return counts.total()

    return {name: one(app) for name, app in _asgi_apps().items()}


def wsgi_bytecodes(path: str, request_headers: Headers) -> dict[str, int]:
    """As ``asgi_bytecodes``, for the ``wsgi_cost`` request."""
    environ = _wsgi_environ(path, request_headers)

    def one(app: Any) -> int:
        with Bytecodes() as counts:
            _wsgi_request(app, environ)
        return counts.total()

    return {name: one(app) for name, app in _wsgi_apps().items()}
