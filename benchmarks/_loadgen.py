"""Fallback load generator (when ``wrk`` is not installed): a separate process with N keep-alive
HTTP/1.1 connections on one asyncio loop, closed loop, fixed duration; prints requests/s.

    python benchmarks/_loadgen.py URL CONNECTIONS SECONDS [HEADER ...]
"""

from __future__ import annotations

import asyncio
import sys
import time
from urllib.parse import urlsplit


async def _worker(host: str, port: int, request: bytes, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            counts[0 if head.startswith(b"HTTP/1.1 2") else 1] += 1
    finally:
        writer.close()


async def main(url: str, conns: int, seconds: float, headers: list[str]) -> None:
    parts = urlsplit(url)
    extra = "".join(f"{h}\r\n" for h in headers)
    request = (f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n{extra}\r\n").encode()
    counts = [0, 0]
    t0 = time.monotonic()
    deadline = t0 + seconds
    await asyncio.gather(
        *(
            _worker(parts.hostname or "127.0.0.1", parts.port or 80, request, deadline, counts)
            for _ in range(conns)
        )
    )
    elapsed = time.monotonic() - t0
    print(f"{counts[0]} requests in {elapsed:.2f}s")
    print(f"Requests/sec: {counts[0] / elapsed:.2f}")
    if counts[1]:
        print(f"Non-2xx or 3xx responses: {counts[1]}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]))
