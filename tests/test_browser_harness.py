"""The real-browser harness itself (tests/support/browser.py, static/attach-test.js), checked
without bosh-middleware: Strophe.js logins in headless Chromium against a real Prosody.

Fixtures: ``browser``, ``static_server``, ``harness_page`` from support.browser_fixtures
(imported by conftest.py); ``prosody`` from conftest.py (support.xmpp_servers).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from support.browser import (
    CONVERSE_URL_PREFIX,
    Response,
    StaticServer,
    attach_and_chat,
    converse_tags,
)

pytestmark = pytest.mark.browser


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def test_static_server_serves_assets_pages_and_routes(static_server: StaticServer) -> None:
    assert static_server.base_url.startswith("http://127.0.0.1:")

    status, ctype, body = _get(static_server.url("/static/strophe.js"))
    assert status == 200 and "javascript" in ctype and b"Strophe" in body
    status, ctype, body = _get(static_server.url("/static/attach-test.js"))
    assert status == 200 and "javascript" in ctype and b"window.boshTest" in body
    status, ctype, _ = _get(static_server.url(CONVERSE_URL_PREFIX + "converse.min.js"))
    assert status == 200 and "javascript" in ctype
    status, ctype, _ = _get(static_server.url(CONVERSE_URL_PREFIX + "converse.min.css"))
    assert status == 200 and "text/css" in ctype
    assert _get(static_server.url(CONVERSE_URL_PREFIX + "../../strophe.js/package.json"))[0] == 404
    assert _get(static_server.url("/nope"))[0] == 404

    url = static_server.add_page("/t/page.html", "<p>hello</p>")
    assert _get(url + "?x=1")[2] == b"<p>hello</p>"

    url = static_server.add_route(
        "/t/prebind",
        lambda req: Response(200, json.dumps({"method": req.method}), "application/json"),
    )
    status, ctype, body = _get(url)
    assert (status, ctype, json.loads(body)) == (200, "application/json", {"method": "GET"})
    static_server.remove("/t/prebind")
    assert _get(url)[0] == 404


def test_two_strophe_logins_exchange_messages(browser, static_server, harness_page, prosody):
    alice, alice_pw = prosody.new_user()
    bob, bob_pw = prosody.new_user()
    logs: list[str] = []
    a = harness_page(name="alice", logs=logs)
    b = harness_page(name="bob", logs=logs)

    a_state = a.evaluate(
        "o => boshTest.connect(o)",
        {"service": prosody.service_url, "jid": alice, "password": alice_pw, "timeout": 20000},
    )
    b_state = b.evaluate(
        "o => boshTest.connect(o)",
        {"service": prosody.service_url, "jid": bob, "password": bob_pw, "timeout": 20000},
    )
    for state, bare in ((a_state, alice), (b_state, bob)):
        assert state["statuses"][-1] == "CONNECTED", state
        assert state["jid"].startswith(bare + "/"), state
        assert state["iqResult"] == "result", state
        # presence and the roster get went out together, in the first request after login
        assert "<presence" in state["firstRequest"], state
        assert "jabber:iq:roster" in state["firstRequest"], state

    text = "hi bob <&> ünïcødé"
    a.evaluate("([to, body]) => boshTest.send(to, body)", [bob, text])
    got = b.evaluate("o => boshTest.waitForMessage(o)", {"body": text, "timeout": 10000})
    assert got["from"] == a_state["jid"]

    b.evaluate("([to, body]) => boshTest.send(to, body)", [a_state["jid"], "hi alice"])
    got = a.evaluate("o => boshTest.waitForMessage(o)", {"from": bob, "timeout": 10000})
    assert got["body"] == "hi alice"

    # pollable state, for page.wait_for_function users
    a.page.wait_for_function("() => boshTest.received.length === 1", timeout=5000)
    assert b.state()["received"][0]["body"] == text

    assert a.evaluate("() => boshTest.disconnect(5000)") == "DISCONNECTED"
    assert b.evaluate("() => boshTest.disconnect(5000)") == "DISCONNECTED"
    assert not [line for line in logs if "PAGE ERROR" in line], "\n".join(logs)


def test_attach_uses_page_variables_and_detects_a_dead_session(
    browser, static_server, harness_page, prosody
):
    """A page with BOSH_* variables (like the framework test apps inject) attaches by default;
    a session the server does not know gives ATTACHED (Strophe makes no request for it) but
    no roster result, which is what the harness must notice."""
    user, _ = prosody.new_user()
    url = static_server.add_harness_page(
        "/t/attach-vars.html",
        variables={
            "BOSH_SERVICE": prosody.service_url,
            "BOSH_JID": user + "/web",
            "BOSH_SID": "no-such-session",
            "BOSH_RID": "4242",
        },
    )
    page = harness_page(url, name="dead")
    state = page.evaluate("() => boshTest.attach({iqTimeout: 8000})")
    assert state["statuses"][0] == "ATTACHED", state
    assert state["jid"] == user + "/web"
    assert state["iqResult"] in ("disconnected", "timeout"), state
    assert 'rid="4242"' in state["firstRequest"] and "jabber:iq:roster" in state["firstRequest"]


def test_attach_and_chat_fails_fast_with_console_log(browser, static_server, prosody):
    peer, peer_pw = prosody.new_user()
    user, _ = prosody.new_user()
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as info:
        attach_and_chat(
            browser,
            static_server,
            service_url=prosody.service_url,
            jid=user + "/web",
            sid="no-such-session",
            rid=1000,
            peer_jid=peer,
            peer_password=peer_pw,
            message="never delivered",
            timeout_s=15,
        )
    assert time.monotonic() - t0 < 20
    text = str(info.value)
    assert "roster get sent in the first request after attach" in text
    assert "browser console" in text and "BOSH SENT" in text


def test_converse_bundle_loads(harness_page, static_server):
    url = static_server.add_page(
        "/t/converse.html",
        f"<!doctype html><html><head><meta charset='utf-8'>{converse_tags()}</head><body>"
        # modules run in document order: this one sees window.converse
        "<script type='module'>window.converseSeen = typeof converse.initialize;</script>"
        "</body></html>",
    )
    logs: list[str] = []
    page = harness_page(url, name="converse", wait_for_harness=False, logs=logs)
    page.page.wait_for_function(
        "() => window.converseSeen === 'function'",
        timeout=10000,
    )
    assert not [line for line in logs if "PAGE ERROR" in line], "\n".join(logs)
