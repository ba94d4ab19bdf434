"""A TCP proxy on 127.0.0.1 that emulates a network round-trip time, so the effect of round trips
and new connections can be measured without leaving the machine.

Every byte the server sends reaches the client ``rtt`` later (in order), and a new connection
forwards nothing for one ``rtt`` (its TCP handshake). A request/response exchange therefore
costs one RTT, a new connection one more, as over a real link.

    python -m benchmarks.delayproxy --listen 0 --target 127.0.0.1:5280 --rtt-ms 5

prints ``PORT <n>`` once listening; runs until stdin closes or it is killed (it is started and
stopped by ``DelayProxy`` below, in its own process, so its CPU is not the benchmark's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time

__all__ = ["DelayProxy"]


async def _pipe_now(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, start_at: float
) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(65536):
            delay = start_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _pipe_delayed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rtt: float
) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    task = asyncio.ensure_future(deliver())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + rtt, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait((loop.time() + rtt, b""))
    await task


async def _serve(port: int, target: tuple[str, int], rtt: float) -> None:
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        start_at = loop.time() + rtt  # the handshake's round trip
        try:
            s_reader, s_writer = await asyncio.open_connection(*target)
        except OSError:
            c_writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(
                _pipe_now(c_reader, s_writer, start_at),
                _pipe_delayed(s_reader, c_writer, rtt),
            )

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()

    def watch_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stdin_closed.set_result, None)

    loop.run_in_executor(None, watch_stdin)
    async with server:
        await stdin_closed


class DelayProxy:
    """``with DelayProxy(service_url, rtt_ms=5) as url: ...`` (a subprocess, 127.0.0.1 only)."""

    def __init__(self, service_url: str, rtt_ms: float) -> None:
        from urllib.parse import urlsplit

        self._parts = urlsplit(service_url)
        self.rtt_ms = rtt_ms
        self._proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> str:
        p = self._parts
        assert p.hostname in ("127.0.0.1", "localhost")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--target",
                f"{p.hostname}:{p.port}",
                "--rtt-ms",
                str(self.rtt_ms),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + 10
        line = ""
        while time.monotonic() < deadline and not line.startswith("PORT"):
            line = self._proc.stdout.readline()
            if not line and self._proc.poll() is not None:
                raise RuntimeError("delay proxy did not start")
        port = int(line.split()[1])
        self.url = p._replace(netloc=f"127.0.0.1:{port}").geturl()
        return self.url

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, default=0)
    ap.add_argument("--target", required=True)
    ap.add_argument("--rtt-ms", type=float, required=True)
    args = ap.parse_args()
    host, port = args.target.rsplit(":", 1)
    asyncio.run(_serve(args.listen, (host, int(port)), args.rtt_ms / 1000))


if __name__ == "__main__":
    main()
