"""Hostile and broken BOSH endpoints (support/fake_bosh.py): every fault must end in a clear,
typed exception, quickly, for the sync ``Prebinder`` and the async ``AsyncPrebinder`` alike."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import re
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from bosh_middleware import (
    AsyncPrebinder,
    AuthenticationFailed,
    BOSHError,
    Credentials,
    Prebinder,
    PrebindSession,
    ProtocolError,
    ResponseTooLarge,
    ServiceUnavailable,
)
from bosh_middleware.config import MiddlewareConfig
from bosh_middleware.protocol import BOSHRequest, BOSHResponse, Flow, PrebindProtocol
from bosh_middleware.session import PrebindOptions
from support.fake_bosh import FEATURES as FEATURES_PLAIN
from support.fake_bosh import Exchange, FakeBOSH, at_label, xmpp_ok

CREDS = Credentials("alice@localhost", "pw-not-secret-1")
TIMEOUT = 1.0  # client timeout used by the tests that need one

XXE = (
    b"<?xml version='1.0'?>\n"
    b'<!DOCTYPE body [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    b"<body xmlns='http://jabber.org/protocol/httpbind' sid='x' wait='59' requests='2'>"
    b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'>&xxe;</stream:features>"
    b"</body>"
)
BILLION_LAUGHS = (
    b"<?xml version='1.0'?>\n<!DOCTYPE body [\n<!ENTITY lol 'lol'>\n"
    + b"".join(
        b"<!ENTITY lol%d '%s'>\n" % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]>\n<body xmlns='http://jabber.org/protocol/httpbind' sid='x'>&lol9;</body>"
)
HTML = (
    b"<!doctype html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><hr><center>nginx</center></body></html>"
)


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeBOSH]]:
    """``fake(fault) -> started FakeBOSH``; all are stopped (and checked) at the end."""
    started: list[FakeBOSH] = []

    def make(fault: Callable[[Exchange], None] = xmpp_ok) -> FakeBOSH:
        srv = FakeBOSH(fault).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
    for srv in started:
        assert not srv.errors(), srv.errors()  # a fault that crashed would prove nothing


@pytest.fixture(params=["sync", "async", "sync-httpx", "async-httpx"])
def prebind(request: pytest.FixtureRequest) -> Callable[..., PrebindSession]:
    """``prebind(url, creds=CREDS, **options)`` with the sync or the async engine, over the
    builtin HTTP client or (``-httpx``) httpx."""
    kind, _, transport = request.param.partition("-")

    def run(url: str, creds: Credentials = CREDS, **options: Any) -> PrebindSession:
        options.setdefault("transport", transport or "builtin")
        if kind == "sync":
            with Prebinder(url, **options) as p:
                return p.prebind(creds)

        async def go() -> PrebindSession:
            async with AsyncPrebinder(url, **options) as p:
                return await p.prebind(creds)

        # on a fresh thread: a sync Playwright fixture may have left a loop running on this one
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(go())).result(timeout=60)

    return run


def _expect(exc_type: type[BOSHError], fn: Callable[[], Any], *, within: float) -> BOSHError:
    t0 = time.monotonic()
    with pytest.raises(exc_type) as info:
        fn()
    elapsed = time.monotonic() - t0
    assert elapsed < within, f"took {elapsed:.2f}s (limit {within}s)"
    return info.value


def _expect_with_peak(
    exc_type: type[BOSHError], fn: Callable[[], Any], *, within: float
) -> tuple[BOSHError, int]:
    """``_expect``, and the peak of Python memory allocated meanwhile (tracemalloc)."""
    tracemalloc.start()
    try:
        err = _expect(exc_type, fn, within=within)
        return err, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the with block ends


# ------------------------------------------------------------------------------------------
# the fake itself is a working server
# ------------------------------------------------------------------------------------------


def test_healthy_fake_prebinds(fake, prebind) -> None:
    srv = fake()
    session = prebind(srv.url)
    assert session.jid.startswith("alice@localhost/web-")
    assert session.sid == "fake-sid-0001" and session.round_trips == 3
    # restart and bind go on two connections (the fake does not defer an overtaking bind, so
    # nothing is redone), and its handler threads record them in whichever order they read
    # them: bind first now and then on a busy host (1 in 100 prebinds with one core and two
    # CPU hogs)
    assert srv.labels[:2] == ["create", "auth"] and sorted(srv.labels[2:]) == ["bind", "restart"]


# ------------------------------------------------------------------------------------------
# what goes into the page: a SID and a JID only as servers send them
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sid",
    ['a" onerror=alert(1) x="', "a'b", "a<b", "a b", "a\tb", "x" * 257],
    ids=["double-quote", "single-quote", "lt", "space", "tab", "too-long"],
)
def test_a_sid_no_server_sends_is_refused(fake, prebind, sid: str) -> None:
    """A server (or anyone on a plain-HTTP path to it) choosing the SID would choose what the
    page says: it is refused before any login, as a protocol error (the page goes without)."""
    escaped = sid.replace("&", "&amp;").replace('"', "&quot;").replace("'", "&apos;")
    escaped = escaped.replace("<", "&lt;").replace("\t", "&#9;")

    def create(ctx: Exchange) -> None:
        ctx.xml(FEATURES_PLAIN, sid=escaped, wait="59", requests="2", ver="1.6")

    srv = fake(at_label("create", create))
    err = _expect(ProtocolError, lambda: prebind(srv.url), within=5.0)
    assert "sid" in str(err) and sid not in str(err)
    assert srv.labels == ["create"]


@pytest.mark.parametrize(
    "jid",
    [
        "alice@localhost/onerror=alert(1)//",
        "alice@localhost/x onerror",
        'alice@localhost/a"b',
        "alice@localhost/a<b",
        "alice@localhost",  # no resource
        "localhost/res",  # no localpart
    ],
)
def test_a_bound_jid_no_server_binds_is_refused(fake, prebind, jid: str) -> None:
    escaped = jid.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")

    def bind(ctx: Exchange) -> None:
        iq_id = re.search(rb"<iq id='([^']+)'", ctx.body)
        assert iq_id
        ctx.xml(
            f"<iq type='result' id='{iq_id.group(1).decode()}' xmlns='jabber:client'>"
            f"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{escaped}</jid></bind></iq>"
        )

    srv = fake(at_label("bind", bind))
    err = _expect(ProtocolError, lambda: prebind(srv.url), within=5.0)
    assert "JID" in str(err)
    assert srv.wait_for_label("terminate")  # the session it made is ended


@pytest.mark.parametrize(
    "sid", ["0f6a4d2e-3b1c-4a7e-9d2f-8c5b6a7e1f00", "3f9c2a1b7d0e", "aGVsbG8gd29ybGQ=", "a.b_c~d"]
)
def test_the_sids_servers_send_are_taken(fake, prebind, sid: str) -> None:
    """UUIDs (Prosody, Tigase), hex (ejabberd), base64 and other URL-safe tokens."""

    def create(ctx: Exchange) -> None:
        ctx.xml(FEATURES_PLAIN, sid=sid, wait="59", requests="2", ver="1.6")

    assert prebind(fake(at_label("create", create)).url).sid == sid


# ------------------------------------------------------------------------------------------
# XML attacks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [XXE, BILLION_LAUGHS], ids=["xxe", "billion-laughs"])
def test_dtd_payload_on_create(fake, prebind, payload: bytes) -> None:
    srv = fake(lambda ctx: ctx.respond(200, payload))
    err = _expect(ProtocolError, lambda: prebind(srv.url), within=2)
    assert "DTD" in str(err)
    assert "root:" not in str(err)
    assert srv.labels == ["create"]


@pytest.mark.parametrize("payload", [XXE, BILLION_LAUGHS], ids=["xxe", "billion-laughs"])
def test_dtd_payload_mid_flow_terminates_the_session(fake, prebind, payload: bytes) -> None:
    srv = fake(at_label("bind", lambda ctx: ctx.respond(200, payload)))
    _expect(ProtocolError, lambda: prebind(srv.url), within=3)
    # the half-made session is cleaned up
    assert srv.wait_for_label("terminate"), srv.labels
    assert srv.labels[-1] == "terminate"


def test_parser_never_resolves_entities_even_without_doctype_check() -> None:
    """Defence in depth: the lxml parser itself must not load external entities."""
    from bosh_middleware import body as b

    parser = b._parser()
    resolved = None
    try:
        from lxml import etree

        root = etree.fromstring(XXE, parser)
        resolved = "".join(root.itertext())
    except Exception:  # a parser that refuses is fine too
        pass
    assert resolved is None or "root:" not in resolved


# ------------------------------------------------------------------------------------------
# size limits
# ------------------------------------------------------------------------------------------


def test_fifty_megabytes_streamed_stops_at_the_limit(fake, prebind) -> None:
    total = 50 * 1024 * 1024
    srv = fake(
        lambda ctx: ctx.stream_chunked(
            total, prefix=b"<body xmlns='http://jabber.org/protocol/httpbind'>"
        )
    )
    err, peak = _expect_with_peak(
        ResponseTooLarge, lambda: prebind(srv.url, max_response_size=256 * 1024), within=3
    )
    assert isinstance(err, ProtocolError)
    srv.stop()  # wait for the writer to notice the client is gone
    sent = srv.sent_bytes()
    # it stopped reading: far less than 50 MB crossed the socket (kernel buffers absorb some)
    assert sent < 16 * 1024 * 1024, f"server wrote {sent} bytes"
    assert peak < 24 * 1024 * 1024, f"peak traced memory {peak / 1e6:.1f} MB"


def test_declared_content_length_over_the_limit_is_not_read(fake, prebind) -> None:
    def huge(ctx: Exchange) -> None:
        ctx.head(200, {"Content-Type": "text/xml", "Content-Length": str(100 * 1024 * 1024)})
        ctx.send_raw(b"<body xmlns='http://jabber.org/protocol/httpbind'>")
        ctx.sleep(5)  # the body never comes: only the header can be judged

    srv = fake(huge)
    err = _expect(ResponseTooLarge, lambda: prebind(srv.url, timeout=10), within=1.5)
    assert "104857600" in str(err)


def test_small_limit_applies_to_ordinary_responses(fake, prebind) -> None:
    srv = fake()
    _expect(ResponseTooLarge, lambda: prebind(srv.url, max_response_size=100), within=2)


def test_compressed_response_is_refused_before_it_is_decoded(fake, prebind) -> None:
    """Every request asks for identity. A response compressed anyway is refused unread: httpx
    would decode each network read whole before the size limit saw what it became (here 64 MiB
    of zeros in 65 kB, under the limit as it comes), and the builtin transport would hand
    gzip to the XML parser."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    bomb = b"".join(co.compress(zeros) for _ in range(64)) + co.flush()
    asked: list[str | None] = []

    def compressed(ctx: Exchange) -> None:
        asked.append(ctx.headers.get("accept-encoding"))
        ctx.respond(200, bomb, headers={"Content-Encoding": "gzip"})

    srv = fake(compressed)
    err, peak = _expect_with_peak(
        ProtocolError, lambda: prebind(srv.url, max_response_size=256 * 1024), within=3
    )
    assert "Content-Encoding 'gzip'" in str(err), err
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak / 1e6:.1f} MB"
    assert asked == ["identity"]


def test_identity_content_encoding_is_accepted(fake, prebind) -> None:
    """``Content-Encoding: identity`` is no coding at all: a healthy server may say it."""

    def identity(ctx: Exchange) -> None:
        plain = ctx.respond

        def respond(
            status: int = 200, body: bytes = b"", content_type: str = "text/xml", headers=None
        ) -> None:
            plain(status, body, content_type, {"Content-Encoding": "identity", **(headers or {})})

        ctx.respond = respond  # type: ignore[method-assign]
        xmpp_ok(ctx)

    srv = fake(identity)
    assert prebind(srv.url).jid.startswith("alice@localhost/web-")


# ------------------------------------------------------------------------------------------
# not BOSH at all
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\xff\xfe garbage \x89PNG\r\n\x1a\n" * 20,
        b"",
        b"   \n",
        b'{"jid": "not xml"}',
        b"<body xmlns='http://jabber.org/protocol/httpbind'",
        b"<body xmlns='wrong'/>",
    ],
    ids=["binary", "empty", "blank", "json", "truncated", "wrong-ns"],
)
def test_garbage_body_with_200(fake, prebind, payload: bytes) -> None:
    srv = fake(lambda ctx: ctx.respond(200, payload))
    _expect(ProtocolError, lambda: prebind(srv.url), within=2)


def test_garbage_instead_of_http(fake, prebind) -> None:
    srv = fake(lambda ctx: ctx.send_raw(b"\x16\x03\x01\x02\x00 this is not HTTP\r\n\r\n"))
    err = _expect(ServiceUnavailable, lambda: prebind(srv.url), within=2)
    assert err.condition == "http-error"


def test_html_error_page_with_200(fake, prebind) -> None:
    srv = fake(lambda ctx: ctx.respond(200, HTML, content_type="text/html"))
    err = _expect(ProtocolError, lambda: prebind(srv.url), within=2)
    assert not isinstance(err, ResponseTooLarge)


@pytest.mark.parametrize("status", [502, 503, 404, 500])
def test_html_error_page_with_error_status(fake, prebind, status: int) -> None:
    srv = fake(lambda ctx: ctx.respond(status, HTML, content_type="text/html"))
    err = _expect(ServiceUnavailable, lambda: prebind(srv.url), within=2)
    assert err.condition == f"http-{status}"


def test_error_status_mid_flow_terminates(fake, prebind) -> None:
    srv = fake(at_label("bind", lambda ctx: ctx.respond(502, HTML, content_type="text/html")))
    err = _expect(ServiceUnavailable, lambda: prebind(srv.url), within=3)
    assert err.condition == "http-502"
    assert srv.wait_for_label("terminate"), srv.labels


# ------------------------------------------------------------------------------------------
# time and connections
# ------------------------------------------------------------------------------------------


def test_slow_response_times_out(fake, prebind) -> None:
    def slow(ctx: Exchange) -> None:
        ctx.sleep(TIMEOUT + 4)
        xmpp_ok(ctx)

    srv = fake(slow)
    err = _expect(ServiceUnavailable, lambda: prebind(srv.url, timeout=TIMEOUT), within=TIMEOUT + 1)
    assert err.condition == "timeout"


def test_slow_response_mid_flow_times_out_and_cleanup_is_bounded(fake, prebind) -> None:
    def slow(ctx: Exchange) -> None:
        ctx.sleep(TIMEOUT + 4)
        xmpp_ok(ctx)

    srv = fake(at_label("bind", slow))
    # bind times out (1 s), then the best-effort terminate gets at most min(2, timeout) s
    err = _expect(
        ServiceUnavailable, lambda: prebind(srv.url, timeout=TIMEOUT), within=2 * TIMEOUT + 1
    )
    assert err.condition == "timeout"
    assert srv.wait_for_label("terminate"), srv.labels


@contextlib.contextmanager
def unreachable() -> Iterator[str]:
    """The URL of an endpoint whose connects never complete, as a host that went away without
    a word: a listener that never accepts, its queue (one connection) full, so that the kernel
    drops every SYN."""
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        host, port = listener.getsockname()
        with socket.create_connection((host, port), timeout=2):
            yield f"http://{host}:{port}/http-bind"
    finally:
        listener.close()


def _ending(batch: list[BOSHRequest]) -> Flow[None]:
    with contextlib.suppress(BOSHError):  # (as the flows send a cleanup)
        yield batch


@pytest.mark.parametrize("transport", ["builtin", "httpx", "client="])
@pytest.mark.parametrize("driver", ["sync", "async"])
def test_the_terminates_of_a_half_made_session_take_one_cleanup_timeout(transport, driver) -> None:
    """A session whose auth went unanswered (the server went away) is ended with a terminate
    for each RID the server may expect: best effort, and all of them within one cleanup
    timeout, as the one terminate of a prebind that failed otherwise, not one after another."""
    from bosh_middleware.client import _CLEANUP_TIMEOUT

    proto = PrebindProtocol(CREDS, PrebindOptions(), service_url="http://127.0.0.1/http-bind")
    flow = proto.flow()
    (_create,) = next(flow)
    body = (
        f"<body xmlns='http://jabber.org/protocol/httpbind' sid='s1' wait='59' requests='2'"
        f" hold='1' xmlns:stream='http://etherx.jabber.org/streams'>{FEATURES_PLAIN}</body>"
    )
    (auth,) = flow.send([BOSHResponse(200, body.encode())])
    assert auth.label == "auth"
    ending = proto.abort_requests()  # (what a prebind cancelled now sends)
    assert [r.rid for r in ending] == [auth.rid, auth.rid + 1]
    flow.close()
    with unreachable() as url:
        t0 = time.monotonic()
        # ("client=": the caller's own httpx client, which sends every request)
        kind = "httpx" if transport == "client=" else transport
        if driver == "sync":
            with contextlib.ExitStack() as stack:
                given = {"client": stack.enter_context(httpx.Client())} if kind != transport else {}
                with Prebinder(url, transport=kind, timeout=5.0, **given) as p:
                    p.run(_ending(ending))
        else:

            async def go() -> None:
                async with contextlib.AsyncExitStack() as stack:
                    given = (
                        {"client": await stack.enter_async_context(httpx.AsyncClient())}
                        if kind != transport
                        else {}
                    )
                    async with AsyncPrebinder(url, transport=kind, timeout=5.0, **given) as p:
                        await p.run(_ending(ending))

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(lambda: asyncio.run(go())).result(timeout=30)
        elapsed = time.monotonic() - t0
    assert elapsed < _CLEANUP_TIMEOUT + 0.8, elapsed


def test_trickling_response_is_bounded_by_the_timeout(fake, prebind) -> None:
    def trickle(ctx: Exchange) -> None:
        ctx.head(200, {"Content-Type": "text/xml", "Content-Length": "1000"})
        for _ in range(25):  # one byte every 0.1 s, for up to 2.5 s
            if not ctx.send_raw(b" ") or ctx.server.stopping.is_set():
                return
            ctx.sleep(0.1)

    srv = fake(trickle)
    err = _expect(ServiceUnavailable, lambda: prebind(srv.url, timeout=TIMEOUT), within=TIMEOUT + 1)
    assert err.condition == "timeout"


def trickle_head(ctx: Exchange) -> None:
    """A head one byte every 0.2 s (~10 s for all of it), a body never: no read waits long,
    so only a deadline over the whole exchange ends it."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nX-Pad: " + b"a" * 20 + b"\r\n"
    for byte in head:
        if not ctx.send_raw(bytes([byte])) or ctx.server.stopping.is_set():
            return
        ctx.sleep(0.2)


def test_trickling_response_head_is_bounded_by_the_timeout(fake, prebind) -> None:
    """The head too: httpx's timeouts are per read, and the sync httpx transport had nothing
    else until the head was in (~10 s here, a worker thread held all along)."""
    srv = fake(trickle_head)
    err = _expect(ServiceUnavailable, lambda: prebind(srv.url, timeout=TIMEOUT), within=TIMEOUT + 1)
    assert err.condition == "timeout"


def test_sync_httpx_dns_lookup_is_bounded_by_the_timeout(fake, monkeypatch) -> None:
    """The C resolver takes no timeout, and httpx's sync connect looks the name up in the
    calling thread: a DNS server that does not answer held the page for its own timeouts
    (5 s per try and server). The lookup now goes through the builtin transport's bounded
    resolver, and a name that resolves connects (to each address in turn: "localhost" may
    be ::1 first, where the fake server does not listen)."""
    real = socket.getaddrinfo
    release = threading.Event()

    def getaddrinfo(host: Any, *args: Any) -> Any:
        if len(args) > 4 and args[4] & socket.AI_NUMERICHOST:  # no lookup: only an address
            return real(host, *args)
        if host == "dns-hangs.example":
            release.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "gave up")
        return real(host, *args)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        err = _expect(
            ServiceUnavailable,
            lambda: Prebinder(
                "http://dns-hangs.example:5280/http-bind", transport="httpx", timeout=TIMEOUT
            ).prebind(CREDS),
            within=TIMEOUT + 1,
        )
        assert err.condition == "timeout"
    finally:
        release.set()
    srv = fake()
    with Prebinder(srv.url.replace("127.0.0.1", "localhost"), transport="httpx") as p:
        assert p.prebind(CREDS).sid


def test_sync_httpx_deadlines_are_per_thread(fake) -> None:
    """The sync httpx transport keeps each exchange's deadline where its reads are, on the
    thread that waits (no timer, no thread of its own). 32 worker threads wait on a server that
    trickles its head (timeout 1 s), while 8 others prebind in a loop, with a 5 s timeout,
    against one that answers each create after 0.3 s; all through one shared httpx.Client.
    Every trickle must end at its own deadline, and no deadline may cut a healthy prebind
    short, nor one exchange lift another's. (Only 8: more make FakeBOSH reset an occasional
    httpx connection, with or without a deadline.)"""

    def slow_create(ctx: Exchange) -> None:
        ctx.sleep(0.3)
        xmpp_ok(ctx)

    trickled = fake(trickle_head)
    slowish = fake(at_label("create", slow_create))
    client = httpx.Client()
    stuck = Prebinder(trickled.url, transport="httpx", timeout=TIMEOUT, client=client)
    healthy = Prebinder(slowish.url, transport="httpx", timeout=5.0, client=client)
    until = time.monotonic() + 2.5

    def wait_for_trickle() -> tuple[str | None, float]:
        t0 = time.monotonic()
        try:
            stuck.prebind(CREDS)
        except ServiceUnavailable as exc:
            return exc.condition, time.monotonic() - t0
        return "prebound", time.monotonic() - t0

    def prebind_meanwhile() -> int:
        done = 0
        while time.monotonic() < until:
            assert healthy.prebind(CREDS).jid.startswith("alice@localhost/web-")
            done += 1
        return done

    try:
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            loops = [pool.submit(prebind_meanwhile) for _ in range(8)]
            trickles = [pool.submit(wait_for_trickle) for _ in range(32)]
            ends = [f.result(timeout=30) for f in trickles]
            prebinds = [f.result(timeout=30) for f in loops]
    finally:
        stuck.close()
        healthy.close()
        client.close()
    assert all(condition == "timeout" for condition, _ in ends), ends
    assert max(elapsed for _, elapsed in ends) < TIMEOUT + 1.5, ends
    assert all(prebinds), prebinds  # (each healthy loop got through, past the trickles' end)


def test_connection_dropped_mid_response(fake, prebind) -> None:
    def drop(ctx: Exchange) -> None:
        ctx.head(200, {"Content-Type": "text/xml", "Content-Length": "5000"})
        ctx.send_raw(b"<body xmlns='http://jabber.org/protocol/httpbind' sid='abc'>")
        ctx.hang_up()

    srv = fake(drop)
    err = _expect(ServiceUnavailable, lambda: prebind(srv.url), within=2)
    assert err.condition == "http-error"


def test_connection_closed_without_answer(fake, prebind) -> None:
    srv = fake(lambda ctx: ctx.hang_up())
    err = _expect(ServiceUnavailable, lambda: prebind(srv.url), within=2)
    assert err.condition in ("http-error", "connection-failed")


def test_connection_dropped_mid_flow_terminates(fake, prebind) -> None:
    srv = fake(at_label("bind", lambda ctx: ctx.hang_up()))
    _expect(ServiceUnavailable, lambda: prebind(srv.url), within=3)
    assert srv.wait_for_label("terminate"), srv.labels


def test_connection_refused(prebind) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/http-bind"
    err = _expect(ServiceUnavailable, lambda: prebind(url, timeout=TIMEOUT), within=TIMEOUT + 1)
    assert err.condition == "connection-failed"


# ------------------------------------------------------------------------------------------
# the server says no
# ------------------------------------------------------------------------------------------


def test_terminate_host_unknown(fake, prebind) -> None:
    srv = fake(lambda ctx: ctx.xml(type="terminate", condition="host-unknown"))
    err = _expect(ServiceUnavailable, lambda: prebind(srv.url), within=2)
    assert err.condition == "host-unknown"
    assert srv.labels == ["create"]


def test_sasl_failure_is_authentication_failed(fake, prebind) -> None:
    srv = fake(
        at_label(
            "auth",
            lambda ctx: ctx.xml(
                "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
            ),
        )
    )
    err = _expect(AuthenticationFailed, lambda: prebind(srv.url), within=3)
    assert err.condition == "not-authorized"
    assert srv.wait_for_label("terminate"), srv.labels


def test_no_error_leaks_the_password(fake, prebind) -> None:
    """Whatever goes wrong, the exception text never carries the password."""
    faults = [
        at_label("auth", lambda ctx: ctx.respond(200, ctx.body[:40])),
        at_label("auth", lambda ctx: ctx.respond(500, ctx.body, content_type="text/xml")),
        at_label("auth", lambda ctx: ctx.respond(200, b"<body xmlns='x'>" + ctx.body + b"</body>")),
    ]
    for fault in faults:
        srv = fake(fault)
        with pytest.raises(BOSHError) as info:
            prebind(srv.url)
        text = f"{info.value!r} {info.value} {info.value.condition}"
        assert CREDS.password not in text
        import base64

        assert base64.b64encode(b"\0alice\0" + CREDS.password.encode()).decode() not in text


URL_PASSWORD = "S3cret-url-pw"


def _with_password(url: str) -> str:
    return url.replace("http://", f"http://proxyuser:{URL_PASSWORD}@", 1)


def test_a_password_in_the_service_url_is_never_shown(fake, prebind) -> None:
    """``user:password@`` in the service URL is sent as Basic auth (to a reverse proxy in
    front of the XMPP server); the errors, which name the URL and which the middleware logs at
    WARNING, show it as ``user:***@``."""
    refused = f"http://127.0.0.1:{_closed_port()}/http-bind"
    slow = fake(lambda ctx: ctx.sleep(TIMEOUT + 4)).url
    dropped = fake(at_label("create", lambda ctx: ctx.hang_up())).url
    trickled = fake(trickle_head).url
    for url in (refused, slow, dropped, trickled):
        with pytest.raises(ServiceUnavailable) as info:
            prebind(_with_password(url), timeout=TIMEOUT)
        text = f"{info.value!r} {info.value}"
        assert URL_PASSWORD not in text, text
        assert "proxyuser:***@127.0.0.1" in text, text


def test_a_password_in_the_service_url_is_still_sent(fake, prebind) -> None:
    seen: list[str | None] = []

    def healthy(ctx: Exchange) -> None:
        seen.append(ctx.headers.get("authorization"))
        xmpp_ok(ctx)

    prebind(_with_password(fake(healthy).url))
    expected = "Basic " + base64.b64encode(f"proxyuser:{URL_PASSWORD}".encode()).decode()
    assert seen and set(seen) == {expected}


def test_a_password_in_the_service_url_is_not_logged(fake, prebind, caplog) -> None:
    """Not by the HTTP client either: httpx logs every request's URL at INFO, so it is given
    the URL without the password, and the Basic auth as a header."""
    with caplog.at_level(logging.DEBUG):
        prebind(_with_password(fake().url))
    assert caplog.records, "nothing was logged: the check would prove nothing"
    assert URL_PASSWORD not in caplog.text
    assert all(URL_PASSWORD not in str(r.args) for r in caplog.records)


@pytest.mark.parametrize("transport", ["builtin", "httpx"])
def test_a_password_in_the_service_url_is_not_in_a_repr(transport: str) -> None:
    url = _with_password("http://127.0.0.1:5280/http-bind")
    with Prebinder(url, transport=transport) as sync:
        assert repr(sync) == "<Prebinder http://proxyuser:***@127.0.0.1:5280/http-bind>"
    for obj in (AsyncPrebinder(url, transport=transport), MiddlewareConfig(url, lambda u: None)):
        assert URL_PASSWORD not in repr(obj) and "proxyuser:***@" in repr(obj), repr(obj)


# ------------------------------------------------------------------------------------------
# a session with a request the server holds open is never handed out
# ------------------------------------------------------------------------------------------


def test_held_request_session_is_replaced_by_a_sequential_prebind(fake, prebind) -> None:
    """What Prosody does when the pipelined bind overtakes the restart: it answers features and
    bind result on one request and keeps the other open (hold=1, nothing to say). That request
    would be the "oldest" one the server writes the browser's first answers to, so the engine
    must terminate that session and prebind again, one request at a time."""
    import select

    held = {"done": False}
    bind_answer: dict[str, str] = {}
    bind_arrived = threading.Event()

    def bind_result(ctx: Exchange) -> str:
        iq_id = re.search(rb"<iq id='([^']+)'", ctx.body)
        resource = re.search(rb"<resource>([^<]*)</resource>", ctx.body)
        assert iq_id and resource
        return (
            f"<iq type='result' id='{iq_id.group(1).decode()}' xmlns='jabber:client'>"
            "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<jid>alice@localhost/{resource.group(1).decode()}</jid></bind></iq>"
        )

    def overtaken_once(ctx: Exchange) -> None:
        if held["done"]:
            xmpp_ok(ctx)
            return
        if ctx.label == "bind":
            bind_answer["xml"] = bind_result(ctx)
            bind_arrived.set()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # held: nothing to say, until the client hangs up
                ready, _, _ = select.select([ctx.sock], [], [], 0.01)
                if ready and not ctx.sock.recv(1, socket.MSG_PEEK):
                    return
            return
        if ctx.label == "restart":
            assert bind_arrived.wait(5)
            held["done"] = True
            ctx.xml(
                "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"
                "</stream:features>" + bind_answer["xml"]
            )
            return
        xmpp_ok(ctx)

    srv = fake(overtaken_once)
    session = prebind(srv.url, timeout=5)
    assert session.jid.startswith("alice@localhost/web-")
    assert session.retried
    # create | auth | restart+bind, then terminate; then the redo's quickstart (it knows that
    # PLAIN is offered now; this server does not answer it in the creation response, so that
    # session is ended too); then create | auth | restart | bind, one request at a time
    assert session.round_trips == 3 + 1 + 4
    labels = srv.labels
    first_terminate = labels.index("terminate")
    after = ["create", "terminate", "create", "auth", "restart", "bind"]
    assert labels[first_terminate + 1 :] == after


@pytest.mark.parametrize("transport", ["builtin", "httpx"])
def test_cancelled_async_prebind_closes_its_request_and_ends_the_session(fake, transport) -> None:
    """An ASGI server cancels a prebind whose page no longer waits for it (a deadline, a client
    gone): the request the server holds is closed, promptly, and the half-made session is
    terminated, not left to time out."""
    closed = threading.Event()

    def hold(ctx: Exchange) -> None:
        ctx.sock.settimeout(5.0)
        try:
            if ctx.sock.recv(1) == b"":
                closed.set()
        except OSError:
            pass

    srv = fake(at_label("bind", hold))

    async def go() -> float:
        async with AsyncPrebinder(srv.url, timeout=10.0, transport=transport) as p:
            task = asyncio.ensure_future(p.prebind(CREDS))
            assert await asyncio.to_thread(srv.wait_for_label, "bind"), srv.labels
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        elapsed = pool.submit(lambda: asyncio.run(go())).result(timeout=30)
    assert elapsed < 0.5
    assert closed.wait(3.0), "the held bind request's connection was not closed"
    assert srv.wait_for_label("terminate"), srv.labels
