"""The end-to-end proof: a session prebound by bosh-middleware is taken over by Strophe.js
``connection.attach()`` in headless Chromium, and it works: ATTACHED, a roster result for the
stanza sent in the very first request (the RID is right), a message delivered to an
independently logged-in peer, and the peer's reply received.

Plain ``def`` tests: the sync Playwright fixtures cannot run inside an event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re

import pytest

from bosh_middleware import AsyncPrebinder, Credentials, Prebinder, PrebindSession
from support.browser import AttachResult, StaticServer, attach_and_chat
from support.xmpp_servers import XMPPServer

pytestmark = pytest.mark.browser


#: A peer's JID and password.
Peer = tuple[str, str]


def _prebind(server: XMPPServer, *, learnt: bool = False, **options) -> tuple[PrebindSession, Peer]:  # type: ignore[no-untyped-def]
    """A prebound session, and the peer ``_attach`` chats with, registered first (``_peer``);
    ``learnt``: the engine's second session, made with quickstart."""
    peer = _peer(server)
    jid, password = server.new_user("att")
    with Prebinder(server.service_url, **options) as p:
        if learnt:
            p.terminate(p.prebind(Credentials(jid, password)))
        session = p.prebind(Credentials(jid, password))
    return session, peer


def _peer(server: XMPPServer) -> Peer:
    """The account the attached page chats with, registered before the session is made: a
    registration is a command-line tool's run (ejabberdctl boots an Erlang VM), which on a
    busy host took longer than ejabberd's 30 s of inactivity, and the session waiting for
    the attach was gone (item-not-found) before the browser got to it."""
    return server.new_user("peer")


def _attach(
    browser,
    static: StaticServer,
    server: XMPPServer,
    session: PrebindSession,
    peer: Peer,
    message: str,
) -> AttachResult:  # type: ignore[no-untyped-def]
    peer_jid, peer_password = peer
    result = attach_and_chat(
        browser,
        static,
        service_url=server.service_url,
        jid=session.jid,
        sid=session.sid,
        rid=session.rid,
        peer_jid=peer_jid,
        peer_password=peer_password,
        message=message,
        timeout_s=25,
    )
    # attach_and_chat raises on any failure; check what it proved anyway
    assert result.statuses[0] == "ATTACHED", result.statuses
    assert result.iq_result == "result"
    assert result.jid == session.jid
    first = result.first_request or ""
    # the page's first request carried exactly the RID we handed out, and the roster get
    assert re.search(rf"rid=[\"']{session.rid}[\"']", first), first
    assert f'sid="{session.sid}"' in first or f"sid='{session.sid}'" in first, first
    assert "jabber:iq:roster" in first
    assert [m["body"] for m in result.peer_received] == [message]
    assert result.peer_received[0]["from"].split("/")[0] == session.jid.split("/")[0]
    assert [m["body"] for m in result.attach_received] == [f"re: {message}"]
    return result


def _check_shape(session: PrebindSession, round_trips: int, requests: int | None = None) -> None:
    """The round trips of an unhurried prebind. On a busy host the pipelined bind can still
    overtake the restart (two connections are not ordered): the flow then ends that session
    and prebinds again one request at a time, which is correct, and more round trips.
    test_prebind_servers checks that this stays the exception; here the attach is the point."""
    if session.retried:
        assert session.round_trips > round_trips, session
        return
    assert session.round_trips == round_trips, session
    if requests is not None:
        assert session.request_count == requests, session


def test_prosody_scram_session_attaches(browser, static_server, prosody) -> None:
    session, peer = _prebind(prosody)
    assert session.mechanism and session.mechanism.startswith("SCRAM-")
    _check_shape(session, 4)
    _attach(browser, static_server, prosody, session, peer, "hello from a SCRAM prebind")


def test_prosody_plain_session_attaches(browser, static_server, prosody_secure) -> None:
    session, peer = _prebind(prosody_secure, mechanisms=["PLAIN"])
    assert session.mechanism == "PLAIN"
    _check_shape(session, 3)
    _attach(browser, static_server, prosody_secure, session, peer, "hello from a PLAIN prebind <&>")


@pytest.mark.parametrize(("transport", "round_trips"), [("builtin", 2), ("httpx", 3)])
def test_prosody_scram_quickstart_session_attaches(
    browser, static_server, prosody, transport: str, round_trips: int
) -> None:
    """A session whose first SASL message went with the creation request, and (builtin
    transport) whose last one went pipelined with the restart + bind on one connection."""
    session, peer = _prebind(prosody, learnt=True, transport=transport)
    assert session.mechanism and session.mechanism.startswith("SCRAM-")
    _check_shape(session, round_trips, requests=3)
    _attach(
        browser,
        static_server,
        prosody,
        session,
        peer,
        f"hello from a quickstart prebind {transport}",
    )


def test_prosody_plain_quickstart_session_attaches(browser, static_server, prosody_secure) -> None:
    session, peer = _prebind(prosody_secure, learnt=True, mechanisms=["PLAIN"])
    assert session.mechanism == "PLAIN"
    _check_shape(session, 2)
    _attach(browser, static_server, prosody_secure, session, peer, "two round trips, PLAIN")


@pytest.mark.ejabberd
def test_ejabberd_session_attaches(browser, static_server, ejabberd) -> None:
    session, peer = _prebind(ejabberd)
    assert session.mechanism and session.mechanism.startswith("SCRAM-")
    _attach(browser, static_server, ejabberd, session, peer, "hello ejabberd")


@pytest.mark.ejabberd
def test_ejabberd_plain_session_attaches(browser, static_server, ejabberd) -> None:
    session, peer = _prebind(ejabberd, mechanisms=["PLAIN"])
    assert session.mechanism == "PLAIN"
    _attach(browser, static_server, ejabberd, session, peer, "hello ejabberd, PLAIN")


def test_async_prebind_attaches(browser, static_server, prosody) -> None:
    peer = _peer(prosody)
    jid, password = prosody.new_user("async")

    async def go() -> PrebindSession:
        async with AsyncPrebinder(prosody.service_url) as p:
            return await p.prebind(Credentials(jid, password))

    # the sync Playwright API keeps an event loop on this thread: run the async engine on another
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        session = pool.submit(lambda: asyncio.run(go())).result(timeout=30)
    assert session.jid.startswith(jid + "/")
    _attach(browser, static_server, prosody, session, peer, "hello from the async engine")


def test_anonymous_session_attaches(browser, static_server, prosody) -> None:
    assert prosody.anon_domain
    peer = _peer(prosody)
    with Prebinder(prosody.service_url) as p:
        session = p.prebind(Credentials.anonymous(prosody.anon_domain))
    assert session.jid.split("/")[0].endswith("@" + prosody.anon_domain)
    _attach(browser, static_server, prosody, session, peer, "hello from an anonymous prebind")


def test_off_by_one_rid_is_caught(browser, static_server, prosody) -> None:
    """The check has teeth: handing out the last RID (not last + 1) must fail the attach check."""
    session, (peer, peer_password) = _prebind(prosody)
    with pytest.raises(AssertionError, match="roster get sent in the first request"):
        attach_and_chat(
            browser,
            static_server,
            service_url=prosody.service_url,
            jid=session.jid,
            sid=session.sid,
            rid=session.rid - 1,
            peer_jid=peer,
            peer_password=peer_password,
            message="never",
            timeout_s=7,
        )


def test_xhtml_page_runs_the_injected_script_and_attaches(browser, static_server, prosody) -> None:
    """An ``application/xhtml+xml`` page, which Chromium reads with its XML parser, with a
    ``<script src=.../>`` that closes itself in its head: the WSGI middleware puts the session
    before the ``</head>`` after it, the page still parses, the script runs, and the session
    in it attaches and chats."""
    from bosh_middleware import StaticCredentials
    from bosh_middleware.wsgi import BOSHPrebindMiddleware
    from support.asgi_recorder import NAV, call_wsgi, wsgi_environ
    from support.browser import STROPHE_URL_PATH, Request, Response, open_page

    peer = _peer(prosody)
    jid, password = prosody.new_user("xhtml")
    page = (
        '<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">'
        f'<head><title>x</title><script src="{STROPHE_URL_PATH}"/></head>'
        "<body><p>x</p><script>window.later = typeof Strophe.Connection;</script></body></html>"
    ).encode()

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        start_response("200 OK", [("Content-Type", "application/xhtml+xml; charset=utf-8")])
        return [page]

    mw = BOSHPrebindMiddleware(
        app,
        service_url=prosody.service_url,
        credentials=StaticCredentials({"alice": (jid, password)}),
    )

    def handler(request: Request) -> Response:
        r = call_wsgi(mw, wsgi_environ("/", user="alice", headers=NAV))
        return Response(body=r.body, content_type=r.header("content-type") or "")

    try:
        url = static_server.add_route("/xhtml-page", handler)
        hp = open_page(browser, url, name="xhtml", wait_for_harness=False)
        try:
            seen = hp.evaluate(
                "() => ({type: document.contentType, later: window.later,"
                " errors: document.getElementsByTagName('parsererror').length,"
                " inHead: document.head.lastElementChild.textContent.includes('BOSH_SID'),"
                " vars: typeof BOSH_SID === 'string' ? [BOSH_JID, BOSH_SID, BOSH_RID] : null})"
            )
        finally:
            hp.close()
        assert seen["type"] == "application/xhtml+xml" and seen["errors"] == 0, seen
        assert seen["later"] == "function", seen  # the page's own scripts ran, in order
        assert seen["vars"] is not None, seen  # and the injected one
        # where it belongs, before the </head> after the script that closes itself (read by
        # HTML's rules the head seemed to go on to the body's script: it went before </body>)
        assert seen["inHead"] is True, seen
        session_jid, sid, rid = seen["vars"]
        session = PrebindSession(session_jid, sid, int(rid), prosody.service_url)
        _attach(browser, static_server, prosody, session, peer, "hello from an XHTML page")
    finally:
        static_server.remove("/xhtml-page")
        mw.core.close()
