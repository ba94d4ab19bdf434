"""A prebind's life in ``core``, where timing decides: a page cancelled in the very loop turns
its prebind finishes in, pages that time out behind a full pool, a middleware used after it was
closed. Fake engines (a gate each prebind waits at) make the races happen on purpose; real
Prosody shows a page through the adapters."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bosh_middleware import asgi, wsgi
from bosh_middleware.breaker import CircuitBreaker
from bosh_middleware.config import MiddlewareConfig
from bosh_middleware.core import PrebindCore
from bosh_middleware.credentials import Credentials, StaticCredentials
from bosh_middleware.session import PrebindSession
from support.asgi_recorder import (
    NAV,
    ASGIRecorder,
    User,
    call_wsgi,
    html_app,
    http_scope,
    wsgi_environ,
)
from support.bosh_check import (
    PrebindSpy,
    bare,
    drain_async,
    end_sessions,
    page_vars,
    wait_until,
)
from support.xmpp_servers import XMPPServer

NOWHERE = "http://127.0.0.1:9/http-bind"  # (never reached: the engines are fakes)
CREDS = Credentials("alice@localhost", "pw-not-secret-1")
PAGE = b"<html><head><title>t</title></head><body>page</body></html>"
#: The size of ``PrebindCore``'s thread pool.
WORKERS = 64


def fake_session(n: int) -> PrebindSession:
    return PrebindSession(jid="alice@localhost/r", sid=f"sid{n}", rid=10, service_url=NOWHERE)


class FakeAsyncEngine:
    """Stands in for ``AsyncPrebinder``: each prebind waits for ``finish``, then succeeds."""

    def __init__(self) -> None:
        self.finish = asyncio.Event()
        self.started = 0
        self.terminated: list[str] = []

    async def prebind(self, credentials: Credentials) -> PrebindSession:
        self.started += 1
        n = self.started
        await self.finish.wait()
        return fake_session(n)

    async def terminate(self, session: PrebindSession) -> bool:
        self.terminated.append(session.sid)
        return True

    async def aclose(self) -> None:
        pass


class FakeSyncEngine:
    """Stands in for ``Prebinder``: each prebind holds its worker until ``release``, as a slow
    XMPP server would, then succeeds."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0
        self.terminated: list[str] = []
        self._lock = threading.Lock()

    def prebind(self, credentials: Credentials) -> PrebindSession:
        with self._lock:
            self.started += 1
            n = self.started
        self.release.wait(10)
        return fake_session(n)

    def terminate(self, session: PrebindSession) -> bool:
        with self._lock:
            self.terminated.append(session.sid)
        return True

    def close(self) -> None:
        pass


def fake_core(engine: FakeSyncEngine | FakeAsyncEngine, **settings: Any) -> PrebindCore:
    core = PrebindCore(
        MiddlewareConfig(service_url=NOWHERE, credentials=lambda user: None, **settings)
    )
    if isinstance(engine, FakeSyncEngine):
        core._sync = engine  # type: ignore[assignment]
    else:
        core._async = engine  # type: ignore[assignment]
    return core


def fake_asgi(engine: FakeAsyncEngine) -> tuple[asgi.BOSHPrebindMiddleware, PrebindCore]:
    """The ASGI middleware on ``engine``, serving ``PAGE`` to anyone as alice."""
    mw = asgi.BOSHPrebindMiddleware(html_app(PAGE), NOWHERE, lambda user: CREDS)
    mw.core._async = engine  # type: ignore[assignment]
    return mw, mw.core


@pytest.fixture
def sync_engine() -> Iterator[FakeSyncEngine]:
    engine = FakeSyncEngine()
    yield engine
    engine.release.set()  # (a failed test must not leave the pool's threads waiting)


# ------------------------------------------------------------------------------------------
# AsyncPending: a cancelled wait never hands the session out
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("turns", range(4))
async def test_a_page_cancelled_as_its_prebind_finishes_gets_it_ended(turns: int) -> None:
    """The ASGI adapter cancels its wait for the session when the client goes away. Should
    that land ``turns`` loop turns after the prebind finished (before the wait resumed), the
    session must be ended, never returned to the cancelled caller: claimed by ``session()``,
    no ``discard()`` would end it, and it would stay live at the XMPP server. (asyncio's
    ``wait_for`` on 3.11 returned it, for 1 to 3 turns.)"""
    engine = FakeAsyncEngine()
    core = fake_core(engine)
    pending = core.start_async(CREDS)
    assert pending is not None
    waiting = asyncio.ensure_future(pending.session())
    await asyncio.sleep(0.01)  # the page waits for the prebind
    engine.finish.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    accepted = waiting.cancel()  # the client went away
    pending.discard()  # (what the adapter does next: the pending is claimed already)
    await asyncio.wait([waiting])
    await core.aclose()  # (until the terminates it started are done)

    if accepted:
        assert waiting.cancelled(), f"{waiting.result()} went to a caller that was cancelled"
        assert engine.terminated == ["sid1"]
    else:  # finished before the cancel came: the caller has it, and must use or end it
        assert waiting.result().sid == "sid1"
        assert engine.terminated == []


async def test_a_page_that_waits_gets_its_session_and_nothing_is_ended() -> None:
    engine = FakeAsyncEngine()
    core = fake_core(engine)
    pending = core.start_async(CREDS)
    assert pending is not None
    engine.finish.set()
    session = await pending.session()
    pending.discard()
    await core.aclose()
    assert session is not None and session.sid == "sid1"
    assert engine.terminated == []


@pytest.mark.parametrize("turns", range(5))
async def test_an_asgi_client_gone_as_its_prebind_finishes_leaves_no_session_live(
    turns: int,
) -> None:
    """Through the ASGI middleware: the disconnect comes ``turns`` loop turns after the
    prebind finished. Either the page went out with its session before the disconnect, or
    the session is ended; never sent to a client that is gone (the server drops it without a
    word, and it seemed delivered), never left unsent and live."""
    engine = FakeAsyncEngine()
    mw, core = fake_asgi(engine)
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await engine.finish.wait()
        for _ in range(turns):
            await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    rec = ASGIRecorder()
    request = asyncio.ensure_future(
        mw(http_scope("/", headers=NAV, user=User("alice")), receive, rec.send)
    )
    await asyncio.sleep(0.01)  # the page waits for its prebind
    engine.finish.set()
    await asyncio.wait_for(request, 5)
    await core.aclose()
    delivered = page_vars(rec.body) is not None
    assert delivered != (engine.terminated == ["sid1"]), (delivered, engine.terminated)
    if turns == 0:  # (the disconnect and the session in the same turn: the disconnect wins)
        assert not delivered


@pytest.mark.parametrize("turns", range(5))
async def test_an_asgi_page_cancelled_as_its_prebind_finishes_leaves_no_session_live(
    turns: int,
) -> None:
    """The server cancels the page itself (a worker stopping, a timeout of its own) ``turns``
    loop turns after the prebind finished: the session went out, or it is ended."""
    engine = FakeAsyncEngine()
    mw, core = fake_asgi(engine)
    rec = ASGIRecorder()
    scope = http_scope("/", headers=NAV, user=User("alice"))
    request = asyncio.ensure_future(mw(scope, rec.receive, rec.send))
    await asyncio.sleep(0.01)  # the page waits for its prebind
    engine.finish.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    request.cancel()
    await asyncio.wait([request])
    await core.aclose()
    delivered = b"BOSH_SID" in rec.body
    assert delivered != (engine.terminated == ["sid1"]), (delivered, engine.terminated)


# ------------------------------------------------------------------------------------------
# SyncPending: a page that gave up does not leave its prebind queued
# ------------------------------------------------------------------------------------------


def fill_the_pool(core: PrebindCore, engine: FakeSyncEngine, pages: int) -> list[Any]:
    """``pages`` prebinds started, the first ``WORKERS`` of them running (held by the engine),
    the others queued behind them."""
    pendings = [core.start_sync(CREDS) for _ in range(pages)]
    assert all(p is not None for p in pendings)
    assert wait_until(lambda: engine.started == WORKERS)
    return pendings


def test_pages_that_time_out_behind_a_full_pool_start_no_prebind(
    sync_engine: FakeSyncEngine, caplog: Any
) -> None:
    """A slow XMPP server fills the pool, and the pages behind it time out. Their prebinds,
    still queued, must not start later: each would be a login and then a terminate for a page
    long gone, doubling the load on a server that is slow already."""
    caplog.set_level(logging.DEBUG, logger="bosh_middleware")
    pages = WORKERS + 36
    core = fake_core(sync_engine, timeout=0.2, breaker_threshold=1000)
    pendings = fill_the_pool(core, sync_engine, pages)
    assert [p.session() for p in pendings] == [None] * pages  # each page's timeout
    sync_engine.release.set()
    core.close()  # (waits for the pool's work)

    assert sync_engine.started == WORKERS  # only those that were running, not one per page
    assert wait_until(lambda: len(sync_engine.terminated) == WORKERS)  # and ended
    # every page's timeout was counted once, a cancelled prebind adding nothing
    timeouts = [r for r in caplog.records if getattr(r, "bosh_condition", None) == "timeout"]
    assert len(timeouts) == pages
    assert "BOSH prebind for" not in caplog.text  # (no success recorded for a page given up)


def test_discarded_prebinds_behind_a_full_pool_are_not_started(
    sync_engine: FakeSyncEngine, caplog: Any
) -> None:
    """``discard()`` (the response is no page after all) cancels a prebind still queued, and
    ends one that was running; neither counts against the server."""
    caplog.set_level(logging.DEBUG, logger="bosh_middleware")
    pages = WORKERS + 36
    core = fake_core(sync_engine, breaker_threshold=1)
    for pending in fill_the_pool(core, sync_engine, pages):
        pending.discard()
    sync_engine.release.set()
    core.close()

    assert sync_engine.started == WORKERS
    assert wait_until(lambda: len(sync_engine.terminated) == WORKERS)
    assert "failed" not in caplog.text
    assert core.breaker.state == "closed"


def test_a_discarded_trial_behind_a_full_pool_does_not_wedge_the_breaker(
    sync_engine: FakeSyncEngine,
) -> None:
    """The half-open trial is a prebind like any other: cancelled before it reached the server,
    it has no verdict to give, and the breaker must let another trial through at once rather
    than wait for that verdict for good."""
    now = [1000.0]
    core = fake_core(sync_engine)
    core.breaker = CircuitBreaker(1, 10, clock=lambda: now[0])
    fill_the_pool(core, sync_engine, WORKERS)
    core.breaker.record_failure()
    now[0] += 10
    trial = core.start_sync(CREDS)  # queued behind the full pool
    assert trial is not None
    assert core.start_sync(CREDS) is None  # one trial at a time
    trial.discard()
    second = core.start_sync(CREDS)
    assert second is not None  # another trial
    sync_engine.release.set()
    assert second.session() is not None  # its success closes the breaker
    assert core.breaker.state == "closed"
    core.close()
    assert sync_engine.started == WORKERS + 1  # the discarded trial never ran


def test_a_page_that_gets_its_session_is_unchanged(sync_engine: FakeSyncEngine) -> None:
    core = fake_core(sync_engine)
    sync_engine.release.set()
    pending = core.start_sync(CREDS)
    assert pending is not None
    session = pending.session()
    pending.discard()
    core.close()
    assert session is not None and session.sid == "sid1"
    assert sync_engine.terminated == []


# ------------------------------------------------------------------------------------------
# after close(): fail open
# ------------------------------------------------------------------------------------------


def test_start_sync_after_close_serves_the_page_without_a_session(
    sync_engine: FakeSyncEngine, caplog: Any
) -> None:
    """close() runs at exit (atexit), and a thread may still serve a page then, as may an app
    that closed the middleware itself: the pool refuses new work, which must not turn the
    page into an error."""
    core = fake_core(sync_engine)
    sync_engine.release.set()
    pending = core.start_sync(CREDS)
    assert pending is not None and pending.session() is not None
    core.close()
    assert core.start_sync(CREDS) is None
    assert "the middleware is closed" in caplog.text
    assert sync_engine.started == 1


def test_start_sync_after_close_does_not_wedge_a_half_open_trial(
    sync_engine: FakeSyncEngine,
) -> None:
    now = [1000.0]
    core = fake_core(sync_engine)
    core.breaker = CircuitBreaker(1, 10, clock=lambda: now[0])
    sync_engine.release.set()
    pending = core.start_sync(CREDS)  # (the pool that close() then shuts down)
    assert pending is not None and pending.session() is not None
    core.close()
    core.breaker.record_failure()
    now[0] += 10
    assert core.start_sync(CREDS) is None  # admitted as the trial, then not started
    assert core.breaker.allow()  # another trial may go


@pytest.fixture
def alice(prosody: XMPPServer) -> tuple[str, str]:
    return prosody.new_user("alice")


async def test_a_wsgi_page_after_close_is_served_unchanged(
    prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html")])
        return [PAGE]

    mw = wsgi.BOSHPrebindMiddleware(
        app, service_url=prosody.service_url, credentials=StaticCredentials({"alice": alice})
    )
    spy = PrebindSpy.on(mw.core, sync=True)
    try:
        r = await asyncio.to_thread(call_wsgi, mw, wsgi_environ("/", headers=NAV, user="alice"))
        assert bare(page_vars(r.body)["BOSH_JID"]) == alice[0]
        mw.core.close()
        r = await asyncio.to_thread(call_wsgi, mw, wsgi_environ("/", headers=NAV, user="alice"))
        assert (r.code, r.body) == (200, PAGE)
        assert len(spy.calls) == 1
    finally:
        await asyncio.to_thread(end_sessions, prosody.service_url, spy.sessions)


async def test_an_asgi_page_after_aclose_is_served(
    prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    """``aclose()`` (ASGI lifespan shutdown) closes this loop's connections only: a page after
    it is still a page, 200, whether it carries a session or not."""
    mw = asgi.BOSHPrebindMiddleware(
        html_app(PAGE),
        service_url=prosody.service_url,
        credentials=StaticCredentials({"alice": alice}),
    )
    spy = PrebindSpy.on(mw.core, sync=False)
    try:
        await mw.core.aclose()
        rec = ASGIRecorder()
        t0 = time.monotonic()
        await asyncio.wait_for(
            mw(http_scope("/", headers=NAV, user=User("alice")), rec.receive, rec.send), 10
        )
        assert rec.status == 200
        assert rec.body == PAGE or bare(page_vars(rec.body)["BOSH_JID"]) == alice[0]
        assert time.monotonic() - t0 < mw.config.timeout + 1
    finally:
        await drain_async(mw.core)
        await asyncio.to_thread(end_sessions, prosody.service_url, spy.sessions)
