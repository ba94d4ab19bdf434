"""The Flask extension (bosh_middleware.flask) with Flask-Login, against a real Prosody.

Every injected session is proven live with one BOSH request sent by hand (roster get with
``rid=BOSH_RID``; see flask_app.checks); the browser test attaches with Strophe in Chromium.
"""

from __future__ import annotations

import datetime
import gzip
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import lxml.etree
import pytest
from flask import Flask, Response, request
from flask.testing import FlaskClient
from flask_login import login_user
from werkzeug.serving import make_server

from bosh_middleware import StaticCredentials
from bosh_middleware.flask import BOSHPrebind
from flask_app.app import WEB_PASSWORD, User, create_app
from flask_app.checks import (
    assert_live,
    browser_login_attach_and_chat,
    close_core,
    in_own_thread,
    page,
    page_session,
)
from support.bosh_check import (
    FETCH_METADATA,
    REQUEST_KINDS,
    SAYS_NOTHING,
    CountingCredentials,
    PrebindSpy,
    is_dead,
)
from support.xmpp_servers import XMPPServer

NAVIGATION = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8", "Sec-Fetch-Dest": "document"}


@pytest.fixture
def account(prosody: XMPPServer) -> tuple[str, str]:
    return prosody.new_user()


@pytest.fixture
def make_app(prosody: XMPPServer, account: tuple[str, str]) -> Iterator[Any]:
    apps: list[Flask] = []

    def make(**kwargs: Any) -> Flask:
        kwargs.setdefault("service_url", prosody.service_url)
        app = create_app({"alice": account}, **kwargs)
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_core(app.extensions["bosh_prebind"].core)


@pytest.fixture
def app(make_app: Any) -> Flask:
    return make_app()


XHTML = (
    b'<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">'
    b'<head><title>x</title><script src="/static/a.js"/></head><body><p>x</p></body></html>'
)


def logged_in(app: Flask, user: str = "alice") -> FlaskClient:
    client = app.test_client()
    r = client.post("/login", data={"username": user, "password": WEB_PASSWORD})
    assert r.status_code == 302, r.data
    return client


def assert_prebound(r: Any, service_url: str) -> dict[str, Any]:
    assert r.status_code == 200
    session = page_session(r.get_data(as_text=True))
    assert_live(service_url, session)
    assert r.headers["Cache-Control"] == "private, no-store"
    assert "cookie" in r.headers["Vary"].lower()
    return session


# ------------------------------------------------------------------------------------------
# pages
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [NAVIGATION, {}], ids=["navigation", "no-accept"])
def test_logged_in_page_gets_a_live_session(app, prosody, account, headers) -> None:
    """A navigation starts the prebind in before_request; without Accept it starts once the
    response is known to be HTML. Either way: one script, exact Content-Length."""
    r = logged_in(app).get("/", headers=headers)
    session = assert_prebound(r, prosody.service_url)
    assert session["BOSH_JID"].startswith(account[0] + "/")
    assert session["nonce"] is None
    assert int(r.headers["Content-Length"]) == len(r.data)
    assert "İstanbul" in r.get_data(as_text=True)


def test_xhtml_page_with_a_script_that_closes_itself(make_app, prosody) -> None:
    """Read by browsers as XML: ``<script src=.../>`` is a whole element, and the session goes
    before the ``</head>`` after it (HTML's rules found the page ending inside its text)."""
    app = make_app()

    @app.route("/xhtml")
    def xhtml() -> Response:
        return Response(XHTML, content_type="application/xhtml+xml; charset=utf-8")

    r = logged_in(app).get("/xhtml", headers=NAVIGATION)
    head = lxml.etree.fromstring(r.data).find("{http://www.w3.org/1999/xhtml}head")
    assert head is not None and "BOSH_SID" in (head[-1].text or "")
    assert_prebound(r, prosody.service_url)


def test_anonymous_page_is_untouched(app) -> None:
    client = app.test_client()
    r = client.get("/", headers=NAVIGATION)
    assert r.status_code == 200 and b"BOSH_" not in r.data
    assert "Cache-Control" not in r.headers
    assert int(r.headers["Content-Length"]) == len(r.data)


def test_logged_out_by_the_view_gets_no_session(app) -> None:
    """before_request started a prebind for alice; the view logged her out: no session."""
    client = logged_in(app)
    r = client.get("/logout", headers=NAVIGATION)
    assert r.status_code == 200 and b"BOSH_" not in r.data and b"bye" in r.data
    assert client.get("/", headers=NAVIGATION).data.count(b"BOSH_SID") == 0


@pytest.mark.parametrize("headers", [NAVIGATION, {}], ids=["navigation", "no-accept"])
def test_logged_in_by_the_view_gets_a_live_session(make_app, prosody, account, headers) -> None:
    """An anonymous request whose view logs the user in: its page carries a session (the
    extension looks no further at an anonymous visitor's response, so this is what that
    must not skip)."""
    app = make_app()

    @app.route("/welcome")
    def welcome() -> str:
        login_user(User("alice"))
        return page("welcome")

    r = app.test_client().get("/welcome", headers=headers)
    session = assert_prebound(r, prosody.service_url)
    assert session["BOSH_JID"].startswith(account[0] + "/")


@pytest.mark.parametrize("headers", [NAVIGATION, {}], ids=["navigation", "no-accept"])
def test_a_page_whose_view_says_no_prebind_is_untouched(make_app, prosody, headers) -> None:
    """A navigation's prebind started in before_request is ended unused; a request that did
    not say what it wants starts none."""
    app = make_app()
    spy = PrebindSpy.on(app.extensions["bosh_prebind"].core, sync=True)
    r = logged_in(app).get("/no-session", headers=headers)
    assert r.status_code == 200 and b"BOSH_" not in r.data and b"no session" in r.data
    assert "Cache-Control" not in r.headers
    assert int(r.headers["Content-Length"]) == len(r.data)
    if headers:
        assert spy.wait_terminated(1, timeout=2.0)
        (session,) = spy.sessions
        assert spy.terminated == [session] and is_dead(prosody.service_url, session)
    else:
        assert spy.calls == []


def test_streamed_page_is_injected_without_content_length(app, prosody) -> None:
    r = logged_in(app).get("/stream", headers=NAVIGATION)
    assert "Content-Length" not in r.headers
    assert_prebound(r, prosody.service_url)
    assert r.get_data(as_text=True).endswith("<body>streamed</body></html>")
    assert "<title>streamed /stream</title>" in r.get_data(as_text=True)


def test_async_view(app, prosody) -> None:
    """Flask runs it with asgiref's async_to_sync: in a thread of its own, as a browser test may
    have left Playwright's loop running in this one (see flask_app.checks.in_own_thread)."""
    r = in_own_thread(logged_in(app).get, "/async", headers=NAVIGATION)
    assert_prebound(r, prosody.service_url)
    assert int(r.headers["Content-Length"]) == len(r.data)


@pytest.mark.parametrize("where,nonce", [("g", "g-nonce"), ("request", "talisman-nonce")])
def test_csp_nonce_from_g_or_request(app, prosody, where, nonce) -> None:
    r = logged_in(app).get(f"/nonce?where={where}", headers=NAVIGATION)
    assert assert_prebound(r, prosody.service_url)["nonce"] == nonce


@pytest.mark.parametrize("kind", list(REQUEST_KINDS))
def test_html_view_gets_a_session_only_when_navigated_to(make_app, prosody, account, kind) -> None:
    """A script's request for HTML gets it untouched and costs no session: nothing would attach
    to one, and it would be left on the server as an orphan."""
    looked_up = CountingCredentials(StaticCredentials({"alice": account}))
    app = make_app(credentials=looked_up)
    spy = PrebindSpy.on(app.extensions["bosh_prebind"].core, sync=True)
    client = logged_in(app)
    r = client.get("/", headers=REQUEST_KINDS[kind])
    if kind == "navigation":
        assert_prebound(r, prosody.service_url)
        assert len(spy.calls) == 1 and len(looked_up.calls) == 1
    else:
        assert r.status_code == 200
        assert r.data == page("home").encode()
        assert int(r.headers["Content-Length"]) == len(r.data)
        assert "Cache-Control" not in r.headers
        assert spy.calls == [] and looked_up.calls == []


@pytest.mark.parametrize("kind", ["navigation", *SAYS_NOTHING])
def test_navigation_only_leaves_requests_that_say_nothing_alone(
    make_app, prosody, account, kind
) -> None:
    """``BOSH_NAVIGATION_ONLY``: a request that does not say it loads a page (a script, curl,
    the test client's default) gets the page untouched, with no prebind and no lookup."""
    looked_up = CountingCredentials(StaticCredentials({"alice": account}))
    app = make_app(credentials=looked_up, navigation_only=True)
    spy = PrebindSpy.on(app.extensions["bosh_prebind"].core, sync=True)
    r = logged_in(app).get("/", headers={**REQUEST_KINDS, **SAYS_NOTHING}[kind])
    if kind == "navigation":
        assert_prebound(r, prosody.service_url)
        assert len(spy.calls) == 1 and len(looked_up.calls) == 1
    else:
        assert r.status_code == 200 and r.data == page("home").encode()
        assert "Cache-Control" not in r.headers
        assert spy.calls == [] and looked_up.calls == []


def test_paths_the_middleware_lets_by_start_no_prebind(make_app, prosody, account) -> None:
    """The hooks go by what the WSGI middleware in front of the app found: a page under an
    excluded path, or the endpoint, asked for as a navigation, starts no page prebind (the
    endpoint's own answer is its one prebind), and the page is served as the view made it."""
    looked_up = CountingCredentials(StaticCredentials({"alice": account}))
    app = make_app(credentials=looked_up, exclude_paths=("/nonce",))
    spy = PrebindSpy.on(app.extensions["bosh_prebind"].core, sync=True)
    client = logged_in(app)
    r = client.get("/nonce", headers=NAVIGATION)
    assert r.status_code == 200 and "BOSH_SID" not in r.get_data(as_text=True)
    assert "Cache-Control" not in r.headers
    assert spy.calls == [] and looked_up.calls == []
    r = client.get("/bosh/prebind", headers=NAVIGATION)
    assert r.status_code == 200 and set(r.json) == {"jid", "sid", "rid"}
    assert len(spy.calls) == 1 and len(looked_up.calls) == 1
    assert_live(prosody.service_url, r.json)
    assert_prebound(client.get("/", headers=NAVIGATION), prosody.service_url)  # (the rest: as ever)


@pytest.mark.parametrize("headers", [{}, NAVIGATION], ids=["says-nothing", "navigation"])
def test_a_page_compressed_inside_the_extension_is_reported_once(
    make_app, account, headers, caplog: pytest.LogCaptureFixture
) -> None:
    """A page compressed by something between the extension and the view goes out untouched,
    and the order mistake is logged once. A request that said nothing costs no prebind; a
    navigation's, started next to the view, is ended unused."""
    looked_up = CountingCredentials(StaticCredentials({"alice": account}))
    app = make_app(credentials=looked_up)
    spy = PrebindSpy.on(app.extensions["bosh_prebind"].core, sync=True)
    body = gzip.compress(page("home").encode())

    @app.route("/gz")
    def gz() -> Response:
        return Response(body, content_type="text/html", headers={"Content-Encoding": "gzip"})

    client = logged_in(app)
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        for _ in range(3):
            r = client.get("/gz", headers=headers)
            assert r.status_code == 200 and r.data == body
            assert "Cache-Control" not in r.headers
    [record] = [r for r in caplog.records if "compressed" in r.getMessage()]
    assert "Content-Encoding: gzip" in record.getMessage()
    if not headers:
        assert spy.calls == [] and looked_up.calls == []
        return
    assert len(spy.calls) == 3
    for _ in range(50):  # (each ended once it exists)
        if len(spy.terminated) == 3:
            break
        time.sleep(0.1)
    assert len(spy.terminated) == len(spy.sessions) == 3


@pytest.mark.parametrize(
    "validator",
    [{"If-None-Match": '"v1"'}, {"If-Modified-Since": "Wed, 01 Jan 2025 00:00:00 GMT"}],
)
def test_a_revalidated_copy_without_a_session_is_answered_in_full(
    make_app, prosody, validator
) -> None:
    """What a browser revalidates is a copy served without a session (the XMPP server was
    down, the user not yet logged in): a 304 (here ``make_conditional``'s) would show it
    again, sessionless, and lose the session made for it. A navigation being prebound
    reaches the view unconditional; one that is not stays conditional."""
    app = make_app()

    @app.route("/cached")
    def cached() -> Response:
        r = Response(page("cached"), content_type="text/html; charset=utf-8")
        r.set_etag("v1")
        r.last_modified = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
        return r.make_conditional(request)

    headers = {**NAVIGATION, **validator}
    assert app.test_client().get("/cached", headers=headers).status_code == 304
    assert (
        logged_in(app).get("/cached", headers={**SAYS_NOTHING["curl"], **validator}).status_code
        == 304
    )
    assert_prebound(logged_in(app).get("/cached", headers=headers), prosody.service_url)


def test_json_and_head_pass_through(app) -> None:
    client = logged_in(app)
    r = client.get("/api/data", headers=NAVIGATION)
    assert r.is_json and r.json["html"] == "<head></head>"
    assert "Cache-Control" not in r.headers
    head = client.head("/", headers=NAVIGATION)
    assert head.status_code == 200 and head.data == b"" and "Cache-Control" not in head.headers


@pytest.mark.parametrize("kind", [*SAYS_NOTHING])
def test_a_json_answer_to_a_request_that_says_nothing_asks_for_no_user(
    make_app, prosody, kind
) -> None:
    """Its answer is no page, so the user is not asked for (Flask-Login's would read the
    session, or a remember cookie and the database, for nothing). The same request for a
    page asks once, and gets its session."""
    app = make_app()
    state = app.extensions["bosh_prebind"]
    asked: list[Any] = []
    get_user = state.get_user
    state.get_user = lambda: asked.append(1) or get_user()
    client = logged_in(app)
    r = client.get("/api/data", headers=SAYS_NOTHING[kind])
    assert r.is_json and "Cache-Control" not in r.headers
    assert asked == []
    assert_prebound(client.get("/", headers=SAYS_NOTHING[kind]), prosody.service_url)
    assert asked == [1]


def test_a_request_that_is_no_page_passes_one_hook(make_app, monkeypatch) -> None:
    """Static files and ``fetch()`` calls, most of what an app serves, pass the extension's
    ``before_request`` hook only: the function that settles a page's credentials after the
    view is asked for, per request, by a request that may be a page, not registered for all."""
    import bosh_middleware.flask as extension

    app = make_app(exclude_paths=("/nonce",))
    assert not [
        f
        for funcs in app.after_request_funcs.values()
        for f in funcs
        if f.__module__ == extension.__name__
    ]
    asked: list[str] = []
    after_this_request = extension.after_this_request

    def spy(f: Any) -> Any:
        asked.append(request.path)
        return after_this_request(f)

    monkeypatch.setattr(extension, "after_this_request", spy)
    client = logged_in(app)
    asked.clear()
    assert client.get("/api/data", headers=REQUEST_KINDS["fetch"]).is_json
    assert client.get("/nonce", headers=NAVIGATION).status_code == 200  # (excluded)
    assert client.post("/", headers=NAVIGATION).status_code == 405
    assert asked == []
    assert client.get("/api/data", headers=NAVIGATION).is_json
    assert b"BOSH_SID" in client.get("/", headers=NAVIGATION).data
    assert asked == ["/api/data", "/"]


def test_a_page_an_earlier_before_request_hook_returns_is_served_as_it_is(prosody, account) -> None:
    """A hook registered ahead of the extension that answers the request itself (a
    maintenance page, say) keeps the extension's hook from running: the page goes out as the
    hook made it, and no prebind is started or left behind."""
    app = Flask(__name__)
    app.config.update(
        BOSH_SERVICE_URL=prosody.service_url, BOSH_CREDENTIALS=StaticCredentials({"alice": account})
    )

    @app.before_request
    def maintenance() -> str | None:
        return page("maintenance") if request.path == "/maintenance" else None

    BOSHPrebind(app, get_user=lambda: _MadeAnew("alice"))
    app.add_url_rule("/", "home", lambda: page("home"))
    core = app.extensions["bosh_prebind"].core
    spy = PrebindSpy.on(core, sync=True)
    try:
        client = app.test_client()
        r = client.get("/maintenance", headers=NAVIGATION)
        assert r.status_code == 200 and r.data == page("maintenance").encode()
        assert "Cache-Control" not in r.headers
        assert spy.calls == []
        assert_prebound(client.get("/", headers=NAVIGATION), prosody.service_url)
    finally:
        close_core(core)


def test_a_page_an_app_after_hook_replaces_with_a_download_is_not_read_whole(
    prosody, account
) -> None:
    """The extension's after function sees the view's page, in memory, and writes the session
    into it; an app ``after_request`` hook, which runs later, replaces it with a streamed
    download. That download goes out as it is made, chunk by chunk, not read into memory
    first, and as it was made: no session, no header of ours."""
    app = Flask(__name__)
    app.config.update(
        BOSH_SERVICE_URL=prosody.service_url, BOSH_CREDENTIALS=StaticCredentials({"alice": account})
    )
    BOSHPrebind(app, get_user=lambda: _MadeAnew("alice"))
    app.add_url_rule("/", "home", lambda: page("home"))
    pulled: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(3):
            pulled.append(i)
            yield b"%d" % i * 1000

    @app.after_request
    def as_download(response: Response) -> Response:
        return Response(chunks(), mimetype="application/octet-stream")

    core = app.extensions["bosh_prebind"].core
    spy = PrebindSpy.on(core, sync=True)
    started: list[tuple[str, list[tuple[str, str]]]] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
        "HTTP_ACCEPT": NAVIGATION["Accept"],
        "HTTP_SEC_FETCH_DEST": NAVIGATION["Sec-Fetch-Dest"],
    }
    try:
        result = app.wsgi_app(
            environ, lambda status, headers, *_: started.append((status, headers))
        )
        assert pulled == []  # handed over unread
        try:
            body = b"".join(result)
        finally:
            result.close()  # type: ignore[attr-defined]
        assert body == b"0" * 1000 + b"1" * 1000 + b"2" * 1000 and pulled == [0, 1, 2]
        assert started[0][0] == "200 OK"
        sent = dict(started[0][1])
        assert sent["Content-Type"] == "application/octet-stream"
        assert "Cache-Control" not in sent and "Content-Length" not in sent
        assert spy.wait_idle()
        assert len(spy.calls) == 1
    finally:
        close_core(core)


@pytest.mark.parametrize("order", ["compress-first", "compress-last"])
def test_a_page_flask_compress_compresses_carries_a_live_session(
    prosody, account, order, caplog: pytest.LogCaptureFixture
) -> None:
    """Flask-Compress compresses in an ``after_request`` hook; the extension writes the session
    in before any such hook runs, whichever of the two was set up first: the browser gets the
    page compressed, with the session in it."""
    from flask_compress import Compress

    app = Flask(__name__)
    app.config.update(
        BOSH_SERVICE_URL=prosody.service_url,
        BOSH_CREDENTIALS=StaticCredentials({"alice": account}),
        COMPRESS_ALGORITHM="gzip",
    )
    if order == "compress-first":
        Compress(app)
    BOSHPrebind(app, get_user=lambda: _MadeAnew("alice"))
    if order == "compress-last":
        Compress(app)
    app.add_url_rule("/", "home", lambda: page("home", "<p>compressible</p>" * 100))
    core = app.extensions["bosh_prebind"].core
    try:
        with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
            for headers in (NAVIGATION, {}):
                r = app.test_client().get("/", headers={**headers, "Accept-Encoding": "gzip"})
                assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip"
                html = gzip.decompress(r.data).decode()
                assert int(r.headers["Content-Length"]) == len(r.data)
                assert r.headers["Cache-Control"] == "private, no-store"
                assert "accept-encoding" in r.headers["Vary"].lower()
                session = page_session(html)
                assert session["BOSH_JID"].startswith(account[0] + "/")
                assert_live(prosody.service_url, session)
        assert not [r for r in caplog.records if "compressed" in r.getMessage()]
    finally:
        close_core(core)


@pytest.mark.parametrize("propagate", [True, False], ids=["propagated", "500"])
def test_a_view_that_fails_ends_the_prebind_started_next_to_it(prosody, account, propagate) -> None:
    """A navigation's prebind starts before the view; the view raises. With
    PROPAGATE_EXCEPTIONS (debug, testing) Flask runs no after function, and the exception
    reaches the server; otherwise the 500 page goes out without a session. Either way the
    session made for the page is ended, not left live at the XMPP server until it times out."""
    app = Flask(__name__)
    app.config.update(
        BOSH_SERVICE_URL=prosody.service_url,
        BOSH_CREDENTIALS=StaticCredentials({"alice": account}),
        PROPAGATE_EXCEPTIONS=propagate,
    )
    BOSHPrebind(app, get_user=lambda: _MadeAnew("alice"))

    def broken() -> str:
        raise RuntimeError("view failed")

    app.add_url_rule("/", "home", broken)
    core = app.extensions["bosh_prebind"].core
    spy = PrebindSpy.on(core, sync=True)
    try:
        client = app.test_client()
        if propagate:
            with pytest.raises(RuntimeError, match="view failed"):
                client.get("/", headers=NAVIGATION)
        else:
            r = client.get("/", headers=NAVIGATION)
            assert r.status_code == 500 and b"BOSH_" not in r.data
            assert "Cache-Control" not in r.headers
        for _ in range(50):  # (ended once it exists)
            if spy.terminated:
                break
            time.sleep(0.1)
        assert len(spy.calls) == 1 and spy.terminated == spy.sessions and len(spy.sessions) == 1
    finally:
        close_core(core)


def test_a_page_sent_from_a_file_is_streamed_with_the_session_and_the_file_closed(
    prosody, account, tmp_path
) -> None:
    """``send_file`` hands werkzeug a file to pass to the server as it is (``direct_passthrough``,
    ``wsgi.file_wrapper``): the page is read through the injector instead, without its
    Content-Length, and the file is closed when the response is."""
    from flask import send_file

    path = tmp_path / "index.html"
    path.write_text(page("from a file", "<p>x</p>" * 2000), encoding="utf-8")
    opened: list[Any] = []

    app = Flask(__name__)
    app.config.update(
        BOSH_SERVICE_URL=prosody.service_url,
        BOSH_CREDENTIALS=StaticCredentials({"alice": account}),
    )
    BOSHPrebind(app, get_user=lambda: _MadeAnew("alice"))

    def index() -> Response:
        f = path.open("rb")
        opened.append(f)
        return send_file(f, mimetype="text/html")

    app.add_url_rule("/", "home", index)
    core = app.extensions["bosh_prebind"].core
    try:
        r = app.test_client().get("/", headers=NAVIGATION)
        assert r.status_code == 200 and "Content-Length" not in r.headers
        assert r.headers["Cache-Control"] == "private, no-store"
        # (werkzeug 3's send_file offers byte ranges of the file, 2.3's none: never of the page)
        assert r.headers.getlist("Accept-Ranges") in ([], ["none"])
        html = r.get_data(as_text=True)
        assert html.count("BOSH_SID") == 1 and html.count("<p>x</p>") == 2000
        assert_live(prosody.service_url, page_session(html))
        r.close()
        assert opened and opened[0].closed
    finally:
        close_core(core)


# ------------------------------------------------------------------------------------------
# JSON endpoint (converse.js prebind_url)
# ------------------------------------------------------------------------------------------


def test_endpoint(app, prosody, account) -> None:
    # converse.js fetches it: not a page, and answered all the same
    xhr = {"Accept": "application/json", "Sec-Fetch-Dest": "empty", "X-Requested-With": "XHR"}
    r = logged_in(app).get("/bosh/prebind", headers=xhr)
    assert r.status_code == 200 and r.mimetype == "application/json"
    assert r.headers["Cache-Control"] == "private, no-store"
    assert set(r.json) == {"jid", "sid", "rid"} and r.json["jid"].startswith(account[0] + "/")
    assert_live(prosody.service_url, r.json)

    anonymous = app.test_client().get("/bosh/prebind")
    assert anonymous.status_code == 401 and anonymous.json == {"error": "not authenticated"}
    assert logged_in(app).head("/bosh/prebind").status_code == 405

    # another site's <img> or no-cors fetch, with the user's cookies, or an <img> in this
    # site's own content: nothing that could read a session, so none made
    for site, dest, refusal in FETCH_METADATA:
        if refusal is not None:
            headers = {"Sec-Fetch-Site": site, "Sec-Fetch-Dest": dest}
            foreign = logged_in(app).get("/bosh/prebind", headers=headers)
            assert foreign.status_code == 403 and foreign.json == {"error": refusal}


def test_endpoint_path_is_configurable_or_off(make_app) -> None:
    moved = make_app(endpoint_path="/xmpp/session")
    assert moved.test_client().get("/xmpp/session").status_code == 401
    assert moved.test_client().get("/bosh/prebind").status_code == 404
    off = make_app(endpoint_path=None)
    assert off.test_client().get("/bosh/prebind").status_code == 404


def test_pipelined_prebinds_are_all_live(make_app, prosody) -> None:
    """Pipelined restart + bind sometimes reach Prosody out of order (a few in a hundred); the
    engine must close the request Prosody then holds, or the browser's first answer is lost."""
    client = logged_in(make_app())
    for _ in range(50):
        r = client.get("/bosh/prebind")
        assert r.status_code == 200
        assert_live(prosody.service_url, r.json, timeout=2)


# ------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------


def test_init_app_pattern_and_dotted_credentials(make_app, prosody) -> None:
    app = make_app(factory=True, credentials="flask_app.app:credentials", mode="both")
    state = app.extensions["bosh_prebind"]
    assert state.core.config.mode == "both"
    assert app.config["BOSH_TIMEOUT"] == 3.0 and app.config["BOSH_ENDPOINT_PATH"] == "/bosh/prebind"
    r = logged_in(app).get("/", headers=NAVIGATION)
    session = assert_prebound(r, prosody.service_url)
    assert r.headers["X-BOSH-SID"] == session["BOSH_SID"]


def test_custom_get_user() -> None:
    seen: list[Any] = []
    app = Flask(__name__)
    app.config.update(
        BOSH_SERVICE_URL="http://127.0.0.1:9/http-bind",
        BOSH_CREDENTIALS=lambda user: seen.append(user),
    )
    BOSHPrebind(app, get_user=lambda: "bob")
    app.add_url_rule("/", "index", lambda: "<html><head></head></html>")
    r = app.test_client().get("/", headers=NAVIGATION)
    assert r.data == b"<html><head></head></html>" and seen == ["bob"]
    close_core(app.extensions["bosh_prebind"].core)


class _MadeAnew:
    """A user built for each ``get_user()`` call, without ``__eq__``: equal only to itself."""

    is_authenticated = True

    def __init__(self, username: str) -> None:
        self.username = username


def test_a_user_made_anew_for_each_call_costs_one_prebind(prosody, account) -> None:
    """The user read before and after the view differ as objects but are the same account:
    the prebind started before the view is used, not ended and made again after it."""
    app = Flask(__name__)
    app.config.update(
        BOSH_SERVICE_URL=prosody.service_url, BOSH_CREDENTIALS=StaticCredentials({"alice": account})
    )
    BOSHPrebind(app, get_user=lambda: _MadeAnew("alice"))
    app.add_url_rule("/", "home", lambda: page("home"))
    core = app.extensions["bosh_prebind"].core
    spy = PrebindSpy.on(core, sync=True)
    try:
        r = app.test_client().get("/", headers=NAVIGATION)
        session = assert_prebound(r, prosody.service_url)
        assert session["BOSH_JID"].startswith(account[0] + "/")
        assert spy.wait_idle()
        assert len(spy.calls) == 1 and spy.terminated == []
    finally:
        close_core(core)


def test_no_login_manager_means_no_user_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Flask(__name__)
    app.config.update(
        BOSH_SERVICE_URL="http://127.0.0.1:9/http-bind",
        BOSH_CREDENTIALS=lambda user: pytest.fail("no user, no credentials"),
    )
    BOSHPrebind(app)
    app.add_url_rule("/", "index", lambda: "<html><head></head></html>")
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        for _ in range(3):
            r = app.test_client().get("/", headers=NAVIGATION)
            assert r.data == b"<html><head></head></html>"
        assert app.test_client().get("/bosh/prebind").status_code == 401
    said = [r.getMessage() for r in caplog.records if "finds no user" in r.getMessage()]
    assert len(said) == 1 and "get_user=" in said[0] and "LoginManager" in said[0]
    close_core(app.extensions["bosh_prebind"].core)


def test_configuration_errors() -> None:
    with pytest.raises(RuntimeError, match="BOSH_SERVICE_URL"):
        BOSHPrebind(Flask(__name__))
    app = Flask(__name__)
    app.config.update(BOSH_SERVICE_URL="http://x/", BOSH_CREDENTIALS=print, BOSH_TIMEOUT="3")
    with pytest.raises(TypeError, match=r"^BOSH_TIMEOUT must be"):  # named as it was written
        BOSHPrebind(app)
    app = Flask(__name__)
    app.config.update(BOSH_SERVICE_URL="http://x/", BOSH_CREDENTIALS=print)
    BOSHPrebind(app)
    with pytest.raises(RuntimeError, match="already"):
        BOSHPrebind(app)
    close_core(app.extensions["bosh_prebind"].core)


def test_other_bosh_keys_are_the_apps_own_and_a_likely_typo_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """app.config is the app's namespace too: BOSH_SHARED_SECRET (the name our own examples
    give the secret of SharedSecretCredentials) must not stop the extension, while a key one
    letter off a setting says so in the log, naming the setting it looks like."""
    app = Flask(__name__)
    app.config.update(
        BOSH_SERVICE_URL="http://x/",
        BOSH_CREDENTIALS=print,
        BOSH_SHARED_SECRET="s3cret",
        BOSH_TIMOUT=1,
    )
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        BOSHPrebind(app)
    core = app.extensions["bosh_prebind"].core
    try:
        assert core.config.timeout == 3.0  # the misspelt key did nothing
        [record] = caplog.records
        message = record.getMessage()
        assert "'BOSH_TIMOUT'" in message and "did you mean BOSH_TIMEOUT?" in message
        assert "s3cret" not in caplog.text and "SHARED_SECRET" not in caplog.text
    finally:
        close_core(core)


@pytest.mark.parametrize(
    ("key", "meant"),
    [("BOSH_ENABLE", "BOSH_ENABLED"), ("BOSH_NONCE_ATTRIBUTES", "BOSH_NONCE_ATTRIBUTE")],
)
def test_a_likely_typo_of_the_extensions_own_keys_is_logged_too(
    key: str, meant: str, caplog: pytest.LogCaptureFixture
) -> None:
    """BOSH_ENABLED and BOSH_NONCE_ATTRIBUTE are settings as the README lists them: a
    BOSH_ENABLE = False meant to turn the extension off left it on without a word (and a
    misspelt nonce attribute left every page's script to the CSP to block)."""
    app = Flask(__name__)
    app.config.update({"BOSH_SERVICE_URL": "http://x/", "BOSH_CREDENTIALS": print, key: False})
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        BOSHPrebind(app)
    try:
        [record] = caplog.records
        assert f"'{key}'" in record.getMessage()
        assert f"did you mean {meant}?" in record.getMessage()
    finally:
        close_core(app.extensions["bosh_prebind"].core)


def test_a_nonce_attribute_that_is_no_name_is_refused_when_the_app_is_set_up() -> None:
    """BOSH_NONCE_ATTRIBUTE = None (no CSP, say) was taken, and every prebound page of a
    logged-in user failed with a 500: its after_request hook asked getattr(request, None)."""
    app = Flask(__name__)
    app.config.update(BOSH_SERVICE_URL="http://x/", BOSH_CREDENTIALS=print)
    app.config.update(BOSH_NONCE_ATTRIBUTE=None)
    with pytest.raises(TypeError, match=r"^BOSH_NONCE_ATTRIBUTE must be a str, not NoneType"):
        BOSHPrebind(app)
    assert "bosh_prebind" not in app.extensions


def test_enabled_false_leaves_the_app_alone() -> None:
    app = Flask(__name__)
    app.config.update(BOSH_ENABLED=False)  # nor even the required settings
    BOSHPrebind(app)
    assert "bosh_prebind" not in app.extensions
    assert not app.before_request_funcs and not app.after_request_funcs
    app.config.update(BOSH_ENABLED="False")
    with pytest.raises(TypeError, match="BOSH_ENABLED must be True or False"):
        BOSHPrebind(app)


def test_fails_open_when_the_server_is_down(make_app) -> None:
    app = make_app(service_url="http://127.0.0.1:9/http-bind", timeout=2)
    r = logged_in(app).get("/", headers=NAVIGATION)
    assert r.status_code == 200 and b"BOSH_" not in r.data and b"home" in r.data
    assert int(r.headers["Content-Length"]) == len(r.data)


# ------------------------------------------------------------------------------------------
# real browser, real threaded WSGI server
# ------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_login_attach_and_chat(browser, static_server, prosody, account) -> None:
    peer_jid, peer_pw = prosody.new_user()
    app = create_app(
        {"alice": account},
        prosody.service_url,
        script_base=static_server.base_url,
        public_service_url=prosody.service_url,
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
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
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        close_core(app.extensions["bosh_prebind"].core)
