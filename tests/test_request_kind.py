"""Is a request a browser navigation? ``accepts_html`` and ``not_a_page`` (core.py), table-driven,
and the same table through each adapter's translation of the request headers.

A request whose headers say it is no navigation (fetch/XHR, htmx, a JSON client, a subresource)
must get no session: nothing would ever attach to it, and it would be an orphan at the XMPP
server. A request that says nothing either way (curl, old browsers) is not judged here: its
response is looked at instead. No XMPP server is needed: the adapter checks count the calls of
the ``credentials`` callable, which every prebind needs first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from bosh_middleware import asgi, wsgi
from bosh_middleware import core as core_module
from bosh_middleware.config import MiddlewareConfig
from bosh_middleware.core import (
    KIND_MEMO_SIZE,
    KIND_MEMO_VALUE,
    NAVIGATION,
    UNDECIDED,
    PrebindCore,
    accepts_html,
    environ_kind,
    not_a_page,
    request_kind,
    request_kind_of,
)
from bosh_middleware.core import NOT_A_PAGE as KIND_NOT_A_PAGE
from support.asgi_recorder import ASGIRecorder, User, html_app, wsgi_environ
from support.bosh_check import CountingCredentials

#: Nothing listens there; no test here gets as far as a prebind.
NOWHERE = "http://127.0.0.1:9/http-bind"

# Accept of a navigation (address bar, link, form) in current browsers.
CHROME = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,"
    "*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
FIREFOX_OLD = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
)
SAFARI = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
# Accept of requests made by scripts and for subresources.
CHROME_IMAGE = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
CHROME_STYLE = "text/css,*/*;q=0.1"
JQUERY_HTML = "text/html, */*; q=0.01"  # $.ajax({dataType: "html"}), .load()
JQUERY_JSON = "application/json, text/javascript, */*; q=0.01"


# ------------------------------------------------------------------------------------------
# accepts_html
# ------------------------------------------------------------------------------------------

ACCEPTS_HTML: dict[str, tuple[str, bool | None]] = {
    # browser navigations
    "chrome-navigation": (CHROME, True),
    "firefox-navigation": (FIREFOX, True),
    "firefox-old-navigation": (FIREFOX_OLD, True),
    "safari-navigation": (SAFARI, True),
    # anything goes
    "fetch-default": ("*/*", True),
    "sloppy-star": ("*", True),
    "chrome-image": (CHROME_IMAGE, True),  # via */*: Sec-Fetch-Dest tells it apart
    "chrome-style": (CHROME_STYLE, True),
    "jquery-html": (JQUERY_HTML, True),
    "jquery-json": (JQUERY_JSON, True),  # */*;q=0.01: X-Requested-With tells it apart
    # no HTML
    "json": ("application/json", False),
    "json-and-text": ("application/json, text/plain;q=0.5", False),
    "xml": ("application/xml", False),
    "html-refused-rest-welcome": ("text/html;q=0, */*", False),  # RFC 9110: most specific wins
    "html-refused-weighted-rest": ("*/*;q=0.8, text/html;q=0", False),
    "html-refused-zeros": ("text/html;q=0.000, */*", False),
    "html-refused-after-other-param": ("text/html;level=1;q=0", False),
    "anything-refused": ("*/*;q=0", False),
    "star-refused": ("*;q=0", False),
    "text-star-refused": ("text/*;q=0, */*", False),
    "xhtml-refused": ("application/xhtml+xml;q=0", False),
    # weights
    "text-star-half": ("text/*;q=0.5", True),
    "html-beats-text-star": ("text/*;q=0, text/html", True),
    "html-beats-anything": ("*/*;q=0, text/html;q=0.1", True),
    "html-low-weight": ("application/json, text/html;q=0.1", True),
    "html-named-twice": ("text/html;q=0, text/html;q=0.5", True),
    "html-with-level-no-q": ("text/html;level=1", True),
    # malformed weights count as 1: they must not turn a page into a refusal
    "q-abc": ("text/html;q=abc", True),
    "q-nan": ("text/html;q=nan", True),
    "q-empty": ("text/html;q=", True),
    "q-abc-anything": ("*/*;q=abc", True),
    "q-nan-anything": ("*/*;q=NaN", True),
    "q-abc-json": ("application/json;q=abc", False),
    "q-negative": ("text/html;q=-1", True),
    "q-inf": ("text/html;q=inf, application/json", True),
    "q-above-one-anything": ("*/*;q=2", True),
    # XHTML
    "xhtml": ("application/xhtml+xml", True),
    "xhtml-despite-html-refused": ("text/html;q=0, application/xhtml+xml", True),
    # case and spacing
    "upper-case": ("TEXT/HTML", True),
    "mixed-case-refusal": ("Text/HTML ; Q=0 , */*", False),
    "mixed-case-xhtml": ("Application/XHTML+XML", True),
    "spaces": ("  text/html  ;  q=0.9  ", True),
    # says nothing
    "empty": ("", None),
    "blank": ("   ", None),
    "only-commas": (",", None),
    "only-commas-and-spaces": (" , ,, ", None),
    "only-parameters": (";q=0", None),
}


@pytest.mark.parametrize("case", list(ACCEPTS_HTML))
def test_accepts_html(case: str) -> None:
    accept, expected = ACCEPTS_HTML[case]
    assert accepts_html(accept) is expected


# ------------------------------------------------------------------------------------------
# not_a_page: one table, asked of the core directly and through every adapter
# ------------------------------------------------------------------------------------------

NAV_CHROME = {"Accept": CHROME, "Sec-Fetch-Dest": "document"}

#: request headers (as a client writes them) -> not a page?
NOT_A_PAGE: dict[str, tuple[dict[str, str], bool]] = {
    # navigations
    "chrome-navigation": (NAV_CHROME, False),
    "firefox-navigation": ({"Accept": FIREFOX, "Sec-Fetch-Dest": "document"}, False),
    "safari-navigation": ({"Accept": SAFARI, "Sec-Fetch-Dest": "document"}, False),
    "safari-without-fetch-metadata": ({"Accept": SAFARI}, False),
    "iframe": ({"Accept": CHROME, "Sec-Fetch-Dest": "iframe"}, False),
    "frame": ({"Accept": CHROME, "Sec-Fetch-Dest": "frame"}, False),
    "dest-upper-case": ({"Accept": CHROME, "Sec-Fetch-Dest": "Document"}, False),
    "dest-padded": ({"Accept": CHROME, "Sec-Fetch-Dest": " iframe "}, False),
    # says nothing: judged by the response
    "no-headers": ({}, False),
    "curl": ({"Accept": "*/*"}, False),
    "only-document": ({"Sec-Fetch-Dest": "document"}, False),
    "accept-empty": ({"Accept": ""}, False),
    "accept-only-commas": ({"Accept": ", ,"}, False),
    "accept-malformed-q": ({"Accept": "text/html;q=abc"}, False),
    "accept-nan-q": ({"Accept": "*/*;q=nan"}, False),
    "accept-xhtml": ({"Accept": "application/xhtml+xml"}, False),
    "dest-empty-value": ({"Accept": "*/*", "Sec-Fetch-Dest": ""}, False),
    "dest-blank-value": ({"Accept": "*/*", "Sec-Fetch-Dest": "  "}, False),
    "hx-request-empty-value": ({**NAV_CHROME, "HX-Request": ""}, False),
    "x-requested-with-empty-value": ({**NAV_CHROME, "X-Requested-With": ""}, False),
    "sec-purpose-empty-value": ({**NAV_CHROME, "Sec-Purpose": ""}, False),
    # fetch / XHR / subresources
    "fetch-default": ({"Accept": "*/*", "Sec-Fetch-Dest": "empty"}, True),
    "fetch-html": ({"Accept": "text/html", "Sec-Fetch-Dest": "empty"}, True),
    "dest-upper-case-empty": ({"Accept": "*/*", "Sec-Fetch-Dest": "EMPTY"}, True),
    "script": ({"Accept": "*/*", "Sec-Fetch-Dest": "script"}, True),
    "image": ({"Accept": CHROME_IMAGE, "Sec-Fetch-Dest": "image"}, True),
    "style": ({"Accept": CHROME_STYLE, "Sec-Fetch-Dest": "style"}, True),
    "x-requested-with": ({"Accept": JQUERY_HTML, "X-Requested-With": "XMLHttpRequest"}, True),
    "x-requested-with-navigation-headers": (
        {**NAV_CHROME, "X-Requested-With": "XMLHttpRequest"},
        True,
    ),
    "htmx": ({"Accept": "*/*", "HX-Request": "true"}, True),
    "htmx-navigation-headers": ({**NAV_CHROME, "HX-Request": "true"}, True),
    # prefetch / prerender (speculation rules, <link rel=prefetch>): a page nobody may open
    "prefetch": ({**NAV_CHROME, "Sec-Purpose": "prefetch"}, True),
    "prerender": ({**NAV_CHROME, "Sec-Purpose": "prefetch;prerender"}, True),
    "prefetch-legacy-purpose": ({"Accept": CHROME, "Purpose": "prefetch"}, True),
    "prefetch-nothing-else": ({"Sec-Purpose": "prefetch"}, True),
    # Accept without HTML
    "json-client": ({"Accept": "application/json"}, True),
    "html-refused": ({"Accept": "text/html;q=0, */*"}, True),
    "anything-refused": ({"Accept": "*/*;q=0"}, True),
    "json-with-document-dest": ({"Accept": "application/json", "Sec-Fetch-Dest": "document"}, True),
}


def lower_getter(headers: dict[str, str]) -> Callable[[str], str | None]:
    """What ``request_kind`` reads: a lookup by lower-case name."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return lowered.get


def cgi_environ(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` as a WSGI server (and Django's ``request.META``) has them."""
    return {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}


@pytest.mark.parametrize("case", list(NOT_A_PAGE))
def test_not_a_page(case: str) -> None:
    headers, expected = NOT_A_PAGE[case]
    assert not_a_page(lower_getter(headers)) is expected


def test_not_a_page_asks_only_for_the_request_headers_it_declares() -> None:
    """``REQUEST_HEADERS`` are all there is to read: the ASGI and WSGI adapters read just these."""
    from bosh_middleware.core import REQUEST_HEADERS

    asked: set[str] = set()

    def get(name: str) -> str | None:
        asked.add(name)
        return None

    not_a_page(get)
    PrebindCore.looks_like_page(get)
    request_kind(get)
    assert asked <= set(REQUEST_HEADERS)


@pytest.mark.parametrize("case", list(NOT_A_PAGE))
def test_request_kind_is_not_a_page_then_looks_like_page(case: str) -> None:
    """The one-pass answer the ASGI and WSGI adapters use agrees with the two questions."""
    headers, expected = NOT_A_PAGE[case]
    get = lower_getter(headers)
    kind = request_kind(get)
    if expected:
        assert kind == KIND_NOT_A_PAGE
    else:
        assert kind == (NAVIGATION if PrebindCore.looks_like_page(get) else UNDECIDED)


@pytest.fixture(scope="module")
def core() -> PrebindCore:
    return PrebindCore(MiddlewareConfig(service_url=NOWHERE, credentials=lambda user: None))


@pytest.mark.parametrize("case", list(NOT_A_PAGE))
def test_wants_is_the_method_path_check_and_not_a_page(core: PrebindCore, case: str) -> None:
    """What the Django and Flask adapters ask (with their case-insensitive header lookups)."""
    headers, expected = NOT_A_PAGE[case]
    get = lower_getter(headers)
    assert core.wants("GET", "/", get) is not expected
    assert core.wants("POST", "/", get) is False


@pytest.mark.parametrize(
    ("prefixes", "path", "wanted"),
    [
        (("/admin",), "/admin", False),
        (("/admin",), "/admin/users", False),
        (("/admin",), "/administrators", True),
        (("/admin", "/static/"), "/static/app.js", False),
        (("/static/",), "/static", True),
        (("/",), "/anything", False),
        ((), "/admin", True),
    ],
)
def test_wants_path_excludes_whole_segments(
    prefixes: tuple[str, ...], path: str, wanted: bool
) -> None:
    """What the Django and Flask adapters ask; the ASGI and WSGI ones inline the same test."""
    core = PrebindCore(
        MiddlewareConfig(service_url=NOWHERE, credentials=lambda user: None, exclude_paths=prefixes)
    )
    assert core.wants_path("GET", path) is wanted


# --- through the adapters: a pass-through app, a credentials callable that counts ----------
#
# ``credentials`` answers None (no XMPP account), so nothing is ever prebound. A request judged
# no page must not even ask for credentials, and reaches the app with the server's own ``send``
# / ``start_response``. One that is not judged asks once: early for a navigation, or once its
# response turned out to be a page.

PAGE = b"<!doctype html><html><head><title>t</title></head><body>p</body></html>"


def raw_scope(headers: list[tuple[str, str]], lower: bool = False) -> dict[str, Any]:
    """An HTTP scope with the header names as the client wrote them, or lower-cased as ASGI
    servers send them (``lower``: the adapter's fast path; mixed case takes the slow one)."""
    if lower:
        headers = [(k.lower(), v) for k, v in headers]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "user": User("alice"),
    }


async def run_asgi(
    headers: list[tuple[str, str]], lower: bool = False, **settings: Any
) -> tuple[bytes, bool, int]:
    """(body, did the app get the server's own send?, credentials calls)"""
    counting = CountingCredentials(lambda user: None)
    seen: list[Any] = []
    inner = html_app(PAGE)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(send)
        await inner(scope, receive, send)

    mw = asgi.BOSHPrebindMiddleware(app, service_url=NOWHERE, credentials=counting, **settings)
    rec = ASGIRecorder()
    send = rec.send
    try:
        await asyncio.wait_for(mw(raw_scope(headers, lower), rec.receive, send), 10)
    finally:
        await mw.core.aclose()
    return rec.body, seen == [send] and seen[0] is send, len(counting.calls)


def run_wsgi(headers: dict[str, str], **settings: Any) -> tuple[bytes, bool, int]:
    """(body, did the app get the server's own start_response?, credentials calls)"""
    counting = CountingCredentials(lambda user: None)
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(start_response)
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [PAGE]

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    mw = wsgi.BOSHPrebindMiddleware(app, service_url=NOWHERE, credentials=counting, **settings)
    try:
        result = mw(wsgi_environ("/", headers=headers, user="alice"), start_response)
        body = b"".join(result)
        getattr(result, "close", lambda: None)()
    finally:
        mw.core.close()
    return body, seen == [start_response] and seen[0] is start_response, len(counting.calls)


@pytest.mark.parametrize("lower", [False, True], ids=["as-sent", "lower-case"])
@pytest.mark.parametrize("case", list(NOT_A_PAGE))
async def test_asgi_adapter_agrees(case: str, lower: bool) -> None:
    headers, expected = NOT_A_PAGE[case]
    body, unwrapped, asked = await run_asgi(list(headers.items()), lower)
    assert body == PAGE
    assert asked == (0 if expected else 1)
    if expected:  # (a navigation without credentials is not wrapped either)
        assert unwrapped


@pytest.mark.parametrize("case", list(NOT_A_PAGE))
def test_wsgi_adapter_agrees(case: str) -> None:
    headers, expected = NOT_A_PAGE[case]
    body, unwrapped, asked = run_wsgi(headers)
    assert body == PAGE
    assert asked == (0 if expected else 1)
    if expected:
        assert unwrapped


def _navigation(headers: dict[str, str]) -> bool:
    return request_kind(lower_getter(headers)) == NAVIGATION


@pytest.mark.parametrize("case", list(NOT_A_PAGE))
def test_navigation_only_makes_a_request_that_says_nothing_no_page(case: str) -> None:
    """``navigation_only``: only what says it loads a page is one (what Django and Flask ask,
    of ``request.META`` and ``request.environ``)."""
    headers, _ = NOT_A_PAGE[case]
    config = MiddlewareConfig(
        service_url=NOWHERE, credentials=lambda user: None, navigation_only=True
    )
    kind = PrebindCore(config).kind_of(cgi_environ(headers))
    assert kind == (NAVIGATION if _navigation(headers) else KIND_NOT_A_PAGE)


@pytest.mark.parametrize("lower", [False, True], ids=["as-sent", "lower-case"])
@pytest.mark.parametrize("case", list(NOT_A_PAGE))
async def test_asgi_navigation_only(case: str, lower: bool) -> None:
    """With ``navigation_only``, a request that is no navigation reaches the app with the
    server's own ``send`` and asks for no credentials: nothing is looked at or prebound."""
    headers, _ = NOT_A_PAGE[case]
    body, unwrapped, asked = await run_asgi(list(headers.items()), lower, navigation_only=True)
    assert body == PAGE
    assert asked == (1 if _navigation(headers) else 0)
    if not _navigation(headers):
        assert unwrapped


@pytest.mark.parametrize("case", list(NOT_A_PAGE))
def test_wsgi_navigation_only(case: str) -> None:
    headers, _ = NOT_A_PAGE[case]
    body, unwrapped, asked = run_wsgi(headers, navigation_only=True)
    assert body == PAGE
    assert asked == (1 if _navigation(headers) else 0)
    if not _navigation(headers):
        assert unwrapped


@pytest.mark.parametrize("shape", ["list", "tuple", "iterator", "mixed-case"])
@pytest.mark.parametrize("case", list(NOT_A_PAGE))
def test_asgi_request_kind_fast_paths_agree(case: str, shape: str) -> None:
    """The ASGI adapter's shortcuts (a C scan for ``sec-fetch-dest: empty``, the C-built dict)
    answer as ``request_kind`` over a case-insensitive lookup, whatever shape the headers are."""
    headers, _ = NOT_A_PAGE[case]
    pairs = [
        ((k if shape == "mixed-case" else k.lower()).encode("latin-1"), v.encode("latin-1"))
        for k, v in [("Host", "x"), *headers.items()]
    ]
    raw: Any = {"tuple": tuple(pairs), "iterator": iter(pairs)}.get(shape, pairs)
    assert asgi._request_kind(raw) == request_kind(lower_getter(headers))


def test_asgi_fetch_shortcut_wins_over_anything_else() -> None:
    """``Sec-Fetch-Dest: empty`` on any line makes it no page, as the joined value does."""
    raw = [(b"sec-fetch-dest", b"document"), (b"sec-fetch-dest", b"empty"), (b"accept", b"*/*")]
    assert asgi._request_kind(raw) == KIND_NOT_A_PAGE
    assert request_kind(asgi._Headers(raw).get) == KIND_NOT_A_PAGE


async def test_asgi_mixed_case_names_are_read_too() -> None:
    """A server that keeps the client's case (ASGI only recommends lower case), with some names
    lower-cased: every name is still found (the fast path must not take this request)."""
    body, unwrapped, asked = await run_asgi([("host", "x"), ("X-Requested-With", "XMLHttpRequest")])
    assert body == PAGE and unwrapped and asked == 0
    body, unwrapped, asked = await run_asgi([("accept", "*/*"), ("Sec-Fetch-Dest", "empty")])
    assert body == PAGE and unwrapped and asked == 0


def test_asgi_fast_header_dict_only_when_nothing_is_lost() -> None:
    """``_as_dict``: the C-built dict is used only for lower-case names that do not repeat."""
    assert asgi._as_dict([(b"accept", b"a"), (b"host", b"h")]) == {b"accept": b"a", b"host": b"h"}
    assert asgi._as_dict([(b"Accept", b"a")]) is None
    assert asgi._as_dict([(b"accept", b"a"), (b"accept", b"b")]) is None
    assert asgi._as_dict([(bytearray(b"accept"), b"a")]) is None
    headers_iter = iter([(b"accept", b"a")])
    assert asgi._as_dict(headers_iter) is None  # no len(): slow path, and not used up
    assert list(headers_iter) == [(b"accept", b"a")]
    assert asgi._Headers(iter([(b"Accept", b"a"), (b"accept", b"b")])).get("accept") == "a, b"
    headers = asgi._Headers([(b"Content-Type", b"text/html"), (b"vary", b"a"), (b"Vary", b"b")])
    assert headers.get("content-type") == "text/html"
    assert headers.get("VARY") == "a, b"


async def test_asgi_joins_repeated_header_lines() -> None:
    """Two ``Accept`` lines are one list (RFC 9110, 5.3): HTML named on the second counts."""
    body, unwrapped, asked = await run_asgi(
        [("accept", "application/json"), ("accept", "text/html")]
    )
    assert body == PAGE and asked == 1
    body, unwrapped, asked = await run_asgi(
        [("accept", "application/json"), ("accept", "image/png")]
    )
    assert body == PAGE and unwrapped and asked == 0


# ------------------------------------------------------------------------------------------
# the remembered answers (core.remember_kind)
# ------------------------------------------------------------------------------------------

MEMOS = (core_module._KINDS, asgi._KINDS, core_module._ENVIRON_KINDS)


@pytest.fixture
def fresh_memos() -> Any:
    for memo in MEMOS:
        memo.clear()
    yield
    for memo in MEMOS:
        memo.clear()


def kinds_three_ways(headers: dict[str, str]) -> list[str]:
    """The core's, the ASGI adapter's and the environ's (WSGI, Django's META, Flask) answer for
    ``headers``."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    return [
        request_kind(lower_getter(headers)),
        asgi._request_kind(raw),
        environ_kind(cgi_environ(headers)),
    ]


def test_remembered_kinds_are_the_worked_out_ones(fresh_memos: None) -> None:
    """The whole table twice: worked out (and remembered), then remembered; every answer is
    what ``request_kind_of`` works out for the same values, which is never remembered."""
    for round_ in ("worked out", "remembered"):
        for case, (headers, _) in NOT_A_PAGE.items():
            get = lower_getter(headers)
            xhr = (
                get("hx-request") or get("x-requested-with") or get("sec-purpose") or get("purpose")
            )
            expected = request_kind_of(xhr, get("sec-fetch-dest"), get("accept"))
            assert kinds_three_ways(headers) == [expected] * 3, (round_, case)
    # every one remembered (the adapters settle ``Sec-Fetch-Dest: empty`` before they ask)
    assert len(core_module._KINDS) > max(len(asgi._KINDS), len(core_module._ENVIRON_KINDS))
    assert asgi._KINDS and core_module._ENVIRON_KINDS


def test_kind_memos_are_bounded(fresh_memos: None) -> None:
    """Made-up values (a client can send any) are worked out right, and cost no memory beyond
    the bound: a full memo starts over, and a long value is not kept at all."""
    for i in range(2 * KIND_MEMO_SIZE + 7):
        assert kinds_three_ways({"Accept": f"application/x-{i}"}) == [KIND_NOT_A_PAGE] * 3
        assert all(len(memo) <= KIND_MEMO_SIZE for memo in MEMOS)
    for memo in MEMOS:
        memo.clear()
    long = {"Accept": "text/html," + "x" * KIND_MEMO_VALUE}
    assert kinds_three_ways(long) == [NAVIGATION] * 3
    assert kinds_three_ways({"Accept": "*/*"}) == [UNDECIDED] * 3
    assert [len(memo) for memo in MEMOS] == [1, 1, 1]  # only the short one


def test_unhashable_values_are_worked_out_and_not_kept(fresh_memos: None) -> None:
    """A bytearray value (ASGI allows bytes-like) or a WSGI value that is no str: answered as
    before, and not remembered."""
    assert asgi._request_kind([(b"accept", bytearray(b"application/json"))]) == KIND_NOT_A_PAGE
    assert asgi._request_kind([(b"accept", bytearray(CHROME.encode()))]) == NAVIGATION
    assert environ_kind({"HTTP_ACCEPT": ["application/json"]}) == UNDECIDED  # (no str)
    listed: dict[str, Any] = {"x-requested-with": ["XMLHttpRequest"]}  # (a getter's list)
    assert request_kind(listed.get) == KIND_NOT_A_PAGE
    assert not asgi._KINDS and not core_module._ENVIRON_KINDS and not core_module._KINDS
