"""Independent wire accounting: HTTP requests, new TCP connections and the round trips on the
critical path, counted below the engine rather than taken from what it reports about itself.

``install()`` wraps, for the whole process, httpx's own transports
(``HTTPTransport.handle_request`` and ``AsyncHTTPTransport.handle_async_request``) and the
builtin transport's pools (``http11.SyncPool`` / ``AsyncPool``: connection set-up, single
exchanges, batches on several connections and pipelines on one), so whatever clients the
engine builds internally are counted, on either transport. Counting happens only while a
``WireLog`` is ``active()``.

A batch (or an ordered one, pipelined on one connection) of the builtin transport is logged as
its requests all sent at the batch's start and answered at its end (a request the server still
held, closed by the client, is never answered): they overlap, so they share one round trip, as
on the wire.

A *round trip* is measured from timestamps: request B depends on request A when B was sent after
A's response headers arrived. The round trips of a prebind are the longest such chain; requests
that overlap in time (pipelined) share a round trip.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["WireLog", "current", "install", "round_trips"]


@dataclass
class _Req:
    start: float
    end: float = float("inf")  # response headers received; inf = never answered (cancelled)


@dataclass
class WireLog:
    """Everything seen since the last ``reset()``."""

    requests: list[_Req] = field(default_factory=list)
    connects: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self) -> None:
        with self.lock:
            self.requests = []
            self.connects = 0

    def begin(self) -> _Req:
        r = _Req(time.perf_counter())
        with self.lock:
            self.requests.append(r)
        return r

    def connected(self) -> None:
        with self.lock:
            self.connects += 1

    def snapshot(self) -> tuple[int, int, int]:
        """(requests, round trips, new TCP connections)."""
        with self.lock:
            reqs = list(self.requests)
            connects = self.connects
        return len(reqs), round_trips(reqs), connects

    @contextlib.contextmanager
    def active(self) -> Iterator[WireLog]:
        global _active
        install()
        prev, _active = _active, self
        try:
            yield self
        finally:
            _active = prev


_active: WireLog | None = None


def current() -> WireLog | None:
    return _active


def round_trips(reqs: list[_Req]) -> int:
    """Longest chain of requests each sent after the previous one's answer arrived."""
    reqs = sorted(reqs, key=lambda r: r.start)
    depth: list[int] = []
    for i, r in enumerate(reqs):
        depth.append(1 + max((depth[j] for j in range(i) if reqs[j].end <= r.start), default=0))
    return max(depth, default=0)


def _chain_trace(request: httpx.Request, log: WireLog, is_async: bool) -> None:
    inner = request.extensions.get("trace")
    if is_async:

        async def atrace(event: str, info: Any) -> None:
            if event == "connection.connect_tcp.complete":
                log.connected()
            if inner is not None:
                await inner(event, info)

        request.extensions["trace"] = atrace
    else:

        def trace(event: str, info: Any) -> None:
            if event == "connection.connect_tcp.complete":
                log.connected()
            if inner is not None:
                inner(event, info)

        request.extensions["trace"] = trace


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    sync_orig = httpx.HTTPTransport.handle_request
    async_orig = httpx.AsyncHTTPTransport.handle_async_request

    def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        log = _active
        if log is None:
            return sync_orig(self, request)
        _chain_trace(request, log, is_async=False)
        rec = log.begin()
        response = sync_orig(self, request)
        rec.end = time.perf_counter()
        return response

    async def handle_async_request(
        self: httpx.AsyncHTTPTransport, request: httpx.Request
    ) -> httpx.Response:
        log = _active
        if log is None:
            return await async_orig(self, request)
        _chain_trace(request, log, is_async=True)
        rec = log.begin()
        response = await async_orig(self, request)
        rec.end = time.perf_counter()
        return response

    httpx.HTTPTransport.handle_request = handle_request  # type: ignore[method-assign]
    httpx.AsyncHTTPTransport.handle_async_request = handle_async_request  # type: ignore[method-assign]
    _install_http11()


def _answered(recs: list[_Req], results: list[Any]) -> None:
    now = time.perf_counter()
    for rec, result in zip(recs, results, strict=True):
        if result is not None:
            rec.end = now


def _install_http11() -> None:
    from bosh_middleware import http11

    sync_acquire, async_acquire = http11.SyncPool._acquire, http11.AsyncPool._acquire
    sync_exchange = http11.SyncPool.exchange
    async_start = http11.AsyncPool.start  # (its exchange and batch run through it too)

    # (*args: whatever the pools take, so that a change of signature there cannot break this)
    def s_acquire(self: http11.SyncPool, *args: Any) -> Any:
        conn = sync_acquire(self, *args)
        if _active is not None and not conn[1]:
            _active.connected()
        return conn

    async def a_acquire(self: http11.AsyncPool, *args: Any) -> Any:
        conn = await async_acquire(self, *args)
        if _active is not None and not conn[1]:
            _active.connected()
        return conn

    def s_exchange(self: http11.SyncPool, *args: Any) -> Any:
        rec = _active.begin() if _active is not None else None
        result = sync_exchange(self, *args)
        if rec is not None:
            rec.end = time.perf_counter()
        return result

    def s_several(send: Any) -> Any:
        """A wrapper of ``send``, a sync pool's method that sends several bodies at once
        (``batch``: on several connections; ``pipeline``: on one)."""

        def counted(self: http11.SyncPool, bodies: Any, *args: Any) -> Any:
            recs = [_active.begin() for _ in bodies] if _active is not None else []
            results = send(self, bodies, *args)
            if recs:
                _answered(recs, results)
            return results

        return counted

    def a_start(
        self: http11.AsyncPool,
        bodies: Any,
        timeout: Any,
        limit: Any,
        settles: Any,
        stagger: Any,
        done: Any,
        *more: Any,
    ) -> Any:
        if _active is None:
            return async_start(self, bodies, timeout, limit, settles, stagger, done, *more)
        recs = [_active.begin() for _ in bodies]

        def counted(answers: Any, exc: Any) -> None:
            if answers is not None:
                _answered(recs, answers)
            done(answers, exc)

        return async_start(self, bodies, timeout, limit, settles, stagger, counted, *more)

    http11.SyncPool._acquire = s_acquire  # type: ignore[method-assign]
    http11.AsyncPool._acquire = a_acquire  # type: ignore[method-assign]
    http11.SyncPool.exchange = s_exchange  # type: ignore[method-assign]
    http11.SyncPool.batch = s_several(http11.SyncPool.batch)  # type: ignore[method-assign]
    http11.SyncPool.pipeline = s_several(http11.SyncPool.pipeline)  # type: ignore[method-assign]
    http11.AsyncPool.start = a_start  # type: ignore[method-assign]
