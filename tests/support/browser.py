"""Real-browser test harness: headless Chromium (Debian's) driven by Playwright's sync API.

Pieces:

* :class:`StaticServer` -- a loopback HTTP server (a real one: pages fulfilled by Playwright's
  ``route.fulfill`` count as public and Chromium's Local Network Access then blocks their
  requests to 127.0.0.1) serving

  - ``/static/strophe.js``      the Strophe.js 5 UMD bundle from node_modules
  - ``/static/attach-test.js``  tests/support/static/attach-test.js (``window.boshTest``)
  - ``/static/converse/...``    converse.js 14's ``dist/`` (``converse.min.js``, ``.css``, ...)
  - ``/harness.html``           a blank page loading the two scripts above
  - pages and handlers that tests register with :meth:`StaticServer.add_page` /
    :meth:`StaticServer.add_route`.

* :func:`launch_browser` -- Chromium with the flags this machine needs.
* :func:`open_page` -- a page in its own browser context, with its console captured.
* :func:`attach_and_chat` -- the end-to-end check of a prebound session (jid, sid, rid): a page
  attaches with Strophe, proves its first request arrived (roster get answered) and exchanges
  messages both ways with an independent, normally logged-in Strophe client.

Missing prerequisites (node_modules, chromium) fail with instructions; nothing here skips.
"""

from __future__ import annotations

import contextlib
import html
import json
import mimetypes
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = REPO_ROOT / "node_modules"
STROPHE_JS = NODE_MODULES / "strophe.js" / "dist" / "strophe.umd.min.js"
CONVERSE_DIST = NODE_MODULES / "converse.js" / "dist"
CONVERSE_JS = CONVERSE_DIST / "converse.min.js"
CONVERSE_CSS = CONVERSE_DIST / "converse.min.css"
STATIC_DIR = Path(__file__).resolve().parent / "static"
ATTACH_TEST_JS = STATIC_DIR / "attach-test.js"

CHROMIUM = os.environ.get("BOSH_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

STROPHE_URL_PATH = "/static/strophe.js"
ATTACH_TEST_URL_PATH = "/static/attach-test.js"
CONVERSE_URL_PREFIX = "/static/converse/"
HARNESS_PAGE_PATH = "/harness.html"

_EXTRA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".map": "application/json",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".html": "text/html; charset=utf-8",
}


class HarnessSetupError(RuntimeError):
    """A prerequisite of the browser harness is missing (the message says how to install it)."""


def missing_prerequisites(*, need_browser: bool = True, need_assets: bool = True) -> list[str]:
    """Human-readable list of what is missing for the browser tests (empty when all is there)."""
    problems: list[str] = []
    if need_assets:
        for path in (STROPHE_JS, CONVERSE_JS, CONVERSE_CSS):
            if not path.is_file():
                problems.append(
                    f"{path} is missing: run `npm ci` in {REPO_ROOT} "
                    "(package.json pins strophe.js 5 and converse.js 14)"
                )
                break
        if not ATTACH_TEST_JS.is_file():
            problems.append(f"{ATTACH_TEST_JS} is missing (it is part of the repository)")
    if need_browser:
        if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
            problems.append(
                f"Chromium not found at {CHROMIUM}: `apt-get install chromium` "
                "(or set BOSH_TEST_CHROMIUM to a Chromium binary); never `playwright install`"
            )
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problems.append("the `playwright` Python package is missing: `pip install playwright`")
    return problems


def require_prerequisites(*, need_browser: bool = True, need_assets: bool = True) -> None:
    problems = missing_prerequisites(need_browser=need_browser, need_assets=need_assets)
    if problems:
        raise HarnessSetupError(
            "browser test harness prerequisites missing:\n  - " + "\n  - ".join(problems)
        )


# --------------------------------------------------------------------------------------------
# Static server
# --------------------------------------------------------------------------------------------


@dataclass
class Request:
    """What a route handler gets."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes


@dataclass
class Response:
    status: int = 200
    body: bytes | str = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


RouteHandler = Callable[[Request], Response]


def harness_page_html(
    *,
    title: str = "bosh harness",
    variables: Mapping[str, Any] | None = None,
    head: str = "",
    body: str = "",
    script_base: str = "",
) -> str:
    """HTML page loading Strophe.js and attach-test.js, with ``var NAME = json;`` for each of
    ``variables`` (e.g. BOSH_SERVICE, BOSH_JID, BOSH_SID, BOSH_RID) defined before them.
    ``script_base`` prefixes the script URLs (e.g. ``static.base_url`` for a page served elsewhere).
    """
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>{head}</head><body>{body}\n"
        + script_tags(script_base, variables=variables)
        + "\n</body></html>\n"
    )


def script_tags(base: str = "", *, variables: Mapping[str, Any] | None = None) -> str:
    """``<script>`` tags for Strophe.js + attach-test.js (``base`` = origin of a StaticServer)."""
    parts = []
    if variables:
        decl = ", ".join(f"{name} = {_js_literal(value)}" for name, value in variables.items())
        parts.append(f"<script>var {decl};</script>")
    parts.append(f'<script src="{base}{STROPHE_URL_PATH}"></script>')
    parts.append(f'<script src="{base}{ATTACH_TEST_URL_PATH}"></script>')
    return "\n".join(parts)


def converse_tags(base: str = "") -> str:
    """``<link>`` + ``<script type="module">`` for converse.js 14 (``base`` = StaticServer origin).

    converse.js 14's ``dist/converse.min.js`` is an ES module (it uses ``import.meta`` and
    ``import()``s its chunks relative to its own URL): a classic ``<script>`` fails with
    "Cannot use 'import.meta' outside a module". It sets ``window.converse``; call
    ``converse.initialize(...)`` from a later ``<script type="module">`` (modules run in order).
    """
    return (
        f'<link rel="stylesheet" href="{base}{CONVERSE_URL_PREFIX}converse.min.css">\n'
        f'<script type="module" src="{base}{CONVERSE_URL_PREFIX}converse.min.js"></script>'
    )


def _js_literal(value: Any) -> str:
    # JSON, made safe inside an inline <script>.
    return (
        json.dumps(value)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


class StaticServer:
    """Loopback HTTP server on a free port, serving the harness assets and test pages.

    Use as a context manager or call :meth:`start` / :meth:`stop`. Thread-safe registration.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._pages: dict[str, tuple[bytes, str]] = {}
        self._routes: dict[str, RouteHandler] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[str] = []  # "GET /path 200", for debugging
        self.add_page(HARNESS_PAGE_PATH, harness_page_html())
        self.add_page("/favicon.ico", b"", "image/x-icon")  # keeps 404s out of the console

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> StaticServer:
        if self._httpd is not None:
            return self
        require_prerequisites(need_browser=False)
        server = self

        class Handler(_Handler):
            static = server

        httpd = ThreadingHTTPServer((self._host, self._port), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"StaticServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("StaticServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://{self._host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    @property
    def harness_url(self) -> str:
        return self.url(HARNESS_PAGE_PATH)

    # -- content ----------------------------------------------------------------------------
    def add_page(
        self, path: str, content: str | bytes, content_type: str = "text/html; charset=utf-8"
    ) -> str:
        """Serve ``content`` at ``path`` (query strings are ignored); returns the full URL."""
        path = _norm(path)
        data = content.encode("utf-8") if isinstance(content, str) else content
        with self._lock:
            self._pages[path] = (data, content_type)
        return self.url(path) if self._httpd is not None else path

    def add_harness_page(
        self, path: str, variables: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> str:
        """Register :func:`harness_page_html` (with ``var`` declarations) at ``path``."""
        return self.add_page(path, harness_page_html(variables=variables, **kwargs))

    def add_route(self, path: str, handler: RouteHandler) -> str:
        """Serve ``path`` (any method) dynamically: ``handler(Request) -> Response``."""
        path = _norm(path)
        with self._lock:
            self._routes[path] = handler
        return self.url(path) if self._httpd is not None else path

    def remove(self, path: str) -> None:
        path = _norm(path)
        with self._lock:
            self._pages.pop(path, None)
            self._routes.pop(path, None)

    def _lookup(self, path: str) -> tuple[bytes, str] | RouteHandler | Path | None:
        with self._lock:
            if path in self._routes:
                return self._routes[path]
            if path in self._pages:
                return self._pages[path]
        if path == STROPHE_URL_PATH:
            return STROPHE_JS
        if path == ATTACH_TEST_URL_PATH:
            return ATTACH_TEST_JS
        if path.startswith(CONVERSE_URL_PREFIX):
            root = CONVERSE_DIST.resolve()
            target = (root / path[len(CONVERSE_URL_PREFIX) :]).resolve()
            if target.is_file() and target.is_relative_to(root):
                return target
        if path.startswith("/static/"):
            root = STATIC_DIR.resolve()
            target = (root / path[len("/static/") :]).resolve()
            if target.is_file() and target.is_relative_to(root):
                return target
        return None


def _norm(path: str) -> str:
    path = urlsplit(path).path or "/"
    return path if path.startswith("/") else "/" + path


def _content_type(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in _EXTRA_TYPES:
        return _EXTRA_TYPES[ext]
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


class _Handler(BaseHTTPRequestHandler):
    static: StaticServer
    protocol_version = "HTTP/1.1"
    server_version = "bosh-test-static/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        found = self.static._lookup(path)
        extra: dict[str, str] = {}
        if found is None:
            status, data, ctype = 404, b"not found\n", "text/plain; charset=utf-8"
        elif isinstance(found, Path):
            status, data, ctype = 200, found.read_bytes(), _content_type(found)
        elif isinstance(found, tuple):
            status, (data, ctype) = 200, found
        else:
            try:
                resp = found(Request(method, path, parts.query, dict(self.headers.items()), body))
            except Exception as exc:  # surface handler bugs to the browser and the test
                resp = Response(500, f"route handler failed: {exc!r}\n", "text/plain")
            status, ctype, extra = resp.status, resp.content_type, resp.headers
            data = resp.body.encode("utf-8") if isinstance(resp.body, str) else resp.body
        self.static.requests.append(f"{method} {self.path} {status}")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")


# --------------------------------------------------------------------------------------------
# Browser
# --------------------------------------------------------------------------------------------


def launch_browser(playwright: Any, *, extra_args: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Launch Debian's Chromium headless via ``playwright.chromium`` (sync or async API object).

    Playwright's ``launch`` gives every browser a fresh temporary user-data dir, deleted on close.
    """
    require_prerequisites(need_assets=False)
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=[*CHROMIUM_ARGS, *extra_args],
        timeout=60_000,
        **kwargs,
    )


@dataclass
class HarnessPage:
    """A page in its own browser context; ``logs`` collects its console, page errors and failed
    requests (shared list when several pages take part in one scenario)."""

    name: str
    context: Any
    page: Any
    logs: list[str]

    def evaluate(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def state(self) -> dict[str, Any]:
        return dict(self.page.evaluate("() => window.boshTest.state()"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.context.close()


def open_page(
    browser: Any,
    url: str,
    *,
    name: str = "page",
    logs: list[str] | None = None,
    timeout_s: float = 20,
    wait_for_harness: bool = True,
) -> HarnessPage:
    """Open ``url`` in a fresh context (own cookies/sessionStorage), capturing the console."""
    logs = [] if logs is None else logs
    context = browser.new_context()
    context.set_default_timeout(timeout_s * 1000)
    page = context.new_page()
    t0 = time.monotonic()

    def stamp() -> str:
        return f"{time.monotonic() - t0:7.3f}s [{name}]"

    page.on("console", lambda msg: logs.append(f"{stamp()} console.{msg.type}: {msg.text}"))
    page.on("pageerror", lambda err: logs.append(f"{stamp()} PAGE ERROR: {err}"))
    page.on(
        "requestfailed",
        lambda req: logs.append(
            f"{stamp()} REQUEST FAILED: {req.method} {req.url} ({req.failure})"
        ),
    )
    hp = HarnessPage(name, context, page, logs)
    try:
        page.goto(url, wait_until="load", timeout=timeout_s * 1000)
        if wait_for_harness:
            page.wait_for_function(
                "() => !!(window.boshTest && window.Strophe)", timeout=timeout_s * 1000
            )
    except Exception as exc:
        hp.close()
        raise AssertionError(f"[{name}] could not load {url}: {exc}\n" + format_logs(logs)) from exc
    return hp


def format_logs(logs: list[str], limit: int = 400, width: int = 1500) -> str:
    lines = logs[-limit:]
    shown = f", last {limit}" if len(logs) > limit else ""
    out = [f"--- browser console ({len(logs)} lines{shown}) ---"]
    out += [line if len(line) <= width else line[:width] + " ..." for line in lines]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# End-to-end: attach + chat
# --------------------------------------------------------------------------------------------


@dataclass
class AttachResult:
    jid: str  # full JID of the attached session (as the page reports it)
    peer_jid: str  # full JID of the peer client
    statuses: list[str]  # Strophe statuses of the attached page
    iq_result: str | None  # roster get outcome in the first request: "result" expected
    first_request: str | None  # the first BOSH body the attached page sent
    attach_received: list[dict[str, Any]]  # messages the attached page got
    peer_received: list[dict[str, Any]]  # messages the peer got
    peer_statuses: list[str]
    console: list[str]
    timings: dict[str, float]


def _bare(jid: str) -> str:
    return jid.split("/", 1)[0]


def attach_and_chat(
    browser: Any,
    static: StaticServer,
    *,
    service_url: str,
    jid: str,
    sid: str,
    rid: int | str,
    peer_jid: str,
    peer_password: str,
    message: str,
    reply: str | None = None,
    timeout_s: float = 20,
    peer_service_url: str | None = None,
) -> AttachResult:
    """Prove a prebound session (jid, sid, rid) works in a real browser.

    Page B logs in normally as ``peer_jid`` (Strophe ``connect``). Page A attaches to the
    session, must reach ATTACHED and get a result for the roster get it sends in its first
    request (so the RID was right), sends ``message`` to the peer's bare JID, which B must
    receive; B answers ``reply`` (default ``"re: " + message``) to A's full JID, which A must
    receive. Every wait is bounded by the overall deadline ``timeout_s``; any failure raises
    AssertionError with the browser console (including all BOSH traffic).
    """
    reply = f"re: {message}" if reply is None else reply
    peer_service_url = peer_service_url or service_url
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    logs: list[str] = []
    pages: list[HarnessPage] = []
    a_state: dict[str, Any] = {}
    b_state: dict[str, Any] = {}

    def remaining_ms() -> int:
        return max(1000, int((deadline - time.monotonic()) * 1000))

    def fail(step: str, detail: str = "") -> AssertionError:
        return AssertionError(
            f"attach_and_chat: {step} (after {time.monotonic() - t0:.1f}s of {timeout_s}s)"
            + (f"\n{detail}" if detail else "")
            + f"\nattached page state: {json.dumps(_short_state(a_state))}"
            + f"\npeer page state: {json.dumps(_short_state(b_state))}\n"
            + format_logs(logs)
        )

    def refresh() -> None:
        for hp, target in zip(pages, (b_state, a_state)):
            with contextlib.suppress(Exception):
                target.update(hp.state())

    try:
        # B: the peer, a plain Strophe login, independent of any prebind code.
        b = open_page(
            browser, static.harness_url, name="peer", logs=logs, timeout_s=remaining_ms() / 1000
        )
        pages.append(b)
        try:
            b_state.update(
                b.evaluate(
                    "o => boshTest.connect(o)",
                    {
                        "service": peer_service_url,
                        "jid": peer_jid,
                        "password": peer_password,
                        "timeout": remaining_ms(),
                    },
                )
            )
        except Exception as exc:
            refresh()
            raise fail(f"peer {peer_jid} could not log in", str(exc)) from None
        timings["peer_connected"] = time.monotonic() - t0

        # A: attach to the prebound session.
        a = open_page(
            browser, static.harness_url, name="attached", logs=logs, timeout_s=remaining_ms() / 1000
        )
        pages.append(a)
        iq_timeout = max(1000, min(10_000, remaining_ms() - 1000))
        try:
            a_state.update(
                a.evaluate(
                    "o => boshTest.attach(o)",
                    {
                        "service": service_url,
                        "jid": jid,
                        "sid": sid,
                        "rid": rid,
                        "timeout": remaining_ms(),
                        "iqTimeout": iq_timeout,
                    },
                )
            )
        except Exception as exc:
            refresh()
            raise fail("attach() failed", str(exc)) from None
        timings["attached"] = time.monotonic() - t0
        if "ATTACHED" not in a_state.get("statuses", []):
            raise fail("the page never reached ATTACHED")
        if a_state.get("iqResult") != "result":
            raise fail(
                f"the roster get sent in the first request after attach gave "
                f"{a_state.get('iqResult')!r} instead of 'result' (wrong RID or dead session?)"
            )
        a_jid = a_state.get("jid") or jid

        # A -> B (to the peer's bare JID).
        a.evaluate("([to, body]) => boshTest.send(to, body)", [_bare(peer_jid), message])
        try:
            b.evaluate(
                "o => boshTest.waitForMessage(o)",
                {"body": message, "from": _bare(a_jid), "timeout": remaining_ms()},
            )
        except Exception as exc:
            refresh()
            raise fail(
                f"the peer did not receive {message!r} from the attached page", str(exc)
            ) from None
        timings["peer_received"] = time.monotonic() - t0

        # B -> A (to the attached page's full JID).
        b.evaluate("([to, body]) => boshTest.send(to, body)", [a_jid, reply])
        try:
            a.evaluate(
                "o => boshTest.waitForMessage(o)",
                {"body": reply, "from": _bare(peer_jid), "timeout": remaining_ms()},
            )
        except Exception as exc:
            refresh()
            raise fail(f"the attached page did not receive the reply {reply!r}", str(exc)) from None
        timings["attached_received"] = time.monotonic() - t0
        refresh()
        result = AttachResult(
            jid=a_jid,
            peer_jid=b_state.get("jid") or peer_jid,
            statuses=list(a_state.get("statuses", [])),
            iq_result=a_state.get("iqResult"),
            first_request=a_state.get("firstRequest"),
            attach_received=list(a_state.get("received", [])),
            peer_received=list(b_state.get("received", [])),
            peer_statuses=list(b_state.get("statuses", [])),
            console=list(logs),
            timings=timings,
        )
        # Leave the server clean; bounded (disconnect() gives up after 5 s).
        for hp in reversed(pages):
            with contextlib.suppress(Exception):
                hp.evaluate("() => boshTest.disconnect(3000)")
        timings["total"] = time.monotonic() - t0
        return result
    finally:
        for hp in pages:
            hp.close()


def _short_state(state: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("jid", "statuses", "iqResult", "received", "errors", "firstRequest")
    return {k: state.get(k) for k in keep if k in state}


def chromium_version() -> str:
    """``Chromium 1xx...`` as reported by the binary (for reports)."""
    import subprocess

    exe = shutil.which(CHROMIUM) or CHROMIUM
    return subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()


__all__ = [
    "ATTACH_TEST_JS",
    "ATTACH_TEST_URL_PATH",
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "CONVERSE_CSS",
    "CONVERSE_DIST",
    "CONVERSE_JS",
    "CONVERSE_URL_PREFIX",
    "HARNESS_PAGE_PATH",
    "STROPHE_JS",
    "STROPHE_URL_PATH",
    "AttachResult",
    "HarnessPage",
    "HarnessSetupError",
    "Request",
    "Response",
    "StaticServer",
    "attach_and_chat",
    "chromium_version",
    "converse_tags",
    "format_logs",
    "harness_page_html",
    "launch_browser",
    "missing_prerequisites",
    "open_page",
    "require_prerequisites",
    "script_tags",
]
