"""The generic ASGI middleware around plain ASGI apps (no framework), against the real Prosody.

Raw messages are recorded (support/asgi_recorder.py) to see chunking and when the response start
goes out; the engine is spied on (support/bosh_check.py) to see which prebinds happen.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import lxml.etree
import pytest

from bosh_middleware import Credentials, no_prebind
from bosh_middleware.asgi import BOSHPrebindMiddleware, scope_user
from bosh_middleware.breaker import CircuitBreaker
from bosh_middleware.config import MiddlewareConfig
from bosh_middleware.core import PrebindCore
from bosh_middleware.credentials import StaticCredentials
from bosh_middleware.inject import inject
from support.asgi_recorder import (
    NAV,
    ASGIRecorder,
    User,
    chunked_app,
    header_auth,
    header_user,
    html_app,
    http_scope,
)
from support.asgi_servers import SERVERS, serve
from support.bosh_check import (
    FETCH_METADATA,
    REQUEST_KINDS,
    SEGMENT_CASES,
    SEGMENT_EXCLUDES,
    CountingCredentials,
    PrebindSpy,
    bare,
    drain_async,
    end_sessions,
    is_dead,
    is_live,
    page_vars,
    probe_session,
    wait_until,
)
from support.fake_bosh import FakeBOSH, forward_to
from support.xmpp_servers import XMPPServer

PAGE = b"<!doctype html><html><head><title>Hi</title></head><body><p>page</p></body></html>"
ALICE = User("alice")
NOT_NAV = {"accept": "*/*"}

MW = tuple[BOSHPrebindMiddleware, PrebindSpy]


@pytest.fixture(scope="module")
def alice(prosody: XMPPServer) -> tuple[str, str]:
    return prosody.new_user("alice")


@pytest.fixture
async def make_mw(prosody: XMPPServer, alice: tuple[str, str]) -> AsyncIterator[Callable[..., MW]]:
    """``make_mw(app, spy_delay=0, **settings) -> (middleware, spy)``; drained and closed after
    the test, every session it made ended."""
    created: list[MW] = []

    def factory(app: Any, *, spy_delay: float = 0.0, **settings: Any) -> MW:
        settings.setdefault("service_url", prosody.service_url)
        settings.setdefault("credentials", StaticCredentials({"alice": alice}))
        mw = BOSHPrebindMiddleware(app, **settings)
        spy = PrebindSpy.on(mw.core, sync=False, delay=spy_delay)
        created.append((mw, spy))
        return mw, spy

    yield factory
    for mw, spy in created:
        await drain_async(mw.core)
        await asyncio.to_thread(end_sessions, prosody.service_url, spy.sessions)


async def run(
    mw: Any,
    path: str = "/",
    *,
    user: Any = ALICE,
    headers: Any = None,
    method: str = "GET",
    **extra: Any,
) -> ASGIRecorder:
    rec = ASGIRecorder()
    scope = http_scope(
        path, method=method, headers=NAV if headers is None else headers, user=user, **extra
    )
    await asyncio.wait_for(mw(scope, rec.receive, rec.send), 10)
    return rec


def scripted_app(messages: list[dict[str, Any]]) -> Any:
    """Sends exactly ``messages``; ``app.sent`` keeps copies to compare with what came out."""
    sent: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        for m in messages:
            sent.append(copy.deepcopy(m))
            await send(copy.deepcopy(m))

    app.sent = sent  # type: ignore[attr-defined]
    return app


def response(status: int, headers: list[tuple[str, str]], *bodies: bytes) -> list[dict[str, Any]]:
    raw = [(k.encode(), v.encode()) for k, v in headers]
    msgs: list[dict[str, Any]] = [{"type": "http.response.start", "status": status, "headers": raw}]
    for i, b in enumerate(bodies or (b"",)):
        msgs.append({"type": "http.response.body", "body": b, "more_body": i < len(bodies) - 1})
    return msgs


HTML = [("content-type", "text/html; charset=utf-8")]
HTML_RAW = [(b"content-type", b"text/html; charset=utf-8")]


async def live(prosody: XMPPServer, session: Any) -> bool:
    return await asyncio.to_thread(is_live, prosody.service_url, session)


async def dead(prosody: XMPPServer, session: Any) -> bool:
    return await asyncio.to_thread(is_dead, prosody.service_url, session)


# ------------------------------------------------------------------------------------------
# pages that get a session
# ------------------------------------------------------------------------------------------


async def test_page_gets_a_live_session_of_its_user(
    make_mw: Any, prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    mw, spy = make_mw(html_app(PAGE))
    rec = await run(mw)
    assert rec.status == 200
    (session,) = spy.sessions
    assert rec.body == inject(PAGE, mw.core.snippet(session))
    assert page_vars(rec.body) == {
        "BOSH_JID": session.jid,
        "BOSH_SID": session.sid,
        "BOSH_RID": session.rid,
    }
    assert bare(session.jid) == alice[0]
    assert rec.header("content-length") == str(len(rec.body))
    assert rec.header("cache-control") == "private, no-store"
    assert rec.header("vary") == "Cookie"
    assert await live(prosody, session)


XHTML = (
    b'<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">'
    b'<head><title>x</title><script src="/static/a.js"/></head><body><p>x</p></body></html>'
)


@pytest.mark.parametrize("page", [PAGE, XHTML], ids=["html", "script-that-closes-itself"])
async def test_xhtml_page_gets_a_session(make_mw: Any, page: bytes) -> None:
    """An XHTML page, whose ``<script src=.../>`` is a whole element to the XML parser that
    browsers read it with: the session goes before the ``</head>`` after it."""
    mw, spy = make_mw(html_app(page, content_type="application/xhtml+xml"))
    rec = await run(mw)
    assert len(spy.sessions) == 1
    if page is PAGE:
        assert page_vars(rec.body) is not None
    else:
        head = lxml.etree.fromstring(rec.body).find("{http://www.w3.org/1999/xhtml}head")
        assert head is not None and "BOSH_SID" in (head[-1].text or "")


async def test_non_navigation_html_prebinds_only_once_the_response_is_known(make_mw: Any) -> None:
    view_done: list[float] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.05)
        view_done.append(time.monotonic())
        await html_app(PAGE)(scope, receive, send)

    mw, spy = make_mw(app)
    rec = await run(mw, headers=NOT_NAV)
    assert page_vars(rec.body) is not None
    assert spy.intervals[0][0] >= view_done[0]  # lazily: not before the view answered


async def test_latin1_page_bytes_are_kept(make_mw: Any) -> None:
    page = "<html><head><title>Café ÿ</title></head><body>déjà</body></html>".encode("latin-1")
    mw, spy = make_mw(html_app(page, content_type="text/html; charset=ISO-8859-1"))
    rec = await run(mw)
    assert rec.body == inject(page, mw.core.snippet(spy.sessions[0]), charset="iso-8859-1")
    assert rec.body.replace(mw.core.snippet(spy.sessions[0]).encode(), b"") == page


# ------------------------------------------------------------------------------------------
# lazily: everything else passes through untouched, without a prebind
# ------------------------------------------------------------------------------------------

REQUEST_CASES: dict[str, dict[str, Any]] = {
    "anonymous": {"user": None},
    "not-authenticated": {"user": User("alice", is_authenticated=False)},
    "no-xmpp-account": {"user": User("bob")},
    "post": {"method": "POST"},
    "head": {"method": "HEAD"},
    "htmx": {"headers": {**NAV, "hx-request": "true"}},
    "xhr": {"headers": {**NAV, "x-requested-with": "XMLHttpRequest"}},
    "fetch-dest-empty": {"headers": {**NAV, "sec-fetch-dest": "empty"}},
    "html-refused": {"headers": {"accept": "text/html;q=0, */*"}},
    "excluded-path": {"path": "/static/page.html"},
}


@pytest.mark.parametrize("case", list(REQUEST_CASES))
async def test_request_that_cannot_carry_a_session_is_not_prebound(make_mw: Any, case: str) -> None:
    """Even a navigation: no prebind is started, the response passes through as sent."""
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    mw, spy = make_mw(app, exclude_paths=("/static/",))
    kw = dict(REQUEST_CASES[case])
    rec = await run(mw, kw.pop("path", "/"), **kw)
    assert spy.calls == []
    assert rec.messages == app.sent


#: Settled before the app is called; "no-xmpp-account" needs ``credentials()`` awaited first.
LEFT_ALONE = [case for case in REQUEST_CASES if case != "no-xmpp-account"]


@pytest.mark.parametrize("case", LEFT_ALONE)
async def test_a_request_left_alone_is_the_apps_own_coroutine(make_mw: Any, case: str) -> None:
    """Calling the middleware hands back the app's coroutine itself: nothing of the middleware
    runs once the app has such a request (no coroutine of its own, no wrapped ``send``), which
    is what keeps most requests' cost down to a few checks."""
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    mw, spy = make_mw(app, exclude_paths=("/static/",))
    kw = dict(REQUEST_CASES[case])
    rec = ASGIRecorder()
    scope = http_scope(
        kw.get("path", "/"),
        method=kw.get("method", "GET"),
        headers=kw.get("headers", NAV),
        user=kw.get("user", ALICE),
    )
    awaitable = mw(scope, rec.receive, rec.send)
    assert awaitable.cr_code is app.__code__
    await awaitable
    assert rec.messages == app.sent
    assert spy.calls == []


async def test_a_page_is_not_the_apps_own_coroutine(make_mw: Any) -> None:
    """The contrast: a navigation and a request that said nothing run inside the middleware's
    own coroutine, which hands the app a ``send`` of its own."""
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(send)
        await html_app(PAGE)(scope, receive, send)

    mw, spy = make_mw(app)
    for headers in (NAV, {}):
        rec = ASGIRecorder()
        awaitable = mw(http_scope("/", headers=headers, user=ALICE), rec.receive, rec.send)
        assert awaitable.cr_code is not app.__code__
        await awaitable
        assert seen[-1] != rec.send
        assert page_vars(rec.body) is not None
    assert len(spy.sessions) == 2


async def test_what_servers_inspect_is_a_coroutine_function_that_serves_the_same(
    make_mw: Any,
) -> None:
    """``app.__call__``, which servers inspect to pick the interface, is an ``async def`` on
    every Python version (no marker needed), and awaiting it serves what calling the app does."""
    mw, spy = make_mw(html_app(PAGE))
    assert inspect.iscoroutinefunction(mw.__call__)
    assert not inspect.iscoroutinefunction(type(mw).__call__)  # the fast path calls this one
    rec = ASGIRecorder()
    await mw.__call__(http_scope("/", headers=NAV, user=ALICE), rec.receive, rec.send)
    (session,) = spy.sessions
    assert rec.body == inject(PAGE, mw.core.snippet(session))


@pytest.mark.parametrize("kind", list(REQUEST_KINDS))
async def test_html_view_gets_a_session_only_when_navigated_to(
    make_mw: Any, alice: tuple[str, str], kind: str
) -> None:
    """A script's request for HTML gets it untouched and costs no session: nothing would attach
    to one, and it would be left on the server as an orphan."""
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    looked_up = CountingCredentials(StaticCredentials({"alice": alice}))
    mw, spy = make_mw(app, credentials=looked_up)
    rec = await run(mw, headers=REQUEST_KINDS[kind])
    await drain_async(mw.core)  # anything started in the background has run
    assert rec.status == 200
    if kind == "navigation":
        (session,) = spy.sessions
        assert rec.body == inject(PAGE, mw.core.snippet(session))
        assert rec.header("cache-control") == "private, no-store"
        assert len(looked_up.calls) == 1
    else:
        assert rec.messages == app.sent  # byte for byte, header for header
        assert rec.header("cache-control") is None
        assert spy.calls == [] and looked_up.calls == []


class _MethodUser:
    """``is_authenticated`` as a method (old Flask-Login, hand-written user classes)."""

    def __init__(self, username: str, ok: bool) -> None:
        self.username, self._ok = username, ok

    def is_authenticated(self) -> bool:
        return self._ok


class _TruthyUser:
    """No ``is_authenticated`` at all: the user's truth decides."""

    def __init__(self, username: str, ok: bool) -> None:
        self.username, self._ok = username, ok

    def __bool__(self) -> bool:
        return self._ok


#: user -> logged in? Every shape ``is_authenticated`` reads, since the middleware reads the
#: usual one (a plain True/False attribute) without calling it.
USER_SHAPES: dict[str, tuple[Any, bool]] = {
    "attribute-true": (User("alice"), True),
    "attribute-false": (User("alice", is_authenticated=False), False),
    "method-true": (_MethodUser("alice", True), True),
    "method-false": (_MethodUser("alice", False), False),
    "truthy": (_TruthyUser("alice", True), True),
    "falsy": (_TruthyUser("alice", False), False),
    "none": (None, False),
}


@pytest.mark.parametrize("via", ["scope", "get_user"])
@pytest.mark.parametrize("shape", list(USER_SHAPES))
async def test_who_counts_as_logged_in(
    make_mw: Any, alice: tuple[str, str], shape: str, via: str
) -> None:
    user, logged_in = USER_SHAPES[shape]
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    looked_up = CountingCredentials(StaticCredentials({"alice": alice}))
    if via == "scope":
        mw, spy = make_mw(app, credentials=looked_up)
        rec = await run(mw, user=user)
    else:  # the scope's "user" is not what counts then
        mw, spy = make_mw(app, credentials=looked_up, get_user=lambda scope: user)
        rec = await run(mw, user=None if logged_in else ALICE)
    await drain_async(mw.core)
    if logged_in:
        (session,) = spy.sessions
        assert rec.body == inject(PAGE, mw.core.snippet(session))
    else:
        assert rec.messages == app.sent
        assert spy.calls == [] and looked_up.calls == []


async def test_a_copy_serves_its_own_requests_through_its_dunder_call(make_mw: Any) -> None:
    """``copy.copy`` of the middleware: what servers look up as ``app.__call__`` must be the
    copy's own, not the original's (which the copied instance dict would otherwise hold)."""
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    mw, spy = make_mw(app)
    twin = copy.copy(mw)
    asked: list[str] = []

    def nobody(scope: Any) -> Any:
        asked.append(scope["path"])
        return None

    twin.get_user = nobody
    assert inspect.iscoroutinefunction(twin.__call__)
    rec = ASGIRecorder()
    await twin.__call__(http_scope("/twin", headers=NAV, user=ALICE), rec.receive, rec.send)
    assert asked == ["/twin"] and rec.messages == app.sent and spy.calls == []
    rec = await run(mw, "/original")  # the original still reads scope["user"]
    await drain_async(mw.core)
    assert asked == ["/twin"] and len(spy.sessions) == 1


async def test_get_user_set_after_construction_is_the_one_asked(
    make_mw: Any, alice: tuple[str, str]
) -> None:
    """Each request reads the user through a flag kept for the default ``get_user``, set when
    ``get_user`` is: setting the attribute after construction must still change who is asked,
    and setting the default again must bring back ``scope["user"]``."""
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    mw, spy = make_mw(app)
    asked: list[Any] = []

    def nobody(scope: Any) -> Any:
        asked.append(scope["path"])
        return None

    mw.get_user = nobody
    rec = await run(mw, "/one", user=ALICE)
    assert asked == ["/one"] and rec.messages == app.sent and spy.calls == []
    mw.get_user = scope_user
    rec = await run(mw, "/two", user=ALICE)
    await drain_async(mw.core)
    assert asked == ["/one"] and mw.get_user is scope_user
    (session,) = spy.sessions
    assert rec.body == inject(PAGE, mw.core.snippet(session))


@pytest.mark.parametrize("path", ["/bosh/prebinder", "/bosh/prebind/x", "/static", "/Static/a"])
async def test_paths_that_only_look_like_the_endpoint_or_an_excluded_prefix_are_pages(
    make_mw: Any, path: str
) -> None:
    """The endpoint is one exact path and ``exclude_paths`` are prefixes: a page next to them
    is a page like any other."""
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    mw, spy = make_mw(app, exclude_paths=("/static/",))
    rec = await run(mw, path)
    await drain_async(mw.core)
    (session,) = spy.sessions
    assert rec.body == inject(PAGE, mw.core.snippet(session))


@pytest.mark.parametrize(("path", "is_excluded"), SEGMENT_CASES)
async def test_an_excluded_prefix_is_whole_path_segments(
    make_mw: Any, path: str, is_excluded: bool
) -> None:
    """ "/admin" is the admin pages, not "/administrators", which is a page like any other;
    "/static/" with its slash is what is under it."""
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    mw, spy = make_mw(app, exclude_paths=SEGMENT_EXCLUDES)
    rec = await run(mw, path)
    await drain_async(mw.core)
    if is_excluded:
        assert rec.messages == app.sent and spy.calls == []
    else:
        (session,) = spy.sessions
        assert rec.body == inject(PAGE, mw.core.snippet(session))


@pytest.mark.parametrize("endpoint", [None, "/static/bosh"])
async def test_excluded_paths_without_or_around_the_endpoint(
    make_mw: Any, endpoint: str | None
) -> None:
    """No endpoint at all, or the endpoint inside an excluded prefix: the endpoint still
    answers, and the rest of the prefix is left alone."""
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    mw, spy = make_mw(app, exclude_paths=("/static/",), endpoint_path=endpoint)
    excluded = await run(mw, "/static/page.html")
    assert excluded.messages == app.sent and spy.calls == []
    if endpoint is not None:
        rec = await run(mw, endpoint)
        assert rec.messages[0]["status"] == 200
        assert set(json.loads(rec.body)) == {"jid", "sid", "rid"}
    else:
        rec = await run(mw, "/bosh/prebind")  # the default endpoint's path: a page now
        await drain_async(mw.core)
        (session,) = spy.sessions
        assert rec.body == inject(PAGE, mw.core.snippet(session))


# (root_path, path) as servers and frameworks give them for a request to /chat/<below>:
# Starlette's Mount and uvicorn's --root-path keep the mount point in ``path``; older servers
# leave it out.
MOUNTED = {"in path": ("/chat", "/chat{}"), "out of path": ("/chat", "{}")}


@pytest.mark.parametrize("form", sorted(MOUNTED))
async def test_a_mounted_app_has_its_endpoint_and_exclude_paths_below_the_mount_point(
    make_mw: Any, form: str
) -> None:
    """As ``PATH_INFO`` is for WSGI (and Starlette routes with ``get_route_path``): the same
    settings work wherever the app is mounted."""
    root, shape = MOUNTED[form]
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    mw, spy = make_mw(app, exclude_paths=("/static/",))
    excluded = await run(mw, shape.format("/static/x.html"), root_path=root)
    assert excluded.messages == app.sent and spy.calls == []
    endpoint = await run(mw, shape.format("/bosh/prebind"), root_path=root)
    assert endpoint.messages[0]["status"] == 200
    assert set(json.loads(endpoint.body)) == {"jid", "sid", "rid"}
    page = await run(mw, shape.format("/page"), root_path=root)
    await drain_async(mw.core)
    assert len(spy.sessions) == 2
    assert page.body == inject(PAGE, mw.core.snippet(spy.sessions[1]))


@pytest.mark.parametrize(
    ("root", "path", "expected"),
    [
        ("", "/a", "/a"),
        ("/chat", "/chat/a", "/a"),
        ("/chat", "/chat", ""),
        ("/chat", "/a", "/a"),  # the mount point left out of the path
        ("/chat", "/chatroom/a", "/chatroom/a"),  # a longer name, not below the mount point
    ],
)
def test_route_path(root: str, path: str, expected: str) -> None:
    from bosh_middleware.asgi import route_path

    assert route_path(path, root) == expected


@pytest.mark.parametrize("headers", [NAV, {"x-custom": "1"}], ids=["navigation", "says-nothing"])
async def test_headers_given_as_a_one_shot_iterator_still_reach_the_app(
    make_mw: Any, headers: dict[str, str]
) -> None:
    """ASGI says the headers are an iterable: one that reading them uses up is read once, and
    the app gets them all (it got none)."""
    seen: list[list[Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(list(scope["headers"]))
        await html_app(PAGE)(scope, receive, send)

    mw, _ = make_mw(app)
    scope = http_scope("/", headers=headers, user=ALICE)
    pairs = list(scope["headers"])
    scope["headers"] = iter(pairs)
    rec = ASGIRecorder()
    await asyncio.wait_for(mw(scope, rec.receive, rec.send), 10)
    assert seen == [pairs] and page_vars(rec.body) is not None


@pytest.mark.parametrize(
    "before",
    [
        {"type": "http.response.early_hint", "links": [b"</style.css>; rel=preload; as=style"]},
        {"type": "http.response.push", "path": "/style.css", "headers": []},
        {"type": "http.response.debug", "info": {"template": "page.html"}},
    ],
    ids=lambda m: m["type"],
)
async def test_messages_before_the_start_do_not_turn_the_injection_off(
    make_mw: Any, prosody: XMPPServer, before: dict[str, Any]
) -> None:
    """Early hints, HTTP/2 pushes and the test client's ``http.response.debug`` (Starlette's
    TemplateResponse) come before the response's start and say nothing about it."""
    app = scripted_app([before, *response(200, HTML, PAGE)])
    mw, spy = make_mw(app)
    rec = await run(mw)
    (session,) = spy.sessions
    assert rec.messages[0] == before
    assert rec.body == inject(PAGE, mw.core.snippet(session))
    assert rec.header("cache-control") == "private, no-store"
    assert await live(prosody, session)


@pytest.mark.parametrize("kind", ["fetch", "xhr", "json-client"])
async def test_no_page_request_reaches_the_app_unwrapped(make_mw: Any, kind: str) -> None:
    """The fast path: the app is called with the server's own ``receive`` and ``send``."""
    seen: list[tuple[Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((receive, send))
        await html_app(PAGE)(scope, receive, send)

    mw, spy = make_mw(app)
    rec = ASGIRecorder()
    receive, send = rec.receive, rec.send
    scope = http_scope("/", headers=REQUEST_KINDS[kind], user=ALICE)
    await asyncio.wait_for(mw(scope, receive, send), 10)
    [(got_receive, got_send)] = seen
    assert got_send is send and got_receive is receive
    assert rec.body == PAGE and spy.calls == []


async def test_request_that_may_be_a_page_is_wrapped(make_mw: Any) -> None:
    """The contrast: without a word from the request (curl's ``*/*``), the response is looked at
    through a wrapped ``send``."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(send)
        await html_app(b"{}", content_type="application/json")(scope, receive, send)

    mw, spy = make_mw(app)
    rec = ASGIRecorder()
    send = rec.send
    await asyncio.wait_for(mw(http_scope("/", headers=NOT_NAV, user=ALICE), rec.receive, send), 10)
    assert seen[0] is not send and rec.body == b"{}" and spy.calls == []


RESPONSE_CASES: dict[str, list[dict[str, Any]]] = {
    "json": response(200, [("content-type", "application/json")], b'{"a": 1}'),
    "text-plain": response(200, [("content-type", "text/plain")], b"</head>"),
    "event-stream": response(200, [("content-type", "text/event-stream")], b"data: 1\n\n", b""),
    "404": response(404, HTML, PAGE),
    "302": response(302, [*HTML, ("location", "/next")], b""),
    "204": response(204, [], b""),
    "304": response(304, [*HTML, ("etag", '"x"')], b""),
    "206": response(206, [*HTML, ("content-range", "bytes 0-9/100")], PAGE[:10]),
    "gzip": response(200, [*HTML, ("content-encoding", "gzip")], b"\x1f\x8b\x08\x00garbage"),
    "identity, gzip": response(200, [*HTML, ("content-encoding", "identity, gzip")], b"\x1f\x8b"),
    "no-content-type": response(200, [], PAGE),
    # the front server sends a file in place of the (empty) body
    "x-sendfile": response(200, [*HTML, ("x-sendfile", "/srv/page.html")], b""),
    "x-accel-redirect": response(200, [*HTML, ("x-accel-redirect", "/internal/page.html")], b""),
}


async def test_content_encoding_identity_is_no_encoding(
    make_mw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    mw, spy = make_mw(html_app(PAGE, headers=[("content-encoding", "identity")]))
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        rec = await run(mw)
    assert page_vars(rec.body) is not None and len(spy.sessions) == 1
    assert not [r for r in caplog.records if "compressed" in r.getMessage()]


@pytest.mark.parametrize("case", list(RESPONSE_CASES))
async def test_response_that_cannot_carry_a_session_passes_through(make_mw: Any, case: str) -> None:
    """Not a navigation, so nothing starts early; and the response does not ask for a session."""
    app = scripted_app(RESPONSE_CASES[case])
    mw, spy = make_mw(app)
    rec = await run(mw, headers=NOT_NAV)
    assert spy.calls == []
    assert rec.messages == app.sent


async def test_a_page_compressed_inside_the_middleware_is_reported_once(
    make_mw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """GZipMiddleware added before ours (so inside it) compresses every page before we see
    it: no page gets a session, and each costs a prebind. One warning says why and what to do;
    a compressed download (not HTML) is no such sign."""
    gzip_page = response(200, [*HTML, ("content-encoding", "gzip")], b"\x1f\x8b\x08\x00garbage")
    app = scripted_app(gzip_page)
    mw, spy = make_mw(app)
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        other = scripted_app(
            response(200, [("content-type", "application/gzip"), ("content-encoding", "gzip")])
        )
        mw.app = other
        await run(mw)
        assert not caplog.records
        mw.app = app
        for _ in range(3):
            rec = await run(mw)  # navigations: a prebind each, ended unused
            assert rec.messages == gzip_page
    [record] = caplog.records
    assert "Content-Encoding: gzip" in record.getMessage()
    assert "GZipMiddleware" in record.getMessage()
    assert await spy.await_terminated(4)


async def test_passthrough_is_streamed_and_start_not_held(make_mw: Any) -> None:
    rec_holder: list[ASGIRecorder] = []
    seen: list[tuple[bool, int]] = []
    chunks = [b'{"a": [', b"1, 2", b"]}"]

    def after_start() -> None:
        seen.append((rec_holder[0].has_start, rec_holder[0].body_count))

    def after_chunk(i: int) -> None:
        seen.append((rec_holder[0].has_start, rec_holder[0].body_count))

    app = chunked_app(
        chunks, content_type="application/json", after_start=after_start, after_chunk=after_chunk
    )
    mw, spy = make_mw(app)
    rec = ASGIRecorder()
    rec_holder.append(rec)
    await asyncio.wait_for(mw(http_scope("/", headers=NAV, user=ALICE), rec.receive, rec.send), 10)
    # each message was out before the app sent the next one: nothing held, nothing buffered
    assert seen == [(True, 0), (True, 1), (True, 2), (True, 3)]
    assert rec.chunks == chunks and rec.body_count == 3
    assert rec.header("content-type") == "application/json"
    assert await spy.await_terminated(1)  # the speculative session was ended


# ------------------------------------------------------------------------------------------
# served by real ASGI servers
# ------------------------------------------------------------------------------------------


def served_page(
    prosody: XMPPServer, alice: tuple[str, str], lifespan: list[str] | None = None
) -> BOSHPrebindMiddleware:
    """The page app with a lifespan (its messages recorded in ``lifespan``), behind the
    middleware as a server loads it: the outermost app, so the user is the X-User header."""
    page, seen = html_app(PAGE), ([] if lifespan is None else lifespan)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                seen.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await page(scope, receive, send)

    return BOSHPrebindMiddleware(
        app,
        service_url=prosody.service_url,
        credentials=StaticCredentials({"alice": alice}),
        get_user=header_user,
    )


@pytest.mark.parametrize("server", SERVERS)
def test_asgi_servers_take_it_for_an_asgi3_app(
    server: str, prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    """The middleware as the app a server loads: uvicorn and hypercorn choose ASGI 3 by looking
    at it (hypercorn's choice is ASGI or WSGI, by ``inspect.iscoroutinefunction``), run its
    lifespan, and serve a page with a session and the requests it leaves alone."""
    lifespan: list[str] = []
    mw = served_page(prosody, alice, lifespan)
    spy = PrebindSpy.on(mw.core, sync=False)
    closed: list[bool] = []
    aclose = mw.core.aclose

    async def spied_aclose() -> None:
        closed.append(True)
        await aclose()

    mw.core.aclose = spied_aclose  # type: ignore[method-assign]
    fetch = {"accept": "application/json", "sec-fetch-dest": "empty", "x-user": "alice"}
    try:
        with serve(server, mw) as base, httpx.Client(base_url=base, timeout=10) as client:
            navigation = client.get("/", headers={**NAV, "x-user": "alice"})
            anonymous = client.get("/", headers=NAV)
            api = client.get("/", headers=fetch)
            (session,) = spy.sessions
            assert is_live(prosody.service_url, session)
        assert navigation.status_code == 200
        assert page_vars(navigation.content) == {
            "BOSH_JID": session.jid,
            "BOSH_SID": session.sid,
            "BOSH_RID": session.rid,
        }
        assert navigation.headers["cache-control"] == "private, no-store"
        assert anonymous.content == api.content == PAGE
        assert "cache-control" not in anonymous.headers and "cache-control" not in api.headers
        assert lifespan == ["lifespan.startup", "lifespan.shutdown"]
        assert closed == [True]  # the shutdown went through the middleware's own receive
    finally:
        end_sessions(prosody.service_url, spy.sessions)


# ------------------------------------------------------------------------------------------
# overlap with the view, and unused sessions
# ------------------------------------------------------------------------------------------


async def test_prebind_runs_alongside_the_view(make_mw: Any) -> None:
    """Page time ~ max(view, prebind), not the sum. The spy adds 300 ms of latency in front of
    the real prebind so that the difference is measurable (a local prebind takes ~5 ms)."""
    view = 0.3
    view_start: list[float] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        view_start.append(time.monotonic())
        await asyncio.sleep(view)
        await html_app(PAGE)(scope, receive, send)

    mw, spy = make_mw(app, spy_delay=0.3)
    t0 = time.monotonic()
    rec = await run(mw)
    total = time.monotonic() - t0
    assert page_vars(rec.body) is not None
    p_start, p_end = spy.intervals[0]
    prebind = p_end - p_start
    assert p_start <= view_start[0] + 0.05  # started before the view ran, not after it
    # the sum would be >= view + prebind; allow a quarter of the shorter one for noise
    assert total < view + prebind - 0.25 * min(view, prebind), (total, prebind)


@pytest.mark.parametrize("case", ["json", "404", "302", "gzip"])
async def test_unused_session_is_terminated_at_once(
    make_mw: Any, prosody: XMPPServer, case: str
) -> None:
    app = scripted_app(RESPONSE_CASES[case])
    mw, spy = make_mw(app)
    rec = await run(mw)  # a navigation: the prebind started next to the view
    assert rec.messages == app.sent
    await ended_unused(spy, prosody)


async def prebind_started() -> None:
    """Lets the prebind task made next to the view take its first step. On 3.11 ``run``'s
    ``wait_for`` ran the middleware in a task of its own, whose end reached ``run`` a loop turn
    after the prebind task's first step; from 3.12 on ``wait_for`` runs it in the caller's task,
    so a page answered without a wait is back before the prebind task has run at all."""
    await asyncio.sleep(0)


async def ended_unused(spy: PrebindSpy, prosody: XMPPServer) -> None:
    """One prebind was made, and its session ended unused (dead at the server)."""
    await prebind_started()
    assert len(spy.calls) == 1
    assert await spy.await_terminated(1, timeout=2.0)
    (session,) = spy.sessions
    assert spy.terminated == [session]
    assert await dead(prosody, session)


def opting_out(app: Any) -> Any:
    """``app``, behind a view that calls ``no_prebind`` first (a logout page, say)."""

    async def view(scope: Any, receive: Any, send: Any) -> None:
        no_prebind(scope)
        await app(scope, receive, send)

    return view


@pytest.mark.parametrize("mode", ["script", "headers"])
async def test_a_page_whose_view_says_no_prebind_goes_out_untouched(
    make_mw: Any, prosody: XMPPServer, mode: str
) -> None:
    """A navigation's prebind started next to the view; the view said no: the page goes out
    as the app sent it (no variables, no headers, no Cache-Control) and the session ends."""
    app = scripted_app(response(200, HTML, PAGE))
    mw, spy = make_mw(opting_out(app), mode=mode)
    rec = await run(mw)
    assert rec.messages == app.sent
    await ended_unused(spy, prosody)
    # the same page from a view that says nothing carries a live session
    mw, spy = make_mw(scripted_app(response(200, HTML, PAGE)), mode=mode)
    rec = await run(mw)
    assert rec.messages != app.sent and await live(prosody, spy.sessions[0])


async def test_no_prebind_on_a_request_that_did_not_say_what_it_wants_costs_nothing(
    make_mw: Any,
) -> None:
    """Such a request is prebound for only once the response says HTML: by then the view has
    spoken, and no prebind starts at all."""
    app = scripted_app(response(200, HTML, PAGE))
    mw, spy = make_mw(opting_out(app))
    rec = await run(mw, headers=NOT_NAV)
    assert rec.messages == app.sent
    assert spy.calls == []


async def test_shutdown_waits_for_the_termination_of_a_prebind_still_in_flight(
    make_mw: Any, prosody: XMPPServer
) -> None:
    """The lifespan's shutdown (``core.aclose``) comes while an unused prebind is still
    running: its session is ended before the engine closes, not left to time out at the
    server (nor its terminate to die with the loop)."""
    app = scripted_app(response(200, [("content-type", "application/json")], b"{}"))
    mw, spy = make_mw(app, spy_delay=1.0)  # (still in flight on a loaded machine)
    await run(mw)  # a navigation answered with JSON: the prebind started for it is unused
    await prebind_started()
    assert spy.sessions == [] and spy.in_flight == 1
    await asyncio.wait_for(mw.core.aclose(), 10)
    (session,) = spy.sessions
    assert spy.terminated == [session] and spy.in_flight == 0
    assert await dead(prosody, session)


@pytest.mark.parametrize(
    ("path", "headers"), [("/", NAV), ("/bosh/prebind", {"sec-fetch-dest": "empty"})]
)
async def test_a_client_gone_before_its_session_gets_none_and_it_is_ended(
    make_mw: Any, prosody: XMPPServer, path: str, headers: dict[str, str]
) -> None:
    """A browser that gives up on a page (a reset connection) while its prebind is still
    running: the server says http.disconnect, and drops what is sent after it without a word,
    so a session sent then would stay live at the XMPP server until it timed out. The same
    for the endpoint: converse.js fetches it as its page loads, and a user who leaves (or
    reloads) while the prebind runs aborts the fetch."""
    mw, spy = make_mw(html_app(PAGE), spy_delay=2.0)
    sent: list[dict[str, Any]] = []
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0.1)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope(path, headers=headers, user=ALICE)
    t0 = time.monotonic()
    await asyncio.wait_for(mw(scope, receive, send), 10)
    assert time.monotonic() - t0 < 1.5  # at the disconnect, not after the prebind
    body = b"".join(m.get("body", b"") for m in sent)
    assert b"BOSH_" not in body and b"sid" not in body
    assert await spy.await_terminated(1, timeout=5.0)
    (session,) = spy.sessions
    assert spy.terminated == [session]
    assert await dead(prosody, session)


@pytest.mark.parametrize("path", ["/", "/bosh/prebind"])
@pytest.mark.parametrize("server", SERVERS)
def test_a_connection_reset_while_the_page_waits_ends_its_session(
    server: str, prosody: XMPPServer, alice: tuple[str, str], path: str
) -> None:
    """The same through real servers, which say http.disconnect when the browser resets the
    connection and then drop the page (or the endpoint's answer) without an error."""
    mw = served_page(prosody, alice)
    spy = PrebindSpy.on(mw.core, sync=False, delay=1.0)
    with serve(server, mw) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            lines = [f"{k}: {v}" for k, v in {**NAV, "x-user": "alice"}.items()]
            request = "\r\n".join([f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *lines, "", ""])
            sock.sendall(request.encode())
            # the prebind has started (and takes a second more): now the browser gives up
            assert wait_until(lambda: len(spy.calls) == 1, 10, 0.01)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert wait_until(lambda: len(spy.terminated) == 1, 10, 0.05)
    (session,) = spy.sessions
    assert spy.terminated == [session]
    assert is_dead(prosody.service_url, session)


async def test_a_receive_that_always_says_request_is_read_twice_at_most(make_mw: Any) -> None:
    """No ASGI server does it, but harnesses do (the benchmarks' did): every call answered
    with the request. The watch must not loop on it while the session is awaited (it did,
    holding every message, until the machine ran out of memory)."""
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    sink = ASGIRecorder()
    mw, _ = make_mw(html_app(PAGE), spy_delay=0.3)
    await asyncio.wait_for(mw(http_scope("/", headers=NAV, user=ALICE), receive, sink.send), 10)
    assert page_vars(sink.body) is not None
    assert calls <= 2


async def test_what_the_watch_read_goes_to_the_app(make_mw: Any) -> None:
    """While the page waits for its session, the middleware reads the request's messages to
    see a disconnect: the app, asking afterwards, still gets them, once each."""
    got: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HTML_RAW})
        got.append((await receive())["type"])
        await send({"type": "http.response.body", "body": PAGE})

    mw, _ = make_mw(app, spy_delay=0.2)
    rec = await run(mw)
    assert got == ["http.request"]
    assert page_vars(rec.body) is not None


async def test_an_app_that_listens_for_the_disconnect_while_its_start_waits_gets_its_page(
    make_mw: Any, prosody: XMPPServer
) -> None:
    """Starlette's streamed responses (ASGI spec before 2.4, and any page behind a
    ``BaseHTTPMiddleware``) listen for the disconnect in a task of their own while they send
    the start. That receive takes the watch over; the start must still get its session (the
    watch's cancellation once came out of the app's ``send``, and the session was left live)."""
    sent: list[dict[str, Any]] = []
    over = asyncio.Event()
    first = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:  # as uvicorn: the disconnect once the response is over
        if first:
            return first.pop()
        await over.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            over.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        start = {"type": "http.response.start", "status": 200, "headers": HTML_RAW}
        starting = asyncio.ensure_future(send(start))
        await asyncio.sleep(0.1)  # the start is waiting for the session, watching the request
        listener = asyncio.ensure_future(listen())
        await starting
        await send({"type": "http.response.body", "body": PAGE})
        await listener

    mw, spy = make_mw(app, spy_delay=0.5)
    await asyncio.wait_for(mw(http_scope("/", headers=NAV, user=ALICE), receive, send), 10)
    values = page_vars(b"".join(m.get("body", b"") for m in sent))
    assert values is not None
    (session,) = spy.sessions
    assert values["BOSH_SID"] == session.sid and spy.terminated == []
    assert await live(prosody, session)


def test_a_terminate_its_loop_ended_before_is_done_at_exit(
    prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    """Django under an ASGI server has no lifespan to wait for the termination of unused
    sessions: the loop ends, cancelling them. ``close()``, which runs at exit, ends those with
    the sync engine instead of leaving them live until the server's inactivity timeout."""
    core = PrebindCore(MiddlewareConfig(prosody.service_url, StaticCredentials({"alice": alice})))
    try:
        session = core.prebinder.prebind(Credentials(*alice))

        async def page_that_did_not_use_it() -> None:
            core.terminate_async(session)  # then the loop ends (asyncio.run cancels it)

        asyncio.run(page_that_did_not_use_it())
        assert list(core._ending.values()) == [session]  # (cut short, so still to be ended)
    finally:
        core.close()
    assert is_dead(prosody.service_url, session)


def test_a_terminate_its_stopped_loop_never_ran_is_done_at_exit(
    prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    """As above, for a server whose loop stops without ending its tasks (Daphne's reactor,
    a worker's ``run_until_complete``): the terminate is left pending, never to run, and
    ``close()``, at exit, ends its session too, not only those of tasks that are done."""
    core = PrebindCore(MiddlewareConfig(prosody.service_url, StaticCredentials({"alice": alice})))
    loop = asyncio.new_event_loop()
    try:
        session = core.prebinder.prebind(Credentials(*alice))

        async def page_that_did_not_use_it() -> None:
            core.terminate_async(session)  # then the server's loop stops

        loop.run_until_complete(page_that_did_not_use_it())
        assert list(core._ending.values()) == [session]
        core.close()  # (at exit)
        assert is_dead(prosody.service_url, session)
    finally:
        core.close()
        for task in asyncio.all_tasks(loop):  # (what the loop's owner would do, to be clean)
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()


def test_a_prebind_its_loop_ended_during_ends_its_session(
    prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    """The loop ends (Django under an ASGI server stopping, no lifespan to wait) while an
    unused prebind is still under way, after the server made its session: the prebind is
    cancelled, and the terminate its cancellation starts is sent before the loop closes, not
    cancelled or destroyed with it, leaving the session live."""
    held = forward_to(prosody.service_url, delay={"bind": 3.0})
    with FakeBOSH(held) as proxy:
        config = MiddlewareConfig.from_mapping(
            {"timeout": 10},
            service_url=proxy.url,
            credentials=StaticCredentials({"alice": alice}),
        )
        core = PrebindCore(config)
        try:

            async def page_that_gave_up() -> None:
                pending = core.start_async(Credentials(*alice))
                assert pending is not None
                for _ in range(300):  # (the bind is held at the proxy: the session is made)
                    if "bind" in proxy.labels:
                        break
                    await asyncio.sleep(0.01)
                pending.discard()  # then the loop ends (asyncio.run cancels the prebind)

            asyncio.run(page_that_gave_up())
            # (each cleanup done: none destroyed pending with the loop)
            assert not core.async_prebinder._cleanup
        finally:
            core.close()
        sid = proxy.records[1].body.split(b"sid='")[1].split(b"'")[0].decode()
        rids = [int(r.body.split(b"rid='")[1].split(b"'")[0]) for r in proxy.records]
        assert proxy.labels[-1] == "terminate"
        assert probe_session(prosody.service_url, sid, max(rids) + 1) == "dead"


def test_prebinds_their_loops_ended_during_are_no_verdict_on_the_server(
    prosody: XMPPServer, alice: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A prebind that its loop's end cancels (``asyncio.run`` over, a server stopping without
    a lifespan, a test client's loop per request) says nothing of the XMPP server: it was
    not counted as a failure, so a few such loops opened the breaker for every page after
    them, with a warning of a failed prebind each. Nor does it hold a half-open trial."""
    held = forward_to(prosody.service_url, delay={"bind": 3.0})
    with FakeBOSH(held) as proxy:
        config = MiddlewareConfig.from_mapping(
            # (each prebind the same way: none learnt from the one before)
            {"timeout": 10, "quickstart": False, "pipeline": False},
            service_url=proxy.url,
            credentials=StaticCredentials({"alice": alice}),
        )
        core = PrebindCore(config)
        now = [0.0]
        core.breaker = CircuitBreaker(2, 30.0, clock=lambda: now[0])
        try:

            async def page_that_gave_up() -> None:
                binds = proxy.labels.count("bind")
                pending = core.start_async(Credentials(*alice))
                assert pending is not None
                for _ in range(300):  # (the bind is held at the proxy)
                    if proxy.labels.count("bind") > binds:
                        break
                    await asyncio.sleep(0.01)
                pending.discard()  # then the loop ends (asyncio.run cancels the prebind)

            with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
                for _ in range(2):
                    asyncio.run(page_that_gave_up())
            assert core.breaker.state == "closed"
            assert not [r for r in caplog.records if "prebind failed" in r.getMessage()]
            core.breaker.record_failure()
            core.breaker.record_failure()
            now[0] += 31.0  # (open long enough: the next prebind is a trial)
            asyncio.run(page_that_gave_up())  # the trial, cut short
            assert core.breaker.admit() is not None  # another trial may go
        finally:
            core.close()


def test_the_prebind_pool_is_made_again_after_a_fork(
    prosody: XMPPServer, alice: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool made before a fork has no threads in the child: work given to it never runs."""
    core = PrebindCore(MiddlewareConfig(prosody.service_url, lambda user: None))
    try:
        before = core._pool()
        assert core._pool() is before
        monkeypatch.setattr(os, "getpid", lambda: -1)  # (as the child sees it)
        after = core._pool()
        assert after is not before and core._pool() is after
    finally:
        monkeypatch.undo()
        before.shutdown()
        core.close()


@pytest.mark.parametrize("mode", ["script", "headers", "both"])
async def test_session_is_terminated_when_the_app_fails_after_start(
    make_mw: Any, prosody: XMPPServer, mode: str
) -> None:
    """Headers mode too: a server may hold the start until the first body message
    (hypercorn), and send its error response in its place, as a WSGI server does."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(response(200, HTML)[0])
        raise RuntimeError("template error")

    mw, spy = make_mw(app, mode=mode)
    with pytest.raises(RuntimeError, match="template error"):
        await run(mw)
    assert await spy.await_terminated(1, timeout=2.0)
    assert await dead(prosody, spy.sessions[0])


async def test_pathsend_passes_through_and_session_is_ended(
    make_mw: Any, prosody: XMPPServer
) -> None:
    pathsend = {"type": "http.response.pathsend", "path": "/tmp/page.html"}
    messages = [response(200, HTML)[0], pathsend]
    app = scripted_app(messages)
    mw, spy = make_mw(app)
    rec = await run(mw)
    assert rec.messages == app.sent
    assert await spy.await_terminated(1, timeout=2.0)
    assert await dead(prosody, spy.sessions[0])


async def test_a_body_that_goes_on_as_zerocopysend_loses_no_held_bytes(
    make_mw: Any, prosody: XMPPServer
) -> None:
    """The page's first chunk ends in what may be the start of ``</head>`` (held back), then
    the body goes on as a ``zerocopysend`` the middleware cannot see into: the held bytes go
    out first, unchanged, and the session that reached no page is ended."""
    first = b"<!doctype html><html><p>hello</p></he"
    zerocopy = {"type": "http.response.zerocopysend", "file": 3, "more_body": False}
    app = scripted_app([response(200, HTML)[0], {**response(200, HTML, first, b"")[1]}, zerocopy])
    mw, spy = make_mw(app)
    rec = await run(mw)
    body = b"".join(m.get("body", b"") for m in rec.messages if m["type"] == "http.response.body")
    assert body == first
    assert rec.messages[-1] == zerocopy
    (session,) = spy.sessions
    assert await spy.await_terminated(1, timeout=2.0)
    assert await dead(prosody, session)


@pytest.mark.parametrize("where", ["start held", "mid-body"])
async def test_an_http2_push_after_the_start_keeps_the_injection(
    make_mw: Any, prosody: XMPPServer, where: str
) -> None:
    """ASGI's server push may come any time before the last body: it says nothing of the
    page's body, so the page still gets its session (it went out without one, and the
    session was ended), and the push goes out after the start."""
    push = {"type": "http.response.push", "path": "/style.css", "headers": []}
    start, first, last = response(200, HTML, PAGE[:30], PAGE[30:])
    messages = [start, push, first, last] if where == "start held" else [start, first, push, last]
    mw, spy = make_mw(scripted_app(messages))
    rec = await run(mw)
    kinds = [m["type"].rsplit(".", 1)[1] for m in rec.messages]
    assert kinds.index("start") < kinds.index("push")
    (session,) = spy.sessions
    assert page_vars(rec.body) is not None and spy.terminated == []
    assert await live(prosody, session)


async def test_digest_trailers_of_a_rewritten_body_are_removed(make_mw: Any) -> None:
    start = {"type": "http.response.start", "status": 200, "headers": HTML_RAW, "trailers": True}
    body = {"type": "http.response.body", "body": PAGE, "more_body": False}
    trailers = {
        "type": "http.response.trailers",
        "headers": [(b"content-digest", b"sha-256=:AAAA:"), (b"server-timing", b"db;dur=5")],
        "more_trailers": False,
    }
    mw, _ = make_mw(scripted_app([start, body, trailers]))
    rec = await run(mw)
    assert page_vars(rec.body) is not None
    (sent,) = [m for m in rec.messages if m["type"] == "http.response.trailers"]
    assert sent["headers"] == [(b"server-timing", b"db;dur=5")]


# ------------------------------------------------------------------------------------------
# injection details
# ------------------------------------------------------------------------------------------


async def test_streamed_page_is_injected_on_the_fly(make_mw: Any) -> None:
    title = b"<html><head><title>" + b"t" * 60 + b"</title>"  # longer than the held tail
    chunks = [title, b"</he", b"ad><body>", b"<p>x</p></body></html>"]
    whole = b"".join(chunks)
    rec_holder: list[ASGIRecorder] = []
    seen: list[bool] = []

    def after_chunk(i: int) -> None:
        seen.append(b"BOSH_SID" in rec_holder[0].body)

    app = chunked_app(
        chunks,
        headers=[("content-length", str(len(whole))), ("etag", '"v1"')],
        after_chunk=after_chunk,
    )
    mw, spy = make_mw(app)
    rec = ASGIRecorder()
    rec_holder.append(rec)
    await asyncio.wait_for(mw(http_scope("/", headers=NAV, user=ALICE), rec.receive, rec.send), 10)
    assert rec.body == inject(whole, mw.core.snippet(spy.sessions[0]))
    assert rec.body_count == len(chunks)
    assert seen == [False, False, True, True]  # out as soon as "</head>" was complete
    assert rec.chunks[0] and title.startswith(rec.chunks[0])  # the first chunk was not held
    assert rec.header("content-length") is None  # removed for a streamed body
    assert rec.header("etag") is None


async def test_content_length_not_added_when_absent(make_mw: Any) -> None:
    mw, _ = make_mw(html_app(PAGE, content_length=False))
    rec = await run(mw)
    assert page_vars(rec.body) is not None
    assert rec.header("content-length") is None


VALIDATORS = [
    ("etag", '"abc"'),
    ("etag", 'W/"abc"'),
    ("last-modified", "Wed, 01 Jan 2025 00:00:00 GMT"),
]


DIGESTS = [("content-digest", "sha-256=:AAAA:"), ("repr-digest", "sha-256=:AAAA:")]


@pytest.mark.parametrize("mode", ["script", "headers"])
async def test_digests_of_a_rewritten_body_are_removed(make_mw: Any, mode: str) -> None:
    mw, spy = make_mw(html_app(PAGE, headers=DIGESTS), mode=mode)
    rec = await run(mw)
    assert spy.sessions
    kept = mode == "headers"  # (the body went out as the app made it)
    assert (rec.header("content-digest") is not None) == kept
    assert (rec.header("repr-digest") is not None) == kept


@pytest.mark.parametrize("mode", ["script", "headers"])
async def test_a_rewritten_page_offers_no_byte_ranges(make_mw: Any, mode: str) -> None:
    """A file response (Starlette's ``FileResponse``) says ``Accept-Ranges: bytes``: ranges of
    the file, not of the page with the session in it. A resumed download would splice them."""
    mw, spy = make_mw(html_app(PAGE, headers=[("accept-ranges", "bytes")]), mode=mode)
    rec = await run(mw)
    assert spy.sessions
    assert rec.headers("accept-ranges") == (["bytes"] if mode == "headers" else ["none"])


@pytest.mark.parametrize("mode", ["script", "headers"])
async def test_a_prebound_page_carries_no_validator(make_mw: Any, mode: str) -> None:
    """Each prebound page is new: a copy cached without a session, revalidated with these,
    would match it in a conditional GET outside the middleware (a 304: the session lost)."""
    mw, spy = make_mw(html_app(PAGE, headers=VALIDATORS), mode=mode)
    rec = await run(mw)
    assert spy.sessions and rec.header("cache-control") == "private, no-store"
    assert rec.headers("etag") == [] and rec.headers("last-modified") == []


async def conditional_app(scope: Any, receive: Any, send: Any) -> None:
    """A page that answers its own conditional GETs, as Starlette's StaticFiles does."""
    seen = dict(scope["headers"])
    if seen.get(b"if-none-match") == b'"v1"' or seen.get(b"if-modified-since") == b"x":
        await send({"type": "http.response.start", "status": 304, "headers": [(b"etag", b'"v1"')]})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"text/html"), (b"etag", b'"v1"')]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": PAGE})


@pytest.mark.parametrize("validator", [("If-None-Match", '"v1"'), ("If-Modified-Since", "x")])
async def test_a_revalidated_copy_without_a_session_is_answered_in_full(
    make_mw: Any, prosody: XMPPServer, validator: tuple[str, str]
) -> None:
    """What a browser revalidates is a copy served without a session (the XMPP server was
    down, the user not yet logged in): a 304 would show it again, sessionless, and lose the
    session made for it. A navigation being prebound reaches the app unconditional."""
    mw, spy = make_mw(conditional_app)
    rec = await run(mw, headers=[*NAV.items(), validator])
    (session,) = spy.sessions
    assert rec.status == 200 and page_vars(rec.body)["BOSH_SID"] == session.sid
    assert await asyncio.to_thread(is_live, prosody.service_url, session)
    # Left conditional where no session is made: nobody logged in, or no navigation
    for user, headers in ((None, NAV), (ALICE, NOT_NAV)):
        rec = await run(mw, user=user, headers=[*headers.items(), validator])
        assert rec.status == 304 and rec.body == b""
    assert len(spy.sessions) == 1


@pytest.mark.parametrize(
    ("vary", "expected"),
    [
        ([], "Cookie"),
        (["Accept-Encoding"], "Accept-Encoding, Cookie"),
        (["Accept-Encoding", "Origin"], "Accept-Encoding, Origin, Cookie"),
        (["cookie"], "cookie"),
        (["*"], "*"),
    ],
)
async def test_vary_cookie_is_merged(make_mw: Any, vary: list[str], expected: str) -> None:
    headers = [("vary", v) for v in vary] + [
        ("cache-control", "public, max-age=600"),
        ("expires", "Thu, 01 Dec 2044 16:00:00 GMT"),
    ]
    mw, _ = make_mw(html_app(PAGE, headers=headers))
    rec = await run(mw)
    assert rec.headers("vary") == [expected]
    assert rec.headers("cache-control") == ["private, no-store"]
    assert rec.headers("expires") == []


@pytest.mark.parametrize("where", ["scope", "state"])
async def test_csp_nonce_is_used(make_mw: Any, where: str) -> None:
    import lxml.html

    mw, _ = make_mw(html_app(PAGE))
    extra = {"csp_nonce": "r4nd0m"} if where == "scope" else {"state": {"csp_nonce": "r4nd0m"}}
    rec = await run(mw, **extra)
    scripts = list(lxml.html.document_fromstring(rec.body).iter("script"))
    assert [s.get("nonce") for s in scripts] == ["r4nd0m"]


async def test_variable_names_are_configurable(make_mw: Any) -> None:
    mw, spy = make_mw(html_app(PAGE), variables=("XMPP_JID", "XMPP_SID", "XMPP_RID"))
    rec = await run(mw)
    s = spy.sessions[0]
    assert page_vars(rec.body) == {"XMPP_JID": s.jid, "XMPP_SID": s.sid, "XMPP_RID": s.rid}


async def test_headers_mode(make_mw: Any, prosody: XMPPServer, alice: tuple[str, str]) -> None:
    app = scripted_app(
        response(200, [*HTML, ("content-length", str(len(PAGE))), ("etag", '"e"')], PAGE)
    )
    mw, spy = make_mw(app, mode="headers")
    rec = await run(mw)
    (session,) = spy.sessions
    assert rec.body == PAGE and rec.body_count == 1
    assert rec.header("content-length") == str(len(PAGE))
    assert rec.header("etag") is None
    assert rec.header("x-bosh-jid") == session.jid and bare(session.jid) == alice[0]
    assert rec.header("x-bosh-sid") == session.sid
    assert rec.header("x-bosh-rid") == str(session.rid)
    assert rec.header("cache-control") == "private, no-store"
    assert rec.header("vary") == "Cookie"
    assert await live(prosody, session)


async def test_both_mode(make_mw: Any) -> None:
    mw, spy = make_mw(html_app(PAGE), mode="both")
    rec = await run(mw)
    s = spy.sessions[0]
    assert page_vars(rec.body) == {"BOSH_JID": s.jid, "BOSH_SID": s.sid, "BOSH_RID": s.rid}
    assert (rec.header("x-bosh-sid"), rec.header("x-bosh-rid")) == (s.sid, str(s.rid))
    assert rec.header("content-length") == str(len(rec.body))


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_both_mode_page_that_cannot_carry_the_snippet_keeps_its_session(
    make_mw: Any, prosody: XMPPServer, streamed: bool
) -> None:
    """A page that ends inside a comment gets no snippet, but in "both" mode its headers took
    the session to the client, as in headers mode: it must stay live, not be ended."""
    page = b"<html><p>hi</p><!-- a comment never closed"
    bodies = (page[:10], page[10:]) if streamed else (page,)
    mw, spy = make_mw(scripted_app(response(200, HTML, *bodies)), mode="both")
    rec = await run(mw)
    await drain_async(mw.core)
    (session,) = spy.sessions
    assert b"BOSH_" not in rec.body and rec.header("x-bosh-sid") == session.sid
    assert spy.terminated == []
    assert await live(prosody, session)


# ------------------------------------------------------------------------------------------
# JSON endpoint
# ------------------------------------------------------------------------------------------


def client_for(mw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=header_auth(mw)), base_url="http://testserver", timeout=10
    )


async def test_endpoint_returns_a_live_session(
    make_mw: Any, prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    mw, spy = make_mw(html_app(PAGE))
    async with client_for(mw) as client:
        # converse.js fetches it: not a page, and answered all the same
        xhr = {"accept": "application/json", "sec-fetch-dest": "empty", "x-requested-with": "XHR"}
        r = await client.get("/bosh/prebind", headers={"x-user": "alice", **xhr})
    assert r.status_code == 200
    data = r.json()
    assert set(data) == {"jid", "sid", "rid"}
    assert bare(data["jid"]) == alice[0]
    assert r.headers["cache-control"] == "private, no-store"
    assert r.headers["vary"] == "Cookie"
    (session,) = spy.sessions
    assert (data["sid"], data["rid"]) == (session.sid, session.rid)
    assert await live(prosody, session)


async def test_endpoint_path_is_configurable(make_mw: Any) -> None:
    mw, _spy = make_mw(
        html_app(b"app page", content_type="text/plain", status=404), endpoint_path="/xmpp/attach"
    )
    async with client_for(mw) as client:
        moved = await client.get("/xmpp/attach", headers={"x-user": "alice"})
        old = await client.get("/bosh/prebind", headers={"x-user": "alice"})
    assert moved.status_code == 200 and set(moved.json()) == {"jid", "sid", "rid"}
    assert (old.status_code, old.content) == (404, b"app page")


async def test_endpoint_401_for_anonymous(make_mw: Any) -> None:
    mw, spy = make_mw(html_app(PAGE))
    async with client_for(mw) as client:
        r = await client.get("/bosh/prebind")
    assert r.status_code == 401
    assert spy.calls == []


@pytest.mark.parametrize(("site", "dest", "refusal"), FETCH_METADATA)
async def test_endpoint_answers_only_the_apps_own_scripts(
    make_mw: Any, prosody: XMPPServer, site: str | None, dest: str | None, refusal: str | None
) -> None:
    """As test_wsgi's: only what a script of this site (or a tab) asks is answered."""
    mw, spy = make_mw(html_app(PAGE))
    headers = {"x-user": "alice", "sec-fetch-site": site, "sec-fetch-dest": dest}
    async with client_for(mw) as client:
        r = await client.get(
            "/bosh/prebind", headers={k: v for k, v in headers.items() if v is not None}
        )
    if refusal is not None:
        assert (r.status_code, r.json()) == (403, {"error": refusal})
        assert spy.calls == [] and r.headers["cache-control"] == "private, no-store"
    else:
        assert r.status_code == 200
        (session,) = spy.sessions
        assert r.json()["sid"] == session.sid and await live(prosody, session)


async def test_endpoint_405_for_post(make_mw: Any) -> None:
    mw, spy = make_mw(html_app(PAGE))
    async with client_for(mw) as client:
        r = await client.post("/bosh/prebind", headers={"x-user": "alice"})
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"
    assert spy.calls == []


# --- the response-start pre-filter ---------------------------------------------------------

CONTENT_TYPES = [
    "text/html",
    "text/html; charset=utf-8",
    "TEXT/HTML;charset=ISO-8859-1",
    " text/html ",
    "application/xhtml+xml",
    "Application/XHTML+XML; charset=utf-8",
    "application/json",
    "text/plain",
    "text/htmlx",
    "image/svg+xml",
    "",
]


@pytest.mark.parametrize("name", [b"content-type", b"Content-Type", b"CONTENT-TYPE"])
@pytest.mark.parametrize("ctype", CONTENT_TYPES)
def test_html_prefilter_never_hides_a_page(name: bytes, ctype: str) -> None:
    """``_may_be_html`` lets the responder skip ``is_injectable`` for most responses: it must
    say True for every Content-Type that ``is_injectable`` takes for a page."""
    from bosh_middleware.asgi import _may_be_html
    from bosh_middleware.core import is_injectable

    raw = [(b"content-length", b"10"), (name, ctype.encode("latin-1"))]
    page = is_injectable("GET", 200, {"content-type": ctype}.get)
    if page:
        assert _may_be_html(raw)
    assert _may_be_html(raw) is ("html" in ctype.lower())
    assert not _may_be_html([(b"content-length", b"10")])
    # html elsewhere than in the Content-Type does not make a page; bytes-like values count
    link = (b"link", b"</help.html>; rel=help")
    assert _may_be_html([link, (name, ctype.encode("latin-1"))]) is ("html" in ctype.lower())
    assert _may_be_html([(name, bytearray(ctype.encode("latin-1")))]) is ("html" in ctype.lower())


async def test_response_headers_given_as_an_iterator_are_read_whole(make_mw: Any) -> None:
    """ASGI only says "iterable": a generator of headers is read more than once on the way
    (the pre-filter, then the full check and the rewrite), so it is made a list first."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = ((k, v) for k, v in [(b"content-type", b"text/html"), (b"x-app", b"1")])
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": PAGE})

    mw, spy = make_mw(app)
    rec = await run(mw)
    assert page_vars(rec.body) is not None and len(spy.sessions) == 1
    assert rec.header("x-app") == "1"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_an_endpoint_under_an_excluded_prefix_still_answers(
    make_mw: Any, method: str
) -> None:
    """Excluded paths are tested first (the cheapest pass-through), but never the endpoint."""
    app = scripted_app(response(200, [*HTML, ("content-length", str(len(PAGE)))], PAGE))
    for exclude in (("/bosh/",), ("/bosh",)):
        mw, spy = make_mw(app, exclude_paths=exclude)
        rec = await run(mw, "/bosh/prebind", method=method)
        if method == "GET":
            assert rec.messages[0]["status"] == 200
            assert set(json.loads(rec.body)) == {"jid", "sid", "rid"}
        else:
            assert rec.messages[0]["status"] == 405
        other = await run(mw, "/bosh/other", method=method)
        assert other.messages == app.sent[-2:] and spy.calls[1:] == []
