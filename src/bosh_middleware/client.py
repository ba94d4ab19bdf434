"""The two small I/O drivers of the sans-I/O flows: ``Prebinder`` (sync, for WSGI and scripts)
and ``AsyncPrebinder`` (async, for ASGI).

Each has two transports, picked by ``PrebindOptions.transport``:

* ``"builtin"`` (``http11.py``): keep-alive HTTP/1.1 POSTs to the one endpoint, per process and
  for the async driver per event loop. A prebind is 4-5 small POSTs on every logged-in page
  view, and on this path httpx's generic machinery is most of the web process's CPU: ~0.17-0.26
  ms per POST against ~0.02 ms here (docs/benchmarks.md).
* ``"httpx"``: a pooled ``httpx.Client`` / ``AsyncClient`` (or the one passed as ``client=``):
  HTTP proxies, ``httpx.MockTransport``, anything httpx can be configured to do.

``"auto"`` (the default) is builtin unless a caller passes ``client=`` or the environment sets
a proxy for the endpoint (``HTTPS_PROXY`` ..., which httpx honours and builtin does not). Either
way each batch of a flow goes out in RID order, every response is read under a size cap and a
deadline, and transport failures become ``ServiceUnavailable`` with the same conditions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import ssl
import threading
import time
import urllib.request
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import httpcore
import httpx

from . import http11
from .credentials import Credentials
from .errors import BOSHError, ProtocolError, ResponseTooLarge, ServiceUnavailable
from .protocol import (
    BOSHRequest,
    BOSHResponse,
    Derive,
    Flow,
    PrebindProtocol,
    ServerInfo,
    ServiceMemory,
    is_secure_transport,
    probe_flow,
    terminate_flow,
)
from .session import PrebindOptions, PrebindSession

__all__ = ["AsyncPrebinder", "Prebinder", "aprebind", "prebind"]

log = logging.getLogger("bosh_middleware")
T = TypeVar("T")
#: ``tuple.__new__``: a transport's (status, body) becomes a ``BOSHResponse`` in C, without the
#: named tuple's Python ``__new__`` (one Python call less per answer, each run right after a
#: wait, when calls are what costs; see docs/benchmarks.md).
_new = tuple.__new__

#: ``Accept-Encoding: identity``: without it httpx asks for gzip, brotli ..., and decodes a whole
#: network read before the size limit can be applied to what it became (a 245 kB gzip body is
#: 240 MB of zeros). A response compressed anyway is refused (``_check_head``), as the builtin
#: transport refuses it; both send this header.
_HEADERS = {
    "Content-Type": "text/xml; charset=utf-8",
    "Accept": "text/xml, */*;q=0.1",
    "Accept-Encoding": "identity",
}
_LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=30)
_CLEANUP_TIMEOUT = 2.0
#: Gap between the requests of a pipelined batch once the previous one is on the wire. Two
#: connections are not ordered: without it the second request reaches Prosody first in ~7 % of
#: prebinds here (the flow then falls back to a sequential prebind, correct but slower); with
#: 0.5 ms, in none of 460. It costs 0.5 ms against the round trip the pipelining saves.
_PIPELINE_STAGGER = 0.0005
#: How far the stagger grows for a server that keeps letting the second request overtake.
_MAX_STAGGER = 0.008


def _options(options: PrebindOptions | None, overrides: dict[str, Any]) -> PrebindOptions:
    if options is None:
        return PrebindOptions(**overrides)
    return dataclasses.replace(options, **overrides) if overrides else options


@contextmanager
def _transport_errors(url: str) -> Iterator[None]:
    """httpx exceptions -> ServiceUnavailable with a condition a caller can branch on."""
    try:
        yield
    except TimeoutError:
        raise ServiceUnavailable(
            f"BOSH request to {url} exceeded its deadline", condition="timeout"
        ) from None
    except httpx.TimeoutException as exc:
        raise ServiceUnavailable(
            f"BOSH request to {url} timed out ({type(exc).__name__})", condition="timeout"
        ) from None
    except httpx.ConnectError as exc:
        raise ServiceUnavailable(
            f"cannot connect to {url}: {exc}", condition="connection-failed"
        ) from None
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(
            f"BOSH request to {url} failed: {type(exc).__name__}: {exc}", condition="http-error"
        ) from None


def _check_head(response: httpx.Response, limit: int) -> None:
    """Refuse, before reading the body, a response that declares more than ``limit`` bytes, or
    one compressed (only identity is asked for: ``_HEADERS``), as ``http11._Parser`` does. The
    body is read raw in any case: never decoded, never larger in memory than on the wire."""
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ResponseTooLarge(f"BOSH response declares {declared} bytes, limit is {limit}")
    coding = response.headers.get("content-encoding")
    if coding is not None and any(
        c.strip(" \t").lower() not in ("", "identity") for c in coding.split(",")
    ):
        raise ProtocolError(f"BOSH response has Content-Encoding {coding[:40]!r}")


class _Deadline(threading.local):
    """When the sync httpx exchange under way on this thread must be over (``time.monotonic()``),
    or None. Set by ``Prebinder._send`` around the exchange, read by ``_DeadlineStream``."""

    at: float | None = None


_deadline = _Deadline()


def _within_deadline(
    timeout: float | None, expired: type[httpcore.TimeoutException]
) -> float | None:
    """An operation's timeout, cut to what is left of this thread's deadline."""
    at = _deadline.at
    if at is None:  # not one of our exchanges (a client the caller also uses elsewhere)
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the BOSH exchange took longer than its timeout")
    return left if timeout is None or timeout > left else timeout


class _DeadlineStream(httpcore.NetworkStream):
    """An httpcore connection whose every TLS handshake, write and read (and, made by
    ``_DeadlineBackend``, its connect) is bounded by what is left of the exchange's deadline.

    httpx's timeouts are per operation: a server that trickles its response head one byte
    per read timeout keeps a sync ``Client.stream()`` call (and the worker thread in it) from
    returning for as long as it likes, and no check of ours runs before the head is complete.
    The async driver bounds the whole exchange with ``asyncio.timeout``; a blocking read has no
    such thing, and cannot be interrupted from another thread without its socket, which httpx
    does not show for a pooled connection until the head is in. So each read is given no more
    than the time left, and none is started after the deadline: a trickle ends at the deadline,
    on the thread that waits for it, with no thread or timer of its own. (httpcore sets the
    socket's timeout before every read anyway: this adds a clock read.)"""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _within_deadline(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _within_deadline(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend, with the connections it makes as ``_DeadlineStream`` s."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        if _deadline.at is None or timeout is None:
            return _DeadlineStream(
                self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
            )
        # The lookup within the deadline too (the builtin transport's bounded resolver), then
        # a connect to each address in turn. TLS still checks the name: httpcore hands
        # ``start_tls`` the origin's host, not the address connected to.
        try:
            addresses = http11.resolve(host, port, timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        error: httpcore.ConnectError | None = None
        for *_, address in addresses:
            left = _within_deadline(timeout, httpcore.ConnectTimeout)
            try:
                stream = self._backend.connect_tcp(
                    address[0], port, left, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                error = exc
            else:
                return _DeadlineStream(stream)
        raise error or httpcore.ConnectError(f"{host} has no address")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _keep_deadlines(client: httpx.Client) -> httpx.Client:
    """``client`` with each of its connection pools (the direct one and a proxy's: the reason
    the httpx transport is used) making ``_DeadlineStream`` s. httpx has no public way to give
    a pool a network backend, hence the private attributes, looked up with care: a transport
    that has none (``httpx.MockTransport``, a caller's own) is left as it is, and the deadline
    is then checked between the chunks of the body only. Harmless outside ``Prebinder._send``:
    ``_deadline`` is unset there."""
    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, httpcore.NetworkBackend) and not isinstance(
            backend, _DeadlineBackend
        ):
            pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]
    return client


def _tls(verify: Any) -> Any:
    """httpx's ``verify``, built as the builtin transport builds it: both trust the same CAs, and
    a CA bundle path (which httpx 0.28 deprecates) keeps working."""
    return http11.ssl_context(verify) if verify is not True else True


def _wants_builtin(service_url: str, options: PrebindOptions, client: object | None) -> bool:
    """Which transport (see the module docstring): True for ``http11``, False for httpx."""
    choice = options.transport
    if choice not in ("auto", "builtin", "httpx"):
        raise ValueError(f"transport must be 'auto', 'builtin' or 'httpx', not {choice!r}")
    if client is not None or choice == "httpx":
        return False
    if choice == "builtin":
        return True
    if not http11.SUPPORTED:
        return False
    proxies = urllib.request.getproxies_environment()
    scheme, _, rest = service_url.partition("://")
    if not (proxies.get(scheme.lower()) or proxies.get("all")):
        return True
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return True
    log.debug(
        "BOSH requests to %s go through httpx: a proxy is configured",
        http11.redact_url(service_url),
    )
    return False


def _through_proxy(client: httpx.Client | httpx.AsyncClient, url: str) -> bool:
    """Whether ``client`` sends a request for ``url`` elsewhere than straight to its host: to a
    proxy (given to it, or the environment's; httpx sends loopback URLs to one too, unless
    ``NO_PROXY`` names them, matched by its own rules) or to a transport mounted for it. httpx
    has no public way to ask, hence the private method, looked up with care: a client that has
    none is taken to use a proxy (PLAIN then needs https or ``allow_insecure_plain``)."""
    route = getattr(client, "_transport_for_url", None)
    if route is None:
        return True
    try:
        return route(httpx.URL(url)) is not getattr(client, "_transport", None)
    except httpx.InvalidURL:
        return True


def _settles(batch: list[BOSHRequest]) -> Callable[[list[http11.Response]], bool] | None:
    """The batch's ``settles`` over http11's (status, body) answers."""
    settles = batch[0].settles if len(batch) > 1 else None
    if settles is None:
        return None
    return lambda answers: settles([_new(BOSHResponse, a) for a in answers])


def _log_batch(batch: list[BOSHRequest]) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("bosh send %s", ", ".join(f"{r.label}(rid={r.rid})" for r in batch))


class _LoopThread:
    """A private event loop on a daemon thread (the sync driver's pipelined batches)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="bosh-pipeline", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class _Base:
    def __init__(self, service_url: str, options: PrebindOptions) -> None:
        self.service_url = service_url
        #: ``service_url`` for messages, logs and the repr: without its password
        self._shown_url = http11.redact_url(service_url)
        self.options = options
        self._headers = {**_HEADERS, **options.headers}
        #: what httpx is given: the URL without a password, which goes in the headers
        self._request_url, self._request_headers = http11.basic_auth(service_url, self._headers)
        #: a request's timeout, by its ``best_effort``: a cleanup waits _CLEANUP_TIMEOUT at most
        self._timeouts = (options.timeout, min(_CLEANUP_TIMEOUT, options.timeout))
        #: what the prebinds learn of the service, for quickstart
        self.memory = ServiceMemory()
        #: https, or plain HTTP to this machine (``protocol.is_secure_transport``)
        self._secure_url = is_secure_transport(service_url)
        #: plain HTTP to this machine: secure only if it goes straight there (``_secure``)
        self._loopback_http = self._secure_url and urlsplit(service_url).scheme != "https"
        #: ``_loopback_http`` sent by httpx: set by the drivers once the transport is chosen
        self._ask_route = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._shown_url}>"

    def _http(self) -> httpx.Client | httpx.AsyncClient:
        """The httpx client this driver sends with (each driver has its own kind)."""
        raise NotImplementedError

    def _secure(self) -> bool:
        """Whether PLAIN may go out: what the URL says (https, or plain HTTP to loopback),
        unless the requests go to a proxy, which the builtin transport never does and an httpx
        client does by the environment or its own settings. The client that will send the
        prebind is asked, each time: a new one (after a fork, on another event loop) is made
        as the last was, and only this rare setting pays for the question."""
        if not self._ask_route:
            return self._secure_url
        return not _through_proxy(self._http(), self._request_url)

    def _protocol(self, credentials: Credentials, rid: int | None) -> PrebindProtocol:
        return PrebindProtocol(
            credentials,
            self.options,
            service_url=self.service_url,
            rid=rid,
            memory=self.memory,
            secure=self._secure(),
        )

    #: The pause between a pipelined batch's requests (see ``_PIPELINE_STAGGER``), learnt per
    #: client: a busy or slow server (one core, debug logging) can still take the second
    #: request first, and each time it does a whole prebind is redone. So it doubles after a
    #: prebind that had to be redone, up to ``_MAX_STAGGER``, and eases back 10 % per prebind
    #: that was not, down to ``_PIPELINE_STAGGER``.
    stagger = _PIPELINE_STAGGER

    def _learn(self, session: PrebindSession) -> PrebindSession:
        if session.retried:
            self.stagger = min(self.stagger * 2, _MAX_STAGGER)
            log.debug("pipelined requests overtook each other: stagger now %.4f s", self.stagger)
        elif self.stagger > _PIPELINE_STAGGER:
            self.stagger = max(self.stagger * 0.9, _PIPELINE_STAGGER)
        return session


class Prebinder(_Base):
    """Synchronous prebinder; thread-safe; make one per process and reuse it.

    >>> with Prebinder("https://xmpp.example.org/http-bind") as p:
    ...     session = p.prebind(Credentials("alice@example.org", "secret"))
    ...     session.as_dict()   # {"jid": ..., "sid": ..., "rid": <the RID the browser sends next>}
    """

    def __init__(
        self,
        service_url: str,
        *,
        options: PrebindOptions | None = None,
        client: httpx.Client | None = None,
        verify: Any = True,
        **overrides: Any,
    ) -> None:
        super().__init__(service_url, _options(options, overrides))
        self._given_client = client
        self._verify = verify
        # (a given client is not otherwise changed: see _keep_deadlines)
        self._client: httpx.Client | None = None if client is None else _keep_deadlines(client)
        self._pid = os.getpid()
        self._loop_thread: _LoopThread | None = None
        self._loop_pid = os.getpid()
        self._async: AsyncPrebinder | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._builtin = (
            http11.SyncPool(http11.origin(service_url, self._headers, verify))
            if _wants_builtin(service_url, self.options, client)
            else None
        )
        self.memory.pipelining = self._builtin is not None
        self._ask_route = self._loopback_http and self._builtin is None

    def _builtin_send(self, batch: list[BOSHRequest]) -> list[BOSHResponse | None]:
        assert self._builtin is not None
        if self._closed:
            raise ServiceUnavailable("this Prebinder is closed", condition="closed")
        limit = self.options.max_response_size
        if len(batch) == 1:
            req = batch[0]
            return [
                _new(
                    BOSHResponse,
                    self._builtin.exchange(req.body, self._timeouts[req.best_effort], limit),
                )
            ]
        timeout = max(self._timeouts[r.best_effort] for r in batch)
        if batch[0].ordered:
            answers = self._builtin.pipeline([r.body for r in batch], timeout, limit)
            return [_new(BOSHResponse, a) for a in answers]
        results = self._builtin.batch(
            [r.body for r in batch], timeout, limit, _settles(batch), self.stagger
        )
        return [None if r is None else _new(BOSHResponse, r) for r in results]

    def _http(self) -> httpx.Client:
        if self._closed:
            raise ServiceUnavailable("this Prebinder is closed", condition="closed")
        # A client inherited through fork() shares sockets with the parent: make a new one.
        if self._client is None or (self._given_client is None and self._pid != os.getpid()):
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = _keep_deadlines(
                        httpx.Client(limits=_LIMITS, verify=_tls(self._verify))
                    )
                    self._pid = os.getpid()
        return self._client

    def _send(self, req: BOSHRequest) -> BOSHResponse:
        if self._builtin is not None:
            (answer,) = self._builtin_send([req])
            assert answer is not None
            return answer
        limit = self.options.max_response_size
        timeout = self._timeouts[req.best_effort]
        client = self._http()
        # One deadline for the whole exchange, kept by the connection's reads and writes
        # (``_DeadlineStream``): httpx's timeout is per read, which a trickle defeats.
        _deadline.at = deadline = time.monotonic() + timeout
        try:
            with (
                _transport_errors(self._shown_url),
                client.stream(
                    "POST",
                    self._request_url,
                    content=req.body,
                    headers=self._request_headers,
                    timeout=timeout,
                ) as response,
            ):
                _check_head(response, limit)
                data = bytearray()
                for chunk in response.iter_raw():
                    data += chunk
                    if len(data) > limit:
                        raise ResponseTooLarge(f"BOSH response exceeds {limit} bytes")
                    # (for a transport without _DeadlineStream: a caller's client=)
                    if time.monotonic() > deadline:
                        raise ServiceUnavailable(
                            f"BOSH response from {self._shown_url} took over {timeout} s",
                            condition="timeout",
                        )
                return BOSHResponse(response.status_code, bytes(data))
        finally:
            _deadline.at = None

    def _send_batch(self, batch: list[BOSHRequest]) -> list[BOSHResponse | None]:
        if self._builtin is not None:
            _log_batch(batch)
            return self._builtin_send(batch)
        if len(batch) == 1 or batch[0].ordered:  # (httpx does not pipeline: one by one)
            _log_batch(batch)
            return [self._send(req) for req in batch]
        if self._given_client is not None:
            # The caller's client (its TLS, proxy, auth and transport) sends every request; the
            # private sender below would have none of it. So one by one: the bind once the
            # restart is answered (a round trip more, on a first prebind), and the terminates
            # of a cleanup at once, a thread each, within one cleanup timeout.
            _log_batch(batch)
            if all(r.best_effort for r in batch):
                with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
                    return list(pool.map(self._send, batch))
            return [self._send(req) for req in batch]
        # A pipelined batch may end with a request the server holds open; it must be closed,
        # not abandoned (the server would put the browser's first answers on it), and a
        # blocking httpx.Client read cannot be interrupted from another thread. So pipelined
        # batches go through the async sender on a private event loop, where cancelling a
        # request closes its connection.
        loop = self._loop()  # first: a new loop thread drops the batcher of the old one
        batcher = self._batcher()
        batcher.stagger = self.stagger  # learnt here, by prebind()
        return loop.run(batcher._send_batch(batch))

    def _loop(self) -> _LoopThread:
        if self._closed:
            raise ServiceUnavailable("this Prebinder is closed", condition="closed")
        if self._loop_thread is None or self._loop_pid != os.getpid():
            with self._lock:
                if self._loop_thread is None or self._loop_pid != os.getpid():
                    self._loop_thread = _LoopThread()
                    self._async = None
                    self._loop_pid = os.getpid()
        return self._loop_thread

    def _batcher(self) -> AsyncPrebinder:
        if self._async is None:
            self._async = AsyncPrebinder(
                self.service_url, options=self.options, verify=self._verify
            )
        return self._async

    def run(self, flow: Flow[T]) -> T:
        """Drive any flow of ``protocol.py`` to its result."""
        try:
            batch = next(flow)
            while True:
                if isinstance(batch, Derive):  # (this thread is a web worker's: work here)
                    try:
                        batch.run()
                    except Exception as exc:  # (into the flow, which ends its session)
                        batch = flow.throw(exc)
                        continue
                    batch = flow.send([])
                    continue
                try:
                    responses = self._send_batch(batch)
                except BOSHError as exc:
                    batch = flow.throw(exc)
                    continue
                batch = flow.send(responses)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def prebind(self, credentials: Credentials, *, rid: int | None = None) -> PrebindSession:
        proto = self._protocol(credentials, rid)
        session = self._learn(self.run(proto.flow()))
        log.debug(
            "prebound %s sid=%s in %d round trips", session.jid, session.sid, session.round_trips
        )
        return session

    def terminate(self, session: PrebindSession) -> bool:
        """End a session no browser will attach to. Best effort: returns whether it worked."""
        try:
            self.run(terminate_flow(session))
        except BOSHError as exc:
            log.info("could not terminate BOSH session %s: %s", session.sid, exc)
            return False
        return True

    def probe(self, domain: str) -> ServerInfo:
        return self.run(probe_flow(domain, self.options))

    def close(self) -> None:
        self._closed = True
        if self._builtin is not None:
            self._builtin.close()
        if self._loop_thread is not None and self._loop_pid == os.getpid():
            if self._async is not None:
                self._loop_thread.run(self._async.aclose())
            self._loop_thread.close()
        self._loop_thread = self._async = None
        if self._client is not None and self._given_client is None:
            self._client.close()
        self._client = None

    def __enter__(self) -> Prebinder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_batch(batch: list[BOSHRequest]) -> Flow[list[BOSHResponse | None]]:
    """A flow of one batch, whose result is its answers: a lone request (a cleanup's
    terminate) or batch goes through ``_Drive`` as a whole prebind does."""
    return (yield batch)


class _Drive(Generic[T]):
    """A flow driven over an ``http11.AsyncPool`` from callbacks: each batch's ``done`` (run by
    the event loop in the turn that read its last answer) sends the answers into the flow
    and starts the next batch at once. ``future`` gets the flow's result or error."""

    __slots__ = ("_batch", "_flow", "_pool", "_prebinder", "future")

    def __init__(self, prebinder: AsyncPrebinder, pool: http11.AsyncPool, flow: Flow[T]) -> None:
        self._prebinder = prebinder
        self._pool = pool
        self._flow = flow
        self._batch: http11._Batch | None = None
        self.future: asyncio.Future[T] = pool.loop().create_future()

    def step(self, answers: list[http11.Response | None] | None, exc: BaseException | None) -> None:
        """The flow's next batch, after ``answers`` or ``exc`` (neither: its first)."""
        self._batch = None
        if self.future.done():  # cancelled by its awaiter meanwhile
            return
        flow = self._flow
        try:
            if exc is not None:
                # (a transport's bug is the awaiter's; a derivation's error (answers: [])
                # goes into the flow too, which ends the session it made)
                if answers is None and not isinstance(exc, BOSHError):
                    raise exc
                batch = flow.throw(exc)
            elif answers is None:
                batch = next(flow)
            else:
                batch = flow.send([None if a is None else _new(BOSHResponse, a) for a in answers])
            if isinstance(batch, Derive):  # off the event loop; then on from here, no answers
                work = self._pool.loop().run_in_executor(None, batch.run)
                work.add_done_callback(self._derived)
                return
            _log_batch(batch)
            p = self._prebinder
            timeouts = p._timeouts
            self._batch = self._pool.start(
                [r.body for r in batch],
                timeouts[batch[0].best_effort]
                if len(batch) == 1
                else max(timeouts[r.best_effort] for r in batch),
                p.options.max_response_size,
                _settles(batch),
                p.stagger,
                self.step,
                batch[0].ordered,
            )
        except StopIteration as stop:
            self.future.set_result(stop.value)
        except BaseException as error:  # (a flow's own errors, and bugs: the awaiter's)
            self.future.set_exception(error)

    def _derived(self, work: asyncio.Future[object]) -> None:
        self.step([], None if work.cancelled() else work.exception())

    def cancel(self) -> None:
        if self._batch is not None:
            self._batch.cancel()
            self._batch = None


class AsyncPrebinder(_Base):
    """Asynchronous prebinder: its connection pool (builtin or ``httpx.AsyncClient``) is per event
    loop, since connections must not be shared across loops."""

    def __init__(
        self,
        service_url: str,
        *,
        options: PrebindOptions | None = None,
        client: httpx.AsyncClient | None = None,
        verify: Any = True,
        **overrides: Any,
    ) -> None:
        super().__init__(service_url, _options(options, overrides))
        self._given_client = client
        self._verify = verify
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )
        self._cleanup: set[asyncio.Task[Any]] = set()
        self._origin = (
            http11.origin(service_url, self._headers, verify)
            if _wants_builtin(service_url, self.options, client)
            else None
        )
        self.memory.pipelining = self._origin is not None
        self._ask_route = self._loopback_http and self._origin is None
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, http11.AsyncPool] = (
            weakref.WeakKeyDictionary()
        )
        # Weak keys alone never let a loop go: its pool or client (through their connections)
        # holds it. Each loop's ``_loop_end`` generator closes them while the loop can still
        # close sockets, and ``_new_loop`` drops those of loops closed without that step.
        self._ends: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncGenerator[None, None]
        ] = weakref.WeakKeyDictionary()
        # (loops run on several threads at once: asgiref's async_to_sync, one per call)
        self._loops_lock = threading.Lock()

    def _pool(self) -> http11.AsyncPool:
        assert self._origin is not None
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            with self._loops_lock:
                self._new_loop(loop)
                pool = self._pools[loop] = http11.AsyncPool(self._origin)
        return pool

    def _http(self) -> httpx.AsyncClient:
        if self._given_client is not None:
            return self._given_client
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            with self._loops_lock:
                self._new_loop(loop)
                client = httpx.AsyncClient(limits=_LIMITS, verify=_tls(self._verify))
                self._clients[loop] = client
        return client

    def _new_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Before the first pool or client of ``loop`` (under ``_loops_lock``): have them
        closed at its end, and forget those of loops already closed.

        A loop ended by ``asyncio.run`` (or ``asyncio.Runner``, ``uvloop.run``, anyio,
        asgiref's ``async_to_sync``) closes its asynchronous generators first, with
        ``loop.shutdown_asyncgens()``: ``_loop_end``, started here, is one, and its ``finally``
        closes this loop's pool or client then, while the loop can still close their sockets.
        A loop merely closed (``loop.close()`` alone) gives no such turn: its entries are
        dropped on the next new loop, which frees the loop and, through their finalizers,
        the sockets its transports still hold (asyncio then warns of each: the loop's owner
        left them open). Only a new loop pays for this, not a prebind on a known one."""
        for old in [known for known in self._ends if known.is_closed()]:
            del self._ends[old]
            self._pools.pop(old, None)
            self._clients.pop(old, None)
        if loop in self._ends:  # (its pool, and now its client, or the other way round)
            return
        end = _loop_end(self, loop)
        with suppress(StopIteration):  # (on to its ``yield``: nothing to await)
            end.asend(None).send(None)
        self._ends[loop] = end

    async def _cleaned_up(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait (``_CLEANUP_TIMEOUT`` at most) for the terminates that prebinds cancelled
        mid-flow on ``loop`` started: closed before them, they would leave their sessions live.
        (A copy first, in one step: loops on other threads add theirs meanwhile.)"""
        cleanups = [task for task in list(self._cleanup) if task.get_loop() is loop]
        if cleanups:
            await asyncio.wait(cleanups, timeout=_CLEANUP_TIMEOUT)

    async def _loop_ended(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the pool or client of ``loop``, at its end or by ``aclose``. At its end, the
        cleanups first: ``asyncio.run`` cancels the tasks still running (a prebind whose page
        gave up, on a server with no lifespan to wait for it: Django's), and the terminate a
        cancelled prebind starts then is a new task, which only this can wait for before the
        loop closes (destroyed pending, it was never sent, or sent in part)."""
        await self._cleaned_up(loop)
        with self._loops_lock:
            self._ends.pop(loop, None)
            pool = self._pools.pop(loop, None)
            client = self._clients.pop(loop, None)
        if pool is not None:
            pool.close()
        if client is not None:
            await client.aclose()

    async def _send(self, req: BOSHRequest, sent: asyncio.Event | None = None) -> BOSHResponse:
        if self._origin is not None:
            (answer,) = await self.run(_one_batch([req]))
            assert answer is not None
            return answer
        limit = self.options.max_response_size
        extensions: dict[str, Any] = {}
        if sent is not None:

            async def trace(event: str, info: Any) -> None:
                if event.endswith("send_request_body.complete"):
                    sent.set()

            extensions["trace"] = trace
        timeout = self._timeouts[req.best_effort]
        with _transport_errors(self._shown_url):
            # asyncio.timeout makes the per-request timeout a deadline (httpx's is per read).
            async with (
                asyncio.timeout(timeout),
                self._http().stream(
                    "POST",
                    self._request_url,
                    content=req.body,
                    headers=self._request_headers,
                    timeout=timeout,
                    extensions=extensions,
                ) as response,
            ):
                _check_head(response, limit)
                data = bytearray()
                async for chunk in response.aiter_raw():
                    data += chunk
                    if len(data) > limit:
                        raise ResponseTooLarge(f"BOSH response exceeds {limit} bytes")
                return BOSHResponse(response.status_code, bytes(data))

    async def _send_batch(self, batch: list[BOSHRequest]) -> list[BOSHResponse | None]:
        if self._origin is not None:  # (logged by _Drive.step)
            return await self.run(_one_batch(batch))
        _log_batch(batch)
        if len(batch) == 1 or batch[0].ordered:  # (httpx does not pipeline: one by one)
            return [await self._send(req) for req in batch]
        # In RID order on the wire, as in Prebinder._send_batch.
        tasks = []
        for req in batch:
            if req.best_effort:  # (the terminates of a cleanup: no order to keep, and each
                # waited for until sent would make one cleanup timeout one per terminate)
                tasks.append(asyncio.ensure_future(self._send(req)))
            else:
                sent = asyncio.Event()
                task = asyncio.ensure_future(self._send(req, sent))
                tasks.append(task)
                waiter = asyncio.ensure_future(sent.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            if len(tasks) < len(batch):
                await http11.sleep_not_sooner(self.stagger)
        return await http11.settle(tasks, batch[0].settles)

    async def run(self, flow: Flow[T]) -> T:
        """Drive any flow of ``protocol.py`` to its result. Over the builtin transport each
        batch is started from the callback that completes the one before (``_Drive``): a
        prebind is one future to await, not one per answer."""
        if self._origin is not None:
            drive = _Drive(self, self._pool(), flow)
            drive.step(None, None)
            try:
                return await drive.future
            except BaseException:
                drive.cancel()
                raise
        try:
            batch = next(flow)
            while True:
                if isinstance(batch, Derive):  # off the event loop
                    try:
                        await asyncio.get_running_loop().run_in_executor(None, batch.run)
                    except Exception as exc:  # (into the flow, which ends its session)
                        batch = flow.throw(exc)
                        continue
                    batch = flow.send([])
                    continue
                try:
                    responses = await self._send_batch(batch)
                except BOSHError as exc:
                    batch = flow.throw(exc)
                    continue
                batch = flow.send(responses)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def prebind(self, credentials: Credentials, *, rid: int | None = None) -> PrebindSession:
        proto = self._protocol(credentials, rid)
        try:
            session = self._learn(await self.run(proto.flow()))
        except asyncio.CancelledError:
            # Cancelled from outside mid-flow (a deadline): do not orphan a half-made session.
            cleanup = proto.abort_requests()
            if cleanup:
                task = asyncio.ensure_future(self._send_batch(cleanup))
                self._cleanup.add(task)
                task.add_done_callback(self._cleanup_done)
            raise
        log.debug(
            "prebound %s sid=%s in %d round trips", session.jid, session.sid, session.round_trips
        )
        return session

    def _cleanup_done(self, task: asyncio.Task[Any]) -> None:
        self._cleanup.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("could not terminate an interrupted BOSH session: %s", task.exception())

    async def terminate(self, session: PrebindSession) -> bool:
        try:
            await self.run(terminate_flow(session))
        except BOSHError as exc:
            log.info("could not terminate BOSH session %s: %s", session.sid, exc)
            return False
        return True

    async def probe(self, domain: str) -> ServerInfo:
        return await self.run(probe_flow(domain, self.options))

    async def aclose(self) -> None:
        """Close the client of the running loop (call at shutdown, e.g. ASGI lifespan), once
        the terminate requests of prebinds cancelled mid-flow are done (each is bounded by
        ``_CLEANUP_TIMEOUT``): else a session they were to end is left to time out."""
        loop = asyncio.get_running_loop()
        await self._cleaned_up(loop)
        with self._loops_lock:
            end = self._ends.pop(loop, None)
        if end is not None:  # its ``finally`` closes them, and it is not left to the loop's end
            await end.aclose()

    async def __aenter__(self) -> AsyncPrebinder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _loop_end(
    prebinder: AsyncPrebinder, loop: asyncio.AbstractEventLoop
) -> AsyncGenerator[None, None]:
    """Suspended at its ``yield`` from ``loop``'s first prebind until the loop's end (see
    ``AsyncPrebinder._new_loop``) or ``aclose``. (Should the prebinder be dropped first, the
    loop's finalizer for asynchronous generators runs this ``finally`` on the loop too.)"""
    try:
        yield
    finally:
        if not loop.is_closed():  # (else dropped by ``_new_loop``: nothing it can close)
            await prebinder._loop_ended(loop)


def prebind(service_url: str, credentials: Credentials, **options: Any) -> PrebindSession:
    """One-shot prebind with a throw-away client (use a ``Prebinder`` to pool connections)."""
    with Prebinder(service_url, **options) as prebinder:
        return prebinder.prebind(credentials)


async def aprebind(service_url: str, credentials: Credentials, **options: Any) -> PrebindSession:
    async with AsyncPrebinder(service_url, **options) as prebinder:
        return await prebinder.prebind(credentials)
