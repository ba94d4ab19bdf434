"""Shared harness: Prosody on 127.0.0.1, users, liveness checks, statistics, tables, machine."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from lxml import etree

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from bosh_middleware import PrebindSession  # noqa: E402
from support.xmpp_servers import XMPPServer, start_prosody  # noqa: E402

__all__ = [
    "MISS",
    "PASS",
    "Prosody",
    "Result",
    "Timer",
    "acheck_live",
    "check_live",
    "fmt_ms",
    "machine_info",
    "machine_table",
    "md_table",
    "median",
    "p99",
    "prosody",
    "ratio",
    "verdict",
]

NS_HTTPBIND = "http://jabber.org/protocol/httpbind"
PASS, MISS = "PASS", "MISS"


# --- results ----------------------------------------------------------------------------------
@dataclass
class Result:
    """What a section hands back: a title, markdown tables and notes."""

    title: str
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        for t in self.tables:
            out += [t, ""]
        out += [f"- {n}" for n in self.notes]
        return "\n".join(out).rstrip() + "\n"


class Bytecodes:
    """Counts the Python bytecode instructions executed while on (``sys.settrace`` opcode
    events), by ``key(filename)`` of the code running them. Unlike times, the counts are the
    same on every machine and every run. (The trace function's own work is not traced.)"""

    def __init__(self, key: Callable[[str], str] = lambda filename: "all") -> None:
        self.key = key
        self.counts: collections.Counter[str] = collections.Counter()
        self._previous: Any = None

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.counts[self.key(frame.f_code.co_filename)] += 1
        return self._trace

    def __enter__(self) -> collections.Counter[str]:
        self._previous = sys.gettrace()
        sys.settrace(self._trace)
        return self.counts

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)


def verdict(ok: bool) -> str:
    return PASS if ok else MISS


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in cells[1:]
    ]
    return "\n".join(lines)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p99(xs: Sequence[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(0.99 * len(s) + 0.5) - 1))]


def fmt_ms(seconds: float, digits: int = 2) -> str:
    return f"{seconds * 1000:.{digits}f} ms"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


# --- machine ----------------------------------------------------------------------------------
def _cmd(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, str]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    prosody_v = _cmd("dpkg-query", "-W", "-f", "${Version}", "prosody") or "?"
    lua = ""
    versions = {}
    from importlib.metadata import version

    for mod in ("httpx", "httpcore", "lxml", "uvicorn", "waitress"):
        try:
            versions[mod] = version(mod)
        except Exception:
            versions[mod] = "-"
    wrk = shutil.which("wrk")
    from bosh_middleware import scram

    pbkdf2 = scram.pbkdf2_backend()
    if pbkdf2 == "cryptography":
        from cryptography.hazmat.backends.openssl import backend

        pbkdf2 += f" {version('cryptography')}"
        pbkdf2 += f" ({backend.openssl_version_text()})"
    else:
        import ssl

        pbkdf2 += f" ({ssl.OPENSSL_VERSION})"
    return {
        "CPU": cpu or platform.processor() or "?",
        "cores": str(os.cpu_count()),
        "memory": mem,
        "OS": f"{_cmd('sh', '-c', '. /etc/os-release && echo $PRETTY_NAME') or platform.system()}, "
        f"kernel {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "Prosody": f"{prosody_v} (dpkg-query -W prosody){lua}",
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "engine's PBKDF2 (scram.pbkdf2_backend)": pbkdf2,
        "load generator": (_cmd("wrk", "-v").splitlines() or ["wrk"])[0].split(" [")[0]
        if wrk
        else "python asyncio (wrk not installed)",
        "reverse proxy (section 1)": (
            f"nginx {_cmd('dpkg-query', '-W', '-f', '${Version}', 'nginx') or '?'}"
            if shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
            else "- (nginx not installed)"
        ),
    }


def machine_table() -> str:
    return md_table(["machine", ""], list(machine_info().items()))


def cpu_ns(pid: int) -> int:
    """CPU time (ns) of every thread of process ``pid`` so far (/proc schedstat: exact to the
    nanosecond, where /proc/<pid>/stat counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


# --- Prosody ----------------------------------------------------------------------------------
class Prosody:
    """A private Prosody on 127.0.0.1 (tests/support/xmpp_servers.py), with production-like
    logging (``info`` to file instead of the test-suite's ``debug``) unless told otherwise."""

    def __init__(
        self, *, secure: bool, log_level: str = "info", password_hash: str = "SHA-1"
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-prosody-{'s' if secure else 'h'}-"))
        self.srv: XMPPServer = start_prosody(
            self.workdir, secure=secure, password_hash=password_hash
        )
        if log_level != "debug":
            cfg = self.workdir / "prosody.cfg.lua"
            cfg.write_text(cfg.read_text().replace('min = "debug"', f'min = "{log_level}"'))
            self.srv.stop()
            self.srv.start()
        self._users: list[tuple[str, str]] = []

    @property
    def service_url(self) -> str:
        return self.srv.service_url

    @property
    def pid(self) -> int:
        proc = self.srv._proc
        assert proc is not None
        return proc.pid

    def cpu_ns(self) -> int:
        """Prosody's CPU time so far, exact (see ``cpu_ns``)."""
        return cpu_ns(self.pid)

    def users(self, n: int) -> list[tuple[str, str]]:
        """``n`` distinct registered accounts (prosodyctl, a few at a time)."""
        missing = n - len(self._users)
        if missing > 0:
            with ThreadPoolExecutor(4) as pool:
                self._users += list(pool.map(lambda _: self.srv.new_user("bench"), range(missing)))
        return self._users[:n]

    def stop(self) -> None:
        self.srv.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def prosody(
    *, secure: bool, log_level: str = "info", password_hash: str = "SHA-1"
) -> Iterator[Prosody]:
    srv = Prosody(secure=secure, log_level=log_level, password_hash=password_hash)
    try:
        yield srv
    finally:
        srv.stop()


# --- liveness ---------------------------------------------------------------------------------
_ROSTER = (
    "<body rid='{rid}' sid='{sid}' xmlns='http://jabber.org/protocol/httpbind'>"
    "<iq type='get' id='r1' xmlns='jabber:client'><query xmlns='jabber:iq:roster'/></iq></body>"
)


def _is_roster_result(content: bytes) -> bool:
    root = etree.fromstring(content)
    return any(
        etree.QName(el).localname == "iq" and el.get("type") == "result" and el.get("id") == "r1"
        for el in root
    )


LIVE_TIMEOUT = 2.0  # a live session answers a roster query in milliseconds


def check_live(client: httpx.Client, session: PrebindSession) -> tuple[bool, PrebindSession]:
    """Roster get on the prebound session; returns (live?, the session with its next RID).

    Not live = an error, no iq result, or no answer within LIVE_TIMEOUT (the server held the
    request: its answer went elsewhere)."""
    body = _ROSTER.format(rid=session.rid, sid=session.sid).encode()
    try:
        r = client.post(
            session.service_url,
            content=body,
            headers={"Content-Type": "text/xml"},
            timeout=LIVE_TIMEOUT,
        )
        ok = r.status_code == 200 and _is_roster_result(r.content)
    except (httpx.HTTPError, etree.XMLSyntaxError):
        ok = False
    return ok, dataclasses.replace(session, rid=session.rid + 1)


async def acheck_live(
    client: httpx.AsyncClient, session: PrebindSession
) -> tuple[bool, PrebindSession]:
    body = _ROSTER.format(rid=session.rid, sid=session.sid).encode()
    try:
        r = await client.post(
            session.service_url,
            content=body,
            headers={"Content-Type": "text/xml"},
            timeout=LIVE_TIMEOUT,
        )
        ok = r.status_code == 200 and _is_roster_result(r.content)
    except (httpx.HTTPError, etree.XMLSyntaxError):
        ok = False
    return ok, dataclasses.replace(session, rid=session.rid + 1)


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
