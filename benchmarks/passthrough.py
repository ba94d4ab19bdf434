"""5. Pass-through overhead: requests the middleware does not touch, through real servers under
a load generator at fixed concurrency, with and without the middleware.

uvicorn (ASGI; uvloop/httptools when installed) and waitress (WSGI), started twice for each row
(the app with and without the middleware), both pinned to CPU 0; one load generator per server
(wrk, else ``_loadgen.py``), both pinned to CPU 1, 32 keep-alive connections each, fixed
duration. The two variants are loaded at the same time: the scheduler gives each server about
half of CPU 0, so their throughput ratio is close to their cost ratio, measured under the same
conditions. (Run one after the other, the same ratio drifted by up to 30 % between runs on a
shared VM.) Each server's own CPU time per request is read too: the cost ratio itself, however
the scheduler happened to share the core.
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
from dataclasses import dataclass
from pathlib import Path

from ._util import Result, cpu_ns, md_table, median, verdict

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


@dataclass
class _Server:
    url: str
    pid: int


@contextlib.contextmanager
def _server(kind: str, app: str) -> Iterator[_Server]:
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    factory = app.startswith(("starlette", "flask", "django"))  # built by a call
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
        yield _Server(url, proc.pid)  # (taskset execs the server: the same process)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _load_cmd(url: str, headers: list[str], seconds: float) -> list[str]:
    if shutil.which("wrk"):
        cmd = [*_pin(1), "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s"]
        for h in headers:
            cmd += ["-H", h]
        return [*cmd, url]
    return [
        *_pin(1),
        sys.executable,
        str(Path(__file__).parent / "_loadgen.py"),
        url,
        str(CONNECTIONS),
        str(seconds),
        *headers,
    ]


def _load(urls: list[str], headers: list[str], seconds: float) -> list[tuple[float, int, int]]:
    """Load all ``urls`` at the same time, one load generator each, started in the order
    given; (req/s, non-2xx, requests) each."""
    procs = [
        subprocess.Popen(
            _load_cmd(url, headers, seconds),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for url in urls
    ]
    out = []
    for proc in procs:
        try:
            text, _ = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        m = re.search(r"Requests/sec:\s+([\d.]+)", text)
        n = re.search(r"(\d+) requests in ", text)
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
        if m is None or n is None:
            raise RuntimeError(f"load generator output not understood:\n{text}")
        out.append((float(m.group(1)), int(bad.group(1)) if bad else 0, int(n.group(1))))
    return out


#: The app each variant serves (benchmarks/_passapps.py: ``<prefix>_<app>``).
_APPS = {
    "without": "without",
    "with": "with",
    "control": "without",
    "floor": "empty",
    "look": "look",
    "navonly": "navonly",
}


def _pair(
    kind: str,
    prefix: str,
    other: str,
    path: str,
    headers: list[str],
    seconds: float,
    reps: int,
    quick: bool,
) -> tuple[dict[str, list[float]], list[float], int, dict[str, float]]:
    """One row: the app without the middleware and ``other``, each in a server of its own
    started for this row, loaded together ``reps`` times. Fresh servers for every row: a
    server that has served a few million requests costs 2-5 % more per request than a new
    one (measured: the reference server of the earlier layout, which served every row,
    against copies of itself started later), and the two of a pair must have the same
    past. Returns the req/s of each, the ratios, non-2xx answers, and each server's CPU
    per request (us)."""
    pair = ("without", other)
    with contextlib.ExitStack() as stack:
        servers = {v: stack.enter_context(_server(kind, f"{prefix}_{_APPS[v]}")) for v in pair}
        results: dict[str, list[float]] = {v: [] for v in pair}
        cpu = dict.fromkeys(pair, 0)  # server CPU (ns) and requests, over all runs
        served = dict.fromkeys(pair, 0)
        ratios: list[float] = []
        errors = 0
        if not quick:
            _load([servers[v].url + path for v in pair], headers, 1.0)  # warm-up
        for rep in range(reps):
            # Both at once, from the same core: the scheduler gives each server half of it,
            # so the throughput ratio is the cost ratio, and the machine's drift (tens of per
            # cent on a shared VM) hits both alike. Whose load generator starts first
            # alternates, so that neither has that edge.
            order = pair if rep % 2 == 0 else pair[::-1]
            before = {v: cpu_ns(servers[v].pid) for v in order}
            both = _load([servers[v].url + path for v in order], headers, seconds)
            for variant, (rps, bad, n) in zip(order, both, strict=True):
                results[variant].append(rps)
                errors += bad
                cpu[variant] += cpu_ns(servers[variant].pid) - before[variant]
                served[variant] += n
            ratios.append(results[other][-1] / results["without"][-1])
    # the servers' own CPU per request: the cost ratio, whoever's load generator got more
    # of its core
    per = {v: cpu[v] / max(served[v], 1) / 1e3 for v in pair}
    return results, ratios, errors, per


def _micro_rows(pairs: int, data: dict[str, object]) -> tuple[str, dict[str, dict[str, float]]]:
    """The in-process table, and the middleware's cost per request (us) by scenario and by
    interface, to predict each server row's ratio."""
    from . import _micro
    from ._passapps import SCENARIOS

    rows = []
    extra: dict[str, dict[str, float]] = {}
    for name, key, path, request_headers in SCENARIOS:
        a = _micro.asgi_cost(path, request_headers, pairs)
        w = _micro.wsgi_cost(path, request_headers, pairs)
        ab = _micro.asgi_bytecodes(path, request_headers)
        wb = _micro.wsgi_bytecodes(path, request_headers)
        extra[key] = {
            "asgi": a["middleware"] - a["bare"],
            "wsgi": w["middleware"] - w["bare"],
            "asgi-floor": a["empty wrapper"] - a["bare"],
            "wsgi-floor": w["empty wrapper"] - w["bare"],
        }
        rows.append(
            [
                name,
                f"{a['bare']:.2f}",
                f"+{a['empty wrapper'] - a['bare']:.2f}",
                f"+{extra[key]['asgi']:.2f}",
                f"+{ab['middleware'] - ab['bare']} ({ab['empty wrapper'] - ab['bare']})",
                f"{w['bare']:.2f}",
                f"+{w['empty wrapper'] - w['bare']:.2f}",
                f"+{extra[key]['wsgi']:.2f}",
                f"+{wb['middleware'] - wb['bare']} ({wb['empty wrapper'] - wb['bare']})",
            ]
        )
        data[f"micro/{key}"] = {"asgi": a, "wsgi": w, "asgi_bytecodes": ab, "wsgi_bytecodes": wb}
    table = md_table(
        [
            "request (in process, us per request)",
            "ASGI bare app",
            "empty wrapper",
            "middleware",
            "bytecodes: middleware (empty wrapper)",
            "WSGI bare app",
            "empty wrapper",
            "middleware",
            "bytecodes: middleware (empty wrapper)",
        ],
        rows,
    )
    return table, extra


def run(*, quick: bool = False, **_: object) -> Result:
    # The scenarios are defined next to the apps, without importing the middleware here.
    from . import _micro
    from ._passapps import SCENARIOS, STARLETTE_SCENARIOS

    seconds, reps = (1.0, 2) if quick else (2.0, 7)
    pairs = 50 if quick else _micro.PAIRS
    rows: list[list[object]] = []
    data: dict[str, object] = {}
    # in-process cost first: what the middleware adds to one request, without server noise
    micro, extra = _micro_rows(pairs, data)
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
        ("waitress (4 threads), Flask app", "waitress", "flask"),
        ("waitress (4 threads), Django app", "waitress", "django"),
    ]
    if quick:  # the smoke run keeps one ASGI and one WSGI server
        servers = [servers[0], servers[2]]
    for label, kind, prefix in servers:
        scenarios = [*SCENARIOS, *(STARLETTE_SCENARIOS if prefix == "starlette" else [])]
        cases = [(name, key, path, hdrs, "with") for name, key, path, hdrs in scenarios]
        # the method's own error: the same app against itself (JSON API, logged in)
        name, key, path, hdrs = SCENARIOS[1]
        cases.append((f"control: {name}, without vs without", "control", path, hdrs, "control"))
        cases.append((f"floor: {name}, an empty middleware", "floor", path, hdrs, "floor"))
        # the setting that leaves a request that says nothing alone (not the default)
        name, key, path, hdrs = SCENARIOS[2]
        cases.append((f"{name}, navigation_only=True", "navonly", path, hdrs, "navonly"))
        # what looking at a response at all costs, where a request says nothing (for Flask,
        # where an extension learns the user and sees the response only in request hooks: the
        # two hooks such a request passes)
        look = (
            "two empty request hooks (the after one reads Content-Type)"
            if prefix == "flask"
            else "an empty middleware that reads the response's Content-Type"
        )
        cases.append((f"look floor: {name}, {look}", "look", path, hdrs, "look"))
        for name, key, path, request_headers, other in cases:
            headers = [f"{k}: {v}" for k, v in request_headers]
            results, ratios, errors, per = _pair(
                kind, prefix, other, path, headers, seconds, reps, quick
            )
            wo = median(results["without"])
            ratio = median(ratios)
            # what the in-process cost alone predicts: each request takes 0.5/rps s of
            # CPU 0 (the server has half of it), plus the middleware's microseconds
            api = "wsgi" if kind == "waitress" else "asgi"
            if other == "with":  # (StaticFiles: the in-process cost of the excluded path)
                cost = extra["static" if key == "staticfiles" else key][api]
            elif other == "floor":  # the empty wrapper of the in-process table
                cost = extra[SCENARIOS[1][1]][f"{api}-floor"]
            else:
                cost = 0.0
            # (navonly, look: not in the in-process table, so nothing to predict from)
            predicted = None if other in ("navonly", "look") else 1 / (1 + cost * 1e-6 * 2 * wo)
            rows.append(
                [
                    label,
                    name,
                    f"{wo:,.0f}",
                    f"{median(results[other]):,.0f}",
                    f"{ratio:.3f}x",
                    f"{min(ratios):.2f}-{max(ratios):.2f}",
                    f"{per['without']:.1f} / {per[other]:.1f} us"
                    f" ({per['without'] / per[other]:.3f}x)",
                    "-" if predicted is None else f"{predicted:.3f}x",
                    verdict(ratio >= 0.98) if other == "with" else "-",
                    errors,
                ]
            )
            data[f"{prefix}/{key}"] = {
                **results,
                "ratios": ratios,
                "ratio": ratio,
                "server_cpu_us_per_request": per,
                "predicted": predicted,
            }
    table = md_table(
        [
            "server",
            "request",
            "req/s without",
            "req/s with",
            "ratio (median)",
            "ratios (min-max)",
            "server CPU per request: without / with (ratio)",
            "predicted from in-process cost",
            "target >= 0.98x",
            "non-2xx",
        ],
        rows,
    )
    return Result(
        "5. Pass-through overhead under load",
        [table, micro],
        [
            f"{gen}, {CONNECTIONS} keep-alive connections per server, {seconds:g} s per run. Each"
            " row starts its own two servers (a server that has served millions of requests costs"
            " more per request than a new one). Both variants run at the same time, both servers"
            " pinned to CPU 0 (each gets half of it: the req/s are per half core), both load"
            " generators to CPU 1. The ratio is the"
            f" median of {reps} such runs; whose load generator starts first alternates. The"
            " control rows load two copies of the app without the middleware the same way: how"
            " far from 1.00x the method itself strays. The floor rows load the app wrapped in an"
            " empty middleware class (one more await, or call, per request; _passapps._Empty):"
            " what any middleware at all costs there. The look floor rows load the app in an"
            " empty middleware that reads the response's Content-Type from a send (or"
            " start_response) of its own (_passapps._Look), the least a middleware that must"
            " tell a page from anything else by its response can do; for Flask, whose"
            " extensions learn the user and see the response only in request hooks, two empty"
            " hooks, the after one reading Content-Type, which such a request passes (the"
            " extension's after function is asked for only by a request that may be a page). The"
            " navigation_only rows send the"
            " no-browser-headers request to the middleware set up with navigation_only=True"
            " (README, Settings), which passes a request that says nothing through without"
            " looking at its response: not the default, so no verdict.",
            "Server CPU per request: each server process's CPU time (all threads, /proc"
            " schedstat) over all runs, divided by the requests it served; the ratio"
            " (without / with) is the throughput ratio a fully loaded server would have, free"
            " of how the two load generators shared their core.",
            "Predicted = 1 / (1 + middleware's in-process cost x 2 x req/s without): what the"
            " microseconds of the second table alone would cost at that request rate on half a"
            " core.",
            "Same raw ASGI/WSGI app and auth layer in every variant (benchmarks/_passapps.py); the"
            " only difference is the middleware (exclude_paths=('/static/',)).",
            "The raw apps are as cheap as an app gets (a few us), the worst case for the ratio; the"
            " Starlette rows serve the same routes through a framework, as most apps do, with the"
            " Starlette adapter (bosh_middleware.starlette) in Starlette's own middleware stack,"
            " where app.add_middleware puts it. Their extra StaticFiles row serves the same"
            " JavaScript from a file on disk (benchmarks/static/), as a Starlette app serves its"
            " static files. The Flask and Django rows serve the same routes through those"
            " frameworks under waitress, each adapter added as the README says (BOSHPrebind(app);"
            " the middleware in MIDDLEWARE after the auth layer's), in a project with nothing"
            " else (no sessions, CSRF or templates: benchmarks/_wsgiframeworks.py), so that the"
            " framework's own share is as small as it gets there.",
            "Logged in = an X-User header (the auth layer). 'JSON API (logged in)' sends what a"
            " browser's fetch() sends (Accept: application/json, Sec-Fetch-Dest: empty,"
            " Sec-Fetch-Mode: cors): the request alone says no page will carry a session. 'no"
            " browser headers' sends neither Accept nor Sec-Fetch-* (as wrk does), 'Accept: */*'"
            " only that (what curl, requests and httpx send by default): for both the"
            " middleware must look at the response's start, the residual cost of inspection."
            " 'HTML page (anonymous)' sends no browser headers either, 'browser navigation' what"
            " a browser sends when it opens a page (Accept: text/html..., Sec-Fetch-Dest:"
            " document, Sec-Fetch-Mode: navigate).",
            "Second table: the middleware's own cost per request in process, against the bare app"
            " and an empty pass-through wrapper (the floor): medians of"
            f" {pairs} back-to-back pairs of {_micro.CHUNK}-call chunks (benchmarks/_micro.py)."
            " The bytecodes columns count the Python instructions one request executes beyond"
            " the bare app's (sys.settrace): exact and the same on every run, where the"
            " microseconds drift with the machine.",
        ],
        data,
    )
