"""Many users' pages at once: each gets its own, distinct, live session, bound to its own JID
(checked on the page, in the engine, and by the server itself), never another user's."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from bosh_middleware import AsyncPrebinder, asgi, wsgi
from bosh_middleware.credentials import Credentials, StaticCredentials
from support.asgi_recorder import NAV, call_wsgi, header_auth, html_app, wsgi_environ
from support.bosh_check import (
    PrebindSpy,
    bare,
    drain_async,
    end_sessions,
    page_vars,
    probe_session,
    session_owner,
)
from support.xmpp_servers import XMPPServer

N = 32
PAGE = b"<html><head><title>t</title></head><body>page</body></html>"


@pytest.fixture(scope="module")
def users(prosody: XMPPServer) -> dict[str, tuple[str, str]]:
    with ThreadPoolExecutor(8) as pool:
        accounts = list(pool.map(lambda i: prosody.new_user(f"c{i:02d}x"), range(N)))
    return {f"user{i:02d}": account for i, account in enumerate(accounts)}


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def check_pages(
    prosody: XMPPServer, users: dict[str, tuple[str, str]], spy: PrebindSpy, pages: dict[str, bytes]
) -> None:
    by_sid = {s.sid: s for s in spy.sessions}
    assert len(spy.sessions) == len(by_sid) == N  # one prebind per page, all distinct
    seen_sids = set()
    for name, body in pages.items():
        values = page_vars(body)
        assert values is not None, name
        jid, sid, rid = values["BOSH_JID"], values["BOSH_SID"], values["BOSH_RID"]
        assert bare(jid) == users[name][0], (name, jid)
        assert by_sid[sid].jid == jid and by_sid[sid].rid == rid
        seen_sids.add(sid)
    assert len(seen_sids) == N

    def live(name: str) -> tuple[str, str, str | None]:
        values = page_vars(pages[name])
        assert values is not None
        result = probe_session(prosody.service_url, values["BOSH_SID"], values["BOSH_RID"])
        return name, result, session_owner(values["BOSH_SID"])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(live, pages))
    for name, result, owner in results:
        assert result == "live", (name, result)
        assert owner is not None and bare(owner) == users[name][0], (name, owner)


async def test_asgi_many_users_at_once(
    prosody: XMPPServer, users: dict[str, tuple[str, str]]
) -> None:
    mw = asgi.BOSHPrebindMiddleware(
        html_app(PAGE, delay=0.05),
        service_url=prosody.service_url,
        credentials=StaticCredentials(users),
    )
    spy = PrebindSpy.on(mw.core, sync=False)
    try:
        transport = httpx.ASGITransport(app=header_auth(mw))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", timeout=20
        ) as client:

            async def one(name: str) -> tuple[str, httpx.Response]:
                return name, await client.get("/", headers={**NAV, "x-user": name})

            t0 = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in users)), 30)
            elapsed = time.monotonic() - t0
        assert all(r.status_code == 200 for _, r in results)
        assert peak_concurrency(spy.intervals) >= 4, "prebinds did not run at the same time"
        assert elapsed < 10
        await asyncio.to_thread(
            check_pages, prosody, users, spy, {name: r.content for name, r in results}
        )
    finally:
        await drain_async(mw.core)
        await asyncio.to_thread(end_sessions, prosody.service_url, spy.sessions)


def test_wsgi_many_users_at_once(prosody: XMPPServer, users: dict[str, tuple[str, str]]) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        time.sleep(0.05)
        start_response(
            "200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(PAGE)))]
        )
        return [PAGE]

    mw = wsgi.BOSHPrebindMiddleware(
        app, service_url=prosody.service_url, credentials=StaticCredentials(users)
    )
    spy = PrebindSpy.on(mw.core, sync=True)
    barrier = threading.Barrier(N)

    def one(name: str) -> tuple[str, Any]:
        barrier.wait(10)
        return name, call_wsgi(mw, wsgi_environ("/", headers=NAV, user=name))

    try:
        with ThreadPoolExecutor(N) as pool:
            results = list(pool.map(one, users, timeout=30))
        assert all(r.code == 200 for _, r in results)
        assert peak_concurrency(spy.intervals) >= 4, "prebinds did not run at the same time"
        check_pages(prosody, users, spy, {name: r.body for name, r in results})
    finally:
        assert spy.wait_idle()
        end_sessions(prosody.service_url, spy.sessions)
        mw.core.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("transport", ["builtin", "httpx"])
def test_one_async_prebinder_on_many_short_lived_loops(
    prosody: XMPPServer, transport: str, kind: str
) -> None:
    """A job per ``asyncio.run`` (asgiref's ``async_to_sync`` does the same for each call):
    one prebinder sees a new event loop each time. Each loop's pool or client is closed at
    the loop's end: no loop is kept, and no socket (a kept pool held both, one per loop)."""
    jid, password = prosody.new_user()
    creds = Credentials(jid, password)
    prebinder = AsyncPrebinder(prosody.service_url, transport=transport)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    factory = None
    if kind == "uvloop":
        import uvloop  # a test dependency: uvicorn[standard] runs ASGI apps on it

        factory = uvloop.new_event_loop

    async def job() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        session = await prebinder.prebind(creds)
        assert await prebinder.terminate(session)

    def jobs(n: int) -> None:
        for _ in range(n):
            with asyncio.Runner(loop_factory=factory) as runner:  # (as asyncio.run)
                runner.run(job())

    def on_a_thread(n: int) -> None:
        """As asgiref runs them (and test_prebind_servers.run_async). A daemon thread: a loop
        that cannot close (uvloop's, raising the warning of a socket left open) is a failure
        here, not a process that never exits."""
        failed: list[BaseException] = []

        def run() -> None:
            try:
                jobs(n)
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "a loop did not end"
        if failed:
            raise failed[0]

    on_a_thread(1)  # (what the first loop makes once: uvloop's)
    gc.collect()
    before = open_fds()
    on_a_thread(20)
    gc.collect()
    assert len(prebinder._pools) + len(prebinder._clients) <= 1
    assert [ref() for ref in loops] == [None] * 21
    assert open_fds() <= before + 2
