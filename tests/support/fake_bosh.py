"""A fault-injecting fake BOSH endpoint for the robustness tests (tests/test_faults.py).

It is a real HTTP/1.1 server on 127.0.0.1 (threads, in-process) written on raw sockets, so a
test can make it do what a well-behaved server never does: send a DTD, 50 MB, garbage, drop the
connection half-way, answer too slowly, declare a huge Content-Length ...

    with FakeBOSH(fault) as fake:       # fault(ctx) decides how to answer each request
        Prebinder(fake.url).prebind(...)
    fake.requests                        # the bodies it received, in arrival order

A *fault* is ``Callable[[Exchange], None]``: it writes the answer with the ``Exchange`` helpers
(``ctx.xml(...)``, ``ctx.send_raw(...)``, ``ctx.sleep(...)`` ...). ``xmpp_ok`` answers like a
minimal XMPP server (PLAIN, restart, bind), so a fault can be injected mid-flow:
``at_label("bind", fault)``.

Everything is bounded: sockets have timeouts, sleeps end at ``stop()``, handler threads are
joined, and every connection still open is shut down on ``stop()``.
"""

from __future__ import annotations

import contextlib
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Exchange", "FakeBOSH", "at_label", "classify", "forward_to", "xmpp_ok"]

HB = "http://jabber.org/protocol/httpbind"
HANDLER_SOCKET_TIMEOUT = 10.0
MAX_REQUEST = 1024 * 1024


@dataclass
class Exchange:
    """One HTTP request and the means to answer it."""

    server: FakeBOSH
    sock: socket.socket
    index: int  # 0 for the first request the server got
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    sent: int = 0  # bytes of response written so far
    closed: bool = False

    @property
    def label(self) -> str:
        return classify(self.body)

    # -- writing -----------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> bool:
        """Write bytes; False once the client has gone away (then stop writing)."""
        if self.closed:
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True
            return False
        self.sent += len(data)
        return True

    def head(
        self, status: int = 200, headers: dict[str, str] | None = None, reason: str | None = None
    ) -> bool:
        lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Whatever')}"]
        for k, v in {"Connection": "close", **(headers or {})}.items():
            lines.append(f"{k}: {v}")
        return self.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def respond(
        self,
        status: int = 200,
        body: bytes = b"",
        content_type: str = "text/xml; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        h = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        if self.head(status, h):
            self.send_raw(body)

    def xml(self, children: str = "", **attrs: str) -> None:
        """200 with a ``<body/>`` wrapper (``xmpp__version='1.0'`` -> ``xmpp:version``)."""
        a = "".join(f" {k.replace('__', ':')}='{v}'" for k, v in attrs.items())
        self.respond(
            200,
            (
                f"<body xmlns='{HB}' xmlns:stream='http://etherx.jabber.org/streams'"
                f" xmlns:xmpp='urn:xmpp:xbosh'{a}>{children}</body>"
            ).encode(),
        )

    def stream_chunked(self, total: int, chunk_size: int = 64 * 1024, prefix: bytes = b"") -> None:
        """A ``Transfer-Encoding: chunked`` 200 of ``total`` bytes, written until the client
        stops reading (it must: the test checks ``sent``)."""
        if not self.head(200, {"Content-Type": "text/xml", "Transfer-Encoding": "chunked"}):
            return
        filler = b"<a/>" * (chunk_size // 4)
        remaining = total
        first = prefix
        while remaining > 0 and not self.server.stopping.is_set():
            piece = (first + filler)[: min(chunk_size, remaining)]
            first = b""
            if not self.send_raw(b"%x\r\n%s\r\n" % (len(piece), piece)):
                return
            remaining -= len(piece)
        self.send_raw(b"0\r\n\r\n")

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up at ``stop()``."""
        self.server.stopping.wait(seconds)

    def hang_up(self) -> None:
        """Close the connection now (an RST if the client still sends)."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        with contextlib.suppress(OSError):
            self.sock.close()


_REASONS = {
    200: "OK",
    404: "Not Found",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

Fault = Callable[[Exchange], None]


def classify(body: bytes) -> str:
    """What a prebind request is, from its bytes (the labels of protocol.BOSHRequest)."""
    text = body.decode("utf-8", "replace")
    if "sid=" not in text:
        return "create"
    if "type='terminate'" in text or 'type="terminate"' in text:
        return "terminate"
    if "xmpp:restart='true'" in text:
        return "restart"
    if "<auth " in text:
        return "auth"
    if "<response " in text:
        return "auth-response"
    if "urn:ietf:params:xml:ns:xmpp-bind" in text:
        return "bind"
    if "urn:ietf:params:xml:ns:xmpp-session" in text:
        return "session"
    if re.search(r"<body[^>]*/>\s*$", text):
        return "poll"
    return "other"


SID = "fake-sid-0001"
FEATURES = (
    "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
    "<mechanism>PLAIN</mechanism></mechanisms></stream:features>"
)


def xmpp_ok(ctx: Exchange) -> None:
    """Answer like a minimal, healthy XMPP server that offers PLAIN."""
    label = ctx.label
    if label == "create":
        ctx.xml(FEATURES, sid=SID, wait="59", requests="2", inactivity="60", hold="1", ver="1.6")
    elif label == "auth":
        ctx.xml("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    elif label == "restart":
        ctx.xml(
            "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>"
        )
    elif label == "bind":
        iq_id = re.search(rb"<iq id='([^']+)'", ctx.body)
        resource = re.search(rb"<resource>([^<]*)</resource>", ctx.body)
        assert iq_id and resource
        ctx.xml(
            f"<iq type='result' id='{iq_id.group(1).decode()}' xmlns='jabber:client'>"
            "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<jid>alice@localhost/{resource.group(1).decode()}</jid></bind></iq>"
        )
    elif label == "terminate":
        ctx.xml(type="terminate")
    else:
        ctx.xml()


def at_label(label: str, fault: Fault, otherwise: Fault = xmpp_ok) -> Fault:
    """``fault`` for requests of this label, a healthy server for the others."""

    def pick(ctx: Exchange) -> None:
        (fault if ctx.label == label else otherwise)(ctx)

    return pick


def forward_to(
    upstream: str, *, delay: dict[str, float] | None = None, timeout: float = 5.0
) -> Fault:
    """A proxy to a real BOSH endpoint that holds requests of some labels back for a while
    (``delay={"restart": 0.2}``), to make a later request overtake them deterministically.

    Like a real reverse proxy (nginx without ``proxy_ignore_client_abort``), it passes a client's
    hang-up on to the upstream connection, so that the server drops a request the client gave up.
    """
    import select
    from urllib.parse import urlsplit

    delays = delay or {}
    target = urlsplit(upstream)
    host, port = target.hostname or "127.0.0.1", target.port or 80

    def proxy(ctx: Exchange) -> None:
        pause = delays.get(ctx.label)
        if pause:
            ctx.sleep(pause)
        up = socket.create_connection((host, port), timeout=timeout)
        try:
            up.sendall(
                (
                    f"POST {target.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Content-Type: text/xml; charset=utf-8\r\nContent-Length: {len(ctx.body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                + ctx.body
            )
            response = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ready, _, _ = select.select([up, ctx.sock], [], [], 0.005)
                if ctx.sock in ready and not ctx.sock.recv(1, socket.MSG_PEEK):
                    return  # the client hung up: hang up upstream too (finally)
                if up in ready:
                    data = up.recv(65536)
                    if not data:
                        break
                    response += data
            head, _, body = response.partition(b"\r\n\r\n")
            if not head:
                ctx.hang_up()
                return
            status = int(head.split(None, 2)[1])
            ctx.respond(status, body)
        finally:
            up.close()

    return proxy


@dataclass
class _Record:
    index: int
    label: str
    body: bytes
    sent: int = 0
    finished: float | None = None
    error: str | None = None


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class FakeBOSH:
    def __init__(self, fault: Fault = xmpp_ok, *, path: str = "/http-bind") -> None:
        self.fault = fault
        self.path = path
        self.stopping = threading.Event()
        self.records: list[_Record] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._srv: _TCPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FakeBOSH:
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def setup(self) -> None:
                with fake._lock:
                    fake._conns.add(self.request)
                    fake._threads.append(threading.current_thread())

            def handle(self) -> None:
                fake._handle(self.request)

            def finish(self) -> None:
                with fake._lock:
                    fake._conns.discard(self.request)

        self._srv = _TCPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._srv.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="FakeBOSH",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        srv, self._srv = self._srv, None
        if srv is None:
            return
        srv.shutdown()
        srv.server_close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(5)
        alive = [t for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"FakeBOSH: {len(alive)} handler threads did not stop")

    def __enter__(self) -> FakeBOSH:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._srv is not None, "not started"
        return int(self._srv.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    # -- what happened ------------------------------------------------------------------------
    @property
    def requests(self) -> list[bytes]:
        with self._lock:
            return [r.body for r in self.records]

    @property
    def labels(self) -> list[str]:
        with self._lock:
            return [r.label for r in self.records]

    def wait_for_label(self, label: str, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if label in self.labels:
                return True
            time.sleep(0.02)
        return False

    def sent_bytes(self) -> int:
        with self._lock:
            return sum(r.sent for r in self.records)

    # -- one connection -----------------------------------------------------------------------
    def _handle(self, sock: socket.socket) -> None:
        sock.settimeout(HANDLER_SOCKET_TIMEOUT)
        try:
            request = _read_request(sock)
        except (OSError, ValueError):
            return
        if request is None:
            return
        method, path, headers, body = request
        with self._lock:
            rec = _Record(len(self.records), classify(body), body)
            self.records.append(rec)
        ctx = Exchange(self, sock, rec.index, method, path, headers, body)
        try:
            self.fault(ctx)
        except Exception as exc:  # a bug in a fault: make it visible to the test
            rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            rec.sent = ctx.sent
            rec.finished = time.monotonic()
            if not ctx.closed:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                # let the client read what is in flight before the socket goes
                with contextlib.suppress(OSError):
                    sock.settimeout(1.0)
                    while sock.recv(65536):
                        pass

    def errors(self) -> list[str]:
        with self._lock:
            return [r.error for r in self.records if r.error]


def _read_request(sock: socket.socket) -> tuple[str, str, dict[str, str], bytes] | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    if length > MAX_REQUEST:
        raise ValueError("request too large")
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return method, path, headers, rest[:length]
