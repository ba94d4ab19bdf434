"""Hostile and broken BOSH endpoints (support/fake_bosh.py): every fault must end in a clear,
typed exception, quickly, for the sync ``Prebinder`` and the async ``AsyncPrebinder`` alike."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

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
    assert srv.labels[0] == "create" and sorted(srv.labels[1:3]) == ["auth", "restart"]
    assert srv.labels[3:] == ["bind"]


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
    tracemalloc.start()
    try:
        err = _expect(
            ResponseTooLarge, lambda: prebind(srv.url, max_response_size=256 * 1024), within=3
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
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
    # create | auth | restart+bind, then terminate, then create | auth | restart | bind
    assert session.round_trips == 3 + 4
    labels = srv.labels
    first_terminate = labels.index("terminate")
    assert labels[first_terminate + 1] == "create"
    assert labels[first_terminate + 1 :] == ["create", "auth", "restart", "bind"]


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
