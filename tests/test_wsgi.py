"""The generic WSGI middleware around plain WSGI apps (no framework), against the real Prosody,
including the PEP 3333 corners: lazy start_response, write(), close(), exc_info."""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import lxml.etree
import pytest

from bosh_middleware import no_prebind
from bosh_middleware.core import SyncPending
from bosh_middleware.credentials import StaticCredentials
from bosh_middleware.inject import inject
from bosh_middleware.wsgi import BOSHPrebindMiddleware
from support.asgi_recorder import NAV, call_wsgi, wsgi_environ
from support.bosh_check import (
    FETCH_METADATA,
    REQUEST_KINDS,
    SEGMENT_CASES,
    SEGMENT_EXCLUDES,
    CountingCredentials,
    PrebindSpy,
    bare,
    end_sessions,
    is_dead,
    is_live,
    page_vars,
)
from support.xmpp_servers import XMPPServer

PAGE = b"<!doctype html><html><head><title>Hi</title></head><body><p>page</p></body></html>"
HTML = [("Content-Type", "text/html; charset=utf-8")]
NOT_NAV = {"accept": "*/*"}

MW = tuple[BOSHPrebindMiddleware, PrebindSpy]


@pytest.fixture(scope="module")
def alice(prosody: XMPPServer) -> tuple[str, str]:
    return prosody.new_user("alice")


@pytest.fixture
def make_mw(prosody: XMPPServer, alice: tuple[str, str]) -> Iterator[Callable[..., MW]]:
    created: list[MW] = []

    def factory(app: Any, *, spy_delay: float = 0.0, **settings: Any) -> MW:
        settings.setdefault("service_url", prosody.service_url)
        settings.setdefault("credentials", StaticCredentials({"alice": alice}))
        mw = BOSHPrebindMiddleware(app, **settings)
        spy = PrebindSpy.on(mw.core, sync=True, delay=spy_delay)
        created.append((mw, spy))
        return mw, spy

    yield factory
    for mw, spy in created:
        assert spy.wait_idle(), "prebind/terminate still running at teardown"
        end_sessions(prosody.service_url, spy.sessions)
        mw.core.close()


def get(
    mw: Any,
    path: str = "/",
    *,
    user: str | None = "alice",
    headers: Any = None,
    method: str = "GET",
    **extra: Any,
) -> Any:
    return call_wsgi(
        mw,
        wsgi_environ(
            path, method=method, user=user, headers=NAV if headers is None else headers, **extra
        ),
    )


def fixed_app(status: str, headers: list[tuple[str, str]], body: list[bytes]) -> Any:
    """Eager app; ``app.result`` is the very iterable it returned."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response(status, headers)
        app.result = list(body)  # type: ignore[attr-defined]
        return app.result  # type: ignore[attr-defined]

    return app


def html_app(
    body: bytes = PAGE,
    *,
    content_type: str = "text/html; charset=utf-8",
    extra: list[tuple[str, str]] | None = None,
    delay: float = 0.0,
    content_length: bool = True,
) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if delay:
            time.sleep(delay)
        headers = [("Content-Type", content_type), *(extra or [])]
        if content_length:
            headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [body]

    return app


class ClosingIterable:
    """An app iterable with ``close()`` (like a file wrapper): PEP 3333 says it must be called."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed += 1


class ClosingList(list):  # type: ignore[type-arg]
    closed = 0

    def close(self) -> None:
        self.closed += 1


class StreamedBody:
    """A streamed page's iterable: counts ``close()``, may call ``start_response`` only once
    iterated (lazy, as PEP 3333 allows), and may fail after its chunks (an error mid-stream)."""

    def __init__(
        self,
        chunks: list[bytes],
        *,
        start: Callable[[], object] | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.chunks, self.start, self.error = chunks, start, error
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.start is not None:
            self.start()
        yield from self.chunks
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.closed += 1


def streamed_app(chunks: list[bytes], *, lazy: bool, error: BaseException | None = None) -> Any:
    """A page streamed from a ``StreamedBody``; ``app.body`` is the iterable it returned."""

    def app(environ: dict[str, Any], start_response: Any) -> StreamedBody:
        def start() -> None:
            start_response("200 OK", HTML)

        if not lazy:
            start()
        app.body = StreamedBody(chunks, start=start if lazy else None, error=error)  # type: ignore[attr-defined]
        return app.body  # type: ignore[attr-defined,no-any-return]

    return app


# ------------------------------------------------------------------------------------------
# pages that get a session
# ------------------------------------------------------------------------------------------


def test_page_gets_a_live_session_of_its_user(
    make_mw: Any, prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    mw, spy = make_mw(html_app())
    r = get(mw)
    (session,) = spy.sessions
    assert r.code == 200
    assert r.body == inject(PAGE, mw.core.snippet(session))
    assert page_vars(r.body) == {
        "BOSH_JID": session.jid,
        "BOSH_SID": session.sid,
        "BOSH_RID": session.rid,
    }
    assert bare(session.jid) == alice[0]
    assert r.header("content-length") == str(len(r.body))
    assert r.header("cache-control") == "private, no-store"
    assert r.header("vary") == "Cookie"
    assert is_live(prosody.service_url, session)


def test_xhtml_page_gets_a_session(make_mw: Any) -> None:
    mw, spy = make_mw(html_app(content_type="application/xhtml+xml; charset=utf-8"))
    assert page_vars(get(mw).body) is not None and len(spy.sessions) == 1


def test_non_navigation_html_prebinds_only_once_the_response_is_known(make_mw: Any) -> None:
    view_done: list[float] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        time.sleep(0.05)
        view_done.append(time.monotonic())
        return html_app()(environ, start_response)  # type: ignore[no-any-return]

    mw, spy = make_mw(app)
    assert page_vars(get(mw, headers=NOT_NAV).body) is not None
    assert spy.intervals[0][0] >= view_done[0]


# ------------------------------------------------------------------------------------------
# lazily: everything else passes through untouched (the same iterable), without a prebind
# ------------------------------------------------------------------------------------------

REQUEST_CASES: dict[str, dict[str, Any]] = {
    "anonymous": {"user": None},
    "no-xmpp-account": {"user": "bob"},
    "post": {"method": "POST"},
    "head": {"method": "HEAD"},
    "htmx": {"headers": {**NAV, "hx-request": "true"}},
    "xhr": {"headers": {**NAV, "x-requested-with": "XMLHttpRequest"}},
    "fetch-dest-empty": {"headers": {**NAV, "sec-fetch-dest": "empty"}},
    "html-refused": {"headers": {"accept": "text/html;q=0, */*"}},
    "excluded-path": {"path": "/static/page.html"},
}


class _FlagUser:
    def __init__(self, username: str, ok: bool) -> None:
        self.username, self.is_authenticated = username, ok


#: what get_user returns -> logged in? (REMOTE_USER strings are read without a call)
USER_SHAPES: dict[str, tuple[Any, bool]] = {
    "name": ("alice", True),
    "empty-name": ("", False),
    "none": (None, False),
    "flag-true": (_FlagUser("alice", True), True),
    "flag-false": (_FlagUser("alice", False), False),
}


@pytest.mark.parametrize("shape", list(USER_SHAPES))
def test_who_counts_as_logged_in(make_mw: Any, alice: tuple[str, str], shape: str) -> None:
    user, logged_in = USER_SHAPES[shape]
    looked_up = CountingCredentials(StaticCredentials({"alice": alice}))
    mw, spy = make_mw(html_app(), credentials=looked_up, get_user=lambda environ: user)
    r = get(mw, user=None)
    assert spy.wait_idle()
    if logged_in:
        (session,) = spy.sessions
        assert r.body == inject(PAGE, mw.core.snippet(session))
    else:
        assert r.body == PAGE
        assert spy.calls == [] and looked_up.calls == []


def test_empty_remote_user_is_nobody(make_mw: Any) -> None:
    mw, spy = make_mw(html_app())
    r = get(mw, user="")
    assert r.body == PAGE and spy.calls == []


@pytest.mark.parametrize("case", list(REQUEST_CASES))
def test_request_that_cannot_carry_a_session_is_not_prebound(make_mw: Any, case: str) -> None:
    headers = [*HTML, ("Content-Length", str(len(PAGE)))]
    app = fixed_app("200 OK", headers, [PAGE])
    mw, spy = make_mw(app, exclude_paths="/static/")  # a plain string is one prefix
    kw = dict(REQUEST_CASES[case])
    r = get(mw, kw.pop("path", "/"), **kw)
    assert spy.calls == []
    assert r.iterable is app.result
    assert (r.status, r.headers, r.body) == ("200 OK", headers, PAGE)


@pytest.mark.parametrize("kind", list(REQUEST_KINDS))
def test_html_view_gets_a_session_only_when_navigated_to(
    make_mw: Any, alice: tuple[str, str], kind: str
) -> None:
    """A script's request for HTML gets it untouched and costs no session: nothing would attach
    to one, and it would be left on the server as an orphan."""
    headers = [*HTML, ("Content-Length", str(len(PAGE)))]
    app = fixed_app("200 OK", headers, [PAGE])
    looked_up = CountingCredentials(StaticCredentials({"alice": alice}))
    mw, spy = make_mw(app, credentials=looked_up)
    r = get(mw, headers=REQUEST_KINDS[kind])
    assert r.code == 200
    if kind == "navigation":
        (session,) = spy.sessions
        assert r.body == inject(PAGE, mw.core.snippet(session))
        assert r.header("cache-control") == "private, no-store"
        assert len(looked_up.calls) == 1
    else:
        assert (r.status, r.headers, r.body) == ("200 OK", headers, PAGE)
        assert r.iterable is app.result
        assert spy.calls == [] and looked_up.calls == []


@pytest.mark.parametrize("path", ["/bosh/prebinder", "/bosh/prebind/x", "/static", "/Static/a"])
def test_paths_that_only_look_like_the_endpoint_or_an_excluded_prefix_are_pages(
    make_mw: Any, path: str
) -> None:
    """The endpoint is one exact path and ``exclude_paths`` are prefixes: a page next to them
    is a page like any other."""
    headers = [*HTML, ("Content-Length", str(len(PAGE)))]
    mw, spy = make_mw(fixed_app("200 OK", headers, [PAGE]), exclude_paths=("/static/",))
    r = get(mw, path)
    (session,) = spy.sessions
    assert r.body == inject(PAGE, mw.core.snippet(session))


@pytest.mark.parametrize(("path", "is_excluded"), SEGMENT_CASES)
def test_an_excluded_prefix_is_whole_path_segments(
    make_mw: Any, path: str, is_excluded: bool
) -> None:
    headers = [*HTML, ("Content-Length", str(len(PAGE)))]
    app = fixed_app("200 OK", headers, [PAGE])
    mw, spy = make_mw(app, exclude_paths=SEGMENT_EXCLUDES)
    r = get(mw, path)
    if is_excluded:
        assert r.body == PAGE and spy.calls == []
    else:
        (session,) = spy.sessions
        assert r.body == inject(PAGE, mw.core.snippet(session))


@pytest.mark.parametrize("endpoint", [None, "/static/bosh"])
def test_excluded_paths_without_or_around_the_endpoint(make_mw: Any, endpoint: str | None) -> None:
    """No endpoint at all, or the endpoint inside an excluded prefix: the endpoint still
    answers, and the rest of the prefix is left alone."""
    headers = [*HTML, ("Content-Length", str(len(PAGE)))]
    app = fixed_app("200 OK", headers, [PAGE])
    mw, spy = make_mw(app, exclude_paths=("/static/",), endpoint_path=endpoint)
    excluded = get(mw, "/static/page.html")
    assert excluded.iterable is app.result and spy.calls == []
    if endpoint is not None:
        r = get(mw, endpoint)
        assert r.code == 200 and set(json.loads(r.body)) == {"jid", "sid", "rid"}
    else:
        r = get(mw, "/bosh/prebind")  # the default endpoint's path: a page now
        (session,) = spy.sessions
        assert r.body == inject(PAGE, mw.core.snippet(session))


@pytest.mark.parametrize("kind", ["fetch", "xhr", "json-client"])
def test_no_page_request_reaches_the_app_unwrapped(make_mw: Any, kind: str) -> None:
    """The fast path: the app is called with the server's own ``start_response``."""
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(start_response)
        start_response("200 OK", HTML)
        return [PAGE]

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    mw, spy = make_mw(app)
    result = mw(wsgi_environ("/", headers=REQUEST_KINDS[kind], user="alice"), start_response)
    assert result == [PAGE]
    assert seen == [start_response] and seen[0] is start_response
    assert spy.calls == []


def test_exclude_paths_as_a_string_is_one_prefix(make_mw: Any) -> None:
    mw, spy = make_mw(html_app(), exclude_paths="/static/")
    assert page_vars(get(mw, "/static/app.html").body) is None
    assert page_vars(get(mw, "/").body) is not None
    assert len(spy.calls) == 1


RESPONSE_CASES: dict[str, tuple[str, list[tuple[str, str]], list[bytes]]] = {
    "json": ("200 OK", [("Content-Type", "application/json")], [b'{"a": 1}']),
    "text-plain": ("200 OK", [("Content-Type", "text/plain")], [b"</head>"]),
    "404": ("404 Not Found", HTML, [PAGE]),
    "302": ("302 Found", [*HTML, ("Location", "/next")], []),
    "204": ("204 No Content", [], []),
    "304": ("304 Not Modified", [*HTML, ("ETag", '"x"')], []),
    "206": ("206 Partial Content", [*HTML, ("Content-Range", "bytes 0-9/100")], [PAGE[:10]]),
    "gzip": ("200 OK", [*HTML, ("Content-Encoding", "gzip")], [b"\x1f\x8b\x08\x00garbage"]),
    "no-content-type": ("200 OK", [], [PAGE]),
    # the front server sends a file in place of the (empty) body
    "x-sendfile": ("200 OK", [*HTML, ("X-Sendfile", "/srv/page.html")], []),
    "x-accel-redirect": ("200 OK", [*HTML, ("X-Accel-Redirect", "/internal/page.html")], []),
}


@pytest.mark.parametrize("case", list(RESPONSE_CASES))
def test_response_that_cannot_carry_a_session_passes_through(make_mw: Any, case: str) -> None:
    status, headers, body = RESPONSE_CASES[case]
    app = fixed_app(status, headers, body)
    mw, spy = make_mw(app)
    r = get(mw, headers=NOT_NAV)
    assert spy.calls == []
    assert r.iterable is app.result
    assert (r.status, r.headers, r.body) == (status, headers, b"".join(body))


def test_a_page_compressed_inside_the_middleware_is_reported_once(
    make_mw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    status, headers, body = RESPONSE_CASES["gzip"]
    app = fixed_app(status, headers, body)
    mw, spy = make_mw(app)
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        for _ in range(3):
            r = get(mw)  # a navigation: a prebind each, ended unused
            assert r.body == b"".join(body)
    [record] = caplog.records
    assert "Content-Encoding: gzip" in record.getMessage()
    assert spy.wait_terminated(3, timeout=5.0)


@pytest.mark.parametrize("case", ["json", "404", "302"])
def test_unused_session_is_terminated_at_once(make_mw: Any, prosody: XMPPServer, case: str) -> None:
    status, headers, body = RESPONSE_CASES[case]
    app = fixed_app(status, headers, body)
    mw, spy = make_mw(app)
    r = get(mw)  # a navigation: the prebind started next to the view
    assert r.iterable is app.result
    assert spy.wait_terminated(1, timeout=2.0)
    (session,) = spy.sessions
    assert spy.terminated == [session]
    assert is_dead(prosody.service_url, session)


def test_a_wait_cut_short_by_a_worker_exit_still_ends_the_session(
    make_mw: Any, prosody: XMPPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker told to stop (SIGTERM, Ctrl-C: SystemExit or KeyboardInterrupt raised in the
    page's thread) while the page waits for its session: the page is gone, and its session,
    claimed by that wait, is ended rather than left live at the server."""
    real = SyncPending.session

    def interrupted(self: SyncPending) -> Any:
        self._future.result(timeout=10)  # the prebind is done: there is a session to end

        def result(timeout: float | None = None) -> Any:
            del self._future.result  # (once: the termination reads the real one)
            raise SystemExit(0)

        self._future.result = result  # type: ignore[method-assign]
        return real(self)

    monkeypatch.setattr(SyncPending, "session", interrupted)
    mw, spy = make_mw(html_app())
    with pytest.raises(SystemExit):
        get(mw)
    assert spy.wait_terminated(1, timeout=5.0)
    assert is_dead(prosody.service_url, spy.sessions[0])


def opting_out(app: Any) -> Any:
    """``app``, behind a view that calls ``no_prebind`` first (a logout page, say)."""

    def view(environ: dict[str, Any], start_response: Any) -> Any:
        no_prebind(environ)
        return app(environ, start_response)

    return view


@pytest.mark.parametrize("mode", ["script", "headers"])
def test_a_page_whose_view_says_no_prebind_goes_out_untouched(
    make_mw: Any, prosody: XMPPServer, mode: str
) -> None:
    """A navigation's prebind started next to the view; the view said no: the page goes out
    as the app gave it (the very iterable, the same headers) and the session ends."""
    app = fixed_app("200 OK", HTML, [PAGE])
    mw, spy = make_mw(opting_out(app), mode=mode)
    r = get(mw)
    assert r.iterable is app.result and r.headers == HTML
    assert spy.wait_terminated(1, timeout=2.0)
    (session,) = spy.sessions
    assert spy.terminated == [session]
    assert is_dead(prosody.service_url, session)
    # the same page from a view that says nothing carries a live session
    mw, spy = make_mw(fixed_app("200 OK", HTML, [PAGE]), mode=mode)
    assert get(mw).headers != HTML and is_live(prosody.service_url, spy.sessions[0])


def test_no_prebind_on_a_request_that_did_not_say_what_it_wants_costs_nothing(
    make_mw: Any,
) -> None:
    app = fixed_app("200 OK", HTML, [PAGE])
    mw, spy = make_mw(opting_out(app))
    r = get(mw, headers=NOT_NAV)
    assert r.iterable is app.result and r.headers == HTML
    assert spy.calls == []


def test_prebind_runs_alongside_the_view(make_mw: Any) -> None:
    """Page time ~ max(view, prebind), not the sum (300 ms latency added by the spy in front of
    the real prebind, which takes ~5 ms locally)."""
    view = 0.3
    view_start: list[float] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        view_start.append(time.monotonic())
        time.sleep(view)
        return html_app()(environ, start_response)  # type: ignore[no-any-return]

    mw, spy = make_mw(app, spy_delay=0.3)
    t0 = time.monotonic()
    r = get(mw)
    total = time.monotonic() - t0
    assert page_vars(r.body) is not None
    p_start, p_end = spy.intervals[0]
    prebind = p_end - p_start
    assert p_start <= view_start[0] + 0.05
    # the sum would be >= view + prebind; allow a quarter of the shorter one for noise
    assert total < view + prebind - 0.25 * min(view, prebind), (total, prebind)


# ------------------------------------------------------------------------------------------
# injection details
# ------------------------------------------------------------------------------------------


def test_streamed_page_is_injected_on_the_fly(make_mw: Any) -> None:
    title = b"<html><head><title>" + b"t" * 60 + b"</title>"  # longer than the held tail
    chunks = [title, b"</he", b"ad><body>", b"<p>x</p></body></html>"]
    whole = b"".join(chunks)
    produced: list[int] = []

    def gen() -> Iterator[bytes]:
        for i, c in enumerate(chunks):
            produced.append(i)
            yield c

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [*HTML, ("Content-Length", str(len(whole))), ("ETag", '"v1"')])
        return gen()

    mw, spy = make_mw(app)
    got: list[tuple[int, bool]] = []
    status: list[Any] = []
    result = mw(
        wsgi_environ("/", headers=NAV, user="alice"), lambda s, h, e=None: status.append((s, h))
    )
    out = b""
    for chunk in result:
        out += chunk
        got.append((len(produced), b"BOSH_SID" in out))
    result.close()
    assert out == inject(whole, mw.core.snippet(spy.sessions[0]))
    # the snippet went out with the chunk completing "</head>", before the rest was produced
    assert got[0] == (1, False)  # the first chunk went out before the second was produced
    assert (3, True) in got
    headers = dict(status[0][1])
    assert "Content-Length" not in headers
    assert "ETag" not in headers


def test_streamed_page_yields_once_for_each_chunk_of_the_app(make_mw: Any) -> None:
    """PEP 3333's block boundaries: a value (b"" at least) for each value the app yields, even
    when the Injector holds all of a chunk, so that the server is never left waiting on the
    app's next chunk (a slow query, say) for what came before it."""
    chunks = [b"<ht", b"ml><head><title>t</title></he", b"ad><body>x</bo", b"dy></html>"]
    log: list[str] = []

    def gen() -> Iterator[bytes]:
        for c in chunks:
            log.append("app")
            yield c

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", HTML)
        return gen()

    mw, spy = make_mw(app)
    result = mw(wsgi_environ("/", headers=NAV, user="alice"), lambda s, h, e=None: None)
    out = []
    for chunk in result:
        log.append("server")
        out.append(chunk)
    result.close()
    assert log[: 2 * len(chunks)] == ["app", "server"] * len(chunks)
    assert b"".join(out) == inject(b"".join(chunks), mw.core.snippet(spy.sessions[0]))


VALIDATORS = [
    ("ETag", '"abc"'),
    ("ETag", 'W/"abc"'),
    ("Last-Modified", "Wed, 01 Jan 2025 00:00:00 GMT"),
]


@pytest.mark.parametrize("mode", ["script", "headers"])
def test_a_prebound_page_carries_no_validator(make_mw: Any, mode: str) -> None:
    """Each prebound page is new: a copy cached without a session, revalidated with these,
    would match it in a conditional GET outside the middleware (a 304: the session lost)."""
    mw, spy = make_mw(html_app(extra=VALIDATORS), mode=mode)
    r = get(mw)
    assert spy.sessions and r.header("cache-control") == "private, no-store"
    assert r.header_list("etag") == [] and r.header_list("last-modified") == []


@pytest.mark.parametrize("mode", ["script", "headers"])
def test_a_rewritten_page_offers_no_byte_ranges(make_mw: Any, mode: str) -> None:
    """A page served from a file offers ranges of the file (werkzeug's ``send_file``, whitenoise):
    not of the page with the session in it. A resumed download would splice them."""
    mw, spy = make_mw(html_app(extra=[("Accept-Ranges", "bytes")]), mode=mode)
    r = get(mw)
    assert spy.sessions
    assert r.header_list("accept-ranges") == (["bytes"] if mode == "headers" else ["none"])


def conditional_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """A page that answers its own conditional GETs, as ``@condition`` or Django's
    ConditionalGetMiddleware listed below ours do."""
    seen = environ.get("HTTP_IF_NONE_MATCH"), environ.get("HTTP_IF_MODIFIED_SINCE")
    if seen[0] == '"v1"' or seen[1] == VALIDATORS[2][1]:
        start_response("304 Not Modified", [("ETag", '"v1"')])
        return []
    start_response("200 OK", [*HTML, ("ETag", '"v1"'), VALIDATORS[2]])
    return [PAGE]


@pytest.mark.parametrize(
    "validator", [{"If-None-Match": '"v1"'}, {"If-Modified-Since": VALIDATORS[2][1]}]
)
def test_a_revalidated_copy_without_a_session_is_answered_in_full(
    make_mw: Any, prosody: XMPPServer, validator: dict[str, str]
) -> None:
    """What a browser revalidates is a copy served without a session (the XMPP server was
    down, the user not yet logged in): a 304 would show it again, sessionless, and lose the
    session made for it. A navigation being prebound reaches the app unconditional."""
    mw, spy = make_mw(conditional_app)
    r = get(mw, headers={**NAV, **validator})
    (session,) = spy.sessions
    assert r.code == 200 and page_vars(r.body)["BOSH_SID"] == session.sid
    assert is_live(prosody.service_url, session)
    # Left conditional where no session is made: nobody logged in, or no navigation
    for user, headers in ((None, NAV), ("alice", NOT_NAV)):
        r = get(mw, user=user, headers={**headers, **validator})
        assert r.code == 304 and r.body == b""
    assert len(spy.sessions) == 1


@pytest.mark.parametrize(
    ("vary", "expected"),
    [
        ([], "Cookie"),
        (["Accept-Encoding"], "Accept-Encoding, Cookie"),
        (["Accept-Encoding", "Origin"], "Accept-Encoding, Origin, Cookie"),
        (["*"], "*"),
    ],
)
def test_vary_cookie_is_merged(make_mw: Any, vary: list[str], expected: str) -> None:
    extra = [("Vary", v) for v in vary] + [
        ("Cache-Control", "public, max-age=600"),
        ("Expires", "Thu, 01 Dec 2044 16:00:00 GMT"),
    ]
    mw, _ = make_mw(html_app(extra=extra))
    r = get(mw)
    assert r.header_list("vary") == [expected]
    assert r.header_list("cache-control") == ["private, no-store"]
    assert r.header_list("expires") == []


def test_csp_nonce_from_environ(make_mw: Any) -> None:
    import lxml.html

    mw, _ = make_mw(html_app())
    r = get(mw, csp_nonce="n0nce")
    scripts = lxml.html.document_fromstring(r.body).iter("script")
    assert [s.get("nonce") for s in scripts] == ["n0nce"]


def test_variable_names_are_configurable(make_mw: Any) -> None:
    mw, spy = make_mw(html_app(), variables=("XMPP_JID", "XMPP_SID", "XMPP_RID"))
    r = get(mw)
    s = spy.sessions[0]
    assert page_vars(r.body) == {"XMPP_JID": s.jid, "XMPP_SID": s.sid, "XMPP_RID": s.rid}


def test_headers_mode(make_mw: Any, prosody: XMPPServer, alice: tuple[str, str]) -> None:
    headers = [*HTML, ("Content-Length", str(len(PAGE))), ("ETag", '"e"')]
    app = fixed_app("200 OK", headers, [PAGE])
    mw, spy = make_mw(app, mode="headers")
    r = get(mw)
    (session,) = spy.sessions
    assert r.iterable is app.result and r.body == PAGE
    assert r.header("content-length") == str(len(PAGE)) and r.header("etag") is None
    assert r.header("x-bosh-jid") == session.jid and bare(session.jid) == alice[0]
    assert r.header("x-bosh-sid") == session.sid
    assert r.header("x-bosh-rid") == str(session.rid)
    assert r.header("cache-control") == "private, no-store"
    assert r.header("vary") == "Cookie"
    assert is_live(prosody.service_url, session)


@pytest.mark.parametrize("name", ["pct%41x", "caf\u00e9"], ids=["percent", "non-ascii"])
def test_headers_mode_jid_reads_back_as_percent_encoded(
    make_mw: Any, prosody: XMPPServer, name: str
) -> None:
    """A JID with a character that has no byte in a header goes out percent-encoded: then one
    with a "%" of its own (legal in a localpart: "user%host@gateway") must be too, or no
    client can read both back ("pct%41x" read as "pctAx", "caf%C3%A9" taken for "caf\u00e9")."""
    from urllib.parse import unquote

    jid = prosody.register(f"{name}{secrets.token_hex(3)}", "pw-not-secret-3")
    app = fixed_app("200 OK", [*HTML, ("Content-Length", str(len(PAGE)))], [PAGE])
    mw, spy = make_mw(
        app, mode="headers", credentials=StaticCredentials({"alice": (jid, "pw-not-secret-3")})
    )
    r = get(mw)
    (session,) = spy.sessions
    assert bare(session.jid) == jid
    value = r.header("x-bosh-jid")
    assert value.isascii() and unquote(value, errors="strict") == session.jid


def test_both_mode(make_mw: Any) -> None:
    mw, spy = make_mw(html_app(), mode="both")
    r = get(mw)
    s = spy.sessions[0]
    assert page_vars(r.body) == {"BOSH_JID": s.jid, "BOSH_SID": s.sid, "BOSH_RID": s.rid}
    assert (r.header("x-bosh-sid"), r.header("x-bosh-rid")) == (s.sid, str(s.rid))


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_both_mode_page_that_cannot_carry_the_snippet_keeps_its_session(
    make_mw: Any, prosody: XMPPServer, streamed: bool
) -> None:
    """A page that ends inside a comment gets no snippet, but in "both" mode its headers took
    the session to the client, as in headers mode: it must stay live, not be ended."""
    page = b"<html><p>hi</p><!-- a comment never closed"
    chunks = [page[:10], page[10:]]

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/html")])
        return ClosingIterable(chunks) if streamed else [page]

    mw, spy = make_mw(app, mode="both")
    r = get(mw)
    assert spy.wait_idle()
    (session,) = spy.sessions
    assert b"BOSH_" not in r.body and r.header("x-bosh-sid") == session.sid
    assert spy.terminated == []
    assert is_live(prosody.service_url, session)


# ------------------------------------------------------------------------------------------
# JSON endpoint
# ------------------------------------------------------------------------------------------


def test_endpoint_returns_a_live_session(
    make_mw: Any, prosody: XMPPServer, alice: tuple[str, str]
) -> None:
    import json

    mw, spy = make_mw(html_app())
    xhr = {"accept": "application/json", "sec-fetch-dest": "empty", "x-requested-with": "XHR"}
    r = get(mw, "/bosh/prebind", headers=xhr)  # converse.js fetches it: not a page, all the same
    assert r.code == 200
    data = json.loads(r.body)
    assert set(data) == {"jid", "sid", "rid"} and bare(data["jid"]) == alice[0]
    assert r.header("cache-control") == "private, no-store"
    assert r.header("vary") == "Cookie"
    (session,) = spy.sessions
    assert (data["sid"], data["rid"]) == (session.sid, session.rid)
    assert is_live(prosody.service_url, session)


def test_endpoint_path_is_configurable(make_mw: Any) -> None:
    app = fixed_app("404 Not Found", [("Content-Type", "text/plain")], [b"app page"])
    mw, _ = make_mw(app, endpoint_path="/xmpp/attach")
    assert get(mw, "/xmpp/attach").code == 200
    old = get(mw, "/bosh/prebind")
    assert (old.code, old.body) == (404, b"app page")


def test_endpoint_401_for_anonymous(make_mw: Any) -> None:
    mw, spy = make_mw(html_app())
    assert get(mw, "/bosh/prebind", user=None).code == 401
    assert spy.calls == []


@pytest.mark.parametrize(("site", "dest", "refusal"), FETCH_METADATA)
def test_endpoint_answers_only_the_apps_own_scripts(
    make_mw: Any, prosody: XMPPServer, site: str | None, dest: str | None, refusal: str | None
) -> None:
    """Another site's ``<img src=/bosh/prebind>`` (or no-cors fetch) carries the user's cookies
    where they are not SameSite, and an ``<img>`` or ``<script>`` in this site's own user
    content (an avatar URL) those of whoever views it: none of them could read a session, and
    nobody would end it. A script's ``fetch()`` or XHR is answered, the URL opened in a tab
    too, and so are browsers that send no fetch metadata."""
    import json

    mw, spy = make_mw(html_app())
    headers = {"sec-fetch-site": site, "sec-fetch-dest": dest}
    r = get(mw, "/bosh/prebind", headers={k: v for k, v in headers.items() if v is not None})
    if refusal is not None:
        assert (r.code, json.loads(r.body)) == (403, {"error": refusal})
        assert spy.calls == []
    else:
        assert r.code == 200
        (session,) = spy.sessions
        assert json.loads(r.body)["sid"] == session.sid
        assert is_live(prosody.service_url, session)


def test_endpoint_405_for_post(make_mw: Any) -> None:
    mw, spy = make_mw(html_app())
    r = get(mw, "/bosh/prebind", method="POST")
    assert r.code == 405 and r.header("allow") == "GET"
    assert spy.calls == []


# ------------------------------------------------------------------------------------------
# PEP 3333 corners
# ------------------------------------------------------------------------------------------


def lazy_app(
    status: str, headers: list[tuple[str, str]], chunks: list[bytes], log: list[str]
) -> Any:
    """start_response is only called once the iterable is iterated (allowed by PEP 3333)."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        def gen() -> Iterator[bytes]:
            try:
                start_response(status, headers)
                for c in chunks:
                    log.append("yield")
                    yield c
            finally:
                log.append("closed")

        return gen()

    return app


def test_lazy_start_response_page_is_injected(make_mw: Any) -> None:
    log: list[str] = []
    chunks = [b"<html><head>", b"</head><body></body></html>"]
    mw, spy = make_mw(lazy_app("200 OK", HTML, chunks, log))
    r = get(mw)
    assert r.body == inject(
        b"<html><head></head><body></body></html>", mw.core.snippet(spy.sessions[0])
    )
    assert log[-1] == "closed"


def test_lazy_start_response_passthrough_streams(make_mw: Any) -> None:
    log: list[str] = []
    chunks = [b"a", b"b", b"c"]
    mw, spy = make_mw(lazy_app("200 OK", [("Content-Type", "application/json")], chunks, log))
    result = mw(wsgi_environ("/", headers=NOT_NAV, user="alice"), lambda s, h, e=None: None)
    seen = []
    for chunk in result:
        seen.append((chunk, log.count("yield")))
    result.close()
    assert seen == [(b"a", 1), (b"b", 2), (b"c", 3)]  # one by one, not buffered
    assert log[-1] == "closed" and spy.calls == []


def test_write_callable_page_is_injected(make_mw: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [*HTML, ("Content-Length", "38")])
        write(b"<html><head>")
        write(b"</head><body>")
        return [b"</body></html>"]

    mw, spy = make_mw(app)
    r = get(mw)
    expected = inject(b"<html><head></head><body></body></html>", mw.core.snippet(spy.sessions[0]))
    assert r.body == expected
    # streamed as written: the app's length is dropped, none can be known before the end
    assert r.header("content-length") is None
    assert r.header("cache-control") == "private, no-store"


def written_page_server(
    mw: Any, app_log: list[str], environ: dict[str, Any]
) -> tuple[list[bytes], list[tuple[str, str]]]:
    """A server whose ``write()`` sends at once: each block is logged next to the app's own
    steps, so that the order shows whether a write reached the client before the app went on."""
    sent: list[bytes] = []
    headers: list[tuple[str, str]] = []

    def start_response(status: str, hdrs: list[tuple[str, str]], exc_info: Any = None) -> Any:
        headers[:] = hdrs

        def write(data: bytes) -> None:
            app_log.append(f"sent {len(data)}")
            sent.append(data)

        return write

    result = mw(environ, start_response)
    try:
        for chunk in result:
            if chunk:
                app_log.append(f"sent {len(chunk)}")
                sent.append(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return sent, headers


@pytest.mark.parametrize("mode", ["script", "headers"])
def test_write_callable_page_goes_out_as_written(
    make_mw: Any, prosody: XMPPServer, mode: str
) -> None:
    """An app that writes its page (PEP 3333's ``write()``) has each block sent on before it
    writes the next, as a returned iterable's would be, not held whole until it returns: a
    large page was held in memory several times over, and nothing of it reached the client
    meanwhile."""
    steps: list[str] = []
    block = b"<p>" + b"x" * 60_000 + b"</p>"

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [*HTML, ("Content-Length", "999999")])
        write(b"<html><head></head><body>")
        for i in range(3):
            steps.append(f"write {i}")
            write(block)
        steps.append("return")
        return [b"</body></html>"]

    mw, spy = make_mw(app, mode=mode)
    sent, headers = written_page_server(mw, steps, wsgi_environ("/", user="alice", headers=NAV))
    session = spy.sessions[0]
    page = b"<html><head></head><body>" + block * 3 + b"</body></html>"
    if mode == "script":
        assert b"".join(sent) == inject(page, mw.core.snippet(session))
    else:
        assert b"".join(sent) == page
        assert dict(headers)["X-BOSH-SID"] == session.sid
    assert steps[1:] == [  # the head (with the snippet), then each block before the next
        "write 0",
        f"sent {len(block)}",
        "write 1",
        f"sent {len(block)}",
        "write 2",
        f"sent {len(block)}",
        "return",
        "sent 14",
    ]
    assert steps[0].startswith("sent ")
    names = {k.lower() for k, _ in headers}
    assert "content-length" not in names if mode == "script" else "content-length" in names
    assert dict(headers)["Cache-Control"] == "private, no-store"
    assert spy.terminated == [] and is_live(prosody.service_url, session)


def test_write_callable_page_fails_open_as_written(make_mw: Any) -> None:
    """No XMPP server: the written page goes out as the app writes it, without a session."""
    steps: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [*HTML, ("Content-Length", "37")])
        write(b"<html><head></head><body>")
        steps.append("return")
        return [b"</body></html>"]

    mw, spy = make_mw(app, service_url="http://127.0.0.1:9/http-bind")  # refused
    sent, headers = written_page_server(mw, steps, wsgi_environ("/", user="alice", headers=NAV))
    assert b"".join(sent) == b"<html><head></head><body></body></html>"
    assert steps == ["sent 25", "return", "sent 14"]
    assert dict(headers)["Content-Length"] == "37"
    assert spy.sessions == []


def test_write_callable_app_that_fails_ends_its_session(make_mw: Any) -> None:
    """An app that fails after writing the start of its page, before the snippet went out
    (no ``</head>`` yet): the session claimed at the first write is ended, not left live."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", HTML)
        write(b"<html><head><title>x</title>")
        raise RuntimeError("the view failed")

    mw, spy = make_mw(app)
    with pytest.raises(RuntimeError, match="the view failed"):
        written_page_server(mw, [], wsgi_environ("/", user="alice", headers=NAV))
    assert spy.wait_terminated(1, timeout=5.0)
    assert spy.terminated == spy.sessions and len(spy.sessions) == 1


def test_lazy_app_that_writes_its_page(make_mw: Any) -> None:
    """``start_response`` and ``write()`` only once iterated (both allowed by PEP 3333): the
    rest of the body goes through the same Injector."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        write = start_response("200 OK", HTML)
        write(b"<html><head>")
        yield b"</head><body>"
        yield b"</body></html>"

    mw, spy = make_mw(app)
    r = get(mw)
    expected = inject(b"<html><head></head><body></body></html>", mw.core.snippet(spy.sessions[0]))
    assert r.body == expected


XHTML = (
    b'<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">'
    b'<head><title>x</title><script src="/static/a.js"/></head><body><p>x</p></body></html>'
)


def test_xhtml_page_with_a_script_that_closes_itself(make_mw: Any, prosody: XMPPServer) -> None:
    """Read by browsers as XML: ``<script src=.../>`` is a whole element, and the session goes
    before the ``</head>`` after it (HTML's rules found the page ending inside its text)."""
    mw, spy = make_mw(html_app(XHTML, content_type="application/xhtml+xml"))
    r = get(mw)
    head = lxml.etree.fromstring(r.body).find("{http://www.w3.org/1999/xhtml}head")
    assert head is not None and "BOSH_SID" in (head[-1].text or "")
    assert is_live(prosody.service_url, spy.sessions[0])


def test_write_callable_passthrough(make_mw: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "application/json")])
        write(b'{"a":')
        return [b"1}"]

    mw, spy = make_mw(app)
    assert get(mw, headers=NOT_NAV).body == b'{"a":1}'
    assert spy.calls == []


@pytest.mark.parametrize("case", ["passthrough", "streamed-page", "whole-page", "fail-open"])
def test_close_is_forwarded_exactly_once(make_mw: Any, case: str) -> None:
    body = [b"<html><head>", b"</head></html>"]
    iterable: Any = ClosingList(body) if case == "whole-page" else ClosingIterable(body)
    ctype = "application/json" if case == "passthrough" else "text/html"

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", ctype)])
        return iterable

    settings: dict[str, Any] = {}
    if case == "fail-open":
        settings["service_url"] = "http://127.0.0.1:9/http-bind"  # nothing listens: refused
    mw, _spy = make_mw(app, **settings)
    r = get(mw)
    assert iterable.closed == 1
    assert (b"BOSH_SID" in r.body) == (case in ("streamed-page", "whole-page"))


@pytest.mark.parametrize("body", ["whole-page", "streamed-page"])
@pytest.mark.parametrize("failure", ["get_nonce", "start_response"])
def test_close_is_called_once_when_the_rewrite_fails(
    make_mw: Any, prosody: XMPPServer, body: str, failure: str
) -> None:
    """The rewrite fails before the server has the body (a ``get_nonce`` that raises, a
    start the server refuses, which it sees late since the start is held for the rewrite):
    the app's iterable must still be closed, once (PEP 3333; Django's ``request_finished``),
    and the session made for the page ended."""
    chunks = [b"<html><head>", b"</head></html>"]
    iterable: Any = ClosingList(chunks) if body == "whole-page" else ClosingIterable(chunks)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/html")])
        return iterable

    def refuse(*args: Any) -> Any:
        raise RuntimeError("refused")

    settings: dict[str, Any] = {"get_nonce": refuse} if failure == "get_nonce" else {}
    mw, spy = make_mw(app, **settings)
    environ = wsgi_environ("/", headers=NAV, user="alice")
    start = refuse if failure == "start_response" else (lambda *a: None)
    with pytest.raises(RuntimeError, match="refused"):
        mw(environ, start)
    assert iterable.closed == 1
    assert spy.wait_idle()
    (session,) = spy.sessions
    assert spy.terminated == [session]
    assert is_dead(prosody.service_url, session)


def test_exc_info_replaces_a_held_page(make_mw: Any, prosody: XMPPServer) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", HTML)
        try:
            raise ValueError("render failed")
        except ValueError:
            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
        return [b"error"]

    mw, spy = make_mw(app)
    r = get(mw)
    assert (r.code, r.body, r.start_calls) == (500, b"error", 1)
    assert r.header("cache-control") is None
    assert spy.wait_terminated(1, timeout=2.0)
    assert is_dead(prosody.service_url, spy.sessions[0])


def test_exc_info_after_headers_sent_reraises(make_mw: Any) -> None:
    """An error mid-stream after the (rewritten) headers went out: PEP 3333 says re-raise."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", HTML)

        def gen() -> Iterator[bytes]:
            yield b"<html><head></head>"
            try:
                raise ValueError("late failure")
            except ValueError:
                start_response("500 Internal Server Error", [], sys.exc_info())
            yield b"never"

        return gen()

    mw, _spy = make_mw(app)
    with pytest.raises(ValueError, match="late failure"):
        get(mw)


@pytest.mark.parametrize(("mode", "first"), [("script", b"</he"), ("headers", b"")])
def test_exc_info_mid_stream_before_anything_was_sent_replaces_the_page(
    make_mw: Any, prosody: XMPPServer, mode: str, first: bytes
) -> None:
    """The app's iterable fails after a first chunk the server has not sent (the Injector
    holds all of it, or it is empty): PEP 3333 lets it replace the response. The error goes out
    as the app gave it (no bytes of the abandoned page, no snippet), and the session it would
    have carried is ended."""
    error_headers = [("Content-Type", "text/plain"), ("Content-Length", "5")]

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", HTML)

        def gen() -> Iterator[bytes]:
            yield first
            try:
                raise ValueError("template failed")
            except ValueError:
                start_response("500 Internal Server Error", error_headers, sys.exc_info())
            yield b"error"

        return gen()

    mw, spy = make_mw(app, mode=mode)
    r = get(mw)
    assert (r.status, r.headers, r.body) == ("500 Internal Server Error", error_headers, b"error")
    assert spy.wait_terminated(1, timeout=2.0)
    (session,) = spy.sessions
    assert spy.terminated == [session]
    assert is_dead(prosody.service_url, session)


#: The start of a page, long enough that some of it goes out before its </head>.
HEAD_START = b"<!doctype html><html><head><title>" + b"t" * 100


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("end", ["app-fails", "client-gone"])
def test_session_of_a_page_cut_short_before_the_snippet_is_terminated(
    make_mw: Any, prosody: XMPPServer, lazy: bool, end: str
) -> None:
    """The page stops after part of it went out but before the snippet did: the app fails
    mid-stream, or the server closes the iterable early (the client went away). Nobody got the
    session: it is ended, not left live at the server until it times out."""
    rest = b"</title></head><body>x</body></html>"
    if end == "app-fails":
        app = streamed_app([HEAD_START], lazy=lazy, error=RuntimeError("db error mid-stream"))
    else:
        app = streamed_app([HEAD_START, rest], lazy=lazy)
    mw, spy = make_mw(app)
    result = mw(wsgi_environ("/", headers=NAV, user="alice"), lambda s, h, e=None: None)
    it = iter(result)
    first = next(it)
    assert first and b"BOSH_SID" not in first
    if end == "app-fails":
        with pytest.raises(RuntimeError, match="db error"):
            next(it)
    result.close()
    assert app.body.closed == 1
    assert spy.wait_terminated(1, timeout=2.0)
    (session,) = spy.sessions
    assert spy.terminated == [session]
    assert is_dead(prosody.service_url, session)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_session_that_went_out_is_kept_when_the_page_fails_later(
    make_mw: Any, prosody: XMPPServer, lazy: bool
) -> None:
    """The other side of ending undelivered sessions: once the server took the snippet, the
    browser may be attaching to it, whatever happens to the rest of the page."""
    app = streamed_app([PAGE[:60]], lazy=lazy, error=RuntimeError("late failure"))
    mw, spy = make_mw(app)
    result = mw(wsgi_environ("/", headers=NAV, user="alice"), lambda s, h, e=None: None)
    it = iter(result)
    assert b"BOSH_SID" in next(it)
    with pytest.raises(RuntimeError, match="late failure"):
        next(it)
    result.close()
    assert app.body.closed == 1
    assert spy.wait_idle()
    (session,) = spy.sessions
    assert spy.terminated == []
    assert is_live(prosody.service_url, session)


@pytest.mark.parametrize("mode", ["headers", "both"])
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("fails", ["before-the-first-byte", "after-the-first-byte"])
def test_session_in_the_headers_of_a_page_that_fails_before_they_went_out_is_terminated(
    make_mw: Any, prosody: XMPPServer, mode: str, lazy: bool, fails: str
) -> None:
    """A server sends the headers with the first non-empty chunk (PEP 3333): a streamed page
    whose app fails before one gets an error response from the server instead, and the
    session in the headers it never sent reached no one. It is ended, not left live at the
    XMPP server until it times out. Once a chunk went out, the headers did too: it stays."""
    chunks = [b""] if fails == "before-the-first-byte" else [b"", HEAD_START]
    app = streamed_app(chunks, lazy=lazy, error=RuntimeError("db error"))
    mw, spy = make_mw(app, mode=mode)
    started: list[tuple[str, list[tuple[str, str]]]] = []
    result = mw(
        wsgi_environ("/", headers=NAV, user="alice"), lambda s, h, e=None: started.append((s, h))
    )
    sent = []
    with pytest.raises(RuntimeError, match="db error"):
        sent.extend(chunk for chunk in result if chunk)  # as a server: headers with the first
    result.close()
    assert app.body.closed == 1
    assert spy.wait_idle()
    (session,) = spy.sessions
    assert ("X-BOSH-SID", session.sid) in started[0][1]
    if fails == "before-the-first-byte":
        assert sent == []
        assert spy.terminated == [session]
        assert is_dead(prosody.service_url, session)
    else:
        assert sent
        assert spy.terminated == []
        assert is_live(prosody.service_url, session)
