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
import statistics
import time
from typing import Any

from ._passapps import _asgi_auth, _inner, _wsgi_auth, _wsgi_inner, credentials

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


def asgi_cost(path: str, request_headers: Headers, pairs: int = PAIRS) -> dict[str, float]:
    headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in (*_BASE_HEADERS, *request_headers)
    ]
    template = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    async def chunk(app: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(CHUNK):
            await app(dict(template), receive, send)
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
    import io
    import sys

    template = {
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
        template["HTTP_" + k.upper().replace("-", "_")] = v

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    def timer(app: Any) -> Any:
        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(CHUNK):
                result = app(dict(template), start_response)
                for _chunk in result:
                    pass
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            return (time.perf_counter() - t0) / CHUNK

        return run

    return _paired({k: timer(v) for k, v in _wsgi_apps().items()}, pairs)


def _bytecodes(run: Any) -> int:
    """Python bytecode instructions executed by ``run()``: unlike time, the same on every
    machine and every run, so a change of a few instructions shows where timing cannot."""
    import sys

    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(previous)
    return count


def asgi_bytecodes(path: str, request_headers: Headers) -> dict[str, int]:
    """Bytecodes per request, by app (see ``_bytecodes``); the scope as in ``asgi_cost``."""
    headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in (*_BASE_HEADERS, *request_headers)
    ]
    template = {"type": "http", "method": "GET", "path": path, "query_string": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    def one(app: Any) -> int:
        coro = app({**template, "headers": list(headers)}, receive, send)

        def run() -> None:
            with contextlib.suppress(StopIteration):
                coro.send(None)  # nothing here ever suspends: one step runs it all

        return _bytecodes(run)

    return {name: one(app) for name, app in _asgi_apps().items()}


def wsgi_bytecodes(path: str, request_headers: Headers) -> dict[str, int]:
    import io

    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "wsgi.input": io.BytesIO(),
    }
    for k, v in (*_BASE_HEADERS, *request_headers):
        environ["HTTP_" + k.upper().replace("-", "_")] = v

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    def one(app: Any) -> int:
        def run() -> None:
            result = app(dict(environ), start_response)
            for _chunk in result:
                pass
            close = getattr(result, "close", None)
            if close is not None:
                close()

        return _bytecodes(run)

    return {name: one(app) for name, app in _wsgi_apps().items()}
