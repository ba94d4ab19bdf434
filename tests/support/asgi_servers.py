"""Real ASGI servers, each in a thread of its own on 127.0.0.1, for tests that need the app as a
server sees it: the server inspects the app to pick its interface (ASGI 3, ASGI 2, WSGI), runs
its lifespan and calls it the way it calls apps in production."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from support.xmpp_servers import free_port

#: The servers ``serve`` can start.
SERVERS = ("uvicorn", "hypercorn")


def _wait_for_port(port: int, thread: threading.Thread, name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert thread.is_alive(), f"{name} stopped while starting"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        assert time.monotonic() < deadline, f"{name} did not start in {timeout} s"
        time.sleep(0.02)


@contextlib.contextmanager
def _uvicorn(app: Any) -> Iterator[str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, lifespan="on", ws="none", log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}")
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def _hypercorn(app: Any) -> Iterator[str]:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stopping: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def main() -> None:
        stop = asyncio.Event()
        stopping.append((asyncio.get_running_loop(), stop))
        # no mode: hypercorn tells ASGI from WSGI by looking at the app, as its CLI does
        await serve(app, config, shutdown_trigger=stop.wait)

    thread = threading.Thread(target=asyncio.run, args=(main(),), name=f"hypercorn:{port}")
    thread.start()
    try:
        _wait_for_port(port, thread, "hypercorn")
        yield f"http://127.0.0.1:{port}"
    finally:
        if stopping:
            loop, stop = stopping[0]
            loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        assert not thread.is_alive(), "hypercorn did not stop"


def serve(kind: str, app: Any) -> contextlib.AbstractContextManager[str]:
    """``with serve("uvicorn", app) as base_url:`` the app served until the block ends, with
    lifespan (startup before the block, shutdown after it)."""
    return {"uvicorn": _uvicorn, "hypercorn": _hypercorn}[kind](app)
