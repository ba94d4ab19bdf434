"""Regression tests for bugs found in the framework-agnostic core while building the Django
adapter, reproduced deterministically.

* A pipelined bind overtaking the restart left a request held at the server that swallowed the
  answer to the browser's first request.
* ``is_injectable()`` accepted HTML downloads (``Content-Disposition: attachment``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from bosh_middleware import Credentials, Prebinder, PrebindOptions
from bosh_middleware.core import is_injectable
from django_app.helpers import assert_live
from support.xmpp_servers import XMPPServer


@contextlib.contextmanager
def restart_last_proxy(service_url: str) -> Iterator[str]:
    """A TCP proxy to the BOSH endpoint that holds back the ``xmpp:restart`` request's bytes
    for 300 ms, so that the bind pipelined with it (on another connection) reaches the server
    first -- what two TCP connections sometimes do on their own (a new one against a pooled
    one, a loaded server: about one prebind in a few hundred in this suite)."""
    target = urlsplit(service_url)
    listener = socket.create_server(("127.0.0.1", 0))
    sockets: list[socket.socket] = []

    def pipe(src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if upstream and b"xmpp:restart" in data:
                    time.sleep(0.3)
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                server = socket.create_connection((target.hostname, target.port))
                sockets.extend((client, server))
                threading.Thread(target=pipe, args=(client, server, True), daemon=True).start()
                threading.Thread(target=pipe, args=(server, client, False), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}{target.path}"
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        listener.close()
        for s in sockets:
            s.close()
        thread.join(timeout=5)


@pytest.mark.parametrize("pipeline", [True, False])
def test_first_request_after_an_overtaken_restart(prosody: XMPPServer, pipeline: bool) -> None:
    jid, password = prosody.new_user("overtake")
    with (
        restart_last_proxy(prosody.service_url) as url,
        Prebinder(url, options=PrebindOptions(pipeline=pipeline)) as prebinder,
    ):
        session = prebinder.prebind(Credentials(jid=jid, password=password))
    assert_live(prosody.service_url, session.sid, session.rid, timeout=3)


def test_html_attachment_is_not_injectable() -> None:
    headers = {
        "content-type": "text/html; charset=utf-8",
        "content-disposition": 'attachment; filename="report.html"',
    }
    assert not is_injectable("GET", 200, headers.get)
