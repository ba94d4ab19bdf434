"""Real ASGI servers, each in a thread of its own on 127.0.0.1, for tests that need the app as a
server sees it: the server inspects the app to pick its interface (ASGI 3, ASGI 2, WSGI), runs
its lifespan and calls it the way it calls apps in production."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from support.bosh_check import port_is_closed, wait_until
from support.xmpp_servers import free_port

#: The servers ``serve`` can start.
SERVERS = ("uvicorn", "hypercorn")


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
        wait_until(lambda: server.started or not thread.is_alive(), 10, 0.02)
        assert server.started, "uvicorn did not start"
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
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: not (thread.is_alive() and port_is_closed(url)), 10, 0.02)
        assert thread.is_alive() and not port_is_closed(url), "hypercorn did not start"
        yield url
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
