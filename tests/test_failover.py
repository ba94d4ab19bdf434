"""Fail open: whatever goes wrong with XMPP, the page arrives, on time, 200, unchanged, and the
cause is logged (user + condition, never the password). Real Prosody for a stopped server and a
refused login; a fake endpoint on 127.0.0.1 for a slow server."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bosh_middleware import asgi, wsgi
from bosh_middleware.credentials import StaticCredentials
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
TIMEOUT = 0.5
#: What a page may take past TIMEOUT: the scheduling of a busy host (a thread or the event
#: loop woken late), far below the slow server's 5 s, which a page that waited for it would
#: take.
MARGIN = 1.5


def plain_wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(PAGE)))])
    return [PAGE]


@pytest.fixture
async def make_mw() -> AsyncIterator[Callable[..., Any]]:
    """``make_mw(kind, service_url, accounts, **settings) -> (middleware, spy)``."""
    created: list[tuple[str, Any, PrebindSpy]] = []

    def factory(
        kind: str, service_url: str, accounts: dict[str, tuple[str, str]], **settings: Any
    ) -> tuple[Any, PrebindSpy]:
        if kind == "asgi":
            mw = asgi.BOSHPrebindMiddleware(
                html_app(PAGE),
                service_url=service_url,
                credentials=StaticCredentials(accounts),
                **settings,
            )
        else:
            mw = wsgi.BOSHPrebindMiddleware(
                plain_wsgi,
                service_url=service_url,
                credentials=StaticCredentials(accounts),
                **settings,
            )
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
        await asyncio.to_thread(end_sessions, mw.config.service_url, spy.sessions)


async def page(kind: str, mw: Any, user: str = "alice") -> tuple[int, bytes, dict[str, str], float]:
    t0 = time.monotonic()
    if kind == "asgi":
        rec = ASGIRecorder()
        scope = http_scope("/", headers=NAV, user=User(user))
        await asyncio.wait_for(mw(scope, rec.receive, rec.send), 10)
        headers = {k.decode(): v.decode() for k, v in rec.raw_headers}
        return rec.status, rec.body, headers, time.monotonic() - t0
    r = await asyncio.to_thread(call_wsgi, mw, wsgi_environ("/", headers=NAV, user=user))
    return r.code, r.body, {k.lower(): v for k, v in r.headers}, time.monotonic() - t0


async def endpoint(kind: str, mw: Any, user: str = "alice") -> tuple[int, dict[str, str], bytes]:
    if kind == "asgi":
        rec = ASGIRecorder()
        await asyncio.wait_for(
            mw(http_scope("/bosh/prebind", user=User(user)), rec.receive, rec.send), 10
        )
        return rec.status, {k.decode(): v.decode() for k, v in rec.raw_headers}, rec.body
    r = await asyncio.to_thread(call_wsgi, mw, wsgi_environ("/bosh/prebind", user=user))
    return r.code, {k.lower(): v for k, v in r.headers}, r.body


def assert_logged(caplog: Any, user: str, condition: str, password: str) -> None:
    hits = [
        r
        for r in caplog.records
        if (getattr(r, "bosh_user", None), getattr(r, "bosh_condition", None)) == (user, condition)
    ]
    assert hits, [r.getMessage() for r in caplog.records]
    assert any(user in r.getMessage() and condition in r.getMessage() for r in hits)
    for r in caplog.records:
        text = " ".join([r.getMessage(), repr(r.args), r.exc_text or "", repr(vars(r))])
        assert password not in text, f"password in log record {r.name}: {r.getMessage()}"
    assert password not in caplog.text


def assert_unchanged(status: int, body: bytes, headers: dict[str, str]) -> None:
    assert (status, body) == (200, PAGE)
    assert headers.get("content-length") == str(len(PAGE))
    assert "cache-control" not in headers and "x-bosh-sid" not in headers


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
async def test_server_stopped_mid_run(
    kind: str, make_mw: Any, prosody_factory: Any, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    srv: XMPPServer = prosody_factory()
    jid, password = srv.new_user("alice")
    mw, spy = make_mw(kind, srv.service_url, {"alice": (jid, password)}, timeout=TIMEOUT)

    status, body, headers, _ = await page(kind, mw)
    assert bare(page_vars(body)["BOSH_JID"]) == jid

    srv.stop()
    status, body, headers, elapsed = await page(kind, mw)
    assert_unchanged(status, body, headers)
    assert elapsed < TIMEOUT + MARGIN
    assert_logged(caplog, jid, "connection-failed", password)

    srv.start()
    status, body, headers, _ = await page(kind, mw)  # one failure does not open the breaker
    assert bare(page_vars(body)["BOSH_JID"]) == jid
    assert await asyncio.to_thread(is_live, srv.service_url, spy.sessions[-1])


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
async def test_slow_server_page_arrives_on_time(kind: str, make_mw: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    password = "s3cret-not-in-logs"
    with FakeEndpoint("sleep", sleep=5.0) as fake:
        mw, spy = make_mw(kind, fake.url, {"alice": ("alice@localhost", password)}, timeout=TIMEOUT)
        status, body, headers, elapsed = await page(kind, mw)
        assert_unchanged(status, body, headers)
        assert TIMEOUT - 0.05 <= elapsed < TIMEOUT + MARGIN
        assert fake.requests == 1
        assert_logged(caplog, "alice@localhost", "timeout", password)
        # let the abandoned prebind run into its own (capped) request timeout before stopping
        assert await asyncio.to_thread(spy.wait_idle, 3.0)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
async def test_login_refused(kind: str, make_mw: Any, prosody: XMPPServer, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    jid, password = prosody.new_user("alice")
    wrong = password + "-WRONG"
    mw, _spy = make_mw(kind, prosody.service_url, {"alice": (jid, wrong)}, timeout=TIMEOUT)
    status, body, headers, elapsed = await page(kind, mw)
    assert_unchanged(status, body, headers)
    assert elapsed < TIMEOUT + MARGIN
    assert_logged(caplog, jid, "not-authorized", wrong)
    assert password not in caplog.text
    assert mw.core.breaker.state == "closed"


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
async def test_endpoint_503_when_server_down(kind: str, make_mw: Any, prosody_factory: Any) -> None:
    srv: XMPPServer = prosody_factory()
    jid, password = srv.new_user("alice")
    mw, _ = make_mw(kind, srv.service_url, {"alice": (jid, password)}, timeout=TIMEOUT)
    srv.stop()
    status, headers, body = await endpoint(kind, mw)
    assert status == 503
    assert json.loads(body) == {"error": "XMPP server unavailable"}
    assert int(headers["retry-after"]) >= 1
    assert headers["cache-control"] == "private, no-store"


@pytest.mark.parametrize("transport", ["builtin", "httpx"])
@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
async def test_a_password_in_the_service_url_is_not_logged(
    kind: str, transport: str, make_mw: Any, caplog: Any
) -> None:
    """``user:password@`` in the service URL (Basic auth for a proxy in front of the XMPP
    server) is in the transport's error, which is logged at WARNING: as ``user:***@``."""
    caplog.set_level(logging.DEBUG)
    url_password = "S3cret-proxy-pw"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the with block ends
    url = f"http://proxyuser:{url_password}@127.0.0.1:{port}/http-bind"
    mw, _ = make_mw(
        kind, url, {"alice": ("alice@localhost", "pw")}, timeout=TIMEOUT, transport=transport
    )
    status, body, headers, _ = await page(kind, mw)
    assert_unchanged(status, body, headers)
    assert_logged(caplog, "alice@localhost", "connection-failed", url_password)
    assert "proxyuser:***@127.0.0.1" in caplog.text
