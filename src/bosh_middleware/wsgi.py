"""WSGI middleware: ``app = BOSHPrebindMiddleware(app, service_url=..., credentials=...)``.

The prebind runs in a worker thread next to the view (WSGI has no event loop to overlap on).
Responses that will not carry a session go straight through: same ``start_response`` call, same
iterable, no buffering.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from .config import MiddlewareConfig
from .core import (
    NAVIGATION,
    NOT_A_PAGE,
    PrebindCore,
    SyncPending,
    drop_validators,
    environ_kind,
    excluded,
    exclusions,
    is_authenticated,
    is_injectable,
    page_injector,
)
from .credentials import Credentials
from .inject import Injector
from .optout import opted_out
from .session import PrebindSession

__all__ = [
    "ENVIRON_NONCE",
    "BOSHPrebindMiddleware",
    "environ_nonce",
    "environ_user",
    "header_getter",
    "may_be_html",
]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: Where the app can leave a CSP nonce for the injected ``<script>``.
ENVIRON_NONCE = "csp_nonce"


def environ_user(environ: dict[str, Any]) -> Any:
    """``REMOTE_USER``, as set by the server or an auth middleware."""
    return environ.get("REMOTE_USER") or None


def environ_nonce(environ: dict[str, Any]) -> str | None:
    nonce = environ.get(ENVIRON_NONCE)
    return str(nonce) if nonce else None


def may_be_html(headers: Iterable[tuple[str, str]]) -> bool:
    """False when no ``Content-Type`` line so much as mentions html: the response is no page,
    settled without ``is_injectable`` (see the ASGI adapter's twin; Flask's adapter asks it of
    werkzeug's ``Headers``, which iterate as such pairs). Every line a request that did not
    say what it wants (a script, curl) gets back passes here: ``len()`` settles most names,
    and the usual spellings of the one left with a compare, not a ``lower()``."""
    for k, v in headers:
        if (
            len(k) == 12
            and (k == "Content-Type" or k == "content-type" or k.lower() == "content-type")
            and "html" in v.lower()
        ):
            return True
    return False


def header_getter(headers: Iterable[tuple[str, str]]) -> Callable[[str], str | None]:
    """Case-insensitive lookup by a lower-case name; a field sent on several lines reads as
    one comma-joined value (RFC 9110, 5.3), so that two ``Vary`` lines are merged, not cut
    down to the first. One pass over the lines, and then each lookup is a dict's, in C: a
    page's start is asked five to ten names (``is_injectable``, ``header_edits``), and a scan
    of every line per name took ~230 bytecodes on a 2-line start. (Flask's adapter reads
    its responses' headers this way too: werkzeug's ``Headers.get`` raises and catches an
    exception for each name that is absent.)"""
    found: dict[str, str] = {}
    for k, v in headers:
        k = k.lower()
        found[k] = f"{found[k]}, {v}" if k in found else v
    return found.get


def _edited(
    headers: list[tuple[str, str]], sets: list[tuple[str, str]], removes: list[str]
) -> list[tuple[str, str]]:
    drop = {n.lower() for n, _ in sets} | {n.lower() for n in removes}
    return [(k, v) for k, v in headers if k.lower() not in drop] + sets


class _ClosingIterator:
    """Yields from ``iterator`` and forwards ``close()`` to the app's iterable (PEP 3333)."""

    def __init__(self, iterator: Iterator[bytes], original: Iterable[bytes]) -> None:
        self._it = iterator
        self._original = original

    def __iter__(self) -> Iterator[bytes]:
        return self._it

    def close(self) -> None:
        close = getattr(self._original, "close", None)
        if close is not None:
            close()


class _ExchangeBody(_ClosingIterator):
    """A body the exchange may still hold a prebind for: closing it (the server does, whether
    the response completed, failed or the client went away) also ends a session that never
    reached the client, as the ASGI adapter's ``_Responder.cleanup`` does."""

    def __init__(
        self, iterator: Iterator[bytes], original: Iterable[bytes], exchange: _Exchange
    ) -> None:
        super().__init__(iterator, original)
        self._exchange = exchange

    def close(self) -> None:
        try:
            super().close()  # the app's close(), once
        finally:
            self._exchange.cleanup()


class _Exchange:
    """One request's state."""

    __slots__ = (
        "_start_response",
        "core",
        "credentials",
        "delivered",
        "environ",
        "held",
        "injector",
        "mode",
        "mw",
        "pending",
        "result_closed",
        "session",
        "user",
        "write_to",
    )

    def __init__(
        self,
        mw: BOSHPrebindMiddleware,
        environ: dict[str, Any],
        start_response: StartResponse,
        credentials: Credentials | None,
        pending: SyncPending | None,
        user: Any,
    ) -> None:
        self.mw = mw
        self.core = mw.core
        self.environ = environ
        self._start_response = start_response
        self.credentials = credentials
        self.user = user  # credentials are looked up from it once a page needs them
        self.pending = pending
        # -> "pass" | "held" (start held for the rewrite) -> "sent" (rewritten start given to
        # the server, which sends it with the first non-empty chunk)
        self.mode = "undecided"
        self.held: tuple[str, list[tuple[str, str]], Any] | None = None
        #: The server's ``write()``, once an app that writes its page has started it (``write``)
        self.write_to: Callable[[bytes], object] | None = None
        self.session: PrebindSession | None = None  # claimed for the page, until ended
        self.delivered = False  # the server took the session (its headers, or the snippet)
        self.injector: Injector | None = None  # streaming a page; None once replaced
        self.result_closed = False  # the app's iterable, read whole, was closed here

    def discard(self) -> None:
        if self.pending is not None:
            self.pending.discard()

    def cleanup(self) -> None:
        """The response is over, completed or not: end a prebind that never reached the client
        (the app failed mid-stream, or the server stopped early because the client went away)
        rather than leave its session live at the XMPP server until it times out."""
        if self.mode == "undecided" or self.mode == "held":  # never claimed: end it once done
            self.discard()
        self._drop_session()

    def _drop_session(self) -> None:
        """A session claimed for the page but never sent: end it (as the ASGI responder's)."""
        session, self.session = self.session, None
        if session is not None and not self.delivered:
            self.core.terminate_sync(session)

    def _replace(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any
    ) -> Callable[[bytes], object]:
        """An error response in place of the rewritten page, from the app's iterable (PEP 3333
        allows it until the headers are sent)."""
        # A server that has sent the headers re-raises here: the page stands as far as it went,
        # and closing the body ends the session if the snippet had not gone out yet.
        write = self._start_response(status, headers, exc_info)
        # Accepted, so nothing was sent (a server sends the headers with the first non-empty
        # chunk): the error goes out as the app gave it. No more injection, and the bytes the
        # Injector held of the abandoned page go with it; the session, in those headers or
        # that page, reached no one.
        self.mode = "pass"
        self.injector = None
        self.delivered = False  # (nor were the headers that carried it, in headers mode)
        self._drop_session()
        return write

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if (
            exc_info is None
            and self.mode == "undecided"
            and not may_be_html(headers)  # no page: nothing to rewrite, and no session for it
        ):
            self.mode = "pass"
            self.discard()
            return self._start_response(status, headers)
        if exc_info is not None and self.mode == "sent":
            return self._replace(status, headers, exc_info)
        code = int(status.split(None, 1)[0])
        get = header_getter(headers)
        # (a page whose view called ``no_prebind`` is taken for no page at all)
        page = not opted_out(self.environ)
        injectable = page and is_injectable(self.environ.get("REQUEST_METHOD", ""), code, get)
        if self.credentials is None and exc_info is None and injectable:
            self.credentials = self.core.credentials_sync(self.user)
        if exc_info is not None or self.credentials is None or not injectable:
            if exc_info is None and page:
                self.core.check_compressed(code, get)
            if self.mode == "held":  # error after a held start: forget the rewrite
                self.held = None
            self.mode = "pass"
            self.discard()
            return self._start_response(status, headers, exc_info)
        self.mode = "held"
        self.held = (status, headers, exc_info)
        return self.write

    def write(self, data: bytes) -> None:
        """PEP 3333's ``write()``, for an app that writes its page rather than returning it.
        Its first call settles the held start (the session, then the start given to the
        server) and every call goes on to the server's ``write()`` at once, through the
        Injector: the page is streamed as the app writes it, as a returned iterable's would
        be, not held whole until the app returns (a large page would be held in memory
        several times over, and the client would see nothing of it meanwhile)."""
        write = self.write_to
        if write is None:  # the first write: the start is held
            write = self.write_to = self._start_stream()
        injector = self.injector
        out = data if injector is None else injector.feed(data)
        if out:  # (a write of b"" is no block to pass on: the Injector may hold it all)
            write(out)
        # Returned: the server took it (the snippet, or headers that carry the session)
        self.delivered = self.delivered or (
            (self.core.sends_headers and bool(out)) or (injector is not None and injector.done)
        )

    def _session(self) -> PrebindSession | None:
        if self.pending is None and self.credentials is not None:
            self.pending = self.core.start_sync(self.credentials)
        return self.pending.session() if self.pending is not None else None

    def _start_stream(self) -> Callable[[bytes], object]:
        """The held start given to the server for a body that goes out as it comes: with the
        session's headers, and an Injector for the body to pass through (its length unknown;
        none in headers mode, where the body is the app's), or as it was (fail open). The
        server's ``write()``."""
        assert self.held is not None
        status, headers, exc_info = self.held
        session = self._session()
        if session is None:  # fail open: the page as it was
            self.mode = "pass"
            return self._start_response(status, headers, exc_info)
        self.session, self.mode = session, "sent"
        get = header_getter(headers)
        if self.core.rewrites_body:
            self.injector = self._injector(session, get)
        sets, removes = self.core.header_edits(
            get, session, body_length=None, streaming=self.core.rewrites_body
        )
        return self._start_response(status, _edited(headers, sets, removes), exc_info)

    def _injector(self, session: PrebindSession, get: Callable[[str], str | None]) -> Injector:
        return page_injector(
            self.core.snippet(session, self.mw.get_nonce(self.environ)), get("content-type")
        )

    def rewrite(self, result: Iterable[bytes]) -> Iterable[bytes]:
        assert self.held is not None
        whole = isinstance(result, (list, tuple))
        if not whole or not self.core.rewrites_body:
            self._start_stream()
            if self.mode == "pass":
                return result
            if whole:  # (headers mode)
                self.delivered = True  # in the headers, which go out with the body it has whole
                return result
            # Streamed: (headers mode) the server sends the headers with the first non-empty
            # chunk (PEP 3333), and an app that fails before it gets the server's error
            # response in their place; so they count as sent once it is given one (``_stream``)
            return _ExchangeBody(self._stream(result), result, self)
        status, headers, exc_info = self.held
        session = self._session()
        if session is None:  # fail open: the page as it was
            self.mode = "pass"
            self._start_response(status, headers, exc_info)
            return result
        self.session, self.mode = session, "sent"
        get = header_getter(headers)
        injector = self._injector(session, get)
        # a whole body: inject and set Content-Length
        try:
            body = injector.feed(b"".join(result)) + injector.finish()
        finally:
            self.result_closed = True
            close = getattr(result, "close", None)
            if close is not None:
                close()
        sets, removes = self.core.header_edits(get, session, body_length=len(body), streaming=False)
        self._start_response(status, _edited(headers, sets, removes), exc_info)
        # (not done: a charset that cannot carry the snippet, the page went out without it;
        # in "both" mode the headers carry the session all the same)
        self.delivered = injector.done or self.core.sends_headers
        self._drop_session()
        return [body]

    def _stream(self, result: Iterable[bytes]) -> Iterator[bytes]:
        try:
            # (The session in the headers, "headers" and "both" modes: a server sends them with
            # the first non-empty chunk it is given, or at the end of a body that has none.)
            headers = self.core.sends_headers
            for chunk in result:
                injector = self.injector
                if injector is None:  # headers mode, or replaced by an error response: as given
                    self.delivered = self.delivered or (headers and bool(chunk))
                    yield chunk
                    continue
                # One value for each of the app's, b"" when the Injector holds it all: PEP
                # 3333's block boundaries, so that the server is not left waiting on the app's
                # next chunk for bytes it could have had.
                out = injector.feed(chunk)
                self.delivered = self.delivered or (headers and bool(out))
                yield out
                # (The server came back for more: it took the chunk, snippet and all.)
                self.delivered = self.delivered or injector.done
            if self.injector is not None:
                out = self.injector.finish()
                self.delivered = self.delivered or (headers and bool(out))
                yield out
                self.delivered = self.delivered or self.injector.done
            self.delivered = self.delivered or headers
        except BaseException:
            # The app failed, or the server closed the body early: no waiting for close().
            self.cleanup()
            raise

    def lazy(self, result: Iterable[bytes]) -> Iterator[bytes]:
        """For apps that call start_response only when iterated (PEP 3333 allows it)."""
        it = iter(result)
        for chunk in it:
            if self.mode == "held":
                yield from self.rewrite(itertools.chain([chunk], it))
                return
            if self.mode == "sent":  # it began its page with ``write()``: the rest follows
                yield from self._stream(itertools.chain([chunk], it))
                return
            yield chunk
        if self.mode == "held":  # empty body
            yield from self.rewrite([])
        elif self.mode == "sent":
            yield from self._stream(())


class BOSHPrebindMiddleware:
    """Prebind an XMPP session for authenticated users' HTML pages (WSGI).

    ``get_user(environ)`` finds the user (default: ``REMOTE_USER``).
    """

    def __init__(
        self,
        app: WSGIApp,
        service_url: str | None = None,
        credentials: Callable[[Any], Any] | None = None,
        *,
        get_user: Callable[[dict[str, Any]], Any] = environ_user,
        get_nonce: Callable[[dict[str, Any]], str | None] = environ_nonce,
        config: MiddlewareConfig | None = None,
        core: PrebindCore | None = None,
        **settings: Any,
    ) -> None:
        self.app = app
        if core is None:
            if config is None:
                # engine settings (mechanisms=, wait=, transport= ...) are accepted here too
                config = MiddlewareConfig.from_mapping(
                    settings, service_url=service_url or "", credentials=credentials
                )
            core = PrebindCore(config)
        self.core = core
        self.config = core.config
        self.get_user = get_user
        self.get_nonce = get_nonce
        self._endpoint_path = self.config.endpoint_path  # (None when there is no endpoint)
        self._exclude, self._exclude_final = exclusions(self.config.exclude_paths)
        self._navigation_only = self.config.navigation_only

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        # Every request passes here: the cheapest checks first (path and method, then the
        # user, then the request headers: dict lookups), and ``credentials()`` only for a
        # navigation (to start the prebind next to the view) or once the response turns out to
        # be a page that will carry a session. A request that says it is no navigation
        # (``not_a_page``: fetch/XHR, htmx, a JSON client) goes to the app with the server's own
        # ``start_response``: nothing to inspect, and no orphan session for HTML a script fetched.
        path = environ.get("PATH_INFO", "")
        if path == self._endpoint_path:  # (None when there is no endpoint)
            return self._endpoint(environ, start_response)
        # core.wants_path, inlined (every request runs this)
        exclude = self._exclude
        if environ.get("REQUEST_METHOD", "GET") != "GET" or (
            exclude
            and path.startswith(exclude)
            and (self._exclude_final or excluded(path, exclude))
        ):
            return self.app(environ, start_response)
        get_user = self.get_user
        user = environ.get("REMOTE_USER") or None if get_user is environ_user else get_user(environ)
        # (REMOTE_USER, a non-empty str, is a user: no call needed for it)
        if user is None or (not (type(user) is str and user) and not is_authenticated(user)):
            return self.app(environ, start_response)
        kind = environ_kind(environ)
        if kind != NAVIGATION and self._navigation_only:
            kind = NOT_A_PAGE
        if kind == NOT_A_PAGE:
            return self.app(environ, start_response)
        credentials = pending = None
        core = self.core
        if kind == NAVIGATION:  # start next to the view
            credentials = core.credentials_sync(user)
            if credentials is None:
                return self.app(environ, start_response)
            pending = core.start_sync(credentials)
            if pending is not None:
                drop_validators(environ)  # (answered in full: see there)
        exchange = _Exchange(self, environ, start_response, credentials, pending, user)
        try:
            result = self.app(environ, exchange.start_response)
        except BaseException:
            exchange.cleanup()  # (a session its ``write()`` calls claimed, too)
            raise
        if exchange.mode == "pass":
            return result
        if exchange.mode == "undecided":
            return _ExchangeBody(exchange.lazy(result), result, exchange)
        if exchange.mode == "sent":  # it wrote its page's start with ``write()``: the rest
            return _ExchangeBody(exchange._stream(result), result, exchange)
        try:
            return exchange.rewrite(result)
        except BaseException:
            # (a ``get_nonce`` that failed, a start the server refused): the server never got
            # the app's iterable, so closing it (PEP 3333; Django's request_finished) is ours
            exchange.cleanup()
            close = None if exchange.result_closed else getattr(result, "close", None)
            if close is not None:
                close()
            raise

    def _endpoint(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET"), ("Content-Length", "0")])
            return [b""]
        status, headers, body = self.core.endpoint_sync(
            self.get_user(environ),
            environ.get("HTTP_SEC_FETCH_SITE"),
            environ.get("HTTP_SEC_FETCH_DEST"),
        )
        reason = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}
        start_response(f"{status} {reason.get(status, '')}".strip(), headers)
        return [body]
