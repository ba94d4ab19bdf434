"""What every adapter shares: which requests and responses to touch, starting a prebind next to
the view, waiting for it with a deadline, failing open, the circuit breaker, header edits and the
JSON endpoint. Adapters translate their framework's request/response into these calls and no
more; no web framework is imported here.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from asgiref.sync import async_to_sync

from .breaker import CircuitBreaker
from .client import AsyncPrebinder, Prebinder
from .config import MiddlewareConfig
from .credentials import Credentials, is_authenticated
from .errors import (
    AuthenticationFailed,
    ConfigurationError,
    MechanismUnavailable,
    ProtocolError,
    ServiceUnavailable,
)
from .inject import Injector, script_snippet
from .session import PrebindSession

__all__ = [
    "REQUEST_HEADERS",
    "AsyncPending",
    "HeaderGetter",
    "PrebindCore",
    "SyncPending",
    "accepts_html",
    "charset_of",
    "environ_kind",
    "is_authenticated",
    "is_injectable",
    "media_type",
    "not_a_page",
    "remember_kind",
    "request_kind",
    "request_kind_of",
    "work_out_kind",
]

log = logging.getLogger("bosh_middleware")

HeaderGetter = Callable[[str], "str | None"]
_PAGE_TYPES = frozenset({"text/html", "application/xhtml+xml"})
#: ``Sec-Fetch-Dest`` values of a request whose answer a browser shows as a document.
_PAGE_DESTS = frozenset({"document", "iframe", "frame"})
#: The request headers ``not_a_page`` and ``looks_like_page`` read (lower case).
REQUEST_HEADERS = (
    "hx-request",
    "x-requested-with",
    "sec-purpose",
    "purpose",
    "sec-fetch-dest",
    "accept",
)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def charset_of(content_type: str | None) -> str | None:
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"').strip("'") or None
    return None


def page_injector(snippet: str, content_type: str | None, charset: str | None = None) -> Injector:
    """The Injector for a page of this ``Content-Type``: its charset (``charset``, when the
    framework has read it already), and whether browsers read it with their XML parser (XHTML,
    where ``<script src="a.js"/>`` is a whole element, not the start of a script's text)."""
    return Injector(
        snippet,
        charset=charset_of(content_type) if charset is None else charset,
        xml=media_type(content_type) == "application/xhtml+xml",
    )


def _q(params: str) -> float:
    """The ``q`` of one media range's parameters (``;level=1;q=0.5``); 1 when absent or unreadable
    (a malformed weight must not turn a page into a refusal)."""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 1.0
            return q if 0.0 <= q <= 1.0 else 1.0  # RFC 9110 qvalue: 0-1 (NaN fails too)
    return 1.0


def accepts_html(accept: str) -> bool | None:
    """Whether an ``Accept`` value takes an HTML page: ``text/html`` with a weight above 0, the
    most specific of ``text/html``, ``text/*``, ``*/*`` (or the sloppy ``*``) deciding (RFC 9110,
    12.5.1: ``text/html;q=0, */*`` refuses it), or ``application/xhtml+xml`` named with a weight
    above 0. ``None`` when the value names no media range at all (empty, only commas): it says
    nothing either way."""
    html: float | None = None  # the weight each range was given, where it is named
    text: float | None = None
    anything: float | None = None
    xhtml = named = False
    for item in accept.split(","):
        media, _, params = item.partition(";")
        media = media.strip().lower()
        if not media:
            continue
        named = True
        q = _q(params) if params else 1.0
        if media == "text/html":
            html = q if html is None else max(html, q)
        elif media == "*/*" or media == "*":
            anything = q if anything is None else max(anything, q)
        elif media == "text/*":
            text = q if text is None else max(text, q)
        elif media == "application/xhtml+xml":
            xhtml = xhtml or q > 0
    if not named:
        return None
    weight = html if html is not None else text if text is not None else anything
    return xhtml or (weight is not None and weight > 0)


#: ``request_kind`` answers.
NOT_A_PAGE, NAVIGATION, UNDECIDED = "not a page", "navigation", "undecided"


def not_a_page(get: HeaderGetter) -> bool:
    """This request cannot be a navigation whose HTML answer a browser shows as a page, so it
    must not get a session: the HTML an XHR or ``fetch()`` gets (an htmx partial, jQuery's
    ``.load()``) is inserted into a page that already has its session, or parsed by a script;
    nothing ever attaches to a session injected there, and it would live on at the XMPP server
    as an orphan until it times out. Saying so from the request alone also spares every such
    request the inspection of its response (the wrapped ``send`` / ``start_response``, a few
    microseconds: the price of each logged-in API call).

    True when any of: ``HX-Request`` (htmx) or ``X-Requested-With`` (jQuery and most XHR
    helpers); ``Sec-Purpose`` or ``Purpose`` (a prefetch or prerender: a page the user may
    never open, and if they do, minutes later, its session may be gone); ``Sec-Fetch-Dest``
    other than ``document``, ``iframe`` or ``frame`` (browsers send ``empty`` for fetch/XHR,
    ``script``, ``image``, ``style`` ... for subresources); an ``Accept`` that takes no HTML
    (``application/json``; ``text/html;q=0, application/json``).
    A header with an empty value counts as absent. A request with none of these (curl, scripts,
    older browsers) is not judged here: its response is looked at, and an HTML page still gets
    its session.
    """
    return request_kind(get) == NOT_A_PAGE


def request_kind(get: HeaderGetter) -> str:
    """``NOT_A_PAGE`` (see ``not_a_page``), else ``NAVIGATION`` when the request says it is a
    browser navigation (see ``PrebindCore.looks_like_page``), else ``UNDECIDED``. One read of
    each of the four headers: every logged-in request asks this, so the answer is remembered
    (``remember_kind``)."""
    key = (
        get("hx-request") or get("x-requested-with") or get("sec-purpose") or get("purpose"),
        get("sec-fetch-dest"),
        get("accept"),
    )
    try:
        return _KINDS[key]
    except (KeyError, TypeError):  # (TypeError: a getter's unhashable value, not kept either)
        pass
    return remember_kind(_KINDS, key, request_kind_of(*key))


def environ_kind(environ: Mapping[str, Any]) -> str:
    """``request_kind`` of a WSGI environ, or of Django's ``request.META`` (the same CGI names;
    under ASGI too), its four values read straight from it: a server joins repeated fields
    with commas already, and a value that is not a str counts as absent. The WSGI middleware,
    Django's and Flask's ask this, not ``request_kind`` through the framework's header view:
    building Django's ``request.headers`` to read four values took ~750 bytecodes a request,
    several times what the rest of the middleware does for a ``fetch()``."""
    get = environ.get
    dest = get("HTTP_SEC_FETCH_DEST")
    if dest == "empty":  # every browser's fetch()/XHR: no page, whatever else it says
        return NOT_A_PAGE
    if (
        dest is None
        and "HTTP_ACCEPT" not in environ
        and "HTTP_HX_REQUEST" not in environ
        and "HTTP_X_REQUESTED_WITH" not in environ
        and "HTTP_SEC_PURPOSE" not in environ
        and "HTTP_PURPOSE" not in environ
    ):
        # Said nothing (a script, curl): what request_kind_of answers. Settled with ``in``,
        # which is no call, rather than three ``get`` calls: such a request pays for the
        # response's inspection too, and this is what it costs most often.
        return UNDECIDED
    xhr = (
        get("HTTP_HX_REQUEST")
        or get("HTTP_X_REQUESTED_WITH")
        or get("HTTP_SEC_PURPOSE")
        or get("HTTP_PURPOSE")
    )
    key = (xhr, dest, get("HTTP_ACCEPT"))
    try:  # the usual values (curl's ``*/*``, a browser's navigation): see remember_kind
        return _ENVIRON_KINDS[key]
    except (KeyError, TypeError):  # (TypeError: an unhashable value, which is not kept either)
        pass
    return work_out_kind(_ENVIRON_KINDS, key, _str_or_none)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


#: A request's validators (RFC 9110, 13.1), as WSGI and Django's ``META`` name them.
VALIDATOR_KEYS = ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE")
#: ... and as ASGI does.
VALIDATOR_FIELDS = (b"if-none-match", b"if-modified-since")


def drop_validators(environ: dict[str, Any]) -> bool:
    """Make a navigation being prebound unconditional; True if it was conditional. Prebound
    pages are ``no-store`` and carry no validator, so what a browser revalidates is a copy
    served without a session (the XMPP server was down, the breaker open, the user not yet
    logged in). A 304 from the app (``@condition``, a ConditionalGetMiddleware listed below
    ours, Starlette's StaticFiles) would show that copy again, still without a session, until
    the page changes, and the session made for it would be ended unused."""
    found = False
    for key in VALIDATOR_KEYS:
        if environ.pop(key, None) is not None:
            found = True
    return found


def work_out_kind(
    memo: dict[Any, str], key: tuple[Any, Any, Any], text: Callable[[Any], str | None]
) -> str:
    """``request_kind_of`` for a ``key`` its ``memo`` did not have (the xhr, ``Sec-Fetch-Dest``
    and ``Accept`` values as sent), remembered there. ``text`` makes a value as sent the str
    ``request_kind_of`` reads, or None: the adapters' memos differ in the values they are
    keyed by (the environ's, ASGI's raw bytes), not in this."""
    xhr, dest, accept = key
    return remember_kind(memo, key, request_kind_of(xhr, text(dest), text(accept)))


#: How many request kinds each memo keeps (``remember_kind``), and the longest value kept.
KIND_MEMO_SIZE = 512
KIND_MEMO_VALUE = 512
#: ``request_kind``'s answers by the getter's values, ``environ_kind``'s by the environ's.
_KINDS: dict[tuple[str | None, str | None, str | None], str] = {}
_ENVIRON_KINDS: dict[tuple[Any, Any, Any], str] = {}


def remember_kind(memo: dict[Any, str], key: tuple[Any, ...], kind: str) -> str:
    """``kind``, remembered under ``key`` (the request's xhr, ``Sec-Fetch-Dest`` and ``Accept``
    values as sent) for the next request that sends the same. Any app's traffic has a handful
    of these (each browser's navigation and ``fetch()``, curl's ``*/*``), and working one out
    (``accepts_html`` parses the weights of every media range) took about 130 bytecodes on
    curl's, paid by every logged-in request that did not say ``Sec-Fetch-Dest: empty``.
    Bounded: long values are not kept, and a full memo starts over, so values a client makes
    up cost it nothing but the working out, and cannot crowd the usual ones out for long.
    Only str, bytes and None values are kept, so a key that cannot be hashed (the lookup
    raised TypeError) never is. (Thread-safe as dict operations are: at worst two threads work
    out the same answer.)"""
    if all(v is None or (type(v) in (str, bytes) and len(v) <= KIND_MEMO_VALUE) for v in key):
        if len(memo) >= KIND_MEMO_SIZE:
            memo.clear()
        memo[key] = kind
    return kind


def request_kind_of(xhr: object, dest: str | None, accept: str | None) -> str:
    """``request_kind`` from the values: ``xhr`` is ``HX-Request``, ``X-Requested-With``,
    ``Sec-Purpose`` or ``Purpose`` (only whether one is non-empty counts), then
    ``Sec-Fetch-Dest`` and ``Accept``."""
    if xhr:
        return NOT_A_PAGE
    if dest:
        dest = dest.strip().lower()
        if dest and dest not in _PAGE_DESTS:
            return NOT_A_PAGE
    if accept is not None and accepts_html(accept) is False:
        return NOT_A_PAGE
    return NAVIGATION if _says_navigation(dest or "", accept) else UNDECIDED


def _says_navigation(dest: str, accept: str | None) -> bool:
    """``Sec-Fetch-Dest: document`` (``dest`` lower-cased by the caller), or an ``Accept`` that
    names HTML: what ``request_kind`` and ``looks_like_page`` both call a navigation."""
    if dest == "document":
        return True
    accept = (accept or "").lower()
    return "text/html" in accept or "application/xhtml+xml" in accept


def is_injectable(method: str, status: int, get: HeaderGetter) -> bool:
    """Only a whole, uncompressed HTML page answering a GET can carry the variables."""
    return (
        method == "GET"
        and status == 200
        and media_type(get("content-type")) in _PAGE_TYPES
        and not _encoded(get("content-encoding"))
        and not get("content-range")
        # A download is saved, not rendered: a live session must not end up in a file.
        and not (get("content-disposition") or "").strip().lower().startswith("attachment")
        # The front server sends a file in place of this body (X-Sendfile, nginx's
        # X-Accel-Redirect ...): a snippet here would be thrown away with the session in it.
        # (Spelled out, not a generator: every logged-in page, and Flask's anonymous ones.)
        and not (
            get("x-accel-redirect")
            or get("x-sendfile")
            or get("x-lighttpd-send-file")
            or get("x-litespeed-location")
        )
    )


def _encoded(value: str | None) -> bool:
    """A Content-Encoding that is one: ``identity`` says "none" (RFC 9110 discourages sending
    it, and some apps and proxies do all the same)."""
    if not value:
        return False
    return any(token.strip().lower() not in ("", "identity") for token in value.split(","))


class _Pending:
    """A prebind running next to the view. Exactly one of: used (``session()`` returned it) or
    discarded (terminated as soon as it exists) — so no session is ever left orphaned."""

    def __init__(self, core: PrebindCore, credentials: Credentials, admitted: int = 0) -> None:
        self.core = core
        self.credentials = credentials
        #: What the breaker's ``admit`` said of this prebind (see ``_unasked``).
        self.admitted = admitted
        self.deadline = time.monotonic() + core.config.timeout
        self.started = time.monotonic()
        self.error: BaseException | None = None
        self._claimed = False
        self._settled = False
        self._lock = threading.Lock()

    def _claim(self) -> bool:
        """First of session()/discard() wins."""
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def _settle(self, error: BaseException | None) -> None:
        # Record under the lock: whoever loses the race (the page's thread or the future's
        # callback) returns only once the outcome is logged and counted by the breaker.
        with self._lock:
            if self._settled:
                return
            self._settled = True
            self.core._record(self.credentials, error, time.monotonic() - self.started)

    def _unasked(self) -> None:
        """Ended with no answer to count: nothing to log or count, unless the page's timeout
        was counted already. A half-open trial ends without a verdict, or the breaker would
        wait for one for good."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
        self.core.breaker.abandon(self.admitted)


class SyncPending(_Pending):
    def __init__(
        self,
        core: PrebindCore,
        credentials: Credentials,
        future: Future[PrebindSession],
        admitted: int = 0,
    ) -> None:
        super().__init__(core, credentials, admitted)
        self._future = future
        future.add_done_callback(self._done)

    def _done(self, fut: Future[PrebindSession]) -> None:
        if fut.cancelled():  # before it started (``_give_up``): the server was never asked
            self._unasked()
        else:
            self._settle(fut.exception())

    def _give_up(self) -> None:
        """The page will not carry this session. A prebind still queued behind a full pool is
        not started at all: each would be a login, then a terminate, that nobody asked for any
        more, and pages time out behind a full pool exactly when the XMPP server is slow, so
        they would double its load then. One already running is ended once it exists."""
        if not self._future.cancel():
            self._future.add_done_callback(self.core._terminate_later_sync)

    def session(self) -> PrebindSession | None:
        """Wait (until the deadline) for the session; ``None`` means serve the page without."""
        if not self._claim():
            return None
        try:
            session = self._future.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except FutureTimeout:
            self.error = ServiceUnavailable(
                "prebind exceeded the page timeout", condition="timeout"
            )
            self._settle(self.error)  # (before _give_up: a prebind it cancels has no outcome)
            self._give_up()
        except Exception as exc:
            self.error = exc
            # A Future wakes its waiters before it runs its callbacks: record (log, breaker) now,
            # before this page goes out, not a moment later from _done.
            self._settle(exc)
        except BaseException:
            # The wait itself was interrupted (SystemExit from a signal handler as a worker
            # stops, KeyboardInterrupt): this page will not carry the session, which is
            # claimed, so no discard() will end it. End it once it exists, then go on out.
            self._give_up()
            raise
        else:
            self._settle(None)
            return session
        return None

    def discard(self) -> None:
        """The response will not carry the session: end it as soon as it exists."""
        if self._claim():
            self._give_up()


class AsyncPending(_Pending):
    def __init__(
        self,
        core: PrebindCore,
        credentials: Credentials,
        task: asyncio.Task[PrebindSession],
        admitted: int = 0,
    ) -> None:
        super().__init__(core, credentials, admitted)
        self._task = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[PrebindSession]) -> None:
        if task.cancelled():
            # By its loop's end (``asyncio.run`` cancels what is left: a server stopping with
            # no lifespan to wait, a loop per request): no verdict on the server. Counted as a
            # failure, a few such loops opened the breaker for every page after them.
            self._unasked()
        else:
            self._settle(task.exception())

    async def session(self) -> PrebindSession | None:
        if not self._claim():
            return None
        try:
            # Not wait_for: on 3.11 it drops a cancellation that arrives after the prebind has
            # finished but before it resumes, and returns the session to a caller that gave up
            # (an ASGI client gone): claimed, so no discard() ends it, it stayed live at the
            # XMPP server. Under timeout() a cancellation is always raised here, and ends it.
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                return await asyncio.shield(self._task)
        except TimeoutError:
            self.error = ServiceUnavailable(
                "prebind exceeded the page timeout", condition="timeout"
            )
            self._settle(self.error)
            self._task.add_done_callback(self.core._terminate_later_async)
        except asyncio.CancelledError:
            self._task.add_done_callback(self.core._terminate_later_async)
            raise
        except Exception as exc:
            self.error = exc
        return None

    def discard(self) -> None:
        if self._claim():
            self._task.add_done_callback(self.core._terminate_later_async)


def exclusions(paths: Sequence[str], endpoint: str | None = None) -> tuple[tuple[str, ...], bool]:
    """``EXCLUDE_PATHS`` as adapters test them, inline on every request: the prefixes, for one
    ``str.startswith`` that settles most paths, and whether that answer is final: every prefix
    ends in "/", and ``endpoint`` (when an adapter tests exclusion before it) is under none.
    Otherwise a path that matches asks ``excluded``."""
    prefixes = tuple(paths)
    final = all(p.endswith("/") for p in prefixes)
    return prefixes, final and not (endpoint is not None and endpoint.startswith(prefixes))


def excluded(path: str, prefixes: tuple[str, ...], endpoint: str | None = None) -> bool:
    """Whether ``path`` is below one of ``prefixes`` by whole path segments: "/admin" is
    "/admin" and "/admin/users", not "/administrators", whose page a user expects prebound.
    ``endpoint`` is never excluded: it answers wherever it is."""
    if path == endpoint:
        return False
    for prefix in prefixes:
        if path.startswith(prefix) and (
            prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"
        ):
            return True
    return False


class PrebindCore:
    """One per middleware instance; thread-safe; holds the pooled engine clients."""

    def __init__(self, config: MiddlewareConfig) -> None:
        self.config = config
        self._exclude, self._exclude_final = exclusions(config.exclude_paths)
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_reset)
        self._lock = threading.Lock()
        self._sync: Prebinder | None = None
        self._async: AsyncPrebinder | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Unused sessions whose terminate runs on an event loop, until it has: one that the
        #: loop's end cut short (Django under ASGI has no lifespan to wait for them) is ended
        #: by ``close()`` at exit, with the sync engine.
        self._ending: dict[asyncio.Task[Any], PrebindSession] = {}
        self._told_compressed = False
        # WSGI servers and frameworks never tell a middleware they are shutting down: close the
        # pooled connections at exit (weakly: a discarded middleware is not kept alive).
        ref = weakref.ref(self)
        atexit.register(_close_at_exit, ref)

    def check_compressed(self, status: int, get: HeaderGetter) -> None:
        """Say (once) why a page goes out without its session when it came compressed: the
        compression runs inside this middleware, a matter of order in the app's setup that
        nothing else reports. Each such page costs a whole prebind for nothing, too."""
        if self._told_compressed or status != 200:
            return
        encoding = get("content-encoding")
        if not _encoded(encoding) or media_type(get("content-type")) not in _PAGE_TYPES:
            return
        self._told_compressed = True
        log.warning(
            "an HTML page reached bosh-middleware already compressed (Content-Encoding: %s): "
            "it is served without the XMPP session. Put the compression middleware outside "
            "this one (Starlette: add_middleware(GZipMiddleware) after ours; Django: "
            "GZipMiddleware above ours in MIDDLEWARE; Flask: in an after_request hook, as "
            "Flask-Compress does, not in the view). Said once.",
            (encoding or "")[:40],
        )

    # --- engines --------------------------------------------------------------------------
    @property
    def prebinder(self) -> Prebinder:
        if self._sync is None:
            with self._lock:
                if self._sync is None:
                    self._sync = Prebinder(
                        self.config.service_url,
                        options=self.config.options,
                        verify=self.config.verify,
                    )
        return self._sync

    @property
    def async_prebinder(self) -> AsyncPrebinder:
        if self._async is None:
            with self._lock:
                if self._async is None:
                    self._async = AsyncPrebinder(
                        self.config.service_url,
                        options=self.config.options,
                        verify=self.config.verify,
                    )
        return self._async

    def _pool(self) -> ThreadPoolExecutor:
        # A pool made before a fork (a prebind in a preloading master) has no threads in the
        # child: its work would never run. Each process makes its own, as the engines do.
        if self._executor is None or self._executor_pid != os.getpid():
            with self._lock:
                if self._executor is None or self._executor_pid != os.getpid():
                    self._executor = ThreadPoolExecutor(64, thread_name_prefix="bosh-prebind")
                    self._executor_pid = os.getpid()
        return self._executor

    def close(self) -> None:
        """Wait for prebinds in flight (and the termination of unused ones), then close."""
        if self._executor is not None and self._executor_pid == os.getpid():
            self._executor.shutdown(wait=True)
        for task, session in list(self._ending.items()):
            # Cut short by its loop's end (cancelled), or left pending by a loop that has
            # stopped (Daphne's reactor, a worker's run_until_complete: nothing ends its
            # tasks) or closed: no loop will run it now. End it from here.
            if task.done() or not task.get_loop().is_running():
                del self._ending[task]
                self.prebinder.terminate(session)
        if self._sync is not None:
            self._sync.close()

    async def aclose(self) -> None:
        """Wait for this loop's prebinds in flight and the termination of unused sessions
        (each discarded prebind, once done, starts one), then close: closed earlier, they
        would die with the loop and leave their sessions to time out at the server. Bounded
        by ``timeout`` plus two seconds, the pages' patience and a terminate's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout + 2.0
        while True:
            await asyncio.sleep(0)  # done callbacks first: a discarded prebind's starts a task
            mine = [t for t in self._tasks if not t.done() and t.get_loop() is loop]
            remaining = deadline - loop.time()
            if not mine or remaining <= 0:
                break
            await asyncio.wait(mine, timeout=remaining)
        if self._async is not None:
            await self._async.aclose()

    # --- request side ----------------------------------------------------------------------
    def wants(self, method: str, path: str, get: HeaderGetter) -> bool:
        """Could this request's response carry a session? (Cheap; no user lookup.) False for
        requests that can never be pages (``wants_path``) and for those whose headers say they
        are not a navigation (``not_a_page``): both pass through untouched, unwrapped."""
        return self.wants_path(method, path) and not not_a_page(get)

    def wants_path(self, method: str, path: str) -> bool:
        """``wants`` without the header check, for adapters that read headers in one pass later:
        every request goes through this, so it is the cheapest test there is."""
        exclude = self._exclude
        return method == "GET" and not (
            exclude
            and path.startswith(exclude)
            and (self._exclude_final or excluded(path, exclude))
        )

    #: See the module-level ``not_a_page``: the request's headers say it is no navigation.
    not_a_page = staticmethod(not_a_page)

    def kind_of(self, environ: Mapping[str, Any]) -> str:
        """``environ_kind``, where ``navigation_only`` makes a request that says nothing no
        page: what the Django (``request.META``) and Flask (``request.environ``) adapters ask;
        the ASGI and WSGI ones inline it."""
        kind = environ_kind(environ)
        return NOT_A_PAGE if kind == UNDECIDED and self.config.navigation_only else kind

    @staticmethod
    def looks_like_page(get: HeaderGetter) -> bool:
        """A browser navigation: worth starting the prebind before the view has answered.
        (Asked only of requests ``not_a_page`` let through; a request that is neither, such as
        curl's ``Accept: */*``, is prebound only once its response turns out to be a page.)"""
        return _says_navigation((get("sec-fetch-dest") or "").lower(), get("accept"))

    def is_endpoint(self, path: str) -> bool:
        return self.config.endpoint_path is not None and path == self.config.endpoint_path

    def credentials_sync(self, user: Any) -> Credentials | None:
        if not is_authenticated(user):
            return None
        try:
            result = self.config.credentials(user)
            if inspect.isawaitable(result):
                result = async_to_sync(_awaited)(result)
        except Exception:
            log.exception("BOSH credentials callable failed; serving without a session")
            return None
        return _checked(result)

    async def credentials_async(self, user: Any) -> Credentials | None:
        if not is_authenticated(user):
            return None
        try:
            result = self.config.credentials(user)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            log.exception("BOSH credentials callable failed; serving without a session")
            return None
        return _checked(result)

    def start_sync(self, credentials: Credentials) -> SyncPending | None:
        admitted = self.breaker.admit()
        if admitted is None:
            log.debug("BOSH circuit breaker open: no prebind for %s", credentials.user_key)
            return None
        try:
            future = self._pool().submit(self.prebinder.prebind, credentials)
        except RuntimeError:
            # The pool is shut down: close() has run (at exit, or by the app), or the
            # interpreter is going down. Fail open, as for any other failure: the page goes
            # out without a session rather than as an error.
            self.breaker.abandon(admitted)
            log.warning(
                "BOSH prebind not started for %s: the middleware is closed",
                credentials.user_key,
            )
            return None
        return SyncPending(self, credentials, future, admitted)

    def start_async(self, credentials: Credentials) -> AsyncPending | None:
        admitted = self.breaker.admit()
        if admitted is None:
            log.debug("BOSH circuit breaker open: no prebind for %s", credentials.user_key)
            return None
        task = asyncio.ensure_future(self.async_prebinder.prebind(credentials))
        # The loop keeps only a weak reference to a task: hold it until done (a discarded
        # prebind must still finish, to be terminated).
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return AsyncPending(self, credentials, task, admitted)

    def _server_answered(self) -> None:
        """A success for the breaker; said when it closes the breaker (at the level of the
        "opened" line's neighbours: logs that said the server was gone also say it is back)."""
        if self.breaker.record_success():
            log.warning("BOSH circuit breaker closed: the XMPP server answers again")

    def _record(
        self, credentials: Credentials, error: BaseException | None, elapsed: float
    ) -> None:
        user, ms = credentials.user_key, round(elapsed * 1000, 1)
        if error is None:
            self._server_answered()
            log.debug("BOSH prebind for %s took %.1f ms", user, ms)
            return
        condition = getattr(error, "condition", None) or type(error).__name__
        extra = {"bosh_user": user, "bosh_condition": condition, "bosh_elapsed_ms": ms}
        if _refused(error):
            # The server is up and said no to this request: this user's domain, resource or
            # account. Were that counted, one user with a JID on a domain the server does not
            # serve would open the breaker for everyone in a few page views. Like a refused
            # login, it proves the server up (and ends a half-open trial).
            self._server_answered()
            log.warning("BOSH prebind refused for %s: %s", user, condition, extra=extra)
        elif isinstance(error, (AuthenticationFailed, ConfigurationError)):
            # The server answered; this account or setting is wrong. That proves the server up,
            # so it counts as a success for the breaker (which also ends a half-open trial:
            # leaving the trial running would keep the breaker open for good).
            self._server_answered()
            if isinstance(error, AuthenticationFailed) and not isinstance(
                error, MechanismUnavailable
            ):
                log.warning("BOSH login refused for %s: %s", user, condition, extra=extra)
            else:
                # (no mechanism offered that may be used is no refusal: nothing was tried, and
                # what to change, the server's settings or ours, is in the message alone)
                log.error("BOSH prebind misconfigured for %s: %s", user, error, extra=extra)
        else:
            opened = self.breaker.record_failure()
            log.warning(
                "BOSH prebind failed for %s after %.1f ms: %s (%s)",
                user,
                ms,
                error,
                condition,
                extra=extra,
            )
            if opened:
                log.error(
                    "BOSH circuit breaker opened: no prebinds for %.0f s",
                    self.breaker.reset_after,
                    extra=extra,
                )

    def _terminate_later_sync(self, fut: Future[PrebindSession]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.terminate_sync(fut.result())

    def terminate_sync(self, session: PrebindSession) -> None:
        """End, off the calling thread, a session that was prebound but will not reach a page
        (a non-page response must not wait for it)."""
        try:
            self._pool().submit(self.prebinder.terminate, session)
        except RuntimeError:  # the pool is shutting down (close()): end it here and now
            self.prebinder.terminate(session)

    def _terminate_later_async(self, task: asyncio.Task[PrebindSession]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.terminate_async(task.result())

    def terminate_async(self, session: PrebindSession) -> None:
        """End, in the background, a session that was prebound but will not reach a page."""
        t = asyncio.ensure_future(self.async_prebinder.terminate(session))
        self._tasks.add(t)
        self._ending[t] = session
        t.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():  # (cancelled as its loop ended: close() ends the session)
            self._ending.pop(task, None)

    # --- response side ---------------------------------------------------------------------
    def snippet(self, session: PrebindSession, nonce: str | None = None) -> str:
        names = self.config.variables
        values: list[tuple[str, object]] = [
            (names[0], session.jid),
            (names[1], session.sid),
            (names[2], session.rid),
        ]
        if self.config.public_service_url:
            values.append((self.config.service_variable, self.config.public_service_url))
        return script_snippet(values, nonce=nonce)

    @property
    def rewrites_body(self) -> bool:
        return self.config.mode in ("script", "both")

    @property
    def sends_headers(self) -> bool:
        """The session goes out in the response's headers (``headers``, ``both``): once they
        are sent it has reached the client, whether or not the body could carry the snippet."""
        return self.config.mode in ("headers", "both")

    def header_edits(
        self,
        get: HeaderGetter,
        session: PrebindSession,
        *,
        body_length: int | None,
        streaming: bool,
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """(headers to set, replacing any of the same name; headers to delete)."""
        sets: list[tuple[str, str]] = [("Cache-Control", "private, no-store")]
        # A prebound page must never sit in a shared cache. CDNs obey these targeted fields
        # instead of Cache-Control (RFC 9213 CDN-Cache-Control, Surrogate-Control, Akamai's
        # Edge-Control), so an app's max-age there would beat our no-store: drop them.
        # No validator either: each prebound response is new (a session of its own). A copy
        # cached without one (a page served while the XMPP server was down) and revalidated
        # with them would match this response in a conditional GET outside us (Django's
        # ConditionalGetMiddleware, a proxy): a 304, the stale copy kept, and the session
        # made for it lost and live. (A weakened ETag still matches If-None-Match.)
        removes: list[str] = ["Expires", "ETag", "Last-Modified", *_CDN_CACHE_FIELDS]
        vary = get("vary")
        tokens = {t.strip().lower() for t in (vary or "").split(",")}
        if "*" not in tokens and "cookie" not in tokens:
            sets.append(("Vary", f"{vary}, Cookie" if vary else "Cookie"))
        if self.sends_headers:
            names = self.config.header_names
            sets += [
                (names[0], _header_value(session.jid)),
                (names[1], _header_value(session.sid)),
                (names[2], str(session.rid)),
            ]
        if self.rewrites_body:
            # digests of the body as the app made it (RFC 9530, and the obsolete forms) would
            # fail the check of any client or proxy that verifies them
            removes += _BODY_DIGESTS
            # Byte ranges of the file the app serves are not ranges of this page, whose bytes
            # are its own: a client that resumed a cut download with ``Range`` (no validator
            # left for ``If-Range`` to catch it) would splice the app's bytes onto ours.
            if get("accept-ranges") is not None:
                sets.append(("Accept-Ranges", "none"))
            if streaming:
                removes.append("Content-Length")
            elif body_length is not None and get("content-length") is not None:
                sets.append(("Content-Length", str(body_length)))
        return sets, removes

    # --- JSON endpoint (converse.js prebind_url) -------------------------------------------
    def endpoint_status(
        self, credentials: Credentials | None, user: Any
    ) -> tuple[int, dict[str, Any]] | None:
        """The answer when no prebind is attempted, else ``None``."""
        if credentials is None:
            if not is_authenticated(user):
                return 401, {"error": "not authenticated"}
            return 403, {"error": "no XMPP account for this user"}
        if self.breaker.state == "open":
            return 503, {"error": "XMPP server unavailable"}
        return None

    def endpoint_result(
        self, session: PrebindSession | None, error: BaseException | None
    ) -> tuple[int, dict[str, Any]]:
        if session is not None:
            return 200, session.as_dict()
        if isinstance(error, AuthenticationFailed):
            return 403, {"error": "XMPP login refused", "condition": error.condition}
        return 503, {"error": "XMPP server unavailable"}

    def endpoint_response(
        self, status: int, payload: dict[str, Any]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        body = json.dumps(payload).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "private, no-store"),
            ("Vary", "Cookie"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if status == 503:
            headers.append(("Retry-After", str(max(1, round(self.breaker.retry_after())))))
        return status, headers, body

    def endpoint_refused(
        self, site: str | None, dest: str | None = None
    ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """403 for a request that could not read the answer, None for the others; each such
        request would make a live XMPP session nobody ends. Browsers too old to send these
        headers are answered as before.

        ``site``, the request's ``Sec-Fetch-Site``: another site made it (neither
        ``same-origin`` nor ``none``), an ``<img>`` or a no-cors ``fetch()`` there carrying the
        user's cookies where they are not ``SameSite``. No CORS header is ever sent.

        ``dest``, its ``Sec-Fetch-Dest``: no script made it (neither ``empty``, a ``fetch()``
        or XHR, nor ``document``, the URL opened in a tab), but an ``<img>``, ``<script>`` or
        ``<iframe>`` on this site: user content such as an avatar URL pointing here."""
        if site is not None and site not in _OWN_SITE:
            log.info("BOSH endpoint: refused a %s request", site[:20])
            return self.endpoint_response(403, {"error": "cross-site request"})
        if dest is not None and dest not in _READERS:
            log.info("BOSH endpoint: refused a request for an %s", dest[:20])
            return self.endpoint_response(403, {"error": "not a script's request"})
        return None

    def endpoint_sync(
        self, user: Any, site: str | None = None, dest: str | None = None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """``site``, ``dest``: the request's ``Sec-Fetch-Site`` and ``Sec-Fetch-Dest`` (see
        ``endpoint_refused``)."""
        if (refused := self.endpoint_refused(site, dest)) is not None:
            return refused
        credentials = self.credentials_sync(user)
        early = self.endpoint_status(credentials, user)
        if early is not None or credentials is None:
            return self.endpoint_response(*(early or (401, {})))
        pending = self.start_sync(credentials)
        session = pending.session() if pending else None
        return self.endpoint_response(
            *self.endpoint_result(session, pending.error if pending else None)
        )

    async def endpoint_async(
        self,
        user: Any,
        site: str | None = None,
        wait: Callable[[AsyncPending], Awaitable[PrebindSession | None]] | None = None,
        dest: str | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """``wait(pending)``: how the session is awaited, ``pending.session()`` by default. The
        ASGI adapter's also watches for the client going away (and ends the session then): a
        server drops what is sent after that without a word, and nothing cancels the wait."""
        if (refused := self.endpoint_refused(site, dest)) is not None:
            return refused
        credentials = await self.credentials_async(user)
        early = self.endpoint_status(credentials, user)
        if early is not None or credentials is None:
            return self.endpoint_response(*(early or (401, {})))
        pending = self.start_async(credentials)
        session = await (wait or AsyncPending.session)(pending) if pending else None
        return self.endpoint_response(
            *self.endpoint_result(session, pending.error if pending else None)
        )


#: BOSH terminate conditions (XEP-0124, 17.2; and the XMPP stream errors of the same name) by
#: which a server that is up refuses this request (its ``to`` is a domain it does not serve,
#: has none, or the request breaks its rules), not every one: they do not count towards the
#: breaker. Prosody answers a ``to`` it does not serve with ``improper-addressing``. Not
#: here, as they say the server or the way to it is sick, or cannot come from one user's
#: request: ``item-not-found`` (the server forgot the session: restarted, or a balancer sends
#: its requests to another node), ``internal-server-error`` (ejabberd's answer to an unknown
#: domain, too), ``remote-connection-failed``, ``system-shutdown``, ``host-gone`` ...
_REFUSED_REQUEST = frozenset(
    {"host-unknown", "improper-addressing", "bad-request", "policy-violation"}
)
#: Resource binding errors (RFC 6120, 7.6.2), the only ``ProtocolError`` with a condition of
#: these names: the resource is taken, this account may not bind one, or has too many; and
#: ``unsafe-jid``, a bound JID no page may carry (a backtick in this user's name, which
#: XEP-0106 does not escape): one such user's page views opened the breaker for everyone.
_REFUSED_BIND = frozenset(
    {"conflict", "not-allowed", "resource-constraint", "bad-request", "unsafe-jid"}
)


def _refused(error: BaseException) -> bool:
    """A refusal of this prebind by a server that is up (see ``_REFUSED_REQUEST``). By exact
    type: the conditions are the server's words, and mean this only where protocol.py puts
    them, in a terminating body or stream error, or in a bind's error."""
    condition = getattr(error, "condition", None)
    if type(error) is ServiceUnavailable:
        return condition in _REFUSED_REQUEST
    return type(error) is ProtocolError and condition in _REFUSED_BIND


def _close_at_exit(ref: weakref.ref[PrebindCore]) -> None:
    core = ref()
    if core is not None:
        core.close()


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value


def _checked(result: object) -> Credentials | None:
    if result is None or isinstance(result, Credentials):
        return result
    log.error(
        "BOSH credentials callable returned %s, not Credentials or None", type(result).__name__
    )
    return None


_BODY_DIGESTS = ("Content-Digest", "Repr-Digest", "Digest", "Content-MD5")

#: ``Sec-Fetch-Site`` values the endpoint answers: the app's own scripts, or the user typing
#: the URL.
_OWN_SITE = frozenset({"same-origin", "none"})
#: ``Sec-Fetch-Dest`` values of requests that can read the endpoint's answer
_READERS = frozenset({"empty", "document"})

#: Cache-Control for the caches they target; removed from prebound responses (``header_edits``).
_CDN_CACHE_FIELDS = (
    "CDN-Cache-Control",
    "Cloudflare-CDN-Cache-Control",
    "Surrogate-Control",
    "Edge-Control",
    # nginx and LiteSpeed caches read these before Cache-Control, whatever their order
    "X-Accel-Expires",
    "X-LiteSpeed-Cache-Control",
)


def _header_value(value: str) -> str:
    """Header values are Latin-1 on the wire: percent-encode anything outside printable ASCII,
    and then a "%" too, which a localpart may hold ("user%host@gateway"): sent as it is, a
    client could not tell "caf%C3%A9" from an encoded "caf\u00e9", nor decode "100%" at all."""
    if value.isascii() and value.isprintable() and "%" not in value:
        return value
    from urllib.parse import quote

    return quote(value, safe="@/:!$&'()*+,;=-._~")
