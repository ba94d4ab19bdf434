"""bosh_middleware.starlette with Starlette's AuthenticationMiddleware (and FastAPI), against a
real Prosody: httpx.ASGITransport for the HTTP checks, uvicorn + Chromium for the browser test.

The HTTP checks are ``async def`` tests run by ``@own_loop`` on a fresh loop in their own
thread (a browser test run before them leaves Playwright's loop running in the main thread).

The documented set-up is one line, added *before* the authentication middleware because
``add_middleware`` prepends (authentication must wrap us)::

    app.add_middleware(BOSHPrebindMiddleware, service_url=..., credentials=...)
    app.add_middleware(AuthenticationMiddleware, backend=...)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route

from bosh_middleware import StaticCredentials, asgi, no_prebind
from bosh_middleware.starlette import BOSHPrebindMiddleware
from flask_app.checks import (
    aclose_core,
    assert_live,
    browser_login_attach_and_chat,
    own_loop,
    page,
    page_session,
)
from support.asgi_servers import serve
from support.bosh_check import (
    REQUEST_KINDS,
    SAYS_NOTHING,
    CountingCredentials,
    PrebindSpy,
    is_dead,
)
from support.xmpp_servers import XMPPServer

# FastAPI is tested where it is installed (the tox "fastapi" env, which sets
# BOSH_TEST_REQUIRE=fastapi so that a missing FastAPI fails there instead of going untested);
# the Starlette envs pin Starlette versions FastAPI may not support.
HAVE_FASTAPI = importlib.util.find_spec("fastapi") is not None
if not HAVE_FASTAPI and "fastapi" in os.environ.get("BOSH_TEST_REQUIRE", "").split(","):
    raise RuntimeError("BOSH_TEST_REQUIRE=fastapi but FastAPI is not installed")


WEB_PASSWORD = "web-secret"
NAVIGATION = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8", "Sec-Fetch-Dest": "document"}


# ------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------


class SessionBackend(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        name = conn.session.get("user")
        return (AuthCredentials(["authenticated"]), SimpleUser(name)) if name else None


def routes(html_file: Path, script_base: str | None) -> list[Route]:
    async def login(request: Request) -> Response:
        if request.method == "POST":
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            known = form.get("username") in request.app.state.accounts
            if known and form.get("password") == WEB_PASSWORD:
                request.session["user"] = form["username"]
                return RedirectResponse("/", status_code=303)
        return HTMLResponse(
            page(
                "login",
                "<form method='post'><input name='username'>"
                "<input name='password' type='password'>"
                "<button type='submit'>log in</button></form>",
            )
        )

    async def index(request: Request) -> Response:
        return HTMLResponse(page("home", script_base=script_base))

    async def nonce(request: Request) -> Response:
        request.state.csp_nonce = "state-nonce"
        return HTMLResponse(page("nonce"))

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for chunk in (
                b"<!doctype html><html><head><title>streamed</title></he",
                b"ad><body>",
                b"streamed</body></html>",
            ):
                yield chunk

        return StreamingResponse(chunks(), media_type="text/html; charset=utf-8")

    async def file(request: Request) -> Response:
        return FileResponse(html_file)

    async def api(request: Request) -> Response:
        return JSONResponse({"items": [1, 2, 3], "html": "<head></head>"})

    async def logout(request: Request) -> Response:
        # scope["user"] was read before this view: only the view knows the user left
        request.session.clear()
        if "quiet" not in request.query_params:
            no_prebind(request)
        return HTMLResponse(page("logged out"))

    return [
        Route("/login", login, methods=["GET", "POST"]),
        Route("/", index),
        Route("/nonce", nonce),
        Route("/stream", stream),
        Route("/file.html", file),
        Route("/api", api),
        Route("/logout", logout),
    ]


class _PassOn(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def make_app(
    accounts: dict[str, tuple[str, str]],
    service_url: str | None,
    *,
    tmp_path: Path,
    order: str = "add_middleware",
    fastapi: bool = False,
    script_base: str | None = None,
    inner: bool = False,
    **settings: Any,
) -> Any:
    """``service_url=None``: the same app without bosh-middleware.

    ``inner``: a ``BaseHTTPMiddleware`` added before ours (so inside it), as an app's own
    ``@app.middleware("http")`` often is.

    ``order``: "add_middleware" (documented: ours first, then authentication, then sessions),
    "list" (``middleware=[Session, Auth, ours]``), "wrong" (ours added last: outermost)."""
    html_file = tmp_path / "file.html"
    html_file.write_text(page("file"), encoding="utf-8")
    app_routes = routes(html_file, script_base)
    bosh = {"service_url": service_url, "credentials": StaticCredentials(accounts), **settings}
    auth = [
        Middleware(SessionMiddleware, secret_key="test"),
        Middleware(AuthenticationMiddleware, backend=SessionBackend()),
    ]
    if fastapi:
        from fastapi import FastAPI

        app = FastAPI(routes=app_routes)

        @app.get("/fastapi", response_class=HTMLResponse)
        async def fastapi_page() -> str:
            return page("fastapi")

    elif order == "list" and service_url:
        ours_last = Middleware(BOSHPrebindMiddleware, **bosh)
        app = Starlette(routes=app_routes, middleware=[*auth, ours_last])
    else:
        app = Starlette(routes=app_routes)
    if inner:
        app.add_middleware(_PassOn)
    if order == "add_middleware" and service_url:
        app.add_middleware(BOSHPrebindMiddleware, **bosh)  # the documented one line
    if order != "list" or fastapi or not service_url:
        for mw in reversed(auth):
            app.add_middleware(mw.cls, *mw.args, **mw.kwargs)
    if order == "wrong" and service_url:
        app.add_middleware(BOSHPrebindMiddleware, **bosh)
    app.state.accounts = accounts
    return app


def ours(app: Any) -> asgi.BOSHPrebindMiddleware | None:
    node = app.middleware_stack
    while node is not None:
        if isinstance(node, asgi.BOSHPrebindMiddleware):
            return node
        node = getattr(node, "app", None)
    return None


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------


@pytest.fixture
def account(prosody: XMPPServer) -> tuple[str, str]:
    return prosody.new_user()


class Clients:
    """``await clients(login=True, **make_app kwargs) -> httpx.AsyncClient`` on a fresh app."""

    def __init__(self, prosody: XMPPServer, account: tuple[str, str], tmp_path: Path) -> None:
        self.prosody, self.account, self.tmp_path = prosody, account, tmp_path
        self.made: list[tuple[Any, httpx.AsyncClient]] = []

    async def __call__(self, login: bool = True, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("service_url", self.prosody.service_url)
        app = make_app({"alice": self.account}, tmp_path=self.tmp_path, **kwargs)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        self.made.append((app, client))
        if login:
            r = await client.post(
                "/login",
                content=f"username=alice&password={WEB_PASSWORD}",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert r.status_code == 303, r.text
        return client

    async def aclose(self) -> None:
        for app, client in self.made:
            await client.aclose()
            mw = ours(app) if app.middleware_stack is not None else None
            if mw is not None:
                await aclose_core(mw.core)


@pytest.fixture
def clients(prosody: XMPPServer, account: tuple[str, str], tmp_path: Path) -> Clients:
    """Used by ``@own_loop`` tests, which close it on their loop."""
    return Clients(prosody, account, tmp_path)


def assert_prebound(r: httpx.Response, service_url: str) -> dict[str, Any]:
    assert r.status_code == 200
    session = page_session(r.text)
    assert_live(service_url, session)
    assert r.headers["cache-control"] == "private, no-store"
    assert "cookie" in r.headers["vary"].lower()
    return session


def same(a: httpx.Response, b: httpx.Response) -> bool:
    skip = {"set-cookie"}
    return (a.status_code, a.content, [h for h in a.headers.multi_items() if h[0] not in skip]) == (
        b.status_code,
        b.content,
        [h for h in b.headers.multi_items() if h[0] not in skip],
    )


# ------------------------------------------------------------------------------------------
# pages
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["add_middleware", "list"])
@pytest.mark.parametrize("headers", [NAVIGATION, {}], ids=["navigation", "no-accept"])
@own_loop
async def test_logged_in_page_gets_a_live_session(clients, prosody, account, order, headers):
    client = await clients(order=order)
    r = await client.get("/", headers=headers)
    session = assert_prebound(r, prosody.service_url)
    assert session["BOSH_JID"].startswith(account[0] + "/") and session["nonce"] is None
    assert int(r.headers["content-length"]) == len(r.content)
    assert "İstanbul" in r.text


@own_loop
async def test_anonymous_page_is_untouched(clients) -> None:
    with_bosh = await (await clients(login=False)).get("/", headers=NAVIGATION)
    bare = await (await clients(login=False, service_url=None)).get("/", headers=NAVIGATION)
    assert same(with_bosh, bare) and b"BOSH_" not in with_bosh.content


@own_loop
async def test_a_logout_page_that_says_no_prebind_carries_no_session(clients, prosody) -> None:
    """The user was read before the view logged them out: without ``no_prebind`` the page
    would carry a live session of the user who just left (``?quiet``, the contrast)."""
    client = await clients()
    mw = ours(clients.made[-1][0])
    assert mw is not None
    spy = PrebindSpy.on(mw.core, sync=False)
    bare = await clients(login=False, service_url=None)
    r = await client.get("/logout", headers=NAVIGATION)
    assert same(r, await bare.get("/logout", headers=NAVIGATION)) and b"BOSH_" not in r.content
    assert await spy.await_terminated(1, timeout=2.0)
    (session,) = spy.sessions
    assert spy.terminated == [session]
    assert is_dead(prosody.service_url, session)
    assert b"BOSH_" not in (await client.get("/", headers=NAVIGATION)).content  # logged out
    quiet = await (await clients()).get("/logout?quiet", headers=NAVIGATION)
    assert_prebound(quiet, prosody.service_url)  # what no_prebind is for


@pytest.mark.parametrize("headers", [NAVIGATION, {}], ids=["navigation", "says-nothing"])
@own_loop
async def test_wrong_order_still_prebinds_and_says_why(clients, prosody, caplog, headers) -> None:
    """The README's one line in an app that lists its middleware in ``Starlette(middleware=
    [...])``: ``add_middleware`` puts ours outside ``AuthenticationMiddleware``. The user it
    sets in the scope is read once the response starts: the page still carries a live
    session (started after the view, not next to it), and the log says why, once."""
    client = await clients(order="wrong")
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        r = await client.get("/", headers=headers)
        second = await client.get("/", headers=headers)
    assert_prebound(r, prosody.service_url)
    assert page_session(second.text)["BOSH_SID"] != page_session(r.text)["BOSH_SID"]
    why = [rec for rec in caplog.records if "AuthenticationMiddleware is inside" in rec.message]
    assert len(why) == 1
    # what is left untouched still is: an anonymous visitor's page, a fetch(), the endpoint
    anonymous = await (await clients(order="wrong", login=False)).get("/", headers=headers)
    assert anonymous.status_code == 200 and b"BOSH_" not in anonymous.content
    fetched = await client.get("/", headers={"Sec-Fetch-Dest": "empty", "Accept": "*/*"})
    assert b"BOSH_" not in fetched.content
    assert (
        await client.get("/bosh/prebind", headers={"Accept": "application/json"})
    ).status_code == 401


@own_loop
async def test_streamed_page_is_injected_without_content_length(clients, prosody) -> None:
    r = await (await clients()).get("/stream", headers=NAVIGATION)
    assert "content-length" not in r.headers
    assert_prebound(r, prosody.service_url)
    assert r.text.endswith("<body>streamed</body></html>")


@pytest.mark.parametrize("path", ["/stream", "/file.html"])
@own_loop
async def test_streamed_pages_behind_an_inner_base_http_middleware(clients, prosody, path):
    """Behind a ``BaseHTTPMiddleware``, Starlette's streamed responses listen for the
    disconnect while their start waits for the session: the page still gets it (the wait
    once raised ``CancelledError`` into the app there, and the session was left live)."""
    client = await clients(inner=True)
    r = await client.get(path, headers=NAVIGATION)
    assert_prebound(r, prosody.service_url)
    assert r.text.rstrip().endswith("</html>")


@own_loop
async def test_file_response(clients, prosody) -> None:
    client = await clients()
    bare = await (await clients(service_url=None)).get("/file.html", headers=NAVIGATION)
    r = await client.get("/file.html", headers=NAVIGATION)
    assert_prebound(r, prosody.service_url)
    assert int(r.headers["content-length"]) == len(r.content) > len(bare.content)
    assert "etag" in bare.headers and "etag" not in r.headers
    assert "last-modified" in bare.headers and "last-modified" not in r.headers
    # ranges of the file are none of the page's (a resumed download would splice the two)
    assert bare.headers["accept-ranges"] == "bytes" and r.headers["accept-ranges"] == "none"
    ranged = await client.get("/file.html", headers={**NAVIGATION, "Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == bare.content[:10]


@pytest.mark.parametrize("kind", list(REQUEST_KINDS))
@own_loop
async def test_html_view_gets_a_session_only_when_navigated_to(clients, prosody, account, kind):
    """A script's request for HTML gets it untouched and costs no session: nothing would attach
    to one, and it would be left on the server as an orphan."""
    looked_up = CountingCredentials(StaticCredentials({"alice": account}))
    client = await clients(credentials=looked_up)
    mw = ours(clients.made[-1][0])
    assert mw is not None
    spy = PrebindSpy.on(mw.core, sync=False)
    bare = await clients(service_url=None)
    r = await client.get("/", headers=REQUEST_KINDS[kind])
    if kind == "navigation":
        assert_prebound(r, prosody.service_url)
        assert len(spy.calls) == 1 and len(looked_up.calls) == 1
    else:
        assert same(r, await bare.get("/", headers=REQUEST_KINDS[kind]))
        assert "cache-control" not in r.headers
        assert spy.calls == [] and looked_up.calls == []


@pytest.mark.parametrize("kind", ["navigation", *SAYS_NOTHING])
@own_loop
async def test_navigation_only_leaves_requests_that_say_nothing_alone(
    clients, prosody, account, kind
):
    """``navigation_only=True``: a request that does not say it loads a page (a script, curl,
    the test client's ``Accept: */*``) gets the page untouched, with no prebind and no lookup."""
    looked_up = CountingCredentials(StaticCredentials({"alice": account}))
    client = await clients(credentials=looked_up, navigation_only=True)
    mw = ours(clients.made[-1][0])
    assert mw is not None
    spy = PrebindSpy.on(mw.core, sync=False)
    bare = await clients(service_url=None)
    headers = {**REQUEST_KINDS, **SAYS_NOTHING}[kind]
    r = await client.get("/", headers=headers)
    if kind == "navigation":
        assert_prebound(r, prosody.service_url)
        assert len(spy.calls) == 1 and len(looked_up.calls) == 1
    else:
        assert same(r, await bare.get("/", headers=headers))
        assert "cache-control" not in r.headers
        assert spy.calls == [] and looked_up.calls == []


@own_loop
async def test_json_and_head_pass_through_untouched(clients) -> None:
    client = await clients()
    bare = await clients(service_url=None)
    for method, path in (("GET", "/api"), ("HEAD", "/"), ("HEAD", "/file.html")):
        r = await client.request(method, path, headers=NAVIGATION)
        assert same(r, await bare.request(method, path, headers=NAVIGATION)), (method, path)
        assert "cache-control" not in r.headers


@own_loop
async def test_csp_nonce_from_request_state(clients, prosody) -> None:
    r = await (await clients()).get("/nonce", headers=NAVIGATION)
    assert assert_prebound(r, prosody.service_url)["nonce"] == "state-nonce"


@own_loop
async def test_endpoint(clients, prosody, account) -> None:
    # converse.js fetches it: not a page, and answered all the same
    xhr = {"Accept": "application/json", "Sec-Fetch-Dest": "empty", "X-Requested-With": "XHR"}
    r = await (await clients()).get("/bosh/prebind", headers=xhr)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["jid"].startswith(account[0] + "/")
    assert_live(prosody.service_url, r.json())
    anonymous = await (await clients(login=False)).get("/bosh/prebind")
    assert anonymous.status_code == 401 and anonymous.json() == {"error": "not authenticated"}


@own_loop
async def test_an_app_mounted_below_a_path(prosody, account, tmp_path) -> None:
    """Starlette's ``Mount`` keeps the mount point in ``scope["path"]``: the endpoint and
    ``exclude_paths`` are below it, as the app's own routes are."""
    inner = make_app(
        {"alice": account}, prosody.service_url, tmp_path=tmp_path, exclude_paths=("/file.html",)
    )
    outer = Starlette(routes=[Mount("/chat", app=inner)])
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://x")
    try:
        login = await client.post(
            "/chat/login",
            content=f"username=alice&password={WEB_PASSWORD}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert login.status_code == 303, login.text
        assert_prebound(await client.get("/chat/", headers=NAVIGATION), prosody.service_url)
        endpoint = await client.get("/chat/bosh/prebind", headers={"Accept": "application/json"})
        assert endpoint.status_code == 200
        assert_live(prosody.service_url, endpoint.json())
        excluded = await client.get("/chat/file.html", headers=NAVIGATION)
        assert excluded.status_code == 200 and "BOSH_SID" not in excluded.text
        assert "no-store" not in excluded.headers.get("cache-control", "")
    finally:
        await client.aclose()
        mw = ours(inner)
        assert mw is not None
        await aclose_core(mw.core)


if HAVE_FASTAPI:  # collected only where FastAPI is installed (see HAVE_FASTAPI)

    @own_loop
    async def test_fastapi(clients, prosody) -> None:
        client = await clients(fastapi=True)
        r = await client.get("/fastapi", headers=NAVIGATION)
        assert_prebound(r, prosody.service_url)
        assert int(r.headers["content-length"]) == len(r.content)
        assert (await client.get("/api")).json()["items"] == [1, 2, 3]


# ------------------------------------------------------------------------------------------
# real browser, uvicorn
# ------------------------------------------------------------------------------------------


@pytest.fixture
def uvicorn_app() -> Iterator[Any]:
    """``serve(app) -> base URL``: uvicorn in a thread, with lifespan; stopped at test end."""
    with contextlib.ExitStack() as stack:
        yield lambda app: stack.enter_context(serve("uvicorn", app))


@pytest.mark.browser
@pytest.mark.parametrize(
    "fastapi",
    [False, *([True] if HAVE_FASTAPI else [])],
    ids=["starlette", *(["fastapi"] if HAVE_FASTAPI else [])],
)
def test_browser_login_attach_and_chat(
    browser, static_server, prosody, account, tmp_path, uvicorn_app, fastapi
) -> None:
    peer_jid, peer_pw = prosody.new_user()
    app = make_app(
        {"alice": account},
        prosody.service_url,
        tmp_path=tmp_path,
        fastapi=fastapi,
        script_base=static_server.base_url,
        public_service_url=prosody.service_url,
    )
    base = uvicorn_app(app)
    state = browser_login_attach_and_chat(
        browser,
        static_server,
        login_url=base + "/login",
        page_url=base + "/",
        username="alice",
        password=WEB_PASSWORD,
        service_url=prosody.service_url,
        peer_jid=peer_jid,
        peer_password=peer_pw,
    )
    assert state["jid"].startswith(account[0] + "/")
