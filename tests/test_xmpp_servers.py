"""The real-server fixtures themselves work (BOSH answers, SASL mechanisms, loopback only)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from lxml import etree

from support.xmpp_servers import XMPPServer, free_port

NS_BOSH = "http://jabber.org/protocol/httpbind"
NS_STREAM = "http://etherx.jabber.org/streams"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


@dataclass
class Bosh:
    client: httpx.Client
    url: str
    sid: str
    rid: int
    features: etree._Element

    @property
    def mechanisms(self) -> list[str]:
        return [m.text or "" for m in self.features.iter(f"{{{NS_SASL}}}mechanism")]

    def send(self, payload: str = "") -> etree._Element:
        self.rid += 1
        body = f'<body rid="{self.rid}" sid="{self.sid}" xmlns="{NS_BOSH}">{payload}</body>'
        resp = self.client.post(self.url, content=body, headers=_CT)
        resp.raise_for_status()
        return etree.fromstring(resp.content)

    def first_child(self, payload: str) -> etree._Element:
        root = self.send(payload)
        for _ in range(5):
            if len(root):
                return root[0]
            root = self.send()
        raise AssertionError("no answer")

    def terminate(self) -> None:
        self.rid += 1
        body = f'<body rid="{self.rid}" sid="{self.sid}" type="terminate" xmlns="{NS_BOSH}"/>'
        self.client.post(self.url, content=body, headers=_CT)


_CT = {"Content-Type": "text/xml; charset=utf-8"}


def bosh_session(client: httpx.Client, srv: XMPPServer, domain: str) -> Bosh:
    rid = 1000
    body = (
        f'<body content="text/xml; charset=utf-8" hold="1" rid="{rid}" to="{domain}" '
        f'ver="1.6" wait="5" xml:lang="en" xmlns="{NS_BOSH}" '
        'xmlns:xmpp="urn:xmpp:xbosh" xmpp:version="1.0"/>'
    )
    resp = client.post(srv.service_url, content=body, headers=_CT)
    assert resp.status_code == 200, resp.text
    root = etree.fromstring(resp.content)
    assert root.tag == f"{{{NS_BOSH}}}body"
    sid = root.get("sid")
    assert sid, resp.text
    bosh = Bosh(client, srv.service_url, sid, rid, root)
    features = root.find(f"{{{NS_STREAM}}}features")
    while features is None and bosh.rid < rid + 5:  # features may come in a later response
        features = bosh.send().find(f"{{{NS_STREAM}}}features")
    assert features is not None, "no stream features"
    bosh.features = features
    return bosh


def mechanisms(srv: XMPPServer, domain: str | None = None) -> list[str]:
    with httpx.Client(timeout=15) as client:
        bosh = bosh_session(client, srv, domain or srv.domain)
        try:
            return bosh.mechanisms
        finally:
            bosh.terminate()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sasl_login(srv: XMPPServer, jid: str, password: str, mechanism: str) -> bool:
    """PLAIN or SCRAM-SHA-1 over BOSH; True on <success/>."""
    user = jid.split("@")[0]
    with httpx.Client(timeout=15) as client:
        bosh = bosh_session(client, srv, srv.domain)
        try:
            assert mechanism in bosh.mechanisms, bosh.mechanisms
            if mechanism == "PLAIN":
                data = _b64(f"\0{user}\0{password}".encode())
                ans = bosh.first_child(f'<auth xmlns="{NS_SASL}" mechanism="PLAIN">{data}</auth>')
                return ans.tag == f"{{{NS_SASL}}}success"
            assert mechanism == "SCRAM-SHA-1"
            nonce = _b64(os.urandom(18))
            first_bare = f"n={user},r={nonce}"
            ans = bosh.first_child(
                f'<auth xmlns="{NS_SASL}" mechanism="SCRAM-SHA-1">'
                f"{_b64(('n,,' + first_bare).encode())}</auth>"
            )
            assert ans.tag == f"{{{NS_SASL}}}challenge", etree.tostring(ans)
            server_first = base64.b64decode(ans.text or "").decode()
            attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
            salted = hashlib.pbkdf2_hmac(
                "sha1", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
            )
            client_key = hmac.new(salted, b"Client Key", "sha1").digest()
            final_bare = f"c=biws,r={attrs['r']}"
            auth_msg = f"{first_bare},{server_first},{final_bare}".encode()
            sig = hmac.new(hashlib.sha1(client_key).digest(), auth_msg, "sha1").digest()
            proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
            ans = bosh.first_child(
                f'<response xmlns="{NS_SASL}">'
                f"{_b64((final_bare + ',p=' + _b64(proof)).encode())}</response>"
            )
            return ans.tag == f"{{{NS_SASL}}}success"
        finally:
            bosh.terminate()


def listening_addresses(srv: XMPPServer) -> set[str]:
    """Local addresses of every TCP/UDP listener of the server's process group."""
    pgid = srv._proc.pid  # type: ignore[union-attr]
    pids = {
        p.strip()
        for p in subprocess.run(
            ["ps", "-o", "pid=", "-g", str(pgid)], capture_output=True, text=True
        ).stdout.split()
    }
    assert pids
    out = subprocess.run(["ss", "-Hltunp"], capture_output=True, text=True, check=True).stdout
    addrs = set()
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            local = line.split()[4]
            addrs.add(local.rsplit(":", 1)[0])
    return addrs


def other_local_addresses() -> list[str]:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in out if ":" not in a and not a.startswith("127.")]


SERVERS = [
    "prosody",
    "prosody_secure",
    pytest.param("ejabberd", marks=pytest.mark.ejabberd),
]


@pytest.mark.parametrize("name", SERVERS)
def test_bosh_session_creation(name: str, request: pytest.FixtureRequest) -> None:
    srv: XMPPServer = request.getfixturevalue(name)
    assert srv.service_url.startswith("http://127.0.0.1:")
    assert srv.service_url.endswith("/http-bind")
    mechs = mechanisms(srv)
    print(f"{name}: {mechs}")
    assert "SCRAM-SHA-1" in mechs


def test_prosody_insecure_offers_only_scram(prosody: XMPPServer) -> None:
    mechs = mechanisms(prosody)
    assert not prosody.secure
    assert "PLAIN" not in mechs
    assert mechs == ["SCRAM-SHA-1"]


def test_prosody_secure_offers_plain(prosody_secure: XMPPServer) -> None:
    mechs = mechanisms(prosody_secure)
    assert prosody_secure.secure
    assert {"PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"} <= set(mechs)


@pytest.mark.ejabberd
def test_ejabberd_mechanisms(ejabberd: XMPPServer) -> None:
    mechs = mechanisms(ejabberd)
    assert {"PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"} <= set(mechs)


@pytest.mark.parametrize("name", SERVERS)
def test_anonymous_host(name: str, request: pytest.FixtureRequest) -> None:
    srv: XMPPServer = request.getfixturevalue(name)
    assert srv.anon_domain
    assert "ANONYMOUS" in mechanisms(srv, srv.anon_domain)


@pytest.mark.parametrize(
    ("name", "mechanism"),
    [
        ("prosody", "SCRAM-SHA-1"),
        ("prosody_secure", "PLAIN"),
        ("prosody_secure", "SCRAM-SHA-1"),
        pytest.param("ejabberd", "PLAIN", marks=pytest.mark.ejabberd),
        pytest.param("ejabberd", "SCRAM-SHA-1", marks=pytest.mark.ejabberd),
    ],
)
def test_registered_user_can_log_in(
    name: str, mechanism: str, request: pytest.FixtureRequest
) -> None:
    srv: XMPPServer = request.getfixturevalue(name)
    jid, password = srv.new_user("fixture")
    assert jid.endswith("@" + srv.domain)
    assert sasl_login(srv, jid, password, mechanism)
    assert not sasl_login(srv, jid, password + "x", mechanism)
    # re-registering an existing user is fine and sets the new password
    srv.register(jid.split("@")[0], "changed-" + password)
    assert sasl_login(srv, jid, "changed-" + password, mechanism)


@pytest.mark.parametrize("name", SERVERS)
def test_cors_preflight(name: str, request: pytest.FixtureRequest) -> None:
    srv: XMPPServer = request.getfixturevalue(name)
    port = free_port()
    resp = httpx.options(
        srv.service_url,
        headers={
            "Origin": f"http://127.0.0.1:{port}",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert resp.status_code < 300
    assert resp.headers.get("access-control-allow-origin") in ("*", f"http://127.0.0.1:{port}")
    assert "post" in resp.headers.get("access-control-allow-methods", "").lower()
    assert "content-type" in resp.headers.get("access-control-allow-headers", "").lower()


@pytest.mark.parametrize("name", SERVERS)
def test_listens_on_loopback_only(name: str, request: pytest.FixtureRequest) -> None:
    srv: XMPPServer = request.getfixturevalue(name)
    addrs = listening_addresses(srv)
    assert addrs == {"127.0.0.1"}, addrs
    for addr in other_local_addresses():
        with pytest.raises(OSError):
            socket.create_connection((addr, srv.http_port), timeout=2).close()


def test_prosody_factory_stop_start(prosody_factory: Callable[..., XMPPServer]) -> None:
    srv = prosody_factory()
    assert srv.is_running()
    url = srv.service_url
    jid, password = srv.new_user()
    assert sasl_login(srv, jid, password, "SCRAM-SHA-1")

    srv.stop()
    assert not srv.is_running()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)
    assert "Shutting down" in srv.log_text()

    t0 = time.monotonic()
    srv.start()
    assert time.monotonic() - t0 < 15
    assert srv.is_running()
    assert srv.service_url == url
    assert sasl_login(srv, jid, password, "SCRAM-SHA-1")  # data survived the restart


def test_prosody_factory_instances_are_independent(
    prosody_factory: Callable[..., XMPPServer], prosody: XMPPServer
) -> None:
    a = prosody_factory()
    b = prosody_factory(secure=True)
    assert len({a.service_url, b.service_url, prosody.service_url}) == 3
    assert "PLAIN" in mechanisms(b)
    a.stop()
    assert b.is_running() and prosody.is_running()
    assert "SCRAM-SHA-1" in mechanisms(prosody)
