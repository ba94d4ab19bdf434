"""The Django middleware: translates requests and responses for ``PrebindCore``, nothing more.

Sync and async capable (one instance is one or the other, after its ``get_response``). The
prebind starts before the view for browser navigations and is awaited after it, so the XMPP
login overlaps the view; a response that cannot carry the session ends it unused, and so does a
view that logs the user out or someone else in (the user is read again after the view). Whoever
a view logs in gets their session in the page it renders, prebound after the view.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.http.response import HttpResponseBase
from django.utils.functional import SimpleLazyObject, empty
from django.utils.module_loading import import_string

from ..config import MiddlewareConfig
from ..core import (
    NAVIGATION,
    NOT_A_PAGE,
    PrebindCore,
    drop_validators,
    is_authenticated,
    is_injectable,
    page_injector,
)
from ..inject import Injector, injected_stream, sent_with_a_byte
from ..optout import opted_out
from ..session import PrebindSession, check_bool
from ._compat import csp_nonce

__all__ = ["BOSHPrebindMiddleware", "MissingSetting", "load_config"]

log = logging.getLogger("bosh_middleware")

#: Keys without a default, as the README and the system check's example spell them.
REQUIRED = ("SERVICE_URL", "CREDENTIALS")
#: Our entry in ``MIDDLEWARE``, as messages and the system checks name it.
_SELF = "bosh_middleware.django.BOSHPrebindMiddleware"
#: Where the lazy ``request.user`` that ``request.auser()`` stands for is made.
_AUTH_MIDDLEWARE = "django.contrib.auth.middleware"


class MissingSetting(ImproperlyConfigured):
    """A required key of ``BOSH_PREBIND`` is absent: the system check shows an example then,
    which would only distract from any other mistake (its message says what is wrong)."""


def load_config(values: Any = None, *, async_mode: bool = False) -> MiddlewareConfig | None:
    """``settings.BOSH_PREBIND`` as a ``MiddlewareConfig``; ``None`` when absent or disabled.

    Its keys count in any case, as ``from_mapping`` reads them: the two this adapter reads
    itself, ``ENABLED`` and ``CREDENTIALS`` (a dotted path), too, or a lower-case
    ``"credentials"`` would reach ``from_mapping`` as a string. Every problem is raised as
    ``ImproperlyConfigured``, naming the key as it was written.
    """
    values = getattr(settings, "BOSH_PREBIND", None) if values is None else values
    if values is None:
        return None
    values = _checked_keys(values)
    problems: list[str] = []  # (a wrong ENABLED is said with the rest: all of them at once)

    def improperly(problem: object) -> ImproperlyConfigured:
        return ImproperlyConfigured("BOSH_PREBIND: " + "; ".join([*problems, str(problem)]))

    if (enabled := _key(values, "ENABLED")) is not None:
        try:
            if not check_bool(enabled, values.pop(enabled)):
                return None
        except TypeError as exc:  # "False" from the environment would be True
            problems.append(str(exc))
    # (None counts as absent: what os.environ.get() gives for a variable nobody set)
    found = {n: k for n in REQUIRED if (k := _key(values, n)) and values[k] is not None}
    if missing := [name for name in REQUIRED if name not in found]:
        if problems:
            raise improperly(f"it has no {' or '.join(missing)}.")
        raise MissingSetting(f"BOSH_PREBIND has no {' or '.join(missing)}.")
    key = found["CREDENTIALS"]
    credentials = values[key]
    try:
        if isinstance(credentials, str):
            credentials = import_string(credentials)
    except ImportError as exc:
        raise improperly(f"{key} {credentials!r}: {exc}") from exc
    if async_mode and callable(credentials) and not _is_async(credentials):
        credentials = sync_to_async(credentials)  # may use the ORM: not on the event loop
    # Back under the key as written, so that a wrong type's message names it that way.
    values[key] = credentials
    try:
        config = MiddlewareConfig.from_mapping(values, adapter_settings=("enabled",))
    except (TypeError, ValueError) as exc:
        raise improperly(exc) from exc
    if problems:
        raise ImproperlyConfigured("BOSH_PREBIND: " + "; ".join(problems))
    return config


def _checked_keys(values: Any) -> dict[str, Any]:
    """``values`` as a dict of its own, once its keys are strings that differ in more than
    case: with both ``TIMEOUT`` and ``timeout``, which counted would be up to dict order."""
    if not isinstance(values, Mapping):
        raise ImproperlyConfigured(f"BOSH_PREBIND must be a dict, not {type(values).__name__}")
    seen: dict[str, str] = {}
    for key in values:
        if not isinstance(key, str):
            raise ImproperlyConfigured(f"BOSH_PREBIND: keys must be strings, not {key!r}")
        if (first := seen.setdefault(key.lower(), key)) != key:
            raise ImproperlyConfigured(f"BOSH_PREBIND has both {first} and {key}")
    return dict(values)


def _key(values: Mapping[str, Any], name: str) -> str | None:
    """The key of ``values`` that is ``name`` in any case, as written; ``None`` if none is."""
    return next((key for key in values if key.lower() == name.lower()), None)


@functools.cache
def _warn_unset() -> None:
    """Once per process: every handler (each test Client, a server's ASGI and WSGI one) builds
    its own middleware, and the system checks that would say so do not run under gunicorn."""
    log.warning(
        "BOSH_PREBIND is not set: %s is listed in MIDDLEWARE but does nothing. Set BOSH_PREBIND "
        '(or BOSH_PREBIND = {"ENABLED": False} to turn it off on purpose).',
        _SELF,
    )


def _no_page(core: PrebindCore, request: HttpRequest, response: HttpResponseBase) -> bool:
    """Whether ``response`` cannot carry the session: no injectable page, or a page its view
    said ``no_prebind`` for. A compressed page is reported (once), as no other page is."""
    if opted_out(request.META):
        return True
    if is_injectable(request.method or "", response.status_code, response.headers.get):
        return False
    core.check_compressed(response.status_code, response.headers.get)
    return True


def _may_be_page(response: HttpResponseBase) -> bool:
    """The least an injectable page is, settled with one header read: a 200 whose
    Content-Type mentions html. A request that did not say what it wants reads the user only
    for such a response (the session is touched, and the answer gets ``Vary: Cookie``), and
    the rest of ``is_injectable`` only for a logged-in user's: through ``headers.get``, which
    raises and catches a ``KeyError`` for each absent name, it asks nine, mostly absent."""
    if response.status_code != 200:
        return False
    ctype = response.headers.get("Content-Type")
    return ctype is not None and "html" in ctype.lower()


def _fetch_metadata(request: HttpRequest) -> tuple[str | None, str | None]:
    """The endpoint's request's ``Sec-Fetch-Site`` and ``Sec-Fetch-Dest`` (see
    ``PrebindCore.endpoint_refused``)."""
    meta = request.META
    return meta.get("HTTP_SEC_FETCH_SITE"), meta.get("HTTP_SEC_FETCH_DEST")


def _drop_validators(request: HttpRequest) -> None:
    """``core.drop_validators`` (see there), for the view, ``@condition`` and a
    ConditionalGetMiddleware listed below ours, which read ``META``; ``request.headers``, if
    a middleware above built it already, is built anew from it when next read."""
    if drop_validators(request.META):
        request.__dict__.pop("headers", None)  # (a cached_property)


def _is_async(fn: Any) -> bool:
    return iscoroutinefunction(fn) or iscoroutinefunction(type(fn).__call__)


def _user(request: HttpRequest) -> Any:
    return getattr(request, "user", None)


async def _auser(request: HttpRequest) -> Any:
    """``request.user``, as ``_user`` has it, without touching the database on the event loop.

    Only the lazy object AuthenticationMiddleware sets, still unevaluated, goes through
    ``request.auser()`` (Django >= 5.0), any other unevaluated one through a thread: once a
    middleware or the view has set ``request.user`` (RemoteUserMiddleware, token auth,
    impersonation, ``alogout()``), it is the user, while ``auser()`` keeps answering whom
    AuthenticationMiddleware loads. (A token-auth middleware often sets a lazy object of its
    own, as Django's does: that one's user is whom its own loader finds.)
    """
    user = _user(request)
    if not (isinstance(user, SimpleLazyObject) and user._wrapped is empty):
        return user
    auser = getattr(request, "auser", None)
    # (the loader AuthenticationMiddleware gives its lazy object is defined in its module;
    # read from __dict__, as a missing attribute of a lazy object would load it, here)
    setup = user.__dict__.get("_setupfunc")
    if auser is not None and getattr(setup, "__module__", None) == _AUTH_MIDDLEWARE:
        return await auser()

    def loaded() -> Any:
        is_authenticated(user)  # evaluate the lazy object here, off the event loop
        return user

    return await sync_to_async(loaded)()


class BOSHPrebindMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        config = load_config(async_mode=self.async_mode)
        if config is None:
            # Disabled on purpose (ENABLED False) is quiet; a missing setting is not, as it
            # would otherwise leave every page without a session and no word of why.
            if getattr(settings, "BOSH_PREBIND", None) is None:
                _warn_unset()
                raise MiddlewareNotUsed("BOSH_PREBIND is not set")
            raise MiddlewareNotUsed("BOSH_PREBIND is disabled (ENABLED is False)")
        self.core = PrebindCore(config)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        core, path = self.core, request.path_info
        if core.is_endpoint(path):
            if request.method != "GET":
                return HttpResponseNotAllowed(["GET"])
            site, dest = _fetch_metadata(request)
            return _endpoint_response(*core.endpoint_sync(_user(request), site, dest))
        # The request headers read from META, where Django keeps them as the server sent them:
        # ``request.headers`` would be built (every META key parsed) for four values.
        wants = core.wants_path(request.method or "", path)
        kind = core.kind_of(request.META) if wants else NOT_A_PAGE
        if kind == NOT_A_PAGE:
            return self.get_response(request)
        # Reading the user touches the session (Vary: Cookie): only early for navigations.
        navigation = kind == NAVIGATION
        user = _user(request) if navigation else None
        credentials = core.credentials_sync(user) if navigation else None
        # (no early return without credentials: a view may log the user in, a magic link)
        pending = core.start_sync(credentials) if credentials is not None else None
        if pending is not None:
            _drop_validators(request)
        try:
            response = self.get_response(request)
        except BaseException:
            if pending is not None:
                pending.discard()
            raise
        if navigation:
            if credentials is None and not is_authenticated(_user(request)):
                # An anonymous visitor's page, the most common request of most sites (the user
                # was read before the view, so the session is touched already): unless the
                # view logged someone in, no session will be made, so the response is not
                # looked at (that was half of what the middleware cost such a page)
                return response
        elif not _may_be_page(response) or not is_authenticated(_user(request)):
            # A request that said nothing: no page (JSON to a script), or an anonymous one's
            return response
        if _no_page(core, request, response):
            if pending is not None:
                pending.discard()
            return response
        after = _user(request)
        # A navigation's prebind is for whoever was logged in before the view: if the view
        # logged them out (or someone else in), it must not reach this page, and ends unused;
        # whoever the view logged in (someone else, or anyone after an anonymous request) gets
        # a prebind now, after the view, as a page that is not a navigation does.
        if not navigation or after != user:
            if pending is not None:
                pending.discard()
            credentials = core.credentials_sync(after)
            pending = core.start_sync(credentials) if credentials is not None else None
        session = pending.session() if pending is not None else None
        return self._rewrite(request, response, session) if session is not None else response

    async def __acall__(self, request: HttpRequest) -> Any:
        core, path = self.core, request.path_info
        if core.is_endpoint(path):
            if request.method != "GET":
                return HttpResponseNotAllowed(["GET"])
            site, dest = _fetch_metadata(request)
            user = await _auser(request)
            return _endpoint_response(*await core.endpoint_async(user, site, dest=dest))
        wants = core.wants_path(request.method or "", path)
        kind = core.kind_of(request.META) if wants else NOT_A_PAGE  # (as in ``__call__``)
        if kind == NOT_A_PAGE:
            return await self.get_response(request)
        navigation = kind == NAVIGATION
        user = await _auser(request) if navigation else None
        credentials = await core.credentials_async(user) if navigation else None
        pending = core.start_async(credentials) if credentials is not None else None
        if pending is not None:
            _drop_validators(request)
        try:
            response = await self.get_response(request)
        except BaseException:
            if pending is not None:
                pending.discard()
            raise
        if navigation:
            if credentials is None and not is_authenticated(await _auser(request)):
                return response  # (as in ``__call__``)
        elif not _may_be_page(response) or not is_authenticated(await _auser(request)):
            return response
        if _no_page(core, request, response):
            if pending is not None:
                pending.discard()
            return response
        after = await _auser(request)  # (as in ``__call__``)
        if not navigation or after != user:
            if pending is not None:
                pending.discard()
            credentials = await core.credentials_async(after)
            pending = core.start_async(credentials) if credentials is not None else None
        session = await pending.session() if pending is not None else None
        return self._rewrite(request, response, session) if session is not None else response

    def _rewrite(
        self, request: HttpRequest, response: HttpResponseBase, session: PrebindSession
    ) -> HttpResponseBase:
        core, streaming, length = self.core, response.streaming, None
        end = core.terminate_async if self.async_mode else core.terminate_sync
        if core.rewrites_body:
            try:
                nonce = csp_nonce(request)
            except Exception as exc:
                # The CSP middleware has written its header already (listed below ours, W002):
                # a script without the nonce would be blocked, one with a new nonce too. Fail
                # open: the page as the view made it, and the session ended, not left live.
                log.warning(
                    "page served without the session: no CSP nonce for its script (%s: %s); "
                    "list %s below the CSP middleware",
                    type(exc).__name__,
                    exc,
                    _SELF,
                )
                end(session)
                return response
            injector = page_injector(
                core.snippet(session, nonce), response.get("Content-Type"), response.charset
            )
            # In "both" mode the headers carry the session whether or not the body can: then
            # there is nothing to end when the snippet finds no place.
            keep = core.sends_headers
            if streaming:
                response.streaming_content = _injected(  # type: ignore[attr-defined]
                    response,
                    injector,
                    None if keep else lambda: core.terminate_sync(session),
                    None if keep else lambda: end(session),
                )
            else:
                response.content = injector.feed(response.content) + injector.finish()  # type: ignore[attr-defined]
                length = len(response.content)  # type: ignore[attr-defined]
                # (not done: a charset that cannot carry it, a cut-off page)
                if not injector.done and not keep:
                    end(session)
        if streaming and core.sends_headers:
            response.streaming_content = _sent_with_a_byte(  # type: ignore[attr-defined]
                response,
                lambda: core.terminate_sync(session),
                lambda: end(session),
            )
        sets, removes = core.header_edits(
            response.headers.get, session, body_length=length, streaming=streaming
        )
        for name in removes:
            response.headers.pop(name, None)
        for name, value in sets:
            response.headers[name] = value
        return response


def _injected(
    response: Any,
    injector: Injector,
    undelivered: Callable[[], None] | None,
    aundelivered: Callable[[], None] | None,
) -> Iterator[bytes] | AsyncIterator[bytes]:
    """``injected_stream`` of the streamed body, async if it was (whitenoise#531), calling
    ``undelivered()`` (sync body) or ``aundelivered()`` (async body) once it has ended without
    the snippet in it.

    Who iterates the body decides where that runs, not the middleware's mode: under ASGI,
    Django consumes a sync body (StreamingHttpResponse, FileResponse) in a worker thread, with
    no event loop for an async terminate, so a sync body always gets the thread-safe one.
    """
    content = response.streaming_content
    if not response.is_async:
        return injected_stream(content, injector, undelivered)

    async def agen() -> AsyncIterator[bytes]:
        try:
            async for chunk in content:
                if out := injector.feed(chunk):
                    yield out
            yield injector.finish()
        finally:
            if not injector.done and aundelivered is not None:
                aundelivered()

    return agen()


def _sent_with_a_byte(
    response: Any, unsent: Callable[[], None], aunsent: Callable[[], None]
) -> Iterator[bytes] | AsyncIterator[bytes]:
    """``sent_with_a_byte`` of the streamed body, calling ``unsent()`` (sync body) or
    ``aunsent()`` (async body, as in ``_injected``)."""
    content = response.streaming_content
    if not response.is_async:
        return sent_with_a_byte(content, unsent)

    async def agen() -> AsyncIterator[bytes]:
        given = False
        try:
            async for chunk in content:
                given = given or bool(chunk)
                yield chunk
            given = True  # (as in ``sent_with_a_byte``)
        finally:
            if not given:
                aunsent()

    return agen()


def _endpoint_response(status: int, headers: list[tuple[str, str]], body: bytes) -> HttpResponse:
    response = HttpResponse(body, status=status)
    for name, value in headers:
        response.headers[name] = value
    return response
