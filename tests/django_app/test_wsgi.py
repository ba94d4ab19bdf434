"""The middleware in sync mode (Django's test Client: the WSGI handler) against a real Prosody."""

from __future__ import annotations

import re
from typing import Any

import django
import lxml.etree
import pytest
from django.test import AsyncClient, Client

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
from support.bosh_check import FETCH_METADATA, REQUEST_KINDS, SAYS_NOTHING, CountingCredentials
from support.xmpp_servers import XMPPServer

pytestmark = pytest.mark.django_db(transaction=True)


def logged_in(account: Account) -> Client:
    client = Client()
    client.force_login(account.user)
    return client


def test_page_gets_a_live_session(alice: Account, bosh: XMPPServer) -> None:
    r = logged_in(alice).get("/page/", headers=PAGE_HEADERS)
    assert r.status_code == 200
    found = injected(r.content)
    assert found.jid.split("/")[0] == alice.jid
    assert found.nonce is None
    assert int(r["Content-Length"]) == len(r.content)
    assert r["Cache-Control"] == "private, no-store"
    assert "cookie" in r["Vary"].lower()
    assert "Expires" not in r
    assert "ETag" not in r and "Last-Modified" not in r  # (each prebound page is new)
    assert "<p>Hello İ " in r.content.decode()  # the rest of the page as it was
    assert_live(bosh.service_url, found.sid, found.rid)


def test_xhtml_page_with_a_script_that_closes_itself(alice: Account, bosh: XMPPServer) -> None:
    """Read by browsers as XML: ``<script src=.../>`` is a whole element, and the session goes
    before the ``</head>`` after it (HTML's rules found the page ending inside its text)."""
    r = logged_in(alice).get("/xhtml/", headers=PAGE_HEADERS)
    found = injected(r.content)
    head = lxml.etree.fromstring(r.content).find("{http://www.w3.org/1999/xhtml}head")
    assert head is not None and "BOSH_SID" in (head[-1].text or "")
    assert_live(bosh.service_url, found.sid, found.rid)


@pytest.mark.parametrize("validator", views.VALIDATORS)
def test_a_revalidated_copy_without_a_session_is_answered_in_full(
    alice: Account, bosh: XMPPServer, validator: dict[str, str]
) -> None:
    """What a browser revalidates is a copy served without a session (the XMPP server was
    down, the user not yet logged in): a 304 (here ``@condition``'s) would show it again,
    sessionless, and lose the session made for it. A navigation being prebound reaches the
    view unconditional; one that is not stays conditional."""
    assert Client().get("/conditional/", headers={**PAGE_HEADERS, **validator}).status_code == 304
    r = logged_in(alice).get("/conditional/", headers={**PAGE_HEADERS, **validator})
    assert r.status_code == 200
    found = injected(r.content)
    assert_live(bosh.service_url, found.sid, found.rid)


def test_login_through_the_login_view(alice: Account, bosh: XMPPServer) -> None:
    client = Client(enforce_csrf_checks=True)
    form = client.get("/accounts/login/?next=/page/", headers=PAGE_HEADERS)
    assert b"BOSH_JID" not in form.content  # anonymous: untouched
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', form.content)
    assert token is not None
    r = client.post(
        "/accounts/login/",
        {
            "username": alice.username,
            "password": alice.password,
            "next": "/page/",
            "csrfmiddlewaretoken": token[1].decode(),
        },
    )
    assert r.status_code == 302 and r["Location"] == "/page/"
    page = client.get("/page/", headers=PAGE_HEADERS)
    found = injected(page.content)
    assert found.jid.split("/")[0] == alice.jid
    assert_live(bosh.service_url, found.sid, found.rid)


def test_anonymous_page_is_untouched(bosh: XMPPServer, cores: list[RecordingCore]) -> None:
    r = Client().get("/page/", headers=PAGE_HEADERS)
    assert r.content == views.page_text(r.wsgi_request).encode()
    assert int(r["Content-Length"]) == len(r.content)
    assert "Cache-Control" not in r and r["ETag"] == '"page-v1"' and "Expires" in r
    assert cores[0].started == []


def test_user_without_xmpp_account_is_untouched(nobody: Account) -> None:
    r = logged_in(nobody).get("/page/", headers=PAGE_HEADERS)
    assert b"BOSH_" not in r.content and "Cache-Control" not in r


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("get", "/json/", PAGE_HEADERS),
        ("get", "/download/", PAGE_HEADERS),
        ("head", "/page/", PAGE_HEADERS),
        ("get", "/not-modified/", PAGE_HEADERS),
        ("get", "/gzip/", {**PAGE_HEADERS, "Accept-Encoding": "gzip"}),
        ("get", "/fragment/", {"HX-Request": "true", "Accept": "text/html"}),
        ("get", "/page/", {**PAGE_HEADERS, "HX-Request": "true"}),
    ],
)
def test_responses_that_cannot_carry_a_session(
    alice: Account, method: str, path: str, headers: dict[str, str]
) -> None:
    r = getattr(logged_in(alice), method)(path, headers=headers)
    assert b"BOSH_" not in (b"".join(r.streaming_content) if r.streaming else r.content)
    assert r.get("Cache-Control") != "private, no-store"
    if path == "/gzip/":
        assert r["Content-Encoding"] == "gzip"


@pytest.mark.parametrize("kind", list(REQUEST_KINDS))
def test_html_view_gets_a_session_only_when_navigated_to(
    alice: Account, bosh: XMPPServer, settings: Any, cores: list[RecordingCore], kind: str
) -> None:
    """A script's request for HTML gets it untouched and costs no session: nothing would attach
    to one, and it would be left on the server as an orphan."""
    looked_up = CountingCredentials(accounts.credentials)
    settings.BOSH_PREBIND = {**settings.BOSH_PREBIND, "CREDENTIALS": looked_up}
    r = logged_in(alice).get("/page/", headers=REQUEST_KINDS[kind])
    assert_page_for_request_kind(r, kind, alice, bosh, cores, looked_up)


@pytest.mark.parametrize("kind", ["navigation", *SAYS_NOTHING])
def test_navigation_only_leaves_requests_that_say_nothing_alone(
    alice: Account, bosh: XMPPServer, settings: Any, cores: list[RecordingCore], kind: str
) -> None:
    """``NAVIGATION_ONLY``: a request that does not say it loads a page (a script, curl, the
    test client's default) gets the page untouched, with no prebind and no lookup."""
    looked_up = CountingCredentials(accounts.credentials)
    settings.BOSH_PREBIND = {
        **settings.BOSH_PREBIND,
        "CREDENTIALS": looked_up,
        "NAVIGATION_ONLY": True,
    }
    headers = {**REQUEST_KINDS, **SAYS_NOTHING}[kind]
    r = logged_in(alice).get("/page/", headers=headers)
    assert_page_for_request_kind(r, kind, alice, bosh, cores, looked_up)


def test_unused_session_is_terminated(
    alice: Account, bosh: XMPPServer, cores: list[RecordingCore]
) -> None:
    r = logged_in(alice).get("/json/", headers=PAGE_HEADERS)  # a navigation: prebind started
    assert r.json() == {"ok": True}
    [pending] = cores[0].pendings
    session = pending._future.result(timeout=10)
    cores[0].drain()  # waits for the termination
    assert_dead(bosh.service_url, session.sid, session.rid)


@pytest.mark.parametrize("path", ["/cut-off/", "/cut-off-stream/"])
def test_a_page_with_no_place_for_the_script_ends_its_session(
    alice: Account, bosh: XMPPServer, cores: list[RecordingCore], path: str
) -> None:
    """The page ends inside a comment: it goes out as the view made it, and the session
    prebound for it, which reached no one, is ended rather than left live."""
    r = logged_in(alice).get(path, headers=PAGE_HEADERS)
    assert (b"".join(r.streaming_content) if r.streaming else r.content) == views.CUT_OFF
    [pending] = cores[0].pendings
    session = pending._future.result(timeout=10)
    cores[0].drain()  # waits for the termination
    assert_dead(bosh.service_url, session.sid, session.rid)


@pytest.mark.parametrize("path", ["/cut-off/", "/cut-off-stream/"])
def test_both_mode_page_with_no_place_for_the_script_keeps_its_session(
    alice: Account, bosh: XMPPServer, cores: list[RecordingCore], settings: Any, path: str
) -> None:
    """In "both" mode the session went out in the headers: a body that cannot carry the
    snippet too does not make it undelivered (it was ended, under the client's feet)."""
    settings.BOSH_PREBIND = {**settings.BOSH_PREBIND, "MODE": "both"}
    r = logged_in(alice).get(path, headers=PAGE_HEADERS)
    assert (b"".join(r.streaming_content) if r.streaming else r.content) == views.CUT_OFF
    [pending] = cores[0].pendings
    session = pending._future.result(timeout=10)
    cores[0].drain()
    assert r["X-BOSH-SID"] == session.sid
    assert_live(bosh.service_url, session.sid, session.rid)


def test_a_stream_the_client_left_before_the_script_ends_its_session(
    alice: Account, bosh: XMPPServer, cores: list[RecordingCore]
) -> None:
    """The server closes a streamed page early (the client went away) before the chunk with
    the snippet: the session, which reached no one, is ended rather than left live."""
    r = logged_in(alice).get("/stream/", headers=PAGE_HEADERS)
    first = next(iter(r.streaming_content))
    assert first and b"BOSH_" not in first
    r.close()
    [pending] = cores[0].pendings
    session = pending._future.result(timeout=10)
    cores[0].drain()  # waits for the termination
    assert_dead(bosh.service_url, session.sid, session.rid)


@pytest.mark.parametrize(
    "validator",
    [
        {"If-None-Match": '"page-v1"'},
        {"If-None-Match": 'W/"page-v1"'},
        {"If-Modified-Since": views.PAGE_MODIFIED},
    ],
    ids=["etag", "weak-etag", "last-modified"],
)
def test_a_revalidated_page_gets_a_session_not_a_304(
    alice: Account, bosh: XMPPServer, settings: Any, validator: dict[str, str]
) -> None:
    """ConditionalGetMiddleware above ours, where Django's docs put it. A copy of the page
    cached without a session (served while the XMPP server was down, with the view's
    validators) is revalidated: it must get the page and a session, not a 304 that keeps the
    stale copy and loses the session made for it, live."""
    settings.MIDDLEWARE = ["django.middleware.http.ConditionalGetMiddleware", *settings.MIDDLEWARE]
    r = logged_in(alice).get("/page/", headers={**PAGE_HEADERS, **validator})
    assert r.status_code == 200
    found = injected(r.content)
    assert_live(bosh.service_url, found.sid, found.rid)


def test_a_page_compressed_below_the_middleware_is_reported_once(
    alice: Account, caplog: pytest.LogCaptureFixture
) -> None:
    """(@gzip_page, or GZipMiddleware listed below ours: the system check W003 that says so
    does not run under gunicorn or uvicorn.) Every such page goes out without a session."""
    client = logged_in(alice)
    with caplog.at_level("WARNING", logger="bosh_middleware"):
        for _ in range(2):
            r = client.get("/gzip/", headers={**PAGE_HEADERS, "Accept-Encoding": "gzip"})
            assert r["Content-Encoding"] == "gzip"
    assert len([m for m in caplog.messages if "compressed" in m]) == 1


@pytest.mark.parametrize("kind", ["navigation", *SAYS_NOTHING])
def test_an_anonymous_visitors_page_is_not_looked_at(
    alice: Account, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """An anonymous visitor's page whose view logs no one in, asked for by a browser or by a
    request that says nothing: the response is not looked at past its Content-Type (no
    session could be made for it), so its compression is not reported either; the first
    logged-in visit of the same page is."""
    asked = PAGE_HEADERS if kind == "navigation" else SAYS_NOTHING[kind]
    headers = {**asked, "Accept-Encoding": "gzip"}
    with caplog.at_level("WARNING", logger="bosh_middleware"):
        r = Client().get("/gzip/", headers=headers)
        assert r["Content-Encoding"] == "gzip"
        assert not [m for m in caplog.messages if "compressed" in m]
        logged_in(alice).get("/gzip/", headers=headers)
    assert len([m for m in caplog.messages if "compressed" in m]) == 1


@pytest.mark.parametrize("kind", ["navigation", *SAYS_NOTHING])
async def test_an_anonymous_visitors_page_is_not_looked_at_async(
    alice: Account, caplog: pytest.LogCaptureFixture, acores: list[RecordingCore], kind: str
) -> None:
    headers = PAGE_HEADERS if kind == "navigation" else SAYS_NOTHING[kind]
    with caplog.at_level("WARNING", logger="bosh_middleware"):
        r = await AsyncClient().get("/gzip/", headers={**headers, "Accept-Encoding": "gzip"})
        assert r["Content-Encoding"] == "gzip"
    assert not [m for m in caplog.messages if "compressed" in m]


def test_prebind_starts_before_the_view(alice: Account, cores: list[RecordingCore]) -> None:
    views.SLOW_STARTED.clear()
    r = logged_in(alice).get("/slow/", headers=PAGE_HEADERS)
    injected(r.content)
    assert cores[0].started[0] < views.SLOW_STARTED[0]


def test_html_answer_to_a_non_navigation_is_injected(
    alice: Account, bosh: XMPPServer, cores: list[RecordingCore]
) -> None:
    views.SLOW_STARTED.clear()
    r = logged_in(alice).get("/slow/", headers={"Accept": "*/*"})
    found = injected(r.content)
    assert cores[0].started[0] > views.SLOW_STARTED[0]  # only once the answer was HTML
    assert_live(bosh.service_url, found.sid, found.rid)


@pytest.mark.parametrize("path", ["/stream/", "/file/"])
def test_streamed_page(alice: Account, bosh: XMPPServer, path: str) -> None:
    r = logged_in(alice).get(path, headers=PAGE_HEADERS)
    assert r.streaming and not r.is_async
    found = injected(b"".join(r.streaming_content))
    assert "Content-Length" not in r
    assert r["Cache-Control"] == "private, no-store"
    assert_live(bosh.service_url, found.sid, found.rid)


def test_async_credentials_callable(alice: Account, bosh: XMPPServer, settings: Any) -> None:
    settings.BOSH_PREBIND = {
        **settings.BOSH_PREBIND,
        "CREDENTIALS": "django_app.accounts.acredentials",
    }
    found = injected(logged_in(alice).get("/page/", headers=PAGE_HEADERS).content)
    assert_live(bosh.service_url, found.sid, found.rid)


def test_headers_mode(alice: Account, bosh: XMPPServer, settings: Any) -> None:
    settings.BOSH_PREBIND = {**settings.BOSH_PREBIND, "MODE": "headers"}
    r = logged_in(alice).get("/page/", headers=PAGE_HEADERS)
    assert b"BOSH_" not in r.content and int(r["Content-Length"]) == len(r.content)
    assert r["X-BOSH-JID"].split("/")[0] == alice.jid
    assert r["Cache-Control"] == "private, no-store"
    assert_live(bosh.service_url, r["X-BOSH-SID"], int(r["X-BOSH-RID"]))


@pytest.mark.parametrize("mode", ["headers", "both"])
@pytest.mark.parametrize("after", [False, True], ids=["before-a-byte", "after-a-byte"])
def test_a_stream_that_fails_before_its_headers_went_out_ends_its_session(
    alice: Account,
    bosh: XMPPServer,
    cores: list[RecordingCore],
    settings: Any,
    mode: str,
    after: bool,
) -> None:
    """A WSGI server sends the headers with the first non-empty chunk: a streamed page that
    fails before one gets the server's error response instead, and the session in its
    headers reached no one (ended). After a byte, the headers went out: the session is kept."""
    settings.BOSH_PREBIND = {**settings.BOSH_PREBIND, "MODE": mode}
    r = logged_in(alice).get(f"/failing-stream/?after={int(after)}", headers=PAGE_HEADERS)
    assert r["X-BOSH-SID"]
    with pytest.raises(RuntimeError, match="the page failed"):
        b"".join(r.streaming_content)
    [pending] = cores[0].pendings
    session = pending._future.result(timeout=10)
    cores[0].drain()  # waits for the termination
    assert r["X-BOSH-SID"] == session.sid
    if after:
        assert_live(bosh.service_url, session.sid, session.rid)
    else:
        assert_dead(bosh.service_url, session.sid, session.rid)


def test_csp_nonce_from_django_csp(alice: Account, bosh: XMPPServer, settings: Any) -> None:
    from csp.constants import NONCE, SELF

    ours = settings.MIDDLEWARE.index("bosh_middleware.django.BOSHPrebindMiddleware")
    settings.MIDDLEWARE = [
        *settings.MIDDLEWARE[:ours],
        "csp.middleware.CSPMiddleware",
        *settings.MIDDLEWARE[ours:],
    ]
    settings.CONTENT_SECURITY_POLICY = {"DIRECTIVES": {"script-src": [SELF, NONCE]}}
    r = logged_in(alice).get("/page/", headers=PAGE_HEADERS)
    found = injected(r.content)
    assert found.nonce
    assert f"'nonce-{found.nonce}'" in r["Content-Security-Policy"]
    assert_live(bosh.service_url, found.sid, found.rid)


@pytest.mark.skipif(django.VERSION < (6, 0), reason="Django 6's built-in CSP")
def test_csp_nonce_from_django_6(alice: Account, bosh: XMPPServer, settings: Any) -> None:
    from django.utils.csp import CSP

    ours = settings.MIDDLEWARE.index("bosh_middleware.django.BOSHPrebindMiddleware")
    settings.MIDDLEWARE = [
        *settings.MIDDLEWARE[:ours],
        "django.middleware.csp.ContentSecurityPolicyMiddleware",
        *settings.MIDDLEWARE[ours:],
    ]
    settings.SECURE_CSP = {"script-src": [CSP.SELF, CSP.NONCE]}
    r = logged_in(alice).get("/page/", headers=PAGE_HEADERS)
    found = injected(r.content)
    assert found.nonce
    assert f"'nonce-{found.nonce}'" in r["Content-Security-Policy"]


def test_disabled(alice: Account, settings: Any, cores: list[RecordingCore]) -> None:
    settings.BOSH_PREBIND = {**settings.BOSH_PREBIND, "ENABLED": False}
    r = logged_in(alice).get("/page/", headers=PAGE_HEADERS)
    assert b"BOSH_" not in r.content and cores == []


def test_endpoint(alice: Account, nobody: Account, bosh: XMPPServer) -> None:
    # converse.js fetches it: not a page, and answered all the same
    xhr = {"Accept": "application/json", "Sec-Fetch-Dest": "empty", "X-Requested-With": "XHR"}
    r = logged_in(alice).get("/bosh/prebind", headers=xhr)
    assert r.status_code == 200 and r["Content-Type"] == "application/json"
    assert r["Cache-Control"] == "private, no-store" and int(r["Content-Length"]) == len(r.content)
    data = r.json()
    assert data["jid"].split("/")[0] == alice.jid
    assert_live(bosh.service_url, data["sid"], int(data["rid"]))
    assert Client().get("/bosh/prebind").status_code == 401
    assert logged_in(nobody).get("/bosh/prebind").status_code == 403
    assert logged_in(alice).post("/bosh/prebind").status_code == 405
    # another site's <img> or no-cors fetch, with the user's cookies, or an <img> in this
    # site's own content: nothing that could read a session, so none made
    for site, dest, refusal in FETCH_METADATA:
        if refusal is not None:
            headers = {"Sec-Fetch-Site": site, "Sec-Fetch-Dest": dest}
            foreign = logged_in(alice).get("/bosh/prebind", headers=headers)
            assert (foreign.status_code, foreign.json()) == (403, {"error": refusal})


def test_unreachable_server_fails_open(alice: Account, settings: Any) -> None:
    settings.BOSH_PREBIND = {**settings.BOSH_PREBIND, "SERVICE_URL": "http://127.0.0.1:9/http-bind"}
    client = logged_in(alice)
    r = client.get("/page/", headers=PAGE_HEADERS)
    assert r.status_code == 200 and b"BOSH_" not in r.content and "Cache-Control" not in r
    r = client.get("/bosh/prebind")
    assert r.status_code == 503 and int(r["Retry-After"]) >= 1
