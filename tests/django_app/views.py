from __future__ import annotations

import asyncio
import datetime
import io
import time
from collections.abc import AsyncIterator, Iterator

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model, login, logout
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseNotModified,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import render
from django.views.decorators.gzip import gzip_page
from django.views.decorators.http import condition

from bosh_middleware import no_prebind
from support.browser import script_tags

try:  # Django >= 5.0
    from django.contrib.auth import alogin as _alogin
    from django.contrib.auth import alogout as _alogout
except ImportError:  # Django 4.2
    _alogin, _alogout = sync_to_async(login), sync_to_async(logout)

#: Set by the browser tests: where the Strophe bundle and the BOSH endpoint are.
BROWSER = {"static": "", "service": ""}
#: time.monotonic() at which the slow view started, per call.
SLOW_STARTED: list[float] = []

HEAD = "<!doctype html>\n<html><head><meta charset='utf-8'><title>İstanbul</title></HEAD>"
BODY = "<body><p>Hello İ {name}</p><p>{pad}</p></body></html>\n"


def page_text(request: HttpRequest) -> str:
    return HEAD + BODY.format(name=getattr(request.user, "username", ""), pad="x" * 300)


PAGE_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"
#: What a browser revalidates a copy of ``/conditional/`` with.
VALIDATORS = [{"If-None-Match": '"page-v1"'}, {"If-Modified-Since": PAGE_MODIFIED}]


def page(request: HttpRequest) -> HttpResponse:
    content = page_text(request).encode()
    response = HttpResponse(content)
    response["Content-Length"] = str(len(content))  # as a cache or a server would have it
    response["Expires"] = "Thu, 01 Jan 2099 00:00:00 GMT"
    response["ETag"] = '"page-v1"'
    response["Last-Modified"] = PAGE_MODIFIED
    return response


async def apage(request: HttpRequest) -> HttpResponse:
    await asyncio.sleep(0)
    user = await request.auser() if hasattr(request, "auser") else None
    return HttpResponse(HEAD + BODY.format(name=getattr(user, "username", ""), pad=""))


def slow(request: HttpRequest) -> HttpResponse:
    SLOW_STARTED.append(time.monotonic())
    time.sleep(0.05)
    return HttpResponse(HEAD + BODY.format(name="slow", pad=""))


async def aslow(request: HttpRequest) -> HttpResponse:
    SLOW_STARTED.append(time.monotonic())
    await asyncio.sleep(0.05)
    return HttpResponse(HEAD + BODY.format(name="slow", pad=""))


CHUNKS = [
    b"<!doctype html><html><he",
    b"ad><title>s</title></he",
    b"ad><body>",
    b"streamed",
    b"</bo",
    b"dy></html>",
]


#: An XHTML page (browsers read it with their XML parser) whose head has a script element
#: that closes itself: HTML's rules would read the rest of the page as that script's text.
XHTML = (
    b'<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">'
    b'<head><title>x</title><script src="/static/a.js"/></head><body><p>x</p></body></html>'
)


def xhtml(request: HttpRequest) -> HttpResponse:
    return HttpResponse(XHTML, content_type="application/xhtml+xml; charset=utf-8")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def chunks() -> Iterator[bytes]:
        yield from CHUNKS

    return StreamingHttpResponse(chunks(), content_type="text/html; charset=utf-8")


def failing_stream(request: HttpRequest) -> StreamingHttpResponse:
    """A streamed page whose body fails before its first byte (a template or database error
    at the top of the stream), or, with ``?after=1``, after it."""
    after = request.GET.get("after") == "1"

    def chunks() -> Iterator[bytes]:
        if after:
            yield CHUNKS[0]
        raise RuntimeError("the page failed")

    return StreamingHttpResponse(chunks(), content_type="text/html; charset=utf-8")


def astream(request: HttpRequest) -> StreamingHttpResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in CHUNKS:
            await asyncio.sleep(0)
            yield chunk

    return StreamingHttpResponse(chunks(), content_type="text/html; charset=utf-8")


def file(request: HttpRequest) -> FileResponse:
    return FileResponse(io.BytesIO(b"".join(CHUNKS)), content_type="text/html; charset=utf-8")


def download(request: HttpRequest) -> FileResponse:
    return FileResponse(io.BytesIO(b"".join(CHUNKS)), as_attachment=True, filename="page.html")


def json_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


def fragment(request: HttpRequest) -> HttpResponse:
    return HttpResponse("<div id='fragment'>htmx</div>")


@condition(
    etag_func=lambda request: "page-v1",
    last_modified_func=lambda request: datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
)
def conditional(request: HttpRequest) -> HttpResponse:
    """``page``, answering its own conditional GETs (304 for its ETag or date)."""
    return HttpResponse(page_text(request))


def not_modified(request: HttpRequest) -> HttpResponse:
    return HttpResponseNotModified()


@gzip_page
def gzipped(request: HttpRequest) -> HttpResponse:
    return HttpResponse(HEAD + BODY.format(name="gzip", pad="z" * 500))


def browser(request: HttpRequest) -> HttpResponse:
    context = {"service": BROWSER["service"], "scripts": script_tags(BROWSER["static"])}
    return render(request, "browser.html", context)


# --- pages that end inside a comment: no place for a script that runs ----------------------
CUT_OFF = b"<!doctype html><html><body><p>x</p><!-- never closed"


def cut_off(request: HttpRequest) -> HttpResponse:
    return HttpResponse(CUT_OFF)


def cut_off_stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([CUT_OFF[:20], CUT_OFF[20:]]))


def cut_off_file(request: HttpRequest) -> FileResponse:
    return FileResponse(io.BytesIO(CUT_OFF), content_type="text/html; charset=utf-8")


# --- views that say their page carries no session ------------------------------------------
def quiet(request: HttpRequest) -> HttpResponse:
    no_prebind(request)
    return HttpResponse(HEAD + BODY.format(name="no session", pad=""))


async def aquiet(request: HttpRequest) -> HttpResponse:
    no_prebind(request)  # (an ASGIRequest: its META, not its scope)
    return HttpResponse(HEAD + BODY.format(name="no session", pad=""))


# --- views that log the user out, or someone else in, then answer a page ------------------
BACKEND = "django.contrib.auth.backends.ModelBackend"


def bye(request: HttpRequest) -> HttpResponse:
    logout(request)
    return HttpResponse(HEAD + BODY.format(name="logged out", pad=""))


async def abye(request: HttpRequest) -> HttpResponse:
    await _alogout(request)
    return HttpResponse(HEAD + BODY.format(name="logged out", pad=""))


def switch(request: HttpRequest) -> HttpResponse:
    """Logs ``?to=`` in (as an impersonation or a "log in as" link would)."""
    login(request, get_user_model().objects.get(username=request.GET["to"]), BACKEND)
    return page(request)


async def aswitch(request: HttpRequest) -> HttpResponse:
    user = await get_user_model().objects.aget(username=request.GET["to"])
    await _alogin(request, user, BACKEND)
    return HttpResponse(HEAD + BODY.format(name=user.get_username(), pad=""))
