"""Pure ASGI middleware: ``app = BOSHPrebindMiddleware(app, service_url=..., credentials=...)``.

Per-request state lives in a ``_Responder``; ``http.response.start`` is held back only for a
response that will be rewritten (an HTML page for a user with credentials), everything else is
passed through as it comes, unbuffered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from asgiref.compatibility import guarantee_single_callable

from .config import MiddlewareConfig
from .core import (
    _BODY_DIGESTS,
    NAVIGATION,
    NOT_A_PAGE,
    VALIDATOR_FIELDS,
    AsyncPending,
    PrebindCore,
    excluded,
    exclusions,
    is_authenticated,
    is_injectable,
    log,
    page_injector,
    request_kind,
    work_out_kind,
)
from .credentials import Credentials
from .inject import Injector
from .optout import opted_out
from .session import PrebindSession

__all__ = ["BOSHPrebindMiddleware", "scope_nonce", "scope_user"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Where the app can leave a CSP nonce for the injected ``<script>``.
NONCE_SCOPE_KEY = "csp_nonce"


def scope_user(scope: Scope) -> Any:
    """Starlette's ``AuthenticationMiddleware`` puts the user here (read it without asserting)."""
    return scope.get("user")


def scope_nonce(scope: Scope) -> str | None:
    nonce = scope.get(NONCE_SCOPE_KEY)
    if nonce is None:
        state = scope.get("state")
        if isinstance(state, MutableMapping):
            nonce = state.get(NONCE_SCOPE_KEY)
    return str(nonce) if nonce else None


def _as_dict(raw: Any) -> dict[bytes, bytes] | None:
    """``raw`` headers as a dict, when that loses nothing: every name is lower-case bytes (as
    ASGI servers send them, and most apps) and none repeats. Built in C, so it is several times
    cheaper than a Python loop over the headers, which every logged-in request would pay for.
    None otherwise (mixed-case names, a repeated field, a bytearray), for the slow path."""
    try:
        count = len(raw)  # first: dict() would use up an iterator
        fast = dict(raw)
        if len(fast) == count and b"".join(fast).islower():
            return fast
    except (TypeError, ValueError):
        pass
    return None


#: What every current browser's ``fetch()`` and ``XMLHttpRequest`` send, as ASGI servers pass
#: it on (lower-case name). A line that says exactly this makes the request no page whatever
#: else it says (see ``request_kind_of``).
_FETCH = (b"sec-fetch-dest", b"empty")


def _request_kind(raw: Any) -> str:
    """``request_kind`` of the request's raw headers; every logged-in request pays for this.
    The usual API call is settled by one scan in C for ``_FETCH``. Otherwise, in the common
    case (lower-case names, none repeated) the four values come out of one dict built in C,
    with no Python call per header or per value."""
    if type(raw) is list and _FETCH in raw:  # (``in`` would use up an iterator)
        return NOT_A_PAGE
    return _kind_of_headers(raw)


#: ``_kind_of_headers`` answers by the raw values (see ``core.remember_kind``).
_KINDS: dict[tuple[Any, Any, Any], str] = {}


def _kind_of_headers(raw: Any) -> str:
    """``_request_kind`` once the ``_FETCH`` scan has found nothing: looked up by the three
    values as sent, so that the usual request (curl's ``*/*``, a browser's navigation, or no
    such header at all) costs no decoding and no parsing of its ``Accept``."""
    fast = _as_dict(raw)
    if fast is None:
        return request_kind(_Headers(raw).get)
    get = fast.get
    xhr = get(b"hx-request") or get(b"x-requested-with") or get(b"sec-purpose") or get(b"purpose")
    key = (xhr, get(b"sec-fetch-dest"), get(b"accept"))
    try:
        return _KINDS[key]
    except (KeyError, TypeError):  # (TypeError: a bytearray value, which is not kept either)
        pass
    return work_out_kind(_KINDS, key, _latin1)


def _latin1(value: Any) -> str | None:
    return None if value is None else bytes(value).decode("latin-1")


class _Headers:
    """Case-insensitive read access to raw ASGI headers (some apps send b"Content-Type").

    A field sent on several lines reads as one comma-joined value (RFC 9110, 5.3), so that
    e.g. ``Vary: Accept-Encoding`` + ``Vary: Origin`` is merged, not cut down to its first line.
    """

    __slots__ = ("_fast", "_raw")

    def __init__(self, raw: Any) -> None:
        # read more than once: an iterator (ASGI only says "iterable") is made a list
        self._raw = raw if isinstance(raw, (list, tuple)) else list(raw or ())
        self._fast = _as_dict(self._raw)

    def get(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        if self._fast is not None:
            raw = self._fast.get(key)
            return None if raw is None else bytes(raw).decode("latin-1")
        found = None
        for k, v in self._raw:
            if bytes(k).lower() == key:
                value = bytes(v).decode("latin-1")
                found = value if found is None else f"{found}, {value}"
        return found


def _may_be_html(raw: Any) -> bool:
    """False when no ``Content-Type`` line so much as mentions html: then the response is no
    page (``is_injectable`` wants text/html or application/xhtml+xml). A logged-in request
    that did not say what it wants (a script, curl) pays this for every response it gets, so
    the usual line costs no call at all: ``len()`` settles most names, and the usual spelling
    of the one left (lower-case bytes, as ASGI apps send it) is one compare; a ``Content-Type``
    spelt otherwise still counts. (Measured on 3.11, instructions: a third to almost half
    fewer than joining the values in C and searching that, on responses of 7 and 2 lines.)"""
    for k, v in raw:
        if len(k) != 12:
            continue
        # (``bytes()`` only for what is bytes-like but no bytes: on bytes it is one more call)
        name = k if type(k) is bytes else bytes(k)
        if name != b"content-type" and name.lower() != b"content-type":
            continue
        # ``partition`` rather than ``b"html" in``: bytes' ``in`` first tries the needle as an
        # int, and raises and clears a TypeError to learn it is none (0.2-0.5 us more than a
        # search, measured on 3.11 to 3.13); ``find`` parses its arguments the slow way
        if (v if type(v) is bytes else bytes(v)).lower().partition(b"html")[1]:
            return True
    return False


_PUSH = "http.response.push"


def _drop_validators(scope: Scope) -> None:
    """``core.drop_validators``, for an ASGI request (whose headers are a list by now)."""
    raw = scope["headers"]
    if any(bytes(k).lower() in VALIDATOR_FIELDS for k, _ in raw):
        scope["headers"] = [(k, v) for k, v in raw if bytes(k).lower() not in VALIDATOR_FIELDS]


def route_path(path: str, root_path: str) -> str:
    """``path`` below the mount point ``root_path``, as the WSGI adapter's ``PATH_INFO`` is:
    Starlette's ``Mount`` and uvicorn's ``--root-path`` keep the mount point in
    ``scope["path"]`` (the ASGI spec's reading since 2023); older servers leave it out.
    The same rule as Starlette's ``get_route_path``, so our paths match its routes."""
    if not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    if path[len(root_path)] == "/":
        return path[len(root_path) :]
    return path


def _edited(raw: Any, sets: list[tuple[str, str]], removes: list[str]) -> list[tuple[bytes, bytes]]:
    drop = {n.lower().encode("latin-1") for n, _ in sets} | {
        n.lower().encode("latin-1") for n in removes
    }
    out = [(bytes(k), bytes(v)) for k, v in raw or () if bytes(k).lower() not in drop]
    out += [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in sets]
    return out


class _Responder:
    __slots__ = (
        "_pushes",
        "_receive",
        "_send",
        "_stash",
        "_watcher",
        "app_receiving",
        "core",
        "credentials",
        "delivered",
        "injector",
        "mw",
        "passthrough",
        "pending",
        "scope",
        "session",
        "start",
        "user",
    )

    def __init__(
        self,
        middleware: BOSHPrebindMiddleware,
        scope: Scope,
        send: Send,
        credentials: Credentials | None,
        pending: AsyncPending | None,
        user: Any = None,
        receive: Receive | None = None,
    ) -> None:
        self.mw = middleware
        self.core = middleware.core
        self.scope = scope
        self._send = send
        # The server's receive, when the app was given ours (a navigation): then the wait for
        # the session also watches for the client going away (see ``_wait``).
        self._receive = receive
        self._stash: list[Message] = []  # messages the watch read that the app has not yet
        self._watcher: asyncio.Task[Message] | None = None
        self.app_receiving = False
        self.credentials = credentials  # None: looked up from ``user`` once a page needs it
        self.user = user
        self.pending = pending
        self.passthrough = False
        self.start: Message | None = None
        self.session: PrebindSession | None = None
        self.delivered = False  # the session went out (in the headers or the body)
        self.injector: Injector | None = None
        #: HTTP/2 pushes the app sent while the start was held: they go out right after it
        self._pushes: list[Message] = []

    async def _session(self) -> PrebindSession | None:
        if self.pending is None:  # not a navigation after all, but an HTML page: prebind now
            if self.credentials is None:
                self.credentials = await self.core.credentials_async(self.user)
                if self.credentials is None:
                    return None
            self.pending = self.core.start_async(self.credentials)
        if self.pending is None:
            return None
        if self._receive is None or self.app_receiving:
            # (an app that listens for the disconnect itself cancels the page, which ends it)
            return await self.pending.session()
        return await self._wait(self.pending)

    async def _wait(self, pending: AsyncPending) -> PrebindSession | None:
        """The session, unless the client goes away first: a browser that gave up on a slow
        page (or a reset connection) gets nothing, and the server drops what is sent to it
        without a word, so the session would seem delivered and stay live until it timed out
        at the XMPP server. Its prebind is ended instead. The request's messages read
        meanwhile go to the app when it asks (``receive``)."""
        waiting = asyncio.ensure_future(pending.session())
        self._watcher = watcher = asyncio.ensure_future(self._watch())
        try:
            await asyncio.wait((waiting, watcher), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the page itself cancelled
            self._end_unsent(waiting)
            raise
        finally:
            watcher.cancel()
            self._watcher = None
        if watcher.done() and not watcher.cancelled():
            # The client went away, even if the session came in the same turn: a server
            # drops what is sent after the disconnect, so it would seem delivered, and live.
            self._end_unsent(waiting)
            self._stash.append(watcher.result())  # (the app's next receive says so too)
            log.info("client went away before its page: session not sent, ended")
            return None
        if waiting.done():
            return waiting.result()
        # The app asked for a message meanwhile (``receive`` took the watch over): Starlette's
        # streamed responses listen for the disconnect in a task of their own while they send
        # the start. The app sees a disconnect itself now, and cancels the page.
        return await waiting

    def _end_unsent(self, waiting: asyncio.Future[PrebindSession | None]) -> None:
        """The wait for the session is given up. Still running: cancelled, and the pending
        ends the session once it exists. Done: the session is this page's to end, claimed."""
        if not waiting.done():
            waiting.cancel()
        elif not waiting.cancelled() and waiting.exception() is None:
            session = waiting.result()
            if session is not None:
                self.core.terminate_async(session)

    async def _watch(self) -> Message:
        receive = self._receive
        assert receive is not None
        while True:  # the rest of the request's body, if the app has not read it
            message = await receive()
            if message["type"] == "http.disconnect":
                return message
            self._stash.append(message)
            if not message.get("more_body", False):
                break
        # Read whole: the server's next message can only be the disconnect. A receive that
        # says anything else (a harness that answers every call with the request) is read no
        # further: one message, not one per turn of the loop while the session is awaited.
        message = await receive()
        if message["type"] == "http.disconnect":
            return message
        self._stash.append(message)
        await asyncio.Future()  # (cancelled once the session is there)
        raise AssertionError("unreachable")

    async def receive(self) -> Message:
        """The app's receive: what the watch read first, and no read of its own while one is
        in flight (an ASGI server serves one receive at a time)."""
        watcher = self._watcher
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if self._stash:
            return self._stash.pop(0)
        assert self._receive is not None
        self.app_receiving = True
        try:
            return await self._receive()
        finally:
            self.app_receiving = False

    def cleanup(self) -> None:
        if self.pending is not None:
            self.pending.discard()
        if self.session is not None:
            self._drop_session()

    def _drop_session(self) -> None:
        """A session obtained but never sent (the app failed, or sent something we pass on
        unchanged): end it rather than leave it to time out at the server."""
        session, self.session = self.session, None
        if session is not None and not self.delivered:
            self.core.terminate_async(session)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.passthrough:
            if (
                kind == "http.response.trailers"
                and self.injector is not None
                and self.injector.done
            ):
                # (digests of the body the app made, as in the start: RFC 9530 allows them in
                # trailers too, and the body went out with the snippet in it)
                message["headers"] = _edited(message.get("headers"), [], list(_BODY_DIGESTS))
            await self._send(message)
            # (headers mode: the start that carries the session has gone out with this, or
            # before it; a push, which may come between them, says nothing of that)
            if self.injector is None and self.session is not None and kind != _PUSH:
                self.delivered = True
            return
        if kind == _PUSH and (self.start is not None or self.injector is not None):
            # A push (ASGI's HTTP/2 server push, allowed any time before the last body) says
            # nothing of this page's body: it is no reason to give up the injection.
            if self.start is not None:
                self._pushes.append(message)  # after the start, which is held
            else:
                await self._send(message)
            return
        if kind == "http.response.start" and self.start is None and self.injector is None:
            raw = message.get("headers") or ()
            if not isinstance(raw, (list, tuple)):  # read more than once from here on
                raw = message["headers"] = list(raw)
            # (a page whose view called ``no_prebind`` is taken for no page at all)
            headers = _Headers(raw) if _may_be_html(raw) and not opted_out(self.scope) else None
            if headers is None or not is_injectable(
                self.scope["method"], message["status"], headers.get
            ):
                if headers is not None:
                    self.core.check_compressed(message["status"], headers.get)
                self.passthrough = True
                self.cleanup()
                await self._send(message)
                return
            self.session = await self._session()
            if self.session is None:  # fail open
                self.passthrough = True
                await self._send(message)
                return
            if not self.core.rewrites_body:
                sets, removes = self.core.header_edits(
                    headers.get, self.session, body_length=None, streaming=False
                )
                message["headers"] = _edited(message.get("headers"), sets, removes)
                # Delivered with the next message (``passthrough`` below), not now: a server
                # may hold the start until the first body message (hypercorn), and an app
                # that fails before one gets the server's error response in its place.
                self.passthrough = True
                await self._send(message)
                return
            self.start = message  # held until the first body message says whole or streamed
            return
        if kind == "http.response.body" and self.start is not None:
            start, self.start = self.start, None
            assert self.session is not None
            headers = _Headers(start.get("headers"))
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            self.injector = page_injector(
                self.core.snippet(self.session, self.mw.get_nonce(self.scope)),
                headers.get("content-type"),
            )
            out = self.injector.feed(body)
            if not more:
                out += self.injector.finish()
            sets, removes = self.core.header_edits(
                headers.get, self.session, body_length=len(out), streaming=more
            )
            start["headers"] = _edited(start.get("headers"), sets, removes)
            await self._send(start)
            for push in self._pushes:
                await self._send(push)
            await self._send({"type": "http.response.body", "body": out, "more_body": more})
            # (in "both" mode the headers just sent carry it, snippet or not)
            self.delivered = self.injector.done or self.core.sends_headers
            if not more:
                self.passthrough = True
            return
        if kind == "http.response.body" and self.injector is not None:
            out = self.injector.feed(bytes(message.get("body", b"")))
            more = bool(message.get("more_body", False))
            if not more:
                out += self.injector.finish()
                self.passthrough = True
            await self._send({"type": "http.response.body", "body": out, "more_body": more})
            self.delivered = self.delivered or self.injector.done
            return
        if self.start is None and self.injector is None:
            # Before the response's start: early hints, HTTP/2 pushes, the test client's
            # ``http.response.debug``. They say nothing of the response to come.
            await self._send(message)
            return
        # Anything else (http.response.pathsend, zerocopysend, trailers ...) while holding:
        # give up on the rewrite, send what was held unchanged (the start, or the bytes the
        # Injector kept back), and end the session unless it went out already.
        if self.start is not None:
            start, self.start = self.start, None
            self._drop_session()
            await self._send(start)
            for push in self._pushes:
                await self._send(push)
        elif self.injector is not None and not self.injector.done:
            held = self.injector.release()
            if held:
                await self._send({"type": "http.response.body", "body": held, "more_body": True})
            self._drop_session()
        self.passthrough = True
        await self._send(message)


class BOSHPrebindMiddleware:
    """Prebind an XMPP session for authenticated users' HTML pages.

    ``credentials(user)`` maps the user (``get_user(scope)``, by default ``scope["user"]``) to
    ``Credentials`` or ``None``; remaining keyword arguments are the settings of the README, in
    lower case (``MiddlewareConfig`` and engine ``PrebindOptions`` fields alike).
    """

    def __init__(
        self,
        app: Any,
        service_url: str | None = None,
        credentials: Callable[[Any], Any] | None = None,
        *,
        get_user: Callable[[Scope], Any] = scope_user,
        get_nonce: Callable[[Scope], str | None] = scope_nonce,
        config: MiddlewareConfig | None = None,
        **settings: Any,
    ) -> None:
        self.app: ASGIApp = guarantee_single_callable(app)  # type: ignore[no-untyped-call]
        if config is None:
            # engine settings (mechanisms=, wait=, transport= ...) are accepted here too
            config = MiddlewareConfig.from_mapping(
                settings, service_url=service_url or "", credentials=credentials
            )
        self.config = config
        self.core = PrebindCore(config)
        self._endpoint_path = config.endpoint_path
        self._exclude, self._exclude_final = exclusions(config.exclude_paths, self._endpoint_path)
        self._navigation_only = config.navigation_only
        self.get_user = get_user  # (sets ``_scope_user`` too)
        self.get_nonce = get_nonce
        # Calling the app runs the class's plain ``__call__``; looking it up as an attribute
        # finds this coroutine function first, which is what servers ask when they choose
        # between ASGI 3, ASGI 2 and WSGI. (``markcoroutinefunction`` would satisfy asyncio's
        # test, not Python 3.11's ``inspect.iscoroutinefunction``, which hypercorn uses.)
        self.__call__ = self._acall  # type: ignore[method-assign]

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Every request passes here: the cheapest checks first (path and method, then the
        # user, then one scan of the request headers), and ``credentials()`` only for a
        # navigation (to start the prebind next to the view) or once the response turns out to
        # be a page that will carry a session. A request that says it is no navigation
        # (``not_a_page``: fetch/XHR, htmx, a JSON client) goes to the app with the server's own
        # ``send``: nothing to inspect, and no orphan session for HTML a script fetched.
        #
        # A plain function that returns the awaitable to await, which is all ASGI asks of an
        # app: for a request left alone that is the app's own, so that the request pays for
        # no coroutine of this middleware's (measured: 0.4 us a request in a running uvicorn,
        # on a 21 us request). Servers that ask whether the app is ASGI 3 get the answer from
        # the ``__call__`` set on the instance (see ``__init__``). An error in ``get_user``
        # comes from the call rather than from the await; servers and frameworks await the
        # call where they make it, inside the same ``try``.
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                receive = self._lifespan_receive(receive)
            return self.app(scope, receive, send)
        path = scope["path"]  # (``path`` and ``headers`` are required keys of an HTTP scope)
        try:  # (a subscript: ``scope.get`` took 8 ns longer in a hot loop; servers set it)
            root = scope["root_path"]
        except KeyError:
            root = ""
        if root:  # mounted: the endpoint and exclude_paths are below the mount point
            path = route_path(path, root)
        # Excluded paths first, whatever the method (core.wants_path, inlined): static files
        # are the requests most often left alone, and in a running server each bytecode here
        # costs ~20 ns, 3-4 times what it takes in a hot loop. (Measured under uvicorn, server
        # CPU per request: a static file took +0.9-1.0 us before this order and +0.6 us after,
        # what a class with one ``startswith`` costs.) With nothing excluded (the default) no
        # ``startswith`` at all: on 3.11 it packs its argument in a tuple, 47 ns where the
        # test of the tuple takes a few. The endpoint, if it lies under a prefix, is never
        # excluded (``exclusions``/``excluded`` see to it).
        if (
            self._exclude
            and path.startswith(self._exclude)
            and (self._exclude_final or excluded(path, self._exclude, self._endpoint_path))
        ):
            return self.app(scope, receive, send)
        if path == self._endpoint_path:  # (None when there is no endpoint)
            return self._endpoint(scope, receive, send)
        if scope["method"] != "GET":
            return self.app(scope, receive, send)
        user = scope.get("user") if self._scope_user else self._get_user(scope)
        # is_authenticated, inlined: the usual answer (a plain True/False, as Starlette's and
        # Django's users give) is read without a Python call
        flag = getattr(user, "is_authenticated", None)
        if flag is not True and (flag is False or not self._authenticated(user, scope)):
            return self.app(scope, receive, send)
        raw = scope["headers"]
        if type(raw) is list:
            if _FETCH in raw:  # _request_kind's first test, inlined
                return self.app(scope, receive, send)
        elif not isinstance(raw, (list, tuple)):
            # (ASGI says iterable: one that reading here would use up is read into a list,
            # which the app then gets in its place)
            raw = scope["headers"] = list(raw)
        kind = _kind_of_headers(raw)
        if kind == NOT_A_PAGE:
            return self.app(scope, receive, send)
        if kind != NAVIGATION:  # undecided: the response's start will say
            if self._navigation_only:
                return self.app(scope, receive, send)
            return self._sniffed(scope, receive, send, user)
        return self._navigation(scope, receive, send, user)

    @property
    def get_user(self) -> Callable[[Scope], Any]:
        return self._get_user

    @get_user.setter
    def get_user(self, get_user: Callable[[Scope], Any]) -> None:
        self._get_user = get_user
        # every request asks: the default is read inline, without a call of its own (a
        # ``methodcaller`` would be fewer bytecodes and took 60 ns longer in a hot loop)
        self._scope_user = get_user is scope_user

    def _authenticated(self, user: Any, scope: Scope) -> bool:
        """``is_authenticated(user)`` for a user whose ``is_authenticated`` is no plain bool
        (a method, a missing attribute, no user at all). Subclasses hook here what they want
        to say about such requests: requests with a plain answer never get here. True for a
        ``None`` user means that a middleware inside this one will set it: it is read again
        (``get_user``) once the response's start says it is a page, and the prebind starts
        then, not next to the view."""
        return is_authenticated(user)

    def __getstate__(self) -> dict[str, Any]:
        # ``copy.copy`` (and deepcopy) copy the instance's dict: the ``__call__`` there is the
        # original's bound ``_acall``, which would serve a copy's requests with the original.
        state = self.__dict__.copy()
        state.pop("__call__", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__call__ = self._acall  # type: ignore[method-assign]

    async def _acall(self, scope: Scope, receive: Receive, send: Send) -> None:
        """What ``app.__call__`` is on an instance: the same as calling the app, as an
        ``async def``, for servers that pick the interface with
        ``inspect.iscoroutinefunction(app.__call__)`` (hypercorn; uvicorn and asgiref use
        ``asyncio.iscoroutinefunction``). Calling the app goes to the class's ``__call__``."""
        await type(self).__call__(self, scope, receive, send)

    async def _sniffed(self, scope: Scope, receive: Receive, send: Send, user: Any) -> None:
        """A request that did not say what it wants (a script, curl, a test client): a
        ``_Responder`` (and with it the prebind) only once the response's start says HTML;
        anything else goes through as it comes. Most such responses are JSON or files, and
        this keeps what they pay to one look at their Content-Type.

        The app's ``send`` is a closure that returns the awaitable to await (the server's
        ``send``, or the responder's), which is all ASGI asks of it: no coroutine of its own
        per message, and no object but the closure per request (measured: a class with
        ``__slots__`` took 0.3 us more per request to set up)."""
        responder: _Responder | None = None
        looked = False  # the response's start has been seen

        def sniff(message: Message) -> Awaitable[None]:
            nonlocal responder, looked
            if looked:
                return send(message) if responder is None else responder.send(message)
            if message["type"] == "http.response.start":
                looked = True
                raw = message.get("headers") or ()
                # read more than once from here on (``type`` first: a list, the usual, is
                # settled without a call)
                if type(raw) is not list and not isinstance(raw, (list, tuple)):
                    raw = message["headers"] = list(raw)
                if _may_be_html(raw):
                    # (None: a user that a middleware inside this one sets: there by now)
                    who = self.get_user(scope) if user is None else user
                    if user is not None or is_authenticated(who):
                        responder = _Responder(self, scope, send, None, None, who)
                        return responder.send(message)
            return send(message)

        try:
            await self.app(scope, receive, sniff)
        finally:
            if responder is not None:
                responder.cleanup()

    async def _navigation(self, scope: Scope, receive: Receive, send: Send, user: Any) -> None:
        if user is None:  # (``_authenticated`` said a middleware inside this one will set it)
            await self._sniffed(scope, receive, send, None)
            return
        core = self.core
        credentials = await core.credentials_async(user)
        if credentials is None:
            await self.app(scope, receive, send)
            return
        pending = core.start_async(credentials)  # now, next to the view
        if pending is not None:
            _drop_validators(scope)  # (answered in full: see core.drop_validators)
        responder = _Responder(self, scope, send, credentials, pending, user, receive)
        try:
            await self.app(scope, responder.receive, responder.send)
        finally:
            responder.cleanup()

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                await self.core.aclose()
            return message

        return wrapped

    async def _endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":
            status, headers, body = 405, [("Allow", "GET"), ("Content-Length", "0")], b""
        else:
            fetch = _Headers(scope["headers"])
            user = self.get_user(scope)
            # The session is awaited as a page's is, watching for the client going away
            # (converse.js's fetch, aborted by a user who leaves as the page loads): then it
            # is ended, not sent to nobody and left live.
            watch = _Responder(self, scope, send, None, None, user, receive)
            status, headers, body = await self.core.endpoint_async(
                user, fetch.get("sec-fetch-site"), watch._wait, fetch.get("sec-fetch-dest")
            )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": body})
