"""The middleware in async mode (Django's AsyncClient: the ASGI handler) against a real Prosody.

The CREDENTIALS callable queries the ORM: called on the event loop it would raise
SynchronousOnlyOperation (and the page would be served without a session).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings as django_settings
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpResponse
from django.test import AsyncClient

from bosh_middleware.django import BOSHPrebindMiddleware
from django_app import accounts, views
from django_app.helpers import (
    PAGE_HEADERS,
    Account,
    RecordingCore,
    assert_dead,
    assert_live,
    assert_page_for_request_kind,
    injected,
)
from support.asgi_recorder import ASGIRecorder, http_scope
from support.bosh_check import FETCH_METADATA, REQUEST_KINDS, SAYS_NOTHING, CountingCredentials
from support.xmpp_servers import XMPPServer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("acores")]


async def logged_in(account: Account) -> AsyncClient:
    client = AsyncClient()
    await sync_to_async(client.force_login)(account.user)
    return client


@pytest.mark.parametrize("path", ["/apage/", "/page/"])
async def test_page_gets_a_live_session(alice: Account, bosh: XMPPServer, path: str) -> None:
    r = await (await logged_in(alice)).get(path, headers=PAGE_HEADERS)
    found = injected(r.content)
    assert found.jid.split("/")[0] == alice.jid
    assert r["Cache-Control"] == "private, no-store" and "cookie" in r["Vary"].lower()
    if "Content-Length" in r:
        assert int(r["Content-Length"]) == len(r.content)
    assert_live(bosh.service_url, found.sid, found.rid)


@pytest.mark.parametrize("validator", views.VALIDATORS)
async def test_a_revalidated_copy_without_a_session_is_answered_in_full(
    alice: Account, bosh: XMPPServer, validator: dict[str, str]
) -> None:
    """As test_wsgi's: a navigation being prebound reaches the view unconditional."""
    anonymous = await AsyncClient().get("/conditional/", headers={**PAGE_HEADERS, **validator})
    assert anonymous.status_code == 304
    r = await (await logged_in(alice)).get("/conditional/", headers={**PAGE_HEADERS, **validator})
    assert r.status_code == 200
    found = injected(r.content)
    assert_live(bosh.service_url, found.sid, found.rid)


async def test_async_credentials_callable(alice: Account, bosh: XMPPServer, settings: Any) -> None:
    settings.BOSH_PREBIND = {
        **settings.BOSH_PREBIND,
        "CREDENTIALS": "django_app.accounts.acredentials",
    }
    found = injected((await (await logged_in(alice)).get("/apage/", headers=PAGE_HEADERS)).content)
    assert_live(bosh.service_url, found.sid, found.rid)


async def test_anonymous_page_is_untouched(bosh: XMPPServer, cores: list[RecordingCore]) -> None:
    r = await AsyncClient().get("/page/", headers=PAGE_HEADERS)
    assert b"BOSH_" not in r.content and "Cache-Control" not in r
    assert cores[0].started == []


@pytest.mark.parametrize("kind", list(REQUEST_KINDS))
async def test_html_view_gets_a_session_only_when_navigated_to(
    alice: Account, bosh: XMPPServer, settings: Any, cores: list[RecordingCore], kind: str
) -> None:
    """A script's request for HTML gets it untouched and costs no session (async mode)."""
    looked_up = CountingCredentials(accounts.credentials)
    settings.BOSH_PREBIND = {**settings.BOSH_PREBIND, "CREDENTIALS": looked_up}
    r = await (await logged_in(alice)).get("/page/", headers=REQUEST_KINDS[kind])
    assert_page_for_request_kind(r, kind, alice, bosh, cores, looked_up)


@pytest.mark.parametrize("kind", ["navigation", *SAYS_NOTHING])
async def test_navigation_only_leaves_requests_that_say_nothing_alone(
    alice: Account, bosh: XMPPServer, settings: Any, cores: list[RecordingCore], kind: str
) -> None:
    """``NAVIGATION_ONLY`` (async mode)."""
    looked_up = CountingCredentials(accounts.credentials)
    settings.BOSH_PREBIND = {
        **settings.BOSH_PREBIND,
        "CREDENTIALS": looked_up,
        "NAVIGATION_ONLY": True,
    }
    headers = {**REQUEST_KINDS, **SAYS_NOTHING}[kind]
    r = await (await logged_in(alice)).get("/page/", headers=headers)
    assert_page_for_request_kind(r, kind, alice, bosh, cores, looked_up)


async def test_async_streamed_page(alice: Account, bosh: XMPPServer) -> None:
    r = await (await logged_in(alice)).get("/astream/", headers=PAGE_HEADERS)
    assert r.streaming and r.is_async
    found = injected(b"".join([chunk async for chunk in r.streaming_content]))
    assert "Content-Length" not in r
    assert_live(bosh.service_url, found.sid, found.rid)


async def test_json_response_is_untouched(alice: Account) -> None:
    r = await (await logged_in(alice)).get("/json/", headers=PAGE_HEADERS)
    assert r.json() == {"ok": True} and "Cache-Control" not in r


async def test_prebind_starts_before_the_view(alice: Account, cores: list[RecordingCore]) -> None:
    views.SLOW_STARTED.clear()
    r = await (await logged_in(alice)).get("/aslow/", headers=PAGE_HEADERS)
    injected(r.content)
    assert cores[0].started[0] < views.SLOW_STARTED[0]


async def test_endpoint(alice: Account, bosh: XMPPServer) -> None:
    r = await (await logged_in(alice)).get("/bosh/prebind")
    assert r.status_code == 200
    data = r.json()
    assert data["jid"].split("/")[0] == alice.jid
    assert_live(bosh.service_url, data["sid"], int(data["rid"]))
    assert (await AsyncClient().get("/bosh/prebind")).status_code == 401
    for site, dest, refusal in FETCH_METADATA:  # (as test_wsgi's)
        if refusal is not None:
            headers = {"Sec-Fetch-Site": site, "Sec-Fetch-Dest": dest}
            foreign = await (await logged_in(alice)).get("/bosh/prebind", headers=headers)
            assert (foreign.status_code, foreign.json()) == (403, {"error": refusal})


@pytest.mark.parametrize("path", ["/cut-off-stream/", "/cut-off-file/"])
@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
async def test_a_sync_stream_with_no_place_for_the_script_ends_its_session(
    alice: Account, bosh: XMPPServer, acores: list[RecordingCore], path: str
) -> None:
    """Served by Django's ASGI handler itself (the test client would iterate the body here, on
    the event loop): it consumes a sync body in a worker thread, with no event loop there. The
    page ends inside a comment, so the session prebound for it reached no one: it must be
    ended from that thread, not cut the page off after its 200 and stay live."""
    client = await logged_in(alice)
    name = django_settings.SESSION_COOKIE_NAME
    cookie = f"{name}={client.cookies[name].value}"
    rec, request = ASGIRecorder(), [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        # The client stays until the handler cancels this, once it has answered: a disconnect
        # said as the body ends races the answer, and Django would take it for an abort.
        if request:
            return request.pop()
        return await asyncio.get_running_loop().create_future()

    scope = http_scope(path, headers={**PAGE_HEADERS, "Cookie": cookie})
    await asyncio.wait_for(ASGIHandler()(scope, receive, rec.send), 15)
    assert rec.status == 200 and rec.complete
    assert rec.body == views.CUT_OFF
    [pending] = acores[0].pendings
    session = await pending._task
    await acores[0].adrain()
    await sync_to_async(acores[0].drain)()  # (a sync body's end goes to the core's threads)
    assert_dead(bosh.service_url, session.sid, session.rid)


def test_sync_and_async_capable(bosh: XMPPServer) -> None:
    async def aget_response(request: Any) -> HttpResponse:
        return HttpResponse()

    assert iscoroutinefunction(BOSHPrebindMiddleware(aget_response))
    assert not iscoroutinefunction(BOSHPrebindMiddleware(lambda request: HttpResponse()))
