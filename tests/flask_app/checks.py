"""Checks shared by the framework adapter tests (no web framework imported here).

* :func:`page_session` -- the ``BOSH_*`` variables our ``<script>`` put in a page, checking it
  is the only one and sits before ``</head>``.
* :func:`assert_live` -- the session is live and ``rid`` is the one the server expects next:
  one BOSH request sent by hand with ``rid=BOSH_RID`` carries a roster get, which must be
  answered; the session is then terminated.
* :func:`browser_login_attach_and_chat` -- log in through an app's HTML form in Chromium, attach
  with Strophe to the session the page carries, and send a message to an independent client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html as html_lib
import json
import re
import secrets
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from lxml import etree

from support.browser import StaticServer, format_logs, open_page, script_tags

T = TypeVar("T")
NS_BOSH = "http://jabber.org/protocol/httpbind"
NS_ROSTER = "jabber:iq:roster"
SCRIPT = re.compile(r'<script(?: nonce="(?P<nonce>[^"]*)")?>var (?P<vars>BOSH_JID=.*?);</script>')
ASSIGNMENT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|-?\d+)')


def page(title: str, body: str = "", script_base: str | None = None) -> str:
    """A test page; with ``script_base``, it loads Strophe.js and attach-test.js from there."""
    scripts = script_tags(script_base) if script_base is not None else ""
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html_lib.escape(title)}"
        f"</title></HEAD><body><p>İstanbul {html_lib.escape(title)}</p>{body}{scripts}"
        "</body></html>"
    )


def page_session(html: str) -> dict[str, Any]:
    """``{"BOSH_JID": ..., "BOSH_SID": ..., "BOSH_RID": ..., "nonce": ...}`` of the one script."""
    found = list(SCRIPT.finditer(html))
    assert len(found) == 1, f"expected exactly one BOSH script, found {len(found)}:\n{html}"
    match = found[0]
    head = re.search("</head>", html, re.IGNORECASE)
    assert head is not None and match.end() <= head.start(), f"script not before </head>:\n{html}"
    head_end = head.start()
    assert html[match.end() : head_end] == "", "script not right before </head>"
    values: dict[str, Any] = {k: json.loads(v) for k, v in ASSIGNMENT.findall(match["vars"])}
    values["nonce"] = match["nonce"]
    return values


def bosh_post(
    service_url: str, sid: str, rid: int, payload: str = "", *, timeout: float = 10, **attrs: str
) -> bytes:
    extra = "".join(f" {k}='{v}'" for k, v in attrs.items())
    body = f"<body rid='{rid}' sid='{sid}' xmlns='{NS_BOSH}'{extra}>{payload}</body>"
    r = httpx.post(
        service_url,
        content=body,
        timeout=timeout,
        headers={"Content-Type": "text/xml; charset=utf-8"},
    )
    assert r.status_code == 200, r
    return r.content


def assert_live(
    service_url: str, session: dict[str, Any], *, terminate: bool = True, timeout: float = 10
) -> None:
    """``session``: the ``BOSH_*`` page variables (or the endpoint's ``{"jid","sid","rid"}``)."""
    jid = session.get("BOSH_JID", session.get("jid"))
    sid = session.get("BOSH_SID", session.get("sid"))
    rid = int(session.get("BOSH_RID", session.get("rid")))
    assert jid and "@" in jid and "/" in jid, session
    iq_id = f"roster_{secrets.token_hex(4)}"
    raw = bosh_post(
        service_url,
        sid,
        rid,
        f"<iq type='get' id='{iq_id}' xmlns='jabber:client'><query xmlns='{NS_ROSTER}'/></iq>",
        timeout=timeout,
    )
    root = etree.fromstring(raw)
    assert root.get("type") != "terminate", raw
    iqs = [el for el in root if el.get("id") == iq_id]
    assert iqs and iqs[0].get("type") == "result", f"no roster result with rid={rid}: {raw!r}"
    if terminate:
        bosh_post(service_url, sid, rid + 1, type="terminate")


def browser_login_attach_and_chat(
    browser: Any,
    static: StaticServer,
    *,
    login_url: str,
    page_url: str,
    username: str,
    password: str,
    service_url: str,
    peer_jid: str,
    peer_password: str,
) -> dict[str, Any]:
    """Log in through ``login_url``'s form (fields ``username``/``password``), land on
    ``page_url``, ``boshTest.attach()`` with the page's own variables (roster get answered), and
    send a message to ``peer_jid``, logged in independently, which must receive it."""
    logs: list[str] = []
    pages = []
    try:
        attached = open_page(browser, login_url, name="attached", logs=logs, wait_for_harness=False)
        pages.append(attached)
        page = attached.page
        page.fill("input[name=username]", username)
        page.fill("input[name=password]", password)
        with page.expect_navigation(url=page_url, wait_until="load"):
            page.click("button[type=submit]")
        page.wait_for_function("() => !!(window.boshTest && window.BOSH_SID)")
        assert page.evaluate("() => window.BOSH_SERVICE") == service_url

        peer = open_page(browser, static.harness_url, name="peer", logs=logs)
        pages.append(peer)
        peer.evaluate(
            "o => boshTest.connect(o)",
            {
                "service": service_url,
                "jid": peer_jid,
                "password": peer_password,
                "timeout": 15000,
            },
        )

        state = attached.evaluate("() => boshTest.attach({timeout: 15000, iqTimeout: 10000})")
        assert "ATTACHED" in state["statuses"], state
        assert state["iqResult"] == "result", (state, format_logs(logs))
        text = f"hello from {username} {secrets.token_hex(3)}"
        attached.evaluate("([to, body]) => boshTest.send(to, body)", [peer_jid, text])
        got = peer.evaluate("o => boshTest.waitForMessage(o)", {"body": text, "timeout": 10000})
        assert got["from"].split("/", 1)[0] == state["jid"].split("/", 1)[0], got
        assert not [line for line in logs if "PAGE ERROR" in line], format_logs(logs)
        for hp in reversed(pages):
            with contextlib.suppress(Exception):
                hp.evaluate("() => boshTest.disconnect(3000)")
        return state
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(f"{exc}\n{format_logs(logs)}") from exc
    finally:
        for hp in pages:
            hp.close()


def close_core(core: Any) -> None:
    """Close a ``PrebindCore`` once the prebinds and terminations it has in flight are done.

    ``PrebindCore.close()`` alone does not wait: a prebind still running then makes the closed
    ``Prebinder`` open a new ``httpx.Client`` that nobody closes (a ResourceWarning, an error
    here, in some later test).
    """
    executor = core._executor
    if executor is not None:
        executor.shutdown(wait=True)
    core.close()


async def aclose_core(core: Any, timeout: float = 10) -> None:
    """The async twin of :func:`close_core`: let the loop's other tasks (prebinds, discarded
    sessions being terminated) finish, then close the core's ``AsyncClient``."""
    current = asyncio.current_task()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        others = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not others or loop.time() >= deadline:
            break
        await asyncio.wait(others, timeout=deadline - loop.time())
    await core.aclose()


def in_own_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh thread.

    The session-scoped sync Playwright (the ``browser`` fixture) leaves its event loop set as the
    main thread's *running* loop, so once any browser test has run, ``asyncio.run``,
    pytest-asyncio tests and asgiref's ``async_to_sync`` (Flask async views) all fail in the main
    thread ("Cannot run the event loop while another loop is running").
    """
    with ThreadPoolExecutor(1) as executor:
        return executor.submit(fn, *args, **kwargs).result()


def own_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an ``async def`` test on a fresh event loop in its own thread (see
    :func:`in_own_thread`); an ``aclose()`` of its ``clients`` fixture runs on that loop too."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            try:
                await test(*args, **kwargs)
            finally:
                if "clients" in kwargs:
                    await kwargs["clients"].aclose()

        in_own_thread(asyncio.run, main())

    return run
