"""Helpers to check prebound sessions against the real server, watch the middleware's engine,
and inject faults.

* ``probe_session`` / ``is_live`` / ``is_dead``: a session is *live* iff a BOSH request with its
  sid and next rid, carrying a roster get, is answered with ``<iq type='result'/>``; it is
  *dead* when the server answers ``type='terminate'`` (Prosody: ``item-not-found``) or 404.
* ``PrebindSpy``: wraps the ``prebind``/``terminate`` of a core's engine (sync or async) to
  record calls, sessions and timings, optionally adding latency; the real server still does
  the work.
* ``FakeEndpoint``: an HTTP server on 127.0.0.1 that counts connections and requests and, per
  ``mode``, fails (HTTP 503), sleeps, or forwards to a real BOSH endpoint.

Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import re
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from bosh_middleware.client import AsyncPrebinder, Prebinder
from bosh_middleware.core import PrebindCore
from bosh_middleware.credentials import Credentials
from bosh_middleware.session import PrebindSession

__all__ = [
    "CountingCredentials",
    "FakeEndpoint",
    "PrebindSpy",
    "bare",
    "drain_async",
    "end_sessions",
    "is_dead",
    "is_live",
    "join_probes",
    "page_vars",
    "probe_session",
    "session_owner",
]

HB = "http://jabber.org/protocol/httpbind"
PROBE_TIMEOUT = 5.0
#: How long the first probe may take before a second one is sent (see ``probe_session``).
FIRST_PROBE_PATIENCE = 0.25

_next_rid: dict[str, int] = {}
#: The full JID the server addressed a probe's result to, by sid: whose session it really is.
_owner: dict[str, str] = {}
_next_rid_lock = threading.Lock()


def bare(jid: str) -> str:
    return jid.split("/", 1)[0]


def _roster_get(sid: str, rid: int, iq_id: str) -> bytes:
    return (
        f"<body rid='{rid}' sid='{sid}' xmlns='{HB}'>"
        f"<iq type='get' id='{iq_id}' xmlns='jabber:client'>"
        "<query xmlns='jabber:iq:roster'/></iq></body>"
    ).encode()


def _classify(status: int, body: bytes, iq_ids: Iterable[str]) -> str:
    """ "live" | "dead" | "empty" | "other:<detail>"."""
    if status == 404:
        return "dead"
    if status != 200:
        return f"other:http-{status}"
    try:
        root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError:
        return f"other:{body[:80]!r}"
    if root.get("type") == "terminate":
        return "dead"
    ids = set(iq_ids)
    for el in root:
        if el.tag == "{jabber:client}iq" and el.get("type") == "result" and el.get("id") in ids:
            sid = root.get("sid")
            if sid and el.get("to"):
                with _next_rid_lock:
                    _owner[sid] = el.get("to") or ""
            return "live"
    return "empty" if len(root) == 0 else f"other:{body[:600]!r}"


def _http_post(url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """One POST over a fresh connection (stdlib: no TLS context to build for plain http)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=timeout)
    try:
        conn.request("POST", u.path or "/", body, {"Content-Type": "text/xml; charset=utf-8"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _post(url: str, body: bytes, iq_ids: list[str], timeout: float) -> str:
    try:
        status, data = _http_post(url, body, timeout)
    except TimeoutError:
        return "timeout"
    except (OSError, http.client.HTTPException) as exc:
        return f"other:{type(exc).__name__}"
    return _classify(status, data, iq_ids)


class _Probe(threading.Thread):
    def __init__(self, url: str, body: bytes, ids: Iterable[str], timeout: float) -> None:
        super().__init__(name="bosh-probe", daemon=True)
        self.args_ = (url, body, list(ids), timeout)
        self.result: str | None = None

    def run(self) -> None:
        self.result = _post(*self.args_)


_outstanding: dict[str, list[_Probe]] = {}


def probe_session(
    service_url: str, sid: str, rid: int | None = None, *, timeout: float = PROBE_TIMEOUT
) -> str:
    """ "live", "dead", or what else the server said.

    ``rid`` defaults to the next one for this sid (the session's own ``rid`` at first).

    If the first answer is empty or has not come within ``FIRST_PROBE_PATIENCE``, a second
    roster get with the next rid is sent: a request left held at the server (the sync engine
    did that before commit 884e431) gets the answer meant for the first one, and a busy server
    may be slow; the session is live all the same, and the second get proves it. Its answer may
    arrive on either request; the one left held is released by ``end_sessions`` (or its own
    timeout), and is not waited for here.
    """
    with _next_rid_lock:
        rid = _next_rid.get(sid, rid)
    assert rid is not None, "give the session's rid for its first probe"
    ids = ("probe1", "probe2")
    probes = [_Probe(service_url, _roster_get(sid, rid, "probe1"), ids, timeout)]
    probes[0].start()
    probes[0].join(FIRST_PROBE_PATIENCE)
    if probes[0].result not in ("live", "dead"):
        probes.append(_Probe(service_url, _roster_get(sid, rid + 1, "probe2"), ids, timeout))
        probes[1].start()
        deadline = time.monotonic() + timeout + 1
        while time.monotonic() < deadline:
            decided = any(p.result in ("live", "dead") for p in probes)
            if decided or not any(p.is_alive() for p in probes):
                break
            time.sleep(0.005)
    with _next_rid_lock:
        _next_rid[sid] = rid + len(probes)
        _outstanding.setdefault(sid, []).extend(p for p in probes if p.is_alive())
    results = [p.result for p in probes]
    return next((r for r in results if r in ("live", "dead")), str(results))


def join_probes(sid: str | None = None, timeout: float = PROBE_TIMEOUT + 1) -> None:
    with _next_rid_lock:
        sids = [sid] if sid is not None else list(_outstanding)
        probes = [p for k in sids for p in _outstanding.pop(k, [])]
    deadline = time.monotonic() + timeout
    for p in probes:
        p.join(max(0.0, deadline - time.monotonic()))


def session_owner(sid: str) -> str | None:
    """The full JID the server bound ``sid`` to, as seen by a live probe (``None`` if none)."""
    with _next_rid_lock:
        return _owner.get(sid)


def is_live(service_url: str, session: PrebindSession) -> bool:
    return probe_session(service_url, session.sid, session.rid) == "live"


def is_dead(service_url: str, session: PrebindSession) -> bool:
    # The middleware's terminate used session.rid; any rid after it must be refused.
    with _next_rid_lock:
        _next_rid.setdefault(session.sid, session.rid + 1)
    return probe_session(service_url, session.sid) == "dead"


def end_sessions(service_url: str, sessions: Iterable[PrebindSession]) -> None:
    """Best-effort terminate (test teardown): frees the server, and any request it holds."""
    for s in sessions:
        with _next_rid_lock:
            rid = _next_rid.pop(s.sid, s.rid)
        body = (
            f"<body rid='{rid}' sid='{s.sid}' type='terminate' xmlns='{HB}'>"
            "<presence type='unavailable' xmlns='jabber:client'/></body>"
        ).encode()
        with contextlib.suppress(OSError, http.client.HTTPException):
            _http_post(service_url, body, 2.0)
        join_probes(s.sid)


_ASSIGN = re.compile(r'([A-Za-z_$][A-Za-z0-9_$]*)=("(?:[^"\\]|\\.)*"|-?[0-9]+)')


def page_vars(html: bytes | str, *, encoding: str = "utf-8") -> dict[str, Any] | None:
    """The variables of the one injected ``<script>var ...;</script>``, read through an HTML
    parser (lxml.html): ``None`` if the page has no such script; two or more is an error."""
    import lxml.html

    doc = lxml.html.document_fromstring(html if isinstance(html, str) else html.decode(encoding))
    scripts = [s for s in doc.iter("script") if (s.text or "").startswith("var ")]
    if not scripts:
        return None
    assert len(scripts) == 1, f"{len(scripts)} injected scripts"
    text = scripts[0].text or ""
    assert text.startswith("var ") and text.endswith(";"), text
    values: dict[str, Any] = {}
    for m in _ASSIGN.finditer(text[4:-1]):
        values[m.group(1)] = json.loads(m.group(2))
    return values


# ------------------------------------------------------------------------------------------
# Spy on the engine the middleware uses
# ------------------------------------------------------------------------------------------


@dataclass
class PrebindSpy:
    """Records what the middleware asks of its engine. Install with ``PrebindSpy.on(core)``.

    ``delay`` adds latency before each real prebind (to measure overlap with the view)."""

    delay: float = 0.0
    calls: list[Credentials] = field(default_factory=list)
    sessions: list[PrebindSession] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    intervals: list[tuple[float, float]] = field(default_factory=list)
    terminated: list[PrebindSession] = field(default_factory=list)
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def on(cls, core: PrebindCore, *, sync: bool, delay: float = 0.0) -> PrebindSpy:
        spy = cls(delay=delay)
        if sync:
            spy._wrap_sync(core.prebinder)
        else:
            spy._wrap_async(core.async_prebinder)
        return spy

    def _begin(self, credentials: Credentials) -> float:
        with self._lock:
            self.calls.append(credentials)
            self.in_flight += 1
        return time.monotonic()

    def _end(self, t0: float, session: PrebindSession | None, error: BaseException | None) -> None:
        with self._lock:
            self.intervals.append((t0, time.monotonic()))
            if session is not None:
                self.sessions.append(session)
            if error is not None:
                self.errors.append(error)
            self.in_flight -= 1

    def _wrap_sync(self, engine: Prebinder) -> None:
        real_prebind, real_terminate = engine.prebind, engine.terminate

        def prebind(credentials: Credentials, **kw: Any) -> PrebindSession:
            t0 = self._begin(credentials)
            session = error = None
            try:
                if self.delay:
                    time.sleep(self.delay)
                session = real_prebind(credentials, **kw)
                return session
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._end(t0, session, error)

        def terminate(session: PrebindSession) -> bool:
            with self._lock:
                self.in_flight += 1
            try:
                return real_terminate(session)
            finally:
                with self._lock:
                    self.terminated.append(session)
                    self.in_flight -= 1

        engine.prebind = prebind  # type: ignore[method-assign]
        engine.terminate = terminate  # type: ignore[method-assign]

    def _wrap_async(self, engine: AsyncPrebinder) -> None:
        real_prebind, real_terminate = engine.prebind, engine.terminate

        async def prebind(credentials: Credentials, **kw: Any) -> PrebindSession:
            t0 = self._begin(credentials)
            session = error = None
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
                session = await real_prebind(credentials, **kw)
                return session
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._end(t0, session, error)

        async def terminate(session: PrebindSession) -> bool:
            with self._lock:
                self.in_flight += 1
            try:
                return await real_terminate(session)
            finally:
                with self._lock:
                    self.terminated.append(session)
                    self.in_flight -= 1

        engine.prebind = prebind  # type: ignore[method-assign]
        engine.terminate = terminate  # type: ignore[method-assign]

    # -- waiting (bounded) ----------------------------------------------------------------------
    def wait_terminated(self, count: int = 1, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.terminated) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    async def await_terminated(self, count: int = 1, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.terminated) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until nothing has been in flight for a short while (sync engine, threads)."""
        if not self.calls:
            return True
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            if self.in_flight == 0:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 0.05:
                    return True
            else:
                quiet_since = None
            time.sleep(0.01)
        return False


class CountingCredentials:
    """A ``credentials`` callable that counts its calls (``calls``: the users it was asked for)
    and answers with ``inner``: no session can be prebound without a call here."""

    def __init__(self, inner: Callable[[Any], Any]) -> None:
        self.inner = inner
        self.calls: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, user: Any) -> Any:
        with self._lock:
            self.calls.append(user)
        return self.inner(user)


async def drain_async(core: PrebindCore, timeout: float = 5.0) -> None:
    """Wait for the core's background prebinds/terminates, then close its client (so no socket
    outlives the test's event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = set(core._tasks)
        if core._async is not None:
            tasks |= set(core._async._cleanup)
        tasks = {t for t in tasks if not t.done()}
        if not tasks:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=1)
            raise AssertionError(f"{len(tasks)} background task(s) still running at teardown")
        await asyncio.wait(tasks, timeout=remaining)
    await core.aclose()


# ------------------------------------------------------------------------------------------
# Fault injection: a counting endpoint on 127.0.0.1
# ------------------------------------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = True
    allow_reuse_address = True
    endpoint: FakeEndpoint

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.endpoint._lock:
            self.endpoint.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and left is expected here


class FakeEndpoint:
    """``mode``: "fail" (HTTP 503 at once), "sleep" (``sleep`` s, then 503), "forward" (to
    ``upstream``, requests sent to it in arrival order). Change ``mode`` at any time."""

    def __init__(
        self, mode: str = "fail", *, upstream: str | None = None, sleep: float = 5.0
    ) -> None:
        self.mode = mode
        self.upstream = upstream
        self.sleep = sleep
        self.connections = 0
        self.requests = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._order = threading.Lock()
        self._srv: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeEndpoint:
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"
            timeout = 10

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with endpoint._lock:
                    endpoint.requests += 1
                endpoint._answer(self, body)

            do_GET = do_POST

        self._srv = _Server(("127.0.0.1", 0), Handler)
        self._srv.endpoint = self
        self._thread = threading.Thread(
            target=self._srv.serve_forever,
            name="FakeEndpoint",
            kwargs={"poll_interval": 0.05},
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        srv, self._srv = self._srv, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()  # joins the handler threads (they wake up on ``stopping``)
        if self._thread is not None:
            self._thread.join(5)

    @property
    def url(self) -> str:
        assert self._srv is not None
        return f"http://127.0.0.1:{self._srv.server_address[1]}/http-bind"

    def _answer(self, h: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        mode = self.mode
        if mode == "sleep":
            self.stopping.wait(self.sleep)
            mode = "fail"
        if mode == "forward":
            assert self.upstream is not None
            status, ctype, data = self._forward(body)
        else:
            status, ctype, data = 503, "text/plain", b"unavailable"
        with contextlib.suppress(OSError):
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, str, bytes]:
        assert self.upstream is not None
        u = urllib.parse.urlsplit(self.upstream)
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
        try:
            with self._order:  # the server must see requests in the order we got them
                conn.request("POST", u.path, body, {"Content-Type": "text/xml; charset=utf-8"})
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type") or "text/xml", resp.read()
        except (OSError, http.client.HTTPException):
            return 502, "text/plain", b"bad gateway"
        finally:
            conn.close()


def port_is_closed(url: str) -> bool:
    u = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=0.5):
            return False
    except OSError:
        return True


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


#: ``exclude_paths=SEGMENT_EXCLUDES``: (path, excluded?) by whole path segments, as both
#: middlewares must judge them ("/admin" is not "/administrators"; "/static/" is under it).
SEGMENT_EXCLUDES = ("/admin", "/static/")
SEGMENT_CASES = [
    ("/admin", True),
    ("/admin/", True),
    ("/admin/users", True),
    ("/administrators", False),
    ("/adminx/a", False),
    ("/static/a.js", True),
    ("/static", False),
]


#: How the same HTML view is asked for: by the browser's address bar, or by a script.
REQUEST_KINDS: dict[str, dict[str, str]] = {
    "navigation": {
        "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
        "image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
        "Sec-Fetch-Dest": "document",
    },
    "fetch": {"Accept": "*/*", "Sec-Fetch-Dest": "empty"},
    "xhr": {"Accept": "text/html, */*; q=0.01", "X-Requested-With": "XMLHttpRequest"},
    "json-client": {"Accept": "application/json"},
}

#: Requests that say nothing of what they want: prebound by default once their response is a
#: page, passed through untouched with ``NAVIGATION_ONLY``.
SAYS_NOTHING: dict[str, dict[str, str]] = {"no-headers": {}, "curl": {"Accept": "*/*"}}


#: The JSON endpoint's requests: (Sec-Fetch-Site, Sec-Fetch-Dest, its refusal or None)
FETCH_METADATA = [
    ("cross-site", "empty", "cross-site request"),
    ("same-site", "image", "cross-site request"),
    ("same-origin", "image", "not a script's request"),
    ("same-origin", "script", "not a script's request"),
    ("same-origin", "iframe", "not a script's request"),
    ("same-origin", "empty", None),
    ("none", "document", None),
    ("same-origin", None, None),
    (None, None, None),
]
