"""The circuit breaker: unit tests with an injected clock, then through the ASGI and WSGI
middlewares with a counting fake endpoint (support/bosh_check.FakeEndpoint) that fails, and
later forwards to the real Prosody."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bosh_middleware import asgi, wsgi
from bosh_middleware.breaker import CircuitBreaker
from bosh_middleware.config import MiddlewareConfig
from bosh_middleware.core import PrebindCore
from bosh_middleware.credentials import Credentials, StaticCredentials
from bosh_middleware.errors import (
    BOSHError,
    ProtocolError,
    ResponseTooLarge,
    ServiceUnavailable,
)
from bosh_middleware.session import PrebindOptions, PrebindSession
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
    FakeEndpoint,
    PrebindSpy,
    bare,
    drain_async,
    end_sessions,
    is_live,
    page_vars,
)
from support.xmpp_servers import XMPPServer

PAGE = b"<html><head><title>t</title></head><body>page</body></html>"
#: Through the forwarding fake, requests must reach Prosody in RID order: one at a time.
SEQUENTIAL = PrebindOptions(pipeline=False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


# ------------------------------------------------------------------------------------------
# CircuitBreaker
# ------------------------------------------------------------------------------------------


def test_closed_until_threshold_consecutive_failures(clock: Clock) -> None:
    b = CircuitBreaker(3, 10, clock=clock)
    assert [b.record_failure(), b.record_failure()] == [False, False]
    assert b.state == "closed" and b.allow()
    assert b.record_failure() is True  # this one opened it
    assert b.state == "open" and not b.allow()


def test_success_resets_the_count(clock: Clock) -> None:
    b = CircuitBreaker(3, 10, clock=clock)
    for _ in range(5):
        b.record_failure()
        b.record_failure()
        b.record_success()
    assert b.state == "closed"


def test_half_open_after_reset_allows_one_trial(clock: Clock) -> None:
    b = CircuitBreaker(1, 10, clock=clock)
    b.record_failure()
    clock.now += 9.99
    assert b.state == "open" and not b.allow()
    clock.now += 0.02
    assert b.state == "half-open"
    assert b.allow() is True
    assert b.allow() is False  # only one trial at a time


def test_trial_success_closes(clock: Clock) -> None:
    b = CircuitBreaker(1, 10, clock=clock)
    b.record_failure()
    clock.now += 10
    assert b.allow()
    assert b.record_success() is True  # (it was open: the caller says the server is back)
    assert b.state == "closed"
    assert all(b.allow() for _ in range(5))
    assert b.record_success() is False  # closed already


def test_trial_failure_reopens_for_a_full_period(clock: Clock) -> None:
    b = CircuitBreaker(2, 10, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.now += 10
    assert b.allow()
    assert b.record_failure() is False  # re-opened, not newly opened
    assert b.state == "open"
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()


def test_retry_after_counts_down(clock: Clock) -> None:
    b = CircuitBreaker(1, 30, clock=clock)
    assert b.retry_after() == 0
    b.record_failure()
    clock.now += 12
    assert b.retry_after() == pytest.approx(18)
    clock.now += 20
    assert b.retry_after() == 0


def test_threshold_zero_never_opens(clock: Clock) -> None:
    b = CircuitBreaker(0, 10, clock=clock)
    for _ in range(10):
        b.record_failure()
    assert b.allow()


def test_one_trial_among_many_threads(clock: Clock) -> None:
    b = CircuitBreaker(1, 10, clock=clock)
    b.record_failure()
    clock.now += 10
    barrier = threading.Barrier(16)
    results: list[bool] = []

    def worker() -> None:
        barrier.wait(5)
        results.append(b.allow())

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(results) == [False] * 15 + [True]


def test_an_abandoned_trial_lets_another_be_tried(clock: Clock) -> None:
    """A request let through as the trial, then dropped before it reached the server, gives
    no verdict: another trial may go at once (waiting for that verdict would be for good)."""
    b = CircuitBreaker(1, 10, clock=clock)
    assert b.admit() == 0  # closed
    b.record_failure()
    assert b.admit() is None
    clock.now += 10
    trial = b.admit()
    assert trial and b.admit() is None
    b.abandon(trial)
    assert b.state == "half-open"
    assert b.allow() is True and b.allow() is False


def test_abandoning_an_earlier_request_leaves_the_running_trial_alone(clock: Clock) -> None:
    b = CircuitBreaker(1, 10, clock=clock)
    earlier = b.admit()  # closed
    assert earlier == 0
    b.record_failure()
    clock.now += 10
    first = b.admit()
    assert first
    b.abandon(earlier)
    assert not b.allow()
    b.record_failure()  # the trial failed: open again
    clock.now += 10
    second = b.admit()
    assert second
    b.abandon(first)  # (long over)
    assert not b.allow()


# ------------------------------------------------------------------------------------------
# what counts as the server failing
# ------------------------------------------------------------------------------------------

#: Answers by which a server that is up refuses this user's prebind: not counted.
REFUSALS = [
    ServiceUnavailable("BOSH session refused: host-unknown", condition="host-unknown"),
    ServiceUnavailable("BOSH session refused: improper", condition="improper-addressing"),
    ServiceUnavailable("BOSH session terminated by server: bad", condition="bad-request"),
    ServiceUnavailable("XMPP stream error: policy-violation", condition="policy-violation"),
    ProtocolError("resource binding failed: conflict", condition="conflict"),
    ProtocolError("resource binding failed: not-allowed", condition="not-allowed"),
    ProtocolError("resource binding failed: too many", condition="resource-constraint"),
    ProtocolError("bind result carries a JID no page may carry", condition="unsafe-jid"),
]
#: The server, or the way to it, is down or sick, or its answer cannot be trusted: counted.
FAILURES = [
    ServiceUnavailable("BOSH request timed out", condition="timeout"),
    ServiceUnavailable("cannot connect", condition="connection-failed"),
    ServiceUnavailable("BOSH request failed", condition="http-error"),
    ServiceUnavailable("BOSH endpoint answered HTTP 503", condition="http-503"),
    ServiceUnavailable("BOSH session refused: r-c-f", condition="remote-connection-failed"),
    ServiceUnavailable("BOSH session terminated by server", condition="system-shutdown"),
    ServiceUnavailable("XMPP stream error: host-gone", condition="host-gone"),
    ServiceUnavailable("BOSH session terminated by server", condition="item-not-found"),
    ServiceUnavailable("BOSH session refused", condition="internal-server-error"),
    ServiceUnavailable("BOSH session terminated by server: terminate", condition="terminate"),
    ProtocolError("BOSH session creation response has no sid"),
    ProtocolError("SCRAM server signature is wrong", condition="server-signature-mismatch"),
    ProtocolError("resource binding failed: error", condition=None),
    ProtocolError("resource binding failed", condition="internal-server-error"),
    ResponseTooLarge("BOSH response exceeds 1 bytes"),
]


class RaisingEngine:
    """Stands in for ``Prebinder``: every prebind raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def prebind(self, credentials: Credentials) -> PrebindSession:
        raise self.error

    def terminate(self, session: PrebindSession) -> bool:
        return True

    def close(self) -> None:
        pass


def counted(error: BaseException, pages: int = 3) -> str:
    """The breaker's state after ``pages`` prebinds that raise ``error`` (threshold 1)."""
    core = PrebindCore(
        MiddlewareConfig(
            service_url="http://127.0.0.1:9/http-bind",
            credentials=lambda user: None,
            breaker_threshold=1,
        )
    )
    core._sync = RaisingEngine(error)  # type: ignore[assignment]
    try:
        for _ in range(pages):
            pending = core.start_sync(Credentials("bob@other.example", "pw"))
            if pending is None:
                break
            assert pending.session() is None and pending.error is error
        return core.breaker.state
    finally:
        core.close()


@pytest.mark.parametrize("error", REFUSALS, ids=lambda e: e.condition)
def test_a_refusal_by_a_server_that_is_up_is_not_counted(error: BOSHError, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="bosh_middleware")
    assert counted(error) == "closed"
    assert "BOSH prebind refused for bob@other.example" in caplog.text


@pytest.mark.parametrize("error", FAILURES, ids=lambda e: e.condition or type(e).__name__)
def test_a_server_failure_is_counted(error: BOSHError) -> None:
    assert counted(error) == "open"


# ------------------------------------------------------------------------------------------
# through the middlewares
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accounts(prosody: XMPPServer) -> dict[str, tuple[str, str]]:
    jid, password = prosody.new_user("alice")
    return {"alice": (jid, password), "mallory": (jid, password + "-wrong")}


@pytest.fixture
async def make_mw(
    prosody: XMPPServer, accounts: dict[str, tuple[str, str]]
) -> AsyncIterator[Callable[..., Any]]:
    """``make_mw("asgi"|"wsgi", app, **settings) -> (middleware, spy)``."""
    created: list[tuple[str, Any, PrebindSpy]] = []

    def factory(kind: str, app: Any, **settings: Any) -> tuple[Any, PrebindSpy]:
        settings.setdefault("credentials", StaticCredentials(accounts))
        settings.setdefault("options", SEQUENTIAL)
        module = asgi if kind == "asgi" else wsgi
        mw = module.BOSHPrebindMiddleware(app, **settings)
        spy = PrebindSpy.on(mw.core, sync=kind == "wsgi")
        created.append((kind, mw, spy))
        return mw, spy

    yield factory
    for kind, mw, spy in created:
        if kind == "asgi":
            await drain_async(mw.core)
        else:
            assert await asyncio.to_thread(spy.wait_idle)
            mw.core.close()
        await asyncio.to_thread(end_sessions, prosody.service_url, spy.sessions)


def on_clock(mw: Any, clock: Clock) -> None:
    """The middleware's breaker, as its settings made it, on ``clock``: the open period ends
    when the test says so. On the wall clock, three pages on a busy host could outlast it,
    and the breaker would let a trial through while the test counts that nothing is tried."""
    made = mw.core.breaker
    mw.core.breaker = CircuitBreaker(made.threshold, made.reset_after, clock=clock)


async def asgi_page(mw: Any, user: str = "alice") -> tuple[ASGIRecorder, float]:
    rec = ASGIRecorder()
    t0 = time.monotonic()
    scope = http_scope("/", headers=NAV, user=User(user))
    await asyncio.wait_for(mw(scope, rec.receive, rec.send), 10)
    return rec, time.monotonic() - t0


def wsgi_page(mw: Any, user: str = "alice") -> tuple[Any, float]:
    t0 = time.monotonic()
    r = call_wsgi(mw, wsgi_environ("/", headers=NAV, user=user))
    return r, time.monotonic() - t0


def plain_wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(PAGE)))])
    return [PAGE]


async def test_asgi_breaker_opens_skips_and_closes_again(
    make_mw: Any, prosody: XMPPServer, accounts: Any, caplog: Any, clock: Clock
) -> None:
    caplog.set_level(logging.WARNING, logger="bosh_middleware")
    with FakeEndpoint("fail", upstream=prosody.service_url) as fake:
        mw, spy = make_mw(
            "asgi", html_app(PAGE), service_url=fake.url, breaker_threshold=2, breaker_reset=0.5
        )
        on_clock(mw, clock)
        for _ in range(2):
            rec, _ = await asgi_page(mw)
            assert (rec.status, rec.body) == (200, PAGE)
        assert mw.core.breaker.state == "open"
        assert "circuit breaker opened" in caplog.text
        attempts = (fake.connections, fake.requests, len(spy.calls))
        assert attempts[0] >= 2

        for _ in range(3):  # open: served at once, without even trying
            rec, elapsed = await asgi_page(mw)
            assert (rec.status, rec.body) == (200, PAGE)
            assert elapsed < mw.config.timeout  # (no prebind waited for)
        assert (fake.connections, fake.requests, len(spy.calls)) == attempts

        clock.now += 1  # past the open period
        assert mw.core.breaker.state == "half-open"
        fake.mode = "forward"
        rec, _ = await asgi_page(mw)  # the trial succeeds: closed again
        assert mw.core.breaker.state == "closed"
        assert caplog.text.count("circuit breaker closed: the XMPP server answers again") == 1
        assert bare(page_vars(rec.body)["BOSH_JID"]) == accounts["alice"][0]
        rec, _ = await asgi_page(mw)
        assert page_vars(rec.body) is not None
        assert len(spy.sessions) == 2
        for session in spy.sessions:
            assert await asyncio.to_thread(is_live, prosody.service_url, session)


async def test_wsgi_breaker_opens_skips_and_closes_again(
    make_mw: Any, prosody: XMPPServer, accounts: Any, clock: Clock
) -> None:
    with FakeEndpoint("fail", upstream=prosody.service_url) as fake:
        mw, spy = make_mw(
            "wsgi", plain_wsgi, service_url=fake.url, breaker_threshold=2, breaker_reset=0.5
        )
        on_clock(mw, clock)
        for _ in range(2):
            r, _ = await asyncio.to_thread(wsgi_page, mw)
            assert (r.code, r.body) == (200, PAGE)
        # recorded before the page went out (not a moment later by the future's callback)
        assert mw.core.breaker.state == "open"
        attempts = (fake.connections, fake.requests, len(spy.calls))

        for _ in range(3):
            r, elapsed = await asyncio.to_thread(wsgi_page, mw)
            assert (r.code, r.body) == (200, PAGE)
            assert elapsed < mw.config.timeout  # (no prebind waited for)
        assert (fake.connections, fake.requests, len(spy.calls)) == attempts

        clock.now += 1  # past the open period
        fake.mode = "forward"
        r, _ = await asyncio.to_thread(wsgi_page, mw)
        assert bare(page_vars(r.body)["BOSH_JID"]) == accounts["alice"][0]
        assert mw.core.breaker.state == "closed"
        assert await asyncio.to_thread(is_live, prosody.service_url, spy.sessions[-1])


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
async def test_auth_failures_do_not_open_the_breaker(
    make_mw: Any, prosody: XMPPServer, kind: str
) -> None:
    app = html_app(PAGE) if kind == "asgi" else plain_wsgi
    mw, spy = make_mw(kind, app, service_url=prosody.service_url, breaker_threshold=2)
    for _ in range(4):
        if kind == "asgi":
            rec, _ = await asgi_page(mw, "mallory")
            body = rec.body
        else:
            r, _ = await asyncio.to_thread(wsgi_page, mw, "mallory")
            body = r.body
        assert body == PAGE
    assert len(spy.calls) == 4 and len(spy.errors) == 4  # every page tried
    assert mw.core.breaker.state == "closed"


async def test_auth_failure_in_half_open_trial_does_not_wedge_the_breaker(
    make_mw: Any, prosody: XMPPServer, accounts: Any, clock: Clock
) -> None:
    """The server answered the trial (it refused the login): that is not an outage."""
    with FakeEndpoint("fail", upstream=prosody.service_url) as fake:
        mw, _spy = make_mw(
            "asgi", html_app(PAGE), service_url=fake.url, breaker_threshold=1, breaker_reset=0.3
        )
        on_clock(mw, clock)
        await asgi_page(mw)
        assert mw.core.breaker.state == "open"
        clock.now += 1  # past the open period
        fake.mode = "forward"
        rec, _ = await asgi_page(mw, "mallory")  # the trial: login refused
        assert rec.body == PAGE
        rec, _ = await asgi_page(mw, "alice")  # must be tried, and work
        assert page_vars(rec.body) is not None
        assert mw.core.breaker.state == "closed"


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
@pytest.mark.parametrize("refusal", ["improper-addressing", "unsafe-jid"])
async def test_a_user_refused_for_their_own_jid_does_not_open_the_breaker(
    make_mw: Any, prosody: XMPPServer, accounts: Any, kind: str, refusal: str, caplog: Any
) -> None:
    """One user's JID refused, not a sick server: their page views must not open the breaker
    for everyone else. ``improper-addressing``: Prosody refuses a session ``to`` a domain it
    does not serve. ``unsafe-jid``: a web username with a backtick (XEP-0106 does not escape
    it, Prosody's nodeprep takes it) logs in, and the JID the server binds is refused before
    it reaches a page."""
    caplog.set_level(logging.WARNING, logger="bosh_middleware")
    app = html_app(PAGE) if kind == "asgi" else plain_wsgi
    if refusal == "improper-addressing":
        jid, password = "bob@no-such-host.example", "pw-not-secret-1"
    else:
        jid, password = prosody.register(f"tick`{kind}", "pw-not-secret-2"), "pw-not-secret-2"
    mw, spy = make_mw(
        kind,
        app,
        service_url=prosody.service_url,
        credentials=StaticCredentials({**accounts, "bob": (jid, password)}),
        breaker_threshold=2,
    )
    for _ in range(4):
        if kind == "asgi":
            rec, _ = await asgi_page(mw, "bob")
            body = rec.body
        else:
            r, _ = await asyncio.to_thread(wsgi_page, mw, "bob")
            body = r.body
        assert body == PAGE
    assert len(spy.calls) == len(spy.errors) == 4  # every page tried, and refused
    assert {getattr(e, "condition", None) for e in spy.errors} == {refusal}
    assert f"BOSH prebind refused for {jid}" in caplog.text
    assert mw.core.breaker.state == "closed"
    if kind == "asgi":  # and everyone else still gets a session
        rec, _ = await asgi_page(mw, "alice")
        body = rec.body
    else:
        r, _ = await asyncio.to_thread(wsgi_page, mw, "alice")
        body = r.body
    assert bare(page_vars(body)["BOSH_JID"]) == accounts["alice"][0]
