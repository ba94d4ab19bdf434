"""6. Injection cost and memory.

* Injection time per MB: the ``Injector`` alone on a 1 MB HTML page (``</head>`` near the top,
  and the worst case: no ``</head>``, ``</body>`` at the very end, so every byte is searched),
  whole and streamed in 64 KiB / 16 KiB chunks; and the same 1 MB page through the ASGI and WSGI
  middleware with the session already made (the prebind is section 1's business), minus the page
  without the middleware.
* Memory: a 200 MB streamed download (application/octet-stream) for a logged-in user's
  navigation through the ASGI middleware (real prebind started, then discarded), and 200 MB of
  streamed HTML: peak traced allocations (tracemalloc) and RSS growth while streaming, and the
  most bytes the middleware held back at any moment (bytes in - bytes out).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import tracemalloc
from typing import Any

from bosh_middleware import Credentials, PrebindSession
from bosh_middleware.asgi import BOSHPrebindMiddleware as ASGIMiddleware
from bosh_middleware.inject import Injector
from bosh_middleware.wsgi import BOSHPrebindMiddleware as WSGIMiddleware

from ._apps import Sink, asgi_scope, call_asgi, call_wsgi, session_in, wsgi_environ
from ._util import Result, md_table, prosody, verdict

MB = 1024 * 1024
CHUNK = 64 * 1024
_SESSION = PrebindSession(
    jid="bench@localhost/web-0123456789ab",
    sid="0" * 36,
    rid=2**40,
    service_url="http://127.0.0.1:9/http-bind",
)
_SNIPPET = (
    '<script>var BOSH_JID="bench@localhost/web-0123456789ab",BOSH_SID="'
    + "0" * 36
    + '",BOSH_RID=1099511627776;</script>'
)


def _page(size: int, head: bool) -> bytes:
    filler = b"<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit.</p>\n"
    top = b"<!doctype html><html><head><title>t</title>" + (b"</head>" if head else b"") + b"<body>"
    end = b"</body></html>\n"
    n = (size - len(top) - len(end)) // len(filler) + 1
    return (top + filler * n)[: size - len(end)] + end


def _time(fn: Any, reps: int) -> float:
    fn()
    times = []
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return statistics.median(times)


def _inject(body: bytes, chunk: int | None) -> bytes:
    inj = Injector(_SNIPPET, charset="utf-8")
    if chunk is None:
        return inj.feed(body) + inj.finish()
    out = [inj.feed(body[i : i + chunk]) for i in range(0, len(body), chunk)]
    out.append(inj.finish())
    return b"".join(out)


class _Ready:
    """Stands in for a finished prebind (AsyncPending/SyncPending): injection cost only."""

    error = None

    async def session(self) -> PrebindSession:
        return _SESSION

    def discard(self) -> None:
        pass


class _ReadySync(_Ready):
    def session(self) -> PrebindSession:  # type: ignore[override]
        return _SESSION


def _asgi_page_app(body: bytes, chunk: int | None) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/html; charset=utf-8")]
        if chunk is None:
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if chunk is None:
            await send({"type": "http.response.body", "body": body})
            return
        for i in range(0, len(body), chunk):
            await send(
                {
                    "type": "http.response.body",
                    "body": body[i : i + chunk],
                    "more_body": i + chunk < len(body),
                }
            )

    return app


def _middleware_rows(reps: int) -> list[list[object]]:
    rows = []
    body = _page(MB, head=False)  # worst case
    for label, chunk in (("whole (Content-Length)", None), ("streamed, 64 KiB chunks", CHUNK)):
        app = _asgi_page_app(body, chunk)
        mw = ASGIMiddleware(
            app,
            service_url="http://127.0.0.1:9/http-bind",
            credentials=lambda u: Credentials("bench@localhost", "x"),
        )
        mw.core.start_async = lambda c: _Ready()  # type: ignore[assignment,method-assign]

        async def one(a: Any) -> None:
            sink = Sink(keep=False)
            await call_asgi(a, asgi_scope(), sink)

        loop = asyncio.new_event_loop()
        t_with = _time(lambda loop=loop, mw=mw: loop.run_until_complete(one(mw)), reps)
        t_without = _time(lambda loop=loop, app=app: loop.run_until_complete(one(app)), reps)
        loop.close()
        rows.append(
            [
                "ASGI middleware",
                "1 MB, no </head>",
                label,
                f"{(t_with - t_without) * 1000:.2f} ms/MB",
            ]
        )

    def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
        start_response(
            "200 OK",
            [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    wmw = WSGIMiddleware(
        wsgi_app,
        service_url="http://127.0.0.1:9/http-bind",
        credentials=lambda u: Credentials("bench@localhost", "x"),
    )
    wmw.core.start_sync = lambda c: _ReadySync()  # type: ignore[assignment,method-assign]
    t_with = _time(lambda: call_wsgi(wmw, wsgi_environ()), reps)
    t_without = _time(lambda: call_wsgi(wsgi_app, wsgi_environ()), reps)
    rows.append(
        [
            "WSGI middleware",
            "1 MB, no </head>",
            "whole (list body)",
            f"{(t_with - t_without) * 1000:.2f} ms/MB",
        ]
    )
    return rows


# --- memory ---------------------------------------------------------------------------------------
class _Meter:
    """Peak traced memory and RSS while streaming, and the most bytes held back."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.rss0 = self.proc.memory_info().rss
        self.rss_peak = self.rss0
        self.fed = 0
        self.out = 0
        self.held_max = 0
        self.n = 0

    def fed_chunk(self, size: int) -> None:
        self.fed += size

    def sent(self, size: int) -> None:
        self.out += size
        self.held_max = max(self.held_max, self.fed - self.out)
        self.n += 1
        if self.n % 64 == 0:
            self.rss_peak = max(self.rss_peak, self.proc.memory_info().rss)


def _memory(url: str, creds: Credentials, size_mb: int) -> list[list[object]]:
    total = size_mb * MB
    chunk_bin = bytes(CHUNK)
    html_first = _page(CHUNK, head=True)[: -len(b"</body></html>\n")]
    html_chunk = (b"<p>" + b"x" * 60 + b"</p>\n") * (CHUNK // 68)
    cases = [
        ("application/octet-stream", b"application/octet-stream", [chunk_bin], b""),
        (
            "text/html, </head> in the first chunk",
            b"text/html; charset=utf-8",
            [html_first, html_chunk],
            b"</body></html>",
        ),
        (
            "text/html, no </head>, </body> at the end",
            b"text/html; charset=utf-8",
            [html_chunk],
            b"</body></html>",
        ),
    ]
    rows: list[list[object]] = []
    for label, ctype, chunks, tail in cases:
        results = {}
        for variant in ("without", "with"):
            results[variant] = asyncio.run(
                _stream_once(url, creds, variant == "with", total, ctype, chunks, tail)
            )
        (p0, r0, _, e0, _), (p1, r1, h1, e1, s1) = results["without"], results["with"]
        ok = (p1 - p0) < 10 * MB and (r1 - r0) < 10 * MB and h1 <= CHUNK
        rows.append(
            [
                label,
                f"{s1 / MB:.0f} MB",
                f"{p0 / MB:.2f} MB",
                f"{p1 / MB:.2f} MB",
                f"{(p1 - p0) / MB:+.2f} MB",
                f"{(r1 - r0) / MB:+.1f} MB",
                f"{h1:,} B",
                f"{(e1 - e0) / (s1 / MB) * 1000:+.3f} ms/MB",
                verdict(ok),
            ]
        )
    return rows


async def _stream_once(
    url: str,
    creds: Credentials,
    with_mw: bool,
    total: int,
    ctype: bytes,
    chunks: list[bytes],
    tail: bytes,
) -> tuple[int, int, int, float, int]:
    """(peak traced bytes, RSS growth, most bytes held back, seconds, bytes out) of streaming
    ``total`` bytes once untraced (the time) and once under tracemalloc (the memory)."""
    meter = _Meter()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/warm":  # a small page: makes the engine's pooled client first
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/html")],
                }
            )
            await send({"type": "http.response.body", "body": _page(4096, True)})
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]}
        )
        sent, i = 0, 0
        while sent < total:
            c = chunks[min(i, len(chunks) - 1)]
            i += 1
            meter.fed_chunk(len(c))
            await send({"type": "http.response.body", "body": c, "more_body": True})
            sent += len(c)
        meter.fed_chunk(len(tail))
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    mw = ASGIMiddleware(app, service_url=url, credentials=lambda u: creds, timeout=5.0)
    target: Any = mw if with_mw else app

    async def request(path: str, sink: Any) -> float:
        first: list[bytes] = []

        async def send(message: Any) -> None:
            if message["type"] == "http.response.body" and not first:
                first.append(bytes(message.get("body", b""))[:8192])
            await sink(message)

        scope = asgi_scope(path)
        elapsed = await call_asgi(target, scope, send)
        session = session_in(b"".join(first), url)
        if session is not None:  # a page carried a session: end it
            await mw.core.async_prebinder.terminate(session)
        tasks = list(getattr(mw.core, "_tasks", ()))
        if tasks:  # discarded prebinds are terminated in the background: let them finish
            await asyncio.wait(tasks, timeout=5)
        return elapsed

    await request("/warm", Sink(keep=False))
    elapsed = await request("/download", Sink(keep=False))  # timed, untraced
    meter.__init__()  # type: ignore[misc]
    sink = Sink(keep=False, on_body=meter.sent)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    await request("/download", sink)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    await mw.core.aclose()
    return peak, meter.rss_peak - meter.rss0, meter.held_max, elapsed, sink.size


def run(*, quick: bool = False, log_level: str = "info", **_: object) -> Result:
    reps = 5 if quick else 20
    size_mb = 20 if quick else 200
    rows: list[list[object]] = []
    data: dict[str, object] = {}
    for name, head in (("1 MB, </head> near the top", True), ("1 MB, no </head>", False)):
        body = _page(MB, head)
        for label, chunk in (("whole", None), ("64 KiB chunks", CHUNK), ("16 KiB chunks", 16384)):
            t = _time(lambda body=body, chunk=chunk: _inject(body, chunk), reps)
            rows.append(["Injector", name, label, f"{t * 1000:.2f} ms/MB"])
            data[f"injector/{name}/{label}"] = t * 1000
    rows += _middleware_rows(reps)
    t1 = md_table(["what", "page", "body", "injection time"], rows)
    with prosody(secure=False, log_level=log_level) as srv:
        creds = Credentials(*srv.users(1)[0])
        mem_rows = _memory(srv.service_url, creds, size_mb)
    t2 = md_table(
        [
            "streamed through the ASGI middleware (logged-in navigation)",
            "size",
            "peak traced without",
            "peak traced with",
            "growth",
            "RSS growth vs without",
            "most bytes held back",
            "time added",
            "target: < 10 MB, held <= one chunk",
        ],
        mem_rows,
    )
    return Result(
        "6. Injection cost and memory",
        [t1, t2],
        [
            f"Injection times are medians of {reps} runs. The middleware rows use a ready-made"
            " session (no prebind) and subtract the same page served without the middleware.",
            f"Memory: {size_mb} MB in 64 KiB chunks, after one warm-up page (the engine's pooled"
            " client exists, as in a running server); tracemalloc peak during the streaming (Python"
            " allocations, the app's included), RSS sampled every 64 chunks; 'most bytes held back'"
            " = max over time of (bytes the app sent - bytes that left the middleware). Time added"
            " is measured on a separate, untraced run.",
        ],
        data,
    )
