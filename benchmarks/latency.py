"""1. Prebind latency and HTTP round trips per SASL mechanism, engine vs the classic baseline.

Every iteration runs the implementations back to back (order rotated), each prebind timed on its
own, its HTTP requests, critical-path round trips and new TCP connections counted on the wire
(``_wire.py``, independent of what the engine reports), its session checked live with a roster
query and then terminated. Scenarios:

* Prosody with ``internal_plain`` storage (``consider_bosh_secure``: offers PLAIN, SCRAM-SHA-1,
  SCRAM-SHA-256). Prosody salts every SCRAM attempt afresh with this storage, so the engine's
  salted-password cache cannot hit: both sides run PBKDF2 on every login.
* Prosody with ``internal_hashed`` storage (its default; SCRAM-SHA-1 only): stable salt, so the
  engine's cache is warm after the first login.
* The same over an emulated link (``--rtt`` ms round-trip time, ``delayproxy.py``): what round
  trips and new connections cost once the XMPP server is not on the web server's loopback.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import httpx

from bosh_middleware import Credentials

from ._impls import IMPLS, SyncImpl
from ._util import Result, check_live, fmt_ms, md_table, median, p99, prosody, ratio, verdict
from .delayproxy import DelayProxy

MAX_RT = {"PLAIN": 3, "SCRAM-SHA-1": 4, "SCRAM-SHA-256": 4}


@dataclass
class _Series:
    times: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    rts: list[int] = field(default_factory=list)
    self_rts: list[int] = field(default_factory=list)
    connects: list[int] = field(default_factory=list)
    live: int = 0
    n: int = 0


def _measure(
    url: str, mech: str, creds: Credentials, iterations: int, warmup: int
) -> dict[str, _Series]:
    impls = {k: SyncImpl(k, url, mech) for k in IMPLS}
    series = {k: _Series() for k in IMPLS}
    checker = httpx.Client()
    try:
        for i in range(warmup + iterations):
            order = list(IMPLS[i % 3 :] + IMPLS[: i % 3])
            for kind in order:
                impl = impls[kind]
                t0 = time.perf_counter()
                session = impl.prebind_counted(creds)
                elapsed = time.perf_counter() - t0
                reqs, rts, connects = impl.wire.snapshot()
                live, session = check_live(checker, session)
                impl.terminate(session)
                if i < warmup:
                    continue
                s = series[kind]
                s.n += 1
                s.times.append(elapsed)
                s.requests.append(reqs)
                s.rts.append(rts)
                s.self_rts.append(session.round_trips)
                s.connects.append(connects)
                s.live += live
    finally:
        checker.close()
        for impl in impls.values():
            impl.close()
    return series


def _rows(label: str, mech: str, series: dict[str, _Series]) -> list[list[object]]:
    base = median(series["baseline"].times)
    rows = []
    for kind in IMPLS:
        s = series[kind]
        med = median(s.times)
        rt = int(median(s.rts))
        if kind == "baseline":
            target = "-"
        else:
            ok_rt = rt <= MAX_RT[mech]
            ok_lat = med <= 0.5 * base
            target = f"RT {verdict(ok_rt)}, latency {verdict(ok_lat)}"
        rows.append(
            [
                label,
                mech,
                kind,
                fmt_ms(med),
                fmt_ms(p99(s.times)),
                ratio(med, base) if kind != "baseline" else "1.00x",
                f"{rt} (max {max(s.rts)}) / {max(s.self_rts) if kind != 'baseline' else '-'}",
                f"{median(s.requests):g}",
                f"{median(s.connects):g}",
                f"{s.live}/{s.n}",
                target,
            ]
        )
    return rows


def run(*, quick: bool = False, rtt_ms: float = 5.0, log_level: str = "info") -> Result:
    iterations, warmup = (8, 2) if quick else (60, 5)
    rows: list[list[object]] = []
    data: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        secure = stack.enter_context(prosody(secure=True, log_level=log_level))
        hashed = stack.enter_context(prosody(secure=False, log_level=log_level))
        s_creds = Credentials(*secure.users(1)[0])
        h_creds = Credentials(*hashed.users(1)[0])
        scenarios = [
            (
                "loopback, plain store",
                secure.service_url,
                s_creds,
                ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"],
            ),
            ("loopback, hashed store", hashed.service_url, h_creds, ["SCRAM-SHA-1"]),
        ]
        if rtt_ms > 0:
            s_url = stack.enter_context(DelayProxy(secure.service_url, rtt_ms))
            h_url = stack.enter_context(DelayProxy(hashed.service_url, rtt_ms))
            link = f"{rtt_ms:g} ms RTT"
            scenarios += [
                (f"{link}, plain store", s_url, s_creds, ["PLAIN", "SCRAM-SHA-256"]),
                (f"{link}, hashed store", h_url, h_creds, ["SCRAM-SHA-1"]),
            ]
        for label, url, creds, mechs in scenarios:
            n = iterations if "RTT" not in label else max(4, iterations // 3)
            for mech in mechs:
                series = _measure(url, mech, creds, n, warmup)
                rows += _rows(label, mech, series)
                data[f"{label}/{mech}"] = {
                    k: {
                        "median_ms": median(v.times) * 1000,
                        "p99_ms": p99(v.times) * 1000,
                        "round_trips": median(v.rts),
                        "round_trips_max": max(v.rts),
                        "requests": median(v.requests),
                        "live": v.live,
                        "n": v.n,
                    }
                    for k, v in series.items()
                }
    table = md_table(
        [
            "scenario",
            "mechanism",
            "impl",
            "median",
            "p99",
            "vs baseline",
            "round trips: wire median (max) / self-reported",
            "HTTP requests",
            "new TCP conns",
            "live",
            "target (RT <= 3 PLAIN / 4 SCRAM; median <= 0.50x)",
        ],
        rows,
    )
    return Result(
        "1. Prebind latency and round trips",
        [table],
        [
            f"{iterations} prebinds per implementation and mechanism on loopback "
            f"({max(4, iterations // 3)} over the emulated link), after {warmup} warm-up rounds;"
            " implementations interleaved in rotating order.",
            "Round trips are measured on the wire (longest chain of requests each sent after the"
            " previous answer arrived); the engine's own count is shown after the slash.",
            "baseline = benchmarks/baseline.py (new TCP connection per request, sequential,"
            " PBKDF2 each time, legacy session IQ); engine = src as shipped (builtin transport);"
            " httpx = the same engine with transport='httpx'.",
        ],
        data,
    )
