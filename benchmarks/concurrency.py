"""3. Concurrent prebinds: 64 distinct users at once.

Waves of 64 simultaneous prebinds (asyncio tasks on one event loop for the async engine, 64
threads released by a barrier for the sync drivers and the baseline). Per wave: wall time from
release to the last session, each prebind's latency, this process's CPU and Prosody's CPU
(/proc/<pid>/stat). After each wave every session is checked live (roster query, all at once)
and terminated, outside the measured window. One unmeasured warm-up wave first (pools, SCRAM
cache).

Bottleneck: Prosody is single-threaded (one Lua event loop), so Prosody at ~1.0 core means the
XMPP server is the limit; this process at >= ~1.0 core (the GIL; PBKDF2 releases it) means the
web process is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from bosh_middleware import AsyncPrebinder, Credentials, PrebindSession

from ._impls import SyncImpl, async_prebinder
from ._util import Prosody, Result, acheck_live, md_table, median, p99, prosody, verdict

USERS = 64


class _Wave:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.sessions: list[PrebindSession] = []
        self.errors = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.prosody_cpu = 0.0


def _measure(srv: Prosody, go: Callable[[_Wave], None]) -> _Wave:
    wave = _Wave()
    p0, c0, t0 = srv.cpu_ns() / 1e9, time.process_time(), time.perf_counter()
    go(wave)
    wave.wall = time.perf_counter() - t0
    wave.cpu = time.process_time() - c0
    wave.prosody_cpu = srv.cpu_ns() / 1e9 - p0
    return wave


def _threads_wave(impl: SyncImpl, creds: list[Credentials]) -> Callable[[_Wave], None]:
    def go(wave: _Wave) -> None:
        barrier = threading.Barrier(len(creds))
        lock = threading.Lock()

        def one(c: Credentials) -> None:
            barrier.wait()
            t = time.perf_counter()
            try:
                s = impl.prebind(c)
            except Exception:
                with lock:
                    wave.errors += 1
                return
            with lock:
                wave.latencies.append(time.perf_counter() - t)
                wave.sessions.append(s)

        with ThreadPoolExecutor(len(creds)) as pool:
            list(pool.map(one, creds))

    return go


def _async_wave(
    p: AsyncPrebinder, loop: asyncio.AbstractEventLoop, creds: list[Credentials]
) -> Callable[[_Wave], None]:
    async def one(c: Credentials, wave: _Wave) -> None:
        t = time.perf_counter()
        try:
            s = await p.prebind(c)
        except Exception:
            wave.errors += 1
            return
        wave.latencies.append(time.perf_counter() - t)
        wave.sessions.append(s)

    def go(wave: _Wave) -> None:
        async def all_() -> None:
            await asyncio.gather(*(one(c, wave) for c in creds))

        loop.run_until_complete(all_())

    return go


async def _check_and_end(url: str, sessions: list[PrebindSession]) -> int:
    """Check every session live (all at once), then terminate them; returns the live count."""
    ender = AsyncPrebinder(url)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as client:
        results = await asyncio.gather(*(acheck_live(client, s) for s in sessions))
        await asyncio.gather(*(ender.terminate(s) for _, s in results))
    await ender.aclose()
    return sum(ok for ok, _ in results)


def run(*, quick: bool = False, log_level: str = "info", **_: object) -> Result:
    waves = 1 if quick else 6
    mech = "SCRAM-SHA-1"
    rows: list[list[object]] = []
    data: dict[str, object] = {}
    cases = [
        ("baseline", "64 threads"),
        ("engine", "async, 64 tasks"),
        ("httpx", "async, 64 tasks"),
        ("engine", "sync, 64 threads"),
        ("httpx", "sync, 64 threads"),
    ]
    with prosody(secure=False, log_level=log_level) as srv:
        creds = [Credentials(j, pw) for j, pw in srv.users(USERS)]
        url = srv.service_url
        base_rate = base_p99 = None
        for kind, mode in cases:
            loop = None
            impl = None
            ap = None
            if mode.startswith("async"):
                loop = asyncio.new_event_loop()
                ap = async_prebinder(kind, url, mech)
                go = _async_wave(ap, loop, creds)
            else:
                impl = SyncImpl(kind, url, mech)
                go = _threads_wave(impl, creds)
            measured: list[_Wave] = []
            live = total = distinct = 0
            try:
                for w in range(waves + 1):
                    wave = _measure(srv, go)
                    n_live = asyncio.run(_check_and_end(url, wave.sessions))
                    if w == 0:
                        continue  # warm-up
                    measured.append(wave)
                    live += n_live
                    total += len(wave.sessions) + wave.errors
                    distinct += len({s.sid for s in wave.sessions})
            finally:
                if ap is not None and loop is not None:
                    loop.run_until_complete(ap.aclose())
                    loop.close()
                if impl is not None:
                    impl.close()
            lat = [x for w in measured for x in w.latencies]
            rate = median([len(w.sessions) / w.wall for w in measured])
            wall = sum(w.wall for w in measured)
            ours = sum(w.cpu for w in measured) / wall
            theirs = sum(w.prosody_cpu for w in measured) / wall
            errors = sum(w.errors for w in measured)
            if kind == "baseline":
                base_rate, base_p99 = rate, p99(lat)
            if theirs >= 0.85:
                limit = "Prosody (its one core)"
            elif ours >= 0.85:
                limit = "web process (CPU)"
            else:
                limit = "neither saturated (latency-bound)"
            rows.append(
                [
                    kind,
                    mode,
                    f"{rate:.0f}/s",
                    f"{rate / base_rate:.2f}x" if base_rate else "-",
                    f"{median(lat) * 1000:.1f} ms",
                    f"{p99(lat) * 1000:.1f} ms",
                    f"{p99(lat) / base_p99:.2f}x" if base_p99 else "-",
                    f"{distinct}/{total}",
                    f"{live}/{total}",
                    errors,
                    verdict(distinct == total and live == total and errors == 0),
                    f"{ours:.2f}",
                    f"{theirs:.2f}",
                    limit,
                ]
            )
            data[f"{kind}/{mode}"] = {
                "prebinds_per_s": rate,
                "p50_ms": median(lat) * 1000,
                "p99_ms": p99(lat) * 1000,
                "live": live,
                "total": total,
                "distinct": distinct,
                "errors": errors,
                "web_cpu_cores": ours,
                "prosody_cpu_cores": theirs,
            }
    table = md_table(
        [
            "impl",
            "mode",
            "prebinds/s (median wave)",
            "vs baseline",
            "p50",
            "p99",
            "p99 vs baseline",
            "distinct sessions",
            "live",
            "errors",
            "all distinct & live",
            "web process CPU (cores)",
            "Prosody CPU (cores)",
            "limit",
        ],
        rows,
    )
    return Result(
        "3. Concurrent prebinds (64 users at once)",
        [table],
        [
            f"{USERS} distinct accounts, {mech}, Prosody with hashed storage; {waves} measured"
            " waves of 64 simultaneous prebinds per row after one warm-up wave.",
            "live: every session checked with a roster query right after its wave; CPU columns are"
            " CPU seconds / wall seconds over the measured waves (1.00 = one core busy).",
            "The machine has 2 cores shared by this process, Prosody and the delay-free loopback.",
        ],
        data,
    )
