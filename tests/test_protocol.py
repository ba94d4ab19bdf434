"""The sans-I/O prebind flow (bosh_middleware.protocol), driven with scripted responses.

``ScriptedServer`` plays a small XEP-0124/0206 server inside the test: it reads every request
the flow yields (it parses the real bytes), checks its RID and SID, and answers like Prosody
would (including an independent server-side SCRAM that verifies the client proof). Knobs change
what it offers and when, so the flow's batching, polling and error handling can be checked
exactly, without any I/O.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lxml import etree

from bosh_middleware import (
    AuthenticationFailed,
    BOSHError,
    Credentials,
    MechanismUnavailable,
    PrebindOptions,
    PrebindSession,
    ProtocolError,
    ServiceUnavailable,
    scram,
)
from bosh_middleware.protocol import (
    BOSHRequest,
    BOSHResponse,
    Derive,
    PrebindProtocol,
    ServiceMemory,
    choose_mechanism,
    initial_rid,
    is_secure_transport,
    probe_flow,
    terminate_flow,
)

HB = "http://jabber.org/protocol/httpbind"
XBOSH = "urn:xmpp:xbosh"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION = "urn:ietf:params:xml:ns:xmpp-session"
STREAMS = "http://etherx.jabber.org/streams"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
LOCAL_URL = "http://127.0.0.1:5280/http-bind"
REMOTE_HTTP = "http://xmpp.example.org/http-bind"
REMOTE_HTTPS = "https://xmpp.example.org/http-bind"

JID = "alice@example.org"
PASSWORD = "s3cret-pencil"
SALT = b"0123456789abcdef"
ITERATIONS = 4096


def _body(children: str = "", **attrs: str) -> bytes:
    a = "".join(f" {k.replace('__', ':')}='{v}'" for k, v in attrs.items())
    return (
        f"<body xmlns='{HB}' xmlns:stream='{STREAMS}' xmlns:xmpp='{XBOSH}'{a}>{children}</body>"
    ).encode()


def _features(mechs: list[str]) -> str:
    inner = "".join(f"<mechanism>{m}</mechanism>" for m in mechs)
    return f"<stream:features><mechanisms xmlns='{SASL}'>{inner}</mechanisms></stream:features>"


class _ScramServer:
    """Server side of SCRAM (RFC 5802), written independently of bosh_middleware.scram."""

    def __init__(self, hash_name: str, password: str) -> None:
        self.h = hash_name
        salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), SALT, ITERATIONS)
        self.client_key = hmac.digest(salted, b"Client Key", hash_name)
        self.stored_key = hashlib.new(hash_name, self.client_key).digest()
        self.server_key = hmac.digest(salted, b"Server Key", hash_name)

    def first(self, client_first: bytes) -> bytes:
        gs2, _, bare = client_first.decode().partition(",,")
        assert gs2 == "n", client_first
        self.client_first_bare = bare
        cnonce = dict(p.split("=", 1) for p in bare.split(","))["r"]
        self.nonce = cnonce + secrets.token_hex(8)
        self.server_first = f"r={self.nonce},s={base64.b64encode(SALT).decode()},i={ITERATIONS}"
        return self.server_first.encode()

    def final(self, client_final: bytes, *, forge: bool = False) -> bytes | None:
        text = client_final.decode()
        without_proof, _, proof_b64 = text.rpartition(",p=")
        assert without_proof == f"c=biws,r={self.nonce}"
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.digest(self.stored_key, auth_message, self.h)
        proof = base64.b64decode(proof_b64)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if hashlib.new(self.h, client_key).digest() != self.stored_key:
            return None
        server_sig = hmac.digest(self.server_key, auth_message, self.h)
        if forge:
            server_sig = bytes(32)[: len(server_sig)]
        return b"v=" + base64.b64encode(server_sig)


@dataclass
class ScriptedServer:
    """A BOSH + XMPP server in miniature, answering the requests a flow yields."""

    mechanisms: list[str] = field(default_factory=lambda: ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"])
    password: str = PASSWORD
    sid: str = "sid-1234"
    requests_attr: int = 2
    features_in_create: bool = True  # else: the first poll brings them
    features_after_restart_in_restart: bool = True
    session_feature: str | None = "optional"  # None | "optional" | "required"
    bound_jid: Callable[[str], str] | None = None  # requested full JID -> bound one
    forge_server_signature: bool = False
    anonymous_jid: str = "abc123@anon.example.org"
    # a SASL message in the creation request (quickstart): answered in the creation response
    # ("answer", as Prosody does), on the next request ("later", as ejabberd does), or never
    create_payload: str = "answer"
    later: bytes | None = None
    # a stanza in the restart request: handled after the restart ("answer", as Prosody does),
    # or dropped ("ignore", as ejabberd does)
    restart_payload: str = "answer"
    # an ordered batch (pipelined on one connection): read in order and answered ("answer",
    # as Prosody does); the SASL outcome only in the second answer ("late": a server that
    # checks the proof in the background); the second answered HTTP 400 ("refuse"); or the
    # driver fails with that condition ("http-error", "timeout")
    pipelined: str = "answer"
    # hooks: label -> BOSHResponse to send instead of the normal answer, or a BOSHError the
    # driver raises (thrown into the flow)
    override: dict[str, BOSHResponse | BOSHError] = field(default_factory=dict)

    batches: list[list[BOSHRequest]] = field(default_factory=list)
    parsed: list[etree._Element] = field(default_factory=list)
    stage: str = "new"
    next_rid: int | None = None
    pending_features: bool = False
    user: str | None = None
    scram: _ScramServer | None = None

    # -- driver ----------------------------------------------------------------------------
    def run(self, flow, *, settle: bool = True):  # type: ignore[no-untyped-def]
        """Drive ``flow`` like client.py does (settles included); return its result."""
        try:
            batch = next(flow)
            while True:
                assert len(self.batches) < 50, "flow does not end"
                if type(batch) is Derive:  # key derivation: done here, as the sync driver does
                    batch.run()
                    batch = flow.send([])
                    continue
                try:
                    answers = self.respond(batch, settle=settle)
                except BOSHError as exc:  # (a driver's failure: a timeout, a reset)
                    batch = flow.throw(exc)
                    continue
                batch = flow.send(answers)
        except StopIteration as stop:
            return stop.value

    def respond(
        self, batch: list[BOSHRequest], *, settle: bool = True
    ) -> list[BOSHResponse | None]:
        """Answer one batch; after an answer that settles it, the rest get ``None`` (they
        reached the server but are never answered, as with a real one)."""
        self.batches.append(batch)
        if batch[0].ordered:
            assert all(r.ordered for r in batch) and batch[0].settles is None
            if self.pipelined != "answer":
                return self._pipelined_oddly(batch)
        responses: list[BOSHResponse | None] = []
        settles = batch[0].settles
        for i, req in enumerate(batch):
            responses.append(self.answer(req))
            if settle and settles is not None and settles([r for r in responses if r is not None]):
                for skipped in batch[i + 1 :]:
                    assert skipped.rid == self.next_rid
                    self.next_rid = skipped.rid + 1
                    responses.append(None)
                break
        return responses

    def _pipelined_oddly(self, batch: list[BOSHRequest]) -> list[BOSHResponse | None]:
        first, second = batch
        if self.pipelined in ("http-error", "timeout"):
            self.next_rid = second.rid + 1  # (sent, whatever became of them)
            raise ServiceUnavailable(f"scripted {self.pipelined}", condition=self.pipelined)
        answered = self.answer(first)
        self.next_rid = second.rid + 1  # (read, but not handled)
        if self.pipelined == "late":
            return [BOSHResponse(200, _body()), answered]
        assert self.pipelined == "refuse", self.pipelined
        return [answered, BOSHResponse(400, b"")]

    @property
    def requests(self) -> list[BOSHRequest]:
        return [r for b in self.batches for r in b]

    def labels(self) -> list[list[str]]:
        return [[r.label for r in b] for b in self.batches]

    # -- server ----------------------------------------------------------------------------
    def answer(self, req: BOSHRequest) -> BOSHResponse:
        root = etree.fromstring(req.body)
        self.parsed.append(root)
        assert root.tag == f"{{{HB}}}body", req.body
        assert int(root.get("rid")) == req.rid
        if req.label == "create" and self.stage != "new":  # a new session, from the start
            assert self.stage == "terminated", "a new session before the last one ended"
            self.stage, self.next_rid, self.scram, self.later = "new", None, None, None
        if req.label == "terminate" and self.next_rid is not None and req.rid != self.next_rid:
            # one of the terminates for a batch left unanswered (``terminate_requests``): as
            # Prosody, a repeated RID changes nothing (its answer is replayed, or held until
            # the session ends), and the session is gone for one after its end
            if req.rid < self.next_rid:
                return BOSHResponse(200, _body())
            assert self.stage == "terminated", f"RID {req.rid} ahead of {self.next_rid}"
            return BOSHResponse(200, _body(type="terminate", condition="item-not-found"))
        if self.next_rid is not None:
            assert req.rid == self.next_rid, f"RID {req.rid} out of order"
        self.next_rid = req.rid + 1
        if req.label in self.override:
            resp = self.override[req.label]
            if isinstance(resp, BOSHError):
                raise resp
            if req.label == "create":  # the session the flow will talk to, if any
                self.stage = "sasl"
                with contextlib.suppress(etree.XMLSyntaxError):
                    root = etree.fromstring(resp.body)
                    self.sid = root.get("sid") or self.sid
                    if root.get("type") == "terminate":
                        self.stage = "terminated"
            return resp
        if self.stage == "new":
            assert root.get("sid") is None
            self.stage = "sasl"
            children = _features(self.mechanisms) if self.features_in_create else ""
            self.pending_features = not self.features_in_create
            if len(root) and self.create_payload != "ignore":
                (auth,) = root
                assert auth.tag == f"{{{SASL}}}auth"
                answered = self._auth(auth)
                inner = re.sub(rb"^<body[^>]*>|</body>$", b"", answered.body).decode()
                if self.create_payload == "answer":
                    children += inner
                else:
                    self.later = inner.encode()
            return BOSHResponse(
                200,
                _body(
                    children,
                    sid=self.sid,
                    wait="59",
                    requests=str(self.requests_attr),
                    inactivity="60",
                    hold="1",
                    ver="1.6",
                ),
            )
        assert root.get("sid") == self.sid, req.body
        if root.get("type") == "terminate":
            self.stage = "terminated"
            return BOSHResponse(200, _body(type="terminate"))
        if root.get(f"{{{XBOSH}}}restart") == "true":
            if self.stage == "failed" and req.ordered:  # pipelined behind a refused proof
                self.stage = "terminated"
                error = f"<stream:error><not-authorized xmlns='{STREAM_ERRORS}'/></stream:error>"
                return BOSHResponse(
                    200, _body(error, type="terminate", condition="remote-stream-error")
                )
            assert self.stage == "authenticated", "restart before SASL success"
            self.stage = "bind"
            feats = f"<bind xmlns='{BIND}'/>"
            if self.session_feature == "optional":
                feats += f"<session xmlns='{SESSION}'><optional/></session>"
            elif self.session_feature == "required":
                feats += f"<session xmlns='{SESSION}'/>"
            children = f"<stream:features>{feats}</stream:features>"
            if len(root) and self.restart_payload == "answer":
                (iq,) = root
                answered = self._iq(iq).body
                children += re.sub(rb"^<body[^>]*>|</body>$", b"", answered).decode()
            return BOSHResponse(200, _body(children))
        children = list(root)
        if not children:  # empty poll
            if self.later is not None:
                later, self.later = self.later, None
                return BOSHResponse(200, _body(later.decode()))
            if self.pending_features:
                self.pending_features = False
                return BOSHResponse(200, _body(_features(self.mechanisms)))
            return BOSHResponse(200, _body())
        (child,) = children
        if child.tag == f"{{{SASL}}}auth":
            return self._auth(child)
        if child.tag == f"{{{SASL}}}response":
            assert self.scram is not None
            final = self.scram.final(
                base64.b64decode(child.text or ""), forge=self.forge_server_signature
            )
            if final is None:
                return self._failure()
            self.stage = "authenticated"
            return BOSHResponse(
                200, _body(f"<success xmlns='{SASL}'>{base64.b64encode(final).decode()}</success>")
            )
        if child.tag == "{jabber:client}iq":
            return self._iq(child)
        raise AssertionError(f"unexpected request {req.body!r}")

    def _failure(self, cond: str = "not-authorized") -> BOSHResponse:
        self.stage = "failed"
        return BOSHResponse(200, _body(f"<failure xmlns='{SASL}'><{cond}/></failure>"))

    def _auth(self, auth: etree._Element) -> BOSHResponse:
        mech = auth.get("mechanism")
        if mech not in self.mechanisms:
            return self._failure("invalid-mechanism")
        payload = base64.b64decode(auth.text or "")
        if mech == "PLAIN":
            _, user, pw = payload.split(b"\0")
            self.user = user.decode()
            if pw.decode() != self.password:
                return self._failure()
            self.stage = "authenticated"
            return BOSHResponse(200, _body(f"<success xmlns='{SASL}'/>"))
        if mech == "ANONYMOUS":
            self.user = self.anonymous_jid.split("@")[0]
            self.stage = "authenticated"
            return BOSHResponse(200, _body(f"<success xmlns='{SASL}'/>"))
        self.scram = _ScramServer(
            {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}[mech],
            self.password,
        )
        first = self.scram.first(payload)
        self.user = re.search(r"n=([^,]*)", payload.decode()).group(1)  # type: ignore[union-attr]
        return BOSHResponse(
            200, _body(f"<challenge xmlns='{SASL}'>{base64.b64encode(first).decode()}</challenge>")
        )

    def _iq(self, iq: etree._Element) -> BOSHResponse:
        iq_id = iq.get("id")
        bind = iq.find(f"{{{BIND}}}bind")
        if bind is not None:
            assert self.stage == "bind"
            resource = bind.findtext(f"{{{BIND}}}resource")
            requested = f"{self.user}@example.org/{resource}"
            jid = self.bound_jid(requested) if self.bound_jid else requested
            jid = jid.replace("&", "&amp;").replace("<", "&lt;")
            self.stage = "bound"
            return BOSHResponse(
                200,
                _body(
                    f"<iq type='result' id='{iq_id}' xmlns='jabber:client'><bind xmlns='{BIND}'><jid>{jid}</jid></bind></iq>"
                ),
            )
        if iq.find(f"{{{SESSION}}}session") is not None:
            assert self.stage == "bound"
            return BOSHResponse(
                200, _body(f"<iq type='result' id='{iq_id}' xmlns='jabber:client'/>")
            )
        raise AssertionError("unexpected iq")


def _proto(creds: Credentials | None = None, url: str = LOCAL_URL, **opts) -> PrebindProtocol:  # type: ignore[no-untyped-def]
    return PrebindProtocol(
        creds or Credentials(JID, PASSWORD), PrebindOptions(**opts), service_url=url
    )


def _prebind(
    server: ScriptedServer, creds: Credentials | None = None, url: str = LOCAL_URL, **opts
) -> PrebindSession:  # type: ignore[no-untyped-def]
    return server.run(_proto(creds, url, **opts).flow())


# ------------------------------------------------------------------------------------------
# The session creation request
# ------------------------------------------------------------------------------------------


def test_create_body_attributes() -> None:
    proto = _proto()
    batch = next(proto.flow())
    assert [r.label for r in batch] == ["create"]
    (req,) = batch
    root = etree.fromstring(req.body)
    assert root.tag == f"{{{HB}}}body"
    assert root.get("to") == "example.org"
    assert root.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"
    assert root.get("ver") == "1.6"
    assert root.get("wait") == "59"
    assert root.get("hold") == "1"
    assert root.get(f"{{{XBOSH}}}version") == "1.0"
    assert root.get("sid") is None and root.get("route") is None
    assert int(root.get("rid")) == req.rid
    assert 2**32 <= req.rid < 2**32 + 2**44
    assert len(root) == 0


def test_create_options_are_used() -> None:
    proto = PrebindProtocol(
        Credentials(JID, PASSWORD),
        PrebindOptions(wait=30, hold=2, lang="de", route="xmpp:example.org:5222"),
        service_url=LOCAL_URL,
        rid=1000,
    )
    (req,) = next(proto.flow())
    root = etree.fromstring(req.body)
    assert (req.rid, root.get("wait"), root.get("hold"), root.get("route")) == (
        1000,
        "30",
        "2",
        "xmpp:example.org:5222",
    )
    assert root.get("{http://www.w3.org/XML/1998/namespace}lang") == "de"


def test_initial_rids_are_random_and_in_range() -> None:
    rids = {initial_rid() for _ in range(2000)}
    assert len(rids) == 2000
    assert all(2**32 <= r < 2**32 + 2**44 for r in rids)
    # spread over the range, not clustered at the bottom
    assert max(rids) - min(rids) > 2**43
    # a JS client can count far beyond them exactly
    assert max(rids) + 10**12 < 2**53


# ------------------------------------------------------------------------------------------
# Batching and round trips
# ------------------------------------------------------------------------------------------


def _check_rids(server: ScriptedServer, session: PrebindSession) -> None:
    rids = [r.rid for r in server.requests]
    assert rids == list(range(rids[0], rids[0] + len(rids))), "RIDs must be consecutive"
    assert session.rid == rids[-1] + 1
    assert session.request_count == len(rids)
    assert session.round_trips == len(server.batches)


def test_plain_three_round_trips() -> None:
    server = ScriptedServer()
    session = _prebind(server, mechanisms=["PLAIN"])
    assert server.labels() == [["create"], ["auth"], ["restart", "bind"]]
    assert session.round_trips == 3 and session.mechanism == "PLAIN"
    assert (
        session.jid.startswith(JID + "/web-") and len(session.jid) == len(JID) + len("/web-") + 12
    )
    assert session.sid == server.sid
    assert (session.wait, session.inactivity, session.requests) == (59, 60, 2)
    _check_rids(server, session)
    # PLAIN carries authzid-less "\0user\0password"
    auth = server.parsed[1][0]
    assert base64.b64decode(auth.text) == b"\0alice\0" + PASSWORD.encode()
    # the restart request is a proper XEP-0206 restart
    restart = server.parsed[2]
    assert restart.get(f"{{{XBOSH}}}restart") == "true"
    assert restart.get("to") == "example.org"


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_four_round_trips(mech: str) -> None:
    server = ScriptedServer(mechanisms=["PLAIN", mech])
    session = _prebind(server)
    assert session.mechanism == mech
    assert server.labels() == [["create"], ["auth"], ["auth-response"], ["restart", "bind"]]
    assert session.round_trips == 4
    _check_rids(server, session)


def test_anonymous_three_round_trips() -> None:
    server = ScriptedServer(mechanisms=["ANONYMOUS"])
    session = _prebind(server, Credentials.anonymous("anon.example.org"))
    assert server.labels() == [["create"], ["auth"], ["restart", "bind"]]
    assert session.mechanism == "ANONYMOUS"
    assert session.jid.startswith("abc123@example.org/web-")
    assert etree.fromstring(server.requests[0].body).get("to") == "anon.example.org"
    _check_rids(server, session)


@pytest.mark.parametrize(
    ("mech", "labels"),
    [
        ("PLAIN", [["create"], ["auth"], ["restart"], ["bind"]]),
        ("SCRAM-SHA-1", [["create"], ["auth"], ["auth-response"], ["restart"], ["bind"]]),
    ],
)
def test_pipeline_off_is_sequential(mech: str, labels: list[list[str]]) -> None:
    server = ScriptedServer()
    session = _prebind(server, mechanisms=[mech], pipeline=False)
    assert server.labels() == labels
    assert session.round_trips == len(labels)
    _check_rids(server, session)


# ------------------------------------------------------------------------------------------
# Quickstart: the first SASL message in the session creation request
# ------------------------------------------------------------------------------------------
def _with_memory(
    memory: ServiceMemory,
    server: ScriptedServer,
    creds: Credentials | None = None,
    url: str = LOCAL_URL,
    **opts,
) -> PrebindSession:  # type: ignore[no-untyped-def]
    proto = PrebindProtocol(
        creds or Credentials(JID, PASSWORD), PrebindOptions(**opts), service_url=url, memory=memory
    )
    return server.run(proto.flow())


def _create_payload(server: ScriptedServer, n: int = 0) -> list[etree._Element]:
    """The children of the ``n``-th creation request."""
    creates = [p for p, r in zip(server.parsed, server.requests) if r.label == "create"]
    return list(creates[n])


@pytest.mark.parametrize(
    ("mech", "labels"),
    [
        ("SCRAM-SHA-1", [["create"], ["auth-response"], ["restart+bind"]]),
        ("SCRAM-SHA-256", [["create"], ["auth-response"], ["restart+bind"]]),
        ("PLAIN", [["create"], ["restart+bind"]]),
    ],
)
def test_quickstart_saves_a_round_trip_once_the_mechanisms_are_known(
    mech: str, labels: list[list[str]]
) -> None:
    memory = ServiceMemory()
    first = ScriptedServer(mechanisms=[mech, "X-OTHER"])
    s1 = _with_memory(memory, first)
    assert len(first.batches) == len(labels) + 1  # learnt here: nothing sent with the create
    assert _create_payload(first) == []
    assert memory.quickstart("example.org") == (mech, "X-OTHER")

    second = ScriptedServer(mechanisms=[mech, "X-OTHER"])
    s2 = _with_memory(memory, second)
    assert second.labels() == labels
    (auth,) = _create_payload(second)
    assert auth.tag == f"{{{SASL}}}auth" and auth.get("mechanism") == mech
    assert s2.round_trips == len(labels) and s2.mechanism == mech and not s2.retried
    assert s2.jid.startswith(JID + "/web-") and s2.jid != s1.jid
    _check_rids(second, s2)
    # the bind went in the restart request's body, after the restart (the server checked it)
    restart = second.parsed[-1]
    assert restart.get(f"{{{XBOSH}}}restart") == "true" and restart.get("to") == "example.org"
    (iq,) = restart
    assert iq.find(f"{{{BIND}}}bind") is not None and second.stage == "bound"
    if mech.startswith("SCRAM"):  # the server checked the proof and the client its signature
        assert second.scram is not None


def test_quickstart_for_anonymous_logins() -> None:
    memory = ServiceMemory()
    creds = Credentials.anonymous("anon.example.org")
    _with_memory(memory, ScriptedServer(mechanisms=["ANONYMOUS"]), creds)
    server = ScriptedServer(mechanisms=["ANONYMOUS"])
    session = _with_memory(memory, server, creds)
    assert server.labels() == [["create"], ["restart+bind"]]
    (auth,) = _create_payload(server)
    assert auth.get("mechanism") == "ANONYMOUS" and not auth.text
    assert session.mechanism == "ANONYMOUS" and session.round_trips == 2


@pytest.mark.parametrize("create_payload", ["later", "ignore"])
def test_quickstart_unanswered_in_the_creation_response_is_turned_off(
    create_payload, caplog: pytest.LogCaptureFixture
) -> None:
    """ejabberd answers the SASL message on the next request; another server may ignore it,
    and a poll for it would be held for ``wait`` seconds. Either way that session is ended,
    the prebind made again the usual way, and quickstart not tried again for the domain."""
    caplog.set_level("INFO", logger="bosh_middleware")
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["SCRAM-SHA-1"])
    server = ScriptedServer(create_payload=create_payload)
    session = _with_memory(memory, server, mechanisms=["SCRAM-SHA-1"])
    assert server.labels() == [
        ["create"],
        ["terminate"],
        ["create"],
        ["auth"],
        ["auth-response"],
        ["restart", "bind"],
    ]
    assert len(_create_payload(server, 0)) == 1 and _create_payload(server, 1) == []
    # (the terminate between the two is not counted, as after a redone pipelined batch)
    assert session.round_trips == 1 + 4 and session.request_count == 1 + 5
    assert not session.retried  # (that is for a pipelined batch gone wrong)
    assert memory.quickstart("example.org") is None
    (said,) = [r.getMessage() for r in caplog.records if "quickstart" in r.getMessage()]
    assert said.startswith("quickstart off for example.org: the creation response did not")
    third = ScriptedServer(create_payload=create_payload)
    assert _with_memory(memory, third, mechanisms=["SCRAM-SHA-1"]).round_trips == 4
    assert _create_payload(third) == []


def test_a_bind_the_restart_request_did_not_answer_ends_quickstart() -> None:
    """A server that answers the creation request's SASL message at once but drops a bind
    sent with the restart: that session (restarted, never bound) is ended, the prebind made
    again the usual way, and quickstart turned off."""
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["PLAIN"])
    server = ScriptedServer(restart_payload="ignore")
    session = _with_memory(memory, server, mechanisms=["PLAIN"])
    assert server.labels() == [
        ["create"],
        ["restart+bind"],
        ["terminate"],
        ["create"],
        ["auth"],
        ["restart", "bind"],
    ]
    assert session.round_trips == 2 + 3 and not session.retried
    assert memory.quickstart("example.org") is None


def test_a_refused_quickstart_creation_request_turns_it_off_if_the_usual_way_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that refuses a creation request with a payload (bad-request) but serves the
    usual one: the prebind is made again the usual way, and quickstart is off from then on."""
    caplog.set_level("INFO", logger="bosh_middleware")
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["PLAIN"])

    class Refusing(ScriptedServer):
        def answer(self, req: BOSHRequest) -> BOSHResponse:
            if req.label == "create" and b"<auth" in req.body:
                return BOSHResponse(200, _body(type="terminate", condition="bad-request"))
            return super().answer(req)

    server = Refusing()
    session = _with_memory(memory, server, mechanisms=["PLAIN"])
    assert server.labels() == [["create"], ["create"], ["auth"], ["restart", "bind"]]
    assert session.mechanism == "PLAIN" and session.round_trips == 1 + 3
    assert memory.quickstart("example.org") is None
    assert any(
        "refused a prebind that carried quickstart's payloads" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize(
    "refusal",
    [
        BOSHResponse(200, _body(type="terminate", condition="policy-violation")),
        BOSHResponse(403, b""),
    ],
    ids=["policy-violation", "http-403"],
)
def test_a_server_refusing_every_session_costs_one_redo_not_one_per_page(
    refusal: BOSHResponse,
) -> None:
    """A server (or a proxy in front of it) that now refuses every creation request, with or
    without a payload (mod_fail2ban's ban of the web server's address, a proxy's 403): the
    quickstart prebind is redone the usual way once, refused the same, and so the payloads
    were not the cause. The next prebinds go the usual way (one request each, not two),
    until one works and learns the mechanisms again; quickstart is back from the one after."""
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["PLAIN"])

    class Refusing(ScriptedServer):
        def answer(self, req: BOSHRequest) -> BOSHResponse:
            assert req.label == "create"  # (no session made: nothing to end)
            return refusal

    for creates in (2, 1, 1):
        server = Refusing()
        with pytest.raises(ServiceUnavailable):
            _with_memory(memory, server, mechanisms=["PLAIN"])
        assert server.labels() == [["create"]] * creates
    back = ScriptedServer()
    assert _with_memory(memory, back, mechanisms=["PLAIN"]).round_trips == 3
    again = ScriptedServer()
    assert _with_memory(memory, again, mechanisms=["PLAIN"]).round_trips == 2


@pytest.mark.parametrize(
    "failure",
    [
        BOSHResponse(200, _body(type="terminate", condition="host-unknown")),
        BOSHResponse(503, b""),
        ServiceUnavailable("timed out", condition="timeout"),
        ServiceUnavailable("reset", condition="connection-failed"),
    ],
    ids=["host-unknown", "http-503", "timeout", "connection-failed"],
)
def test_a_quickstart_creation_request_failing_for_reasons_of_its_own_is_not_redone(
    failure: BOSHResponse | BOSHError,
) -> None:
    """A server that is down, slow or refuses the domain: nothing quickstart caused. The
    failure is raised as it is, at once (a timeout is not doubled by a second try), and
    quickstart stays on for when the server is back."""
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["PLAIN"])
    server = ScriptedServer()
    server.override["create"] = failure
    with pytest.raises(ServiceUnavailable):
        _with_memory(memory, server, mechanisms=["PLAIN"])
    assert server.labels() == [["create"]]
    assert memory.quickstart("example.org") == tuple(ScriptedServer().mechanisms)
    again = ScriptedServer()
    assert _with_memory(memory, again, mechanisms=["PLAIN"]).round_trips == 2


class _RefusesRestartPayload(ScriptedServer):
    """Wants the restart request empty, as XEP-0206 shows it: ``refusal`` answers one with a
    payload; the usual, empty one works."""

    refusal: BOSHResponse | None = None

    def answer(self, req: BOSHRequest) -> BOSHResponse:
        root = etree.fromstring(req.body)
        if root.get(f"{{{XBOSH}}}restart") == "true" and len(root):
            assert self.refusal is not None
            self.parsed.append(root)
            self.next_rid = req.rid + 1
            if b"type='terminate'" in self.refusal.body or self.refusal.status_code != 200:
                self.stage = "terminated"
            return self.refusal
        return super().answer(req)


_STREAM_ERROR = (
    "<stream:error><bad-format xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
)
_BIND_ERROR = (
    "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>"
    "<iq type='error' id='{id}' xmlns='jabber:client'><error type='cancel'>"
    "<not-allowed xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
)


class _BindErrorInRestart(_RefusesRestartPayload):
    """Answers a bind sent with the restart with a bind error (its id echoed)."""

    def answer(self, req: BOSHRequest) -> BOSHResponse:
        iq_id = re.search(rb"<iq id='([^']+)'", req.body)
        if req.label == "restart+bind" and iq_id:
            self.refusal = BOSHResponse(200, _body(_BIND_ERROR.format(id=iq_id[1].decode())))
        return super().answer(req)


@pytest.mark.parametrize(
    "refusal",
    [
        BOSHResponse(200, _body(type="terminate", condition="bad-request")),
        BOSHResponse(400, b""),
        BOSHResponse(200, _body(_STREAM_ERROR)),
        "bind error",
    ],
    ids=["terminate-bad-request", "http-400", "stream-error", "bind-error"],
)
def test_a_server_refusing_the_bind_in_the_restart_request_gets_the_usual_prebind(
    refusal: BOSHResponse | str, caplog: pytest.LogCaptureFixture
) -> None:
    """The bind goes in the restart request only with quickstart. A server that refuses a
    restart request with a payload is prebound again the usual way, and quickstart turned off
    for good once that worked: pages get sessions, not errors."""
    caplog.set_level("INFO", logger="bosh_middleware")
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["PLAIN"])
    for i in range(2):
        if refusal == "bind error":
            server: _RefusesRestartPayload = _BindErrorInRestart()
        else:
            assert isinstance(refusal, BOSHResponse)
            server = _RefusesRestartPayload()
            server.refusal = refusal
        session = _with_memory(memory, server, mechanisms=["PLAIN"])
        assert session.mechanism == "PLAIN" and session.jid.startswith(JID + "/web-")
        if i == 0:
            labels = [r.label for r in server.requests]
            assert labels[:2] == ["create", "restart+bind"] and "create" in labels[2:4]
            assert labels[-2:] == ["restart", "bind"]
        else:  # quickstart is off: the usual prebind at once
            assert server.labels() == [["create"], ["auth"], ["restart", "bind"]]
    assert memory.quickstart("example.org") is None
    (said,) = [r.getMessage() for r in caplog.records if "quickstart off" in r.getMessage()]
    assert "refused a prebind that carried quickstart's payloads" in said


@pytest.mark.parametrize("cond", ["aborted", "malformed-request", "invalid-mechanism"])
def test_an_odd_sasl_failure_in_the_creation_response_gets_the_usual_prebind(cond: str) -> None:
    """A SASL failure that is not about the credentials may be the server refusing SASL before
    its features went out: the usual way is tried, and quickstart turned off once it works."""
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["PLAIN"])

    class Odd(ScriptedServer):
        def answer(self, req: BOSHRequest) -> BOSHResponse:
            resp = super().answer(req)
            if req.label == "create" and b"<auth" in req.body:
                self.stage = "failed"
                fail = f"<failure xmlns='{SASL}'><{cond}/></failure>".encode()
                resp = BOSHResponse(200, re.sub(rb"<success[^>]*/>", fail, resp.body))
            return resp

    server = Odd()
    session = _with_memory(memory, server, mechanisms=["PLAIN"])
    assert session.round_trips == 1 + 3 and session.mechanism == "PLAIN"
    assert memory.quickstart("example.org") is None


def test_a_sasl_failure_in_a_terminating_creation_response_is_one_failed_login() -> None:
    """A server that ends the session with the SASL failure in the same body: an
    authentication failure at once, not a second login (lockouts count attempts)."""
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["PLAIN"])
    server = ScriptedServer()
    server.override["create"] = BOSHResponse(
        200,
        _body(
            f"<failure xmlns='{SASL}'><not-authorized/></failure>",
            type="terminate",
            condition="policy-violation",
        ),
    )
    with pytest.raises(AuthenticationFailed) as info:
        _with_memory(memory, server, mechanisms=["PLAIN"])
    assert info.value.condition == "not-authorized"
    assert server.labels() == [["create"]]


def test_quickstart_with_a_mechanism_no_longer_offered_is_done_again() -> None:
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(mechanisms=["SCRAM-SHA-256"]))
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])  # reconfigured since
    session = _with_memory(memory, server)
    assert server.labels()[:3] == [["create"], ["terminate"], ["create"]]
    assert session.mechanism == "SCRAM-SHA-1" and session.round_trips == 1 + 4
    # what the server offers now is what the next prebind starts with
    assert memory.quickstart("example.org") == ("SCRAM-SHA-1",)
    nxt = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    assert _with_memory(memory, nxt).round_trips == 3
    assert nxt.labels() == [["create"], ["auth-response"], ["restart+bind"]]


def test_quickstart_wrong_password_is_an_auth_failure_and_terminates() -> None:
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["PLAIN"])
    server = ScriptedServer(password="other")
    with pytest.raises(AuthenticationFailed) as info:
        _with_memory(memory, server, mechanisms=["PLAIN"])
    assert info.value.condition == "not-authorized"
    assert server.labels() == [["create"], ["terminate"]]
    assert memory.quickstart("example.org") is not None  # the server did answer at once


def test_quickstart_never_sends_plain_where_plain_is_refused() -> None:
    """The memory says PLAIN, but PLAIN over plain HTTP to another host is refused: the
    creation request carries nothing, and the refusal is what it was without quickstart."""
    memory = ServiceMemory()
    memory.learn("example.org", ("PLAIN",))
    server = ScriptedServer(mechanisms=["PLAIN"])
    with pytest.raises(MechanismUnavailable, match="refused over plain HTTP"):
        _with_memory(memory, server, url=REMOTE_HTTP)
    assert _create_payload(server) == []
    assert b"s3cret" not in b"".join(r.body for r in server.requests)


@pytest.mark.parametrize(
    "server_final",
    [
        "",  # an empty <success/>
        "!!not base64!!",
        base64.b64encode(b"no attributes").decode(),
        base64.b64encode(b"\xff\xfe=1").decode(),  # not UTF-8
    ],
    ids=["empty", "not-base64", "not-attributes", "not-utf8"],
)
def test_quickstart_with_a_garbled_server_final_is_one_login(server_final: str) -> None:
    """A server-final that is no signature at all is as wrong as a forged one: an impostor or
    a broken server, not a server that refused quickstart's payloads, so not a second login."""
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["SCRAM-SHA-1"])
    server = ScriptedServer()
    server.override["auth-response"] = BOSHResponse(
        200, _body(f"<success xmlns='{SASL}'>{server_final}</success>")
    )
    with pytest.raises(ProtocolError) as info:
        _with_memory(memory, server, mechanisms=["SCRAM-SHA-1"])
    assert info.value.condition == "server-signature-mismatch"
    assert server.labels() == [["create"], ["auth-response"], ["terminate"]]


@pytest.mark.parametrize("error", ["invalid-proof", "unknown-user"])
def test_quickstart_whose_server_final_refuses_the_login_is_one_login(error: str) -> None:
    """SCRAM's own refusal (``e=`` in the server-final, RFC 5802) says what ``not-authorized``
    says: the password is wrong, and a second login the usual way would only be refused too."""
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer(), mechanisms=["SCRAM-SHA-1"])
    server = ScriptedServer()
    final = base64.b64encode(f"e={error}".encode()).decode()
    server.override["auth-response"] = BOSHResponse(
        200, _body(f"<success xmlns='{SASL}'>{final}</success>")
    )
    with pytest.raises(AuthenticationFailed) as info:
        _with_memory(memory, server, mechanisms=["SCRAM-SHA-1"])
    assert info.value.condition == error
    assert server.labels() == [["create"], ["auth-response"], ["terminate"]]


def test_quickstart_whose_bound_jid_no_page_can_carry_is_one_login() -> None:
    """A JID with a backtick (a username XEP-0106 does not escape) is the account's: the
    usual way binds it too, so it is refused once, under a condition of its own (the core
    counts it as this user's refusal, not a server failure), not logged in a second time."""
    memory = ServiceMemory()
    _with_memory(memory, ScriptedServer())
    server = ScriptedServer(bound_jid=lambda full: "ali`ce@example.org/" + full.split("/")[-1])
    with pytest.raises(ProtocolError) as info:
        _with_memory(memory, server)
    assert info.value.condition == "unsafe-jid"
    assert server.labels() == [["create"], ["auth-response"], ["restart+bind"], ["terminate"]]


def test_quickstart_off() -> None:
    memory = ServiceMemory()
    for _ in range(2):
        server = ScriptedServer()
        session = _with_memory(memory, server, mechanisms=["SCRAM-SHA-1"], quickstart=False)
        assert _create_payload(server) == [] and session.round_trips == 4
    assert memory.quickstart("example.org") is None  # nothing learnt either


# ------------------------------------------------------------------------------------------
# Pipelining: SCRAM's last step and the restart + bind back to back on one connection
# ------------------------------------------------------------------------------------------
#: A warm SCRAM prebind whose pipelined finish did not work, made again one request at a time.
PIPELINED_THEN_ONE_AT_A_TIME = [
    ["create"],
    ["auth-response", "restart+bind"],
    ["terminate"],
    ["create"],
    ["auth-response"],
    ["restart+bind"],
]


def _pipelining(mech: str = "SCRAM-SHA-1") -> ServiceMemory:
    """A memory that knows the server, on a driver that pipelines."""
    memory = ServiceMemory(pipelining=True)
    memory.learn("example.org", (mech,))
    return memory


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_pipelined_scram_finish_takes_two_round_trips(mech: str) -> None:
    memory = _pipelining(mech)
    server = ScriptedServer(mechanisms=[mech])
    session = _with_memory(memory, server)
    assert server.labels() == [["create"], ["auth-response", "restart+bind"]]
    assert [r.ordered for r in server.requests] == [False, True, True]
    assert session.round_trips == 2 and session.request_count == 3 and not session.retried
    assert session.mechanism == mech and server.stage == "bound"
    assert session.jid.startswith(JID + "/web-")
    _check_rids(server, session)
    assert memory.pipelines("example.org")


def test_pipelining_only_where_the_driver_can_and_pipeline_is_on() -> None:
    for memory, opts in (
        (ServiceMemory(), {}),  # (a driver that cannot: the memory says so)
        (_pipelining(), {"pipeline": False}),
    ):
        memory.learn("example.org", ("SCRAM-SHA-1",))
        server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
        session = _with_memory(memory, server, **opts)
        assert server.labels() == [["create"], ["auth-response"], ["restart+bind"]]
        assert not any(r.ordered for r in server.requests) and session.round_trips == 3


def test_pipelining_needs_quickstart_and_scram() -> None:
    # the first prebind learns (no quickstart yet: nothing pipelined on one connection)
    memory = ServiceMemory(pipelining=True)
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    _with_memory(memory, server)
    assert not any(r.ordered for r in server.requests)
    # PLAIN: its restart + bind is its second request, nothing to pipeline it with
    memory = _pipelining("PLAIN")
    server = ScriptedServer(mechanisms=["PLAIN"])
    session = _with_memory(memory, server)
    assert server.labels() == [["create"], ["restart+bind"]] and session.round_trips == 2


def test_pipelined_finish_with_the_sasl_outcome_late_is_redone_one_at_a_time(caplog) -> None:
    """A server that checks the proof in the background answers the first request before it
    knows: that session is ended, the prebind made again with quickstart, one request at a
    time, and pipelining stays off for the domain."""
    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], pipelined="late")
    with caplog.at_level("INFO", logger="bosh_middleware"):
        session = _with_memory(memory, server)
    assert server.labels() == PIPELINED_THEN_ONE_AT_A_TIME
    assert session.round_trips == 2 + 3 and session.request_count == 3 + 3
    assert not memory.pipelines("example.org") and memory.quickstart("example.org")
    assert "pipelining off for example.org" in caplog.text
    nxt = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    _with_memory(memory, nxt)
    assert nxt.labels() == [["create"], ["auth-response"], ["restart+bind"]]


def test_pipelined_finish_without_the_bind_in_the_restart_answer_is_redone() -> None:
    """A server that drops a bind sent with the restart: pipelining goes off first, then
    quickstart (the bind is dropped without pipelining too), and the usual way works."""
    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], restart_payload="ignore")
    session = _with_memory(memory, server)
    assert server.labels() == [
        *PIPELINED_THEN_ONE_AT_A_TIME,
        ["terminate"],
        ["create"],
        ["auth"],
        ["auth-response"],
        ["restart", "bind"],
    ]
    assert session.jid.startswith(JID + "/web-") and session.round_trips == 2 + 3 + 4
    assert not memory.pipelines("example.org")
    assert memory.quickstart("example.org") is None


@pytest.mark.parametrize(("how", "round_trips"), [("refuse", 5), ("http-error", 4)])
def test_pipelined_finish_refused_is_redone_and_off_once_that_works(
    how: str, round_trips: int
) -> None:
    """An HTTP 400 on the second request (a server that read both as one), or a connection
    that ends between the answers: the session is ended and made again one request at a
    time; pipelining goes off because that worked."""
    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], pipelined=how)
    session = _with_memory(memory, server)
    if how == "refuse":
        assert server.labels() == PIPELINED_THEN_ONE_AT_A_TIME
    else:  # nothing came back: a terminate for each RID the server may expect next
        (ended,) = [b for b in server.batches if b[0].label == "terminate"]
        pair = server.batches[1]
        assert [r.rid for r in ended] == [pair[0].rid, pair[1].rid, pair[1].rid + 1]
        assert all(r.label == "terminate" and r.best_effort for r in ended)
    # (a batch the driver failed is not counted: nothing came back)
    assert session.round_trips == round_trips and session.mechanism == "SCRAM-SHA-1"
    assert not memory.pipelines("example.org") and memory.quickstart("example.org")


def test_pipelined_pair_whose_second_request_a_proxy_dropped_is_ended_with_its_rid() -> None:
    """A proxy that takes one request per connection: the first answer comes, the pipelined
    restart + bind never reaches the server. Its session is ended with the dropped request's
    RID (the server expects it; one RID later it would be held, the cleanup would time out
    and the session live on), and with the next one, for a proxy that did pass it on."""
    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    proto = PrebindProtocol(
        Credentials(JID, PASSWORD), PrebindOptions(), service_url=LOCAL_URL, memory=memory
    )
    flow = proto.flow()
    batch = flow.send(server.respond(next(flow)))
    assert [r.label for r in batch] == ["auth-response", "restart+bind"]
    first = server.answer(batch[0])  # (the second is dropped: the server never sees it)
    error = ServiceUnavailable("connection closed", condition="http-error")
    error.answers = ((first.status_code, first.body),)
    ended = flow.throw(error)
    assert [r.label for r in ended] == ["terminate", "terminate"]
    assert [r.rid for r in ended] == [batch[1].rid, batch[1].rid + 1]
    server.respond(ended)
    assert server.stage == "terminated"
    flow.close()


def test_pipelined_finish_refused_then_a_timeout_leaves_pipelining_on() -> None:
    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], pipelined="refuse")
    server.override["restart+bind"] = ServiceUnavailable("slow", condition="timeout")
    with pytest.raises(ServiceUnavailable, match="slow"):
        _with_memory(memory, server)
    assert memory.pipelines("example.org")  # nothing said it was the pipelining
    # (the restart + bind went unanswered: a terminate with its RID, and one with the next)
    assert server.labels()[-4:] == [
        ["create"],
        ["auth-response"],
        ["restart+bind"],
        ["terminate", "terminate"],
    ]


def test_pipelined_finish_timing_out_is_raised_once_and_turns_pipelining_off() -> None:
    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], pipelined="timeout")
    with pytest.raises(ServiceUnavailable) as info:
        _with_memory(memory, server)
    assert info.value.condition == "timeout"
    # not tried again (a timeout is not doubled), but no more pipelined requests to stall;
    # the session is ended whatever the server got of the pair
    assert server.labels() == [
        ["create"],
        ["auth-response", "restart+bind"],
        ["terminate", "terminate", "terminate"],
    ]
    assert server.stage == "terminated"
    assert not memory.pipelines("example.org") and memory.quickstart("example.org")


def test_pipelined_finish_with_a_wrong_password_is_one_auth_failure() -> None:
    """The SASL failure in the first answer is what the prebind raises, not the stream error
    the server gave the restart pipelined behind it; once, and pipelining stays on."""
    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], password="other")
    with pytest.raises(AuthenticationFailed) as info:
        _with_memory(memory, server)
    assert info.value.condition == "not-authorized"
    assert server.labels() == [["create"], ["auth-response", "restart+bind"], ["terminate"]]
    assert memory.pipelines("example.org") and memory.quickstart("example.org")


def test_pipelined_finish_with_a_forged_server_signature_is_not_handed_out() -> None:
    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], forge_server_signature=True)
    with pytest.raises(ProtocolError) as info:
        _with_memory(memory, server)
    assert info.value.condition == "server-signature-mismatch"
    # the bind went ahead of the check, but the session is ended, and not tried again
    assert server.labels() == [["create"], ["auth-response", "restart+bind"], ["terminate"]]


def test_pipelined_finish_with_the_bind_refused_is_redone_the_usual_way() -> None:
    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    calls = _refusing_binds(server, 1)
    session = _with_memory(memory, server)
    # the bind's own answer, after the SASL success: not pipelining's doing (pipelining is not
    # blamed); redone as the unpipelined quickstart's bind error is, the usual way, once
    assert server.labels() == [
        ["create"],
        ["auth-response", "restart+bind"],
        ["terminate"],
        ["create"],
        ["auth"],
        ["auth-response"],
        ["restart", "bind"],
    ]
    assert session.jid.startswith(JID + "/web-") and len(calls) == 2
    assert memory.pipelines("example.org")


def test_late_sasl_failure_in_the_second_answer_is_one_auth_failure() -> None:
    """A server that answers the first pipelined request before it has checked the proof
    (the 'late' server): its SASL failure comes in the second answer. A
    wrong password must still cost one SASL attempt, not two."""

    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], pipelined="late", password="other")
    with pytest.raises(AuthenticationFailed) as info:
        _with_memory(memory, server)
    assert info.value.condition == "not-authorized"
    labels = [label for batch in server.labels() for label in batch]
    assert labels.count("auth-response") == 1, server.labels()


def _refusing_binds(server: ScriptedServer, times: int) -> list[str | None]:
    """The first ``times`` binds the server gets are refused (resource-constraint); the ids of
    every bind it gets."""
    refused = (
        "<iq type='error' id='{id}' xmlns='jabber:client'><error type='wait'>"
        "<resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
    )
    real_iq = server._iq
    calls: list[str | None] = []

    def iq(iq_el: etree._Element) -> BOSHResponse:
        calls.append(iq_el.get("id"))
        if len(calls) <= times:
            return BOSHResponse(200, _body(refused.format(id=iq_el.get("id"))))
        return real_iq(iq_el)

    server._iq = iq  # type: ignore[method-assign]
    return calls


def test_a_bind_refused_every_time_costs_no_more_logins_than_without_pipelining() -> None:
    """A bind error (resource-constraint: the account has too many resources) is the
    server's answer to the bind, handled after the restart, in order: not a pipelining
    failure. Without pipelining, the quickstart prebind is redone the usual way once (2
    logins); with it, 3."""

    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    _refusing_binds(server, 99)
    with pytest.raises(ProtocolError) as info:
        _with_memory(memory, server)
    assert info.value.condition == "resource-constraint"
    labels = [label for batch in server.labels() for label in batch]
    assert labels.count("auth-response") <= 2, server.labels()


def test_one_users_transient_bind_error_does_not_turn_pipelining_off_for_the_domain() -> None:

    memory = _pipelining()
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    _refusing_binds(server, 1)
    _with_memory(memory, server)
    assert memory.pipelines("example.org")


def test_service_memory_pipelining_is_per_domain_and_bounded() -> None:
    memory = ServiceMemory(pipelining=True)
    memory.stop_pipelining("b.example", "test")
    assert memory.pipelines("a.example") and not memory.pipelines("b.example")
    for i in range(ServiceMemory.MAX_DOMAINS + 5):
        memory.stop_pipelining(f"e{i}.example", "test")
    assert len(memory._unpipelined) <= ServiceMemory.MAX_DOMAINS
    assert not ServiceMemory().pipelines("a.example")


def test_service_memory_is_per_domain_and_bounded() -> None:
    memory = ServiceMemory()
    memory.learn("a.example", ("PLAIN",))
    memory.learn("b.example", ("SCRAM-SHA-1",))
    memory.turn_off("b.example", "test")
    assert memory.quickstart("a.example") == ("PLAIN",)
    assert memory.quickstart("b.example") is None
    assert memory.quickstart("c.example") is None
    for i in range(ServiceMemory.MAX_DOMAINS + 5):
        memory.learn(f"d{i}.example", ("PLAIN",))
        memory.turn_off(f"e{i}.example", "test")
    assert len(memory._offered) <= ServiceMemory.MAX_DOMAINS
    assert len(memory._off) <= ServiceMemory.MAX_DOMAINS


class _Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_quickstart_off_is_tried_again_later_and_back_on_once_it_works(caplog) -> None:
    """Off for RETRY_AFTER, then one prebind tries again; a failed try doubles the period; a
    try that works puts quickstart back on. Other prebinds keep it off while one tries."""
    caplog.set_level("INFO", logger="bosh_middleware")
    clock = _Clock()
    memory = ServiceMemory(clock=clock)
    memory.learn("example.org", ("SCRAM-SHA-1",))
    later = ScriptedServer(mechanisms=["SCRAM-SHA-1"], create_payload="later")  # as ejabberd
    _with_memory(memory, later)
    assert memory.quickstart("example.org") is None
    assert "(tried again in 600 s)" in caplog.text

    clock.now += ServiceMemory.RETRY_AFTER - 1  # still off: the usual way, nothing tried
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], create_payload="later")
    _with_memory(memory, server)
    assert _create_payload(server) == []

    clock.now += 1  # one prebind tries it again (and fails: off twice as long)
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], create_payload="later")
    _with_memory(memory, server)
    assert _create_payload(server) != [] and server.labels()[1] == ["terminate"]
    assert "quickstart: trying it again for example.org" in caplog.text
    assert "(tried again in 1200 s)" in caplog.text
    clock.now += 2 * ServiceMemory.RETRY_AFTER - 1
    assert memory.quickstart("example.org") is None

    clock.now += 1  # the server was changed meanwhile: the try works, quickstart is back
    assert memory.quickstart("example.org") == ("SCRAM-SHA-1",)  # (this one tries)
    assert memory.quickstart("example.org") is None  # others wait for its outcome
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    clock.now += 1
    _with_memory(memory, server)  # (its period is not over yet, but a try is on)
    assert _create_payload(server) == []
    clock.now += 2 * ServiceMemory.RETRY_AFTER  # the next try works
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    session = _with_memory(memory, server)
    assert _create_payload(server) != [] and session.round_trips == 3
    assert "quickstart back on for example.org" in caplog.text
    assert memory.quickstart("example.org") == ("SCRAM-SHA-1",)


def test_pipelining_off_is_tried_again_later_and_back_on_once_it_works(caplog) -> None:
    caplog.set_level("INFO", logger="bosh_middleware")
    clock = _Clock()
    memory = ServiceMemory(pipelining=True, clock=clock)
    memory.learn("example.org", ("SCRAM-SHA-1",))
    with pytest.raises(ServiceUnavailable):  # one timeout turns it off (a stalling proxy)
        _with_memory(memory, ScriptedServer(mechanisms=["SCRAM-SHA-1"], pipelined="timeout"))
    assert not memory.pipelines("example.org")
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    assert _with_memory(memory, server).round_trips == 3  # one request at a time

    clock.now += ServiceMemory.RETRY_AFTER  # tried again, and it times out again
    with pytest.raises(ServiceUnavailable):
        _with_memory(memory, ScriptedServer(mechanisms=["SCRAM-SHA-1"], pipelined="timeout"))
    assert "pipelining: trying it again for example.org" in caplog.text
    assert "(tried again in 1200 s)" in caplog.text
    clock.now += ServiceMemory.RETRY_AFTER
    assert not memory.pipelines("example.org")

    clock.now += ServiceMemory.RETRY_AFTER  # the proxy is gone: back on, two round trips
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    session = _with_memory(memory, server)
    assert session.round_trips == 2 and [r.ordered for r in server.requests] == [
        False,
        True,
        True,
    ]
    assert "pipelining back on for example.org" in caplog.text
    assert memory.pipelines("example.org") and memory.pipelines("example.org")


def test_a_feature_a_server_never_takes_is_tried_seven_times_in_the_first_day() -> None:
    """What the README and ServiceMemory's docstring say: tries 10, 30, 70, 150, 310, 630 and
    1270 minutes after the first failure, then one a day."""
    clock = _Clock()
    start = clock.now
    memory = ServiceMemory(clock=clock)
    memory.learn("example.org", ("PLAIN",))
    memory.turn_off("example.org", "a test")
    tries = []
    while clock.now < start + 2 * ServiceMemory.RETRY_MAX:
        clock.now += 60
        if memory.quickstart("example.org") is not None:
            tries.append(round((clock.now - start) / 60))
            memory.turn_off("example.org", "failed again")
    assert tries == [10, 30, 70, 150, 310, 630, 1270, 2550]


def test_a_quickstart_try_whose_pipelined_finish_fails_is_redone_with_quickstart() -> None:
    """The prebind that tries quickstart again also pipelines (a proxy that refuses that is
    in front): its redo, one request at a time, is with quickstart, as it is when quickstart
    was never off, and the try, which worked, puts quickstart back on. (Asked again, the
    memory would say "off": this very prebind is the one trying it.)"""
    clock = _Clock()
    memory = ServiceMemory(pipelining=True, clock=clock)
    memory.learn("example.org", ("SCRAM-SHA-1",))
    memory.turn_off("example.org", "a test")
    clock.now += ServiceMemory.RETRY_AFTER
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"], pipelined="refuse")
    session = _with_memory(memory, server)
    assert server.labels() == PIPELINED_THEN_ONE_AT_A_TIME
    assert session.round_trips == 2 + 3
    assert memory.quickstart("example.org") == ("SCRAM-SHA-1",)  # back on
    assert not memory.pipelines("example.org")  # (what the proxy refused stays off)


def test_only_a_try_puts_a_feature_back_on_and_reports_of_one_failure_count_once() -> None:
    """Prebinds under way together when pipelining went off report the same failure, or
    succeed: neither changes the period. Each failed try doubles it, up to RETRY_MAX."""
    clock = _Clock()
    memory = ServiceMemory(pipelining=True, clock=clock)
    memory.stop_pipelining("example.org", "first")
    memory.stop_pipelining("example.org", "the same failure, from a prebind under way")
    memory.worked("example.org", pipelined=True)  # one that was under way and worked
    assert memory._unpipelined["example.org"].period == ServiceMemory.RETRY_AFTER
    assert not memory.pipelines("example.org")
    periods = []
    for _ in range(12):
        clock.now = memory._unpipelined["example.org"].until
        assert memory.pipelines("example.org")  # the try
        memory.stop_pipelining("example.org", "failed again")
        periods.append(memory._unpipelined["example.org"].period)
    assert periods[:3] == [1200.0, 2400.0, 4800.0]
    assert max(periods) == periods[-1] == ServiceMemory.RETRY_MAX
    # quickstart's entries are apart from pipelining's
    assert memory.quickstart("example.org") is None  # (nothing learnt: not because it is off)
    memory.learn("example.org", ("SCRAM-SHA-1",))
    assert memory.quickstart("example.org") == ("SCRAM-SHA-1",)


def test_server_window_of_one_is_respected() -> None:
    server = ScriptedServer(requests_attr=1)
    session = _prebind(server, mechanisms=["PLAIN"])
    assert all(len(b) == 1 for b in server.batches)
    assert session.round_trips == 4
    _check_rids(server, session)


def test_features_arriving_later_are_polled_for() -> None:
    server = ScriptedServer(features_in_create=False)
    session = _prebind(server, mechanisms=["PLAIN"])
    assert server.labels() == [["create"], ["poll"], ["auth"], ["restart", "bind"]]
    poll = server.parsed[1]
    assert len(poll) == 0 and poll.get("sid") == server.sid  # an empty request
    assert session.round_trips == 4 and session.polls == 1
    _check_rids(server, session)


def test_features_that_never_come_end_in_protocol_error_and_terminate() -> None:
    server = ScriptedServer(features_in_create=False)
    server.override["poll"] = BOSHResponse(200, _body())  # empty, forever
    with pytest.raises(ProtocolError, match="stream features"):
        _prebind(server, max_polls=3)
    assert server.labels() == [["create"], ["poll"], ["poll"], ["poll"], ["terminate"]]


def test_legacy_session_sent_only_when_required() -> None:
    optional = ScriptedServer(session_feature="optional")
    _prebind(optional, mechanisms=["PLAIN"])
    absent = ScriptedServer(session_feature=None)
    _prebind(absent, mechanisms=["PLAIN"])
    for server in (optional, absent):
        assert server.labels() == [["create"], ["auth"], ["restart", "bind"]]

    required = ScriptedServer(session_feature="required")
    session = _prebind(required, mechanisms=["PLAIN"])
    assert required.labels() == [["create"], ["auth"], ["restart", "bind"], ["session"]]
    assert required.parsed[-1][0].find(f"{{{SESSION}}}session") is not None
    assert session.round_trips == 4
    _check_rids(required, session)


def test_bound_jid_comes_from_the_server() -> None:
    server = ScriptedServer(bound_jid=lambda requested: "Alice@Example.ORG/server-chose-this")
    session = _prebind(server, Credentials(JID, PASSWORD, resource="mine"))
    requested = server.parsed[-1].find(f".//{{{BIND}}}resource").text
    assert requested == "mine"
    assert session.jid == "Alice@Example.ORG/server-chose-this"


def test_every_prebind_gets_a_fresh_resource() -> None:
    jids = {_prebind(ScriptedServer()).jid for _ in range(5)}
    assert len(jids) == 5
    assert all(re.fullmatch(r"alice@example\.org/web-[0-9a-f]{12}", j) for j in jids)
    pfx = _prebind(ScriptedServer(), resource_prefix="tab").jid
    assert re.fullmatch(r"alice@example\.org/tab-[0-9a-f]{12}", pfx)


def test_a_pinned_resource_is_bound_as_given() -> None:
    server = ScriptedServer()
    session = _prebind(server, Credentials(JID, PASSWORD, resource="phone/1\\x@y"))
    assert session.jid == "alice@example.org/phone/1\\x@y"


@pytest.mark.parametrize("resource", ["a<b", "a&b", "a'b", 'a"b', "a b", "a=b", "a`b", ""])
def test_a_resource_the_page_could_not_carry_is_refused(resource: str) -> None:
    """The bound JID goes into the page: what could not go there is refused up front, as the
    bound JID would be (``page_safe_jid``)."""
    with pytest.raises(ValueError, match="resource"):
        Credentials(JID, PASSWORD, resource=resource)


@pytest.mark.parametrize("prefix", ["a<b", "a'b", "a b", "a=b"])
def test_a_resource_prefix_the_page_could_not_carry_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match=r"resource_prefix .* no page could carry it"):
        PrebindOptions(resource_prefix=prefix)
    PrebindOptions(resource_prefix="phone.tab_1")  # (what is safe is taken)


# ------------------------------------------------------------------------------------------
# Mechanism choice
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (["PLAIN", "SCRAM-SHA-1"], "SCRAM-SHA-1"),
        (["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"], "SCRAM-SHA-256"),
        (["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"], "SCRAM-SHA-512"),
        (["PLAIN"], "PLAIN"),
        (["plain", "scram-sha-1"], "SCRAM-SHA-1"),
        (["DIGEST-MD5", "PLAIN", "X-OAUTH2"], "PLAIN"),
    ],
)
def test_strongest_offered_mechanism_is_chosen(offered: list[str], expected: str) -> None:
    creds = Credentials(JID, PASSWORD)
    assert choose_mechanism(offered, creds, PrebindOptions(), secure=True) == expected
    server = ScriptedServer(mechanisms=[m.upper() for m in offered])
    assert _prebind(server).mechanism == expected


def test_mechanism_preference_option() -> None:
    server = ScriptedServer(mechanisms=["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"])
    session = _prebind(server, mechanisms=["SCRAM-SHA-1", "SCRAM-SHA-256"])
    assert session.mechanism == "SCRAM-SHA-1"
    assert server.parsed[1][0].get("mechanism") == "SCRAM-SHA-1"
    server = ScriptedServer(mechanisms=["PLAIN", "SCRAM-SHA-1"])
    assert _prebind(server, mechanisms=["SCRAM-SHA-512", "PLAIN"]).mechanism == "PLAIN"

    # nothing allowed is offered: MechanismUnavailable, and the session is terminated
    server = ScriptedServer(mechanisms=["PLAIN"])
    with pytest.raises(MechanismUnavailable) as info:
        _prebind(server, mechanisms=["SCRAM-SHA-256"])
    assert info.value.condition == "invalid-mechanism"
    assert server.labels() == [["create"], ["terminate"]]


def test_anonymous_needs_anonymous_offered() -> None:
    server = ScriptedServer(mechanisms=["PLAIN", "SCRAM-SHA-1"])
    with pytest.raises(MechanismUnavailable):
        _prebind(server, Credentials.anonymous("example.org"))
    # and a password login never picks ANONYMOUS
    with pytest.raises(MechanismUnavailable):
        _prebind(ScriptedServer(mechanisms=["ANONYMOUS"]))


@pytest.mark.parametrize(
    ("url", "secure"),
    [
        ("http://127.0.0.1:5280/http-bind", True),
        ("http://127.9.9.9/http-bind", True),
        ("http://[::1]:5280/http-bind", True),
        ("http://localhost/http-bind", True),
        ("http://xmpp.localhost/http-bind", True),
        ("https://xmpp.example.org/http-bind", True),
        ("http://xmpp.example.org/http-bind", False),
        ("http://10.0.0.1/http-bind", False),
        ("http://localhost.example.org/http-bind", False),
    ],
)
def test_secure_transport(url: str, secure: bool) -> None:
    assert is_secure_transport(url) is secure


def test_plain_refused_over_remote_http() -> None:
    server = ScriptedServer(mechanisms=["PLAIN"])
    with pytest.raises(MechanismUnavailable, match="allow_insecure_plain") as info:
        _prebind(server, url=REMOTE_HTTP)
    assert info.value.condition == "invalid-mechanism"
    assert isinstance(info.value, AuthenticationFailed)
    # the password was never sent
    assert all(PASSWORD.encode() not in r.body and b"auth" not in r.body for r in server.requests)
    assert server.labels() == [["create"], ["terminate"]]

    # with SCRAM offered too, it simply uses SCRAM
    assert (
        _prebind(ScriptedServer(mechanisms=["PLAIN", "SCRAM-SHA-1"]), url=REMOTE_HTTP).mechanism
        == "SCRAM-SHA-1"
    )
    # allowed explicitly, over https, and to loopback
    assert (
        _prebind(
            ScriptedServer(mechanisms=["PLAIN"]), url=REMOTE_HTTP, allow_insecure_plain=True
        ).mechanism
        == "PLAIN"
    )
    assert _prebind(ScriptedServer(mechanisms=["PLAIN"]), url=REMOTE_HTTPS).mechanism == "PLAIN"
    assert _prebind(ScriptedServer(mechanisms=["PLAIN"]), url=LOCAL_URL).mechanism == "PLAIN"


# ------------------------------------------------------------------------------------------
# Failures
# ------------------------------------------------------------------------------------------


def _assert_terminated_last(server: ScriptedServer) -> None:
    last = server.batches[-1]
    assert [r.label for r in last] == ["terminate"]
    (req,) = last
    root = etree.fromstring(req.body)
    assert root.get("type") == "terminate" and root.get("sid") == server.sid
    assert req.best_effort
    rids = [r.rid for r in server.requests]
    assert rids == list(range(rids[0], rids[0] + len(rids)))


def test_wrong_password_plain() -> None:
    server = ScriptedServer(password="other")
    with pytest.raises(AuthenticationFailed) as info:
        _prebind(server, mechanisms=["PLAIN"])
    assert info.value.condition == "not-authorized"
    assert type(info.value) is AuthenticationFailed
    # the last SASL step travels alone: nothing was sent after the failure but the terminate
    assert server.labels() == [["create"], ["auth"], ["terminate"]]
    _assert_terminated_last(server)


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_wrong_password_scram(mech: str) -> None:
    server = ScriptedServer(password="other", mechanisms=[mech])
    with pytest.raises(AuthenticationFailed) as info:
        _prebind(server)
    assert info.value.condition == "not-authorized"
    assert server.labels() == [["create"], ["auth"], ["auth-response"], ["terminate"]]
    _assert_terminated_last(server)


def test_failure_condition_is_reported() -> None:
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    server.override["auth"] = BOSHResponse(
        200, _body(f"<failure xmlns='{SASL}'><account-disabled/><text>banned</text></failure>")
    )
    with pytest.raises(AuthenticationFailed) as info:
        _prebind(server)
    assert info.value.condition == "account-disabled"
    _assert_terminated_last(server)


def test_forged_server_signature_fails_and_terminates() -> None:
    server = ScriptedServer(mechanisms=["SCRAM-SHA-256"], forge_server_signature=True)
    with pytest.raises(ProtocolError) as info:
        _prebind(server)
    assert info.value.condition == "server-signature-mismatch"
    _assert_terminated_last(server)


def test_scram_without_challenge_is_a_protocol_error() -> None:
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    server.override["auth"] = BOSHResponse(200, _body(f"<success xmlns='{SASL}'/>"))
    with pytest.raises(ProtocolError, match="challenge"):
        _prebind(server)
    _assert_terminated_last(server)


def test_bind_error() -> None:
    server = ScriptedServer()
    server.override["bind"] = BOSHResponse(
        200, _body("<iq type='error' id='x' xmlns='jabber:client'/>")
    )
    # an error with another id is not the bind result: the flow keeps polling, then gives up
    server.override["poll"] = BOSHResponse(200, _body())
    with pytest.raises(ProtocolError, match="bind result"):
        _prebind(server, max_polls=2)
    _assert_terminated_last(server)


def test_bind_error_with_matching_id() -> None:
    server = ScriptedServer(mechanisms=["PLAIN"])
    orig = server._iq

    def failing_bind(iq: etree._Element) -> BOSHResponse:
        if iq.find(f"{{{BIND}}}bind") is not None:
            return BOSHResponse(
                200,
                _body(
                    f"<iq type='error' id='{iq.get('id')}' xmlns='jabber:client'><error type='cancel'>"
                    "<not-allowed xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
                ),
            )
        return orig(iq)

    server._iq = failing_bind  # type: ignore[method-assign]
    with pytest.raises(ProtocolError) as info:
        _prebind(server)
    assert info.value.condition == "not-allowed"
    _assert_terminated_last(server)


@pytest.mark.parametrize("status", [404, 500, 502, 503])
def test_http_status_on_create(status: int) -> None:
    server = ScriptedServer()
    server.override["create"] = BOSHResponse(status, b"<html>nope</html>")
    with pytest.raises(ServiceUnavailable) as info:
        _prebind(server)
    assert info.value.condition == f"http-{status}"
    assert server.labels() == [["create"]]  # no session, nothing to terminate


def test_http_status_mid_flow_terminates() -> None:
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    server.override["auth"] = BOSHResponse(503, b"")
    with pytest.raises(ServiceUnavailable) as info:
        _prebind(server)
    assert info.value.condition == "http-503"
    _assert_terminated_last(server)


@pytest.mark.parametrize("cond", ["host-unknown", "remote-connection-failed", "system-shutdown"])
def test_terminate_on_create(cond: str) -> None:
    server = ScriptedServer()
    server.override["create"] = BOSHResponse(200, _body(type="terminate", condition=cond))
    with pytest.raises(ServiceUnavailable) as info:
        _prebind(server)
    assert info.value.condition == cond
    assert server.labels() == [["create"]]


def test_terminate_mid_flow_is_not_terminated_again() -> None:
    server = ScriptedServer(mechanisms=["PLAIN"])
    server.override["bind"] = BOSHResponse(200, _body(type="terminate", condition="item-not-found"))
    with pytest.raises(ServiceUnavailable) as info:
        _prebind(server)
    assert info.value.condition == "item-not-found"
    # the server ended the session itself: no terminate request follows
    assert server.labels() == [["create"], ["auth"], ["restart", "bind"]]


def test_a_terminating_stream_error_mid_flow_is_its_cause_and_not_terminated_again() -> None:
    """A stream error in a terminating body (ejabberd: condition='remote-stream-error'; here
    the session replaced by another): the session is ended by the server, as in any
    terminating body, so no terminate request follows; the stream error is the cause."""
    server = ScriptedServer(mechanisms=["PLAIN"])
    error = f"<stream:error><conflict xmlns='{STREAM_ERRORS}'/></stream:error>"
    server.override["bind"] = BOSHResponse(
        200, _body(error, type="terminate", condition="remote-stream-error")
    )
    with pytest.raises(ServiceUnavailable) as info:
        _prebind(server)
    assert info.value.condition == "conflict"
    assert server.labels() == [["create"], ["auth"], ["restart", "bind"]]


def test_terminate_carrying_sasl_failure_is_an_auth_failure() -> None:
    server = ScriptedServer(mechanisms=["PLAIN"])
    server.override["auth"] = BOSHResponse(
        200, _body(f"<failure xmlns='{SASL}'><not-authorized/></failure>", type="terminate")
    )
    with pytest.raises(AuthenticationFailed) as info:
        _prebind(server)
    assert info.value.condition == "not-authorized"


def test_stream_error() -> None:
    server = ScriptedServer(mechanisms=["PLAIN"])
    server.override["bind"] = BOSHResponse(
        200,
        _body(
            "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            "<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>replaced</text></stream:error>"
        ),
    )
    with pytest.raises(ServiceUnavailable) as info:
        _prebind(server)
    assert info.value.condition == "conflict"
    _assert_terminated_last(server)

    server = ScriptedServer()
    server.override["create"] = BOSHResponse(
        200,
        _body(
            "<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
            sid="s1",
        ),
    )
    with pytest.raises(ServiceUnavailable) as info:
        _prebind(server)
    assert info.value.condition == "host-unknown"


def test_a_stream_error_in_a_terminating_creation_response_is_its_cause() -> None:
    """ejabberd wraps a stream error in condition='remote-stream-error': the error is the
    cause, as it is in any later response (here mod_fail2ban's ban of this address)."""
    server = ScriptedServer()
    server.override["create"] = BOSHResponse(200, EJABBERD_BANNED)
    with pytest.raises(ServiceUnavailable) as info:
        _prebind(server)
    assert info.value.condition == "policy-violation"
    assert server.labels() == [["create"]]  # the server ended it: nothing to terminate


def test_create_without_sid() -> None:
    server = ScriptedServer()
    server.override["create"] = BOSHResponse(200, _body(_features(["PLAIN"]), wait="59"))
    with pytest.raises(ProtocolError, match="sid"):
        _prebind(server)
    assert server.labels() == [["create"]]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"   ",
        b"not xml",
        b"<html><body>502</body></html>",
        b"<body xmlns='other'/>",
        b"<?xml version='1.0'?><!DOCTYPE body [<!ENTITY x 'y'>]><body xmlns='"
        + HB.encode()
        + b"'>&x;</body>",
    ],
)
def test_bad_create_payloads(payload: bytes) -> None:
    server = ScriptedServer()
    server.override["create"] = BOSHResponse(200, payload)
    with pytest.raises(ProtocolError):
        _prebind(server)


def test_parsed_body_children_are_its_elements_only() -> None:
    """Comments and processing instructions between the children are not children (the
    parser drops them); a CDATA section passes the DTD check, which looks for ``<!`` first."""
    from bosh_middleware.body import parse_body

    parsed = parse_body(
        (
            f"<body xmlns='{HB}' sid='s1' type='terminate' condition='gone' requests='2'>"
            "<!-- a comment --><a xmlns='x'/><?pi data?>text<b xmlns='x'><![CDATA[<&>]]></b>"
            "</body>"
        ).encode(),
        max_size=10_000,
    )
    assert [el.tag for el in parsed.children] == ["{x}a", "{x}b"]
    assert parsed.children[1].text == "<&>"
    assert parsed.root.tag == f"{{{HB}}}body"
    assert (parsed.type, parsed.condition, parsed.get("sid")) == ("terminate", "gone", "s1")
    assert parsed.int_attr("requests") == 2 and parsed.int_attr("hold") is None
    assert parsed.attrs == {"sid": "s1", "type": "terminate", "condition": "gone", "requests": "2"}
    for dtd in (b"<!DOCTYPE body>", b"<!ENTITY x 'y'>"):
        with pytest.raises(ProtocolError, match="DTD"):
            parse_body(dtd + f"<body xmlns='{HB}'/>".encode(), max_size=10_000)


#: ejabberd 23.01's answer to a session creation request from an address mod_fail2ban has
#: banned, as it sent it (``xmlns:stream`` declared twice on the <body>).
EJABBERD_BANNED = (
    "<body xmpp:version='1.0' authid='396758473042770667' type='terminate'"
    f" condition='remote-stream-error' xmlns:stream='{STREAMS}' xmlns='{HB}'"
    " sid='70f95c7983d8e9f18a979b05455626f321699a27' wait='20' ver='1.11' polling='2'"
    " inactivity='30' hold='1' xmpp:restartlogic='true' requests='2' secure='true'"
    f" maxpause='120' xmlns:xmpp='{XBOSH}' xmlns:stream='{STREAMS}' from='localhost'>"
    "<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
    "<text xml:lang='en' xmlns='urn:ietf:params:xml:ns:xmpp-streams'>Too many (2) failed"
    " authentications from this IP address (127.0.0.1). The address will be unblocked at"
    " 09:20:46 02.12.2026 UTC</text></stream:error></body>"
).encode()


def test_a_namespace_the_body_declares_twice_alike_is_read() -> None:
    """ejabberd's refusal of a session at creation (a stream error) declares ``xmlns:stream``
    twice: read, not taken for a broken server; a repeat that says something else is not."""
    from bosh_middleware.body import parse_body

    parsed = parse_body(EJABBERD_BANNED, max_size=10_000)
    assert (parsed.type, parsed.condition) == ("terminate", "remote-stream-error")
    assert [el.tag for el in parsed.children] == [f"{{{STREAMS}}}error"]
    assert parsed.children[0][0].tag == "{urn:ietf:params:xml:ns:xmpp-streams}policy-violation"
    other = EJABBERD_BANNED.replace(
        f"xmlns:stream='{STREAMS}' from".encode(), b"xmlns:stream='urn:other' from"
    )
    for malformed in (other, f"<body xmlns='{HB}' a='1' a='1'/>".encode()):
        with pytest.raises(ProtocolError, match="well-formed"):
            parse_body(malformed, max_size=10_000)


def _hostile_bodies(target: str) -> dict[str, bytes]:
    """Bodies that name a local file for libxml2 to open, in the shapes that got past the
    byte scan for ``<!DOCTYPE`` (UTF-16) or that only the parser itself can refuse."""
    system = f"<!DOCTYPE body SYSTEM '{target}'><body xmlns='{HB}' sid='&secret;'/>"
    param = (
        f"<!DOCTYPE body [<!ENTITY % p SYSTEM '{target}'> %p;]><body xmlns='{HB}' sid='&secret;'/>"
    )
    decl = "<?xml version='1.0' encoding='UTF-16'?>"
    return {
        "utf-16 external subset": (decl + system).encode("utf-16"),
        "utf-16 parameter entity": (decl + param).encode("utf-16"),
        "utf-8 external subset": system.encode(),
        "utf-8 parameter entity": param.encode(),
    }


def test_no_body_makes_the_parser_read_a_local_file(tmp_path: Path) -> None:
    """A hostile server's DOCTYPE must not get a local file read: neither through
    ``parse_body`` (a UTF-16 body has no ASCII ``<!DOCTYPE`` for its byte scan) nor through
    the parser alone, whose ``load_dtd=False`` and ``no_network=True`` do not stop libxml2
    from opening a ``file:`` external subset or parameter entity."""
    from bosh_middleware.body import _parser, parse_body

    dtd = tmp_path / "evil.dtd"
    dtd.write_text("<!ENTITY secret 'FROM-THE-FILE'>")
    for name, data in _hostile_bodies(dtd.as_uri()).items():
        with pytest.raises(ProtocolError):
            parse_body(data, max_size=100_000)
        if name.startswith("utf-8"):  # the parser alone, without the byte scan before it
            with pytest.raises(ProtocolError, match="external resource"):
                etree.fromstring(data, _parser())


def test_a_doctype_naming_a_named_pipe_does_not_hang_the_parser(tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes: a parser that followed the DOCTYPE would
    hang the prebind past every deadline (and the event loop with it, on the async driver)."""
    import os
    import threading

    from bosh_middleware.body import _parser

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def parse() -> None:
        try:
            etree.fromstring(_hostile_bodies(fifo.as_uri())["utf-8 external subset"], _parser())
            outcome.append(None)
        except BaseException as exc:  # (reported to the test thread)
            outcome.append(exc)

    worker = threading.Thread(target=parse, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # let a parser stuck in open() go before failing
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(5)
        pytest.fail("the parser opened the named pipe a DOCTYPE named")
    assert len(outcome) == 1 and isinstance(outcome[0], ProtocolError)


def test_bodies_are_read_as_utf8_whatever_they_declare() -> None:
    """XMPP is UTF-8 (RFC 6120 11.6): a declaration of another encoding is not followed."""
    from bosh_middleware.body import parse_body

    latin1_declared = f"<?xml version='1.0' encoding='ISO-8859-1'?><body xmlns='{HB}' sid='é'/>"
    assert parse_body(latin1_declared.encode(), max_size=10_000).get("sid") == "é"
    bom = b"\xef\xbb\xbf" + f"<body xmlns='{HB}' sid='s'/>".encode()
    assert parse_body(bom, max_size=10_000).get("sid") == "s"
    utf16 = f"<?xml version='1.0' encoding='UTF-16'?><body xmlns='{HB}' sid='s'/>"
    with pytest.raises(ProtocolError, match="well-formed"):
        parse_body(utf16.encode("utf-16"), max_size=10_000)


def test_a_utf16_doctype_from_the_server_never_reaches_the_next_request(tmp_path: Path) -> None:
    """End to end through the flow: the reviewer's case, where the entity a local file
    defined came back to the server as the ``sid`` of the next request."""
    dtd = tmp_path / "evil.dtd"
    dtd.write_text("<!ENTITY secret 'FROM-THE-FILE'>")
    server = ScriptedServer()
    server.override["create"] = BOSHResponse(
        200, _hostile_bodies(dtd.as_uri())["utf-16 external subset"]
    )
    with pytest.raises(ProtocolError):
        _prebind(server)
    assert server.labels() == [["create"]]


def test_non_integer_requests_attribute() -> None:
    server = ScriptedServer()
    server.override["create"] = BOSHResponse(
        200, _body(_features(["PLAIN"]), sid="s", requests="two")
    )
    with pytest.raises(ProtocolError, match="requests"):
        _prebind(server)


def test_cleanup_errors_do_not_hide_the_cause() -> None:
    """A terminate that fails itself (thrown into the flow) must not replace the real error."""
    server = ScriptedServer(password="other", mechanisms=["PLAIN"])
    flow = _proto().flow()
    batch = next(flow)
    while batch[0].label != "terminate":
        batch = flow.send(server.respond(batch))
    with pytest.raises(AuthenticationFailed):
        flow.throw(ServiceUnavailable("down", condition="timeout"))


def test_abort_requests_for_an_interrupted_flow() -> None:
    """A flow interrupted from outside (a cancelled task) while a batch was out: the server
    may have got it or not, so the session is ended with a terminate for each RID it may
    expect next; once, and nothing before there is a session."""
    proto = _proto()
    assert proto.abort_requests() == []  # no session yet
    server = ScriptedServer()
    flow = proto.flow()
    batch = next(flow)
    batch = flow.send(server.respond(batch))  # session created, auth out and unanswered
    reqs = proto.abort_requests()
    assert [r.rid for r in reqs] == [batch[0].rid, batch[-1].rid + 1]
    for req in reqs:
        assert req.label == "terminate" and req.best_effort and not req.ordered
        root = etree.fromstring(req.body)
        assert root.get("type") == "terminate" and root.get("sid") == server.sid
        assert int(root.get("rid")) == req.rid
    assert proto.abort_requests() == []  # only once
    flow.close()


def test_abort_requests_after_every_answer_came_is_one_terminate() -> None:
    proto = _proto()
    server = ScriptedServer(password="other", mechanisms=["PLAIN"])
    flow = proto.flow()
    batch = next(flow)
    while batch[0].label != "terminate":  # (the SASL failure: the flow ends the session)
        last, batch = batch, flow.send(server.respond(batch))
    assert [r.rid for r in batch] == [last[-1].rid + 1]
    flow.close()


# ------------------------------------------------------------------------------------------
# Other flows, credentials
# ------------------------------------------------------------------------------------------


def test_probe_flow_reports_and_terminates() -> None:
    server = ScriptedServer(mechanisms=["PLAIN", "SCRAM-SHA-1"])
    info = server.run(probe_flow("example.org", PrebindOptions()))
    assert info.mechanisms == ["PLAIN", "SCRAM-SHA-1"]
    assert info.features == ["mechanisms"]
    assert info.attrs["wait"] == "59" and info.attrs["requests"] == "2"
    assert server.labels() == [["create"], ["terminate"]]


def test_terminate_flow_uses_the_session_rid() -> None:
    session = PrebindSession(jid=JID + "/r", sid="abc", rid=123456, service_url=LOCAL_URL)
    flow = terminate_flow(session)
    (req,) = next(flow)
    root = etree.fromstring(req.body)
    assert (req.rid, root.get("rid"), root.get("sid"), root.get("type")) == (
        123456,
        "123456",
        "abc",
        "terminate",
    )
    assert req.best_effort
    with pytest.raises(StopIteration):
        flow.send([BOSHResponse(200, _body(type="terminate"))])


def test_session_as_dict_is_what_converse_expects() -> None:
    session = _prebind(ScriptedServer())
    assert session.as_dict() == {"jid": session.jid, "sid": session.sid, "rid": session.rid}


def test_credentials_never_show_the_password() -> None:
    creds = Credentials(JID, PASSWORD)
    assert PASSWORD not in repr(creds) and PASSWORD not in str(creds)
    proto = _proto(creds)
    assert PASSWORD not in repr(proto)
    assert creds.user_key == JID and creds.localpart == "alice" and creds.domain == "example.org"
    anon = Credentials.anonymous("anon.example.org")
    assert anon.is_anonymous and anon.user_key == "anonymous@anon.example.org"
    for bad in (
        lambda: Credentials("alice@example.org", ""),
        lambda: Credentials("example.org", "pw"),
        lambda: Credentials.anonymous("a@b"),
    ):
        with pytest.raises(ValueError):
            bad()


def test_requests_and_derive_steps_never_show_the_password() -> None:
    """What a flow yields reaches reprs nobody meant to log (a traceback's locals, an
    assertion's message): a PLAIN auth body is the password in base64, a SCRAM response
    body carries the proof, and the Derive step derives from the password."""
    scram.clear_cache()  # (a cached derivation yields no Derive step)
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    for mech in ("PLAIN", "SCRAM-SHA-1"):
        server = ScriptedServer(mechanisms=[mech])
        flow = _proto(quickstart=False).flow()
        shown: list[str] = []
        with contextlib.suppress(StopIteration):
            step = next(flow)
            while True:
                shown.append(repr(step))
                if type(step) is Derive:
                    step.run()
                    step = flow.send([])
                else:
                    shown += [repr(r) for r in step] + [str(r) for r in step]
                    step = flow.send(server.respond(step))
        assert server.stage == "bound"
        secrets_sent = [PASSWORD, plain]
        for req in server.requests:
            root = etree.fromstring(req.body)
            for el in root.iter(f"{{{SASL}}}auth", f"{{{SASL}}}response"):
                secrets_sent.append(el.text or "")
                proof = base64.b64decode(el.text or "").partition(b",p=")[2]
                secrets_sent += [proof.decode()] if proof else []
            assert f"rid={req.rid}" in repr(req) and repr(req.label) in repr(req)
        assert len(secrets_sent) == (3 if mech == "PLAIN" else 5)  # (the proof was found)
        if mech.startswith("SCRAM"):
            assert any(s.startswith("Derive(") for s in shown)
        for text in shown:
            for secret in secrets_sent:
                assert secret not in text, (secret, text)


def test_bad_credentials_for_scram_are_a_configuration_error() -> None:
    from bosh_middleware import ConfigurationError

    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    with pytest.raises(ConfigurationError):
        _prebind(server, Credentials(JID, "bad\u0007password"))
    _assert_terminated_last(server)


def test_each_answer_is_parsed_once_though_drivers_wrap_it_anew(monkeypatch) -> None:
    """The transports call ``settles`` as each answer of a pipelined batch arrives, wrapping
    the same bytes in a new ``BOSHResponse`` each time (and once more for the flow): the XML
    must still be parsed once per answer, not once per look at it."""
    from bosh_middleware import body as body_module

    parsed: list[bytes] = []
    real = body_module.parse_body

    def counting(data: bytes, *, max_size: int) -> body_module.ParsedBody:
        parsed.append(data)
        return real(data, max_size=max_size)

    monkeypatch.setattr(body_module, "parse_body", counting)
    server = ScriptedServer(mechanisms=["SCRAM-SHA-1"])
    flow = _proto().flow()
    answers: list[bytes] = []
    try:
        batch = next(flow)
        while True:
            if type(batch) is Derive:
                batch.run()
                batch = flow.send([])
                continue
            got = [server.answer(req) for req in batch]
            answers += [r.body for r in got]
            settles = batch[0].settles
            for i in range(1, len(got) + 1):  # as each arrives, in new wrappers every time
                if settles is not None:
                    settles([BOSHResponse(r.status_code, r.body) for r in got[:i]])
            batch = flow.send([BOSHResponse(r.status_code, r.body) for r in got])
    except StopIteration as stop:
        session = stop.value
    assert session.jid.startswith(JID + "/")
    assert len(answers) == 5  # create, auth, auth-response, restart, bind
    assert parsed == answers  # each once, in order
