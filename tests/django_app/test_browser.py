"""End to end in headless Chromium, under a real WSGI server (wsgiref, threaded) and a real
ASGI server (uvicorn): log in through Django's login form, load a page carrying the injected
BOSH variables, ``connection.attach()`` with Strophe.js, and chat with an independent client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import uvicorn
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler

from django_app import views
from django_app.helpers import Account, RecordingCore
from support.browser import HarnessPage, StaticServer, format_logs, open_page
from support.xmpp_servers import XMPPServer, free_port

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def wsgi_server(cores: list[RecordingCore]) -> Iterator[str]:
    httpd = make_server(
        "127.0.0.1",
        0,
        WSGIHandler(),
        server_class=_ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def asgi_server(cores: list[RecordingCore]) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            ASGIHandler(),
            host="127.0.0.1",
            port=port,
            lifespan="off",
            ws="none",
            log_level="warning",
        )
    )

    async def serve() -> None:
        await server.serve()
        for core in cores:  # the prebinder's client lives in this loop
            await core.adrain()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("serve", [wsgi_server, asgi_server], ids=["wsgi", "asgi"])
def test_login_attach_and_chat(
    django_browser: Any,
    serve: Any,
    alice: Account,
    bosh: XMPPServer,
    static_server: StaticServer,
    cores: list[RecordingCore],
) -> None:
    views.BROWSER.update(static=static_server.base_url, service=bosh.service_url)
    peer_jid, peer_password = bosh.new_user("peer")
    message = f"hello from {alice.username}"
    logs: list[str] = []
    pages: list[HarnessPage] = []
    with serve(cores) as base:
        try:
            context = django_browser.new_context()
            context.set_default_timeout(15_000)
            page = context.new_page()
            page.on("console", lambda msg: logs.append(f"[attached] {msg.type}: {msg.text}"))
            page.on("pageerror", lambda err: logs.append(f"[attached] PAGE ERROR: {err}"))
            attached = HarnessPage("attached", context, page, logs)
            pages.append(attached)
            page.goto(f"{base}/accounts/login/?next=/browser/")
            page.fill("#id_username", alice.username)
            page.fill("#id_password", alice.password)
            page.click("#login")
            page.wait_for_url(f"{base}/browser/")
            page.wait_for_function("() => !!(window.boshTest && window.Strophe)")
            assert page.evaluate("() => BOSH_JID").split("/")[0] == alice.jid

            peer = open_page(django_browser, static_server.harness_url, name="peer", logs=logs)
            pages.append(peer)
            peer.evaluate(
                "o => boshTest.connect(o)",
                {"service": bosh.service_url, "jid": peer_jid, "password": peer_password},
            )

            state = attached.evaluate("() => boshTest.attach({timeout: 15000})")
            assert "ATTACHED" in state["statuses"], format_logs(logs)
            assert state["iqResult"] == "result", format_logs(logs)  # the RID was right
            attached.evaluate("([to, body]) => boshTest.send(to, body)", [peer_jid, message])
            got = peer.evaluate(
                "o => boshTest.waitForMessage(o)",
                {"body": message, "from": alice.jid, "timeout": 10_000},
            )
            assert got["body"] == message
        except Exception as exc:
            raise AssertionError(f"{exc}\n{format_logs(logs)}") from exc
        finally:
            for hp in reversed(pages):
                with contextlib.suppress(Exception):
                    hp.evaluate("() => boshTest.disconnect(3000)")
                hp.close()
