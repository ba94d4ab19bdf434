"""5. Pass-through overhead: requests the middleware does not touch, through real servers under
a load generator at fixed concurrency, with and without the middleware.

uvicorn (ASGI; uvloop/httptools when installed) and waitress (WSGI), each started twice (the app
with and without the middleware), pinned to CPU 0; the load generator (wrk, else
``_loadgen.py``) pinned to CPU 1, 32 keep-alive connections, fixed duration. Runs alternate
with/without (order swapped every repetition); the ratio compares the medians.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ._util import Result, md_table, median, verdict

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: int) -> list[str]:
    return (
        ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    )


@contextlib.contextmanager
def _server(kind: str, app: str) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    factory = app.startswith("starlette")
    if kind == "uvicorn":
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            f"benchmarks._passapps:{app}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            *(["--factory"] if factory else []),
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "waitress",
            "--host=127.0.0.1",
            f"--port={port}",
            "--threads=4",
            *(["--call"] if factory else []),
            f"benchmarks._passapps:{app}",
        ]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - never a pipe: a server blocked on a full pipe stalls
    proc = subprocess.Popen(
        [*_pin(0), *cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/api/items", timeout=1) as r:
                    r.read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    raise RuntimeError(f"{kind} did not start: {err[-2000:]}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _load(url: str, headers: list[str], seconds: float) -> tuple[float, int]:
    if shutil.which("wrk"):
        cmd = [*_pin(1), "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s"]
        for h in headers:
            cmd += ["-H", h]
        cmd.append(url)
    else:
        cmd = [
            *_pin(1),
            sys.executable,
            str(Path(__file__).parent / "_loadgen.py"),
            url,
            str(CONNECTIONS),
            str(seconds),
            *headers,
        ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m is None:
        raise RuntimeError(f"load generator output not understood:\n{out}")
    return float(m.group(1)), int(bad.group(1)) if bad else 0


def run(*, quick: bool = False, **_: object) -> Result:
    # The scenarios are defined next to the apps, without importing the middleware here.
    from ._passapps import SCENARIOS

    seconds, reps = (1.0, 1) if quick else (2.0, 3)
    rows: list[list[object]] = []
    data: dict[str, object] = {}
    gen = "wrk" if shutil.which("wrk") else "benchmarks/_loadgen.py"
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401

        uv = "uvicorn (uvloop, httptools)"
    except ImportError:
        uv = "uvicorn (asyncio, h11)"
    servers = [
        (uv, "uvicorn", "asgi"),
        (f"{uv}, Starlette app", "uvicorn", "starlette"),
        ("waitress (4 threads)", "waitress", "wsgi"),
    ]
    if quick:  # the smoke run keeps one ASGI and one WSGI server
        servers = [servers[0], servers[2]]
    variants = ("without", "with")
    for label, kind, prefix in servers:
        with contextlib.ExitStack() as stack:
            urls = {v: stack.enter_context(_server(kind, f"{prefix}_{v}")) for v in variants}
            for name, key, path, request_headers in SCENARIOS:
                headers = [f"{k}: {v}" for k, v in request_headers]
                results: dict[str, list[float]] = {v: [] for v in variants}
                errors = 0
                if not quick:
                    for url in urls.values():
                        _load(url + path, headers, 1.0)  # warm-up
                for rep in range(reps):
                    order = list(variants[rep % 2 :] + variants[: rep % 2])
                    for variant in order:
                        rps, bad = _load(urls[variant] + path, headers, seconds)
                        results[variant].append(rps)
                        errors += bad
                wo = median(results["without"])
                w = median(results["with"])
                spread = (max(results["without"]) - min(results["without"])) / wo
                rows.append(
                    [
                        label,
                        name,
                        f"{wo:,.0f}",
                        f"{w:,.0f}",
                        f"{w / wo:.3f}x",
                        verdict(w / wo >= 0.98),
                        f"{spread * 100:.1f} %",
                        errors,
                    ]
                )
                data[f"{prefix}/{key}"] = {**results, "ratio": w / wo}
    table = md_table(
        [
            "server",
            "request",
            "req/s without",
            "req/s with",
            "ratio",
            "target >= 0.98x",
            "run-to-run spread (without)",
            "non-2xx",
        ],
        rows,
    )
    # in-process cost: what the middleware adds to one request, without server noise
    from . import _micro

    pairs = 50 if quick else _micro.PAIRS
    micro_rows = []
    for name, key, path, request_headers in SCENARIOS:
        a = _micro.asgi_cost(path, request_headers, pairs)
        w_ = _micro.wsgi_cost(path, request_headers, pairs)
        micro_rows.append(
            [
                name,
                f"{a['bare']:.2f}",
                f"+{a['empty wrapper'] - a['bare']:.2f}",
                f"+{a['middleware'] - a['bare']:.2f}",
                f"{w_['bare']:.2f}",
                f"+{w_['empty wrapper'] - w_['bare']:.2f}",
                f"+{w_['middleware'] - w_['bare']:.2f}",
            ]
        )
        data[f"micro/{key}"] = {"asgi": a, "wsgi": w_}
    micro = md_table(
        [
            "request (in process, us per request)",
            "ASGI bare app",
            "empty wrapper",
            "middleware",
            "WSGI bare app",
            "empty wrapper",
            "middleware",
        ],
        micro_rows,
    )
    return Result(
        "5. Pass-through overhead under load",
        [table, micro],
        [
            f"{gen}, {CONNECTIONS} keep-alive connections, {seconds:g} s per run, {reps} runs per"
            " variant in rotating order; server pinned to CPU 0, load generator to CPU 1. Medians.",
            "Same raw ASGI/WSGI app and auth layer in every variant (benchmarks/_passapps.py); the"
            " only difference is the middleware (exclude_paths=('/static/',)).",
            "The raw apps are as cheap as an app gets (a few us), the worst case for the ratio; the"
            " Starlette rows serve the same routes through a framework, as most apps do.",
            "Logged in = an X-User header (the auth layer). 'JSON API (logged in)' sends what a"
            " browser's fetch() sends (Accept: application/json, Sec-Fetch-Dest: empty,"
            " Sec-Fetch-Mode: cors): the request alone says no page will carry a session. 'no"
            " browser headers' sends neither Accept nor Sec-Fetch-* (curl, scripts): the"
            " middleware must look at the response's start, the residual cost of inspection.",
            "Second table: the middleware's own cost per request in process, against the bare app"
            " and an empty pass-through wrapper (the floor): medians of"
            f" {pairs} back-to-back pairs of {_micro.CHUNK}-call chunks (benchmarks/_micro.py).",
        ],
        data,
    )
